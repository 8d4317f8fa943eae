"""Baselines with the sparsity-method interface (:mod:`l0core.method`): the dense model, and the
L1 (lasso) penalty with a pruning threshold.

``L1Regularizer`` answers the question people ask first ("how do I add an L1 penalty to my
model?") and is what sweeps compare L0 against: ``lam * sum |theta|`` during training, then every
weight with ``|theta| <= threshold`` is pruned. ``Dense`` is the unregularized model behind the
same interface, the reference every front is compared with.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .checks import check_number
from .export import finish_export
from .flops import layer_of_weight
from .method import CountedMethod, Pruned, SummaryRow, elementwise_rows
from .selection import Selector, select_params

__all__ = ["Dense", "L1Regularizer"]


class Dense(CountedMethod):
    """The unregularized model (the dense baseline): no penalty, every parameter counts as
    kept, so its sparsity is 0 and ``prune()`` is a plain copy.

    Args:
        model: any module (used in place, not modified).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        self.n_gated = sum(p.numel() for p in model.parameters())
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def regularization(self) -> Tensor:
        """No penalty (0 on the parameters' device)."""
        return torch.zeros((), device=next(self.module.parameters()).device)

    def count_l0(self) -> Tensor:
        """Every parameter."""
        return torch.tensor(float(self.n_gated))

    def kept_weights(self) -> dict[str, float]:
        """Every weight of every layer."""
        return {}

    def summary(self) -> list[SummaryRow]:
        """Per parameter: nothing gated, all kept."""
        return [SummaryRow.ungated_row(n, p) for n, p in self.module.named_parameters()]

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the module in eval mode (``shrink`` has no dead units to remove)."""
        return Pruned(copy.deepcopy(self.module).eval(), None)


class L1Regularizer(CountedMethod):
    """An L1 penalty on the selected parameters of ``model``; ``reg(*args)`` runs ``model``.

    Args:
        model: any module (used in place, not modified).
        lam: penalty strength: ``regularization() = lam * sum |theta|``.
        include, exclude: as for ``L0Regularizer`` (default: parameters with 2+ dimensions).
        threshold: weights with ``|theta| <= threshold`` count as zero and are pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        include: Selector = None,
        exclude: Selector = None,
        threshold: float = 1e-3,
    ) -> None:
        super().__init__()
        self.lam = check_number("lam", lam, 0.0)
        self.threshold = check_number("threshold", threshold, 0.0)
        self.module = model
        self._targets = select_params(model, include, exclude)
        self.n_gated = sum(t.param.numel() for t in self._targets)
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _params(self) -> list[Tensor]:
        return [t.live for t in self._targets]

    def regularization(self) -> Tensor:
        """``lam * sum |theta|`` over the selected parameters."""
        return self.lam * torch.stack(torch._foreach_norm(self._params(), 1)).sum()

    def count_l0(self) -> Tensor:
        """Number of selected parameters with ``|theta| > threshold``."""
        with torch.no_grad():
            return sum((p.abs() > self.threshold).sum() for p in self._params())

    def summary(self) -> list[SummaryRow]:
        """Per parameter: whether the threshold acts on it, the fraction above it."""
        chosen = {t.name for t in self._targets}
        params = list(self.module.named_parameters())
        kept = {
            name: float((p.detach().abs() > self.threshold).float().mean())
            for name, p in params
            if name in chosen
        }
        return elementwise_rows(params, chosen, kept, "threshold")

    def prune(self, shrink: bool = False) -> Pruned:
        """A plain copy of the module with ``|theta| <= threshold`` set to exactly 0 (dead units
        removed with ``shrink``, :func:`l0core.export.shrink`)."""
        model = copy.deepcopy(self.module)
        chosen = {t.name for t in self._targets}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in chosen:
                    p.masked_fill_(p.abs() <= self.threshold, 0.0)
        return Pruned(*finish_export(model, shrink))

    def kept_weights(self) -> dict[str, float]:
        """Per layer whose weight is selected, its weights above the threshold."""
        kept = {}
        for t in self._targets:
            layer = layer_of_weight(t.name)
            if layer is not None:
                kept[layer] = float((t.live.abs() > self.threshold).sum())
        return kept
