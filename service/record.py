"""Sweeps as MLflow parent runs: the service's only record (docs/ARCHITECTURE.md, "MLflow is the record").

`SweepStore` is the MLflow adapter: it creates and updates sweeps through `sweeps.tracking` and
reads them back with `MlflowClient`, turning MLflow failures into `NotFound`, `Conflict`,
`Unprocessable` and `BackendUnavailable`. The API reads through `service.cache.SweepCache`.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import requests
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.errors import BackendUnavailable, Conflict, NotFound, ServiceError, Unprocessable
from sweeps import tracking
from sweeps.note import write_sweep_note
from sweeps.records import SweepRecord, TrialRecord
from sweeps.spec import SweepSpec
from sweeps.tracking import spec_digest
from sweeps.vocabulary import (
    KIND_SWEEP,
    MANAGED_BY_SERVICE,
    Tag,
    TrialStatus,
    idempotency_filter,
    request_filter,
    trials_filter,
)

__all__ = ["ListedSweep", "MlflowErrors", "SweepRecord", "SweepStore", "spec_digest"]

logger = logging.getLogger(__name__)

# MLflow's answers to a request it refuses (as opposed to failing to serve it).
_MLFLOW_REFUSALS = {
    "INVALID_PARAMETER_VALUE",
    "INVALID_STATE",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
}

# What says MLflow failed to serve a request: its own errors, and the transport's (refused, reset,
# timed out). Other OSErrors (a missing local file, a permission) are bugs or set-up errors of ours,
# shown as such (a 500 with its traceback), not as "MLflow is down".
_MLFLOW_ERRORS = (
    MlflowException,
    requests.RequestException,
    httpx.HTTPError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class ListedSweep:
    """A sweep as a search finds it: its record and the summary stored on it (``service.summary``)."""

    record: SweepRecord
    summary_tag: str | None

    @classmethod
    def from_run(cls, run: Run) -> ListedSweep:
        return cls(tracking.sweep_from_run(run), run.data.tags.get(Tag.SUMMARY))


class SweepStore:
    """Sweeps in MLflow. Every method raises `BackendUnavailable` when MLflow cannot be reached.

    Args:
        tracking_uri: the MLflow tracking URI the service and the drivers share.
        timeout_s: timeout of the health probe.
    """

    def __init__(self, tracking_uri: str, timeout_s: float = 5.0) -> None:
        self.tracking_uri = tracking_uri
        self.timeout_s = timeout_s
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def ping(self) -> None:
        """Raise `BackendUnavailable` unless MLflow answers now."""
        if self.tracking_uri.startswith(("http://", "https://")):
            url = self.tracking_uri.rstrip("/") + "/health"
            try:
                response = httpx.get(url, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                raise BackendUnavailable("MLflow", f"{url}: {exc.__class__.__name__}") from exc
            if response.status_code != 200:
                raise BackendUnavailable("MLflow", f"{url} answered {response.status_code}")
            return
        with self._mlflow("health check"):
            self.client.search_experiments(max_results=1)

    def create(self, spec: SweepSpec, extra_tags: dict[str, str]) -> str:
        """Record a new PENDING sweep; returns its id (the parent run id).

        Raises:
            Unprocessable: MLflow refuses a name in the spec (a tag key, say); nothing is left.
            Conflict: the spec's experiment exists in MLflow but is deleted.
        """
        request_id = uuid.uuid4().hex
        tags = {
            Tag.JOB_ATTEMPT: "0",
            Tag.REQUEST_ID: request_id,
            Tag.MANAGED: MANAGED_BY_SERVICE,
            **extra_tags,
        }
        try:
            with self._mlflow("create the sweep's parent run"):
                return tracking.create_sweep_run(
                    spec, tracking_uri=self.tracking_uri, extra_tags=tags
                )
        except Conflict as exc:
            # The run may exist already (its params are logged after it is created): remove it.
            self._remove_request(request_id)
            if "'active' state" in exc.message:
                raise Conflict(
                    f"experiment {spec.experiment!r} is deleted in MLflow: restore it or name "
                    "another one"
                ) from exc
            raise Unprocessable(
                exc.message.replace("MLflow refused to", "MLflow could not")
            ) from exc
        except BackendUnavailable:
            self._remove_request(request_id)
            raise

    def _remove_request(self, request_id: str) -> None:
        """Delete the runs a failed `create` may have left (best effort: MLflow may be down)."""
        try:
            with self._mlflow("clean up a failed creation"):
                ids = [e.experiment_id for e in self._experiments()]
                runs = self.client.search_runs(
                    ids, request_filter(request_id), ViewType.ACTIVE_ONLY
                ) if ids else []  # fmt: skip
                for run in runs:
                    self.client.delete_run(run.info.run_id)
        except BackendUnavailable:
            logger.error(
                "a sweep run tagged %s=%s may be left half-created", Tag.REQUEST_ID, request_id
            )

    def get(self, sweep_id: str) -> SweepRecord:
        """The sweep's record, read now. Raises `NotFound` for an unknown or deleted id."""
        return self.listed(sweep_id).record

    def listed(self, sweep_id: str) -> ListedSweep:
        """The sweep's record and stored summary, read now. Raises `NotFound` as `get`."""
        with self._mlflow(f"read sweep {sweep_id}"):
            try:
                run = self.client.get_run(sweep_id)
            except MlflowException as exc:
                if _is_not_found(exc):
                    raise NotFound(f"no sweep with id {sweep_id!r}") from exc
                raise
        if run.data.tags.get(Tag.KIND) != KIND_SWEEP or run.info.lifecycle_stage == "deleted":
            raise NotFound(f"no sweep with id {sweep_id!r}")
        return ListedSweep.from_run(run)

    def trials(self, sweep_id: str) -> list[TrialRecord]:
        """The sweep's trials (config, latest metrics, status), as `sweeps.tracking` reads them,
        their metrics JSON-safe."""
        with self._mlflow(f"read the trials of sweep {sweep_id}"):
            return [t.json_safe() for t in tracking.sweep_trials(sweep_id, self.tracking_uri)]

    def set_status(self, sweep_id: str, status: str, message: str | None = None) -> None:
        with self._mlflow(f"set the status of sweep {sweep_id}"):
            tracking.set_sweep_status(sweep_id, status, message, self.tracking_uri)

    def end(self, sweep_id: str, status: str, message: str) -> None:
        """End a sweep whose driver cannot (it is gone): its status, its trials' runs still
        open (KILLED), and its description in the MLflow UI (best effort)."""
        with self._mlflow(f"end sweep {sweep_id}"):
            tracking.set_sweep_status(sweep_id, status, message, self.tracking_uri)
            tracking.close_open_trials(sweep_id, TrialStatus.KILLED, self.tracking_uri)
        try:
            with self._mlflow(f"describe sweep {sweep_id}"):
                spec = tracking.load_sweep_spec(sweep_id, self.tracking_uri)
                write_sweep_note(spec, sweep_id, status, message, self.tracking_uri)
        except (ServiceError, ValueError) as exc:
            logger.warning("sweep %s ended %s; its description is not updated: %s",
                           sweep_id, status, exc)  # fmt: skip

    def set_tags(self, sweep_id: str, tags: dict[str, str]) -> None:
        with self._mlflow(f"tag sweep {sweep_id}"):
            for key, value in tags.items():
                self.client.set_tag(sweep_id, key, value)

    def delete(self, sweep_id: str) -> None:
        """Delete the parent run and its trials' runs (MLflow soft delete: restorable)."""
        with self._mlflow(f"delete sweep {sweep_id}"):
            record = self.get(sweep_id)
            # A page at a time, from the start again: deleted runs leave the active view.
            while children := self.client.search_runs(
                experiment_ids=[record.experiment_id],
                filter_string=trials_filter(sweep_id),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
            ):
                for child in children:
                    self.client.delete_run(child.info.run_id)
            self.client.delete_run(sweep_id)

    def artifact(self, sweep_id: str, suffix: str) -> bytes | None:
        """The bytes of the parent run's first top-level artifact ending in ``suffix``, if any."""
        with self._mlflow(f"read the artifacts of sweep {sweep_id}"):
            for info in self.client.list_artifacts(sweep_id):
                if not info.is_dir and info.path.endswith(suffix):
                    return _download(self.client, sweep_id, info.path)
        return None

    def find_by_idempotency_key(self, key: str) -> SweepRecord | None:
        """The sweep created with ``key``, if any (``key`` is validated by the route)."""
        with self._mlflow("look up an Idempotency-Key"):
            experiment_ids = [e.experiment_id for e in self._experiments()]
            if not experiment_ids:
                return None
            runs = self.client.search_runs(
                experiment_ids=experiment_ids,
                filter_string=idempotency_filter(key),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1,
            )
        return tracking.sweep_from_run(runs[0]) if runs else None

    def _experiments(self) -> list:
        experiments = []
        token = None
        while True:
            page = self.client.search_experiments(
                view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            experiments.extend(page)
            token = page.token
            if not token:
                return experiments

    def _mlflow(self, what: str) -> MlflowErrors:
        return MlflowErrors(what)


class MlflowErrors:
    """Context manager: MLflow transport and server failures become `BackendUnavailable`.

    Inside it `sweeps.tracking` does not retry: the API answers 503 now, not minutes later.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._no_retries = tracking.retry_window(0)

    def __enter__(self) -> None:
        self._no_retries.__enter__()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._no_retries.__exit__(None, None, None)
        if exc is None or isinstance(exc, ServiceError):
            return False
        if isinstance(exc, _MLFLOW_ERRORS):
            if isinstance(exc, MlflowException) and _is_not_found(exc):
                return False
            if isinstance(exc, MlflowException) and exc.error_code in _MLFLOW_REFUSALS:
                raise Conflict(f"MLflow refused to {self.what}: {_mlflow_message(exc)}") from exc
            logger.warning("MLflow failed to %s: %s", self.what, _first_line(exc))
            raise BackendUnavailable("MLflow", f"could not {self.what}") from exc
        return False


def _is_not_found(exc: MlflowException) -> bool:
    return exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def _mlflow_message(exc: MlflowException) -> str:
    """MLflow's message without its error-code prefix, on one line."""
    text = _first_line(exc)
    prefix = f"{exc.error_code}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _download(client: MlflowClient, run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return Path(local).read_bytes()
