"""The entrypoints' failures: a missing setting, a dependency that never answers, a password the
database refuses. Each must end the container quickly, non-zero, with a message naming the cause.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from service.stack import free_port
from tests.docker.conftest import ENTRYPOINTS, Postgres, cluster_environ, kill_marked


def run_entrypoint(script: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    marker = uuid.uuid4().hex
    try:
        return subprocess.run(
            [str(ENTRYPOINTS / script)],
            env=cluster_environ(marker, **env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    finally:
        kill_marked(marker)


def test_api_refuses_to_start_without_its_token() -> None:
    done = run_entrypoint("api.sh", RAY_AUTH_TOKEN="x")
    assert done.returncode == 1
    assert "L0SWEEP_TOKEN is not set" in done.stderr


@pytest.mark.parametrize("script", ["api.sh", "ray-head.sh", "ray-worker.sh"])
def test_ray_processes_refuse_to_start_without_the_cluster_token(script: str) -> None:
    done = run_entrypoint(script, L0SWEEP_TOKEN="x")
    assert done.returncode == 1
    assert "no Ray auth token: set RAY_AUTH_TOKEN" in done.stderr


def test_worker_gives_up_on_a_head_that_never_answers() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_entrypoint(
        "ray-worker.sh",
        RAY_AUTH_TOKEN="x",
        RAY_HEAD_ADDRESS=address,
        L0SWEEP_WAIT_TIMEOUT_S="3",
        L0SWEEP_WAIT_INTERVAL_S="1",
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert f"the Ray head at {address} did not answer within 3 s" in done.stderr


def test_worker_rejects_a_head_address_without_a_port() -> None:
    done = run_entrypoint("ray-worker.sh", RAY_AUTH_TOKEN="x", RAY_HEAD_ADDRESS="ray-head")
    assert done.returncode == 1
    assert "RAY_HEAD_ADDRESS=ray-head is not HOST:PORT" in done.stderr


def test_mlflow_needs_the_database_password() -> None:
    done = run_entrypoint("mlflow.sh")
    assert done.returncode == 1
    assert "POSTGRES_PASSWORD is not set" in done.stderr


def test_health_check_fails_on_a_port_nothing_listens_on() -> None:
    done = run_entrypoint("healthcheck.sh", L0SWEEP_PORT=str(free_port()))
    assert done.returncode == 1 and "usage: healthcheck.sh" in done.stderr
    args = [str(ENTRYPOINTS / "healthcheck.sh"), "api"]
    env = cluster_environ(uuid.uuid4().hex, L0SWEEP_PORT=str(free_port()))
    unhealthy = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert unhealthy.returncode == 1 and "unhealthy" in unhealthy.stderr


@pytest.mark.integration
def test_mlflow_gives_up_at_once_on_a_refused_password(postgres: Postgres) -> None:
    started = time.monotonic()
    done = run_entrypoint(
        "mlflow.sh", **{**postgres.env(), "POSTGRES_PASSWORD": "not-the-password"}
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert "password authentication failed" in done.stderr
    assert "refused us" in done.stderr
