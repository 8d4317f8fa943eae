"""Sweeps as Ray Jobs: the driver of each sweep runs in its own job, never in the service.

Tune installs signal handlers and wants the main thread (ray-project/ray issues 18920, 50358),
so the service submits ``python -m sweeps.driver --sweep-id ID`` through Ray's job-submission API.
The submission id is derived from the sweep id and an attempt number: a retried submission of the
same attempt is refused by Ray instead of launching a second driver. Stopping a job sends the
driver SIGTERM, which the driver turns into Tune's graceful stop; ``stop_grace_s`` is how long Ray
waits before it kills the driver. The job's runtime environment carries the MLflow retry window
(``L0SWEEP_MLFLOW_RETRY_WINDOW_S``, with MLflow's client settings: `sweeps.config.job_env`) to the
driver and to every trial on every node: the service's setting is the one that counts, whatever
the nodes' own.

Ray's answers are told apart by type (`sweeps.raycompat`): a job the cluster does not know
(`JobNotFound`) is an answer, Ray unable to serve (`raycompat.unreachable`) is
`BackendUnavailable` (503), and anything else, our own bugs included, propagates (a 500 with its
traceback in the log), never "Ray is unavailable".
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from ray.job_submission import JobStatus

from service.errors import BackendUnavailable
from sweeps import raycompat
from sweeps.config import job_env
from sweeps.raycompat import JobClient, JobNotFound, JobServerError
from sweeps.vocabulary import Tag

__all__ = ["JobRunner", "JobState"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class JobState:
    submission_id: str
    status: str
    message: str | None

    @property
    def alive(self) -> bool:
        return self.status in {JobStatus.PENDING.value, JobStatus.RUNNING.value}


class JobRunner:
    """Submits, follows and stops sweep drivers on a Ray cluster.

    Args:
        address: the Ray dashboard (job-submission) URL, e.g. ``http://127.0.0.1:8265``.
        python: the interpreter that runs the driver on the cluster (it must import ``sweeps``).
        tracking_uri: the MLflow tracking URI passed to the driver.
        storage_path: the Tune storage path passed to the driver.
        stop_grace_s: seconds Ray waits after SIGTERM before it kills the driver.
        mlflow_retry_window_s: how long the driver and trials ride out an MLflow outage (the
            service passes its setting, ``L0SWEEP_MLFLOW_RETRY_WINDOW_S``).
        timeout_s: how long :meth:`ping` waits for the job server's answer.

    Raises:
        RayVersionError: the installed Ray is not one l0sweep is tested on.
    """

    def __init__(
        self,
        address: str,
        *,
        python: str,
        tracking_uri: str,
        storage_path: str,
        stop_grace_s: int = 60,
        dashboard: str | None = None,
        mlflow_retry_window_s: float = 300.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.address = address.rstrip("/")
        # where users' browsers reach the dashboard (behind compose: not the internal address)
        self.dashboard = (dashboard or address).rstrip("/")
        self.python = python
        self.tracking_uri = tracking_uri
        self.storage_path = storage_path
        self.stop_grace_s = stop_grace_s
        self.mlflow_retry_window_s = mlflow_retry_window_s
        self.timeout_s = timeout_s
        self._client: JobClient | None = None
        raycompat.check_ray_version()

    @staticmethod
    def submission_id(sweep_id: str, attempt: int) -> str:
        return f"l0sweep-{sweep_id}-{attempt}"

    def entrypoint(self, sweep_id: str) -> str:
        argv = [
            self.python,
            "-m",
            "sweeps.driver",
            "--sweep-id",
            sweep_id,
            "--tracking-uri",
            self.tracking_uri,
            "--storage-path",
            self.storage_path,
        ]
        return shlex.join(argv)

    def runtime_env(self) -> dict:
        """The driver's (and so every trial's) runtime environment."""
        env = {
            "RAY_JOB_STOP_WAIT_TIME_S": str(self.stop_grace_s),
            **job_env(self.mlflow_retry_window_s),
        }
        return {"env_vars": env}

    def ping(self) -> None:
        """Raise `BackendUnavailable` unless the Ray job server answers a request now, within
        ``timeout_s`` (the job client, once built, sends nothing until it is used)."""
        base = self.address if "://" in self.address else f"http://{self.address}"
        url = f"{base}/api/version"
        try:
            raycompat.enable_token_auth()
            response = httpx.get(url, headers=raycompat.auth_headers(), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            self._client = None
            raise BackendUnavailable("Ray", f"{url}: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            self._client = None
            raise BackendUnavailable("Ray", f"{url} answered {response.status_code}")

    def submit(self, sweep_id: str, attempt: int) -> str:
        """Submit the sweep's driver; a second submission of the same attempt is a no-op.

        Returns:
            The submission id.
        """
        submission_id = self.submission_id(sweep_id, attempt)

        def submit(client: JobClient) -> str:
            try:
                return client.submit_job(
                    entrypoint=self.entrypoint(sweep_id),
                    submission_id=submission_id,
                    metadata={Tag.JOB_SWEEP_ID: sweep_id, Tag.JOB_SUBMISSION_ATTEMPT: str(attempt)},
                    runtime_env=self.runtime_env(),
                )
            except JobServerError:
                # Ray refuses a submission id it has seen: the attempt was submitted already
                # (the reconciler and the request racing, or a retry). Ray 2.x answers that with
                # a 500 that wraps its job agent's 400, so the job's existence decides, not the
                # status. Any other refusal has no job behind it, and is raised.
                if _exists(client, submission_id):
                    return submission_id
                raise

        return self._call(f"submit the driver of sweep {sweep_id}", submit)

    def state(self, submission_id: str) -> JobState | None:
        """The job's state, or None when the cluster does not know it (e.g. it was restarted)."""

        def info(client: JobClient) -> JobState | None:
            try:
                details = client.get_job_info(submission_id)
            except JobNotFound:
                return None
            return JobState(submission_id, str(details.status.value), details.message)

        return self._call(f"read job {submission_id}", info)

    def stop(self, submission_id: str) -> bool:
        """Ask the driver to stop (SIGTERM, graceful). False when the job is not running."""

        def stop(client: JobClient) -> bool:
            try:
                return client.stop_job(submission_id)
            except JobNotFound:
                return False

        return self._call(f"stop job {submission_id}", stop)

    def delete(self, submission_id: str) -> None:
        """Forget a finished job (its logs stay on disk); unknown jobs are ignored."""

        def delete(client: JobClient) -> None:
            with contextlib.suppress(JobNotFound):
                client.delete_job(submission_id)

        self._call(f"delete job {submission_id}", delete)

    def logs(self, submission_id: str) -> str | None:
        """The driver's log (stdout and stderr), or None when the cluster does not know the job."""

        def logs(client: JobClient) -> str | None:
            try:
                return client.get_job_logs(submission_id)
            except JobNotFound:
                return None

        return self._call(f"read the logs of job {submission_id}", logs)

    def dashboard_url(self, submission_id: str | None) -> str | None:
        if not submission_id or not self.dashboard.startswith(("http://", "https://")):
            return None
        return f"{self.dashboard}/#/jobs/{submission_id}"

    def _call(self, what: str, fn: Callable[[JobClient], T]) -> T:
        """``fn`` with the job client (built on first use); Ray unable to serve it is
        `BackendUnavailable`, anything else propagates as it is."""
        try:
            if self._client is None:
                raycompat.enable_token_auth()
                self._client = self._connect()
            return fn(self._client)
        except Exception as exc:
            if not raycompat.unreachable(exc):
                raise
            # A restarted head invalidates the client; build a new one on the next call.
            self._client = None
            logger.warning("Ray: could not %s: %s", what, _first_line(exc))
            raise BackendUnavailable("Ray", f"could not {what} at {self.address}") from exc

    def _connect(self) -> JobClient:
        return JobClient(self.address)


def _exists(client: JobClient, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
    except JobNotFound:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
