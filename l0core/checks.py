"""The argument checks the sparsity methods share: each error names the bad value and what is
allowed."""

from __future__ import annotations

import math

__all__ = ["check_fraction", "check_int", "check_number"]


def check_number(name: str, value: object, low: float, *, open_low: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= low`` (``> low`` with ``open_low``).

    Raises:
        ValueError: anything else (a bool, NaN, infinity, a number below ``low``).
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (open_low and value == low):
        rel = ">" if open_low else ">="
        raise ValueError(f"{name} must be a finite number {rel} {low}, got {value!r}")
    return float(value)


def check_int(name: str, value: object, low: int) -> int:
    """``value`` if it is an integer ``>= low`` (not a bool).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float if it is a number in the open interval (0, 1).

    Raises:
        ValueError: anything else.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)
