"""Ray's and MLflow's failures are told apart by type: Ray or MLflow unable to serve is a 503
(`BackendUnavailable`); Ray's answers (no such job, a submission it has) are answers; our own bugs
propagate as themselves (a 500 with a traceback), never as "Ray is unavailable".

Ray's job server is played by a small HTTP server speaking its REST API (the SDK's requests are
real); the real-cluster behaviour is covered by test_reconcile, test_faults and test_lifecycle.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from service.errors import BackendUnavailable, Conflict
from service.jobs import JobRunner
from service.record import MlflowErrors
from service.stack import free_port
from sweeps import raycompat

pytestmark = pytest.mark.fast

Answer = tuple[int, object]


class _FakeJobServer:
    """Ray's job REST API on a free port; ``routes`` maps (method, path) to (status, body)."""

    def __init__(self, routes: dict[tuple[str, str], Answer]) -> None:
        self.routes = {("GET", "/api/version"): (200, {"ray_version": "2.60.0", "version": "4"}),
                       **routes}  # fmt: skip
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                key = (self.command, self.path)
                outer.seen.append(key)
                status, body = outer.routes.get(key, (404, "Not Found"))
                data = (json.dumps(body) if not isinstance(body, str) else body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def do_DELETE(self) -> None:
                self._answer()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ray_at() -> Iterator[Callable[[dict[tuple[str, str], Answer]], JobRunner]]:
    servers: list[_FakeJobServer] = []

    def make(routes: dict[tuple[str, str], Answer]) -> JobRunner:
        servers.append(_FakeJobServer(routes))
        return JobRunner(servers[-1].url, python="python", tracking_uri="sqlite://",
                         storage_path="/tmp", timeout_s=2)  # fmt: skip

    yield make
    for server in servers:
        server.close()


SID = JobRunner.submission_id("a" * 32, 0)
JOB = {"type": "SUBMISSION", "submission_id": SID, "entrypoint": "python", "status": "RUNNING"}


def test_an_unknown_job_is_an_answer_whatever_the_text(ray_at):
    """A 404 is "no such job" by its status; before, only a message saying "does not exist" was."""
    jobs = ray_at({("GET", f"/api/jobs/{SID}"): (404, "Not Found")})
    assert jobs.state(SID) is None
    assert jobs.logs(SID) is None
    assert jobs.stop(SID) is False
    jobs.delete(SID)


@pytest.mark.parametrize(
    "refusal",
    [
        (400, "ValueError: refused"),
        # Ray 2.x: the job head wraps its agent's 400 in a 500 (the reconciler and a request
        # submitting the same attempt at once); before, that was "Ray is unavailable" and the
        # new sweep was undone.
        (500, "RuntimeError: Request failed with status code 400: ValueError: Job with "
              f"submission_id {SID} already exists. Please use a different submission_id."),
    ],
)  # fmt: skip
def test_a_submission_ray_already_has_is_a_no_op(ray_at, refusal):
    """Ray refuses a submission id it has; the job is there, so the submit is done."""
    jobs = ray_at({("POST", "/api/jobs/"): refusal, ("GET", f"/api/jobs/{SID}"): (200, JOB)})
    assert jobs.submit("a" * 32, 0) == SID


def test_a_refused_submission_is_not_ray_unavailable(ray_at):
    """A refusal with no job behind it is a bug of our request: raised as Ray's answer."""
    jobs = ray_at({("POST", "/api/jobs/"): (400, "TypeError: bad runtime_env")})
    with pytest.raises(raycompat.JobServerError) as err:
        jobs.submit("a" * 32, 0)
    assert err.value.status_code == 400 and "bad runtime_env" in str(err.value)


@pytest.mark.parametrize(
    "routes",
    [
        {("GET", f"/api/jobs/{SID}"): (503, "overloaded")},  # the job server fails
        {("GET", "/api/version"): (404, "Not Found")},  # no Ray job server at the address
        {("GET", "/api/version"): (500, "Internal Server Error")},
    ],
)
def test_ray_unable_to_serve_is_backend_unavailable(ray_at, routes):
    jobs = ray_at(routes)
    with pytest.raises(BackendUnavailable) as err:
        jobs.state(SID)
    assert err.value.backend == "Ray"


def test_nothing_listening_is_backend_unavailable():
    jobs = JobRunner(f"http://127.0.0.1:{free_port()}", python="python", tracking_uri="sqlite://",
                     storage_path="/tmp", timeout_s=2)  # fmt: skip
    with pytest.raises(BackendUnavailable):
        jobs.state(SID)


@pytest.mark.parametrize("bug", [RuntimeError("our bug"), ValueError("our bug"), KeyError("x")])
def test_our_bugs_are_not_ray_unavailable(bug):
    """Before, any RuntimeError or ValueError became 503 "Ray is unavailable"."""

    class Broken:
        def get_job_info(self, submission_id: str) -> None:
            raise bug

    jobs = JobRunner("http://127.0.0.1:1", python="python", tracking_uri="sqlite://",
                     storage_path="/tmp")  # fmt: skip
    jobs._client = Broken()  # type: ignore[assignment]
    with pytest.raises(type(bug), match=r"our bug|x"):
        jobs.state(SID)


def test_a_ray_outside_the_tested_range_is_refused_at_start_up():
    raycompat.check_ray_version("2.60.0")
    with pytest.raises(raycompat.RayVersionError, match=r"Ray 2\.61\.0 is installed.*<2\.61"):
        raycompat.check_ray_version("2.61.0")
    with pytest.raises(raycompat.RayVersionError, match=r"2\.40\.0"):
        raycompat.check_ray_version("2.40.0")


def _in_mlflow_errors(exc: BaseException) -> None:
    with MlflowErrors("read a sweep"):
        raise exc


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError("refused"),
        TimeoutError("timed out"),
        requests.ConnectionError("reset"),
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE),
    ],
)
def test_mlflow_unable_to_serve_is_backend_unavailable(exc):
    with pytest.raises(BackendUnavailable) as err:
        _in_mlflow_errors(exc)
    assert err.value.backend == "MLflow"


@pytest.mark.parametrize("exc", [FileNotFoundError("/no/such/file"), PermissionError("denied")])
def test_a_local_oserror_is_not_mlflow_down(exc):
    """Before, any OSError (a missing local file, say) answered 503 "MLflow is down"."""
    with pytest.raises(type(exc)):
        _in_mlflow_errors(exc)


def test_mlflow_refusals_and_not_found_are_answers():
    with pytest.raises(Conflict, match="MLflow refused to read a sweep: bad key"):
        _in_mlflow_errors(MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE))
    missing = MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST)
    with pytest.raises(MlflowException) as err:
        _in_mlflow_errors(missing)
    assert err.value is missing
