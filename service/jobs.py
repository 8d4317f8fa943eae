"""Sweeps as Ray Jobs: the driver of each sweep runs in its own job, never in the service.

Tune installs signal handlers and wants the main thread (ray-project/ray issues 18920, 50358),
so the service submits ``python -m sweeps.driver --sweep-id ID`` through Ray's job-submission API.
The submission id is derived from the sweep id and an attempt number: a retried submission of the
same attempt is refused by Ray instead of launching a second driver. Stopping a job sends the
driver SIGTERM, which the driver turns into Tune's graceful stop; ``stop_grace_s`` is how long Ray
waits before it kills the driver. The job's runtime environment carries the MLflow retry window
(``L0SWEEP_MLFLOW_RETRY_WINDOW_S``, `sweeps.config.mlflow_client_env`) to the driver and to every
trial on every node: the service's setting is the one that counts, whatever the nodes' own.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass

import httpx
import requests
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available,
)
from ray._private.authentication.http_token_authentication import (
    get_auth_headers_if_auth_enabled,
)
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from service.errors import BackendUnavailable
from sweeps.config import mlflow_client_env
from sweeps.vocabulary import Tag

__all__ = ["JobRunner", "JobState", "enable_ray_token_auth"]

logger = logging.getLogger(__name__)


def enable_ray_token_auth() -> None:
    """Send Ray's auth token the way the ``ray`` CLI does.

    Ray turns token authentication on for a cluster when ``RAY_AUTH_MODE=token`` or a token file
    (``~/.ray/auth_token``) exists; a client process must opt in the same way before its job
    requests carry the token.
    """
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


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
        mlflow_retry_window_s: how long the driver and trials ride out an MLflow outage; default:
            ``L0SWEEP_MLFLOW_RETRY_WINDOW_S`` as this process sees it when a job is submitted.
        timeout_s: how long :meth:`ping` waits for the job server's answer.
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
        mlflow_retry_window_s: float | None = None,
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
        self._client: JobSubmissionClient | None = None

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
            **mlflow_client_env(self.mlflow_retry_window_s),
        }
        return {"env_vars": env}

    def ping(self) -> None:
        """Raise `BackendUnavailable` unless the Ray job server answers a request now, within
        ``timeout_s`` (the job client, once built, sends nothing until it is used)."""
        base = self.address if "://" in self.address else f"http://{self.address}"
        url = f"{base}/api/version"
        try:
            enable_ray_token_auth()
            response = httpx.get(
                url, headers=get_auth_headers_if_auth_enabled({}), timeout=self.timeout_s
            )
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

        def submit(client: JobSubmissionClient) -> str:
            try:
                return client.submit_job(
                    entrypoint=self.entrypoint(sweep_id),
                    submission_id=submission_id,
                    metadata={Tag.JOB_SWEEP_ID: sweep_id, Tag.JOB_SUBMISSION_ATTEMPT: str(attempt)},
                    runtime_env=self.runtime_env(),
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return submission_id
                raise

        return self._call(f"submit the driver of sweep {sweep_id}", submit)

    def state(self, submission_id: str) -> JobState | None:
        """The job's state, or None when the cluster does not know it (e.g. it was restarted)."""

        def info(client: JobSubmissionClient) -> JobState | None:
            try:
                details = client.get_job_info(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return None
                raise
            return JobState(submission_id, str(details.status.value), details.message)

        return self._call(f"read job {submission_id}", info)

    def stop(self, submission_id: str) -> bool:
        """Ask the driver to stop (SIGTERM, graceful). False when the job is not running."""

        def stop(client: JobSubmissionClient) -> bool:
            try:
                return client.stop_job(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return False
                raise

        return self._call(f"stop job {submission_id}", stop)

    def delete(self, submission_id: str) -> None:
        """Forget a finished job (its logs stay on disk); unknown jobs are ignored."""

        def delete(client: JobSubmissionClient) -> None:
            try:
                client.delete_job(submission_id)
            except RuntimeError as exc:
                if "does not exist" not in str(exc):
                    raise

        self._call(f"delete job {submission_id}", delete)

    def logs(self, submission_id: str) -> str | None:
        """The driver's log (stdout and stderr), or None when the cluster does not know the job."""

        def logs(client: JobSubmissionClient) -> str | None:
            try:
                return client.get_job_logs(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return None
                raise

        return self._call(f"read the logs of job {submission_id}", logs)

    def dashboard_url(self, submission_id: str | None) -> str | None:
        if not submission_id or not self.dashboard.startswith(("http://", "https://")):
            return None
        return f"{self.dashboard}/#/jobs/{submission_id}"

    def _call(self, what: str, fn):
        try:
            if self._client is None:
                enable_ray_token_auth()
                self._client = JobSubmissionClient(self.address)
            return fn(self._client)
        except (
            ConnectionError,
            requests.RequestException,
            RuntimeError,
            ValueError,
            AuthenticationError,
        ) as exc:
            # A restarted head invalidates the client; build a new one on the next call.
            self._client = None
            logger.warning("Ray: could not %s: %s", what, _first_line(exc))
            raise BackendUnavailable("Ray", f"could not {what} at {self.address}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
