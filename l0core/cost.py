"""Expected multiply-adds with the cascade: a closed unit removes its rows *and* the columns of
every layer that reads it.

A dense layer whose rows follow channels ``o`` and whose columns follow channels ``c`` keeps the
weight ``(o, c)`` when both are open; with independent gates its expected cost is
``positions * kernel * sum_o P(o) * sum_c P(c)`` (a depthwise convolution:
``positions * kernel * sum_c P(c)``). Ignoring the columns overstates the cost of a pruned
network (a half-closed conv feeding another one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .flops import COUNTED, layer_macs
from .graph import ChannelGraph

__all__ = ["cascaded_macs"]


def _channel_p(graph: ChannelGraph, p_root: dict[int, Tensor], ids: Tensor) -> Tensor:
    roots = graph.roots(ids)
    return torch.stack([p_root[r] if r in p_root else torch.ones(()) for r in roots])


def cascaded_macs(
    graph: ChannelGraph,
    model: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    p_root: dict[int, Tensor],
    weight_density: dict[str, float],
) -> float:
    """Expected multiply-adds per example of the counted layers of ``model``.

    Args:
        graph: the channel graph of ``model`` (same module names).
        model: the module whose layers are counted.
        shapes: per layer name, its output shape for one example (recorded at a forward).
        p_root: per channel root, the probability that it is open (absent: always open).
        weight_density: per layer name, the expected fraction of its weights kept by
            element-wise gates (absent: 1).
    """
    total = 0.0
    for name, mod in model.named_modules():
        if name not in shapes or not isinstance(mod, COUNTED):
            continue
        w = mod.weight
        rows = graph._inc_at.get((name, "weight", 0))
        cols = graph._inc_at.get((name, "weight", 1))
        n_rows, n_cols = w.shape[0], w.shape[1]
        kernel = w.numel() // (n_rows * n_cols)
        if rows is not None and rows.role == "depthwise":
            kept = float(_channel_p(graph, p_root, rows.ids).sum()) * kernel * n_cols
        else:
            r = float(_channel_p(graph, p_root, rows.ids).sum()) if rows is not None else n_rows
            c = float(_channel_p(graph, p_root, cols.ids).sum()) if cols is not None else n_cols
            kept = r * c * kernel
        kept *= weight_density.get(name, 1.0)
        total += layer_macs(mod, shapes[name], kept)
    return total
