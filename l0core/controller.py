"""Target-sparsity control: ask for "90% sparse" instead of searching the penalty strength.

The constraint ``s_hat = t`` on the expected sparsity ``s_hat = 1 - E[L0] / n`` enters the loss as
the Lagrangian term ``lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2`` (as in Wang et al. 2020,
"Structured Pruning of Large Language Models", and CoFi, Xia et al. 2022). The model minimises it;
the multipliers follow explicit dual ascent, ``lambda1 += lr * (s_hat - t)`` and
``lambda2 += lr * (s_hat - t)^2``, updated in place on the device each training step (no host
synchronisation, no negative-learning-rate trick in the user's optimizer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SparsityController"]


class SparsityController(nn.Module):
    """Lagrange multipliers for an equality constraint on expected sparsity.

    Args:
        target: the sparsity to reach, in (0, 1).
        dual_lr: the dual-ascent step size.
    """

    def __init__(self, target: float, dual_lr: float = 0.05) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"target_sparsity must be a number in (0, 1), got {target!r}")
        if not (isinstance(dual_lr, (int, float)) and math.isfinite(dual_lr) and dual_lr > 0):
            raise ValueError(f"dual_lr must be a finite number > 0, got {dual_lr!r}")
        self.target = float(target)
        self.dual_lr = float(dual_lr)
        self.register_buffer("lambda1", torch.zeros(()))
        self.register_buffer("lambda2", torch.zeros(()))

    def forward(self, expected_sparsity: Tensor) -> Tensor:
        """The Lagrangian term; in training mode also one dual-ascent step on the multipliers."""
        gap = expected_sparsity - self.target
        # the multipliers are updated in place below: the term uses copies of their values
        term = self.lambda1.clone() * gap + self.lambda2.clone() * gap * gap
        if self.training:
            with torch.no_grad():
                g = gap.detach().to(self.lambda1.dtype)
                self.lambda1.add_(g, alpha=self.dual_lr)
                self.lambda2.add_(g * g, alpha=self.dual_lr)
        return term

    def extra_repr(self) -> str:
        return f"target={self.target}, dual_lr={self.dual_lr}"
