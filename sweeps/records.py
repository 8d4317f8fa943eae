"""The typed records of a sweep and of a trial, as MLflow holds them.

A sweep is its parent run and a trial its child run (`sweeps.tracking`); what the driver, the
report, the warm start and the service read of them is one of these two records, built in one
place from an MLflow run (:func:`sweeps.tracking.trial_from_run`,
:func:`sweeps.tracking.sweep_from_run`) with the words of `sweeps.vocabulary`, never a dict read
by key. Standard library only, like the vocabulary, so that the service's light modules can use
them without torch or MLflow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .vocabulary import TERMINAL_SWEEP

__all__ = ["SEED_KEYS", "SweepRecord", "TrialRecord"]

SEED_KEYS = frozenset({"seed"})  # config keys that only tell the seeds of a configuration apart


@dataclass(frozen=True)
class TrialRecord:
    """A trial's child run: ids, config (its params), latest metrics, status and times.

    ``status`` is the trial's own (``l0sweep.trial_status``, a
    :class:`~sweeps.vocabulary.TrialStatus`), else its MLflow run's (``run_status``).
    """

    run_id: str
    trial_id: str | None = None
    name: str | None = None
    status: str = ""
    run_status: str = ""
    config: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    pareto: bool = False
    failure_reason: str | None = None
    architecture: str | None = None
    export_format: str | None = None
    model_uri: str | None = None
    start_time: int | None = None  # MLflow's milliseconds
    end_time: int | None = None
    experiment_id: str = ""

    @property
    def configuration(self) -> str:
        """The trial's config without its seed, as a key: the trials that share it are the
        seeds of one configuration (one row of a report, their metrics averaged)."""
        config = {k: v for k, v in self.config.items() if k not in SEED_KEYS}
        return json.dumps(config, sort_keys=True)

    @property
    def id(self) -> str:
        """The Tune trial id, else (a run made before it was tagged) the run id."""
        return self.trial_id or self.run_id or ""

    def json_safe(self) -> TrialRecord:
        """The same record with every metric JSON can carry (NaN and infinities as None)."""
        metrics = {k: (v if finite(v) else None) for k, v in self.metrics.items()}
        return replace(self, metrics=metrics)


@dataclass(frozen=True)
class SweepRecord:
    """What a sweep's parent run says about it (its tags are the truth)."""

    id: str
    name: str
    experiment_id: str
    status: str
    message: str | None
    created_at: datetime | None
    ended_at: datetime | None
    job_id: str | None
    job_attempt: int
    managed: bool
    cancel_requested: bool
    idempotency_key: str | None
    spec_sha256: str | None
    num_trials: int
    objectives: list[dict[str, Any]]
    duplicate_trials: int = 0
    last_heartbeat: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_SWEEP

    def silent_for(self, now: datetime) -> float:
        """Seconds since the driver's last sign of life: its heartbeat, else the run's start."""
        last = self.last_heartbeat or self.created_at
        return (now - last).total_seconds() if last is not None else math.inf


def finite(value: Any) -> bool:
    """A real number that JSON can carry (not NaN, not infinite)."""
    return isinstance(value, int | float) and math.isfinite(value)
