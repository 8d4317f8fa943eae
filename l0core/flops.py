"""Multiply-add counts of Linear and ConvNd layers from their real output shapes.

Counting output positions from the shape a layer actually produced avoids the slip in the
authors' conv FLOP count (channels x height where height x width was meant).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

__all__ = ["COUNTED", "layer_macs", "record_shapes"]

COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_macs(module: nn.Module, out_shape: tuple[int, ...], nonzero_weights: float) -> float:
    """Multiply-adds per example: output positions times the weights used at each position.

    Args:
        module: a Linear or ConvNd layer.
        out_shape: its output shape for one example (without the batch dimension).
        nonzero_weights: the (expected) number of non-zero weights of the layer.
    """
    if isinstance(module, nn.Linear):
        positions = math.prod(out_shape[:-1])  # (..., out_features): every leading position
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        positions = math.prod(out_shape[1:])  # (C_out, *spatial): each spatial position
    else:
        raise TypeError(f"cannot count multiply-adds of {type(module).__name__}")
    return float(positions) * nonzero_weights


@contextlib.contextmanager
def record_shapes(model: nn.Module, store: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Record, for one forward, the per-example output shape of every counted layer."""

    def hook(name: str):
        def fn(_m, _inp, out):
            store[name] = tuple(out.shape[1:])

        return fn

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, COUNTED)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
