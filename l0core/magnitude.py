"""Magnitude pruning with the regularizers' interface: the baseline most people use instead of L0.

``MagnitudePruner`` is gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune:
exploring the efficacy of pruning for model compression"): while the model trains, the smallest
weights are masked so that the sparsity of the selected tensors follows the cubic schedule

    s_t = s_f * (1 - (1 - (t - t_0) / (t_1 - t_0))^3)        for t_0 <= t <= t_1,

updated every ``frequency`` steps, ``s_f`` from ``t_1`` on (``t_0 == t_1`` prunes one-shot). The
ranking is global over all selected tensors (``scope="global"``) or per tensor (``"layer"``).
Masks use ``torch.nn.utils.prune``'s reparametrization (``weight = weight_orig * weight_mask``),
so a pruned weight gets no gradient and, ranked below every kept one, never returns.

``FixedMask`` trains an already pruned model with its zeros kept at zero: the fine-tuning phase
after any method (the eval gates of L0, the threshold of L1, a magnitude mask).

Both create their masks at construction (all ones for the pruner), so the ``state_dict`` keys
(``weight_orig``, ``weight_mask``) do not change while training and a checkpoint taken at any
step loads into a fresh wrapper; ``prune()`` removes the reparametrization
(``torch.nn.utils.prune.remove``) and returns a plain module.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .checks import check_fraction, check_int
from .export import finish_export
from .flops import layer_of_weight
from .graph_export import shrink_graph
from .groups import GroupPlan
from .method import CountedMethod, Pruned, SparsityMethod, SummaryRow, elementwise_rows
from .selection import Selector, TargetParam, select_params

__all__ = ["FixedMask", "MagnitudePruner", "cubic_sparsity"]

SCOPES = ("global", "layer")


def cubic_sparsity(
    step: int, target: float, begin_step: int, end_step: int, frequency: int = 1
) -> float:
    """The sparsity Zhu & Gupta's schedule asks for at ``step``.

    0 before ``begin_step``, ``target`` from ``end_step`` on, the cubic ramp in between, held
    constant for ``frequency`` steps at a time (the ramp is evaluated at the last update step).
    """
    if step < begin_step:
        return 0.0
    if step >= end_step:
        return target
    t = begin_step + (step - begin_step) // frequency * frequency
    return target * (1.0 - (1.0 - (t - begin_step) / (end_step - begin_step)) ** 3)


def schedule_step(pruner: Any) -> None:
    """One training step of a pruner on the cubic schedule (its ``steps``, ``target_sparsity``,
    ``begin_step``, ``end_step``, ``frequency``): its masks are updated when the schedule asks for
    more sparsity than they apply, then the step is counted."""
    wanted = cubic_sparsity(
        pruner.steps, pruner.target_sparsity, pruner.begin_step, pruner.end_step, pruner.frequency
    )
    if wanted > pruner.applied_sparsity:
        pruner.update_masks(wanted)
    pruner.steps += 1


class BinaryMaskMethod(CountedMethod):
    """Fixed 0/1 masks on parameters of ``model`` (``torch.nn.utils.prune``), with the methods'
    inspection and export: the base of magnitude pruning and of :class:`FixedMask`. Not to be
    confused with ``gates.Masked`` (where a gate acts on a tensor) or ``masking`` (the sampled
    masked weights of L0).

    Args:
        model: the module, used in place: its selected parameters become ``<name>_orig`` with a
            ``<name>_mask`` buffer (``torch.nn.utils.prune``).
        masked: the parameters that get a mask.
        counted: the names among them whose zeros ``sparsity()`` and ``count_l0()`` count.
        masks: the initial mask of each masked parameter (same order).
    """

    def __init__(
        self,
        model: nn.Module,
        masked: list[TargetParam],
        counted: set[str],
        masks: list[Tensor],
    ) -> None:
        super().__init__()
        tied = [t for t in masked if t.aliases]
        if tied:
            raise ValueError(
                f"masks cannot act on tied parameters ({tied[0].name} is shared with "
                f"{len(tied[0].aliases)} other module attribute(s)); exclude them"
            )
        self.module = model
        self._sites = [(t.name, t.module, t.attr) for t in masked]
        self._counted = [i for i, t in enumerate(masked) if t.name in counted]
        for (_, mod, attr), mask in zip(self._sites, masks, strict=True):
            torch_prune.custom_from_mask(mod, attr, mask)
        self.n_gated = sum(masked[i].param.numel() for i in self._counted)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        # Coupled groups to export through (FixedMask after a structured method), else None.
        self._group_plan: GroupPlan | None = None
        self._example: tuple[tuple, dict] | None = None

    def _masks(self) -> list[Tensor]:
        return [getattr(mod, f"{attr}_mask") for _, mod, attr in self._sites]

    def _origs(self) -> list[Tensor]:
        return [getattr(mod, f"{attr}_orig") for _, mod, attr in self._sites]

    def regularization(self) -> Tensor:
        """No penalty: the masks do the work (0 on the parameters' device)."""
        return torch.zeros((), device=self._masks()[0].device)

    def count_l0(self) -> Tensor:
        """Number of counted parameters that the masks keep."""
        masks = self._masks()
        return sum(masks[i].sum() for i in self._counted)

    def summary(self) -> list[SummaryRow]:
        """Per parameter of the plain model: name, shape, whether counted, kept fraction."""
        masks = dict(zip((s[0] for s in self._sites), self._masks(), strict=True))
        counted = {self._sites[i][0] for i in self._counted}
        kept = {name: float(mask.mean()) for name, mask in masks.items()}
        params = ((n.removesuffix("_orig"), p) for n, p in self.module.named_parameters())
        return elementwise_rows(params, counted, kept, "mask")

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the module (no prune hooks or buffers) with masked weights at 0.

        Args:
            shrink: also remove dead units (``l0core.export.shrink``, or the graph export of
                the coupled groups given to ``FixedMask``).
        """
        with torch.no_grad():  # the hooks leave non-leaf tensors behind, which cannot be copied
            for (_, mod, attr), orig, mask in zip(
                self._sites, self._origs(), self._masks(), strict=True
            ):
                setattr(mod, attr, orig * mask)
        model = copy.deepcopy(self.module)
        for name, _, attr in self._sites:
            owner = name.rpartition(".")[0]
            torch_prune.remove(model.get_submodule(owner) if owner else model, attr)
        if shrink and self._group_plan is not None:
            model.eval()
            plan = self._group_plan
            return Pruned(*shrink_graph(model, plan, plan.zero_units(model), self._example))
        return Pruned(*finish_export(model, shrink))

    def kept_weights(self) -> dict[str, float]:
        """Per layer whose weight is masked, the weights its mask keeps."""
        kept = {}
        for (name, _, _), mask in zip(self._sites, self._masks(), strict=True):
            layer = layer_of_weight(name)
            if layer is not None:
                kept[layer] = float(mask.sum())
        return kept


class MagnitudePruner(BinaryMaskMethod):
    """Gradual magnitude pruning of ``model`` to ``target_sparsity``; ``pruner(*args)`` runs it.

    Every forward in training mode is one step of the schedule (masks are updated before it
    runs); eval forwards do not advance it. The step count travels in the ``state_dict``.

    Args:
        model: any module, used in place.
        target_sparsity: the final fraction of selected weights at zero, in (0, 1).
        end_step: the step at which the target is reached (``t_1``).
        begin_step: the step at which pruning starts (``t_0``); ``begin_step == end_step``
            prunes one-shot.
        frequency: steps between mask updates (``Delta t``).
        scope: ``"global"`` ranks all selected weights together, ``"layer"`` prunes every
            tensor to the same sparsity.
        include, exclude: as for ``L0Regularizer`` (default: parameters with 2+ dimensions).

    Raises:
        ValueError: a value out of range, an unknown scope, or tied parameters selected.
    """

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float,
        end_step: int,
        *,
        begin_step: int = 0,
        frequency: int = 1,
        scope: str = "global",
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        target_sparsity = check_fraction("target_sparsity", target_sparsity)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        begin_step = check_int("begin_step", begin_step, 0)
        end_step = check_int("end_step", end_step, begin_step)
        frequency = check_int("frequency", frequency, 1)
        targets = select_params(model, include, exclude)
        super().__init__(
            model, targets, {t.name for t in targets}, [torch.ones_like(t.param) for t in targets]
        )
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.target_sparsity = float(target_sparsity)
        self.scope = scope
        self.steps = 0
        self.applied_sparsity = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            schedule_step(self)
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Mask the smallest-magnitude weights so that ``sparsity`` of them are zero now.

        Weights masked before rank below every kept weight, so they stay masked.
        """
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        masks = self._masks()
        scores = [
            torch.where(m.bool(), w.detach().abs().float(), -1.0)
            for w, m in zip(self._origs(), masks, strict=True)
        ]
        if self.scope == "global":
            flat = torch.cat([s.flatten() for s in scores])
            new = _keep_largest(flat, sparsity).split([s.numel() for s in scores])
        else:
            new = [_keep_largest(s.flatten(), sparsity) for s in scores]
        for m, keep in zip(masks, new, strict=True):
            m.copy_(keep.view_as(m))
        self.applied_sparsity = float(sparsity)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "applied_sparsity": self.applied_sparsity}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.applied_sparsity = float(state["applied_sparsity"])

    def extra_repr(self) -> str:
        return (
            f"target_sparsity={self.target_sparsity}, steps=[{self.begin_step}, {self.end_step}] "
            f"every {self.frequency}, scope={self.scope!r}, gated_params={self.n_gated}"
        )


class FixedMask(BinaryMaskMethod):
    """Train a pruned model with its zeros fixed: every parameter element that is exactly 0 now
    stays 0 (its mask is 0), every other element trains.

    Use :meth:`after` to fine-tune a method's pruned model: a structured method's coupled
    groups come along, so ``prune(shrink=True)`` removes its closed units through the same graph
    export (residual, concatenating and attention networks, not only chains).

    Args:
        model: a pruned plain module (e.g. ``L0Regularizer.prune()``), used in place.
        include, exclude: the parameters whose zeros ``sparsity()`` counts (default: those with
            2+ dimensions, as the regularizers); every parameter keeps its zeros.
        plan: the coupled groups of the method that pruned ``model`` (same module names); a
            unit whose entries are all zero is removed by ``prune(shrink=True)``.
        example: ``(args, kwargs)`` of a forward, to check the shrunk model against.
    """

    def __init__(
        self,
        model: nn.Module,
        include: Selector = None,
        exclude: Selector = None,
        plan: GroupPlan | None = None,
        example: tuple[tuple, dict] | None = None,
    ) -> None:
        counted = {t.name for t in select_params(model, include, exclude)}
        everything = select_params(model, "*")
        super().__init__(model, everything, counted, [(t.param != 0).to(t.param.dtype)
                                                      for t in everything])  # fmt: skip
        self._group_plan, self._example = plan, example

    @classmethod
    def after(
        cls, method: SparsityMethod, include: Selector = None, exclude: Selector = None
    ) -> FixedMask:
        """The fine-tuning phase after ``method``: its pruned model with the zeros fixed, and its
        coupled groups (``method.group_plan``, when it has them) for the export."""
        return cls(
            method.prune().model,
            include,
            exclude,
            plan=method.group_plan,
            example=method.example_rows,
        )


def _keep_largest(scores: Tensor, sparsity: float) -> Tensor:
    """A 0/1 mask (the scores' dtype) keeping the ``(1 - sparsity) * n`` largest scores."""
    keep = scores.numel() - math.floor(sparsity * scores.numel() + 0.5)
    mask = torch.zeros_like(scores)
    mask[torch.topk(scores, keep, sorted=False).indices] = 1.0
    return mask
