"""Expected non-zero weights with the cascade: a closed unit removes its rows *and* the columns of
every layer that reads it.

A dense layer whose rows follow channels ``o`` and whose columns follow channels ``c`` keeps the
weight ``(o, c)`` when both are open; with independent gates its expected cost is
``positions * kernel * sum_o P(o) * sum_c P(c)`` (a depthwise convolution:
``positions * kernel * sum_c P(c)``). Ignoring the columns overstates the cost of a pruned
network (a half-closed conv feeding another one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._chain import ShrinkError
from .flops import COUNTED, layer_macs, layer_of_weight
from .graph import ChannelGraph, GraphError
from .trace import trace_channels

if TYPE_CHECKING:
    from .method import MethodBase
    from .regularizer import L0Regularizer

__all__ = ["cascaded_weights", "expected_weights", "export_cost"]


def _channel_p(graph: ChannelGraph, p_root: dict[int, Tensor], ids: Tensor) -> Tensor:
    roots = graph.roots(ids)
    return torch.stack([p_root[r] if r in p_root else torch.ones(()) for r in roots])


def cascaded_weights(
    graph: ChannelGraph,
    model: nn.Module,
    p_root: dict[int, Tensor],
    weight_density: dict[str, float],
) -> dict[str, float]:
    """Per counted layer of ``model``, its expected non-zero weights with the cascade (what
    :func:`l0core.flops.kept_macs` counts).

    Args:
        graph: the channel graph of ``model`` (same module names).
        model: the module whose layers are counted.
        p_root: per channel root, the probability that it is open (absent: always open).
        weight_density: per layer name, the expected fraction of its weights kept by
            element-wise gates (absent: 1).
    """
    kept: dict[str, float] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, COUNTED):
            continue
        w = mod.weight
        rows = graph._inc_at.get((name, "weight", 0))
        cols = graph._inc_at.get((name, "weight", 1))
        n_rows, n_cols = w.shape[0], w.shape[1]
        kernel = w.numel() // (n_rows * n_cols)
        if rows is not None and rows.role == "depthwise":
            n = float(_channel_p(graph, p_root, rows.ids).sum()) * kernel * n_cols
        else:
            r = float(_channel_p(graph, p_root, rows.ids).sum()) if rows is not None else n_rows
            c = float(_channel_p(graph, p_root, cols.ids).sum()) if cols is not None else n_cols
            n = r * c * kernel
        kept[name] = n * weight_density.get(name, 1.0)
    return kept


def expected_weights(reg: L0Regularizer) -> dict[str, float]:
    """``reg.kept_weights()``: the cascade over the channel graph (the plan's, or a trace of a
    chain), each layer on its own when the model does not trace."""
    graph = _flops_graph(reg)
    if graph is None:
        return _layer_weights(reg)
    pw, pu = reg._prob_nonzero()
    p_root: dict[int, Tensor] = {}
    density: dict[str, float] = {}
    plan = reg._group_plan
    if plan is not None:
        p_unit = pu[: plan.n_gates].detach().float().cpu()
        p_root = {r: p_unit[u] for r, u in plan.unit_of.items()}
    for sites, p in ((reg._wsites, pw), (reg._asites, pu)):
        for s in sites:
            if s.plan is not None:
                continue
            layer = s.name.rpartition(".")[0]
            rows = graph._inc_at.get((layer, "weight", 0))
            ps = p[s.slice].detach().float().cpu()
            if s.granularity == "output" and rows is not None and rows.role == "rows":
                for r, q in zip(graph.roots(rows.ids), ps, strict=True):
                    p_root[r] = q
            else:
                density[layer] = float(ps.sum()) * s.group_size / s.numel
    return cascaded_weights(graph, reg.module, p_root, density)


def _flops_graph(reg: L0Regularizer) -> ChannelGraph | None:
    if reg._group_plan is not None:
        return reg._group_plan.graph
    if not hasattr(reg, "_chain_graph"):  # traced once, at the first count
        try:
            reg._chain_graph = trace_channels(reg.module)
        except GraphError:
            reg._chain_graph = None
    return reg._chain_graph


def _layer_weights(reg: L0Regularizer) -> dict[str, float]:
    """Each layer on its own: the expected non-zero weights of its gated ``weight``."""
    pw, pu = reg._prob_nonzero()
    density = {s.name: (pw[s.slice], s) for s in reg._wsites}
    density.update({s.name: (pu[s.slice], s) for s in reg._asites})
    kept: dict[str, float] = {}
    for name, (p, site) in density.items():
        layer = layer_of_weight(name)
        if layer is not None:
            kept[layer] = float(p.detach().sum()) * site.group_size
    return kept


def export_cost(method: MethodBase) -> dict[str, float]:
    """``method.export_cost()``: parameters and multiply-adds of the model the export gives."""
    if not method._shapes:
        raise RuntimeError("export_cost() needs one forward first")
    try:
        model = method.prune(shrink=True).model
    except ShrinkError:
        model = method.prune().model
    macs = sum(
        layer_macs(mod, method._shapes[name], float((mod.weight != 0).sum()))
        for name, mod in model.named_modules()
        if name in method._shapes
    )
    params = list(model.parameters())
    return {
        "params": float(sum(p.numel() for p in params)),
        "nonzero_params": float(sum(int((p != 0).sum()) for p in params)),
        "macs": float(macs),
    }
