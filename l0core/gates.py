"""Where each gate lives and how it is applied: the plan of a wrapped module.

Gates are grouped per selected parameter (a *site*). A site's gates are applied one of two ways:

* ``"weight"``: one or more tensors are multiplied by the gates (broadcast for structured gates)
  and the products are swapped in for one forward. Works for any module and any parameter. For
  output gates of a layer this masks the weight's rows *and* the bias, so a closed unit is exactly
  zero; when an affine BatchNorm follows the layer in an ``nn.Sequential``, its ``weight`` and
  ``bias`` are masked instead: BatchNorm is scale-invariant in training, so gating before it
  would be undone, while gating its affine output is exact and costs ``O(channels)``.
* ``"activation"``: the gates multiply a Linear layer's output units or input features (a forward
  hook), which equals gating the weight's rows or columns but costs ``O(batch * units)`` instead of
  ``O(weights)``; and any layer's units when ``per_sample=True`` (one gate set per example).

All sites of one kind share one flat tensor of logits, so sampling is one vectorised pass.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .groups import GROUP_GRANULARITIES, Group, GroupPlan, try_plan_groups
from .selection import TargetParam

__all__ = [
    "GRANULARITIES",
    "GateSite",
    "Masked",
    "init_logits",
    "plan_sites",
    "resolve_droprates",
]

GRANULARITIES = ("weight", "output", "input")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Masked:
    """A tensor ``module.<attr>`` multiplied by a site's gates, viewed as ``view_shape``."""

    name: str
    module: nn.Module
    attr: str
    aliases: tuple[tuple[nn.Module, str], ...]
    view_shape: tuple[int, ...]

    @property
    def param(self) -> torch.Tensor:
        return self.module._parameters[self.attr]

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """Dimensions along which one gate covers several elements."""
        shape = self.param.shape
        return tuple(d for d, n in enumerate(self.view_shape) if n == 1 and shape[d] != 1)


@dataclass
class GateSite:
    """One gated parameter and how its gates act.

    Attributes:
        name: the parameter's qualified name.
        target: the parameter and its owner(s).
        granularity: ``"weight"``, ``"output"`` or ``"input"``.
        applied: ``"weight"`` (mask tensors) or ``"activation"`` (scale a layer's units).
        offset: first index of this site's gates in its flat logit tensor.
        n_gates: number of gates.
        group_size: elements of the parameter controlled by one gate.
        masked: for ``"weight"``: the tensors multiplied by the gates.
        hook_module: for ``"activation"``: the module whose output (or input) is scaled.
        hook_name: its qualified name.
        unit_dim: the activation dimension that indexes units (1 for conv/BN, -1 for Linear).
    """

    name: str
    target: TargetParam
    granularity: str
    applied: str
    offset: int
    n_gates: int
    group_size: int
    masked: list[Masked] = field(default_factory=list)
    hook_module: nn.Module | None = None
    hook_name: str = ""
    unit_dim: int = -1
    group: Group | None = None
    plan: GroupPlan | None = None

    @property
    def numel(self) -> int:
        if self.group is not None:
            return self.n_gates * self.group_size
        return self.target.param.numel()

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.n_gates)


def _following_bn(model: nn.Module, layer: nn.Module, units: int) -> tuple[nn.Module | None, str]:
    """The affine BatchNorm right after ``layer`` in an ``nn.Sequential``, if any."""
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, child), (nxt_name, nxt) in itertools.pairwise(children):
            is_bn = isinstance(nxt, _BN) and nxt.affine and nxt.num_features == units
            if child is layer and is_bn:
                return nxt, f"{parent_name}.{nxt_name}" if parent_name else nxt_name
    return None, ""


def _unit_view(tensor: torch.Tensor, dim: int) -> tuple[int, ...]:
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    return tuple(shape)


def _masked(name: str, module: nn.Module, attr: str, dim: int | None) -> Masked:
    t = module._parameters[attr]
    view = tuple(t.shape) if dim is None else _unit_view(t, dim)
    return Masked(name, module, attr, (), view)


def _plan_structured(
    t: TargetParam, granularity: str, per_sample: bool, model: nn.Module, names: dict[int, str]
) -> GateSite:
    """Choose how the structured gates of one parameter are applied (see the module doc)."""
    p, mod = t.param, t.module
    dim = 0 if granularity == "output" else 1
    if isinstance(mod, _CONVT) and t.attr == "weight":  # (in, out / groups, *kernel)
        dim = 1 - dim
    n = p.shape[dim]
    site = GateSite(t.name, t, granularity, "weight", 0, n, p.numel() // n)
    layer = isinstance(mod, (nn.Linear, *_CONV)) and t.attr == "weight" and not t.aliases
    if not layer:  # any other parameter: mask its rows / columns
        what = "rows (dim 0)" if dim == 0 else "columns (dim 1)"
        warnings.warn(
            f"l0core: {type(mod).__name__} ({t.name}) is not a layer type the gate planner "
            f"knows; its {granularity!r} gates mask the {what} of the parameter on the weight "
            "(exact; export does not shrink it)",
            UserWarning,
            stacklevel=4,
        )
        site.masked = [Masked(t.name, mod, t.attr, t.aliases, _unit_view(p, dim))]
        return site
    prefix = names[id(mod)]
    bn, bn_name = _following_bn(model, mod, n) if granularity == "output" else (None, "")
    unit_dim = 1 if isinstance(mod, _CONV) else -1
    grouped_input = granularity == "input" and isinstance(mod, _CONV) and mod.groups != 1
    if (per_sample and not grouped_input) or (isinstance(mod, nn.Linear) and bn is None):
        site.applied, site.unit_dim = "activation", unit_dim
        site.hook_module, site.hook_name = (bn, bn_name) if bn is not None else (mod, prefix)
    elif bn is not None:
        site.masked = [_masked(f"{bn_name}.{a}", bn, a, 0) for a in ("weight", "bias")]
    else:
        site.masked = [_masked(t.name, mod, "weight", dim)]
        if granularity == "output" and mod.bias is not None:
            site.masked.append(_masked(f"{prefix}.bias", mod, "bias", 0))
    return site


def _chain_output_layer(model: nn.Module) -> nn.Module | None:
    """The Linear or ConvNd of an ``nn.Sequential`` chain whose units are the model's outputs:
    the last layer with parameters (a BatchNorm after it aside), when it is one."""
    if not isinstance(model, nn.Sequential):
        return None
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    owners = [m for m in leaves if next(m.parameters(recurse=False), None) is not None]
    while owners and isinstance(owners[-1], _BN):
        owners.pop()
    return owners[-1] if owners and isinstance(owners[-1], (nn.Linear, *_CONV)) else None


def _uses_groups(model: nn.Module, granularity: object, per_sample: bool) -> bool | None:
    """``True``: gates by data flow (required); ``None``: by data flow if the model traces;
    ``False``: per layer (a chain of built-in layers, weight/input gates, per-sample gates)."""
    if not isinstance(granularity, str) or granularity == "head":
        if per_sample:
            raise ValueError(f"per_sample=True does not combine with granularity {granularity!r}")
        return True
    if granularity != "output" or per_sample:
        return False

    def builtin(m: nn.Module) -> bool:
        return type(m).__module__.startswith("torch.nn")

    def chain_layer(m: nn.Module) -> bool:  # what the per-layer plan gates exactly
        return (
            builtin(m)
            and getattr(m, "groups", 1) == 1
            and not isinstance(m, (*_CONVT, nn.GroupNorm, nn.LayerNorm))
        )

    if isinstance(model, nn.Sequential):
        return False if all(chain_layer(m) for m in model.children()) else None
    return False if builtin(model) else None


def _check_granularity(granularity: object) -> None:
    if isinstance(granularity, Mapping):
        for name, g in granularity.items():
            if g not in (*GRANULARITIES, "head"):
                raise ValueError(
                    f"granularity {g!r} of {name!r} is not one of {(*GRANULARITIES, 'head')}"
                )
    elif isinstance(granularity, str):
        if granularity not in (*GRANULARITIES, "head"):
            raise ValueError(
                f"granularity must be one of {(*GRANULARITIES, 'head')} or a list of "
                f"{GROUP_GRANULARITIES}, got {granularity!r}"
            )
    elif not isinstance(granularity, (list, tuple)):
        raise ValueError(
            f"granularity must be one of {(*GRANULARITIES, 'head')} or a list of "
            f"{GROUP_GRANULARITIES}, got {granularity!r}"
        )


def _group_sites(plan: GroupPlan, targets: list[TargetParam]) -> list[GateSite]:
    by_id = {id(t.param): t for t in targets}
    sites = []
    for g in plan.groups:
        param = next(
            (by_id[id(p)] for name in g.members
             for p in [_member_param(plan, name)] if p is not None and id(p) in by_id),
            targets[0],
        )  # fmt: skip
        granularity = "head" if g.kind == "heads" else "output"
        site = GateSite(g.name, param, granularity, "group", g.offset, len(g.roots), g.owned)
        site.group, site.plan = g, plan
        sites.append(site)
    return sites


def _member_param(plan: GroupPlan, member: str) -> torch.Tensor | None:
    path = member.partition("[")[0]
    mod_name, _, attr = path.rpartition(".")
    return plan.model.get_submodule(mod_name)._parameters.get(attr)


def plan_sites(
    model: nn.Module, targets: list[TargetParam],
    granularity: str | list[str] | Mapping[str, str], per_sample: bool = False,
    example: tuple[tuple, dict] | None = None,
) -> tuple[list[GateSite], list[GateSite], dict[str, str]]:  # fmt: skip
    """Decide, for each selected parameter, its gates and how they are applied.

    Structured ``"output"`` gates (and ``"head"``, or a list of both) follow the model's data
    flow (``l0core.groups``): one gate per coupled unit, applied where the unit is created. A
    chain of built-in layers (an ``nn.Sequential``) keeps per-layer gates, which are exact there.
    ``granularity`` may also map each target's name to its own granularity (per module, see
    ``l0core.selection.select_granularities``): a unit is gated when the layers that create it
    chose its kind. ``example``: ``(args, kwargs)`` of one forward, recorded where fx cannot
    trace the model (``l0core.record``). Units that are the model's outputs get no structured
    gate, in a chain as in a graph: removing one would change what the model returns.

    Returns:
        ``(weight_sites, activation_sites, ungated)``: the sites, each kind with offsets into its
        own flat logit tensor, coupled groups first among the activation sites (``applied ==
        "group"``); ``ungated``: selected parameters whose units got no structured gate, and why.

    Raises:
        ValueError: unknown granularity, or two sites that would mask the same tensor.
    """
    _check_granularity(granularity)
    choices = dict(granularity) if isinstance(granularity, Mapping) else None
    group_targets = targets
    if choices is not None:  # per module (include={pattern: granularity})
        if per_sample:
            raise ValueError("per_sample=True does not combine with per-module granularities")
        group_targets = [t for t in targets if choices[t.name] in GROUP_GRANULARITIES]
        kinds = sorted({choices[t.name] for t in group_targets})
        mode = (True if "head" in kinds else None) if kinds else False
        allowed = {id(p): {choices[n]} for n, p in model.named_parameters() if n in choices}
        group_granularity: str | list[str] = kinds
    else:
        mode = _uses_groups(model, granularity, per_sample)
        allowed, group_granularity = None, granularity
    plan = None
    if mode is not False:
        plan = try_plan_groups(
            model, group_targets, group_granularity, bool(mode), allowed, example
        )
    group_sites: list[GateSite] = []
    layered = targets  # gated per layer
    if plan is not None:
        group_sites = _group_sites(plan, group_targets)
        unknown = set(plan.graph.unknown_modules)

        def inside(t: TargetParam) -> str | None:
            return next((u for u in unknown if t.name.startswith(f"{u}.")), None)

        hidden = plan.graph.hidden_reads  # read through F.linear & co: gated on their own
        rest = [t for t in group_targets
                if inside(t) is not None or t.name.rpartition(".")[0] in hidden]  # fmt: skip
        for name in sorted({inside(t) for t in rest} - {None}):
            warnings.warn(
                f"{name} ({plan.graph.unknown_modules[name]}) is not a module the graph walk "
                "knows: its parameters are gated on their own (weight masks, exact)",
                stacklevel=3,
            )
        grouped = {id(t.param) for t in group_targets}
        layered = rest + [t for t in targets if id(t.param) not in grouped]

    def layer_granularity(t: TargetParam) -> str:
        g = choices[t.name] if choices is not None else granularity
        if plan is not None and (not isinstance(g, str) or g == "head"):
            return "output"  # a structured gate that the graph walk cannot place
        return g if isinstance(g, str) else "output"

    names = {id(m): n for n, m in model.named_modules()}
    last = _chain_output_layer(model) if plan is None else None
    ungated = dict(plan.not_gated) if plan is not None else {}
    sites = []
    for t in layered:
        g = layer_granularity(t)
        if g == "output" and t.module is last and t.param.dim() >= 2:
            ungated[t.name] = "its units are the model's outputs"
            continue
        if g == "weight" or t.param.dim() < 2:
            site = GateSite(t.name, t, "weight", "weight", 0, t.param.numel(), 1)
            site.masked = [Masked(t.name, t.module, t.attr, t.aliases, tuple(t.param.shape))]
            sites.append(site)
        else:
            sites.append(_plan_structured(t, g, per_sample, model, names))
    claimed: dict[int, str] = {}
    for m in plan.masks if plan is not None else []:
        claimed[id(m.module._parameters[m.attr])] = "a coupled group"
    for site in sites:
        for m in site.masked:
            if id(m.param) in claimed:
                raise ValueError(
                    f"{m.name} would be gated twice (by {claimed[id(m.param)]} and {site.name}); "
                    "exclude one of them"
                )
            claimed[id(m.param)] = site.name
    if not sites and not group_sites:
        some = "; ".join(
            f"{t.name}: {ungated.get(t.name, 'no unit of it is gated')}" for t in targets[:4]
        )
        raise ValueError(
            f"granularity {granularity!r} gates none of the {len(targets)} selected parameters "
            f"({some}{'; ...' if len(targets) > 4 else ''}): select others (include/exclude) "
            "or use granularity 'weight'"
        )
    weight_sites = [s for s in sites if s.applied == "weight"]
    act_sites = group_sites + [s for s in sites if s.applied == "activation"]
    for group in (weight_sites, act_sites):
        offset = 0
        for s in group:
            s.offset = offset
            offset += s.n_gates
    return weight_sites, act_sites, ungated


def resolve_droprates(
    sites: list[GateSite], droprate_init: float | Mapping[str, float]
) -> list[float]:
    """The initial drop rate of each site: one float, or the first matching ``{pattern: p}``."""

    def check(p: object, where: str) -> float:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"droprate_init{where} must be a number in (0, 1), got {p!r}")
        return float(p)

    if not isinstance(droprate_init, Mapping):
        return [check(droprate_init, "")] * len(sites)
    rates = {pat: check(p, f"[{pat!r}]") for pat, p in droprate_init.items()}
    for pat in rates:
        if not any(fnmatch.fnmatchcase(s.name, pat) for s in sites):
            raise ValueError(
                f"droprate_init pattern {pat!r} matches no gated parameter; gated parameters "
                f"are: {', '.join(s.name for s in sites)}"
            )
    out = []
    for s in sites:
        match = next((p for pat, p in rates.items() if fnmatch.fnmatchcase(s.name, pat)), None)
        if match is None:
            raise ValueError(
                f"droprate_init gives no rate for gated parameter {s.name!r}; add an entry for "
                "it or a '*' default"
            )
        out.append(match)
    return out


def magnitude_droprates(site: GateSite, droprate: float) -> torch.Tensor:
    """Per-gate drop rates from a (pretrained) weight's magnitude, mean ``droprate``.

    Gates are ranked by the norm of the weights they control; the strongest group starts at
    ``droprate / 1000`` (wide open), the weakest at ``2 * droprate``, linearly in rank in between,
    so fine-tuning a trained model starts with the important weights' gates open.
    """
    w = site.target.param.detach().float()
    if site.group is not None:
        score = site.plan.unit_sq_norms().detach()[site.slice].sqrt()
    elif site.granularity == "weight" or w.dim() < 2:
        score = w.abs().flatten()
    else:
        dims = [d for d in range(w.dim()) if d != (0 if site.granularity == "output" else 1)]
        score = w.pow(2).sum(dims).sqrt()
    rank = torch.empty_like(score)
    rank[score.argsort()] = torch.arange(score.numel(), dtype=score.dtype, device=score.device)
    q = (rank + 0.5) / score.numel()  # in (0, 1), 1 = strongest
    lo, hi = droprate / 1000, min(2 * droprate, 0.999)
    return hi - (hi - lo) * q


def init_logits(sites: list[GateSite], rates: list[float], init: str, total: int) -> torch.Tensor:
    """The initial flat logits: ``N(log(1 - p) - log(p), 0.01)`` as the authors do."""
    out = torch.empty(total)
    for s, p in zip(sites, rates, strict=True):
        if init == "random":
            out[s.slice].normal_(math.log(1 - p) - math.log(p), 1e-2)
        elif init == "magnitude":
            pr = magnitude_droprates(s, p)
            out[s.slice] = torch.log1p(-pr) - torch.log(pr)
        else:
            raise ValueError(f"init must be 'random' or 'magnitude', got {init!r}")
    return out
