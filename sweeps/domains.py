"""Search domains of the sweep spec: a field typed ``Searchable[...]`` takes a fixed value or one
domain, written as a one-key mapping (``{grid: [...]}``, ``{choice: [...]}``,
``{uniform: [low, high]}``, ``{loguniform: [low, high]}``, ``{randint: [low, high]}``), each
validated against the field's own type so errors carry the field path.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, model_validator

__all__ = [
    "DOMAIN_KINDS",
    "Choice",
    "Fraction",
    "Grid",
    "LogUniform",
    "RandInt",
    "SearchInt",
    "Uniform",
    "lone_surrogate",
]


T = TypeVar("T")
DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Strict(BaseModel):
    # No NaN or infinity anywhere in a spec: JSON's `NaN`, `Infinity` and 1e400 parse to them, and
    # a lower bound alone (lr > 0, lam >= 0) lets infinity through.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Grid(_Strict, Generic[T]):
    """Every value, each in its own trial (a grid dimension)."""

    grid: list[T] = Field(min_length=1)


class Choice(_Strict, Generic[T]):
    """One value drawn uniformly per sample."""

    choice: list[T] = Field(min_length=1)


class _Range(_Strict, Generic[T]):
    def _bounds(self) -> tuple[Any, Any]:
        return getattr(self, self._kind)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _ordered(self) -> _Range[T]:
        low, high = self._bounds()
        if low is None or high is None:  # a nullable field's type lets None into its bounds
            raise ValueError(f"{self._kind}: both bounds must be numbers, got [{low}, {high}]")  # type: ignore[attr-defined]
        if not low < high:
            raise ValueError(f"{self._kind}: low must be below high, got [{low}, {high}]")  # type: ignore[attr-defined]
        return self


class Uniform(_Range[T], Generic[T]):
    _kind = "uniform"
    uniform: tuple[T, T]


class LogUniform(_Range[T], Generic[T]):
    _kind = "loguniform"
    loguniform: tuple[T, T]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform[T]:
        low = self.loguniform[0]
        if low is not None and low <= 0:  # type: ignore[operator]
            raise ValueError(f"loguniform: low must be > 0, got {low}")
        return self


class RandInt(_Range[T], Generic[T]):
    _kind = "randint"
    randint: tuple[T, T]


def _domain_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = list(value)
        return keys[0] if len(keys) == 1 and keys[0] in DOMAIN_KINDS else None
    if isinstance(value, BaseModel) and type(value).__name__.startswith(
        ("Grid", "Choice", "Uniform", "LogUniform", "RandInt")
    ):
        return next(iter(type(value).model_fields))
    return "value"


def _searchable(tp: Any, ranges: tuple[type, ...] = ()) -> Any:
    members = [
        Annotated[tp, Tag("value")],
        Annotated[Grid[tp], Tag("grid")],
        Annotated[Choice[tp], Tag("choice")],
    ] + [Annotated[r[tp], Tag(r.model_fields.__iter__().__next__())] for r in ranges]
    return Annotated[
        Union[tuple(members)],  # noqa: UP007 (a runtime-built union)
        Discriminator(
            _domain_tag,
            custom_error_type="search_domain",
            custom_error_message="expected a value or one of {grid, choice, uniform, loguniform, randint}",
        ),
    ]


SearchInt = _searchable(PositiveInt, (RandInt,))
Fraction = Annotated[float, Field(gt=0, lt=1)]


def _is_domain(value: Any) -> bool:
    return _domain_tag(value) not in (None, "value")


def _domain_values(value: Any) -> list[Any] | None:
    """The finite values of a grid/choice domain; None for ranges."""
    tag = _domain_tag(value)
    return getattr(value, tag) if tag in ("grid", "choice") else None


def _possible(value: Any) -> list[Any] | None:
    """The values a field can take: itself, a grid's or choice's values; None for ranges."""
    return _domain_values(value) if _is_domain(value) else [value]


def lone_surrogate(node: Any, path: str = "") -> str | None:
    """Where in ``node`` a string or key first fails to encode as UTF-8 ("tags.key", say)."""
    if isinstance(node, str):
        try:
            node.encode()
        except UnicodeEncodeError:
            return f"the text at {path or 'the top level'}"
        return None
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        where = f"{path}.{shown}" if path else str(shown)
        if isinstance(key, str) and lone_surrogate(key) is not None:
            return f"the key {where}"
        found = lone_surrogate(value, where)
        if found is not None:
            return found
    return None
