"""Export that shrinks any graph the coupled groups gate: closed units leave every tensor.

A closed unit (see :mod:`l0core.groups`) is exactly zero wherever its channels live, so removing
its producer rows, its norm entries, its depthwise channels, the columns of every consumer and,
for an attention head, its q/k/v rows (the module's ``num_heads`` drops by one) leaves the
function unchanged. The shrunk model is a copy of the original class with smaller layers: a plain
``nn.Module`` that ``torch.save``/``torch.load`` and ``torch.export`` take like the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ._chain import ShrinkError
from .graph import ReshapeSite
from .groups import GroupPlan
from .modules import HeadAttention, NarrowLayerNorm

__all__ = ["GraphShrinkReport", "export_blockers", "group_members", "shrink_graph"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class GraphShrinkReport:
    """What ``shrink_graph`` removed.

    Attributes:
        groups: group name -> ``(units before, units after)``.
        params_before: parameters of the gated model.
        params_after: parameters of the shrunk model.
    """

    groups: dict[str, tuple[int, int]]
    params_before: int
    params_after: int

    def __str__(self) -> str:
        changed = [f"{n}: {a} -> {b}" for n, (a, b) in self.groups.items() if a != b]
        text = f"{self.params_before:,} -> {self.params_after:,} parameters"
        return text + (f" ({'; '.join(changed)})" if changed else " (nothing closed)")


def group_members(sites: list) -> dict[str, object]:
    """Parameter name -> the group site that owns it (its rows, norm entries or depthwise)."""
    out = {}
    for s in sites:
        if s.plan is None:
            continue
        for m in s.group.members:
            path, _, role = m.partition("[")
            if role.rstrip("]") in ("rows", "norm", "depthwise"):
                out.setdefault(path, s)
    return out


def export_blockers(plan: GroupPlan, group_sites: list, weight_sites: list) -> list[str]:
    """One line per gated parameter that ``shrink_graph`` cannot remove units from."""
    lines = []
    root = plan.model
    for owner, roots in plan.graph.heads.items():
        if not any(plan.graph.find(r) in plan.unit_of for r in roots):
            continue
        m = root.get_submodule(owner) if owner else root
        if isinstance(m, nn.MultiheadAttention):
            continue  # export makes it a HeadAttention (l0core.modules)
    for owner in sorted(_rewritten_owners(plan)):
        why = _untraceable(plan, owner)
        if why:
            lines.append(
                f"{owner or 'the model'}: a reshape in its forward sizes gated channels with "
                f"widths that shrink changes, and export cannot rewrite it ({why})"
            )
    unknown = plan.graph.unknown_modules
    for s in [*group_sites, *weight_sites]:
        if s.plan is None:
            owner = next((u for u in unknown if s.name.startswith(f"{u}.")), "")
            lines.append(
                f"{s.name}: gated on its own (inside {owner} ({unknown.get(owner, '?')}), a "
                "module the graph walk does not know), shrink leaves it at full size"
            )
    return lines


def _never_empty(plan: GroupPlan, closed: Tensor) -> Tensor:
    """Keep one (exactly zero) unit of a group whose units are all closed: no zero-width layer."""
    closed = closed.clone().cpu()
    for g in plan.groups:
        if bool(closed[g.offset : g.offset + len(g.roots)].all()):
            closed[g.offset] = False
    return closed


def _keep_masks(plan: GroupPlan, closed: Tensor) -> dict[tuple[str, str], list[tuple[int, Tensor]]]:
    closed_full = torch.cat([closed.cpu(), torch.zeros(1, dtype=torch.bool)])
    out: dict[tuple[str, str], list[tuple[int, Tensor]]] = {}
    for inc in plan.graph.incidences:
        keep = ~closed_full[plan.gate_index(inc)]
        if bool(keep.all()):
            continue
        out.setdefault((inc.module, inc.attr), []).append((inc.dim, keep))
    return out


def _sliced(t: Tensor, cuts: list[tuple[int, Tensor]]) -> Tensor:
    for dim, keep in cuts:
        t = t.index_select(dim, keep.nonzero().flatten().to(t.device))
    return t


def _rebuilt(old: nn.Module, tensors: dict[str, Tensor], keep: Tensor | None) -> nn.Module:
    """A module of ``old``'s type and settings whose tensors are ``tensors`` (new shapes);
    ``keep``: which of its output features are left (a LayerNorm needs it)."""
    w = tensors.get("weight")
    if isinstance(old, _CONV + _CONVT):
        depthwise = old.groups > 1 and old.groups == old.in_channels == old.out_channels
        if old.groups > 1 and not depthwise:
            raise ShrinkError(f"cannot shrink the grouped convolution {old}")
        if isinstance(old, _CONVT):
            c_in, c_out = w.shape[0], w.shape[1]
        else:
            c_in, c_out = w.shape[1] * (w.shape[0] if depthwise else 1), w.shape[0]
        new = type(old)(
            c_in, c_out, old.kernel_size, stride=old.stride, padding=old.padding,
            dilation=old.dilation, groups=c_out if depthwise else 1, bias=old.bias is not None,
            padding_mode=old.padding_mode, device="meta", dtype=w.dtype,
            **({"output_padding": old.output_padding} if isinstance(old, _CONVT) else {}),
        )  # fmt: skip
    elif isinstance(old, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta",
                        dtype=w.dtype)  # fmt: skip
    elif isinstance(old, _BN):
        ref = tensors.get("running_mean", w)
        new = type(old)(ref.shape[0], eps=old.eps, momentum=old.momentum, affine=old.affine,
                        track_running_stats=old.track_running_stats, device="meta",
                        dtype=ref.dtype)  # fmt: skip
    elif isinstance(old, nn.GroupNorm):
        per = old.num_channels // old.num_groups  # a group closes whole (l0core.trace)
        new = nn.GroupNorm(w.shape[0] // per, w.shape[0], eps=old.eps, affine=old.affine,
                           device="meta", dtype=w.dtype)  # fmt: skip
    elif isinstance(old, (nn.LayerNorm, NarrowLayerNorm)):
        return _narrow_layer_norm(old, tensors, keep)
    else:
        raise ShrinkError(f"cannot shrink {type(old).__name__}")
    # built on the meta device (no memory, no init); the model is export's own copy, so its
    # tensors (sliced ones are fresh) move over as they are
    for name, t in old.named_parameters(recurse=False):
        new._parameters[name] = nn.Parameter(tensors.get(name, t).detach(), t.requires_grad)
    for name, t in old.named_buffers(recurse=False):
        new._buffers[name] = tensors.get(name, t)
    return new.train(old.training)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def shrink_graph(
    model: nn.Module, plan: GroupPlan, closed: Tensor, example: tuple[tuple, dict] | None = None
) -> tuple[nn.Module, GraphShrinkReport]:
    """Remove the closed units from ``model`` (a plain copy with the eval gates baked in).

    Args:
        model: the copy; modified in place and returned.
        plan: the coupled groups of the wrapped model (the copy has the same module names).
        closed: per gate, whether its unit is closed.
        example: ``(args, kwargs)`` of a forward; when given, the shrunk model is run on it and
            must match the unshrunk one (a width hard-coded in the forward fails here, not later).

    Raises:
        ShrinkError: a module that cannot lose the units it would lose, or a shrunk model that
            does not run or does not match, naming why.
    """
    before = _n_params(model)
    example = _on_device(model, example) if example is not None else None
    want = model(*example[0], **example[1]) if example is not None else None
    closed = _never_empty(plan, closed)
    model = _shrunk(model, plan, closed)
    if example is not None:
        _verify(want, model, example)
    groups = {
        g.name: (len(g.roots), int((~closed[g.offset : g.offset + len(g.roots)]).sum()))
        for g in plan.groups
    }
    return model, GraphShrinkReport(groups, before, _n_params(model))


def _on_device(model: nn.Module, example: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The example rows on the model's device (it may have moved since the first forward)."""
    device = next(iter(model.parameters())).device

    def moved(a: object) -> object:
        return a.to(device) if isinstance(a, Tensor) else a

    return tuple(moved(a) for a in example[0]), {k: moved(v) for k, v in example[1].items()}


def _verify(want: object, model: nn.Module, example: tuple[tuple, dict]) -> None:
    args, kwargs = example
    try:
        got = model(*args, **kwargs)
    except Exception as exc:
        raise ShrinkError(
            f"the shrunk model fails on an input like the first one ({type(exc).__name__}: "
            f"{exc}); a width or head count hard-coded in the forward? prune() without shrink "
            "keeps the model exact"
        ) from exc
    if isinstance(want, Tensor) and (
        not isinstance(got, Tensor)
        or got.shape != want.shape
        or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    ):
        raise ShrinkError(
            "the shrunk model does not compute what the gated one does on an input like the "
            "first one; prune() without shrink keeps the model exact"
        )


def _shrunk(model: nn.Module, plan: GroupPlan, closed: Tensor) -> nn.Module:
    cuts = _keep_masks(plan, closed)
    by_module: dict[str, dict[str, Tensor]] = {}
    keeps: dict[str, Tensor] = {}
    for (mod_name, attr), dims in cuts.items():
        t = getattr(model.get_submodule(mod_name), attr)
        by_module.setdefault(mod_name, {})[attr] = _sliced(t, dims)
        if attr == "weight":
            keeps[mod_name] = dims[0][1]
    attention = {
        owner: _kept_heads(plan, closed, roots)
        for owner, roots in plan.graph.heads.items()
        if isinstance(model.get_submodule(owner), nn.MultiheadAttention)
    }
    for name, m in model.named_modules():  # any cut in or around it: a HeadAttention
        if isinstance(m, nn.MultiheadAttention) and (
            name in by_module or f"{name}.out_proj" in by_module or name in attention
        ):
            attention.setdefault(name, torch.arange(m.num_heads))
    for owner, kept in attention.items():  # before its out_proj is rebuilt inside it
        old = model.get_submodule(owner)
        model.set_submodule(owner, _head_attention(old, by_module.pop(owner, {}), kept))
    for mod_name, tensors in by_module.items():
        old = model.get_submodule(mod_name)
        model.set_submodule(mod_name, _rebuilt(old, tensors, keeps.get(mod_name)))
    for owner, roots in plan.graph.heads.items():
        if owner in attention:
            continue
        kept = len(_kept_heads(plan, closed, roots))
        m = model.get_submodule(owner) if owner else model
        if kept != len(roots) and isinstance(getattr(m, "num_heads", None), int):
            m.num_heads = kept  # its forward reads it (or its reshapes are rewritten below)
    return _rewrite_reshapes(model, plan, closed)


# ---- reshapes whose sizes change --------------------------------------------------------------


def _lowers_heads(plan: GroupPlan, owner: str) -> bool:
    """Whether export lowers ``owner``'s int ``num_heads``, which its forward reads."""
    if owner not in plan.graph.heads:
        return False
    m = plan.model.get_submodule(owner) if owner else plan.model
    return isinstance(getattr(m, "num_heads", None), int)


def _needs_rewrite(plan: GroupPlan, site: ReshapeSite) -> bool:
    """Whether ``site``'s sizes, once units close, are not what the module's own code computes:
    a width read from a shape (``d // heads`` with ``d = x.shape[-1]``), or literal sizes in a
    module that holds no ``num_heads`` for export to lower."""
    return site.reads_width or not _lowers_heads(plan, site.owner)


def _gated(plan: GroupPlan, ids: Tensor) -> bool:
    return any(plan.graph.find(i) in plan.unit_of for i in ids.flatten().tolist())


def _touches_gates(plan: GroupPlan, site: ReshapeSite) -> bool:
    """Whether closing units can change ``site``'s sizes or the widths it reads."""
    return _gated(plan, site.ids) or (site.reads_width and _gated(plan, site.read))


def _rewritten_owners(plan: GroupPlan) -> set[str]:
    """The modules whose reshapes export may rewrite (gated channels, sizes it must write)."""
    return {
        s.owner for s in plan.graph.reshapes if _needs_rewrite(plan, s) and _touches_gates(plan, s)
    }


class _LeafTracer(fx.Tracer):
    """fx's tracer, with export's own replacement modules kept whole too."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (HeadAttention, NarrowLayerNorm)) or super().is_leaf_module(
            m, qualname
        )


def _reshape_nodes(module: nn.Module) -> tuple[fx.Graph, list[fx.Node]]:
    graph = _LeafTracer().trace(module)
    nodes = [
        n
        for n in graph.nodes
        if (n.op == "call_method" and n.target in ("view", "reshape"))
        or (n.op == "call_function" and n.target is torch.reshape)
    ]
    return graph, nodes


def _untraceable(plan: GroupPlan, owner: str) -> str | None:
    """Why ``owner``'s forward cannot be traced on its own with its reshapes matching the walk's
    (None when it can)."""
    m = plan.model.get_submodule(owner) if owner else plan.model
    try:
        _, nodes = _reshape_nodes(m)
    except Exception as exc:
        return f"torch.fx cannot trace {type(m).__name__} on its own: {type(exc).__name__}: {exc}"
    total = plan.graph.reshape_counts.get(owner, 0)
    if not nodes or total % len(nodes):
        return f"its forward traced on its own has {len(nodes)} reshapes, the model's trace {total}"
    return None


def _new_sizes(plan: GroupPlan, closed: Tensor, site: ReshapeSite) -> list[int]:
    """The sizes of ``site``'s channel dims once the closed units are gone."""
    closed_full = torch.cat([closed.cpu(), torch.zeros(1, dtype=torch.bool)])
    n = plan.n_gates
    index = [plan.unit_of.get(plan.graph.find(i), n) for i in site.ids.flatten().tolist()]
    keep = ~closed_full[torch.tensor(index, dtype=torch.long)].view(site.ids.shape)
    sizes, box = [], keep
    for j in range(keep.dim()):
        others = [d for d in range(keep.dim()) if d != j]
        along = keep.any(dim=others) if others else keep
        sizes.append(int(along.sum()))
        box = box.index_select(j, along.nonzero().flatten())
    if not bool(box.all()) or box.numel() != int(keep.sum()):
        raise ShrinkError(
            f"cannot shrink the reshape {site.index} in {site.owner or 'the model'}: the units "
            "left do not fill whole rows of its channel dims"
        )
    return sizes


def _rewrite_reshapes(model: nn.Module, plan: GroupPlan, closed: Tensor) -> nn.Module:
    """Write the new channel sizes into the reshapes that need them: the module whose forward
    holds them becomes an ``fx.GraphModule`` of its own forward (same submodules, parameters
    and name of class), its reshapes reading the narrower literal sizes."""
    changes: dict[str, dict[int, tuple[ReshapeSite, list[int]]]] = {}
    for site in plan.graph.reshapes:
        if not (_needs_rewrite(plan, site) and _touches_gates(plan, site)):
            continue
        sizes = _new_sizes(plan, closed, site)
        if sizes == list(site.ids.shape) and not any(
            _is_closed(plan, closed, i) for i in site.read.tolist()
        ):
            continue  # the module's own code computes the same sizes
        changes.setdefault(site.owner, {})[site.index] = (site, sizes)
    for owner in sorted(changes, key=lambda o: -o.count(".") if o else 1):  # inner ones first
        why = _untraceable(plan, owner)
        if why:
            raise ShrinkError(f"cannot rewrite the reshapes of {owner or 'the model'}: {why}")
        m = model.get_submodule(owner) if owner else model
        graph, nodes = _reshape_nodes(m)
        done: dict[int, list[int]] = {}
        for index, (site, sizes) in changes[owner].items():
            i = index % len(nodes)
            if done.setdefault(i, sizes) != sizes:
                raise ShrinkError(
                    f"cannot shrink {owner or 'the model'}: it is called more than once, with "
                    "different units closed in one of its reshapes"
                )
            _set_sizes(nodes[i], site, sizes)
        gm = fx.GraphModule(m, graph, class_name=type(m).__name__).train(m.training)
        if not owner:
            return gm
        model.set_submodule(owner, gm)
    return model


def _set_sizes(node: fx.Node, site: ReshapeSite, sizes: list[int]) -> None:
    """Write ``sizes`` into the channel dims of a reshape node (a literal -1 stays)."""
    if node.op == "call_method":
        x, raw = node.args[0], list(node.args[1:])
        packed = len(raw) == 1 and isinstance(raw[0], (tuple, list))
    else:
        x, raw, packed = (
            node.args[0],
            node.args[1] if len(node.args) > 1 else node.kwargs["shape"],
            True,
        )
    shape = list(raw[0] if node.op == "call_method" and packed else raw)
    tail = [-1 if lit == -1 else new for lit, new in zip(site.literal, sizes, strict=True)]
    shape[site.tail :] = tail
    if node.op == "call_method":
        node.args = (x, tuple(shape)) if packed else (x, *shape)
    else:
        node.args, node.kwargs = (
            (x, tuple(shape)),
            {k: v for k, v in node.kwargs.items() if k != "shape"},
        )


def _kept_heads(plan: GroupPlan, closed: Tensor, roots: list[int]) -> Tensor:
    kept = [h for h, r in enumerate(roots) if not _is_closed(plan, closed, r)]
    return torch.tensor(kept, dtype=torch.long)


def _narrow_layer_norm(
    old: nn.LayerNorm | NarrowLayerNorm, tensors: dict[str, Tensor], keep: Tensor | None
) -> NarrowLayerNorm:
    """``old`` (a LayerNorm over one dim) returning only the output features ``keep``."""
    if keep is None:
        raise ShrinkError(f"cannot shrink {old}: no affine weight to read the kept features from")
    index = keep.nonzero().flatten()
    if isinstance(old, NarrowLayerNorm):
        width, eps, index = old.width, old.eps, old.keep[index.to(old.keep.device)]
    else:
        width, eps = old.normalized_shape[0], old.eps
    return NarrowLayerNorm(
        width,
        index.to(tensors["weight"].device),
        tensors["weight"].detach(),
        None if tensors.get("bias") is None else tensors["bias"].detach(),
        eps,
    ).train(old.training)


def _head_attention(
    old: nn.MultiheadAttention, tensors: dict[str, Tensor], kept: Tensor
) -> HeadAttention:
    """``old`` with the heads ``kept`` left (its q/k/v rows already sliced in ``tensors``)."""
    if not old._qkv_same_embed_dim or old.bias_k is not None or old.add_zero_attn:
        raise ShrinkError(f"cannot shrink {old}: separate q/k/v widths, bias_k or add_zero_attn")
    w = tensors.get("in_proj_weight", old.in_proj_weight).detach()
    b = old.in_proj_bias
    b = None if b is None else tensors.get("in_proj_bias", b).detach()
    new = HeadAttention(w, b, old.out_proj, old.head_dim, kept.to(w.device), old.num_heads,
                        old.batch_first, old.dropout)  # fmt: skip
    new.in_proj_weight.requires_grad_(old.in_proj_weight.requires_grad)
    return new.train(old.training)


def _is_closed(plan: GroupPlan, closed: Tensor, channel: int) -> bool:
    u = plan.unit_of.get(plan.graph.find(channel))
    return u is not None and bool(closed[u])
