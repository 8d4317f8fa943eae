"""Pareto fronts of trials: pure functions, no Ray or MLflow.

A trial is anything :class:`Scored`, with ``metrics`` (name -> float) and ``status``: a
:class:`~sweeps.records.TrialRecord`, or a point of the comparison across sweeps
(:class:`sweeps.results.Point`). The functions return the trials they were given. Only trials whose status is in
``statuses`` (default FINISHED) and whose objective values are all finite compete: a failed trial
has no final model, an early-stopped one was judged worse by the scheduler, and a NaN cannot be
ranked. Equal objective vectors do not dominate each other, so ties are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from .records import TrialRecord
from .vocabulary import TrialStatus

__all__ = [
    "Scored",
    "best_at_sparsity",
    "dominates",
    "eligible",
    "hypervolume",
    "pareto_front",
    "speed_candidates",
]

Objectives = Sequence[tuple[str, str]]  # (metric, "max" | "min")


class Scored(Protocol):
    """What the fronts read of a trial."""

    @property
    def metrics(self) -> Mapping[str, float | None]: ...

    @property
    def status(self) -> str: ...


T = TypeVar("T", bound=Scored)


def _pairs(objectives: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for o in objectives:
        if isinstance(o, tuple):
            out.append(o)
        elif isinstance(o, dict):
            out.append((o["metric"], o.get("mode", "max")))
        else:
            out.append((o.metric, o.mode))
    return out


def _vector(trial: Scored, objectives: Objectives) -> tuple[float, ...] | None:
    """Objective values signed so that larger is better; None if any is missing or not finite."""
    values = []
    for metric, mode in objectives:
        v = trial.metrics.get(metric)
        if v is None or not math.isfinite(float(v)):
            return None
        values.append(float(v) if mode == "max" else -float(v))
    return tuple(values)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (maximising)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def eligible(
    trials: Iterable[T],
    objectives: Iterable[Any],
    statuses: Sequence[str] = (TrialStatus.FINISHED,),
) -> list[tuple[T, tuple[float, ...]]]:
    """Trials that compete, with their signed objective vectors."""
    pairs = _pairs(objectives)
    out = []
    for t in trials:
        if t.status in statuses and (v := _vector(t, pairs)) is not None:
            out.append((t, v))
    return out


def pareto_front(
    trials: Iterable[T],
    objectives: Iterable[Any],
    statuses: Sequence[str] = (TrialStatus.FINISHED,),
) -> list[T]:
    """The non-dominated trials, best first objective first.

    Args:
        trials: :class:`Scored` trials (``metrics`` and ``status``).
        objectives: ``(metric, mode)`` pairs, ``{"metric", "mode"}`` dicts or spec Objectives.
        statuses: the trial statuses that compete.
    """
    candidates = eligible(trials, objectives, statuses)
    front = [(t, v) for t, v in candidates if not any(dominates(w, v) for _, w in candidates)]
    front.sort(key=lambda tv: tv[1], reverse=True)
    return [t for t, _ in front]


def hypervolume(
    trials: Iterable[Scored],
    objectives: Iterable[Any],
    reference: Sequence[float] | None = None,
) -> float:
    """Volume dominated by ``trials`` and bounded by ``reference`` (default: the origin).

    ``reference`` is in the metrics' own units; for a "min" objective it is the worst value
    accepted. Points not better than the reference in every objective add nothing.
    """
    pairs = _pairs(objectives)
    ref = [0.0] * len(pairs) if reference is None else list(reference)
    signed_ref = [r if mode == "max" else -r for r, (_, mode) in zip(ref, pairs, strict=True)]
    points = [v for t in trials if (v := _vector(t, pairs)) is not None]
    points = [p for p in points if all(x > r for x, r in zip(p, signed_ref, strict=True))]
    return _hv(points, signed_ref)


def _hv(points: list[tuple[float, ...]], ref: list[float]) -> float:
    """Exact hypervolume by slicing along the last objective (fine for fronts of tens)."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    levels = sorted({p[-1] for p in points}, reverse=True)
    volume = 0.0
    for i, level in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else ref[-1]
        slab = [p[:-1] for p in points if p[-1] >= level]
        volume += _hv(slab, ref[:-1]) * (level - below)
    return volume


def best_at_sparsity(
    trials: Iterable[T],
    min_sparsity: float,
    accuracy: str = "test_accuracy",
    sparsity: str = "sparsity",
    select_by: str = "val_accuracy",
    statuses: Sequence[str] = (TrialStatus.FINISHED,),
) -> T | None:
    """The trial with the best ``select_by`` among those at least ``min_sparsity`` sparse.

    Chosen on validation (``select_by``), so the ``accuracy`` it reports is an honest estimate.
    Returns None if no finished trial is sparse enough.
    """
    pool = [
        t
        for t, _ in eligible(trials, [(sparsity, "max"), (select_by, "max")], statuses)
        if t.metrics[sparsity] >= min_sparsity and accuracy in t.metrics
    ]
    return max(pool, key=lambda t: t.metrics[select_by], default=None)


def speed_candidates(
    trials: Iterable[TrialRecord],
    objectives: Iterable[Any],
    limit: int = 24,
    proxy: tuple[str, str] = ("throughput", "speedup_vs_dense"),
) -> list[TrialRecord]:
    """The finished trials whose models the driver times against the dense model.

    The union of three fronts: the spec's objectives (a ``speedup_vs_dense`` objective, which
    exists only once this comparison has run, stands in as the trial's own measured
    ``throughput``), validation accuracy against sparsity (the report's fronts), and validation
    accuracy against throughput. A chosen trial brings the other finished seeds of its
    configuration (a report row shows a measured speed only when all its seeds have one). At
    most ``limit`` trials, whole configurations in that order (the first one cut at the limit if
    it alone exceeds it), so the comparison's time stays bounded however large the sweep.
    """
    trials = list(trials)
    measured, derived = proxy
    own = [(measured if m == derived else m, mode) for m, mode in _pairs(objectives)]
    fronts = (
        pareto_front(trials, own),
        pareto_front(trials, [("val_accuracy", "max"), ("sparsity", "max")]),
        pareto_front(trials, [("val_accuracy", "max"), (measured, "max")]),
    )
    seeds: dict[str, list[TrialRecord]] = {}
    for t in trials:
        if t.status == TrialStatus.FINISHED:
            seeds.setdefault(t.configuration, []).append(t)
    configurations = dict.fromkeys(t.configuration for front in fronts for t in front)
    chosen: list[TrialRecord] = []
    for configuration in configurations:
        members = seeds[configuration]
        if chosen and len(chosen) + len(members) > limit:
            break
        chosen.extend(members)
    return chosen[:limit]
