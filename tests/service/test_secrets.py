"""Tokens never reach a log or MLflow (issue 7).

`l0sweep serve` starts the whole stack (its own Ray head with token authentication, its own MLflow
server) with an API token and a Ray token that exist only for this test; a sweep runs through the
API. Then both strings are searched for, byte for byte, in the API's log, the driver's log as the
API serves it, everything the stack wrote (Ray's session directory with every process's log and
the job logs, MLflow's database, its artifacts and log, Tune's results) and everything MLflow
serves for the sweep (params, tags, metric names and every artifact of the parent and the trials).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.stack import free_port
from tests.service.conftest import TINY_SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Variables that would point `serve` at another stack instead of starting its own.
_FOREIGN = ("MLFLOW_TRACKING_URI", "L0SWEEP_TRACKING_URI", "L0SWEEP_RAY_ADDRESS", "RAY_ADDRESS")


class Stack:
    """`l0sweep serve` with everything under one short temporary directory (Unix socket paths)."""

    def __init__(self, root: Path, api_token: str, ray_token: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "api.log"
        self.headers = {"Authorization": f"Bearer {api_token}"}
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
        self.env = {
            **env,
            "L0SWEEP_TOKEN": api_token,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": ray_token,  # before ~/.ray/auth_token, for Ray and its clients
            "TMPDIR": str(root / "tmp"),  # the embedded Ray head's session directory goes here
            "L0SWEEP_STORAGE_PATH": str(root / "results"),
            "L0SWEEP_REFRESH_INTERVAL_S": "0.5",
        }
        self.argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                     "--num-cpus", "2", "--home", str(root / "home")]  # fmt: skip
        self.popen: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> None:
        (self.root / "tmp").mkdir()
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=3).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"the stack did not start: {self.log.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 150) -> None:
        """SIGTERM (the API stops, then MLflow and Ray in order); its processes are killed only if
        they outlive ``timeout_s``, by the ids this test's process tree had."""
        if self.popen is None or self.popen.poll() is not None:
            return
        tree = {pid: _started(pid) for pid in _descendants(self.popen.pid)}
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        for pid, started in tree.items():
            if started is not None and _started(pid) == started:  # the same process, not a reuse
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers=self.headers, timeout=30, **kwargs
        )


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (children of children, whatever their session)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for row in rows.split("\n"):
        if row.strip():
            child, parent = map(int, row.split())
            children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _started(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _hits(root: Path, needles: dict[str, bytes]) -> list[str]:
    """``"<needle name>: <file>"`` for every file under ``root`` holding a needle (never the needle
    itself: a failing assertion must not print a token)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.is_socket():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{name}: {path}" for name, needle in needles.items() if needle in data]
    return found


@pytest.fixture
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="l0s"))  # short: Ray's socket paths live below it
    # Both tokens long and random: a hit can only be a leak of this test's own strings.
    running = Stack(root, api_token=secrets.token_hex(24), ray_token=secrets.token_hex(32))
    try:
        running.start()
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_no_token_in_logs_or_mlflow(stack: Stack, tmp_path: Path) -> None:
    needles = {
        "the API token": stack.env["L0SWEEP_TOKEN"].encode(),
        "the Ray token": stack.env["RAY_AUTH_TOKEN"].encode(),
    }
    assert stack.api("GET", "/sweeps").status_code == 200
    assert httpx.get(f"{stack.url}/sweeps", timeout=10).status_code == 401  # the token is on
    spec = TINY_SPEC | {"name": "secrets", "tags": {"purpose": "token-leak-check"}}
    response = stack.api("POST", "/sweeps", json=spec)
    assert response.status_code == 202, response.text
    sweep_id = response.json()["id"]
    deadline = time.monotonic() + 300
    while (sweep := stack.api("GET", f"/sweeps/{sweep_id}").json())["status"] in {
        "PENDING",
        "RUNNING",
    }:
        assert time.monotonic() < deadline, sweep
        time.sleep(1)
    assert sweep["status"] == "FINISHED", sweep
    # Read everything a user can, so that whatever the API logs about it is in its log.
    for path in ("/sweeps", f"/sweeps/{sweep_id}/trials", f"/sweeps/{sweep_id}/pareto",
                 f"/sweeps/{sweep_id}/pareto?format=png", "/healthz"):  # fmt: skip
        assert stack.api("GET", path).status_code == 200, path
    driver_log = stack.api("GET", f"/sweeps/{sweep_id}/logs", params={"tail": 100_000}).text
    assert "FINISHED" in driver_log
    (tmp_path / "driver.log").write_text(driver_log)

    # Everything MLflow holds for the sweep, as its API serves it.
    tracking_uri = re.search(r"MLflow UI\s+(\S+)", stack.log.read_text()).group(1)
    client = MlflowClient(tracking_uri)
    parent = client.get_run(sweep_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    )
    assert len(children) == 2
    served = tmp_path / "mlflow"
    for run in [parent, *children]:
        run_dir = served / run.info.run_id
        run_dir.mkdir(parents=True)
        record = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        (run_dir / "record.txt").write_text(repr(record))
        client.download_artifacts(run.info.run_id, "", str(run_dir / "artifacts"))
    assert list((served / sweep_id / "artifacts").iterdir()), "the parent has artifacts"
    assert _hits(tmp_path, needles) == []

    # Everything the stack wrote: its processes' logs, Ray's session (every log, the job logs),
    # MLflow's database and artifacts, Tune's results. Stopped first, so that logs are flushed.
    stack.stop()
    assert "Ray head" in stack.log.read_text()
    assert list((stack.root / "tmp").rglob("job-driver-*.log")), "Ray's job logs were searched"
    assert list(stack.root.rglob("mlflow.db")), "MLflow's database was searched"
    assert _hits(stack.root, needles) == []
