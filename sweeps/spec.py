"""The sweep spec: one Pydantic model that the REST API, the CLI and every trial validate with.

Any field typed ``Searchable[...]`` takes either a fixed value or one search domain, written as a
one-key mapping: ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [low, high]}``,
``{loguniform: [low, high]}`` or ``{randint: [low, high]}`` (both ends included). Domain values
are validated against the field's own type, so errors carry the field path
(``regularizer.lam.loguniform.0``). Model and dataset parameters are validated by the registry
entry they name. Limits (``L0SWEEP_MAX_TRIALS``, ``L0SWEEP_MAX_EPOCHS``) come from
:mod:`sweeps.config`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    PositiveInt,
    Tag,
    TypeAdapter,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic_core import core_schema

from .augment import AugmentSpec
from .config import DataDirs, get_settings
from .domains import (
    DOMAIN_KINDS,
    Choice,
    Fraction,
    Grid,
    LogUniform,
    RandInt,
    SearchInt,
    Uniform,
    _is_domain,
    _possible,
    _searchable,
    _Strict,
    lone_surrogate,
)
from .registry import DATASETS, MODELS, Entry, Registry, takes_dirs
from .variants import Expansion, ExpansionTooLarge, expand

if TYPE_CHECKING:
    from .data import DataSplits

__all__ = [
    "DOMAIN_KINDS",
    "EPOCH_METRICS",
    "FINAL_METRICS",
    "SPEED_METRICS",
    "Choice",
    "DatasetSpec",
    "Grid",
    "InitFromSweep",
    "LogUniform",
    "ModelSpec",
    "Objective",
    "RandInt",
    "RegularizerSpec",
    "ResourcesSpec",
    "SchedulerSpec",
    "SearchSpec",
    "SweepSpec",
    "TrainSpec",
    "TrialConfig",
    "Uniform",
    "json_schema",
]

# What a trial reports after every epoch (objectives and schedulers may use these) ...
EPOCH_METRICS = {
    "epoch": "epoch number, from 1",
    "train_loss": "mean task loss over the epoch's batches",
    "penalty": "regularization term at the end of the epoch (lambda included)",
    "expected_l0": "expected number of retained gated parameters",
    "expected_density": "expected_l0 / number of gated parameters",
    "sparsity": "fraction of gated parameters whose deterministic gate is exactly 0",
    "val_loss": "task loss on the validation split (deterministic gates)",
    "val_accuracy": "accuracy on the validation split (deterministic gates)",
    "expected_flops": "expected multiply-adds per example",
    "nonzero_params": "nonzero parameters of the exported model",
    "total_params": "parameters of the dense model",
    "epoch_seconds": "wall time of the epoch's training",
}
# ... once, at the end, measured on the exported model: objectives may use these (the Pareto front
# and the report do; a search or scheduler cannot, they never see them during training) ...
SPEED_METRICS = {
    "latency_ms_b1": ("min", "median forward time of the exported model on one example, ms"),
    "throughput": ("max", "examples per second of the exported model on batches of 256"),
    "speedup_vs_dense": (
        "max",
        "throughput over the dense model's, timed side by side by the driver (front trials)",
    ),
    "model_bytes": ("min", "bytes of the exported model's parameters and buffers"),
}
# ... and once, at the end, on the test split: never an objective (choose on validation).
FINAL_METRICS = {
    "test_accuracy": "accuracy of the exported (pruned) model on the test split",
    "shrunk_params": "parameters of the shrunk model (structured gates)",
    "shrunk_flops": "multiply-adds per example of the exported model (zero weights skipped)",
}


UNIT_KINDS = ("head", "output")
"""The structured units a granularity list gates together (heads and MLP hidden units/channels)."""


def _unit_kinds(value: list[str]) -> list[str] | str:
    if len(set(value)) != len(value):
        raise ValueError(f"a granularity list lists each unit kind once; got {value}")
    ordered = [k for k in UNIT_KINDS if k in value]  # one order: [output, head] is [head, output]
    return ordered[0] if len(ordered) == 1 else ordered


UnitKinds = Annotated[
    list[Literal["head", "output"]], Field(min_length=1), AfterValidator(_unit_kinds)
]


def granularity_units(granularity: str | list[str]) -> tuple[str, ...]:
    """The unit kinds of one concrete granularity: ``"output"`` or ``["head", "output"]``."""
    return tuple(granularity) if isinstance(granularity, list | tuple) else (granularity,)


def granularity_label(granularity: str | list[str]) -> str:
    """A granularity in words for names and labels: ``output``, ``head+output``."""
    return "+".join(granularity_units(granularity))


class RegularizerSpec(_Strict):
    """Which sparsity method wraps the model, with the l0core options.

    ``kind``: ``l0`` (hard-concrete gates), ``l1`` (penalty, then a threshold), ``magnitude``
    (gradual magnitude pruning to ``target_sparsity``, Zhu & Gupta 2017), ``channel-norm``
    (the coupled channel groups with the smallest filter L1 norms removed, Li et al. 2017, on the
    same schedule) or ``none`` (dense).
    """

    kind: _searchable(Literal["l0", "l1", "magnitude", "channel-norm", "none"]) = "l0"
    lam: _searchable(Annotated[float, Field(ge=0)], (Uniform, LogUniform)) = Field(
        default=0.1,
        description="Penalty weight; as in the L0 paper the penalty is lam * count / N_train.",
    )
    granularity: _searchable(Literal["weight", "output", "input", "head"] | UnitKinds) = Field(
        default="weight",
        description="l0: one gate per weight, per output unit or channel (coupled through "
        "residual adds and concatenations), per input feature, or per attention head; a list "
        "[head, output] gates heads and the MLP's hidden units together; channel-norm: output "
        "(what it reads the default 'weight' as), head, or both.",
    )
    droprate_init: _searchable(Fraction, (Uniform,)) = 0.2
    temperature: _searchable(Annotated[float, Field(gt=0)], (Uniform, LogUniform)) = 2 / 3
    per_sample: _searchable(bool) = False
    test_gate: _searchable(Literal["mean", "median"]) = "mean"
    target_sparsity: _searchable(Fraction | None, (Uniform,)) = Field(
        default=None,
        description="l0: the Lagrangian controller's target (None: fixed lambda); "
        "magnitude, channel-norm: the sparsity to prune to (required).",
    )
    dual_lr: _searchable(Annotated[float, Field(gt=0)] | None, (Uniform, LogUniform)) = Field(
        default=None,
        description="l0 with target_sparsity: the multipliers' dual-ascent step per training "
        "step (larger: the target is reached sooner, and overshot); None: 0.5 when "
        "train.init_from is set (measured), else l0core's default (0.005).",
    )
    gate_init: _searchable(Literal["auto", "random", "magnitude"]) = Field(
        default="auto",
        description="l0: initial gate logits; magnitude: the gates of the largest (pretrained) "
        "weights start most open; auto: magnitude when train.init_from is set, else random.",
    )
    prune_scope: _searchable(Literal["global", "layer"]) = Field(
        default="global",
        description="magnitude: rank all selected weights together, or prune each tensor alike.",
    )
    prune_begin: _searchable(Annotated[float, Field(ge=0, le=1)], (Uniform,)) = Field(
        default=0.0,
        description="magnitude, channel-norm: where pruning starts, as a fraction of the "
        "training steps before the fine-tuning epochs.",
    )
    prune_end: _searchable(Annotated[float, Field(ge=0, le=1)], (Uniform,)) = Field(
        default=0.5,
        description="magnitude, channel-norm: where the target is reached (cubic schedule in "
        "between; equal to prune_begin: one-shot, the steps after it fine-tune).",
    )
    l2: _searchable(Annotated[float, Field(ge=0)], (Uniform, LogUniform)) = Field(
        default=0.0, description="Expected-L2 weight decay of the L0 paper (weight_decay)."
    )
    l1_threshold: _searchable(Annotated[float, Field(gt=0)], (LogUniform,)) = 1e-3
    include: list[str] | None = Field(default=None, description="Glob patterns to gate.")
    exclude: list[str] | None = Field(default=None, description="Glob patterns not to gate.")

    @model_validator(mode="after")
    def _method_options(self) -> RegularizerSpec:
        kinds, targets = _possible(self.kind), _possible(self.target_sparsity)
        for kind in PRUNED_TO_TARGET:
            if kind in kinds and (targets is not None and None in targets):
                raise ValueError(
                    f"kind {kind!r} needs target_sparsity, the sparsity to prune to (a number in "
                    f"(0, 1) or a search domain over such numbers), got {self.target_sparsity!r}"
                )
        units = {u for g in _possible(self.granularity) or () for u in granularity_units(g)}
        if "channel-norm" in kinds:
            unstructured = sorted(units - {"weight", *CHANNEL_NORM_GRANULARITIES})
            if unstructured:
                raise ValueError(
                    f"kind 'channel-norm' removes whole channels or heads: granularity "
                    f"{unstructured} is not allowed with it; allowed: "
                    f"{list(CHANNEL_NORM_GRANULARITIES)} (or the default 'weight', read as 'output')"
                )
        begin, end = _possible(self.prune_begin), _possible(self.prune_end)
        if begin is not None and end is not None and max(begin) > min(end):
            raise ValueError(
                f"prune_begin ({self.prune_begin}) must not be after prune_end ({self.prune_end})"
            )
        return self


PRUNED_TO_TARGET = ("magnitude", "channel-norm")
"""The methods that prune to ``target_sparsity`` on the ``prune_begin``/``prune_end`` schedule."""
CHANNEL_NORM_GRANULARITIES = ("output", "head")


def _head_without_attention(spec: SweepSpec) -> str | None:
    """Why ``granularity: head`` cannot apply to the spec's model, or None.

    A model's parameter class says whether it has attention heads (``has_attention``); a model
    that does not say (a lab's plugin) is checked when the driver builds it, before any trial.
    """
    possible = _possible(spec.regularizer.granularity) or ()
    if not any("head" in granularity_units(g) for g in possible):
        return None
    if getattr(type(spec.model.params), "has_attention", None) is not False:
        return None
    return (
        f"regularizer.granularity 'head' gates attention heads, and model {spec.model.name!r} has "
        "none; use granularity 'output' (channels), or a model with attention such as 'vit'"
    )


RunId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class InitFromSweep(_Strict):
    """Start from a trial of an earlier sweep: its finished trial with this trial's seed and the
    best val_accuracy (the best of all if none has the seed)."""

    sweep: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][\w.\- ]*$",
        description="A sweep id, or a sweep name: the latest FINISHED sweep of that name in the "
        "same experiment.",
    )


class TrainSpec(_Strict):
    """How each trial trains."""

    epochs: PositiveInt = 10
    batch_size: SearchInt = 128
    optimizer: _searchable(Literal["adam", "sgd"]) = "adam"
    lr: _searchable(Annotated[float, Field(gt=0)], (Uniform, LogUniform)) = 1e-3
    gate_lr: _searchable(Annotated[float, Field(gt=0)] | None, (Uniform, LogUniform)) = Field(
        default=0.1,
        description="Learning rate of the gate logits; None: same as lr. Gates need a much "
        "higher one than weights (at lr 1e-3 a target-sparsity run collapses).",
    )
    weight_decay: _searchable(Annotated[float, Field(ge=0)], (Uniform, LogUniform)) = 0.0
    momentum: _searchable(Annotated[float, Field(ge=0, lt=1)], (Uniform,)) = 0.9
    init_from: RunId | InitFromSweep | None = Field(
        default=None,
        description="Weights to start from (then fine-tune with gates that start open): an "
        "MLflow run id of a trial, or {sweep: <sweep id or name>}.",
    )
    finetune_epochs: int = Field(
        default=0,
        ge=0,
        description="The last epochs of train.epochs train the pruned model with its zeros "
        "fixed (gates frozen at their eval values; no penalty).",
    )
    finetune_lr: _searchable(Annotated[float, Field(gt=0)] | None, (Uniform, LogUniform)) = Field(
        default=None, description="Learning rate of the fine-tuning epochs; None: lr."
    )

    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="The model's forward and loss under autocast: fp32 (none), bf16 (CPUs and "
        "GPUs) or fp16 (GPUs, with a gradient scaler); the gates' math, the penalty and the "
        "optimizer stay in fp32, and evaluation runs in fp32.",
    )

    @model_validator(mode="after")
    def _finetune_within_epochs(self) -> TrainSpec:
        if self.finetune_epochs >= self.epochs:
            raise ValueError(
                f"finetune_epochs ({self.finetune_epochs}) must be below epochs ({self.epochs})"
            )
        return self


class _FromRegistry:
    """A ``model`` or ``dataset`` field whose choices are the registry's entries when a spec is
    validated (or its schema published), not when this module was imported: an entry registered
    later (a plugin loaded at start-up, a test's model) is accepted, and importing the spec loads
    no plugin. The choices are a union of one spec class per entry, discriminated by ``name``,
    so errors keep their field paths (``model.mlp.params.hidden.0``)."""

    def __init__(self, registry: Registry, kind: str) -> None:
        self.registry = registry
        self.kind = kind

    def adapter(self) -> TypeAdapter[Any]:
        """The union of the entries registered now (built again only when they change)."""
        return _union_adapter(self.kind, tuple(self.registry.entries()))

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: Any, info: ValidationInfo) -> Any:
            return self.adapter().validate_python(value, context=info.context)

        return core_schema.with_info_plain_validator_function(validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> Any:
        return handler(self.adapter().core_schema)


@cache
def _entry_spec(kind: str, entry: Entry) -> type[_Strict]:
    """The spec class of one entry; one per entry, so a validated spec's ``model`` stays an
    instance of its class when another entry is registered."""
    return create_model(
        f"{kind}_{entry.name}".replace("-", "_"),
        __base__=_DatasetSpec if kind == "dataset" else _Strict,
        name=(Literal[entry.name], ...),
        params=(entry.params, Field(default_factory=entry.params)),
        **({"__doc__": entry.description} if entry.description else {}),
    )


@lru_cache(maxsize=16)
def _union_adapter(kind: str, entries: tuple[Entry, ...]) -> TypeAdapter[Any]:
    members = [Annotated[_entry_spec(kind, e), Tag(e.name)] for e in entries]
    return TypeAdapter(Annotated[Union[tuple(members)], Discriminator("name")])  # noqa: UP007


class _DatasetSpec(_Strict):
    """What every dataset takes besides its own params: the splits and the augmentation."""

    val_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5, description="If no test split.")
    split_seed: int = 0
    augment: AugmentSpec | None = Field(
        default=None,
        description="Augment the training batches (images only) on the trial's device; "
        "validation and test are never augmented.",
    )

    def load(self, dirs: DataDirs | None = None) -> DataSplits:
        """This dataset with its splits (`sweeps.data.load_dataset`, cached per process), from
        ``dirs`` (default: the settings in force)."""
        from .data import load_dataset

        params = self.params.model_dump(mode="json")  # a field of each subclass
        return load_dataset(
            self.name, params, self.val_fraction, self.test_fraction, self.split_seed, dirs
        )

    @model_validator(mode="after")
    def _data_on_disk(self, info: ValidationInfo) -> _DatasetSpec:
        # Params that name files check them here, so a bad path is a spec error (a 422) before
        # any trial trains; validation context {"check_data": False} skips it (a spec read back
        # to be shown, or written for another machine's data directory).
        params = self.params  # a field of each subclass
        augments = self.augment is not None and (self.augment.crop or self.augment.flip)
        if augments and getattr(type(params), "gives_images", None) is False:
            raise ValueError(
                f"augment needs images (C, H, W), and dataset {self.name!r} gives 1-D "
                "signals; remove augment or use an image dataset"
            )
        check = getattr(params, "check_data", None)
        context = info.context or {}
        if check is not None and context.get("check_data", True):
            check(**takes_dirs(check, context.get("data_dirs")))
        return self


ModelSpec = Annotated[Any, _FromRegistry(MODELS, "model")]
DatasetSpec = Annotated[Any, _FromRegistry(DATASETS, "dataset")]


class Objective(_Strict):
    metric: str
    mode: Literal["max", "min"] = "max"

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        if self.metric in FINAL_METRICS:
            raise ValueError(
                f"{self.metric!r} is measured once on the test split and cannot be an objective; "
                "choose on validation metrics"
            )
        if self.metric not in EPOCH_METRICS and self.metric not in SPEED_METRICS:
            raise ValueError(
                f"unknown metric {self.metric!r}; allowed: {', '.join(EPOCH_METRICS)} (every "
                f"epoch), {', '.join(SPEED_METRICS)} (measured on the exported model)"
            )
        return self


class SearchSpec(_Strict):
    algorithm: Literal["random", "optuna"] = Field(
        default="random", description="random: grid and random sampling; optuna: multi-objective."
    )
    num_samples: PositiveInt = Field(default=1, description="Samples (each repeats the grid).")
    seeds: list[int] = Field(default=[0], min_length=1, description="Every config runs per seed.")
    random_state: int = Field(default=0, description="Seed of the search algorithm itself.")


class SchedulerSpec(_Strict):
    kind: Literal["fifo", "asha"] = "fifo"
    metric: str | None = Field(default=None, description="Default: the first objective's metric.")
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(default=2.0, gt=1)


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)
    max_concurrent_trials: PositiveInt | None = None
    max_failures: int = Field(default=0, ge=0, description="Retries per trial (from checkpoint).")
    time_budget_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> ResourcesSpec:
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ValueError(f"gpus_per_trial above 1 must be whole, got {self.gpus_per_trial}")
        return self


class SweepSpec(_Strict):
    """A sweep: what to train, how to search, where to record it."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\- ]*$")
    experiment: str = Field(default="l0sweep", min_length=1, max_length=200)
    tags: dict[str, str] = Field(default_factory=dict)
    model: ModelSpec
    dataset: DatasetSpec
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="val_accuracy"), Objective(metric="sparsity")],
        min_length=1,
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON escapes can carry lone surrogates ("\ud800"), which no UTF-8 encoder (MLflow's, the
        # spec digest's) accepts; unconstrained str fields (tags, globs) let them through.
        bad = lone_surrogate(data)
        if bad is not None:
            raise ValueError(f"{bad} is not valid Unicode (a lone surrogate, escaped as \\uD8xx)")
        return data

    @classmethod
    def from_file(
        cls, path: str | Path, *, check_data: bool = True, data_dirs: DataDirs | None = None
    ) -> SweepSpec:
        """Load a spec from a YAML (.yaml/.yml) or JSON file.

        Args:
            check_data: check the files the dataset names in this machine's data directory;
                False for a spec that runs elsewhere (submitted to a cluster's service).
            data_dirs: where to check them; default: the settings read now.
        """
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data, context={"check_data": check_data, "data_dirs": data_dirs})

    def searched_fields(self) -> dict[str, Any]:
        """``{"section.field": domain}`` for every searched field."""
        out = {}
        for section in ("regularizer", "train"):
            for key, value in getattr(self, section):
                if _is_domain(value):
                    out[f"{section}.{key}"] = value
        return out

    def grid_size(self) -> int:
        return math.prod(
            len(d.grid) for d in self.searched_fields().values() if isinstance(d, Grid)
        )

    def expansion(self) -> Expansion:
        """The distinct trials of a random/grid search (:func:`sweeps.variants.expand`).

        Raises:
            ExpansionTooLarge: the spec multiplies out past what is expanded.
        """
        return expand(self, get_settings().max_trials)

    def num_trials(self) -> int:
        """The distinct trials this spec runs: the grid x num_samples x seeds, less the trials
        equal to another once the fields their method ignores are dropped (optuna: num_samples)."""
        if self.search.algorithm == "optuna":
            return self.search.num_samples * len(self.search.seeds)
        return len(self.expansion().trials)

    def duplicate_trials(self) -> int:
        """How many configurations of the expansion repeated another and are not run."""
        return 0 if self.search.algorithm == "optuna" else self.expansion().duplicates

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        problems = []
        searched = self.searched_fields()
        if self.search.algorithm == "optuna":
            grids = [k for k, d in searched.items() if isinstance(d, Grid)]
            if grids:
                problems.append(f"optuna search takes no grid domains ({grids}); use choice")
            if len(self.search.seeds) > 1:
                problems.append(
                    "optuna proposes one config per trial: give one seed, or use random"
                )
        metric = self.scheduler.metric or self.objectives[0].metric
        if self.scheduler.kind == "asha":
            if metric not in EPOCH_METRICS:
                problems.append(
                    f"scheduler.metric {metric!r} is not reported; use one of {list(EPOCH_METRICS)}"
                )
            if self.scheduler.grace_period > self.train.epochs:
                problems.append(
                    f"scheduler.grace_period {self.scheduler.grace_period} exceeds train.epochs {self.train.epochs}"
                )
        if self.train.precision == "fp16" and not self.resources.gpus_per_trial:
            problems.append(
                "train.precision 'fp16' needs a GPU (its gradient scaler is CUDA's): set "
                "resources.gpus_per_trial, or use 'bf16', which CPUs run"
            )
        no_heads = _head_without_attention(self)
        if no_heads:
            problems.append(no_heads)
        speed = [o.metric for o in self.objectives if o.metric in SPEED_METRICS]
        if speed and self.search.algorithm == "optuna":
            problems.append(
                f"objectives {speed} are measured once the model is exported, after training: "
                "optuna never sees them; use search.algorithm random (the front uses them)"
            )
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            problems.append(f"objectives repeat a metric: {names}")
        settings = get_settings()
        if self.train.epochs > settings.max_epochs:
            problems.append(
                f"train.epochs {self.train.epochs} exceeds the limit {settings.max_epochs} (L0SWEEP_MAX_EPOCHS)"
            )
        try:
            trials, duplicates = self.num_trials(), self.duplicate_trials()
        except ExpansionTooLarge as err:
            problems.append(str(err))
        else:
            if trials > settings.max_trials:
                problems.append(
                    f"the spec expands to {trials} trials (grid {self.grid_size()} x num_samples "
                    f"{self.search.num_samples} x seeds {len(self.search.seeds)}, {duplicates} "
                    f"duplicates removed), over the limit {settings.max_trials} (L0SWEEP_MAX_TRIALS)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class TrialConfig:
    """One trial's config, validated with the spec's own models, every search domain resolved:
    what the trial builds its model, data, method and optimizer from (typed: no section is read
    by key). :meth:`dump` is its JSON form, the trial run's MLflow params."""

    model: Any  # the model's spec class (`ModelSpec`): ``name`` and typed ``params``
    dataset: Any  # the dataset's spec class (`DatasetSpec`): ``params``, splits, ``augment``
    regularizer: RegularizerSpec
    train: TrainSpec
    seed: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> TrialConfig:
        """Validate a trial's sections (``model``, ``dataset``, ``regularizer``, ``train``,
        ``seed``), the data files its dataset names included (on this node).

        Raises:
            pydantic.ValidationError: a section is malformed.
            ValueError: a search domain survived into the trial (a bug in the expansion).
        """
        reg = RegularizerSpec.model_validate(config["regularizer"])
        train = TrainSpec.model_validate(config["train"])
        leftover = [k for m in (reg, train) for k, v in m if _is_domain(v)]
        if leftover:
            raise ValueError(f"trial config still holds search domains: {leftover}")
        probe = SweepSpec.model_validate(
            {"name": "trial", "model": config["model"], "dataset": config["dataset"]}
        )
        return cls(probe.model, probe.dataset, reg, train, int(config["seed"]))

    def dump(self) -> dict[str, Any]:
        """The JSON form: each section's dump, and ``seed``."""
        return {
            "model": self.model.model_dump(mode="json"),
            "dataset": self.dataset.model_dump(mode="json"),
            "regularizer": self.regularizer.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "seed": self.seed,
        }


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`SweepSpec` (``l0sweep schema``, ``GET /schema/sweep``)."""
    return SweepSpec.model_json_schema()
