"""``L0Regularizer``: hard-concrete L0 gates around any ``torch.nn.Module``.

Louizos, Welling & Kingma (2017), "Learning Sparse Neural Networks through L0 Regularization".
The wrapped module is left intact: its parameters stay where they are (so its ``state_dict`` keys
and checkpoints are unchanged), and gated tensors are swapped in only for the duration of a
forward, once per forward, so a module that reads its weight twice sees one mask (and again for
an activation-checkpoint recomputation of that forward, see ``l0core.gating``). Structured gates
on a layer act on its activations through hooks where that is exact and cheaper, on its weights
where the layer's weights are used outside its own forward (see ``l0core.probe``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_number
from .controller import SparsityController
from .cost import expected_weights
from .eval_cache import EvalGateCache
from .export import chain_export_blockers, example_rows, finish_export
from .functional import (
    LOG_ALPHA_BOUND,
    HardConcrete,
    draw_gates_and_prob,
    eval_gate,
    eval_zero_logit,
    expected_count,
    prob_nonzero,
    sample_gates,
)
from .gates import GateSite, Masked, init_logits, plan_sites, resolve_droprates
from .gating import (
    ForwardGating,
    Running,
    arm_replay,
    release_replays,
    site_batch_dims,
    unit_masks,
)
from .graph_export import export_blockers, group_members, shrink_graph
from .masking import masked_weights
from .method import MethodBase, Pruned, SummaryRow
from .probe import count_reads, settle_hooks
from .selection import Selector, select_granularities, select_params

__all__ = ["L0Regularizer"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class L0Regularizer(MethodBase):
    """Wrap ``model`` with L0 gates; ``reg(*args)`` runs the model with gated parameters.

    Args:
        model: any module; it is used in place (not copied) and not modified.
        lam: strength of the expected-L0 penalty, ``lam * count_l0()``.
        weight_decay: strength of the expected-L2 penalty, ``weight_decay * count_l2()``.
        droprate_init: ``p`` in the initial logit ``log(1 - p) - log(p)``; a float, or a mapping
            ``{glob on parameter name: p}``. It is not ``P(z = 0)``: with the default constants,
            ``p = 0.5`` gives ``P(z != 0) ~ 0.83``.
        temperature, limit_a, limit_b, epsilon: the hard-concrete constants (beta, gamma, zeta
            and the noise clamp).
        granularity: ``"weight"`` (one gate per parameter element, as in the paper),
            ``"output"`` (one per output unit / channel, dim 0 of the weight) or ``"input"``
            (one per input feature, dim 1, the authors' L0Dense); ``"head"`` (one per attention
            head) or a list of ``"head"`` and ``"output"``: units placed by the model's data
            flow (``docs/GRAPHS.md``).
        include, exclude: globs on parameter names or module types, or a callable
            ``(name, param, module) -> bool``. By default every parameter with two or more
            dimensions is gated; ``include="*"`` gates everything. ``include`` may also map
            patterns on module names to granularities, one per module:
            ``{"blocks.*.attn": "head", "blocks.*.mlp.fc1": "output"}`` (then leave
            ``granularity`` at its default; see ``l0core.selection.select_granularities``).
        per_sample: independent gates per example for structured gates applied on activations,
            drawn once per forward (a layer called twice in one forward sees the same ones).
        batch_dim: the dim of the examples in the activations of gated Linear layers, for
            ``per_sample`` (1 for sequence-first ``(T, B, C)``); layers inside a module with a
            ``batch_first`` flag (attention, transformer layers, RNNs) follow that flag.
        test_gate: the eval-mode gate, ``"mean"`` (paper Eq. 13) or ``"median"``.
        target_sparsity: if set, add a Lagrangian term that drives the expected sparsity to it
            (see ``SparsityController``); ``lam`` may then be 0.
        dual_lr: the multipliers' dual-ascent step for ``target_sparsity``, taken by the first
            training forward after the gate logits change: once per optimizer step, whatever
            the number of micro-batches; ``regularization()`` never moves the multipliers. The
            step is driven by the measured eval sparsity, see ``SparsityController``.
        init: ``"random"`` (the authors' N(logit, 0.01)) or ``"magnitude"`` (gates of the
            largest pretrained weights start most open, to fine-tune a trained model).
        example_inputs: the positional inputs of one forward (a tuple, or one tensor). Where
            torch.fx cannot trace the model (Python control flow on data), the structured gates
            are placed on the real call graph of a forward on them (``l0core.record``) instead
            of layer by layer.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        weight_decay: float = 0.0,
        droprate_init: float | Mapping[str, float] = 0.2,
        temperature: float = 2.0 / 3.0,
        limit_a: float = -0.1,
        limit_b: float = 1.1,
        epsilon: float = 1e-6,
        *,
        granularity: str | list[str] = "weight",
        include: Selector = None,
        exclude: Selector = None,
        per_sample: bool = False,
        batch_dim: int = 0,
        test_gate: str = "mean",
        target_sparsity: float | None = None,
        dual_lr: float = 0.005,
        init: str = "random",
        example_inputs: Any = None,
    ) -> None:
        super().__init__()
        self.lam = check_number("lam", lam, 0.0)
        self.weight_decay = check_number("weight_decay", weight_decay, 0.0)
        if test_gate not in ("mean", "median"):
            raise ValueError(f"test_gate must be 'mean' or 'median', got {test_gate!r}")
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {per_sample!r}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"batch_dim must be an integer >= 0, got {batch_dim!r}")
        if per_sample and granularity == "weight":
            raise ValueError(
                "per_sample=True needs structured gates (granularity 'output' or 'input'); "
                "weight gates draw one sample per forward, as in the paper"
            )
        self.hc = HardConcrete(temperature, limit_a, limit_b, epsilon)
        self._zero_logit = eval_zero_logit(self.hc, test_gate)
        self.granularity, self.per_sample, self.test_gate = granularity, per_sample, test_gate
        self.module = model
        if isinstance(include, Mapping):
            if granularity != "weight":
                raise ValueError(
                    f"granularity={granularity!r} given with include={{pattern: granularity}}: "
                    "give the granularities in include only"
                )
            targets, granularity = select_granularities(model, include, exclude)
        else:
            targets = select_params(model, include, exclude)
        example = None
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            example = (args, {})
        self._wsites, self._asites, self._ungated = plan_sites(
            model, targets, granularity, per_sample, example
        )
        self._masked = [(s, m) for s in self._wsites for m in s.masked]
        self._group_plan = next((s.plan for s in self._asites if s.plan is not None), None)
        ref = targets[0].param
        dtype = ref.dtype if ref.dtype == torch.float64 else torch.float32
        for attr, sites in (("weight_log_alpha", self._wsites), ("unit_log_alpha", self._asites)):
            total = sum(s.n_gates for s in sites)
            if not total:
                self.register_parameter(attr, None)
                self.register_buffer(f"_{attr}_groups", None, persistent=False)
                continue
            rates = resolve_droprates(sites, droprate_init)
            logits = init_logits(sites, rates, init, total).clamp_(
                -LOG_ALPHA_BOUND, LOG_ALPHA_BOUND
            )
            setattr(self, attr, nn.Parameter(logits.to(ref.device, dtype)))
            groups = torch.cat([torch.full((s.n_gates,), float(s.group_size)) for s in sites])
            groups = None if bool((groups == 1).all()) else groups.to(ref.device, dtype)
            self.register_buffer(f"_{attr}_groups", groups, persistent=False)
        self.n_gated = sum(s.numel for s in self._wsites + self._asites)
        self._layout = tuple(
            (s.offset, s.n_gates, m.view_shape, m.reduce_dims) for s, m in self._masked
        )
        self.controller = (
            SparsityController(target_sparsity, dual_lr) if target_sparsity is not None else None
        )
        self._eval_cache = EvalGateCache()
        self._unit_masks = [unit_masks(s) if s.plan is None else [] for s in self._asites]
        self._n_group_sites = sum(1 for s in self._asites if s.plan is not None)  # first in line
        self._batch_dims = site_batch_dims(model, self._asites, batch_dim)
        self._hooked: list[bool] | None = None if self._asites else []  # set by the 1st forward
        self._in_forward = False
        self._module_id_set: set[int] | None = None
        self._dual_versions: tuple[tuple[int, int], ...] | None = None  # None: a step is due
        self._shapes: dict[str, tuple[int, ...]] | None = None
        # two rows of the first input (or of example_inputs): export checks its result on them
        self._example = None if example is None else example_rows(*example)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module with gated parameters (sampled in train, deterministic in eval)."""
        release_replays(self)
        if self._example is None:
            self._example = example_rows(args, kwargs)
        if self.training:
            self._clamp_logits()
            self._dual_step()
            gating = self._train_gating()
        else:
            gating = self._eval_gating()
        if self._hooked is None:
            probe = self._probe_forward
            if torch.compiler.is_compiling():  # runs eagerly (torch._dynamo is loaded by then;
                probe = torch.compiler.disable(probe)  # importing it costs seconds at start-up)
            out = probe(gating, args, kwargs)
        else:
            with self._running(), gating, self._shape_recorder():
                out = self.module(*args, **kwargs)
        if torch.is_grad_enabled():
            arm_replay(self, gating, out)
        return out

    def _running(self) -> Running:
        """Marks the module calls of this wrapper's own forward (not recomputations)."""
        return Running(self.__dict__)

    def _probe_forward(self, gating: ForwardGating, args: tuple, kwargs: dict) -> Any:
        """The first forward, with every gate on the weights (exact wherever they are read;
        per-sample gates excepted), finding the layers whose hooks would not see every use of
        their weights (see ``l0core.probe``): those get their gates on the weights from now on."""
        ng = self._n_group_sites  # coupled groups act on their tensors, never by hooks
        hooked = [s.hook_module for s in self._asites[ng:]]
        with self._running(), gating, count_reads(hooked) as usage, self._shape_recorder():
            out = self.module(*args, **kwargs)
        settled = settle_hooks(self._asites[ng:], self._unit_masks[ng:], usage, self.per_sample)
        self._hooked = [False] * ng + settled
        return out

    def _train_gating(self, replay: tuple | None = None) -> ForwardGating:
        """Sampled gates for one training forward, or those of a past one rebuilt from what it
        drew: ``replay = (weight gates, shared unit gates, hooked sites, per-sample gates)``."""
        hooked = self._hooked_now()
        wz, uz, per_sample = None, None, {}
        if replay is not None:
            wz, uz, hooked, per_sample = replay
        swaps: list[tuple[Masked, Tensor]] = []
        if self._wsites:
            la = self._compute(self.weight_log_alpha)
            if wz is None:
                wz, prob = draw_gates_and_prob(la, self.hc)
                param = self.weight_log_alpha  # its penalty, until the logits change
                self.__dict__["_drawn_prob"] = (param, param._version, prob)
            weights = [m.param for _, m in self._masked]
            gated = masked_weights(la, self.hc, weights, self._layout, gates=wz)
            swaps.extend(zip((m for _, m in self._masked), gated, strict=True))
        units: list[Tensor | None] = [None] * len(self._asites)
        if self._asites and (not self.per_sample or not all(hooked)):
            z = sample_gates(self._compute(self.unit_log_alpha), self.hc, gates=uz)
            uz = z.detach()
            units = list(z.split([s.n_gates for s in self._asites]))
            if self.per_sample:  # hooked sites draw theirs on the examples of the first call
                units = [None if h else z for h, z in zip(hooked, units, strict=True)]
        swaps.extend(self._unit_swaps(units, hooked))
        return ForwardGating(self, swaps, units, hooked, ("train", wz, uz), per_sample)

    def _eval_gating(self, hooked: list[bool] | None = None) -> ForwardGating:
        hooked = self._hooked_now() if hooked is None else hooked
        wz, az = self._eval_weights_and_units()
        swaps = list(zip((m for _, m in self._masked), wz, strict=True))
        swaps.extend(self._unit_swaps(az, hooked))
        return ForwardGating(self, swaps, az, hooked, ("eval", None, None))

    def _hooked_now(self) -> list[bool]:
        """Which activation sites act by hooks: in the first forward (``_probe_forward``) none
        but per-sample ones (which cannot act on weights)."""
        if self._hooked is None:
            return [self.per_sample] * len(self._asites)
        return self._hooked

    def _unit_swaps(
        self, units: list[Tensor | None], hooked: list[bool]
    ) -> list[tuple[Masked, Tensor]]:
        """Activation sites whose gates act on the weights (not hooked), and the coupled groups
        (``l0core.groups``): the gated tensors."""
        swaps = [
            (m, m.param * z.view(m.view_shape).to(m.param.dtype))
            for h, z, masks in zip(hooked, units, self._unit_masks, strict=True)
            if not h
            for m in masks
        ]
        if self._group_plan is not None:
            z = torch.cat(units[: self._n_group_sites])
            plan = self._group_plan
            swaps.extend(zip(plan.masks, plan.gated_tensors(z), strict=True))
        return swaps

    def _replayed(self, gating: ForwardGating) -> ForwardGating:
        """The gating of a past forward, rebuilt (differentiable) for a recomputation."""
        kind, wz, uz = gating.values
        with torch.enable_grad():
            if kind == "eval":
                return self._eval_gating(gating.hooked)
            per_sample = {i: z.detach() for i, z in gating.per_sample.items()}
            return self._train_gating((wz, uz, gating.hooked, per_sample))

    @property
    def _module_ids(self) -> set[int]:
        if self._module_id_set is None:
            self._module_id_set = {id(m) for m in self.module.modules()}
        return self._module_id_set

    def _clamp_logits(self) -> None:
        """Keep the logits in bounds; the version counters after it mark them as seen, so the
        clamp itself never counts as an update for :meth:`_dual_step`."""
        moved = self.controller is not None and self._logit_versions() != self._dual_versions
        with torch.no_grad():
            for la in (self.weight_log_alpha, self.unit_log_alpha):
                if la is not None:
                    la.clamp_(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND)
        if self.controller is not None:
            self.__dict__["_dual_versions"] = None if moved else self._logit_versions()

    def _logit_versions(self) -> tuple[tuple[int, int], ...]:
        return tuple((id(la), la._version) for la in self.gate_parameters())

    def _dual_step(self) -> None:
        """The controller's dual step, in the first training forward after the gate logits
        changed (an optimizer step, a load): once per optimizer step, whatever the number of
        micro-batches, and ``regularization()`` stays free of side effects (log it at will)."""
        if self.controller is None or not self.controller.training:
            return
        if self._dual_versions is None:
            self.controller.step(self._eval_sparsity())
            self.__dict__["_dual_versions"] = self._logit_versions()

    @staticmethod
    def _compute(la: Tensor) -> Tensor:
        return la.float() if la.dtype in _LOW_PRECISION else la

    def eval_gates(self) -> tuple[Tensor | None, Tensor | None]:
        """The deterministic gates ``(weight_gates, unit_gates)`` as flat tensors (no grad)."""
        with torch.no_grad():
            return tuple(
                None if la is None else eval_gate(self._compute(la), self.hc, self.test_gate)
                for la in (self.weight_log_alpha, self.unit_log_alpha)
            )

    def _eval_weights_and_units(self) -> tuple[list[Tensor], list[Tensor]]:
        """The eval-gated tensors. The gates are cached while the logits hold the same bits;
        the products with the weights are formed on every call, so writes that the version
        counter does not see (through ``.data``) always reach the output."""
        if torch.is_grad_enabled():  # differentiable deterministic gates (gate saliency analysis)
            zw, zu = (
                None if la is None else eval_gate(self._compute(la), self.hc, self.test_gate)
                for la in (self.weight_log_alpha, self.unit_log_alpha)
            )
        else:
            zw, zu = self._eval_cache.get(tuple(self.gate_parameters()), self.eval_gates)
        wz = [m.param * zw[s.slice].view(m.view_shape).to(m.param.dtype) for s, m in self._masked]
        az = list(zu.split([s.n_gates for s in self._asites])) if zu is not None else []
        return wz, az

    # ---- penalties ------------------------------------------------------------------------
    def _prob_nonzero(self) -> tuple[Tensor | None, Tensor | None]:
        return tuple(
            None if la is None else prob_nonzero(self._compute(la), self.hc)
            for la in (self.weight_log_alpha, self.unit_log_alpha)
        )

    def count_l0(self) -> Tensor:
        """Expected number of retained gated parameters, ``sum_g P(z_g != 0) * |g|``."""
        total = None
        # P(z != 0) of the weight gates, computed by the training forward that drew them: valid
        # while the logits keep their version (until an optimizer step or any in-place write)
        drawn, wla = self.__dict__.get("_drawn_prob"), self.weight_log_alpha
        fresh = drawn is not None and drawn[0] is wla and drawn[1] == wla._version
        for i, (la, groups) in enumerate(self._logits_and_groups()):
            prob = drawn[2] if fresh and i == 0 else None  # the weight logits come first
            term = expected_count(la, self.hc, groups, prob)
            total = term if total is None else total + term
        return total

    def _logits_and_groups(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Each flat logit tensor (in its compute dtype) with its gates' group sizes."""
        for la, groups in (
            (self.weight_log_alpha, self._weight_log_alpha_groups),
            (self.unit_log_alpha, self._unit_log_alpha_groups),
        ):
            if la is not None:
                yield self._compute(la), groups

    def count_l2(self) -> Tensor:
        """Expected L2 cost, ``sum_g P(z_g != 0) * ||theta_g||^2`` over the gated parameters."""
        pw, pu = self._prob_nonzero()
        total = None
        if self._group_plan is not None:
            n = self._group_plan.n_gates
            total = torch.dot(pu[:n], self._group_plan.unit_sq_norms().to(pu.dtype))
        for sites, p in ((self._wsites, pw), (self._asites, pu)):
            for s in sites:
                if s.plan is not None:
                    continue
                w = s.target.live
                dims = _group_dims(s)
                sq = w.pow(2).sum(dims) if dims else w.pow(2)
                term = torch.dot(p[s.slice], sq.flatten().to(p.dtype))
                total = term if total is None else total + term
        return total

    def regularization(self) -> Tensor:
        """``lam * count_l0() + weight_decay * count_l2()`` (+ the target-sparsity term)."""
        l0 = self.count_l0()
        reg = self.lam * l0
        if self.weight_decay:
            reg = reg + self.weight_decay * self.count_l2()
        if self.controller is not None:
            reg = reg + self.controller(1.0 - l0 / self.n_gated)
        return reg

    def _eval_sparsity(self) -> Tensor:
        """The fraction of gated parameters whose eval gate is exactly 0, as a device tensor
        (no host sync: it drives the controller every training step). A gate is 0 exactly when
        its logit is at or below ``eval_zero_logit``."""
        with torch.no_grad():
            zeros = None
            for la, groups in self._logits_and_groups():
                closed = (la <= self._zero_logit).to(la.dtype if groups is None else groups.dtype)
                count = closed.sum() if groups is None else torch.dot(closed, groups)
                zeros = count if zeros is None else zeros + count
            return zeros / self.n_gated

    # ---- inspection and export ------------------------------------------------------------
    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The gate logits (give them their own learning rate)."""
        yield from (la for la in (self.weight_log_alpha, self.unit_log_alpha) if la is not None)

    def _site_eval_gates(self) -> list[tuple[GateSite, Tensor]]:
        zw, zu = self.eval_gates()
        return [(s, zw[s.slice]) for s in self._wsites] + [(s, zu[s.slice]) for s in self._asites]

    def sparsity(self) -> float:
        """Fraction of gated parameters whose eval gate is exactly 0."""
        return float(self._eval_sparsity())

    def summary(self) -> list[SummaryRow]:
        """Per parameter: name, shape, gated, granularity, how applied, densities."""
        pw, pu = self._prob_nonzero()
        probs = {s.name: pw[s.slice] for s in self._wsites}
        probs.update({s.name: pu[s.slice] for s in self._asites})
        sites = dict(self._site_eval_gates_by_name())
        in_group = group_members(self._asites)
        rows = []
        for name, p in self.module.named_parameters():
            if name in sites:
                s, z = sites[name]
                applied = s.applied if s.applied == "weight" else f"activation:{s.hook_name}"
                owner = name
            elif name in in_group:
                s = in_group[name]
                z = sites[s.name][1]
                applied, owner = f"group:{s.name}", s.name
            else:
                rows.append(SummaryRow.ungated_row(name, p))
                continue
            rows.append(
                SummaryRow.gated_row(
                    name,
                    p,
                    granularity=s.granularity,
                    applied=applied,
                    n_gates=s.n_gates,
                    expected_density=float(probs[owner].detach().mean()),
                    eval_density=float((z != 0).float().mean()),
                )
            )
        return rows

    def _site_eval_gates_by_name(self) -> Iterator[tuple[str, tuple[GateSite, Tensor]]]:
        for s, z in self._site_eval_gates():
            yield s.name, (s, z)

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the module whose weights are the eval-gated weights.

        Args:
            shrink: also remove dead units and channels (``l0core.export.shrink``, or the graph
                export of the coupled groups).

        Returns:
            ``(model, report)``: a standard ``nn.Module`` (no l0core objects, no hooks), in
            eval mode, picklable; what shrinking removed (None without ``shrink``).
        """
        model = copy.deepcopy(self.module)
        with torch.no_grad():
            for site, z in self._site_eval_gates():
                if site.plan is None:
                    _apply_gate_to_copy(model, site, z)
            if self._group_plan is not None:
                zu = self.eval_gates()[1]
                self._group_plan.bake(model, zu[: self._group_plan.n_gates])
        if self._group_plan is not None and shrink:
            model.eval()
            return Pruned(*shrink_graph(model, self._group_plan, self._closed(), self._example))
        return Pruned(*finish_export(model, shrink))

    def _closed(self) -> Tensor:
        """Which coupled units are closed in eval (their gate is exactly 0)."""
        zu = self.eval_gates()[1]
        return zu[: self._group_plan.n_gates] == 0

    def group_summary(self) -> list[dict[str, Any]]:
        """Per coupled group: its name, kind, gates, member tensors and densities."""
        pu = self._prob_nonzero()[1]
        zu = self.eval_gates()[1]
        return [
            {
                "group": s.name,
                "kind": s.group.kind,
                "n_gates": s.n_gates,
                "params_per_gate": s.group_size,
                "members": list(s.group.members),
                "expected_density": float(pu[s.slice].detach().mean()),
                "eval_density": float((zu[s.slice] != 0).float().mean()),
            }
            for s in self._asites
            if s.plan is not None
        ]

    def check_export(self, ungated: bool = False) -> list[str]:
        """Why each selected parameter will not shrink with ``prune(shrink=True)``: one line
        per parameter, naming the node and op that keeps it (empty when all of it can).

        Call it right after construction: it reads the plan, not the gates.

        Args:
            ungated: also one line per selected parameter whose units got no structured gate
                because removing them would not be exact (a LayerNorm's input, a GroupNorm
                without affine, the model's output...), with the reason.
        """
        if self._group_plan is not None:
            lines = export_blockers(self._group_plan, self._asites, self._wsites)
        else:
            lines = chain_export_blockers(self.module)
        if ungated:
            lines += [f"{name}: not gated: {why}" for name, why in self._ungated.items()]
        return lines

    def kept_weights(self) -> dict[str, float]:
        """Per Linear/ConvNd layer, its expected non-zero weights: a weight is kept when its
        row's unit and its column's unit are both open, so a closed output also removes the next
        layers' inputs (``l0core.cost``; layers are counted on their own only when the model
        does not trace)."""
        return expected_weights(self)

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, weight_decay={self.weight_decay}, granularity={self.granularity!r}, "
            f"per_sample={self.per_sample}, test_gate={self.test_gate!r}, gated_params={self.n_gated}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_eval_cache"] = EvalGateCache()
        state["_module_id_set"] = None
        state.pop("_drawn_prob", None)
        return state


def _group_dims(site: GateSite) -> tuple[int, ...]:
    """The dimensions of a site's parameter that one gate spans."""
    if site.granularity == "weight":
        return ()
    keep = 0 if site.granularity == "output" else 1
    return tuple(d for d in range(site.target.param.dim()) if d != keep)


def _apply_gate_to_copy(model: nn.Module, site: GateSite, z: Tensor) -> None:
    """Bake eval gates into the parameters of a plain copy of the wrapped module."""
    if site.applied == "weight":
        for m in site.masked:
            mod_name, _, attr = m.name.rpartition(".")
            t = getattr(model.get_submodule(mod_name), attr)
            t.mul_(z.view(m.view_shape).to(t.dtype))
        return
    hook = model.get_submodule(site.hook_name)
    layer = model.get_submodule(site.target.name.rpartition(".")[0])
    if site.granularity == "input":
        layer.weight.mul_(z.view(1, -1, *([1] * (layer.weight.dim() - 2))).to(layer.weight.dtype))
        return
    for t in (hook.weight, hook.bias):  # the layer's rows and bias, or the BatchNorm after it
        if t is not None:
            t.mul_(z.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))
