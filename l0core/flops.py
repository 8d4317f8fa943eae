"""Multiply-add counts of Linear and ConvNd layers from their real output shapes.

Counting output positions from the shape a layer actually produced avoids the slip in the
authors' conv FLOP count (channels x height where height x width was meant).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["COUNTED", "kept_macs", "layer_macs", "layer_of_weight", "model_macs", "record_shapes"]

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


def layer_of_weight(param_name: str) -> str | None:
    """The layer whose ``weight`` a parameter is (``"fc.weight"`` -> ``"fc"``, ``"weight"`` ->
    ``""``, the model itself), the key of :func:`kept_macs`'s ``kept``; None for any other
    parameter."""
    if param_name == "weight":
        return ""
    layer, _, attr = param_name.rpartition(".")
    return layer if attr == "weight" and layer else None


def kept_macs(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], kept: Mapping[str, float]
) -> float:
    """Multiply-adds per example of the counted layers of ``model`` that ran (every sparsity
    method's ``expected_flops``, over the layers as the method describes them).

    Args:
        model: the module whose Linear and ConvNd layers are counted.
        shapes: per layer name, its output shape for one example (:func:`record_shapes`); a
            layer absent from it did not run and costs nothing.
        kept: per layer name, the (expected) number of its non-zero weights; a layer absent
            from it keeps all of them.
    """
    total = 0.0
    for name, mod in model.named_modules():
        if name in shapes and isinstance(mod, COUNTED):
            nonzero = kept[name] if name in kept else float(mod.weight.numel())
            total += layer_macs(mod, shapes[name], nonzero)
    return total


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
    return kept_macs(model, shapes, {n: float((modules[n].weight != 0).sum()) for n in shapes})
