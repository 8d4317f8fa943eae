"""Which parameters of a module a regularizer acts on.

A selector is ``None`` (the default rule), a glob pattern, a list of patterns, or a callable
``(name, parameter, module) -> bool``. Patterns match a parameter's qualified name
(``"features.0.weight"``) or the class name of the module that owns it (``"Conv2d"``), so
``exclude="Embedding"`` and ``exclude="*.bias"`` both work.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "PER_MODULE_GRANULARITIES",
    "Selector",
    "TargetParam",
    "iter_params",
    "select_granularities",
    "select_params",
]

Selector = (
    str | Sequence[str] | Mapping[str, str] | Callable[[str, nn.Parameter, nn.Module], bool] | None
)
PER_MODULE_GRANULARITIES = ("weight", "output", "input", "head")


@dataclass(frozen=True)
class TargetParam:
    """A parameter and where it lives: ``module.<attr>`` is the parameter, ``aliases`` lists
    every other ``(module, attr)`` that holds the same tensor (tied weights)."""

    name: str
    param: nn.Parameter
    module: nn.Module
    attr: str
    aliases: tuple[tuple[nn.Module, str], ...]

    @property
    def live(self) -> nn.Parameter:
        """The parameter the owner holds now: ``load_state_dict(..., assign=True)`` and plain
        attribute assignment replace the object that ``param`` recorded at selection time."""
        return self.module._parameters[self.attr]


def iter_params(model: nn.Module) -> Iterator[TargetParam]:
    """Every distinct parameter of ``model`` once, with its owner and its tied aliases."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    order: list[nn.Parameter] = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is None:
                continue
            if id(p) not in holders:
                holders[id(p)] = []
                order.append(p)
            full = f"{mod_name}.{attr}" if mod_name else attr
            if all(m is not mod or a != attr for _, m, a in holders[id(p)]):
                holders[id(p)].append((full, mod, attr))
    for p in order:
        (name, mod, attr), *rest = holders[id(p)]
        yield TargetParam(name, p, mod, attr, tuple((m, a) for _, m, a in rest))


def _as_predicate(selector: Selector, what: str) -> Callable[[TargetParam], bool] | None:
    if selector is None:
        return None
    if callable(selector):
        return lambda t: bool(selector(t.name, t.param, t.module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"{what} patterns must be non-empty strings, got {pat!r}")
    return lambda t: any(
        fnmatch.fnmatchcase(t.name, pat) or fnmatch.fnmatchcase(type(t.module).__name__, pat)
        for pat in patterns
    )


def _check_all_patterns_match(selector: Selector, targets: list[TargetParam], what: str) -> None:
    if selector is None or callable(selector):
        return
    patterns = [selector] if isinstance(selector, str) else list(selector)
    for pat in patterns:
        pred = _as_predicate(pat, what)
        if not any(pred(t) for t in targets):
            names = ", ".join(t.name for t in targets[:12])
            raise ValueError(
                f"{what} pattern {pat!r} matches no parameter name or module type; "
                f"parameters are: {names}{', ...' if len(targets) > 12 else ''}"
            )


def select_params(
    model: nn.Module,
    include: Selector = None,
    exclude: Selector = None,
    default: Callable[[TargetParam], bool] = lambda t: t.param.dim() >= 2,
) -> list[TargetParam]:
    """The parameters to regularize: ``include`` (or ``default``) minus ``exclude``.

    Raises:
        ValueError: a pattern matches no parameter, or nothing is left to regularize.
        TypeError: a selector of the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    targets = list(iter_params(model))
    _check_all_patterns_match(include, targets, "include")
    _check_all_patterns_match(exclude, targets, "exclude")
    inc = _as_predicate(include, "include") or default
    exc = _as_predicate(exclude, "exclude")
    chosen = [t for t in targets if inc(t) and not (exc and exc(t))]
    if not chosen:
        raise ValueError(
            f"nothing to regularize in {type(model).__name__}: no parameter is selected "
            f"(include={include!r}, exclude={exclude!r}; by default every parameter with 2 or "
            "more dimensions is selected)"
        )
    return chosen


def _matches_module(t: TargetParam, pattern: str) -> bool:
    """``pattern`` names the parameter, its module's type, or the module or one of its parents
    (``"blocks.*.attn"`` matches ``blocks.0.attn.qkv.weight``)."""
    if fnmatch.fnmatchcase(t.name, pattern) or fnmatch.fnmatchcase(
        type(t.module).__name__, pattern
    ):
        return True
    parts = t.name.split(".")[:-1]
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def select_granularities(
    model: nn.Module, include: Mapping[str, str], exclude: Selector = None
) -> tuple[list[TargetParam], dict[str, str]]:
    """Per-module granularities: ``include={pattern: granularity}``.

    A pattern names modules (a glob on their qualified names; a parameter belongs to its module
    and every parent), parameter names or module types; each parameter of two or more
    dimensions it matches gets that granularity (the first matching pattern wins; biases follow
    their layer's structured gates). E.g. ``{"blocks.*.attn": "head", "blocks.*.mlp.fc1":
    "output"}`` gates the heads and the MLP's hidden units.

    Returns:
        The selected parameters and, per matched parameter name (one-dimensional ones too: a
        LayerNorm's affine entries create its output units), its granularity.

    Raises:
        ValueError: a granularity not in :data:`PER_MODULE_GRANULARITIES`, a pattern that
            matches no parameter, or nothing left to regularize.
    """
    if not include:
        raise ValueError("include={pattern: granularity} is empty; give at least one pattern")
    targets = list(iter_params(model))
    for pat, gran in include.items():
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"include patterns must be non-empty strings, got {pat!r}")
        if gran not in PER_MODULE_GRANULARITIES:
            raise ValueError(
                f"include[{pat!r}] = {gran!r} is not a granularity; allowed: "
                f"{PER_MODULE_GRANULARITIES}"
            )
        if not any(_matches_module(t, pat) for t in targets):
            names = sorted({t.name.rpartition(".")[0] for t in targets} - {""})
            raise ValueError(
                f"include pattern {pat!r} matches no module, parameter or module type; modules "
                f"with parameters are: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
            )
    _check_all_patterns_match(exclude, targets, "exclude")
    exc = _as_predicate(exclude, "exclude")
    chosen, granularity = [], {}
    for t in targets:
        gran = next((g for pat, g in include.items() if _matches_module(t, pat)), None)
        if gran is None or (exc and exc(t)):
            continue
        granularity[t.name] = gran  # a norm's entries too: it may create units (LayerNorm)
        if t.param.dim() >= 2:
            chosen.append(t)
    if not chosen:
        raise ValueError(
            f"nothing to regularize in {type(model).__name__}: include={dict(include)!r} matches "
            "no parameter of 2 or more dimensions"
        )
    return chosen, granularity
