"""The API's in-memory view of the sweeps, refreshed from MLflow in the background.

MLflow searches take tens of milliseconds and the API must answer reads in a few, so reads are
served from here; `refresh` (every ``refresh_interval_s``) re-reads the listing and the trials of
active sweeps, and the control plane writes its own changes through at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from service.errors import BackendUnavailable, NotFound
from service.record import SweepRecord, SweepStore, finite
from service.schemas import ACTIVE, Progress

__all__ = ["SweepCache", "SweepView", "best_trial", "summarize_progress"]


@dataclass(frozen=True, eq=False)
class SweepView:
    """A sweep record with its trials, as the API shows it (immutable, hashed by identity)."""

    record: SweepRecord
    trials: list[dict[str, Any]] = field(default_factory=list)
    trials_fetched: bool = False

    @property
    def progress(self) -> Progress:
        return summarize_progress(self.trials, self.record.num_trials)

    @property
    def best(self) -> dict[str, Any] | None:
        return best_trial(self.trials, self.record.objectives)


class SweepCache:
    """The latest view of every sweep, refreshed from MLflow by `refresh`.

    Reads never touch MLflow. Trials are re-read for active sweeps only; a terminal sweep's
    trials are read once more after it ends, then kept.
    """

    def __init__(self, store: SweepStore) -> None:
        self.store = store
        self._views: dict[str, SweepView] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()
        # Bumped on every change, so that renderings of the listing can be reused until then.
        self.generation = 0
        self.last_error: BackendUnavailable | None = None
        self.refreshed_at: float | None = None
        # Changes written through while a refresh reads MLflow must survive its swap.
        self._touched: dict[str, float] = {}

    def refresh(self) -> None:
        """Re-read the listing and the trials of active sweeps; keeps the old view on failure."""
        started = time.monotonic()
        try:
            records = self.store.list()
            fresh: dict[str, SweepView] = {}
            for record in records:
                old = self.get(record.id)
                needs_trials = (
                    old is None
                    or not old.trials_fetched
                    or record.status in ACTIVE
                    or old.record.status != record.status
                )
                if needs_trials:
                    fresh[record.id] = SweepView(record, self._trials(record.id), True)
                else:
                    fresh[record.id] = replace(old, record=record)
        except BackendUnavailable as exc:
            self.last_error = exc
            raise
        with self._lock:
            order = [r.id for r in records]
            for sweep_id, when in self._touched.items():
                if when < started:
                    continue
                if sweep_id in self._views:  # put during the refresh
                    if sweep_id not in fresh:
                        order.insert(0, sweep_id)
                    fresh[sweep_id] = self._views[sweep_id]
                else:  # dropped during the refresh
                    fresh.pop(sweep_id, None)
                    order = [i for i in order if i != sweep_id]
            self._touched = {k: t for k, t in self._touched.items() if t >= started}
            self._views = fresh
            self._order = order
            self.generation += 1
        self.last_error = None
        self.refreshed_at = time.monotonic()

    def _trials(self, sweep_id: str) -> list[dict[str, Any]]:
        try:
            return self.store.trials(sweep_id)
        except NotFound:
            return []

    def get(self, sweep_id: str) -> SweepView | None:
        with self._lock:
            return self._views.get(sweep_id)

    def all(self) -> list[SweepView]:
        with self._lock:
            return [self._views[i] for i in self._order if i in self._views]

    def put(self, record: SweepRecord, trials: list[dict[str, Any]] | None = None) -> SweepView:
        """Write-through after a change made by this process, so readers see it at once."""
        with self._lock:
            old = self._views.get(record.id)
            kept = trials if trials is not None else (old.trials if old else [])
            view = SweepView(
                record, kept, trials is not None or (old is not None and old.trials_fetched)
            )
            if record.id not in self._views:
                self._order.insert(0, record.id)
            self._views[record.id] = view
            self._touched[record.id] = time.monotonic()
            self.generation += 1
            return view

    def drop(self, sweep_id: str) -> None:
        with self._lock:
            self._views.pop(sweep_id, None)
            self._order = [i for i in self._order if i != sweep_id]
            self._touched[sweep_id] = time.monotonic()
            self.generation += 1

    def active_count(self) -> int:
        with self._lock:
            return sum(1 for v in self._views.values() if v.record.status in ACTIVE)


def summarize_progress(trials: list[dict[str, Any]], num_trials: int) -> Progress:
    """Count trials by state; trials not yet created count as pending."""
    counts = {"pending": 0, "running": 0, "finished": 0, "failed": 0, "stopped": 0}
    for trial in trials:
        counts[_TRIAL_STATE.get(str(trial.get("status", "")).upper(), "pending")] += 1
    total = max(num_trials, len(trials))
    counts["pending"] += total - len(trials)
    return Progress(total=total, **counts)


def best_trial(trials: list[dict[str, Any]], objectives: list[dict[str, Any]]) -> dict | None:
    """The trial best on the first objective so far, with its objective metrics."""
    if not objectives:
        return None
    metric, mode = objectives[0]["metric"], objectives[0].get("mode", "max")
    scored = [t for t in trials if finite(t.get("metrics", {}).get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda t: t["metrics"][metric])
    names = [o["metric"] for o in objectives]
    return {
        "trial_id": best.get("trial_id"),
        "run_id": best.get("run_id"),
        "metrics": {n: best["metrics"].get(n) for n in names if n in best["metrics"]},
    }


_TRIAL_STATE = {
    "PENDING": "pending",
    "SCHEDULED": "pending",
    "RUNNING": "running",
    "FINISHED": "finished",
    "TERMINATED": "finished",
    "FAILED": "failed",
    "ERROR": "failed",
    "KILLED": "stopped",
    "STOPPED": "stopped",
}
