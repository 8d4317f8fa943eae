"""Shared steps of the exact-export tests: close a random half of the coupled units, warm the
norm statistics with the gates in place, and compare the shrunk model with the gated one."""

import torch

from l0core import L0Regularizer, Pruned


def close_half(reg: L0Regularizer, seed: int, open_low: float = -1.0) -> torch.Tensor:
    """Close a random half of the units (logit -8); the rest get logits in ``[open_low, 8]``
    (``open_low=4``: all fully open). Returns which were closed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        la = reg.unit_log_alpha
        closed = torch.rand(la.shape, generator=g) < 0.5
        opened = torch.empty_like(la).uniform_(open_low, 8.0, generator=g)
        la.copy_(torch.where(closed, -8.0, opened))
    return closed


def gated_and_shrunk(reg: L0Regularizer, x: torch.Tensor) -> tuple[torch.Tensor, Pruned]:
    """One training forward (norm statistics with the gates in place), then the eval output of
    the gated model and its ``prune(shrink=True)`` (the shrunk model and the report)."""
    reg.train()
    with torch.no_grad():
        reg(x)
    reg.eval()
    with torch.no_grad():
        return reg(x), reg.prune(shrink=True)
