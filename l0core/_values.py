"""Channel ids carried by the tensors of a traced forward, and how tensor ops move them.

Used by :mod:`l0core.trace`: a value's channel ids span its channel dimension(s); flattening,
reshaping into heads, transposing, concatenating, splitting, indexing and reducing move, cut or
regroup them, and an op that mixes channels in a way the walk cannot follow fixes them (they keep
their width), with the node and op in the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from .graph import ChannelGraph

__all__ = [
    "Repeat",
    "Shape",
    "Size",
    "TensorOps",
    "Val",
    "arg_of",
    "flat_vals",
    "op_name",
    "positive",
    "size_of",
]


@dataclass
class Val:
    """Channel ids of a tensor: ``ids`` spans the channel dims ``cdims`` (negative positions,
    ascending); ``block``: each id stands for a run of features of unknown length (a flatten)."""

    ids: Tensor
    cdims: tuple[int, ...]
    ndim: int | None
    block: bool = False


def positive(val: Val) -> list[int] | None:
    return None if val.ndim is None else [val.ndim + c for c in val.cdims]


@dataclass
class Size:
    """An int read from a tensor's shape (``x.shape[i]``, ``x.size(i)``), or computed from such
    ints: ``value`` where the walk knows it (the width of a channel dimension), ``deps`` the
    channel ids whose number it depends on (None: no channel width, e.g. the batch size)."""

    value: int | float | None
    deps: Tensor | None = None


@dataclass
class Shape:
    """``x.shape`` or ``x.size()`` of a value (None: a tensor the walk does not follow)."""

    val: Val | None


def size_of(val: Val | None, dim: int) -> Size:
    """The size of ``val`` along ``dim``: known, and depending on its channels, on a channel
    dimension; unknown and independent of them elsewhere."""
    if val is None:
        return Size(None)
    d = dim if dim < 0 else (None if val.ndim is None else dim - val.ndim)
    if d is None:  # rank unknown: it may be a channel dimension
        return Size(None, val.ids)
    if d not in val.cdims:
        return Size(None)
    j = val.cdims.index(d)
    return Size(None if val.block else int(val.ids.shape[j]), val.ids)


@dataclass
class Repeat:
    """A split along a non-channel dimension: every piece carries the same channels."""

    val: Val


def flat_vals(v: Any) -> list[Val]:
    if isinstance(v, Val):
        return [v]
    if isinstance(v, Repeat):
        return [v.val]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in flat_vals(item)]
    return []


def arg_of(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class TensorOps:
    """The tensor-op half of the walk; the walker supplies ``g``, ``val`` and ``fix_all``."""

    g: ChannelGraph
    vals: dict

    def val(self, arg: Any) -> Any:
        raise NotImplementedError

    def fix_all(self, node: fx.Node, why: str) -> None:
        raise NotImplementedError

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
        if isinstance(other, fx.Node) and isinstance(self.vals.get(other), Size):
            if not multiplies:  # a number read from a shape: a scale keeps zero at zero
                self.fix_all(node, "adds a number read from a shape")
        elif isinstance(other, fx.Node):
            self.fix_all(node, "combined with a tensor the walk does not follow")
        elif not multiplies and other not in (0, 0.0):
            self.fix_all(node, f"adds the constant {other!r}")
        return v

    def flatten(self, node: fx.Node, x: Val | None, start: int, end: int) -> Val | None:
        if x is None:
            return None
        pos = positive(x)
        if pos is None:
            self.fix_all(node, "a flatten of a tensor whose rank is unknown")
            return None
        start, end = start % x.ndim, end % x.ndim
        ndim = x.ndim - (end - start)
        if all(p < start or p > end for p in pos):
            new = [p if p < start else p - (end - start) for p in pos]
            return Val(x.ids, tuple(p - ndim for p in new), ndim, x.block)
        if len(pos) == 1 and pos[0] == start and end == x.ndim - 1:
            return Val(x.ids, (-1,), ndim, True)
        if pos == list(range(start, end + 1)) and end == x.ndim - 1:
            return Val(x.ids.flatten(), (-1,), ndim, x.block)
        self.fix_all(node, "a flatten that mixes channels with other dimensions")
        return None

    def cat(self, node: fx.Node) -> Val | None:
        tensors, dim = node.args[0], arg_of(node, 1, "dim", 0)
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
            return Val(torch.cat([v.ids for v in vals]), v0.cdims, v0.ndim, v0.block)
        for v in known[1:]:  # along another dimension: the pieces share their channels
            self.g.union(v0.ids, v.ids)
        if len(known) < len(vals):
            self.fix_all(node, "concatenated with a tensor the walk does not follow")
        return v0

    def reshaped(self, node: fx.Node, tail: int, args: list, ids: Tensor) -> None:
        """Called for a reshape the walk follows into trailing channel dims (the walker records
        it for export)."""

    def size_deps(self, node: fx.Node, args: list) -> list[Tensor]:
        raise NotImplementedError

    def reshape(self, node: fx.Node, x: Val | None) -> Val | None:
        if x is None:
            return None
        raw = list(node.args[1:]) if node.op == "call_method" else [arg_of(node, 1, "shape", None)]
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = list(raw[0])
        shape = [self.known_size(a) for a in raw]  # ints where known (shapes read included)
        pos = positive(x)
        # (B, -1) after channels at dim 1: a flatten
        if pos == [1] and len(shape) == 2 and shape[1] == -1:
            return Val(x.ids, (-1,), 2, True)
        if pos == [1] and len(shape) == 2 and isinstance(raw[1], int):
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
                    x = Val(x.ids, x.cdims, lead + k, x.block)
                    pos = positive(x)
                    break
        if pos is not None and trailing and len(shape) > x.ndim - k:
            lead, tail = shape[: x.ndim - k], shape[x.ndim - k :]
            lead_deps = self.size_deps(node, raw[: x.ndim - k])
            if lead_deps:  # a width used as a batch-like size: export could not rewrite it
                for d in lead_deps:
                    self.g.fix(d, f"its width sizes a leading dim at node {node.name!r} "
                                  f"({op_name(node)})")  # fmt: skip
            if all(isinstance(s, int) for s in tail) and not any(
                isinstance(s, int) and s == -1 for s in lead
            ):
                n = x.ids.numel()
                known = math.prod(s for s in tail if s != -1)
                tail = [n // known if s == -1 else s for s in tail]
                if math.prod(tail) == n:
                    ids = x.ids.reshape(tail)
                    self.reshaped(node, x.ndim - k, raw, ids)
                    return Val(ids, tuple(range(-len(tail), 0)), len(shape), x.block)
        self.fix_all(node, "a reshape the walk cannot follow")
        return None

    def known_size(self, a: Any) -> Any:
        """``a`` as an int where it is one or a size the walk knows, else ``a`` itself."""
        if isinstance(a, fx.Node):
            v = self.vals.get(a)
            if isinstance(v, Size) and isinstance(v.value, int):
                return v.value
        return a

    def permute(self, node: fx.Node, x: Val | None) -> Val | None:
        if x is None:
            return None
        pos = positive(x)
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
        return Val(ids, tuple(sorted(p - n for p in new_pos)), n, x.block)

    def reduce(self, node: fx.Node, x: Val | None) -> Val | None:
        if x is None:
            return None
        dims = arg_of(node, 1, "dim", None)
        keep = arg_of(node, 2, "keepdim", False)
        pos = positive(x)
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
        return Val(x.ids, tuple(p - sum(d < p for d in dims) - ndim for p in pos), ndim, x.block)

    def split(self, node: fx.Node, x: Val | None, kind: str) -> Any:
        if x is None:
            return None
        pos = positive(x)
        dim = arg_of(node, 2 if kind != "unbind" else 1, "dim", 0)
        if pos is None:
            self.fix_all(node, f"a {kind} of a tensor whose rank is unknown")
            return None
        dim %= x.ndim
        if dim not in pos:
            return Repeat(x)
        i = pos.index(dim)
        if kind == "unbind":
            parts = x.ids.unbind(i)
        elif kind == "chunk":
            parts = x.ids.chunk(node.args[1], i)
        else:
            parts = x.ids.split(node.args[1], i)
        left = [c for j, c in enumerate(x.cdims) if j != i] if kind == "unbind" else None
        if kind == "unbind":
            return [Val(p, tuple(c + (1 if c < x.cdims[i] else 0) for c in left), x.ndim - 1)
                    for p in parts]  # fmt: skip
        return [Val(p, x.cdims, x.ndim, x.block) for p in parts]

    def getitem(self, node: fx.Node, src: Any, index: Any) -> Any:
        v = self.val(src)
        if isinstance(v, Repeat):
            return v.val
        if isinstance(v, (list, tuple)):
            return v[index] if isinstance(index, int) else None
        if v is None:
            return None
        pos = positive(v)
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
        return Val(ids, tuple(p - out for p in new_pos), out, v.block)
