"""MLflow records of sweeps and trials: the parent run is the record of a sweep.

A sweep is a parent run (tags ``l0sweep.kind=sweep``, ``l0sweep.name``, ``l0sweep.status``,
``l0sweep.objectives``; the spec whole as the artifact ``spec.json``, which may be larger than any
tag, and its digest as the tag ``l0sweep.spec_sha256``). Each trial is a child run created from
inside the trial (tags ``l0sweep.kind=trial``, ``l0sweep.sweep_id``, ``l0sweep.trial_id``,
``mlflow.parentRunId``), named by what it trains (``l0 weight lam=0.05 seed=0``), found again by
its tags when the trial is retried or restored, so a trial never gets two runs. The
``l0sweep.status`` tag is the truth about a sweep: PENDING | RUNNING | FINISHED | FAILED |
CANCELLED; a running driver refreshes ``l0sweep.heartbeat`` (Unix time) so that the service can
tell a local run that died from one that runs. Experiments are created as model-training
experiments (MLflow 3's ``mlflow.experimentKind``), so the MLflow UI opens on their runs.

MLflow outages (``sweeps.retry``). Every request made through :func:`client` (and so every
function here) is retried while MLflow cannot serve it, for ``L0SWEEP_MLFLOW_RETRY_WINDOW_S``, then
raises :class:`MlflowUnavailable` (MLflow, its URL, what was being done, the time waited). The end
of a trial or a sweep (:func:`end_trial_run`, :func:`set_sweep_status`, :func:`close_open_trials`)
is retried until MLflow answers instead: it is the record, and giving up on it would leave a run
RUNNING forever. The service, which must answer 503 at once, turns retries off around its own
calls with :func:`retry_window`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from .config import get_settings
from .records import SweepRecord, TrialRecord
from .retry import MlflowUnavailable, RetryingClient, retry_window, until_answered, with_retries
from .spec import SweepSpec
from .vocabulary import (
    ACTIVE_SWEEP,
    KIND_SWEEP,
    KIND_TRIAL,
    MANAGED_BY_SERVICE,
    SWEEP_RUN_STATUS,
    TERMINAL_SWEEP,
    TRIAL_RUN_STATUS,
    TRUE,
    RunStatus,
    SweepStatus,
    Tag,
    TrialStatus,
    is_pareto,
    trials_filter,
)

__all__ = [
    "EXPERIMENT_KIND",
    "MAX_TAG_VAL_LENGTH",
    "MlflowException",
    "MlflowUnavailable",
    "absolute_uri",
    "client",
    "close_open_trials",
    "create_sweep_run",
    "end_trial_run",
    "find_trial_run",
    "flatten",
    "heartbeat",
    "json_digest",
    "load_sweep_spec",
    "log_epoch",
    "retry_window",
    "set_sweep_status",
    "spec_digest",
    "start_trial_run",
    "sweep_from_run",
    "sweep_status",
    "sweep_trials",
    "tag_run",
    "trial_from_run",
    "trial_run_tags",
]

_MAX_PARAM = 6000
# MLflow 3's experiment kind: "custom_model_development" is the UI's "Machine learning" (training
# runs) view; without the tag the UI may open a sweep's experiment in its GenAI view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SPEC_ARTIFACT = "spec.json"
# Artifacts of a finished trial's exported model (sweeps.model_log); its tags are vocabulary's.
ONNX_ARTIFACT = "onnx/model.onnx"
LOGGED_MODEL_NAME = "model"


def absolute_uri(tracking_uri: str | None) -> str:
    """``tracking_uri`` (default: MLflow's, e.g. ``sqlite:///mlflow.db`` in the working directory)
    with a local path made absolute, so that processes in other directories (Ray workers) reach
    the same store."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            return uri if path.startswith("/") else scheme + str(Path(path).resolve())
    return uri if "://" in uri or uri.startswith("/") else str(Path(uri).resolve())


def json_digest(data: Any) -> str:
    """The SHA-256 of ``data``'s canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_digest(spec: SweepSpec) -> str:
    """A stable digest of a spec: tells a replayed POST from a different one, and checks the
    ``spec.json`` artifact read back."""
    return json_digest(spec.model_dump(mode="json"))


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An MLflow client for ``tracking_uri``, else the settings' (``MLFLOW_TRACKING_URI``).

    Every method call of the client rides out an MLflow outage (see the module docstring).
    """
    return _client(tracking_uri or get_settings().tracking_uri)


@lru_cache(maxsize=8)
def _client(tracking_uri: str | None) -> MlflowClient:
    return RetryingClient(_plain_client(tracking_uri))  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _plain_client(tracking_uri: str | None) -> MlflowClient:
    # One per URI and process: a SQL store builds an engine and checks its schema on creation.
    return MlflowClient(tracking_uri)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists and None as JSON; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:_MAX_PARAM]
    return out


def _log_params(c: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i : i + 100])


def create_sweep_run(
    spec: SweepSpec, tracking_uri: str | None = None, extra_tags: dict[str, str] | None = None
) -> str:
    """Create the parent run of a sweep (and its experiment if missing); returns its run id.

    The run is left in MLflow status RUNNING with ``l0sweep.status=PENDING``. An experiment
    created here, or found without a kind, is marked a model-training experiment.
    """
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(spec.experiment)
    kind, value = EXPERIMENT_KIND
    if exp is None:
        exp_id = c.create_experiment(spec.experiment, tags={kind: value})
    else:
        exp_id = exp.experiment_id
        if kind not in exp.tags:
            c.set_experiment_tag(exp_id, kind, value)
    dumped = spec.model_dump(mode="json")
    objectives = [o.model_dump(mode="json") for o in spec.objectives]
    tags = {
        Tag.KIND: KIND_SWEEP,
        Tag.NAME: spec.name,
        Tag.STATUS: SweepStatus.PENDING.value,
        Tag.NUM_TRIALS: str(spec.num_trials()),
        Tag.DUPLICATE_TRIALS: str(spec.duplicate_trials()),
        Tag.OBJECTIVES: json.dumps(objectives, separators=(",", ":")),
        Tag.SPEC_SHA256: spec_digest(spec),
        Tag.RUN_NAME: spec.name,
        **{f"{Tag.USER_PREFIX}{k}": v for k, v in spec.tags.items()},
        **(extra_tags or {}),
    }
    run = c.create_run(exp_id, tags=tags, run_name=spec.name)
    run_id = run.info.run_id
    c.log_dict(run_id, dumped, SPEC_ARTIFACT)
    _log_params(c, run_id, flatten(dumped))
    return run_id


def set_sweep_status(
    run_id: str, status: str, message: str | None = None, tracking_uri: str | None = None
) -> None:
    """Set ``l0sweep.status`` (and end the MLflow run on FINISHED, FAILED, CANCELLED).

    Retried until MLflow answers (the record of the sweep), unless :func:`retry_window` says not.

    Raises:
        ValueError: ``status`` is not a :class:`~sweeps.vocabulary.SweepStatus`.
    """
    if status not in set(SweepStatus):
        raise ValueError(
            f"unknown sweep status {status!r}; one of {tuple(s.value for s in SweepStatus)}"
        )
    c = client(tracking_uri)
    tags = [RunTag(Tag.STATUS, str(status))]
    if message is not None:
        tags.append(RunTag(Tag.STATUS_MESSAGE, message[:MAX_TAG_VAL_LENGTH]))
    with until_answered():
        c.log_batch(run_id, tags=tags)
        if status in SWEEP_RUN_STATUS:
            c.set_terminated(run_id, status=SWEEP_RUN_STATUS[SweepStatus(status)].value)
        elif c.get_run(run_id).info.status != RunStatus.RUNNING:
            c.update_run(run_id, status=RunStatus.RUNNING.value)


def sweep_status(run_id: str, tracking_uri: str | None = None) -> str:
    """The ``l0sweep.status`` tag of a sweep's parent run."""
    return client(tracking_uri).get_run(run_id).data.tags.get(Tag.STATUS, SweepStatus.PENDING.value)


def load_sweep_spec(run_id: str, tracking_uri: str | None = None) -> SweepSpec:
    """The spec of a sweep, from its ``spec.json`` artifact, checked against its digest tag.

    Raises:
        ValueError: the run is not a sweep, or its artifact does not match its digest.
    """
    c = client(tracking_uri)
    tags = c.get_run(run_id).data.tags
    if tags.get(Tag.KIND) != KIND_SWEEP:
        raise ValueError(f"run {run_id} is not an l0sweep sweep (no {Tag.KIND}={KIND_SWEEP} tag)")
    with tempfile.TemporaryDirectory() as tmp:
        path = c.download_artifacts(run_id, SPEC_ARTIFACT, tmp)
        written = json.loads(Path(path).read_text())
    # The digest covers the artifact as written: a spec recorded before a field was added (its
    # default now fills it in) still matches. Its data files are not this reader's to check.
    expected = tags.get(Tag.SPEC_SHA256)
    if expected is not None and json_digest(written) != expected:
        raise ValueError(
            f"the {SPEC_ARTIFACT} artifact of sweep {run_id} does not match its digest "
            f"({Tag.SPEC_SHA256}={expected}): it was changed or only partly written"
        )
    return SweepSpec.model_validate(written, context={"check_data": False})


def heartbeat(run_id: str, tracking_uri: str | None = None) -> None:
    """Write the sweep's heartbeat now (``l0sweep.heartbeat``, Unix time in seconds); one try."""
    raw = _plain_client(tracking_uri or get_settings().tracking_uri)
    raw.set_tag(run_id, Tag.HEARTBEAT, f"{time.time():.0f}")


def _search_children(c: MlflowClient, sweep_id: str, query: str) -> list[Any]:
    exp_id = c.get_run(sweep_id).info.experiment_id
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_trial_run(c: MlflowClient, sweep_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` in ``sweep_id``, if one exists."""
    runs = _search_children(c, sweep_id, trials_filter(sweep_id, trial_id))
    return min(runs, key=lambda r: r.info.start_time).info.run_id if runs else None


def start_trial_run(
    sweep_id: str,
    trial_id: str,
    config: dict[str, Any],
    tracking_uri: str | None = None,
    run_id: str | None = None,
    name: str | None = None,
) -> str:
    """Create the child run of a trial, or continue the one it already has.

    Args:
        run_id: the child run id stored in the trial's checkpoint, if it has one; otherwise the
            run is looked up by its tags, and created only if there is none.
        name: the run's name (what the trial trains); default: the trial id.
    """
    c = client(tracking_uri)
    if run_id is None:
        raw = _plain_client(tracking_uri or get_settings().tracking_uri)
        run_id, created = _find_or_create_trial_run(raw, sweep_id, trial_id, name or trial_id)
        if created:
            _log_params(c, run_id, flatten(config))
            return run_id
    c.update_run(run_id, status=RunStatus.RUNNING.value)
    c.set_tag(run_id, Tag.TRIAL_STATUS, TrialStatus.RUNNING.value)
    return run_id


def _find_or_create_trial_run(
    raw: MlflowClient, sweep_id: str, trial_id: str, name: str
) -> tuple[str, bool]:
    """The trial's run and whether it was created now. Find and create are retried as one unit:
    a creation whose answer an outage cut off is found again instead of made twice."""

    def find_or_create() -> tuple[str, bool]:
        found = find_trial_run(raw, sweep_id, trial_id)
        if found is not None:
            return found, False
        experiment_id = raw.get_run(sweep_id).info.experiment_id
        tags = trial_run_tags(sweep_id, trial_id)
        return raw.create_run(experiment_id, tags=tags, run_name=name).info.run_id, True

    return with_retries(find_or_create, f"start the run of trial {trial_id}", raw.tracking_uri)


def log_epoch(
    run_id: str, metrics: dict[str, float], step: int, tracking_uri: str | None = None
) -> None:
    """Log one epoch's metrics in one request (step = epoch)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    raw = _plain_client(tracking_uri or get_settings().tracking_uri)
    with_retries(
        lambda: raw.log_batch(run_id, metrics=items),
        f"log the metrics of epoch {step} of run {run_id}",
        raw.tracking_uri,
    )


def end_trial_run(
    run_id: str, status: str, reason: str | None = None, tracking_uri: str | None = None
) -> None:
    """End a child run: ``status`` is a :class:`~sweeps.vocabulary.TrialStatus` (STOPPED = early-stopped).

    Retried until MLflow answers: a trial that gave up on MLflow still records why, once it can.
    """
    c = client(tracking_uri)
    tags = [RunTag(Tag.TRIAL_STATUS, str(status))]
    if reason:
        tags.append(RunTag(Tag.FAILURE_REASON, reason[:MAX_TAG_VAL_LENGTH]))
    with until_answered():
        c.log_batch(run_id, tags=tags)
        c.set_terminated(run_id, status=TRIAL_RUN_STATUS[TrialStatus(status)].value)


def close_open_trials(
    sweep_id: str, status: str = TrialStatus.KILLED, tracking_uri: str | None = None
) -> int:
    """End every child run of a sweep still RUNNING (after a cancel or a crash); returns how many."""
    c = client(tracking_uri)
    with until_answered():
        runs = _search_children(c, sweep_id, trials_filter(sweep_id, run_status=RunStatus.RUNNING))
        for run in runs:
            end_trial_run(run.info.run_id, status, tracking_uri=tracking_uri)
    return len(runs)


def tag_run(run_id: str, tags: dict[str, str], tracking_uri: str | None = None) -> None:
    """Set ``tags`` on a run in one request, each value cut to MLflow's limit."""
    items = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
    client(tracking_uri).log_batch(run_id, tags=items)


def sweep_trials(run_id: str, tracking_uri: str | None = None) -> list[TrialRecord]:
    """Every trial of a sweep read from MLflow: ids, config (params), latest metrics, status."""
    c = client(tracking_uri)
    trials = [trial_from_run(run) for run in _search_children(c, run_id, trials_filter(run_id))]
    return sorted(trials, key=lambda t: t.trial_id or "")


def trial_run_tags(sweep_id: str, trial_id: str) -> dict[str, str]:
    """The tags a trial's child run starts with: what finds it again, nested under its sweep."""
    return {
        Tag.KIND: KIND_TRIAL,
        Tag.SWEEP_ID: sweep_id,
        Tag.TRIAL_ID: trial_id,
        Tag.TRIAL_STATUS: TrialStatus.RUNNING.value,
        Tag.PARENT_RUN_ID: sweep_id,
    }


def trial_from_run(run: Any) -> TrialRecord:
    """A trial's child run as its record: ids, config (params), latest metrics, status, times."""
    tags = run.data.tags
    return TrialRecord(
        trial_id=tags.get(Tag.TRIAL_ID),
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=tags.get(Tag.TRIAL_STATUS, run.info.status),
        run_status=run.info.status,
        config=dict(run.data.params),
        metrics=dict(run.data.metrics),
        pareto=is_pareto(tags),
        failure_reason=tags.get(Tag.FAILURE_REASON),
        architecture=tags.get(Tag.ARCHITECTURE),
        export_format=tags.get(Tag.EXPORT_FORMAT),
        model_uri=tags.get(Tag.MODEL_URI),
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        experiment_id=run.info.experiment_id,
    )


def sweep_from_run(run: Any) -> SweepRecord:
    """A sweep's parent run as its record (what its tags say; unreadable tags as defaults)."""
    tags = run.data.tags
    objectives = _parse_json(tags.get(Tag.OBJECTIVES))
    legacy = _parse_json(tags.get(Tag.LEGACY_SPEC))
    if objectives is None and isinstance(legacy, dict):
        objectives = legacy.get("objectives")
    return SweepRecord(
        id=run.info.run_id,
        name=tags.get(Tag.NAME) or run.info.run_name or run.info.run_id,
        experiment_id=run.info.experiment_id,
        status=_sweep_status(tags.get(Tag.STATUS)),
        message=tags.get(Tag.STATUS_MESSAGE) or None,
        created_at=_ms_to_datetime(run.info.start_time),
        ended_at=_ms_to_datetime(run.info.end_time),
        job_id=tags.get(Tag.JOB_ID) or None,
        job_attempt=_to_int(tags.get(Tag.JOB_ATTEMPT), 0),
        managed=tags.get(Tag.MANAGED) == MANAGED_BY_SERVICE,
        cancel_requested=tags.get(Tag.CANCEL_REQUESTED) == TRUE,
        idempotency_key=tags.get(Tag.IDEMPOTENCY_KEY) or None,
        spec_sha256=tags.get(Tag.SPEC_SHA256) or None,
        num_trials=_to_int(tags.get(Tag.NUM_TRIALS), 0),
        objectives=_objectives(objectives),
        duplicate_trials=_to_int(tags.get(Tag.DUPLICATE_TRIALS), 0),
        last_heartbeat=_seconds_to_datetime(tags.get(Tag.HEARTBEAT)),
    )


def _sweep_status(tag: str | None) -> str:
    return tag if tag in ACTIVE_SWEEP or tag in TERMINAL_SWEEP else SweepStatus.PENDING.value


def _objectives(objectives: Any) -> list[dict[str, Any]]:
    out = []
    for objective in objectives if isinstance(objectives, list) else []:
        if isinstance(objective, dict) and "metric" in objective:
            out.append({"metric": str(objective["metric"]), "mode": objective.get("mode", "max")})
    return out


def _parse_json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def _seconds_to_datetime(text: str | None) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(text), tz=timezone.utc) if text else None
    except (ValueError, OverflowError, OSError):
        return None


def _to_int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
