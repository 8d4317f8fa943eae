"""Coupled groups: one gate per unit of the channel graph, applied where the unit is created.

A unit (see :mod:`l0core.graph`) is a set of channels tied by the data flow; its gate multiplies
every tensor slice that *creates* those channels: the affine entries of each BatchNorm on them
(never the layer before a BatchNorm, which the normalization would rescale away), the rows and
bias of a producer no BatchNorm follows, a depthwise convolution's bias, the q/k/v rows of an
attention head. A closed gate then makes the channel exactly zero wherever it lives, so
removing it (rows, norm entries, and the columns of every consumer) is exact.

Units with the same members form a *group*: one ``GateSite`` per group, so ``summary``,
``droprate_init`` patterns and the penalty see groups (``"layer1.0.bn2+bn1+...:channels"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .graph import ChannelGraph, GraphError, Incidence
from .selection import TargetParam
from .trace import trace_channels

__all__ = ["GROUP_GRANULARITIES", "GroupPlan", "plan_groups"]

GROUP_GRANULARITIES = ("output", "head")


@dataclass
class _Mask:
    """``module.attr`` multiplied along ``dim`` by ``zfull[index]`` (``zfull``: the gates with a
    trailing 1 for channels no gate closes); ``index`` is a slice when it is a plain range."""

    module: nn.Module
    attr: str
    aliases: tuple[tuple[nn.Module, str], ...]
    dims: list[tuple[int, Tensor | slice]]


@dataclass
class Group:
    """Units with the same members; ``units[k]`` lists the channel roots of gate ``k``."""

    name: str
    kind: str  # "channels" or "heads"
    roots: list[int]
    members: list[str]
    owned: int  # parameters one unit owns (its producer rows, norm entries, depthwise rows)
    offset: int = 0


@dataclass
class GroupPlan:
    """Every gated unit of a model, its gates' layout, and what each gate controls."""

    graph: ChannelGraph
    groups: list[Group]
    unit_of: dict[int, int]  # channel root -> gate index
    model: nn.Module | None = None
    masks: list[_Mask] = field(default_factory=list)
    not_gated: dict[str, str] = field(default_factory=dict)  # parameter -> why
    _index: dict[tuple[str, str, int], Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_gates(self) -> int:
        return sum(len(g.roots) for g in self.groups)

    def gate_index(self, inc: Incidence) -> Tensor:
        """Per index of ``inc``: its gate, or ``n_gates`` (the always-open slot)."""
        key = (inc.module, inc.attr, inc.dim)
        if key not in self._index:
            n = self.n_gates
            self._index[key] = torch.tensor(
                [self.unit_of.get(self.graph.find(i), n) for i in inc.ids.tolist()],
                dtype=torch.long,
            )
        return self._index[key]

    def gated_tensors(self, z: Tensor) -> list[Tensor]:
        """The masked tensors for gates ``z`` (all groups, in order), differentiable."""
        zfull = torch.cat([z, z.new_ones(1)])
        out = []
        for m in self.masks:
            t = m.module._parameters[m.attr]
            for dim, index in m.dims:
                g = zfull[index].to(t.dtype)
                shape = [1] * t.dim()
                shape[dim] = -1
                t = t * g.view(shape)
            out.append(t)
        return out

    @torch.no_grad()
    def bake(self, model: nn.Module, z: Tensor) -> None:
        """Multiply a plain copy's parameters by eval gates ``z`` (the same names)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        zfull = torch.cat([z, z.new_ones(1)])
        for m in self.masks:
            t = getattr(model.get_submodule(names[id(m.module)]), m.attr)
            for dim, index in m.dims:
                shape = [1] * t.dim()
                shape[dim] = -1
                t.mul_(zfull[index].to(t.dtype).view(shape))

    @torch.no_grad()
    def zero_units(self, model: nn.Module) -> Tensor:
        """Per gate, whether every entry it would multiply in ``model`` (a plain copy with the
        same module names, e.g. a pruned model fine-tuned with its zeros fixed) is exactly 0:
        such a unit is the same as a closed one, so the graph export may remove it."""
        names = {id(m): n for n, m in self.model.named_modules()}
        alive = torch.zeros(self.n_gates + 1, dtype=torch.long)  # non-zero entries per gate
        for m in self.masks:
            t = getattr(model.get_submodule(names[id(m.module)]), m.attr).detach()
            for dim, index in m.dims:
                nonzero = (t != 0).transpose(0, dim).reshape(t.shape[dim], -1).any(1).cpu()
                if isinstance(index, slice):  # a plain range of gates
                    index = torch.arange(index.start, index.stop)
                alive.index_add_(0, index.cpu(), nonzero.long())
        return alive[: self.n_gates] == 0

    def unit_sq_norms(self) -> Tensor:
        """Per gate, the squared norm of the parameters it owns (differentiable)."""
        ref = next(iter(self.model.parameters()))
        out = torch.zeros(self.n_gates, dtype=torch.float32, device=ref.device)
        for inc in self.graph.incidences:
            if inc.role not in _OWNED:
                continue
            p = _param(self.model, inc)
            if p is None:
                continue
            idx = self.gate_index(inc).to(p.device)
            keep = idx < self.n_gates
            if not keep.any():
                continue
            dims = [d for d in range(p.dim()) if d != inc.dim]
            sq = (p.pow(2).sum(dims) if dims else p.pow(2)).float()
            out = out.index_add(0, idx[keep], sq[keep])
        return out


_OWNED = ("rows", "norm", "depthwise")


def _param(gm: nn.Module, inc: Incidence) -> nn.Parameter | None:
    return gm.get_submodule(inc.module)._parameters.get(inc.attr)


def _parse(granularity: str | list[str] | tuple[str, ...]) -> set[str]:
    kinds = [granularity] if isinstance(granularity, str) else list(granularity)
    if not kinds:
        raise ValueError("granularity list is empty; allowed: 'output', 'head'")
    for k in kinds:
        if k not in GROUP_GRANULARITIES:
            raise ValueError(
                f"granularity {k!r} cannot be combined in a list; allowed in a list: "
                f"{GROUP_GRANULARITIES}"
            )
    return set(kinds)


def plan_groups(
    model: nn.Module,
    targets: list[TargetParam],
    granularity: str | list[str],
    allowed: dict[int, set[str]] | None = None,
    example: tuple[tuple, dict] | None = None,
) -> GroupPlan:
    """Trace ``model`` and choose its gated units.

    A unit is gated when its kind is asked for (``"head"`` for attention heads, ``"output"`` for
    every other channel), it is not fixed (the model's input or output, a LayerNorm's input...),
    and every producer weight that creates it is among ``targets`` (for a unit no weight
    creates, a LayerNorm's outputs: every weight that reads it). With ``allowed`` (per module:
    ``id(param)`` -> granularities) each producer weight must have chosen the unit's kind (for
    a LayerNorm's outputs: the LayerNorm's own affine entries). ``example``: ``(args, kwargs)``
    of a forward, to record the call graph where fx cannot trace (``l0core.record``).

    Raises:
        ValueError: a granularity that is not ``"output"``/``"head"``.
        GraphError: the model cannot be traced.
    """
    kinds = _parse(granularity)
    graph = trace_channels(model, heads="head" in kinds, example=example)
    gm = model  # the traced graph's leaf modules are the model's own
    selected = {id(t.param) for t in targets}
    aliases = {id(t.param): t.aliases for t in targets}
    # the members of every root, and whether some incidence gates it
    members: dict[int, list[tuple[int, int]]] = {}
    gated_at: set[int] = set()
    blocked: dict[int, str] = {}
    rows_of: dict[int, list[tuple[Incidence, Tensor]]] = {}
    cols_of: dict[int, list[tuple[Incidence, Tensor]]] = {}
    creators_of: dict[int, list[tuple[Incidence, Tensor]]] = {}
    for k, inc in enumerate(graph.incidences):
        p = _param(gm, inc)
        for i in inc.ids.tolist():
            r = graph.find(i)
            members.setdefault(r, []).append((k, 1))
            if inc.gate:
                gated_at.add(r)
            if inc.gate and p is not None:
                creators_of.setdefault(r, []).append((inc, p))
            if inc.role == "rows" and p is not None and p.dim() >= 2:
                rows_of.setdefault(r, []).append((inc, p))
            elif inc.role == "cols" and p is not None and p.dim() >= 2:
                cols_of.setdefault(r, []).append((inc, p))
            if inc.module in graph.hidden_reads:
                blocked.setdefault(r, f"{inc.module}'s weights are read outside its forward")
    for r in members:
        want = "head" if r in graph.head else "output"
        rows = rows_of.get(r)
        if not rows and allowed is not None:  # per module: the norm that creates it chose it
            rows = creators_of.get(r, [])
        for inc, p in rows or cols_of.get(r, []):
            if id(p) not in (selected if allowed is None else allowed):
                blocked.setdefault(r, f"{inc.module}.{inc.attr} is not selected")
            elif allowed is not None and want not in allowed[id(p)]:
                blocked.setdefault(
                    r,
                    f"{inc.module}.{inc.attr} is selected for {sorted(allowed[id(p)])}, "
                    f"not {want!r}",
                )
    chosen: dict[tuple, list[int]] = {}
    not_gated: dict[str, str] = {}
    for r, mem in members.items():
        why = graph.fixed.get(r) or blocked.get(r)
        kind = "heads" if r in graph.head else "channels"
        if why is None and ("head" if kind == "heads" else "output") not in kinds:
            why = f"granularity {'head' if kind == 'heads' else 'output'!r} not asked for"
        if why is None and r not in gated_at:
            why = "no tensor creates it"
        if why is not None:
            for k, _ in mem:
                inc = graph.incidences[k]
                if inc.role == "rows":
                    not_gated.setdefault(f"{inc.module}.{inc.attr}", why)
            continue
        counts: dict[int, int] = {}
        for k, c in mem:
            counts[k] = counts.get(k, 0) + c
        chosen.setdefault((kind, tuple(sorted(counts.items()))), []).append(r)
    groups = []
    unit_of: dict[int, int] = {}
    offset = 0
    for (kind, sig), roots in chosen.items():
        incs = [graph.incidences[k] for k, _ in sig]
        owned = 0
        for (_, c), inc in zip(sig, incs, strict=True):
            p = _param(gm, inc)
            if inc.role in _OWNED and p is not None:
                owned += c * (p.numel() // p.shape[inc.dim])
        creators = sorted({i.module for i in incs if i.gate}, key=len)
        name = "+".join(creators[:3]) + (f"+{len(creators) - 3}" if len(creators) > 3 else "")
        member_names = sorted({f"{i.module}.{i.attr}[{i.role}]" for i in incs})
        groups.append(Group(f"{name}:{kind}", kind, roots, member_names, owned, offset))
        for j, r in enumerate(roots):
            unit_of[r] = offset + j
        offset += len(roots)
    _unique_names(groups)
    plan = GroupPlan(graph, groups, unit_of, model=model, not_gated=not_gated)
    by_tensor: dict[tuple[str, str], _Mask] = {}
    for inc in graph.incidences:
        if not inc.gate:
            continue
        index = plan.gate_index(inc)
        if bool((index == plan.n_gates).all()):
            continue
        key = (inc.module, inc.attr)
        mod = gm.get_submodule(inc.module)
        p = mod._parameters[inc.attr]
        if key not in by_tensor:
            by_tensor[key] = _Mask(mod, inc.attr, aliases.get(id(p), ()), [])
            plan.masks.append(by_tensor[key])
        by_tensor[key].dims.append((inc.dim, _as_slice(index)))
    return plan


def _as_slice(index: Tensor) -> Tensor | slice:
    n = index.numel()
    start = int(index[0])
    if bool((index == torch.arange(start, start + n)).all()):
        return slice(start, start + n)
    return index


def _unique_names(groups: list[Group]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        if g.name in seen:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name]}"
        else:
            seen[g.name] = 1


def try_plan_groups(
    model: nn.Module,
    targets: list[TargetParam],
    granularity: str | list[str],
    required: bool,
    allowed: dict[int, set[str]] | None = None,
    example: tuple[tuple, dict] | None = None,
) -> GroupPlan | None:
    """``plan_groups``, or ``None`` with a warning when the model does not trace and the
    caller can fall back to per-layer gates (``required=False``)."""
    try:
        return plan_groups(model, targets, granularity, allowed, example)
    except GraphError as exc:
        if required:
            raise
        warnings.warn(
            f"{exc}; gating each layer on its own (weight masks, exact; export may not shrink)",
            stacklevel=4,
        )
        return None
