"""Baselines with the regularizers' interface: L1 (lasso) penalty with a pruning threshold.

``L1Regularizer`` answers the question people ask first ("how do I add an L1 penalty to my
model?") and is what sweeps compare L0 against: ``lam * sum |theta|`` during training, then every
weight with ``|theta| <= threshold`` is pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .export import finish_export
from .flops import layer_macs, record_shapes
from .regularizer import _check_number
from .selection import Selector, select_params

__all__ = ["L1Regularizer"]


class CountedMethod(nn.Module):
    """What the methods without gate logits share (L1, magnitude pruning): densities follow from
    ``count_l0()``, the parameters counted as zero or kept, over the ``n_gated`` selected ones."""

    module: nn.Module
    n_gated: int
    _shapes: dict[str, tuple[int, ...]] | None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module; the first call records layer output shapes for ``expected_flops``."""
        if self._shapes is None:
            self._shapes = {}
            with record_shapes(self.module, self._shapes):
                return self.module(*args, **kwargs)
        return self.module(*args, **kwargs)

    def _need_shapes(self, example_args: tuple, example_kwargs: dict | None = None) -> None:
        """Record the layer output shapes again from an example input, if given; without one,
        the first forward must have recorded them."""
        if example_args or example_kwargs:
            self._shapes = None
            with torch.no_grad():
                self(*example_args, **(example_kwargs or {}))
        if not self._shapes:
            raise RuntimeError("expected_flops() needs one forward first, or an example input")

    def count_l0(self) -> Tensor:
        raise NotImplementedError

    def expected_density(self) -> Tensor:
        """``count_l0() / n_gated`` (no expectation: nothing is random)."""
        return self.count_l0() / self.n_gated

    def sparsity(self) -> float:
        """Fraction of the selected parameters that are zero (or count as zero)."""
        return 1.0 - float(self.count_l0()) / self.n_gated

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """None: these methods have no gate logits."""
        yield from ()

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """The wrapped module's own parameters."""
        yield from self.module.parameters()


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
        self.lam = _check_number("lam", lam, 0.0)
        self.threshold = _check_number("threshold", threshold, 0.0)
        self.module = model
        self._targets = select_params(model, include, exclude)
        self.n_gated = sum(t.param.numel() for t in self._targets)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.last_shrink_report = None

    def _params(self) -> list[Tensor]:
        return [t.live for t in self._targets]

    def regularization(self) -> Tensor:
        """``lam * sum |theta|`` over the selected parameters."""
        return self.lam * torch.stack(torch._foreach_norm(self._params(), 1)).sum()

    def count_l0(self) -> Tensor:
        """Number of selected parameters with ``|theta| > threshold``."""
        with torch.no_grad():
            return sum((p.abs() > self.threshold).sum() for p in self._params())

    def summary(self) -> list[dict[str, Any]]:
        chosen = {t.name for t in self._targets}
        rows = []
        for name, p in self.module.named_parameters():
            kept = float((p.detach().abs() > self.threshold).float().mean())
            gated = name in chosen
            rows.append(
                {
                    "name": name,
                    "shape": tuple(p.shape),
                    "numel": p.numel(),
                    "gated": gated,
                    "granularity": "weight" if gated else None,
                    "applied": "threshold" if gated else None,
                    "n_gates": p.numel() if gated else 0,
                    "expected_density": kept if gated else 1.0,
                    "eval_density": kept if gated else 1.0,
                }
            )
        return rows

    def prune(self, shrink: bool = False) -> nn.Module:
        """A plain copy of the module with ``|theta| <= threshold`` set to exactly 0."""
        model = copy.deepcopy(self.module)
        chosen = {t.name for t in self._targets}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in chosen:
                    p.masked_fill_(p.abs() <= self.threshold, 0.0)
        model, self.last_shrink_report = finish_export(model, shrink)
        return model

    def expected_flops(self, *example_args: Any) -> float:
        """Multiply-adds per example counting only weights above the threshold."""
        self._need_shapes(example_args)
        chosen = {t.name for t in self._targets}
        total = 0.0
        for name, mod in self.module.named_modules():
            if name in self._shapes:
                w = mod.weight
                wname = f"{name}.weight" if name else "weight"
                nnz = float((w.abs() > self.threshold).sum()) if wname in chosen else w.numel()
                total += layer_macs(mod, self._shapes[name], nnz)
        return total
