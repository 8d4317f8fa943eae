"""Which parameters of a module a regularizer acts on.

A selector is ``None`` (the default rule), a glob pattern, a list of patterns, or a callable
``(name, parameter, module) -> bool``. Patterns match a parameter's qualified name
(``"features.0.weight"``) or the class name of the module that owns it (``"Conv2d"``), so
``exclude="Embedding"`` and ``exclude="*.bias"`` both work.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["Selector", "TargetParam", "iter_params", "select_params"]

Selector = str | Sequence[str] | Callable[[str, nn.Parameter, nn.Module], bool] | None


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
