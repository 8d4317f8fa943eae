"""In-memory fakes for the fast tier (``pytest -m fast``): a clock, and the protocols the control
plane talks to (MLflow's store of sweeps, Ray's job runner). The real-component tests use the
real parts; these let the decisions be checked in milliseconds."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from service.errors import BackendUnavailable, NotFound
from service.jobs import JobRunner, JobState
from service.record import ListedSweep
from service.search import Changes
from sweeps.records import SweepRecord, TrialRecord
from sweeps.vocabulary import TRUE, Tag


class FakeClock:
    """A clock that moves only when slept on: retries measured in its time, instantly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingClock:
    """The real clock, recording what was slept on it (a retry waits by sleeping)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        time.sleep(seconds)


# --- the control plane's protocols: SweepStore (MLflow) and JobRunner (Ray) -----------------


def record(
    sweep_id: str = "a" * 32,
    status: str = "RUNNING",
    *,
    managed: bool = True,
    job_id: str | None = None,
    job_attempt: int = 0,
    cancel_requested: bool = False,
    last_heartbeat: datetime | None = None,
    created_at: datetime | None = None,
    num_trials: int = 2,
) -> SweepRecord:
    """A sweep's record as `SweepStore` reads it from its parent run."""
    return SweepRecord(
        id=sweep_id, name=f"sweep-{sweep_id[:4]}", experiment_id="1", status=status, message=None,
        created_at=created_at or datetime.now(timezone.utc), ended_at=None, job_id=job_id,
        job_attempt=job_attempt, managed=managed, cancel_requested=cancel_requested,
        idempotency_key=None, spec_sha256=None, num_trials=num_trials,
        objectives=[{"metric": "val_accuracy", "mode": "max"}], last_heartbeat=last_heartbeat,
    )  # fmt: skip


def trial(run_id: str, status: str = "RUNNING", val_accuracy: float | None = None) -> TrialRecord:
    """A trial as `sweeps.tracking.trial_from_run` reads it."""
    metrics = {} if val_accuracy is None else {"val_accuracy": val_accuracy}
    return TrialRecord(run_id, f"t_{run_id}", status=status, metrics=metrics)


class FakeStore:
    """`service.record.SweepStore` in memory: records and trials by sweep id; what was written
    is kept in ``writes`` as (method, sweep id, what)."""

    def __init__(self, *records: SweepRecord) -> None:
        self.records = {r.id: r for r in records}
        self.trial_lists: dict[str, list[TrialRecord]] = {}
        self.writes: list[tuple[str, str, Any]] = []
        self.down = False  # True: every call raises BackendUnavailable, as with MLflow down
        self.reads = 0

    def _check(self) -> None:
        if self.down:
            raise BackendUnavailable("MLflow", "could not do it (fake)")

    def get(self, sweep_id: str) -> SweepRecord:
        return self.listed(sweep_id).record

    def listed(self, sweep_id: str) -> ListedSweep:
        self._check()
        self.reads += 1
        if sweep_id not in self.records:
            raise NotFound(f"no sweep with id {sweep_id!r}")
        return ListedSweep(self.records[sweep_id], None)

    def trials(self, sweep_id: str) -> list[TrialRecord]:
        self._check()
        self.reads += 1
        return list(self.trial_lists.get(sweep_id, []))

    def set_status(self, sweep_id: str, status: str, message: str | None = None) -> None:
        self._check()
        self.writes.append(("set_status", sweep_id, (status, message)))
        self.records[sweep_id] = replace(self.records[sweep_id], status=status, message=message)

    def end(self, sweep_id: str, status: str, message: str) -> None:
        self._check()
        self.writes.append(("end", sweep_id, (status, message)))
        ended = datetime.now(timezone.utc)
        self.records[sweep_id] = replace(
            self.records[sweep_id], status=status, message=message, ended_at=ended
        )

    def set_tags(self, sweep_id: str, tags: dict[str, str]) -> None:
        self._check()
        self.writes.append(("set_tags", sweep_id, dict(tags)))
        fields = {Tag.JOB_ID: ("job_id", str), Tag.JOB_ATTEMPT: ("job_attempt", int),
                  Tag.CANCEL_REQUESTED: ("cancel_requested", lambda v: v == TRUE)}  # fmt: skip
        changes = {fields[k][0]: fields[k][1](v) for k, v in tags.items() if k in fields}
        self.records[sweep_id] = replace(self.records[sweep_id], **changes)

    def delete(self, sweep_id: str) -> None:
        self._check()
        self.writes.append(("delete", sweep_id, None))
        self.records.pop(sweep_id)


class FakeJobs:
    """`service.jobs.JobRunner` in memory: a job's state by submission id (None: Ray does not
    know it); submissions kept in ``submitted`` as (sweep id, attempt)."""

    submission_id = staticmethod(JobRunner.submission_id)

    def __init__(self, states: dict[str, JobState | None] | None = None) -> None:
        self.states = dict(states or {})
        self.submitted: list[tuple[str, int]] = []
        self.stopped: list[str] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise BackendUnavailable("Ray", "could not do it (fake)")

    def ping(self) -> None:
        self._check()

    def state(self, submission_id: str) -> JobState | None:
        self._check()
        return self.states.get(submission_id)

    def submit(self, sweep_id: str, attempt: int) -> str:
        self._check()
        self.submitted.append((sweep_id, attempt))
        job_id = self.submission_id(sweep_id, attempt)
        self.states[job_id] = JobState(job_id, "PENDING", None)
        return job_id

    def stop(self, submission_id: str) -> bool:
        self._check()
        self.stopped.append(submission_id)
        state = self.states.get(submission_id)
        return state is not None and state.alive

    def delete(self, submission_id: str) -> None:
        self._check()
        self.states.pop(submission_id, None)


class FakeSearch:
    """`service.search.SweepSearch`'s ``changes`` and ``write_summary``: what the next look finds
    is set by the test (``found``); summaries written are kept."""

    def __init__(self) -> None:
        self.found = Changes({}, frozenset(), {})
        self.summaries: dict[str, str] = {}

    def changes(self, since_ms: int) -> Changes:
        return self.found

    def write_summary(self, sweep_id: str, text: str) -> None:
        self.summaries[sweep_id] = text
