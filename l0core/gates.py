"""Where each gate lives and how it is applied: the plan of a wrapped module.

Gates are grouped per parameter (a *site*). A site's gates are applied one of two ways:

* ``"weight"``: the parameter is multiplied by its gates (broadcast for structured gates) and the
  product is swapped in for the forward. Works for any module and any parameter.
* ``"output"`` / ``"input"``: the gates multiply the activations of a Linear or ConvNd layer
  (its output units, or its input features), which is exactly equivalent to gating the weight's
  rows or columns (and the bias with the rows) but costs ``O(batch * units)`` instead of
  ``O(weights)``, and makes independent gates per example cheap. For a ConvNd followed by an
  affine BatchNorm in an ``nn.Sequential``, output gates are applied after the BatchNorm, so a
  closed channel is exactly zero downstream and can be removed on export.

All sites of one kind share one flat tensor of logits, so sampling is one vectorised pass.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .selection import TargetParam

__all__ = ["GRANULARITIES", "GateSite", "init_logits", "plan_sites", "resolve_droprates"]

GRANULARITIES = ("weight", "output", "input")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class GateSite:
    """One gated parameter.

    Attributes:
        name: the parameter's qualified name.
        target: the parameter and its owner(s).
        granularity: ``"weight"``, ``"output"`` or ``"input"``.
        applied: ``"weight"`` (mask the tensor) or ``"activation"`` (scale the layer's units).
        offset: first index of this site's gates in its flat logit tensor.
        n_gates: number of gates.
        group_size: parameters controlled by one gate.
        view_shape: shape that broadcasts the gates against the parameter.
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
    view_shape: tuple[int, ...]
    hook_module: nn.Module | None = None
    hook_name: str = ""
    unit_dim: int = -1

    @property
    def numel(self) -> int:
        return self.target.param.numel()

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.n_gates)


def _following_bn(model: nn.Module, layer: nn.Module, out_units: int) -> tuple[nn.Module, str]:
    """The affine BatchNorm right after ``layer`` in an ``nn.Sequential``, if any."""
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (_, child) in enumerate(children[:-1]):
            nxt_name, nxt = children[i + 1]
            is_bn = isinstance(nxt, _BN) and nxt.affine and nxt.num_features == out_units
            if child is layer and is_bn:
                return nxt, f"{parent_name}.{nxt_name}" if parent_name else nxt_name
    return None, ""


def _structured_shape(param: torch.Tensor, dim: int) -> tuple[int, ...]:
    shape = [1] * param.dim()
    shape[dim] = param.shape[dim]
    return tuple(shape)


def plan_sites(
    model: nn.Module, targets: list[TargetParam], granularity: str
) -> tuple[list[GateSite], list[GateSite]]:
    """Decide, for each selected parameter, its gates and how they are applied.

    Returns:
        ``(weight_sites, activation_sites)``, each with offsets into its own flat logit tensor.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    names = {id(m): n for n, m in model.named_modules()}
    weight_sites: list[GateSite] = []
    act_sites: list[GateSite] = []
    for t in targets:
        p = t.param
        if granularity == "weight" or p.dim() < 2:
            weight_sites.append(
                GateSite(t.name, t, "weight", "weight", 0, p.numel(), 1, tuple(p.shape))
            )
            continue
        dim = 0 if granularity == "output" else 1
        n = p.shape[dim]
        is_layer_weight = isinstance(t.module, (nn.Linear, *_CONV)) and t.attr == "weight"
        grouped = isinstance(t.module, _CONV) and t.module.groups != 1
        if is_layer_weight and not t.aliases and not (granularity == "input" and grouped):
            hook, hook_name = t.module, names[id(t.module)]
            unit_dim = 1 if isinstance(t.module, _CONV) else -1
            if granularity == "output" and isinstance(t.module, _CONV):
                bn, bn_name = _following_bn(model, t.module, n)
                if bn is not None:
                    hook, hook_name = bn, bn_name
            act_sites.append(
                GateSite(
                    t.name, t, granularity, "activation", 0, n, p.numel() // n,
                    _structured_shape(p, dim), hook, hook_name, unit_dim,
                )
            )  # fmt: skip
        else:
            weight_sites.append(
                GateSite(
                    t.name, t, granularity, "weight", 0, n, p.numel() // n,
                    _structured_shape(p, dim),
                )
            )  # fmt: skip
    for sites in (weight_sites, act_sites):
        offset = 0
        for s in sites:
            s.offset = offset
            offset += s.n_gates
    return weight_sites, act_sites


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
    if site.granularity == "weight" or w.dim() < 2:
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
