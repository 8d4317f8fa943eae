"""Structural shrinking of a pruned model: physically remove the units that are dead.

After L0 pruning (Louizos, Welling & Kingma, 2017) a plain model holds exact zeros: gated-out
weights, whole rows or columns, BatchNorm channels whose affine weight is zero. ``shrink`` reads
only those zeros, never gates, and removes a unit (output neuron or channel) of a layer when,
in eval mode,

* it is *unused*: every live row of the consumer layer reads it with an all-zero column (all
  kernel positions of a convolution, the whole flattened block of a Linear after a flatten); or
* it is *constant* (its weight row is zero over the kept inputs, or a zero-scale BatchNorm
  fixes it) and its value, carried exactly through the per-unit steps that follow (BatchNorm,
  activations, pooling, dropout), folds into the consumer's bias: always for a Linear, for a
  convolution only without zero padding (a padded border sees 0, not the constant) or when
  the constant is 0. A constant that cannot be folded is kept and reported.

Both rules are applied until nothing changes, so removals cascade forwards and backwards. The
model's input width and final outputs never change.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from ._chain import (
    BATCHNORM,
    FLATTEN,
    OTHER,
    POOL,
    UNSUPPORTED_HINT,
    WEIGHT,
    ShrinkError,
    Step,
    trace_chain,
)

__all__ = [
    "ShrinkError",
    "ShrinkReport",
    "chain_export_blockers",
    "example_rows",
    "finish_export",
    "shrink",
]


@dataclass(frozen=True)
class ShrinkReport:
    """What ``shrink`` removed.

    Attributes:
        architecture_before: units along the chain: the first layer's input width, then each
            Linear/Conv layer's outputs (features or channels).
        architecture_after: the same after shrinking.
        params_before: number of parameters of the input model.
        params_after: number of parameters of the shrunk model.
        kept_constant: layer name -> dead units that had to be kept (a non-zero constant
            feeding a zero-padded convolution, a constant turned variable by padded average
            pooling, or the last unit of an otherwise empty layer).
    """

    architecture_before: list[int]
    architecture_after: list[int]
    params_before: int
    params_after: int
    kept_constant: dict[str, int]

    def __str__(self) -> str:
        before = "-".join(map(str, self.architecture_before))
        after = "-".join(map(str, self.architecture_after))
        text = f"{before} -> {after}, {self.params_before:,} -> {self.params_after:,} parameters"
        if self.kept_constant:
            kept = ", ".join(f"{name}: {n}" for name, n in self.kept_constant.items())
            text += f" (dead units kept: {kept})"
        return text


@dataclass
class _Layer:
    """A Linear/Conv layer and the per-unit steps between it and the next one."""

    step: Step
    blocks: Tensor  # (out, input units, positions): the weight read per input unit
    bias: Tensor  # (out,), zeros when the layer has none
    ops: list[Step]  # per-unit steps up to the next weight layer
    hw: int = 1  # input features per input unit (spatial size flattened into a Linear)

    @property
    def module(self) -> nn.Module:
        return self.step.module

    @property
    def pads_constants(self) -> bool:
        """Whether zero padding makes a constant input channel non-constant at the border."""
        m = self.module
        if isinstance(m, nn.Linear) or m.padding_mode != "zeros":
            return False
        if m.padding == "same":
            return any(k > 1 for k in m.kernel_size)
        return m.padding != "valid" and any(p > 0 for p in m.padding)


def _units(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _check_segment(a: _Layer, b: nn.Module) -> int:
    """Validate the steps between weight layers ``a`` and ``b``; return ``b``'s ``hw``."""
    n = _units(a.module)[1]
    flat = isinstance(a.module, nn.Linear)
    for op in a.ops:
        if op.kind == OTHER:
            raise _unsupported(op, "not a per-unit step")
        if op.kind == POOL and flat:
            raise _unsupported(op, "pooling after a Linear or a flatten mixes units")
        if op.kind == BATCHNORM and op.module.num_features != n:
            raise _unsupported(op, f"{op.module.num_features} features after {n} units")
        flat = flat or op.kind == FLATTEN
    n_in = _units(b)[0]
    if isinstance(b, nn.Linear):
        if not flat:
            raise _unsupported(a.step, f"a Linear ({b}) after a convolution needs a flatten")
        if n_in % n or (isinstance(a.module, nn.Linear) and n_in != n):
            raise _unsupported(a.step, f"{n} units do not map onto {n_in} input features")
        return n_in // n
    if flat or n_in != n:
        raise _unsupported(a.step, f"{b} cannot read the {n} units of this layer directly")
    return 1


def _unsupported(step: Step, why: str) -> ShrinkError:
    return ShrinkError(f"cannot shrink at {step.describe()}: {why}; {UNSUPPORTED_HINT}")


def _layers(steps: list[Step]) -> list[_Layer]:
    at = [i for i, s in enumerate(steps) if s.kind == WEIGHT]
    if not at:
        return []
    for s in steps[: at[0]]:
        if s.kind == OTHER:
            raise _unsupported(s, "not supported before the first layer")
    for s in steps[at[-1] + 1 :]:
        if s.kind == OTHER and s.module is not None and any(True for _ in s.module.parameters()):
            raise _unsupported(s, "a module with parameters after the last layer")
    layers = []
    for k, i in enumerate(at):
        m = steps[i].module
        n_in, n_out = _units(m)
        bias = m.bias if m.bias is not None else m.weight.new_zeros(n_out)
        ops = steps[i + 1 : at[k + 1]] if k + 1 < len(at) else []
        layers.append(_Layer(steps[i], m.weight.reshape(n_out, n_in, -1), bias, ops))
    for a, b in itertools.pairwise(layers):
        b.hw = _check_segment(a, b.module)
        n_in, n_out = _units(b.module)
        b.blocks = b.module.weight.reshape(n_out, n_in // b.hw, -1)
    return layers


_Consts = tuple[Tensor, Tensor, Tensor]


def _evaluate(
    layers: list[_Layer], fold: list[Tensor], drop: list[Tensor]
) -> tuple[list[Tensor], list[_Consts]]:
    """Effective biases (removed constants folded in) and each layer's constant units.

    Returns:
        ``biases[i]`` of shape ``(out,)``, and for every layer but the last
        ``(value, const, dead)``: the constant units after its per-unit steps, their values,
        and which units were dead (constant) at some point of the way.
    """
    biases, consts = [], []
    for i, layer in enumerate(layers):
        bias, kept_in = layer.bias, None
        if i > 0:
            value, const, _ = consts[i - 1]
            folded = torch.where(fold[i - 1], value, torch.zeros_like(value))
            bias = bias + layer.blocks.sum(-1) @ folded
            kept_in = ~(fold[i - 1] | drop[i - 1])
        biases.append(bias)
        if i == len(layers) - 1:
            break
        blocks = layer.blocks if kept_in is None else layer.blocks[:, kept_in]
        dead = ~(blocks != 0).flatten(1).any(1)
        value, const = bias.clone(), dead.clone()
        for op in layer.ops:
            value, const = op.propagate(value, const)
            dead = dead | const
        consts.append((value, const, dead))
    return biases, consts


def _foldable(value: Tensor, const: Tensor, consumer: _Layer) -> Tensor:
    ok = const & torch.isfinite(value)
    return ok & (value == 0) if consumer.pads_constants else ok


def _plan(layers: list[_Layer]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[_Consts]]:
    """Mark units folded or dropped until nothing changes.

    Each evaluation marks units of one layer only, so every decision sees exact constants.

    Returns:
        Per layer, the folded and the dropped (unused) units; the final ``_evaluate``.
    """
    fold = [torch.zeros_like(layer.bias, dtype=torch.bool) for layer in layers]
    drop = [f.clone() for f in fold]
    while True:
        biases, consts = _evaluate(layers, fold, drop)
        for i, (value, const, _) in enumerate(consts):
            nxt = layers[i + 1]
            live = ~drop[i + 1] if i + 1 < len(consts) else torch.ones_like(drop[i + 1])
            used = (nxt.blocks[live] != 0).any(0).any(-1)
            keep = ~(fold[i] | drop[i])
            new_drop = keep & ~used
            new_fold = keep & used & _foldable(value, const, nxt)
            if not (keep & ~new_drop & ~new_fold).any():  # never empty a layer
                first = keep.nonzero()[0]
                new_drop[first] = new_fold[first] = False
            if new_drop.any() or new_fold.any():
                drop[i] |= new_drop
                fold[i] |= new_fold
                break
        else:
            return fold, drop, biases, consts


def _new_weight_layer(old: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    kw = {"bias": bias is not None, "device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], **kw)
    else:
        new = skip_init(
            type(old),
            weight.shape[1],
            weight.shape[0],
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            padding_mode=old.padding_mode,
            **kw,
        )
    new.weight.data.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None:
        new.bias.data.copy_(bias)
        new.bias.requires_grad_(old.bias.requires_grad if old.bias is not None else True)
    return new


def _new_batchnorm(old: nn.Module, rows: Tensor) -> nn.Module:
    tensor = old.weight if old.affine else old.running_mean
    kw = {"device": tensor.device, "dtype": tensor.dtype} if tensor is not None else {}
    new = skip_init(
        type(old),
        int(rows.sum()),
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **kw,
    )
    for name, t in [*old.named_parameters(recurse=False), *old.named_buffers(recurse=False)]:
        getattr(new, name).data.copy_(t[rows] if t.dim() else t)
        getattr(new, name).requires_grad_(t.requires_grad)
    return new


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def shrink(model: nn.Module) -> tuple[nn.Module, ShrinkReport]:
    """Remove dead units of a pruned model; the result computes the same function in eval mode.

    Args:
        model: a plain model whose forward is a chain (an ``nn.Sequential``, or any module
            ``torch.fx.symbolic_trace`` turns into a single path) of Linear, Conv1d/2d/3d
            (groups=1), BatchNorm, elementwise activations, pooling, Dropout and flatten
            steps. It is not modified.

    Returns:
        The shrunk model (an ``nn.Sequential`` for an ``nn.Sequential``, otherwise an
        ``fx.GraphModule`` whose functional dropout is frozen at eval), with the input's
        dtype, device and training flag; and a ``ShrinkReport``.

    Raises:
        ShrinkError: the topology is not a supported chain; ``prune()`` without shrink
            still gives an exact same-shape model.
    """
    work, gm, steps = trace_chain(model)
    layers = _layers(steps)
    # a hard-coded view is rewritten in the graph, so only the graph module carries it
    resized = any(op.resize is not None for layer in layers for op in layer.ops)
    result = work if isinstance(model, nn.Sequential) and not resized else gm
    if not layers:
        n = _n_params(model)
        return result.train(model.training), ShrinkReport([], [], n, n, {})
    fold, drop, biases, consts = _plan(layers)
    keep = [~(f | d) for f, d in zip(fold, drop, strict=True)]
    keep[-1] = torch.ones_like(keep[-1])
    for i, (value, const, _) in enumerate(consts):  # the plan's invariant: folds are exact
        assert bool((_foldable(value, const, layers[i + 1]) | ~fold[i]).all())
    kept_constant = {}
    for i, layer in enumerate(layers):
        rows = keep[i]
        cols = keep[i - 1] if i > 0 else torch.ones_like(layer.blocks[0, :, 0], dtype=torch.bool)
        w = layer.blocks[rows][:, cols]
        old = layer.module
        shape = (w.shape[0], -1) if isinstance(old, nn.Linear) else (*w.shape[:2], *old.kernel_size)
        bias = biases[i][rows]
        has_bias = old.bias is not None or bool((bias != 0).any())
        result.set_submodule(
            layer.step.name, _new_weight_layer(old, w.reshape(shape), bias if has_bias else None)
        )
        if i < len(consts) and int((consts[i][2] & rows).sum()):
            kept_constant[layer.step.name] = int((consts[i][2] & rows).sum())
        for op in layer.ops:
            if op.kind == BATCHNORM:
                result.set_submodule(op.name, _new_batchnorm(op.module, rows))
            if op.resize is not None:
                op.resize(int(rows.sum()) * layers[i + 1].hw)
    if result is gm:
        gm.recompile()
    n_in = _units(layers[0].module)[0]
    report = ShrinkReport(
        architecture_before=[n_in] + [_units(layer.module)[1] for layer in layers],
        architecture_after=[n_in] + [int(k.sum()) for k in keep],
        params_before=_n_params(model),
        params_after=_n_params(result),
        kept_constant=kept_constant,
    )
    return result.train(model.training), report


def chain_export_blockers(model: nn.Module) -> list[str]:
    """Why ``shrink`` cannot restructure ``model`` (one line), or nothing when it can."""
    try:
        _layers(trace_chain(model)[2])
    except ShrinkError as exc:
        return [str(exc)]
    return []


def finish_export(model: nn.Module, shrink_units: bool) -> tuple[nn.Module, ShrinkReport | None]:
    """The end of every method's ``prune()``: the plain copy in eval mode, and with
    ``shrink_units`` its dead units removed (:func:`shrink`) with the report."""
    model.eval()
    return shrink(model) if shrink_units else (model, None)


def example_rows(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Two rows of each batched tensor argument of a forward: enough to check that an export
    runs (a method's ``example_rows``, given to :func:`l0core.graph_export.shrink_graph`)."""

    def rows(a: object) -> object:
        return a[:2].detach().clone() if isinstance(a, Tensor) and a.dim() > 0 else a

    return tuple(rows(a) for a in args), {k: rows(v) for k, v in kwargs.items()}
