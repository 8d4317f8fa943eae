"""Multiply-add counts of Linear and ConvNd layers from their real output shapes.

Counting output positions from the shape a layer actually produced avoids the slip in the
authors' conv FLOP count (channels x height where height x width was meant).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["COUNTED", "layer_macs", "model_macs", "record_shapes"]

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


@torch.no_grad()
def model_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-adds per example of ``model`` as it is: its Linear and ConvNd layers, with the
    weights that are exactly zero skipped (so a shrunk model is counted at its real widths, and
    a model with zeros in full-size tensors as if they were skipped).

    Args:
        model: any module; it is run once in eval mode (its mode is restored).
        example: one batch of inputs (a batch of one is enough).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    was_training = model.training
    model.eval()
    try:
        with record_shapes(model, shapes):
            model(example)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    return sum(
        layer_macs(modules[n], shape, float((modules[n].weight != 0).sum()))
        for n, shape in shapes.items()
    )
