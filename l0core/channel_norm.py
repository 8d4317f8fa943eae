"""Channel-norm pruning: the structured baseline L0's channel gates are compared with.

Li, Kadav, Durdanovic, Samet & Graf (2017), "Pruning Filters for Efficient ConvNets": rank the
filters of a network by the L1 norm of their weights and remove the smallest, one-shot then
fine-tune. Here the units are l0core's coupled groups (:mod:`l0core.groups`), the ones L0's
``granularity="output"`` (or ``"head"``) gates: a channel tied by residual adds, concatenations
or a depthwise convolution is one unit, ranked by the mean absolute value of all the filter
weights that create it (the L1 norm divided by their number, so units of coupled groups of
different sizes compare), and removed everywhere it lives by the same graph export
(:func:`l0core.graph_export.shrink_graph`). Fronts of L0 and channel-norm pruning then compare on
the same parameters, FLOPs and test accuracy.

The schedule is magnitude pruning's (:func:`l0core.magnitude.cubic_sparsity`): the fraction of
the units' parameters that are removed ramps up cubically from ``begin_step`` to ``end_step``
(``begin_step == end_step``: one-shot), and the training after ``end_step`` is the fine-tuning.
A closed unit stays closed. Masks act on the tensors a gate of the plan would multiply (a
BatchNorm's affine entries, or the rows and bias of a producer no norm follows) through
``torch.nn.utils.prune``'s reparametrization, so a closed unit is exactly zero wherever it lives,
gets no gradient, and the export equals the masked model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .checks import check_fraction, check_int
from .cost import cascaded_weights
from .export import example_rows, finish_export
from .graph_export import shrink_graph
from .groups import GroupPlan, plan_groups
from .magnitude import schedule_step
from .method import CountedMethod, Pruned, SummaryRow
from .selection import Selector, select_params

__all__ = ["ChannelNormPruner", "unit_filter_norms"]

_FILTERS = ("rows", "depthwise")  # the filter weights that create a unit (not its norm entries)


def _tensor(module: nn.Module, attr: str) -> Tensor | None:
    """A parameter by name, or its unmasked original under ``torch.nn.utils.prune``."""
    return module._parameters.get(attr, module._parameters.get(f"{attr}_orig"))


@torch.no_grad()
def unit_filter_norms(plan: GroupPlan) -> Tensor:
    """Per gate of ``plan``, the mean absolute value of the filter weights that create its unit:
    the producer rows (and a depthwise convolution's channels) of every member, biases aside."""
    model = plan.model
    ref = next(iter(model.parameters()))
    total = torch.zeros(plan.n_gates, dtype=torch.float32, device=ref.device)
    count = torch.zeros_like(total)
    for inc in plan.graph.incidences:
        if inc.role not in _FILTERS:
            continue
        p = _tensor(model.get_submodule(inc.module), inc.attr)
        if p is None or p.dim() < 2:
            continue
        idx = plan.gate_index(inc).to(p.device)
        keep = idx < plan.n_gates
        if not keep.any():
            continue
        dims = [d for d in range(p.dim()) if d != inc.dim]
        total.index_add_(0, idx[keep], p.abs().sum(dims).float()[keep])
        per_index = torch.full((len(idx),), float(p.numel() // p.shape[inc.dim]), device=p.device)
        count.index_add_(0, idx[keep], per_index[keep])
    return total / count.clamp_min(1.0)


class ChannelNormPruner(CountedMethod):
    """Prune ``model``'s coupled channel groups by filter L1 norm to ``target_sparsity``.

    Every forward in training mode is one step of the schedule (masks are updated before it
    runs); eval forwards do not advance it. The step count and the closed units travel in the
    ``state_dict``.

    Args:
        model: any module that l0core's graph walk traces; used in place (its gated tensors get
            ``torch.nn.utils.prune`` masks).
        target_sparsity: the final fraction of the units' own parameters (rows, norm entries,
            depthwise channels: what L0's ``sparsity()`` counts for coupled groups) removed, in
            (0, 1). Every group keeps at least one unit.
        end_step: the step at which the target is reached.
        begin_step: the step at which pruning starts; ``begin_step == end_step`` is one-shot.
        frequency: steps between mask updates.
        granularity: ``"output"`` (channels), ``"head"`` (attention heads) or both, as for
            ``L0Regularizer``.
        include, exclude: which producer weights may lose units, as for ``L0Regularizer``.

    Raises:
        ValueError: a value out of range, or a model with no unit that can be removed.
        GraphError: the model does not trace.
    """

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float,
        end_step: int,
        *,
        begin_step: int = 0,
        frequency: int = 1,
        granularity: str | list[str] = "output",
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        super().__init__()
        self.target_sparsity = check_fraction("target_sparsity", target_sparsity)
        self.begin_step = check_int("begin_step", begin_step, 0)
        self.end_step = check_int("end_step", end_step, self.begin_step)
        self.frequency = check_int("frequency", frequency, 1)
        self.module = model
        self.plan = plan_groups(model, select_params(model, include, exclude), granularity)
        if self.plan.n_gates == 0:
            raise ValueError(
                f"channel-norm pruning found no unit to remove at granularity {granularity!r} "
                f"(why, per parameter: {dict(list(self.plan.not_gated.items())[:3])})"
            )
        tied = [m for m in self.plan.masks if m.aliases]
        if tied:
            raise ValueError(
                f"masks cannot act on tied parameters ({tied[0].attr} of a module shared with "
                f"{len(tied[0].aliases)} other attribute(s)); exclude them"
            )
        for m in self.plan.masks:
            torch_prune.custom_from_mask(
                m.module, m.attr, torch.ones_like(getattr(m.module, m.attr))
            )
        owned = [torch.full((len(g.roots),), float(g.owned)) for g in self.plan.groups]
        self.register_buffer("unit_params", torch.cat(owned), persistent=False)
        self.register_buffer("closed", torch.zeros(self.plan.n_gates, dtype=torch.bool))
        self.n_gated = int(self.unit_params.sum())
        self.steps = 0
        self.applied_sparsity = 0.0
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._example: tuple[tuple, dict] | None = None  # the first forward's rows

    @property
    def group_plan(self) -> GroupPlan:
        """The coupled groups the masks act on."""
        return self.plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._example is None:
            self._example = example_rows(args, kwargs)
        if self.training:
            schedule_step(self)
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Close the lowest-norm units until ``sparsity`` of the units' parameters are removed
        (units closed before stay closed; each group keeps its highest-norm unit)."""
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        scores = unit_filter_norms(self.plan).to(self.closed.device)
        scores = scores.masked_fill(self.closed, -1.0)  # closed units rank first: they stay closed
        keep_one = torch.zeros_like(self.closed)
        for g in self.plan.groups:
            keep_one[g.offset + int(scores[g.offset : g.offset + len(g.roots)].argmax())] = True
        scores = scores.masked_fill(keep_one, float("inf"))
        order = torch.argsort(scores, stable=True)
        removed = torch.cumsum(self.unit_params.to(scores.device)[order], 0)
        n_close = int((removed <= sparsity * self.n_gated + 0.5).sum())
        closed = torch.zeros_like(self.closed)
        closed[order[:n_close]] = True
        self.closed.copy_((closed & ~keep_one) | self.closed)
        self._apply_masks()
        self.applied_sparsity = float(sparsity)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        zfull = torch.cat([(~self.closed).float(), self.closed.new_ones(1, dtype=torch.float)])
        for m in self.plan.masks:
            mask = getattr(m.module, f"{m.attr}_mask")
            mask.fill_(1.0)
            for dim, index in m.dims:
                shape = [1] * mask.dim()
                shape[dim] = -1
                mask.mul_(zfull.to(mask.device)[index].view(shape).to(mask.dtype))
            setattr(m.module, m.attr, getattr(m.module, f"{m.attr}_orig") * mask)

    def regularization(self) -> Tensor:
        """No penalty: the masks do the work (0 on the parameters' device)."""
        return torch.zeros((), device=self.closed.device)

    def count_l0(self) -> Tensor:
        """Parameters of the units still open (what L0's ``count_l0`` counts for groups)."""
        return (self.unit_params * (~self.closed).to(self.unit_params.dtype)).sum()

    def group_summary(self) -> list[dict[str, Any]]:
        """Per coupled group: its name, kind, units, member tensors and the fraction kept."""
        return [
            {
                "group": g.name,
                "kind": g.kind,
                "n_gates": len(g.roots),
                "params_per_gate": g.owned,
                "members": list(g.members),
                "eval_density": float(
                    (~self.closed[g.offset : g.offset + len(g.roots)]).float().mean()
                ),
            }
            for g in self.plan.groups
        ]

    def summary(self) -> list[SummaryRow]:
        """Per parameter of the plain model: name, shape, its group, the fraction kept."""
        owner: dict[str, tuple[str, float]] = {}
        for row in self.group_summary():
            for member in row["members"]:
                path, _, role = member.partition("[")
                if role.rstrip("]") in ("rows", "norm", "depthwise"):
                    owner.setdefault(path, (row["group"], row["eval_density"]))
        rows = []
        for name, p in self.module.named_parameters():
            name = name.removesuffix("_orig")
            group = owner.get(name)
            if group is None:
                rows.append(SummaryRow.ungated_row(name, p))
                continue
            rows.append(
                SummaryRow.gated_row(
                    name,
                    p,
                    granularity="output",
                    applied=f"group:{group[0]}",
                    n_gates=0,
                    expected_density=group[1],
                )
            )
        return rows

    def kept_weights(self) -> dict[str, float]:
        """Per layer, the weights of the model the export gives: a closed unit removes its rows
        and the columns of every layer that reads it (:func:`l0core.cost.cascaded_weights`)."""
        open_ = (~self.closed).float().cpu()
        p_root = {r: open_[u] for r, u in self.plan.unit_of.items()}
        return cascaded_weights(self.plan.graph, self.module, p_root, {})

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the module (no prune hooks or buffers) with the closed units at 0.

        Args:
            shrink: also remove the closed units from every tensor they live in (the graph
                export).
        """
        with torch.no_grad():  # the hooks leave non-leaf tensors behind, which cannot be copied
            for m in self.plan.masks:
                orig, mask = (
                    getattr(m.module, f"{m.attr}_orig"),
                    getattr(m.module, f"{m.attr}_mask"),
                )
                setattr(m.module, m.attr, orig * mask)
            model = copy.deepcopy(self.module)
        names = {id(mod): n for n, mod in self.module.named_modules()}
        for m in self.plan.masks:
            torch_prune.remove(model.get_submodule(names[id(m.module)]), m.attr)
        if not shrink:
            return Pruned(*finish_export(model, False))
        model.eval()
        return Pruned(*shrink_graph(model, self.plan, self.closed.cpu(), self._example))

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "applied_sparsity": self.applied_sparsity}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.applied_sparsity = float(state["applied_sparsity"])
        self._apply_masks()

    def extra_repr(self) -> str:
        return (
            f"target_sparsity={self.target_sparsity}, steps=[{self.begin_step}, {self.end_step}] "
            f"every {self.frequency}, units={self.plan.n_gates}, gated_params={self.n_gated}"
        )
