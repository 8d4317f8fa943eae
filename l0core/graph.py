"""A model's data flow, channel by channel: which channels are tied together, and by what.

The forward is traced with ``torch.fx``; every tensor value carries the ids of the channels along
its channel dimension(s). Producers (Linear, ConvNd, ConvTransposeNd) create fresh channels; ops
that keep channels (BatchNorm, activations, pooling, depthwise convolutions, dropout) pass them
on; residual adds and products *tie* the channels of their operands (a union-find), concatenation
lays them side by side, splits and reshapes into attention heads cut and regroup them. After the
walk each connected set of channels is one *unit*: closing it removes that channel everywhere it
lives (the coupled groups of DepGraph, Fang et al., CVPR 2023).

Every parameter slice a unit touches is an :class:`Incidence` (producer rows, norm entries,
consumer columns, depthwise rows); a unit that must keep its channels (the model's input and
output, anything normalized by LayerNorm/GroupNorm, an op the walk does not know) is *fixed*,
with the reason naming the node and the op.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["ChannelGraph", "GraphError", "Incidence", "trace_channels"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# modules and functions that map a zero channel to zero and keep channels where they are
_KEEP_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Mish,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_KEEP_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu,
    F.elu, F.mish, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_KEEP_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach"}
_NONZERO_AT_ZERO = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_TIE_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
            torch.add, torch.sub, torch.mul}  # fmt: skip
_TIE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_SHAPE_METHODS = {"size", "dim"}


class GraphError(ValueError):
    """The model cannot be traced into a data-flow graph."""


@dataclass
class Incidence:
    """A slice of one parameter (or buffer) along ``dim`` that follows the channels ``ids``.

    Attributes:
        module: qualified name of the owning module.
        attr: the parameter or buffer name.
        dim: the sliced dimension.
        ids: channel id of each index along ``dim`` (a flat LongTensor).
        role: ``"rows"`` (a producer's outputs), ``"norm"`` (a norm's per-channel entries),
            ``"depthwise"`` (a depthwise convolution's channels), ``"cols"`` (a consumer's inputs).
        gate: whether the unit's gate multiplies this slice (where the channel is created).
    """

    module: str
    attr: str
    dim: int
    ids: Tensor
    role: str
    gate: bool = False


@dataclass
class _Val:
    """Channel ids of a tensor: ``ids`` spans the channel dims ``cdims`` (negative positions,
    ascending); ``block``: each id stands for a run of features of unknown length (a flatten)."""

    ids: Tensor
    cdims: tuple[int, ...]
    ndim: int | None
    block: bool = False


@dataclass
class ChannelGraph:
    """The channels of a traced model and the parameter slices they tie together (plain data:
    no graph module, so a wrapper holding it pickles)."""

    parent: list[int] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    head: set[int] = field(default_factory=set)
    incidences: list[Incidence] = field(default_factory=list)
    unknown_modules: dict[str, str] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> head roots
    _inc_at: dict[tuple[str, str, int], Incidence] = field(default_factory=dict)

    # ---- union-find -----------------------------------------------------------------------
    def new(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: Tensor, b: Tensor) -> None:
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                for mark in (self.head,):
                    if ry in mark:
                        mark.add(rx)
                if ry in self.fixed and rx not in self.fixed:
                    self.fixed[rx] = self.fixed[ry]

    def fix(self, ids: Tensor, reason: str) -> None:
        for i in ids.flatten().tolist():
            self.fixed.setdefault(self.find(i), reason)

    def roots(self, ids: Tensor) -> list[int]:
        return [self.find(i) for i in ids.flatten().tolist()]

    def reason(self, i: int) -> str | None:
        root = self.find(i)
        return self.fixed.get(root)

    def is_head(self, i: int) -> bool:
        return self.find(i) in self.head

    # ---- incidences -----------------------------------------------------------------------
    def touch(self, module: str, attr: str, dim: int, ids: Tensor, role: str, gate=False) -> None:
        """Record that ``module.attr`` along ``dim`` follows ``ids`` (a module called twice
        ties the channels of both calls)."""
        key = (module, attr, dim)
        old = self._inc_at.get(key)
        if old is not None:
            if old.ids.numel() != ids.numel():
                raise GraphError(f"{module}.{attr} is called on {ids.numel()} and "
                                 f"{old.ids.numel()} channels")  # fmt: skip
            self.union(old.ids, ids)
            old.gate = old.gate or gate
            return
        inc = Incidence(module, attr, dim, ids.flatten().clone(), role, gate)
        self._inc_at[key] = inc
        self.incidences.append(inc)


def _positive(val: _Val) -> list[int] | None:
    return None if val.ndim is None else [val.ndim + c for c in val.cdims]


class _Walker:
    def __init__(self, gm: fx.GraphModule, heads: bool) -> None:
        self.g = ChannelGraph()
        self.gm = gm
        self.heads = heads
        self.vals: dict[fx.Node, Any] = {}
        self.modules = dict(gm.named_modules())

    # ---- helpers --------------------------------------------------------------------------
    def val(self, arg: Any) -> Any:
        return self.vals.get(arg) if isinstance(arg, fx.Node) else None

    def fix_all(self, node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            for v in _flat_vals(self.vals.get(arg)):
                self.g.fix(v.ids, f"{why} at node {node.name!r} ({_op_name(node)})")

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            try:
                self.vals[node] = self.visit(node)
            except GraphError:
                raise
            except Exception as exc:  # a pattern the walk misreads: keep its channels
                self.fix_all(node, f"not understood ({type(exc).__name__}: {exc})")
                self.vals[node] = None
        return self.g

    def visit(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.fix_all(node, "the model's output")
            return None
        if node.op == "call_module":
            return self.module(node, self.modules[node.target])
        return self.call(node)

    # ---- modules --------------------------------------------------------------------------
    def module(self, node: fx.Node, m: nn.Module) -> Any:
        name = str(node.target)
        x = self.val(node.args[0]) if node.args else None
        if isinstance(m, _CONV + _CONVT):
            return self.conv(node, name, m, x)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, x)
        if isinstance(m, _BN):
            if x is not None and x.ids.dim() == 1 and _positive(x) in ([1], None):
                if not (m.affine and m.track_running_stats):
                    self.g.fix(x.ids, f"{name} ({type(m).__name__}) has no affine or no "
                                      "running statistics to gate")  # fmt: skip
                self._norm(name, m, x.ids)
            elif x is not None:
                self.fix_all(node, "a BatchNorm not on the channel dimension")
            return x
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            self.fix_all(node, "normalized together")
            out = self._fresh(node, x, m)
            if out is not None and getattr(m, "weight", None) is not None:
                self._norm(name, m, out.ids, fixed_reason=f"{name} ({type(m).__name__})")
            return out
        if isinstance(m, _KEEP_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, _NONZERO_AT_ZERO):
            self.fix_all(node, "maps a closed (zero) channel to a non-zero value")
            return x
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(node, name, m, x)
        if isinstance(m, nn.TransformerEncoderLayer):
            return self.encoder_layer(node, name, m, x)
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.parameters()):
            self.g.unknown_modules[name] = type(m).__name__
        self.fix_all(node, "an op the graph walk does not know")
        return None

    def _fresh(self, node: fx.Node, x: _Val | None, m: nn.Module) -> _Val | None:
        if x is None:
            return None
        ids = self.g.new(x.ids.numel()).view(x.ids.shape)
        self.g.fix(ids, f"normalized by {node.target} ({type(m).__name__})")
        return _Val(ids, x.cdims, x.ndim, x.block)

    def _norm(self, name: str, m: nn.Module, ids: Tensor, fixed_reason: str = "") -> None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr, None) is not None:
                gate = attr in ("weight", "bias") and not fixed_reason
                self.g.touch(name, attr, 0, ids, "norm", gate)

    def _only_bn_follows(self, node: fx.Node) -> bool:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return False
        m = self.modules[users[0].target]
        return isinstance(m, _BN) and m.affine and m.track_running_stats

    def conv(self, node: fx.Node, name: str, m: nn.Module, x: _Val | None) -> _Val:
        transposed = isinstance(m, _CONVT)
        k = len(m.kernel_size)
        ndim = k + 2 if x is None or x.ndim is None else x.ndim
        n_in, n_out, groups = m.in_channels, m.out_channels, m.groups
        if x is not None and (x.ids.dim() != 1 or _positive(x) not in ([1], None) or x.block):
            self.fix_all(node, "a convolution that does not read the channel dimension")
            x = None
        if groups == 1:
            if x is not None:
                self.g.touch(name, "weight", 0 if transposed else 1, x.ids, "cols")
            out = self.g.new(n_out)
            gate = not self._only_bn_follows(node)
            self.g.touch(name, "weight", 1 if transposed else 0, out, "rows", gate)
            if m.bias is not None:
                self.g.touch(name, "bias", 0, out, "rows", gate)
            return _Val(out, (-(k + 1),), ndim)
        if groups == n_in == n_out and not transposed and x is not None:  # depthwise
            self.g.touch(name, "weight", 0, x.ids, "depthwise")
            if m.bias is not None:
                self.g.touch(name, "bias", 0, x.ids, "depthwise", True)
            return _Val(x.ids, (-(k + 1),), ndim)
        if x is not None:
            self.g.fix(x.ids, f"read by the grouped convolution {name} (groups={groups})")
        out = self.g.new(n_out)
        self.g.fix(out, f"made by the grouped convolution {name} (groups={groups})")
        return _Val(out, (-(k + 1),), ndim)

    def linear(self, node: fx.Node, name: str, m: nn.Linear, x: _Val | None) -> _Val:
        ndim = None if x is None else x.ndim
        if x is not None and (x.ids.dim() != 1 or x.cdims != (-1,)):
            self.fix_all(node, "a Linear that does not read the channel dimension")
            x = None
        if x is not None:
            n = x.ids.numel()
            if m.in_features % n or (not x.block and m.in_features != n):
                raise GraphError(f"{name} reads {m.in_features} features from {n} channels")
            cols = x.ids.repeat_interleave(m.in_features // n)
            self.g.touch(name, "weight", 1, cols, "cols")
        out = self.g.new(m.out_features)
        self.g.touch(name, "weight", 0, out, "rows", True)
        if m.bias is not None:
            self.g.touch(name, "bias", 0, out, "rows", True)
        return _Val(out, (-1,), ndim)

    def mha(self, node: fx.Node, name: str, m: nn.MultiheadAttention, x: _Val | None,
            same: bool | None = None) -> Any:  # fmt: skip
        """Self-attention: heads tie their q, k, v rows; out_proj reads v's channels."""
        if not m._qkv_same_embed_dim:
            self.fix_all(node, "an attention layout the walk does not know")
            return None
        e, h = m.embed_dim, m.num_heads
        if same is None:
            same = len(node.args) >= 3 and all(self.val(a) is x for a in node.args[:3])
        if x is not None and same and x.cdims == (-1,) and x.ids.dim() == 1:
            self.g.touch(name, "in_proj_weight", 1, x.ids, "cols")
        else:
            self.fix_all(node, "attention inputs")
        qkv = self.g.new(3 * e)
        self._tie_heads(qkv.view(3, h, e // h), f"{name} ({type(m).__name__})", name)
        self.g.touch(name, "in_proj_weight", 0, qkv, "rows", True)
        if m.in_proj_bias is not None:
            self.g.touch(name, "in_proj_bias", 0, qkv, "rows", True)
        self.g.touch(f"{name}.out_proj", "weight", 1, qkv[2 * e :], "cols")
        out = self.g.new(e)
        self.g.touch(f"{name}.out_proj", "weight", 0, out, "rows", True)
        if m.out_proj.bias is not None:
            self.g.touch(f"{name}.out_proj", "bias", 0, out, "rows", True)
        return (_Val(out, (-1,), None if x is None else x.ndim), None)

    def encoder_layer(self, node: fx.Node, name: str, m: nn.Module, x: _Val | None) -> Any:
        """``nn.TransformerEncoderLayer``: its heads and its MLP's hidden units; the stream it
        reads and writes is normalized by its LayerNorms, so it stays."""
        if x is not None:
            self.g.fix(x.ids, f"normalized inside {name} (TransformerEncoderLayer)")
        inner = _Val(self.g.new(m.self_attn.embed_dim), (-1,), None if x is None else x.ndim)
        self.g.fix(inner.ids, f"normalized inside {name} (TransformerEncoderLayer)")
        self.mha(node, f"{name}.self_attn", m.self_attn, inner, same=True)
        self.g.fix(self.g._inc_at[(f"{name}.self_attn.out_proj", "weight", 0)].ids,
                   f"normalized inside {name} (TransformerEncoderLayer)")  # fmt: skip
        hidden = self.linear(node, f"{name}.linear1", m.linear1, inner)
        self.g.touch(f"{name}.linear2", "weight", 1, hidden.ids, "cols")
        out = self.g.new(m.linear2.out_features)
        self.g.fix(out, f"normalized inside {name} (TransformerEncoderLayer)")
        return _Val(out, (-1,), inner.ndim)

    def _tie_heads(self, ids: Tensor, where: str, owner: str) -> None:
        """``ids``: (..., heads, head_dim) channel ids; one unit per head (``granularity
        'head'``), or fixed channels when heads are not gated."""
        heads = ids.movedim(-2, 0).reshape(ids.shape[-2], -1)
        if not self.heads:
            self.g.fix(heads, f"attention heads of {where} (granularity 'head' gates them)")
            return
        for row in heads:
            self.g.union(row[:1].expand_as(row), row)
            self.g.head.add(self.g.find(int(row[0])))
        self.g.heads[owner] = [int(row[0]) for row in heads]

    # ---- functions and methods ------------------------------------------------------------
    def call(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        x = self.val(args[0]) if args else None
        if node.op == "call_method" and t in _SHAPE_METHODS:
            return None
        if node.op == "call_function" and t is getattr:
            return None
        if node.op == "call_function" and t is operator.getitem:
            return self.getitem(node, args[0], args[1])
        if (node.op == "call_function" and t in _KEEP_FUNCTIONS) or (
            node.op == "call_method" and t in _KEEP_METHODS
        ):
            return x
        if (node.op == "call_function" and t in _TIE_OPS) or (
            node.op == "call_method" and t in _TIE_METHODS
        ):
            return self.tie(node, t)
        if t in (operator.truediv, torch.div, "div") and isinstance(args[1], (int, float)):
            return x  # a scale: zero stays zero
        if (node.op == "call_function" and t in (torch.flatten,)) or (
            node.op == "call_method" and t == "flatten"
        ):
            return self.flatten(
                node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            )
        if node.op == "call_function" and t in (torch.cat, torch.concat):
            return self.cat(node)
        if (node.op == "call_method" and t in ("view", "reshape")) or t is torch.reshape:
            return self.reshape(node, x)
        if (node.op == "call_method" and t in ("transpose", "permute")) or t in (
            torch.transpose,
            torch.permute,
        ):
            return self.permute(node, x)
        if (node.op == "call_method" and t in ("mean", "sum", "amax")) or t in (
            torch.mean,
            torch.sum,
        ):
            return self.reduce(node, x)
        if (node.op == "call_method" and t in ("unbind", "chunk", "split")) or t in (
            torch.unbind,
            torch.chunk,
            torch.split,
        ):
            return self.split(node, x, t if isinstance(t, str) else t.__name__)
        if t is F.scaled_dot_product_attention:
            return self.sdpa(node)
        if any(_flat_vals(self.val(a)) for a in node.all_input_nodes):
            self.fix_all(node, "an op the graph walk does not know")
        return None

    def tie(self, node: fx.Node, t: Any) -> Any:
        a, b = ((*node.args, None))[:2]
        va, vb = self.val(a), self.val(b)
        name = t if isinstance(t, str) else t.__name__
        multiplies = "mul" in name
        if va is not None and vb is not None:
            if va.ids.shape != vb.ids.shape or va.cdims != vb.cdims:
                self.fix_all(node, "operands with different channel layouts")
                return va
            self.g.union(va.ids, vb.ids)
            return va
        v = va if va is not None else vb
        other = b if va is not None else a
        if v is None:
            return None
        if isinstance(other, fx.Node):
            self.fix_all(node, "combined with a tensor the walk does not follow")
        elif not multiplies and other not in (0, 0.0):
            self.fix_all(node, f"adds the constant {other!r}")
        return v

    def flatten(self, node: fx.Node, x: _Val | None, start: int, end: int) -> _Val | None:
        if x is None:
            return None
        pos = _positive(x)
        if pos is None:
            self.fix_all(node, "a flatten of a tensor whose rank is unknown")
            return None
        start, end = start % x.ndim, end % x.ndim
        ndim = x.ndim - (end - start)
        if all(p < start or p > end for p in pos):
            new = [p if p < start else p - (end - start) for p in pos]
            return _Val(x.ids, tuple(p - ndim for p in new), ndim, x.block)
        if len(pos) == 1 and pos[0] == start and end == x.ndim - 1:
            return _Val(x.ids, (-1,), ndim, True)
        if pos == list(range(start, end + 1)) and end == x.ndim - 1:
            return _Val(x.ids.flatten(), (-1,), ndim, x.block)
        self.fix_all(node, "a flatten that mixes channels with other dimensions")
        return None

    def cat(self, node: fx.Node) -> _Val | None:
        tensors, dim = node.args[0], _arg(node, 1, "dim", 0)
        vals = [self.val(t) for t in tensors]
        known = [v for v in vals if v is not None]
        if not known:
            return None
        v0 = known[0]
        if len({(v.cdims, v.ndim, v.ids.shape) for v in known}) != 1 and not (
            v0.ids.dim() == 1 and len({(v.cdims, v.ndim) for v in known}) == 1
        ):
            self.fix_all(node, "a concatenation of different channel layouts")
            return None
        if v0.ndim is None and dim >= 0:
            self.fix_all(node, "a concatenation of a tensor whose rank is unknown")
            return None
        d = dim if dim < 0 else dim - v0.ndim
        if d in v0.cdims:
            if len(known) < len(vals) or v0.ids.dim() != 1:
                self.fix_all(node, "concatenated with a tensor the walk does not follow")
                return None
            return _Val(torch.cat([v.ids for v in vals]), v0.cdims, v0.ndim, v0.block)
        for v in known[1:]:  # along another dimension: the pieces share their channels
            self.g.union(v0.ids, v.ids)
        if len(known) < len(vals):
            self.fix_all(node, "concatenated with a tensor the walk does not follow")
        return v0

    def reshape(self, node: fx.Node, x: _Val | None) -> _Val | None:
        if x is None:
            return None
        shape = list(node.args[1:]) if node.op == "call_method" else [_arg(node, 1, "shape", None)]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        pos = _positive(x)
        # (B, -1) after channels at dim 1: a flatten
        if pos == [1] and len(shape) == 2 and shape[1] == -1:
            return _Val(x.ids, (-1,), 2, True)
        if pos == [1] and len(shape) == 2 and isinstance(shape[1], int):
            self.fix_all(node, f"a hard-coded view size {shape[1]} (write x.flatten(1) or "
                               "x.view(x.size(0), -1) so the width can change)")  # fmt: skip
            return None
        k = len(x.cdims)
        trailing = x.cdims == tuple(range(-k, 0))
        if pos is None and trailing:  # rank unknown: the trailing ints that hold the channels
            n = x.ids.numel()
            for lead in range(len(shape) - 1, -1, -1):
                tail = shape[lead:]
                if not all(isinstance(t, int) and t > 0 for t in tail):
                    break
                if math.prod(tail) == n:
                    x = _Val(x.ids, x.cdims, lead + k, x.block)
                    pos = _positive(x)
                    break
        if pos is not None and trailing and len(shape) > x.ndim - k:
            lead, tail = shape[: x.ndim - k], shape[x.ndim - k :]
            if all(isinstance(s, int) for s in tail) and not any(
                isinstance(s, int) and s == -1 for s in lead
            ):
                n = x.ids.numel()
                known = math.prod(s for s in tail if s != -1)
                tail = [n // known if s == -1 else s for s in tail]
                if math.prod(tail) == n:
                    ids = x.ids.reshape(tail)
                    return _Val(ids, tuple(range(-len(tail), 0)), len(shape), x.block)
        self.fix_all(node, "a reshape the walk cannot follow")
        return None

    def permute(self, node: fx.Node, x: _Val | None) -> _Val | None:
        if x is None:
            return None
        pos = _positive(x)
        if pos is None:
            self.fix_all(node, "a transpose of a tensor whose rank is unknown")
            return None
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        n = x.ndim
        if node.target in ("transpose", torch.transpose):
            a, b = rest[0] % n, rest[1] % n
            order = list(range(n))
            order[a], order[b] = b, a
        else:
            order = [d % n for d in rest]
        new_pos = [order.index(p) for p in pos]
        perm = sorted(range(len(pos)), key=lambda i: new_pos[i])
        ids = x.ids.permute(perm) if len(pos) > 1 else x.ids
        return _Val(ids, tuple(sorted(p - n for p in new_pos)), n, x.block)

    def reduce(self, node: fx.Node, x: _Val | None) -> _Val | None:
        if x is None:
            return None
        dims = _arg(node, 1, "dim", None)
        keep = _arg(node, 2, "keepdim", False)
        pos = _positive(x)
        if dims is None or pos is None:
            self.fix_all(node, "a reduction over the channel dimension")
            return None
        dims = [d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if any(p in dims for p in pos):
            self.fix_all(node, "a reduction over the channel dimension")
            return None
        if keep:
            return x
        ndim = x.ndim - len(dims)
        return _Val(x.ids, tuple(p - sum(d < p for d in dims) - ndim for p in pos), ndim, x.block)

    def split(self, node: fx.Node, x: _Val | None, kind: str) -> Any:
        if x is None:
            return None
        pos = _positive(x)
        dim = _arg(node, 2 if kind != "unbind" else 1, "dim", 0)
        if pos is None:
            self.fix_all(node, f"a {kind} of a tensor whose rank is unknown")
            return None
        dim %= x.ndim
        if dim not in pos:
            return _Repeat(x)
        i = pos.index(dim)
        if kind == "unbind":
            parts = x.ids.unbind(i)
        elif kind == "chunk":
            parts = x.ids.chunk(node.args[1], i)
        else:
            parts = x.ids.split(node.args[1], i)
        left = [c for j, c in enumerate(x.cdims) if j != i] if kind == "unbind" else None
        if kind == "unbind":
            return [_Val(p, tuple(c + (1 if c < x.cdims[i] else 0) for c in left), x.ndim - 1)
                    for p in parts]  # fmt: skip
        return [_Val(p, x.cdims, x.ndim, x.block) for p in parts]

    def getitem(self, node: fx.Node, src: Any, index: Any) -> Any:
        v = self.val(src)
        if isinstance(v, _Repeat):
            return v.val
        if isinstance(v, (list, tuple)):
            return v[index] if isinstance(index, int) else None
        if v is None:
            return None
        pos = _positive(v)
        idx = index if isinstance(index, tuple) else (index,)
        if pos is None or not all(isinstance(i, (int, slice)) for i in idx):
            self.fix_all(node, "an indexing the walk cannot follow")
            return None
        ids, new_pos, out, j = v.ids, [], 0, 0
        for d in range(v.ndim):
            i = idx[d] if d < len(idx) else slice(None)
            if d in pos:
                if isinstance(i, int):
                    ids = ids.select(j, i)
                    continue
                ids = ids.movedim(j, 0)[i].movedim(0, j)
                j += 1
                new_pos.append(out)
            if not isinstance(i, int):
                out += 1
        if ids.dim() == 0:
            self.fix_all(node, "an indexing that picks one channel")
            return None
        return _Val(ids, tuple(p - out for p in new_pos), out, v.block)

    def sdpa(self, node: fx.Node) -> _Val | None:
        q, k, v = (self.val(a) for a in node.args[:3])
        if q is None or k is None or v is None or q.ids.dim() != 2 or q.cdims != (-3, -1):
            self.fix_all(node, "attention inputs the walk cannot follow")
            return None
        if k.ids.shape != q.ids.shape or v.ids.shape[0] != q.ids.shape[0]:
            self.fix_all(node, "attention inputs the walk cannot follow")
            return None
        heads = torch.cat([q.ids, k.ids, v.ids], dim=1)
        stack = list(node.meta.get("nn_module_stack", {}).values())
        owner = stack[-1][0] if stack else ""
        self._tie_heads(heads.view(heads.shape[0], 1, -1).transpose(0, 1), node.name, owner)
        return v


@dataclass
class _Repeat:
    """A split along a non-channel dimension: every piece carries the same channels."""

    val: _Val


def _flat_vals(v: Any) -> list[_Val]:
    if isinstance(v, _Val):
        return [v]
    if isinstance(v, _Repeat):
        return [v.val]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flat_vals(item)]
    return []


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class _Tracer(fx.Tracer):
    """fx's tracer that also keeps the named submodules as leaves (called, not traced into)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _failing_submodule(model: nn.Module, exc: BaseException) -> str | None:
    """The innermost submodule of ``model`` whose forward raised ``exc`` (from the traceback)."""
    names = {id(m): n for n, m in model.named_modules() if n}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def trace_channels(model: nn.Module, heads: bool = False) -> ChannelGraph:
    """Trace ``model`` (torch.fx) and tie its channels.

    A submodule fx cannot trace through (data-dependent control flow, say) is kept whole as a
    leaf: the walk does not know it, so its channels stay and its parameters are gated on their
    own (the caller warns, naming it).

    Args:
        model: the module (fx does not run it).
        heads: tie each attention head into one unit (granularity ``"head"``); otherwise attention
            channels are fixed.

    Raises:
        GraphError: fx cannot trace the model's own forward; the message names the failing op.
    """
    leaves: set[str] = set()
    while True:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:
            name = _failing_submodule(model, exc)
            if name is None or name in leaves:
                raise GraphError(
                    f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
                    f"{exc}"
                ) from exc
            leaves.add(name)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return _Walker(gm, heads).run()
