"""Fixtures: a real MLflow server for the session (beside the session's Ray head, in
``tests/conftest.py``), apps built on them.

Both are started by the stack module itself (`ray start --head --block`, `mlflow server`), on
free loopback ports, in temporary directories; no mocks of either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from service.app import create_app
from service.settings import Settings
from service.stack import free_port
from sweeps import raycompat

TINY_SPEC = {
    "name": "tiny-digits",
    "experiment": "l0sweep-tests",
    "model": {"name": "mlp", "params": {"hidden": [16]}},
    "dataset": {"name": "digits"},
    "regularizer": {"kind": "l0", "lam": {"grid": [0.01, 0.1]}},
    "train": {"epochs": 1, "batch_size": 64},
    # One trial at a time: the second reuses the first one's Ray worker (Tune's reuse_actors) and
    # skips its start-up, about 5 s of CPU (torch, MLflow and Ray Tune's imports) on a machine the
    # suite keeps busy. Tests that need both trials running at once set their own resources.
    "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep a tally test (marker ``tally``) after the tests of its module that it counts, in any
    order the suite runs in (pytest-randomly shuffles before this hook)."""
    for tally in [item for item in items if item.get_closest_marker("tally")]:
        items.remove(tally)
        same = [i for i, item in enumerate(items) if item.module is tally.module]
        items.insert(same[-1] + 1 if same else len(items), tally)


@pytest.fixture(scope="session")
def storage_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("ray_results"))


@pytest.fixture(scope="session")
def dead_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def make_settings(mlflow_uri: str, ray_address: str, storage_path: str):
    def make(**overrides) -> Settings:
        values = {
            "ray_address": ray_address,
            "tracking_uri": mlflow_uri,
            "storage_path": storage_path,
            "refresh_interval_s": 0.5,
            "reconcile_interval_s": 2.0,
            "stop_grace_s": 30,
            **overrides,
        }
        return Settings(**values)

    return make


@pytest.fixture
def make_api(make_settings):
    """``with make_api(**settings) as api:`` a TestClient on a fresh app (lifespan included)."""

    def make(**overrides) -> TestClient:
        return TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)

    return make


@pytest.fixture
def api(make_api) -> Iterator[TestClient]:
    with make_api() as client:
        yield client


@pytest.fixture
def mlflow_client(mlflow_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_uri)


def wait_for(poll, until, timeout_s: float = 240, every_s: float = 1.0, what: str = ""):
    """``poll()`` every ``every_s`` until ``until(value)``; returns that value, or fails the test
    after ``timeout_s`` showing the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = poll()
        if until(value):
            return value
        waiting = f" waiting {what}" if what else ""
        assert time.monotonic() < deadline, f"timed out{waiting}; last: {value}"
        time.sleep(every_s)


def count_sweep_runs(client: MlflowClient) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`l0sweep.kind` = 'sweep'", max_results=1000)
    return len(runs)


def alive_actors(ray_address: str) -> list[str]:
    """Class names of the cluster's live actors, Ray's job supervisors excepted."""
    response = httpx.get(
        f"{ray_address}/api/v0/actors",
        params={"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"},
        headers=raycompat.auth_headers(),
        timeout=10,
    )
    response.raise_for_status()
    actors = response.json()["data"]["result"]["result"]
    return [a["class_name"] for a in actors if "JobSupervisor" not in a["class_name"]]


class ApiProcess:
    """`l0sweep serve` joined to the session's Ray and MLflow, as a separate process."""

    def __init__(self, ray_address: str, mlflow_uri: str, storage_path: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "L0SWEEP_STORAGE_PATH": storage_path,
            "L0SWEEP_REFRESH_INTERVAL_S": "0.5",
            "L0SWEEP_RECONCILE_INTERVAL_S": "2",
        }
        self.argv = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(self.port),
            "--ray-address",
            ray_address,
            "--mlflow-uri",
            mlflow_uri,
        ]
        self.log = log
        self.popen: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> ApiProcess:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.popen.poll() is None, self.log.read_text()
            time.sleep(0.3)
        raise AssertionError(f"API did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
