"""MLflow's vocabulary for l0sweep: every tag name, status and search filter, in one place.

MLflow is the record of sweeps and trials (docs/ARCHITECTURE.md, "MLflow is the record"): the
driver and the trials write it, the service, the report and the warm start read it. Each side
used to spell the words itself, so renaming a tag or adding a status broke a reader silently.
Writers and readers now take the words from here, and this module imports nothing but the
standard library, so that `sweeps` and `service` alike can use it.

- :class:`Tag`: the tag names (``l0sweep.*``, and the MLflow ones we set or read).
- :class:`SweepStatus`, :class:`TrialStatus`: the values of ``l0sweep.status`` and
  ``l0sweep.trial_status``, with the MLflow run status each one ends a run with
  (:data:`SWEEP_RUN_STATUS`, :data:`TRIAL_RUN_STATUS`). :class:`RunStatus`: MLflow's own.
- The search filters (:func:`sweeps_filter`, :func:`trials_filter`, ...) and orderings.

The Pareto flag of a trial was once the un-namespaced tag ``pareto``; it is now
``l0sweep.pareto``. Stores written before the rename (the lab's PostgreSQL history) still carry
the old tag, so :func:`is_pareto` reads the new tag and falls back to the old one.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

__all__ = [
    "ACTIVE_SWEEP",
    "KIND_SWEEP",
    "KIND_TRIAL",
    "MANAGED_BY_SERVICE",
    "NEWEST_FIRST",
    "SWEEP_RUN_STATUS",
    "TERMINAL_SWEEP",
    "TRIAL_PROGRESS",
    "TRIAL_RUN_STATUS",
    "ExportFormat",
    "RunStatus",
    "SweepStatus",
    "Tag",
    "TrialStatus",
    "children_filter",
    "ended_since_filter",
    "idempotency_filter",
    "is_pareto",
    "request_filter",
    "running_filter",
    "sweeps_filter",
    "trials_filter",
]


class _Word(str, Enum):
    """A status word: a ``str`` equal to its value, formatted and printed as its value (the
    ``enum.StrEnum`` of Python 3.11, which 3.10 lacks)."""

    __str__ = str.__str__
    __format__ = str.__format__


class SweepStatus(_Word):
    """``l0sweep.status`` of a sweep's parent run: the truth about a sweep."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class TrialStatus(_Word):
    """``l0sweep.trial_status`` of a trial's child run (STOPPED: stopped early by the scheduler)."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class RunStatus(_Word):
    """MLflow's own run status (``run.info.status``)."""

    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


ACTIVE_SWEEP: frozenset[SweepStatus] = frozenset({SweepStatus.PENDING, SweepStatus.RUNNING})
TERMINAL_SWEEP: frozenset[SweepStatus] = frozenset(SweepStatus) - ACTIVE_SWEEP
# The MLflow run status a sweep's parent run ends with; an active sweep's run is RUNNING.
SWEEP_RUN_STATUS: Mapping[SweepStatus, RunStatus] = {
    SweepStatus.FINISHED: RunStatus.FINISHED,
    SweepStatus.FAILED: RunStatus.FAILED,
    SweepStatus.CANCELLED: RunStatus.KILLED,
}
# The MLflow run status follows a trial's own: an early stop is a finished run.
TRIAL_RUN_STATUS: Mapping[TrialStatus, RunStatus] = {
    TrialStatus.RUNNING: RunStatus.RUNNING,
    TrialStatus.FINISHED: RunStatus.FINISHED,
    TrialStatus.STOPPED: RunStatus.FINISHED,
    TrialStatus.FAILED: RunStatus.FAILED,
    TrialStatus.KILLED: RunStatus.KILLED,
}

# How a trial counts in its sweep's progress (``service.summary``), by the status it is read with:
# its TrialStatus, else its MLflow run's status; Tune's own words (TERMINATED, ERROR, PENDING)
# from stores written before ``l0sweep.trial_status`` existed. Any other status counts as pending.
TRIAL_PROGRESS: Mapping[str, str] = {
    TrialStatus.RUNNING: "running",
    TrialStatus.FINISHED: "finished",
    TrialStatus.STOPPED: "stopped",
    TrialStatus.FAILED: "failed",
    TrialStatus.KILLED: "stopped",
    RunStatus.SCHEDULED: "pending",
    "PENDING": "pending",
    "TERMINATED": "finished",
    "ERROR": "failed",
}


class Tag:
    """Tag names. A namespace of plain strings, so that they work as dict keys and in f-strings."""

    # On every l0sweep run: "sweep" (a parent run) or "trial" (a child run).
    KIND = "l0sweep.kind"

    # --- a sweep's parent run ------------------------------------------------------------
    NAME = "l0sweep.name"
    STATUS = "l0sweep.status"  # a SweepStatus
    STATUS_MESSAGE = "l0sweep.status_message"
    NUM_TRIALS = "l0sweep.num_trials"
    DUPLICATE_TRIALS = "l0sweep.duplicate_trials"
    OBJECTIVES = "l0sweep.objectives"
    SPEC_SHA256 = "l0sweep.spec_sha256"
    LEGACY_SPEC = "l0sweep.spec"  # the spec as a tag, written before l0sweep.objectives existed
    HEARTBEAT = "l0sweep.heartbeat"  # Unix time of the driver's last sign of life
    # Written by the service (service.control), not by `l0sweep run`:
    MANAGED = "l0sweep.managed"  # MANAGED_BY_SERVICE: submitted by the service
    JOB_ID = "l0sweep.job_id"  # the Ray job's submission id
    JOB_ATTEMPT = "l0sweep.job_attempt"
    CANCEL_REQUESTED = "l0sweep.cancel_requested"  # "true"
    IDEMPOTENCY_KEY = "l0sweep.idempotency_key"
    REQUEST_ID = "l0sweep.request_id"  # finds the runs of a creation that failed half-way
    SUMMARY = "l0sweep.summary"  # progress and best trial of an ended sweep (service.summary)
    USER_PREFIX = "user."  # the spec's own tags, as user.<key>

    # --- a trial's child run -------------------------------------------------------------
    SWEEP_ID = "l0sweep.sweep_id"
    TRIAL_ID = "l0sweep.trial_id"
    TRIAL_STATUS = "l0sweep.trial_status"  # a TrialStatus
    FAILURE_REASON = "l0sweep.failure_reason"
    RETRIES = "l0sweep.retries"
    LAST_ERROR = "l0sweep.last_error"
    DIVERGED = "l0sweep.diverged"  # "true": NaN/inf loss, not retried
    RESUMED_FROM_EPOCH = "l0sweep.resumed_from_epoch"
    INIT_FROM_RUN = "l0sweep.init_from_run"
    ARCHITECTURE = "l0sweep.architecture"
    # "true" | "false", written when the sweep ends, on the trial's run and its logged model
    PARETO = "l0sweep.pareto"
    LEGACY_PARETO = "pareto"  # the same, before it was namespaced: still read (is_pareto)

    # --- the measured speed of a trial's exported model (sweeps.model_log) ----------------
    SPEED_DEVICE = "l0sweep.speed_device"  # where latency_ms_b1 / throughput were measured
    SPEED_THREADS = "l0sweep.speed_threads"  # CPU threads used for them
    SPEED_ROUNDS = "l0sweep.speed_rounds"  # timing samples per figure (their median)
    SPEED_ALLOCATOR = "l0sweep.speed_allocator"  # "tuned" | "default": l0core.cpu.allocator()
    EXPORT_FORMAT = "l0sweep.export_format"  # an ExportFormat
    SPARSE_EXPORT = "l0sweep.sparse_export"  # the CSR export's measured ratios, which was kept
    ONNX_ERROR = "l0sweep.onnx_error"  # why the model has no ONNX export
    MODEL_URI = "l0sweep.model_uri"  # the MLflow logged model (models:/<model_id>)
    # ... and what the driver's side-by-side comparison adds (sweeps.speedup)
    SPEEDUP_DEVICE = "l0sweep.speedup_device"  # where speedup_vs_dense was measured
    SPEEDUP_THREADS = "l0sweep.speedup_threads"
    SPEEDUP_ERROR = "l0sweep.speedup_error"  # on the parent: why the pass measured nothing

    # --- the metadata of a driver's Ray job (service.jobs) ------------------------------
    JOB_SWEEP_ID = "l0sweep.sweep_id"
    JOB_SUBMISSION_ATTEMPT = "l0sweep.attempt"

    # --- MLflow's own ----------------------------------------------------------------------
    PARENT_RUN_ID = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    NOTE = "mlflow.note.content"  # a run's description in the MLflow UI (sweeps.note)


class ExportFormat:
    """Values of ``l0sweep.export_format``: what the exported model's tensors are."""

    SHRUNK = "shrunk"  # structured: dead units removed, smaller dense tensors
    DENSE = "dense tensors"  # unstructured: zeros inside full-size tensors, no speedup expected
    CSR = "csr"  # unstructured, Linear weights stored sparse: kept when measured faster
    UNPRUNED = "unpruned"  # a dense trial (regularizer kind none): the model as trained


KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
MANAGED_BY_SERVICE = "service"
TRUE, FALSE = "true", "false"

# The newest run first (MLflow's order_by).
NEWEST_FIRST = "attributes.start_time DESC"


def is_pareto(tags: Mapping[str, str]) -> bool:
    """Whether a trial's run is on its sweep's Pareto front (the old ``pareto`` tag included)."""
    return tags.get(Tag.PARETO, tags.get(Tag.LEGACY_PARETO)) == TRUE


def _eq(tag: str, value: str) -> str:
    return f"tags.`{tag}` = '{value}'"


def sweeps_filter(
    status: str | None = None,
    name: str | None = None,
    name_like: str | None = None,
    name_ilike: str | None = None,
) -> str:
    """The parent runs of sweeps: of ``status``, named ``name`` exactly, with a name matching the
    LIKE (case-sensitive) or ILIKE pattern fragment (``%`` is added on both sides).

    The values go into the filter as they are: the caller keeps quotes out of them.
    """
    query = _eq(Tag.KIND, KIND_SWEEP)
    if name is not None:
        query += f" and {_eq(Tag.NAME, name)}"
    if status is not None:
        query += f" and {_eq(Tag.STATUS, status)}"
    if name_like is not None:
        query += f" and tags.`{Tag.NAME}` LIKE '%{name_like}%'"
    if name_ilike is not None:
        query += f" and tags.`{Tag.NAME}` ILIKE '%{name_ilike}%'"
    return query


def trials_filter(sweep_id: str, trial_id: str | None = None, run_status: str | None = None) -> str:
    """The child runs of a sweep's trials: of one trial, or in one MLflow run status."""
    query = _eq(Tag.SWEEP_ID, sweep_id)
    if trial_id is not None:
        query += f" and {_eq(Tag.TRIAL_ID, trial_id)}"
    if run_status is not None:
        query += f" and attributes.status = '{run_status}'"
    return query


def children_filter(parent_run_id: str) -> str:
    """The runs MLflow nests under ``parent_run_id`` (what its UI shows as children)."""
    return _eq(Tag.PARENT_RUN_ID, parent_run_id)


def request_filter(request_id: str) -> str:
    """The runs a creation with ``request_id`` made (``Tag.REQUEST_ID``)."""
    return _eq(Tag.REQUEST_ID, request_id)


def idempotency_filter(key: str) -> str:
    """The sweep created with the Idempotency-Key ``key``."""
    return f"{sweeps_filter()} and {_eq(Tag.IDEMPOTENCY_KEY, key)}"


def running_filter() -> str:
    """Every run MLflow has as running now."""
    return f"attributes.status = '{RunStatus.RUNNING}'"


def ended_since_filter(since_ms: int) -> str:
    """Every run that ended at ``since_ms`` (MLflow's milliseconds) or later."""
    return f"attributes.end_time >= {int(since_ms)}"
