"""Smoke test of the lab cluster's topology, as processes on loopback, through the containers'
own entrypoint scripts: PostgreSQL as MLflow's backend, `mlflow server` (mlflow.sh), a Ray head
with no CPUs (ray-head.sh), two Ray workers of one CPU each joined with `ray start --address`
(ray-worker.sh) and the API (api.sh), every one judged by healthcheck.sh. A small sweep submitted
over REST must finish, with trials on both workers and every trial in MLflow (and so in Postgres).
"""

from __future__ import annotations

import copy
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.stack import free_port
from tests.docker.conftest import (
    ENTRYPOINTS,
    Postgres,
    Process,
    cluster_environ,
    kill_marked,
    marked_pids,
    postgres_bindir,
    ray_dashboard_get,
    wait_until,
)
from tests.service.conftest import TINY_SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT_S = 240
SWEEP_TIMEOUT_S = 240
MAX_RESTARTS = 2


@dataclass
class Lab:
    api_url: str
    api_token: str
    mlflow_uri: str
    dashboard_url: str
    ray_token: str
    artifacts: Path
    postgres: Postgres
    processes: list[Process]

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self.api_token}"},
            timeout=30,
        )

    def ray_get(self, path: str, **params: str) -> dict:
        return ray_dashboard_get(self.dashboard_url, self.ray_token, path, **params)


def _healthy(role: str, process: Process) -> bool:
    """The compose health check of ``role``, run with the process's own environment."""
    done = subprocess.run(
        [str(ENTRYPOINTS / "healthcheck.sh"), role],
        env=process.env,
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def _entrypoint(name: str, script: str, env: dict[str, str], logs: Path) -> Process:
    return Process(name, [str(ENTRYPOINTS / script)], env, logs / f"{name}.log").start()


def _wait_healthy(role: str, process: Process, processes: list[Process]) -> None:
    """Wait for the health check of ``role``; a process that exits is started again, at most
    MAX_RESTARTS times, as the compose file's `restart: unless-stopped` would (a Ray node
    whose raylet does not register within Ray's fixed 30 s exits, which a busy 2-core machine
    can cause)."""
    restarts = 0

    def check() -> bool:
        nonlocal restarts
        if not process.running and restarts < MAX_RESTARTS:
            restarts += 1
            print(f"{process.name} exited ({process.popen.returncode}); restart {restarts}")
            process.start()
        return _healthy(role, process)

    wait_until(check, f"health check of {process.name}", START_TIMEOUT_S, processes)


@pytest.fixture(scope="module")
def lab(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    marker = uuid.uuid4().hex
    logs = tmp_path_factory.mktemp("lab-logs")
    shared = tmp_path_factory.mktemp("lab-shared")
    artifacts = tmp_path_factory.mktemp("lab-artifacts")
    # Ray's session files need a short path (Unix socket names are limited to ~100 characters).
    ray_temp = tempfile.mkdtemp(prefix="l0d-ray-")
    ray_token, api_token = secrets.token_hex(32), secrets.token_hex(32)
    mlflow_port, gcs_port, dashboard_port, api_port = (free_port() for _ in range(4))
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    common = {
        "L0SWEEP_STORAGE_PATH": str(shared / "ray_results"),
        "L0SWEEP_DATA_DIR": str(shared / "data"),
        "L0SWEEP_WAIT_TIMEOUT_S": str(START_TIMEOUT_S),
        "L0SWEEP_WAIT_INTERVAL_S": "1",
    }
    # No RAY_NODE_IP_ADDRESS: on Linux Ray replaces a loopback address with this host's own
    # interface address, so the nodes talk over that (the traffic stays on this machine).
    ray_node = {
        **common,
        "RAY_AUTH_TOKEN": ray_token,
        "RAY_OBJECT_STORE_MEMORY": str(200 * 1024**2),
        # A SIGTERMed node waits up to this long for its work to drain (30 s by default).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
    }

    def node_ports() -> dict[str, str]:
        # Several nodes share this host's network: each needs its own agent and metrics ports.
        return {
            "RAY_DASHBOARD_AGENT_LISTEN_PORT": str(free_port()),
            "RAY_DASHBOARD_AGENT_GRPC_PORT": str(free_port()),
            "RAY_RUNTIME_ENV_AGENT_PORT": str(free_port()),
            "RAY_METRICS_EXPORT_PORT": str(free_port()),
        }

    mlflow_env = cluster_environ(
        marker,
        **common,
        **postgres.env(),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(mlflow_port),
        MLFLOW_WORKERS="1",
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
    )
    head_env = cluster_environ(
        marker,
        **ray_node,
        **node_ports(),
        RAY_NUM_CPUS="0",
        RAY_GCS_PORT=str(gcs_port),
        RAY_DASHBOARD_HOST="127.0.0.1",
        RAY_DASHBOARD_PORT=str(dashboard_port),
        RAY_CLIENT_SERVER_PORT=str(free_port()),
        RAY_TEMP_DIR=ray_temp,
    )
    worker_envs = [
        cluster_environ(
            marker,
            **ray_node,
            **node_ports(),
            RAY_NUM_CPUS="1",
            RAY_HEAD_ADDRESS=f"127.0.0.1:{gcs_port}",
        )
        for _ in range(2)
    ]
    api_env = cluster_environ(
        marker,
        **common,
        RAY_AUTH_TOKEN=ray_token,
        L0SWEEP_TOKEN=api_token,
        L0SWEEP_HOST="127.0.0.1",
        L0SWEEP_PORT=str(api_port),
        L0SWEEP_RAY_ADDRESS=dashboard,
        L0SWEEP_TRACKING_URI=mlflow_uri,
        L0SWEEP_HOME=str(shared / "api-home"),
        L0SWEEP_REFRESH_INTERVAL_S="0.5",
        L0SWEEP_RECONCILE_INTERVAL_S="2",
    )

    processes: list[Process] = []
    started = time.monotonic()
    try:
        # In the order of the compose file's `depends_on: service_healthy` (postgres is up):
        # MLflow and the head, then the workers, then the API. Each entrypoint still waits for
        # what it needs by itself. The workers start one after the other: nodes on one host
        # share the head's session directory, and two raylets starting at once there can pick
        # the same socket names (in containers each node has its own).
        waves = [
            [("mlflow", "mlflow.sh", mlflow_env), ("ray-head", "ray-head.sh", head_env)],
            *([("ray-worker", "ray-worker.sh", env)] for env in worker_envs),
            [("api", "api.sh", api_env)],
        ]
        for wave in waves:
            batch = [
                (role, _entrypoint(f"{len(processes) + i}-{role}", script, env, logs))
                for i, (role, script, env) in enumerate(wave)
            ]
            processes += [process for _, process in batch]
            for role, process in batch:
                _wait_healthy(role, process, processes)
        print(f"lab cluster healthy after {time.monotonic() - started:.0f} s")
        yield Lab(
            api_url=f"http://127.0.0.1:{api_port}",
            api_token=api_token,
            mlflow_uri=mlflow_uri,
            dashboard_url=dashboard,
            ray_token=ray_token,
            artifacts=artifacts,
            postgres=postgres,
            processes=processes,
        )
    finally:
        for process in reversed(processes):
            process.stop()
        leftovers = kill_marked(marker)
        # Ray's own logs (raylets, GCS, drivers) stay with the test's logs for a post-mortem.
        session_logs = Path(ray_temp) / "session_latest" / "logs"
        if session_logs.is_dir():
            shutil.copytree(session_logs, logs / "ray-session", dirs_exist_ok=True)
        shutil.rmtree(ray_temp, ignore_errors=True)
        assert not marked_pids(marker), "processes of the lab cluster survived SIGKILL"
        if leftovers:
            print(f"killed {len(leftovers)} processes left after the entrypoints stopped")


def test_sweep_over_rest_runs_on_both_workers_and_lands_in_mlflow(lab: Lab) -> None:
    nodes = lab.ray_get("/api/v0/nodes")["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == 3, nodes
    head_ids = {n["node_id"] for n in alive if n["is_head_node"]}
    assert len(head_ids) == 1

    assert httpx.get(f"{lab.api_url}/sweeps", timeout=10).status_code == 401
    spec = copy.deepcopy(TINY_SPEC) | {"name": "lab-smoke", "experiment": "l0sweep-lab-smoke"}
    spec["resources"] = {"cpus_per_trial": 1}  # both trials at once, one on each worker
    with lab.api() as api:
        health = api.get("/healthz").json()
        assert health["status"] == "ok", health
        response = api.post("/sweeps", json=spec)
        assert response.status_code == 202, response.text
        sweep = response.json()
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while (state := api.get(f"/sweeps/{sweep['id']}").json())["status"] in {
            "PENDING",
            "RUNNING",
        }:
            assert time.monotonic() < deadline, f"sweep not done in {SWEEP_TIMEOUT_S} s: {state}"
            assert all(p.running for p in lab.processes), "a cluster process died mid-sweep"
            time.sleep(1)
        assert state["status"] == "FINISHED", api.get(f"/sweeps/{sweep['id']}/logs").text
        assert state["progress"]["finished"] == 2
        trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
    assert len(trials) == 2

    # The trials ran on two different nodes, neither of them the head (which has no CPUs). Tune
    # runs a function trainable's trials as ImplicitFunc actors; Ray keeps dead actors listed.
    actors = lab.ray_get("/api/v0/actors", detail="true", limit="1000")["data"]["result"]["result"]
    trial_nodes = {a["node_id"] for a in actors if a["class_name"] == "ImplicitFunc"}
    assert len(trial_nodes) == 2, [(a["class_name"], a["node_id"]) for a in actors]
    assert not trial_nodes & head_ids

    # Every trial is a finished child run in MLflow, its model uploaded through the server.
    client = MlflowClient(lab.mlflow_uri)
    children = client.search_runs(
        [sweep["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sweep['id']}'"
    )
    assert sorted(c.info.run_id for c in children) == sorted(t["run_id"] for t in trials)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all("val_accuracy" in c.data.metrics for c in children)
    uploaded = list(lab.artifacts.rglob("state_dict.pt"))
    assert len(uploaded) == 2, uploaded

    # ...and MLflow keeps them in PostgreSQL.
    with lab.postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM runs WHERE experiment_id = %s", (sweep["experiment_id"],)
        )
        assert cursor.fetchone()[0] == 3


def test_mlflow_restarts_with_a_schema_upgrade_and_its_backup_restores(
    lab: Lab, tmp_path: Path
) -> None:
    """What the README's "Lab cluster" tells an admin: MLFLOW_DB_UPGRADE=true migrates the database on a
    restart without losing runs, and a pg_dump of it restores into an empty database."""
    client = MlflowClient(lab.mlflow_uri)

    def run_ids() -> set[str]:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return {r.info.run_id for r in client.search_runs(experiments, max_results=1000)}

    before = run_ids()
    mlflow = lab.processes[0]
    assert mlflow.name.endswith("mlflow")
    mlflow.stop()
    mlflow.env = {**mlflow.env, "MLFLOW_DB_UPGRADE": "true"}
    mlflow.start()
    wait_until(lambda: _healthy("mlflow", mlflow), "MLflow restart", START_TIMEOUT_S, [mlflow])
    assert run_ids() == before
    assert "migrating the MLflow database" in mlflow.log.read_text()

    pg = lab.postgres
    bindir = postgres_bindir()
    env = {**cluster_environ(uuid.uuid4().hex), "PGPASSWORD": pg.password}
    login = ["-h", pg.host, "-p", str(pg.port), "-U", pg.user]
    dump = tmp_path / "mlflow.dump"
    dumped = subprocess.run(
        [str(bindir / "pg_dump"), *login, "-d", pg.db, "--format=custom", "-f", str(dump)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dumped.returncode == 0, dumped.stderr
    connection = pg.connect("postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("CREATE DATABASE restored")
    connection.close()
    restored = subprocess.run(
        [str(bindir / "pg_restore"), *login, "-d", "restored", "--no-owner", str(dump)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, restored.stderr
    counts = []
    for db in (pg.db, "restored"):
        with pg.connect(db) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            counts.append(cursor.fetchone()[0])
        connection.close()
    assert counts[0] == counts[1] == len(before)
