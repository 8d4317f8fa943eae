"""Sampled masked weights for all weight-gated parameters in one autograd node.

One draw of uniform noise covers every weight-gated parameter (a flat logit tensor), the gates
are computed in place in that buffer, and the hand-written backward writes ``dL/dz`` of every
parameter straight into one fresh flat gradient, with no ``cat`` and no saved ``s`` or ``u``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .functional import _FEW, HardConcrete, _gate_grad_, draw_gates

__all__ = ["masked_weights"]


class _MaskedWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_alpha: Tensor, hc: HardConcrete, layout, gates, *weights: Tensor):
        # layout: per weight, (offset, n_gates, view_shape, reduce_dims); gates: z or None
        z = draw_gates(log_alpha, hc) if gates is None else gates
        outs = tuple(
            w * z[off : off + n].view(shape).to(w.dtype)
            for w, (off, n, shape, _) in zip(weights, layout, strict=True)
        )
        ctx.save_for_backward(z, *weights)
        ctx.hc, ctx.layout = hc, layout
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        z, *weights = ctx.saved_tensors
        fused = _fused_backward(ctx, z, weights, grads)
        if fused is not None:
            return fused
        # Several tensors may share a gate range (a layer's weight rows and its bias): the first
        # writes its range, the others add to it; ranges nobody wrote get zero gradient.
        gz = torch.empty_like(z)
        written: set[int] = set()
        grad_ws = []
        for i, (g, w, (off, n, shape, reduce_dims)) in enumerate(
            zip(grads, weights, ctx.layout, strict=True)
        ):
            zi = z[off : off + n].view(shape)
            if g is None:
                grad_ws.append(None)
                continue
            dst = gz[off : off + n]
            if reduce_dims:
                gi = (g * w).sum(reduce_dims).flatten().to(gz.dtype)
                dst.add_(gi) if off in written else dst.copy_(gi)
            elif off in written:
                dst.view(shape).addcmul_(g, w)
            else:
                torch.mul(g, w, out=dst.view(shape))
            written.add(off)
            grad_ws.append(g * zi.to(g.dtype) if ctx.needs_input_grad[4 + i] else None)
        for off, n, _, _ in ctx.layout:
            if off not in written:
                gz[off : off + n].zero_()
                written.add(off)
        return (_gate_grad_(gz, z, ctx.hc), None, None, None, *grad_ws)


def _fused_backward(ctx, z: Tensor, weights: list[Tensor], grads: tuple[Tensor | None, ...]):
    """The backward in one pass per weight (``l0core.native``: its gate gradient and its own,
    from ``g``, ``w`` and ``z``), where every weight has a gate range of its own with one gate per
    element (weight-level gates); ``None`` elsewhere."""
    layout = ctx.layout
    if z.numel() < _FEW or len({off for off, *_ in layout}) < len(layout):
        return None
    if any(rd or n != w.numel() for w, (_, n, _, rd) in zip(weights, layout, strict=True)):
        return None
    if not native.usable(z, *weights, *(g for g in grads if g is not None)):
        return None
    hc = ctx.hc
    a, b, c = hc.limit_a, hc.limit_b, hc.slope
    gz = torch.empty_like(z)
    grad_ws = []
    for i, (g, w, (off, n, _, _)) in enumerate(zip(grads, weights, layout, strict=True)):
        if g is None:
            gz[off : off + n].zero_()
            grad_ws.append(None)
            continue
        want_w = ctx.needs_input_grad[4 + i]
        grad_ws.append(
            native.masked_grads(g, w, z[off : off + n], gz[off : off + n], want_w, a, b, c)
        )
    return (gz, None, None, None, *grad_ws)


def masked_weights(
    log_alpha: Tensor,
    hc: HardConcrete,
    weights: list[Tensor],
    layout: tuple[tuple[int, int, tuple[int, ...], tuple[int, ...]], ...],
    gates: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``weights[i] * z[i]`` with fresh hard-concrete gates ``z`` drawn for every weight.

    Args:
        log_alpha: the flat logits of all weight-gated parameters.
        hc: the distribution's constants.
        weights: the parameters, in the order of ``layout``.
        layout: per weight, ``(offset, n_gates, view_shape, reduce_dims)``: its gates are
            ``log_alpha[offset:offset + n_gates].view(view_shape)``, broadcast against the weight;
            ``reduce_dims`` are the broadcast dimensions (empty for one gate per weight). Weights
            may share a gate range (same offset and size); ranges are otherwise disjoint.
        gates: gates drawn before (:func:`l0core.functional.draw_gates`, no gradient) to use
            instead of a fresh draw: replaying a forward (activation checkpointing) rebuilds
            the same masked weights, with their gradient, from them.
    """
    return _MaskedWeights.apply(log_alpha, hc, layout, gates, *weights)
