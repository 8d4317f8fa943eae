"""The trials a spec expands to, each once: the grid, crossed with ``search.num_samples`` draws of
the other domains, run once per seed, with the trials that repeat another removed.

A trial repeats another when the two configs are equal once the fields their method ignores are
dropped: ``kind: {grid: [l0, none]}`` crossed with ``lam: {grid: [0.05, 0.5]}`` would train the
dense model once per ``lam``, which it ignores, so the dense model is trained once (per seed).
Random domains are drawn here, seeded by ``search.random_state``, so the expansion (and so the
trial count) is known when the spec is validated; every draw runs once per seed.

Each trial is named by what it trains (``l0 weight lam=0.05 seed=0``, ``dense seed=1``): the
method, then the searched fields its method uses, then the seed; names are unique in a sweep.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .domains import _domain_tag

if TYPE_CHECKING:
    from .spec import SweepSpec

__all__ = [
    "METHOD_FIELDS",
    "Expansion",
    "ExpansionTooLarge",
    "expand",
    "ignored_fields",
    "run_name",
    "trial_name",
]

# The regularizer fields each method reads (`sweeps.methods.build_method` and the training loop);
# `kind` aside, every other field of the section is ignored by that method.
METHOD_FIELDS: dict[str, frozenset[str]] = {
    "l0": frozenset(
        {
            "lam",
            "l2",
            "droprate_init",
            "temperature",
            "granularity",
            "per_sample",
            "test_gate",
            "target_sparsity",
            "dual_lr",
            "gate_init",
            "include",
            "exclude",
        }
    ),
    "l1": frozenset({"lam", "l1_threshold", "include", "exclude"}),
    "magnitude": frozenset(
        {"target_sparsity", "prune_scope", "prune_begin", "prune_end", "include", "exclude"}
    ),
    "channel-norm": frozenset(
        {"target_sparsity", "granularity", "prune_begin", "prune_end", "include", "exclude"}
    ),
    "none": frozenset(),
}
_SECTIONS = ("regularizer", "train")
# How many configurations (duplicates included) a spec may expand to, per trial allowed.
_EXPANSION_PER_TRIAL = 64


class ExpansionTooLarge(ValueError):
    """The spec's grid, samples and seeds multiply to more configurations than are expanded."""


def ignored_fields(config: dict[str, Any]) -> set[str]:
    """The fields (``"regularizer.lam"``) a concrete trial config sets that its training ignores."""
    reg, train = config["regularizer"], config["train"]
    kind = reg["kind"]
    ignored = {f"regularizer.{k}" for k in reg if k != "kind" and k not in METHOD_FIELDS[kind]}
    if kind == "l0" and reg.get("target_sparsity") is None:
        ignored.add("regularizer.dual_lr")  # the controller's step, without a controller
    if kind != "l0":
        ignored.add("train.gate_lr")  # only L0 has gate logits
    if train.get("optimizer") != "sgd":
        ignored.add("train.momentum")
    if not train.get("finetune_epochs"):
        ignored.add("train.finetune_lr")
    return ignored


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def trial_name(config: dict[str, Any], searched: Iterable[str]) -> str:
    """What a trial trains, in words: ``l0 weight lam=0.05 seed=0``, ``dense seed=1``.

    Args:
        config: a concrete trial config (sections and ``seed``).
        searched: the spec's searched fields (``"regularizer.lam"``); those the trial's method
            uses are named with their values.
    """
    from .spec import granularity_label  # spec imports this module

    reg = config["regularizer"]
    kind = reg["kind"]
    words = {"l0": ["l0", granularity_label(reg["granularity"])], "none": ["dense"]}.get(
        kind, [kind]
    )
    shown = {"regularizer.kind", "regularizer.granularity"}
    if kind in ("l0", "magnitude", "channel-norm") and reg.get("target_sparsity") is not None:
        words.append(f"target={_format(reg['target_sparsity'])}")
        shown.add("regularizer.target_sparsity")
    ignored = ignored_fields(config)
    for field in searched:
        if field not in shown and field not in ignored:
            section, key = field.split(".", 1)
            words.append(f"{key}={_format(config[section][key])}")
    words.append(f"seed={config['seed']}")
    return " ".join(words)


def run_name(config: dict[str, Any], trial_id: str, searched: Iterable[str]) -> str:
    """The name of a trial's MLflow run: the one the expansion gave it, else (an optuna trial)
    its :func:`trial_name` with the trial's number, which keeps it unique in the sweep."""
    if config.get("name"):
        return str(config["name"])
    number = trial_id.rsplit("_", 1)[-1]
    suffix = f"#{int(number) + 1}" if number.isdigit() else trial_id
    return f"{trial_name(config, searched)} {suffix}"


@dataclass(frozen=True)
class Expansion:
    """A spec's distinct trials (concrete configs, each with its ``name``) and how many
    configurations of the expansion repeated one of them."""

    trials: list[dict[str, Any]]
    duplicates: int


def _draw(domain: Any, rng: random.Random) -> Any:
    kind = _domain_tag(domain)
    values = getattr(domain, kind)
    if kind == "choice":
        return rng.choice(list(values))
    low, high = values
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(low, high)  # randint: both ends included


def _draws(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """The searched values of every draw: each grid point once per sample, the other domains
    drawn afresh for each (grid fields in the spec's order, the first varying slowest)."""
    searched = spec.searched_fields()
    grids = {f: d.grid for f, d in searched.items() if _domain_tag(d) == "grid"}
    rng = random.Random(spec.search.random_state)
    for _ in range(spec.search.num_samples):
        for point in itertools.product(*grids.values()):
            values = dict(zip(grids, point, strict=True))
            for field, domain in searched.items():
                if field not in values:
                    values[field] = _draw(domain, rng)
            yield {f: values[f] for f in searched}


def expand(spec: SweepSpec, max_trials: int) -> Expansion:
    """The distinct trials of ``spec`` (random and grid search; optuna proposes its own).

    Args:
        spec: the sweep.
        max_trials: the most trials a sweep may run; the expansion stops at
            ``64 * max_trials`` configurations, duplicates included.

    Raises:
        ExpansionTooLarge: the grid, samples and seeds multiply past that bound.
    """
    raw = spec.grid_size() * spec.search.num_samples * len(spec.search.seeds)
    if raw > _EXPANSION_PER_TRIAL * max_trials:
        raise ExpansionTooLarge(
            f"the spec expands to {raw} configurations (grid {spec.grid_size()} x num_samples "
            f"{spec.search.num_samples} x seeds {len(spec.search.seeds)}) before duplicates are "
            f"removed, over {_EXPANSION_PER_TRIAL} x the trial limit {max_trials} "
            "(L0SWEEP_MAX_TRIALS)"
        )
    dumped = spec.model_dump(mode="json")
    searched = list(spec.searched_fields())
    draws = list(_draws(spec))
    seen: set[str] = set()
    names: dict[str, int] = {}
    trials = []
    for seed in spec.search.seeds:
        for values in draws:
            config: dict[str, Any] = {s: dict(dumped[s]) for s in ("model", "dataset", *_SECTIONS)}
            for field, value in values.items():
                section, key = field.split(".", 1)
                config[section][key] = value
            config["seed"] = seed
            ignored = ignored_fields(config)
            key = json.dumps(
                [seed, [(f, v) for f, v in values.items() if f not in ignored]], sort_keys=True
            )
            if key in seen:
                continue
            seen.add(key)
            name = trial_name(config, searched)
            names[name] = names.get(name, 0) + 1
            config["name"] = name if names[name] == 1 else f"{name} #{names[name]}"
            trials.append(config)
    return Expansion(trials, raw - len(trials))
