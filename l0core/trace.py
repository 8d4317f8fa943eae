"""Tracing a model into its channel graph (see :mod:`l0core.graph`).

``torch.fx`` traces the forward (a submodule it cannot trace through is kept whole as a leaf);
the walk gives every value the ids of its channels: producers create them, per-channel ops keep
them, residual adds tie them, attention heads group them. Modules are handled here, tensor ops
in :mod:`l0core._values`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._values import Shape, Size, TensorOps, Val, arg_of, flat_vals, op_name, positive, size_of
from .graph import ChannelGraph, GraphError, ReshapeSite
from .record import record_graph

__all__ = ["trace_channels"]

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
_SHAPE_METHODS = {"dim"}
_SIZE_ARITHMETIC = {
    operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv, operator.mod,
    operator.pow, operator.neg,
}  # fmt: skip
_RESHAPES = {"view", "reshape"}


def _zero_at_zero(activation: Any) -> bool:
    """Whether a transformer layer's activation (a function or a module) keeps 0 at 0."""
    if isinstance(activation, nn.Module):
        return isinstance(activation, _KEEP_MODULES)
    return activation in _KEEP_FUNCTIONS


class _Walker(TensorOps):
    def __init__(self, graph: fx.Graph, heads: bool, root: nn.Module) -> None:
        self.g = ChannelGraph()
        self.graph = graph
        self.heads = heads
        self.vals: dict[fx.Node, Any] = {}
        self.modules = dict(root.named_modules())  # gm holds the same leaves, not the rest

    # ---- helpers --------------------------------------------------------------------------
    def val(self, arg: Any) -> Any:
        """The channels of a tensor argument (None for anything else, sizes included)."""
        v = self.vals.get(arg) if isinstance(arg, fx.Node) else None
        return None if isinstance(v, (Size, Shape)) else v

    def size_deps(self, node: fx.Node, args: Any) -> list[Tensor]:
        """The channel ids that the sizes among ``args`` (nested) depend on."""
        out = []
        stack = list(args) if isinstance(args, (list, tuple)) else [args]
        while stack:
            a = stack.pop()
            if isinstance(a, (list, tuple)):
                stack.extend(a)
            elif isinstance(a, fx.Node):
                v = self.vals.get(a)
                if isinstance(v, Size) and v.deps is not None:
                    out.append(v.deps)
        return out

    def fix_all(self, node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            for v in flat_vals(self.vals.get(arg)):
                self.g.fix(v.ids, f"{why} at node {node.name!r} ({op_name(node)})")

    def run(self) -> ChannelGraph:
        for node in self.graph.nodes:
            if _is_reshape(node):  # numbered per module (and its parents) for export
                self.reshape_index = self.g.reshape_counts.get(_owner(node), 0)
                for path in {p for p, _ in node.meta.get("nn_module_stack", {}).values()} | {""}:
                    self.g.reshape_counts[path] = self.g.reshape_counts.get(path, 0) + 1
            try:
                self.vals[node] = self.visit(node)
            except GraphError:
                raise
            except Exception as exc:  # a pattern the walk misreads: keep its channels
                self.fix_all(node, f"not understood ({type(exc).__name__}: {exc})")
                self.vals[node] = None
        return self.g

    def visit(self, node: fx.Node) -> Any:
        if node.op == "get_attr":  # a weight read outside a module's forward (F.linear, x @ w)
            owner = str(node.target).rpartition(".")[0]
            if owner:  # the root's own tensors (a class token) are not a layer
                self.g.hidden_reads.add(owner)
            return None
        if node.op == "placeholder":
            return None
        if node.op == "output":
            self.fix_all(node, "the model's output")
            self._width_read(node)
            return None
        if node.op == "call_module":
            self._width_read(node)
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
            if x is not None and x.ids.dim() == 1 and positive(x) in ([1], None):
                if not (m.affine and m.track_running_stats):
                    self.g.fix(x.ids, f"{name} ({type(m).__name__}) has no affine or no "
                                      "running statistics to gate")  # fmt: skip
                self._norm(name, m, x.ids)
            elif x is not None:
                self.fix_all(node, "a BatchNorm not on the channel dimension")
            return x
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, name, m, x)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, name, m, x)
        if isinstance(m, _KEEP_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, _NONZERO_AT_ZERO):
            self.fix_all(node, "maps a closed (zero) channel to a non-zero value")
            return x
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(node, name, m, x)
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return self.transformer_layer(node, name, m, x)
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
            for i, layer in enumerate(m.layers):
                x = self.transformer_layer(node, f"{name}.layers.{i}", layer, x)
            return x if m.norm is None else self.module_norm(node, f"{name}.norm", m.norm, x)
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.parameters()):
            self.g.unknown_modules[name] = type(m).__name__
        self.fix_all(node, "an op the graph walk does not know")
        return None

    def group_norm(self, node: fx.Node, name: str, m: nn.GroupNorm, x: Val | None) -> Val | None:
        """GroupNorm normalizes each group of channels on its own, so a whole group is one unit:
        its gate multiplies the group's affine entries (after the normalization), a closed group
        is exactly zero, and removing it (``num_groups`` one lower) leaves the other groups'
        statistics as they were. A single closed channel would change its group's statistics."""
        if x is None:
            return None
        if x.ids.dim() != 1 or positive(x) not in ([1], None) or x.block:
            self.fix_all(node, "a GroupNorm not on the channel dimension")
            return None
        for row in x.ids.view(m.num_groups, -1):
            self.g.union(row[:1].expand_as(row), row)
        if not m.affine:
            self.g.fix(x.ids, f"{name} (GroupNorm) has no affine output to gate (a closed "
                              "channel would change its group's statistics)")  # fmt: skip
        self._norm(name, m, x.ids)
        return x

    def layer_norm(self, node: fx.Node, name: str, m: nn.LayerNorm, x: Val | None) -> Val | None:
        """LayerNorm over the features: removing an input feature changes the statistics of the
        others, so its input keeps its width. Its outputs are fresh units gated on the affine
        output (a closed one is exactly zero): export removes them from the LayerNorm's output
        and from every consumer (``l0core.modules.NarrowLayerNorm``)."""
        if x is None:
            return None
        self.fix_all(node, f"normalized together by {name} (LayerNorm)")
        out = self.g.new(x.ids.numel()).view(x.ids.shape)
        one_dim = len(m.normalized_shape) == 1 and x.ids.dim() == 1 and x.cdims == (-1,)
        if not one_dim or x.block:
            self.g.fix(out, f"normalized by {name} (LayerNorm over more than the feature dim)")
        elif m.weight is None:
            self.g.fix(out, f"{name} (LayerNorm) has no affine output to gate")
        else:
            self._norm(name, m, out)
        return Val(out, x.cdims, x.ndim, x.block)

    def module_norm(self, node: fx.Node, name: str, m: nn.Module, x: Val | None) -> Val | None:
        """A norm that a container module applies to ``x`` (its final ``norm``)."""
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, name, m, x)
        for v in flat_vals(x):
            self.g.fix(v.ids, f"normalized by {name} ({type(m).__name__})")
        return None if x is None else Val(self.g.new(x.ids.numel()), x.cdims, x.ndim, x.block)

    def _norm(self, name: str, m: nn.Module, ids: Tensor) -> None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr, None) is not None:
                self.g.touch(name, attr, 0, ids, "norm", attr in ("weight", "bias"))

    def _only_norm_follows(self, node: fx.Node) -> bool:
        """Whether the only user of ``node`` is a channel norm whose affine output the gate
        multiplies instead (a gate before it would be normalized away)."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return False
        m = self.modules[users[0].target]
        if isinstance(m, nn.GroupNorm):
            return m.affine
        return isinstance(m, _BN) and m.affine and m.track_running_stats

    def conv(self, node: fx.Node, name: str, m: nn.Module, x: Val | None) -> Val:
        transposed = isinstance(m, _CONVT)
        k = len(m.kernel_size)
        ndim = k + 2 if x is None or x.ndim is None else x.ndim
        n_in, n_out, groups = m.in_channels, m.out_channels, m.groups
        if x is not None and (x.ids.dim() != 1 or positive(x) not in ([1], None) or x.block):
            self.fix_all(node, "a convolution that does not read the channel dimension")
            x = None
        if groups == 1:
            if x is not None:
                self.g.touch(name, "weight", 0 if transposed else 1, x.ids, "cols")
            out = self.g.new(n_out)
            gate = not self._only_norm_follows(node)
            self.g.touch(name, "weight", 1 if transposed else 0, out, "rows", gate)
            if m.bias is not None:
                self.g.touch(name, "bias", 0, out, "rows", gate)
            return Val(out, (-(k + 1),), ndim)
        if groups == n_in == n_out and not transposed and x is not None:  # depthwise
            self.g.touch(name, "weight", 0, x.ids, "depthwise")
            if m.bias is not None:
                self.g.touch(name, "bias", 0, x.ids, "depthwise", True)
            return Val(x.ids, (-(k + 1),), ndim)
        if x is not None:
            self.g.fix(x.ids, f"read by the grouped convolution {name} (groups={groups})")
        out = self.g.new(n_out)
        self.g.fix(out, f"made by the grouped convolution {name} (groups={groups})")
        return Val(out, (-(k + 1),), ndim)

    def linear(self, node: fx.Node, name: str, m: nn.Linear, x: Val | None) -> Val:
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
        return Val(out, (-1,), ndim)

    def mha(self, node: fx.Node, name: str, m: nn.MultiheadAttention, x: Val | None,
            same: bool | None = None, inner: bool = False) -> Any:  # fmt: skip
        """Heads tie their q, k, v rows; out_proj reads v's channels. The input columns follow
        ``x`` for self-attention; cross-attention's inputs keep their width. ``inner``: called
        for a transformer layer (its inputs were handled by the caller)."""
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            self.fix_all(node, "an attention layout the walk does not know (separate q/k/v "
                               "widths, bias_k or add_zero_attn)")  # fmt: skip
            return None
        e, h = m.embed_dim, m.num_heads
        if same is None:
            same = len(node.args) >= 3 and all(self.val(a) is x for a in node.args[:3])
        if x is not None and same and x.cdims == (-1,) and x.ids.dim() == 1:
            self.g.touch(name, "in_proj_weight", 1, x.ids, "cols")
        elif not inner:
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
        return (Val(out, (-1,), None if x is None else x.ndim), None)

    def transformer_layer(self, node: fx.Node, name: str, m: nn.Module, x: Val | None) -> Any:
        """``nn.TransformerEncoderLayer``/``DecoderLayer``: the heads of its attention modules
        (a decoder's cross-attention reads the memory) and its MLP's hidden units; the streams
        it reads and writes are normalized by its LayerNorms, so they stay."""
        why = f"normalized inside {name} ({type(m).__name__})"
        for arg in node.args[:2] if isinstance(m, nn.TransformerDecoderLayer) else node.args[:1]:
            for v in flat_vals(self.val(arg)):
                self.g.fix(v.ids, why)
        ndim = None if x is None else x.ndim
        inner = Val(self.g.new(m.self_attn.embed_dim), (-1,), ndim)
        self.g.fix(inner.ids, why)
        attention = [("self_attn", True), ("multihead_attn", False)]
        for attr, same in attention[: 2 if isinstance(m, nn.TransformerDecoderLayer) else 1]:
            self.mha(node, f"{name}.{attr}", getattr(m, attr), inner, same=same, inner=True)
            self.g.fix(self.g._inc_at[(f"{name}.{attr}.out_proj", "weight", 0)].ids, why)
        hidden = self.linear(node, f"{name}.linear1", m.linear1, inner)
        if not _zero_at_zero(m.activation):
            self.g.fix(hidden.ids, f"{name}.activation does not map a closed unit to zero")
        self.g.touch(f"{name}.linear2", "weight", 1, hidden.ids, "cols")
        out = self.g.new(m.linear2.out_features)
        self.g.fix(out, why)
        return Val(out, (-1,), ndim)

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

    # ---- shapes read in the forward ---------------------------------------------------------
    def reshaped(self, node: fx.Node, tail: int, args: list, ids: Tensor) -> None:
        literal = [a if isinstance(a, int) else None for a in args[tail:]]
        read = [d.flatten() for d in self.size_deps(node, args[tail:])]
        read = torch.cat(read) if read else torch.zeros(0, dtype=torch.long)
        site = ReshapeSite(_owner(node), self.reshape_index, tail, literal, ids.clone(), read)
        self.g.reshapes.append(site)

    def _width_read(self, node: fx.Node) -> None:
        """A width read from a shape used by anything but shape arithmetic and the sizes of a
        reshape: export cannot rewrite that use, so those channels keep their width."""
        for deps in self.size_deps(node, [*node.args, *node.kwargs.values()]):
            self.g.fix(deps, f"its width is read from a shape by node {node.name!r} "
                             f"({op_name(node)})")  # fmt: skip

    def shape_op(self, node: fx.Node) -> Any:
        """``x.shape``, ``x.size()``, ``x.size(i)``, indexing a shape and int arithmetic on
        sizes; ``NotImplemented`` for any other op."""
        t, args = node.target, node.args
        first = self.vals.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if node.op == "call_function" and t is getattr and len(args) > 1 and args[1] == "shape":
            return Shape(self.val(args[0]))
        if node.op == "call_method" and t == "size":
            dim = arg_of(node, 1, "dim", None)
            return Shape(self.val(args[0])) if dim is None else size_of(self.val(args[0]), dim)
        if node.op == "call_function" and t is operator.getitem and isinstance(first, Shape):
            index = args[1]
            if isinstance(index, int):
                return size_of(first.val, index)
            if isinstance(index, slice) and first.val is not None and first.val.ndim is not None:
                return [size_of(first.val, i) for i in range(first.val.ndim)[index]]
            return Size(None, None if first.val is None else first.val.ids)
        if node.op == "call_function" and t is operator.getitem and isinstance(first, list):
            return first[args[1]] if isinstance(args[1], int) else None
        if node.op == "call_function" and t in _SIZE_ARITHMETIC:
            operands = [self.vals.get(a) if isinstance(a, fx.Node) else a for a in args]
            if any(isinstance(o, Size) for o in operands) and all(
                isinstance(o, (Size, int, float)) for o in operands
            ):
                values = [o.value if isinstance(o, Size) else o for o in operands]
                deps = [o.deps for o in operands if isinstance(o, Size) and o.deps is not None]
                known = all(isinstance(v, (int, float)) for v in values)
                return Size(t(*values) if known else None, torch.cat(deps) if deps else None)
        return NotImplemented

    # ---- functions and methods ------------------------------------------------------------
    def call(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        shape = self.shape_op(node)
        if shape is not NotImplemented:
            return shape
        if not _is_reshape(node):
            self._width_read(node)
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
        if t in (operator.truediv, torch.div, "div") and (
            isinstance(args[1], (int, float)) or isinstance(self.vals.get(args[1]), Size)
        ):
            return x  # a scale: zero stays zero
        if (node.op == "call_function" and t in (torch.flatten,)) or (
            node.op == "call_method" and t == "flatten"
        ):
            return self.flatten(
                node, x, arg_of(node, 1, "start_dim", 0), arg_of(node, 2, "end_dim", -1)
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
        if any(flat_vals(self.val(a)) for a in node.all_input_nodes):
            self.fix_all(node, "an op the graph walk does not know")
        return None

    def sdpa(self, node: fx.Node) -> Val | None:
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


def _owner(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward holds ``node`` ("": the root)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else ""


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target is torch.reshape
    )


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


def trace_channels(
    model: nn.Module, heads: bool = False, example: tuple[tuple, dict] | None = None
) -> ChannelGraph:
    """Trace ``model`` (torch.fx) and tie its channels.

    Where fx cannot trace the model (data-dependent control flow, say) and ``example`` inputs
    are given, the real call graph of one forward on them is recorded instead
    (:mod:`l0core.record`). Without them, a submodule fx cannot trace through is kept whole as a
    leaf: the walk does not know it, so its channels stay and its parameters are gated on their
    own (the caller warns, naming it).

    Args:
        model: the module (fx does not run it).
        heads: tie each attention head into one unit (granularity ``"head"``); otherwise attention
            channels are fixed.
        example: ``(args, kwargs)`` of one forward, for the recording.

    Raises:
        GraphError: fx cannot trace the model's own forward and no example is given (or the
            recorded forward fails); the message names the failing op.
    """
    leaves: set[str] = set()
    while True:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:
            if example is not None:
                return _Walker(_recorded(model, example, exc), heads, model).run()
            name = _failing_submodule(model, exc)
            if name is None or name in leaves:
                raise GraphError(
                    f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
                    f"{exc} (pass example_inputs to record the real call graph of one forward)"
                ) from exc
            leaves.add(name)
    return _Walker(graph, heads, model).run()


def _recorded(model: nn.Module, example: tuple[tuple, dict], why: BaseException) -> fx.Graph:
    try:
        return record_graph(model, example)
    except Exception as exc:
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(why).__name__}: {why}), "
            f"and its forward on the example inputs fails: {type(exc).__name__}: {exc}"
        ) from exc
