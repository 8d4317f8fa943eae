"""MLflow records of sweeps and trials: the parent run is the record of a sweep.

A sweep is a parent run (tags ``l0sweep.kind=sweep``, ``l0sweep.name``, ``l0sweep.status``; the
spec as the artifact ``spec.json`` and, when it fits, the tag ``l0sweep.spec``). Each trial is a
child run created from inside the trial (tags ``l0sweep.kind=trial``, ``l0sweep.sweep_id``,
``l0sweep.trial_id``, ``mlflow.parentRunId``), found again by those tags when the trial is retried
or restored, so a trial never gets two runs. The ``l0sweep.status`` tag is the truth about a
sweep: PENDING | RUNNING | FINISHED | FAILED | CANCELLED.

MLflow outages. Every request made through :func:`client` (and so every function here) is retried
when MLflow cannot serve it (connection refused or reset, timeout, a 5xx or 429 answer), with
backoff, for ``L0SWEEP_MLFLOW_RETRY_WINDOW_S`` (``sweeps.config``); then it raises
:class:`MlflowUnavailable`, which names MLflow, its URL, what was being done and the time waited.
The end of a trial or a sweep (:func:`end_trial_run`, :func:`set_sweep_status`,
:func:`close_open_trials`) is retried until MLflow answers instead: it is the record, and giving
up on it would leave a run RUNNING forever. The service, which must answer 503 at once, turns
retries off around its own calls with :func:`retry_window`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from .config import get_settings
from .spec import SweepSpec

__all__ = [
    "SWEEP_STATUSES",
    "TRIAL_STATUSES",
    "MlflowUnavailable",
    "client",
    "close_open_trials",
    "create_sweep_run",
    "end_trial_run",
    "find_trial_run",
    "flatten",
    "load_sweep_spec",
    "log_epoch",
    "retry_window",
    "set_sweep_status",
    "start_trial_run",
    "sweep_status",
    "sweep_trials",
]

SWEEP_STATUSES = ("PENDING", "RUNNING", "FINISHED", "FAILED", "CANCELLED")
# l0sweep.trial_status of a child run; the MLflow run status follows it.
TRIAL_STATUSES = {"RUNNING": "RUNNING", "FINISHED": "FINISHED", "STOPPED": "FINISHED",
                  "FAILED": "FAILED", "KILLED": "KILLED"}  # fmt: skip
_MLFLOW_SWEEP_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}
_MAX_PARAM = 6000

log = logging.getLogger(__name__)
T = TypeVar("T")

# Answers that mean "not now" rather than "no": MLflow's server or a proxy in front of it.
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
     "RESOURCE_EXHAUSTED"}
)  # fmt: skip
# Refused, reset, timed out, or a 5xx/429 that MLflow's own retries (urllib3's) turned into one.
_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.RetryError,
    ConnectionError,
    TimeoutError,
)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 10.0
_WARN_EVERY_S = 60.0
# Set by `retry_window`; None: the setting (the end of a run: until MLflow answers).
_window_override: ContextVar[float | None] = ContextVar("l0sweep_mlflow_retry_window", default=None)


class MlflowUnavailable(MlflowException):
    """MLflow could not serve a request for the whole retry window.

    Attributes:
        tracking_uri: the MLflow server.
        waited_s: seconds from the first failed attempt to giving up.
    """

    def __init__(
        self, tracking_uri: str, what: str, waited_s: float, window_s: float, cause: BaseException
    ) -> None:
        super().__init__(
            f"MLflow at {tracking_uri} was unavailable for {waited_s:.0f} s while trying to {what} "
            f"(retry window L0SWEEP_MLFLOW_RETRY_WINDOW_S={window_s:g} s; last error: "
            f"{_one_line(cause)})",
            error_code=TEMPORARILY_UNAVAILABLE,
        )
        self.tracking_uri = tracking_uri
        self.waited_s = waited_s


@contextlib.contextmanager
def retry_window(seconds: float) -> Iterator[None]:
    """Retry MLflow requests made in this block (this thread or task) for ``seconds``; 0: never.

    It overrides both the setting and the until-answered retries of a run's end: the service
    uses ``retry_window(0)`` so that an outage is a 503 now, not an answer minutes later.
    """
    token = _window_override.set(seconds)
    try:
        yield
    finally:
        _window_override.reset(token)


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An MLflow client for ``tracking_uri``, else the settings' (``MLFLOW_TRACKING_URI``).

    Every method call of the client rides out an MLflow outage (see the module docstring).
    """
    return _client(tracking_uri or get_settings().tracking_uri)


@lru_cache(maxsize=8)
def _client(tracking_uri: str | None) -> MlflowClient:
    return _RetryingClient(_plain_client(tracking_uri))  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _plain_client(tracking_uri: str | None) -> MlflowClient:
    # One per URI and process: a SQL store builds an engine and checks its schema on creation.
    return MlflowClient(tracking_uri)


class _RetryingClient:
    """An `MlflowClient` whose public methods retry through outages (see `_retry`)."""

    def __init__(self, inner: MlflowClient) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _retry(lambda: attr(*args, **kwargs), f"call {name}", self._inner.tracking_uri)

        return call


def _retry(fn: Callable[[], T], what: str, tracking_uri: str) -> T:
    """``fn()``, retried with backoff while MLflow cannot serve it, within the retry window.

    Raises:
        MlflowUnavailable: MLflow failed every attempt for the whole window.
    """
    first_failure: float | None = None
    window = 0.0
    attempt = 0
    warned_at = 0.0
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not _transient(exc):
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = warned_at = now
                override = _window_override.get()
                window = get_settings().mlflow_retry_window_s if override is None else override
                if window <= 0:
                    raise
                limit = "until it answers" if math.isinf(window) else f"for up to {window:g} s"
                log.warning(
                    "MLflow at %s could not %s (%s); retrying %s",
                    tracking_uri, what, _one_line(exc), limit,
                )  # fmt: skip
            waited = now - first_failure
            if waited >= window:
                raise MlflowUnavailable(tracking_uri, what, waited, window, exc) from exc
            if now - warned_at >= _WARN_EVERY_S:
                warned_at = now
                log.warning("MLflow at %s: still unavailable after %.0f s", tracking_uri, waited)
            time.sleep(min(_BACKOFF_FIRST_S * 2**attempt, _BACKOFF_MAX_S, window - waited))
            attempt += 1
        else:
            if first_failure is not None:
                log.warning(
                    "MLflow at %s answered again after %.0f s (%s)",
                    tracking_uri, time.monotonic() - first_failure, what,
                )  # fmt: skip
            return result


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` says MLflow could not serve the request now (as opposed to refusing it)."""
    if isinstance(exc, MlflowUnavailable):
        return False  # an inner call already waited the whole window
    if isinstance(exc, RestException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in _TRANSIENT_STATUS
    # MLflow wraps transport errors ("API request to ... failed with exception ..."): look inside.
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, _TRANSPORT_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


@contextlib.contextmanager
def _until_answered() -> Iterator[None]:
    """The end of a run is the record: retry it until MLflow answers (unless overridden)."""
    if _window_override.get() is not None:
        yield
        return
    with retry_window(math.inf):
        yield


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

    The run is left in MLflow status RUNNING with ``l0sweep.status=PENDING``.
    """
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(spec.experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(spec.experiment)
    dumped = spec.model_dump(mode="json")
    spec_json = json.dumps(dumped, sort_keys=True)
    tags = {
        "l0sweep.kind": "sweep",
        "l0sweep.name": spec.name,
        "l0sweep.status": "PENDING",
        "l0sweep.num_trials": str(spec.num_trials()),
        "mlflow.runName": spec.name,
        **{f"user.{k}": v for k, v in spec.tags.items()},
        **(extra_tags or {}),
    }
    if len(spec_json) <= MAX_TAG_VAL_LENGTH:
        tags["l0sweep.spec"] = spec_json
    run = c.create_run(exp_id, tags=tags, run_name=spec.name)
    run_id = run.info.run_id
    c.log_dict(run_id, dumped, "spec.json")
    _log_params(c, run_id, flatten(dumped))
    return run_id


def set_sweep_status(
    run_id: str, status: str, message: str | None = None, tracking_uri: str | None = None
) -> None:
    """Set ``l0sweep.status`` (and end the MLflow run on FINISHED, FAILED, CANCELLED).

    Retried until MLflow answers (the record of the sweep), unless :func:`retry_window` says not.

    Raises:
        ValueError: ``status`` is not one of :data:`SWEEP_STATUSES`.
    """
    if status not in SWEEP_STATUSES:
        raise ValueError(f"unknown sweep status {status!r}; one of {SWEEP_STATUSES}")
    c = client(tracking_uri)
    tags = [RunTag("l0sweep.status", status)]
    if message is not None:
        tags.append(RunTag("l0sweep.status_message", message[:MAX_TAG_VAL_LENGTH]))
    with _until_answered():
        c.log_batch(run_id, tags=tags)
        if status in _MLFLOW_SWEEP_STATUS:
            c.set_terminated(run_id, status=_MLFLOW_SWEEP_STATUS[status])
        elif c.get_run(run_id).info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")


def sweep_status(run_id: str, tracking_uri: str | None = None) -> str:
    """The ``l0sweep.status`` tag of a sweep's parent run."""
    return client(tracking_uri).get_run(run_id).data.tags.get("l0sweep.status", "PENDING")


def load_sweep_spec(run_id: str, tracking_uri: str | None = None) -> SweepSpec:
    """The spec of a sweep, from its tag, else from its ``spec.json`` artifact."""
    c = client(tracking_uri)
    tags = c.get_run(run_id).data.tags
    if tags.get("l0sweep.kind") != "sweep":
        raise ValueError(f"run {run_id} is not an l0sweep sweep (no l0sweep.kind=sweep tag)")
    if "l0sweep.spec" in tags:
        return SweepSpec.model_validate_json(tags["l0sweep.spec"])
    with tempfile.TemporaryDirectory() as tmp:
        path = c.download_artifacts(run_id, "spec.json", tmp)
        return SweepSpec.model_validate_json(Path(path).read_text())


def _search_children(c: MlflowClient, sweep_id: str, extra: str = "") -> list[Any]:
    exp_id = c.get_run(sweep_id).info.experiment_id
    query = f"tags.`l0sweep.sweep_id` = '{sweep_id}'{extra}"
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_trial_run(c: MlflowClient, sweep_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` in ``sweep_id``, if one exists."""
    runs = _search_children(c, sweep_id, f" and tags.`l0sweep.trial_id` = '{trial_id}'")
    return min(runs, key=lambda r: r.info.start_time).info.run_id if runs else None


def start_trial_run(
    sweep_id: str,
    trial_id: str,
    config: dict[str, Any],
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> str:
    """Create the child run of a trial, or continue the one it already has.

    Args:
        run_id: the child run id stored in the trial's checkpoint, if it has one; otherwise the
            run is looked up by its tags, and created only if there is none.
    """
    c = client(tracking_uri)
    if run_id is None:
        raw = _plain_client(tracking_uri or get_settings().tracking_uri)
        run_id, created = _find_or_create_trial_run(raw, sweep_id, trial_id)
        if created:
            _log_params(c, run_id, flatten(config))
            return run_id
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "l0sweep.trial_status", "RUNNING")
    return run_id


def _find_or_create_trial_run(raw: MlflowClient, sweep_id: str, trial_id: str) -> tuple[str, bool]:
    """The trial's run and whether it was created now. Find and create are retried as one unit:
    a creation whose answer an outage cut off is found again instead of made twice."""

    def find_or_create() -> tuple[str, bool]:
        found = find_trial_run(raw, sweep_id, trial_id)
        if found is not None:
            return found, False
        tags = {
            "l0sweep.kind": "trial",
            "l0sweep.sweep_id": sweep_id,
            "l0sweep.trial_id": trial_id,
            "l0sweep.trial_status": "RUNNING",
            "mlflow.parentRunId": sweep_id,
        }
        experiment_id = raw.get_run(sweep_id).info.experiment_id
        return raw.create_run(experiment_id, tags=tags, run_name=trial_id).info.run_id, True

    return _retry(find_or_create, f"start the run of trial {trial_id}", raw.tracking_uri)


def log_epoch(
    run_id: str, metrics: dict[str, float], step: int, tracking_uri: str | None = None
) -> None:
    """Log one epoch's metrics in one request (step = epoch)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    raw = _plain_client(tracking_uri or get_settings().tracking_uri)
    _retry(
        lambda: raw.log_batch(run_id, metrics=items),
        f"log the metrics of epoch {step} of run {run_id}",
        raw.tracking_uri,
    )


def end_trial_run(
    run_id: str, status: str, reason: str | None = None, tracking_uri: str | None = None
) -> None:
    """End a child run: ``status`` is a key of :data:`TRIAL_STATUSES` (STOPPED = early-stopped).

    Retried until MLflow answers: a trial that gave up on MLflow still records why, once it can.
    """
    c = client(tracking_uri)
    tags = [RunTag("l0sweep.trial_status", status)]
    if reason:
        tags.append(RunTag("l0sweep.failure_reason", reason[:MAX_TAG_VAL_LENGTH]))
    with _until_answered():
        c.log_batch(run_id, tags=tags)
        c.set_terminated(run_id, status=TRIAL_STATUSES[status])


def close_open_trials(
    sweep_id: str, status: str = "KILLED", tracking_uri: str | None = None
) -> int:
    """End every child run of a sweep still RUNNING (after a cancel or a crash); returns how many."""
    c = client(tracking_uri)
    with _until_answered():
        runs = _search_children(c, sweep_id, " and attributes.status = 'RUNNING'")
        for run in runs:
            end_trial_run(run.info.run_id, status, tracking_uri=tracking_uri)
    return len(runs)


def sweep_trials(run_id: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every trial of a sweep read from MLflow: ids, config (params), latest metrics, status."""
    c = client(tracking_uri)
    trials = []
    for run in _search_children(c, run_id):
        tags = run.data.tags
        trials.append(
            {
                "trial_id": tags.get("l0sweep.trial_id"),
                "run_id": run.info.run_id,
                "status": tags.get("l0sweep.trial_status", run.info.status),
                "run_status": run.info.status,
                "config": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "pareto": tags.get("pareto") == "true",
                "failure_reason": tags.get("l0sweep.failure_reason"),
                "architecture": tags.get("l0sweep.architecture"),
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
            }
        )
    return sorted(trials, key=lambda t: t["trial_id"] or "")
