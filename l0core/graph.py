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

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ChannelGraph", "GraphError", "Incidence", "ReshapeSite"]


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
class ReshapeSite:
    """A reshape (``view``/``reshape``) that splits or joins channels into trailing dims whose
    sizes export may have to write anew: the widths it reads from a tensor's shape
    (``d // heads`` with ``b, n, d = x.shape``) or hard-codes no longer hold once units close.

    Attributes:
        owner: qualified name of the innermost module whose forward holds the op.
        index: its position among the reshapes of ``owner``'s forward (nested modules' included).
        tail: the position in the shape arguments where the channel dims begin.
        literal: per channel dim, its size if the argument is a literal int, None if it is
            computed in the forward (from a shape).
        ids: channel id of each element of the channel dims (shaped like them).
        read: the channels whose widths the computed sizes read (empty: none).
    """

    owner: str
    index: int
    tail: int
    literal: list[int | None]
    ids: Tensor
    read: Tensor

    @property
    def reads_width(self) -> bool:
        return any(v is None for v in self.literal)


@dataclass
class ChannelGraph:
    """The channels of a traced model and the parameter slices they tie together (plain data:
    no graph module, so a wrapper holding it pickles). Built by ``l0core.trace``."""

    parent: list[int] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    head: set[int] = field(default_factory=set)
    incidences: list[Incidence] = field(default_factory=list)
    unknown_modules: dict[str, str] = field(default_factory=dict)
    hidden_reads: set[str] = field(default_factory=set)  # modules whose tensors are read directly
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> head roots
    reshapes: list[ReshapeSite] = field(default_factory=list)
    reshape_counts: dict[str, int] = field(default_factory=dict)  # module -> reshapes under it
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
