"""The lab cluster for real: the project's image built and docker/compose.yaml brought up on a
real Docker engine (tests/docker/engine.py: an engine that answers, or a private dockerd started
and stopped here; images made from Debian packages, no registry), with two CPU workers and a
generated .env. Then, over HTTP with the bearer token, what the README promises an admin:

- a sweep finishes with its trials on both workers and none on the head, every trial a nested
  run in MLflow, and PostgreSQL holding them;
- a worker container killed mid-sweep: its trial is retried on the other worker
  (``resources.max_failures``) and the sweep finishes with nothing lost;
- `docker compose restart api` mid-sweep: the sweep goes on and the API answers for it after;
- the README's backup (`pg_dump` through `compose exec`) restored into a fresh stack brings the
  sweeps back, and `down -v` leaves no container, volume or network;
- a missing secret in .env: `docker compose up` refuses and names it.

Skipped, with the reason, only where no engine can be had (not root and none answering, or no
docker.io/debootstrap). tests/docker/test_cluster.py runs the same topology as plain processes
where there is no engine.
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.docker.build import base_image, postgres_image, project_image, site_image
from tests.docker.engine import Engine, EngineUnavailable, docker_engine
from tests.docker.lab import Stack, wait_for, write_env
from tests.service.conftest import TINY_SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRETS = ("L0SWEEP_TOKEN", "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")
ACTIVE = {"PENDING", "RUNNING"}
SWEEP_TIMEOUT_S = 420
# Long enough trials to act mid-way: digits, batch 4, about a second an epoch on one CPU.
EPOCHS = 30


@pytest.fixture(scope="module")
def engine(compose: list[str]) -> Iterator[Engine]:
    try:
        context = docker_engine(compose)
        engine = context.__enter__()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    try:
        engine.remove_stale_projects()
        yield engine
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def images(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every image the stack needs, built (or found in the engine's cache); the PostgreSQL
    image's name."""
    started = time.monotonic()
    try:
        base_image(engine)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    site_image(engine)
    image = postgres_image(engine)
    env_file = tmp_path_factory.mktemp("build") / "build.env"
    write_env(env_file, image)
    project_image(engine, env_file)
    print(f"images ready after {time.monotonic() - started:.0f} s")
    return image


@pytest.fixture(scope="module")
def stack(engine: Engine, images: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    lab = Stack.create(engine, tmp_path_factory.mktemp("lab"), images)
    started = time.monotonic()
    try:
        lab.up("--scale", "ray-worker=2")
        print(f"stack {lab.name} healthy after {time.monotonic() - started:.0f} s")
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lab(stack: Stack) -> Stack:
    """The stack with both workers up (a test before may have killed one)."""
    stack.up("--scale", "ray-worker=2")
    return stack


def _spec(name: str, epochs: int, lam: list[float], max_failures: int = 0) -> dict[str, Any]:
    spec = copy.deepcopy(TINY_SPEC) | {"name": name, "experiment": f"lab-{name}"}
    spec["regularizer"] = {"kind": "l0", "lam": {"grid": lam}}
    spec["train"] = {"epochs": epochs, "batch_size": 4 if epochs > 3 else 64}
    spec["resources"] = {"cpus_per_trial": 1, "max_failures": max_failures}
    return spec


def _submit(lab: Stack, spec: dict[str, Any]) -> dict[str, Any]:
    with lab.api() as api:
        response = api.post("/sweeps", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def _sweep(lab: Stack, sweep_id: str) -> dict[str, Any]:
    with lab.api() as api:
        response = api.get(f"/sweeps/{sweep_id}")
    response.raise_for_status()
    return response.json()


def _wait_done(lab: Stack, sweep_id: str) -> dict[str, Any]:
    return wait_for(
        lambda: _sweep(lab, sweep_id),
        lambda s: s["status"] not in ACTIVE,
        f"sweep {sweep_id} to end",
        SWEEP_TIMEOUT_S,
        lab,
        every_s=2,
    )


def _listed(lab: Stack) -> dict[str, str]:
    """Sweep id -> status, as GET /sweeps lists them."""
    with lab.api() as api:
        response = api.get("/sweeps", params={"limit": 500})
    response.raise_for_status()
    return {s["id"]: s["status"] for s in response.json()["items"]}


def _children(lab: Stack, sweep: dict[str, Any]) -> dict[str, Any]:
    """The sweep's nested MLflow runs by trial id."""
    client = MlflowClient(lab.mlflow_uri)
    runs = client.search_runs(
        [sweep["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sweep['id']}'"
    )
    return {r.data.tags["l0sweep.trial_id"]: r for r in runs}


def _midway(lab: Stack, sweep: dict[str, Any], trials: int) -> dict[str, Any]:
    """Wait until ``trials`` trials are running past their second epoch, each on its own node."""

    def poll() -> tuple[dict[str, float], list[dict[str, Any]]]:
        epochs = {
            t: r.data.metrics.get("epoch", 0)
            for t, r in _children(lab, sweep).items()
            if r.info.status == "RUNNING"
        }
        alive = [a for a in lab.trial_actors(sweep["job_id"]) if a["state"] == "ALIVE"]
        return epochs, alive

    def ready(value: tuple[dict[str, float], list[dict[str, Any]]]) -> bool:
        epochs, alive = value
        return (
            len(epochs) == trials
            and all(2 <= e <= EPOCHS - 10 for e in epochs.values())
            and len({a["node_id"] for a in alive}) == trials
        )

    epochs, alive = wait_for(poll, ready, "trials running mid-way", SWEEP_TIMEOUT_S, lab, 0.5)
    return {"epochs": epochs, "actors": alive}


def test_missing_secrets_stop_compose_up_naming_them(engine: Engine, tmp_path: Path) -> None:
    for secret in SECRETS:
        lab = Stack.create(engine, tmp_path, "unused", **{secret: None})
        done = lab.compose("up", "-d", "--no-build", check=False)
        assert done.returncode != 0, done.stdout
        assert f"set {secret} in docker/.env" in done.stderr, done.stderr
        assert lab.leftovers() == {}


def test_sweep_runs_on_both_workers_and_lands_in_mlflow_and_postgres(lab: Stack) -> None:
    nodes = lab.node_ips()
    workers = {lab.container_ip(c) for c in lab.containers("ray-worker")}
    (head,) = [lab.container_ip(c) for c in lab.containers("ray-head")]
    assert sorted(nodes.values()) == sorted([head, *workers]), (nodes, head, workers)

    assert httpx.get(f"{lab.api_url}/sweeps", timeout=30).status_code == 401
    sweep = _submit(lab, _spec("both-workers", epochs=2, lam=[0.001, 0.01, 0.1, 1.0]))
    done = _wait_done(lab, sweep["id"])
    assert done["status"] == "FINISHED", done
    assert done["progress"]["finished"] == 4 and done["progress"]["failed"] == 0, done

    # Every trial ran in a worker container, both workers had some, the head none.
    trial_ips = {nodes[a["node_id"]] for a in lab.trial_actors(done["job_id"])}
    assert trial_ips == workers, (trial_ips, workers, head)

    # Every trial is a finished nested run in MLflow...
    with lab.api() as api:
        trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
    runs = _children(lab, done)
    assert sorted(r.info.run_id for r in runs.values()) == sorted(t["run_id"] for t in trials)
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert all("val_accuracy" in r.data.metrics for r in runs.values())

    # ...which MLflow keeps in PostgreSQL: the parent and the four children.
    experiment = int(done["experiment_id"])
    assert lab.psql(f"SELECT count(*) FROM runs WHERE experiment_id = {experiment}") == "5"
    nested = lab.psql(
        f"SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = '{sweep['id']}'"
    )
    assert nested == "4"

    # A worker builds l0core's fused CPU gate kernels with the image's compiler (l0core.native):
    # without one, CPU trials' weight gates would run as slower eager ops.
    status = "from l0core import native; print(native.status())"
    built = lab.compose("exec", "-T", "ray-worker", "python", "-c", status, timeout_s=300)
    assert built.stdout.strip() == "native", built.stdout + built.stderr


def test_a_killed_worker_s_trial_is_retried_on_the_other(lab: Stack) -> None:
    nodes = lab.node_ips()
    workers = {lab.container_ip(c): c for c in lab.containers("ray-worker")}
    sweep = _submit(lab, _spec("worker-killed", epochs=EPOCHS, lam=[0.01, 0.1], max_failures=2))
    at_kill = _midway(lab, sweep, trials=2)
    victim_node = at_kill["actors"][0]["node_id"]
    victim = workers[nodes[victim_node]]
    lab.engine.docker_cmd("kill", victim)

    # Until the sweep ends, every live trial actor is on the surviving worker.
    seen_alive: set[str] = set()

    def poll() -> dict[str, Any]:
        alive = [a for a in lab.trial_actors(sweep["job_id"]) if a["state"] == "ALIVE"]
        seen_alive.update(a["node_id"] for a in alive if a["node_id"] != victim_node)
        return _sweep(lab, sweep["id"])

    done = wait_for(
        poll, lambda s: s["status"] not in ACTIVE, "the sweep to end", SWEEP_TIMEOUT_S, lab, 1
    )
    assert done["status"] == "FINISHED", done
    assert done["progress"]["finished"] == 2 and done["progress"]["failed"] == 0, done
    # Nothing lost: one run per trial, each ran to its last epoch; the killed one was retried.
    runs = _children(lab, done)
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert all(r.data.metrics["epoch"] == EPOCHS for r in runs.values())
    retries = sorted(r.data.tags.get("l0sweep.retries", "0") for r in runs.values())
    assert retries == ["0", "1"], {t: r.data.tags for t, r in runs.items()}
    # The retry ran on the other worker: the killed container stayed down (`docker kill` is a
    # stop its restart policy respects), and no trial ran anywhere else.
    (survivor,) = seen_alive
    assert nodes[survivor] in workers and workers[nodes[survivor]] != victim
    state = lab.engine.docker_cmd("inspect", "--format", "{{.State.Running}}", victim).stdout
    assert state.strip() == "false"


def test_sweep_goes_on_through_an_api_restart(lab: Stack) -> None:
    sweep = _submit(lab, _spec("api-restart", epochs=EPOCHS, lam=[0.01, 0.1]))
    _midway(lab, sweep, trials=2)
    lab.compose("restart", "api", timeout_s=180)
    done = _wait_done(lab, sweep["id"])
    assert done["status"] == "FINISHED", done
    assert done["progress"]["finished"] == 2 and done["progress"]["failed"] == 0, done
    wait_for(lambda: _listed(lab), lambda s: s.get(sweep["id"]) == "FINISHED", "listed", 60, lab)


def test_backup_restores_into_a_fresh_stack_and_down_leaves_nothing(
    lab: Stack, images: str, tmp_path: Path
) -> None:
    sweep = _submit(lab, _spec("backed-up", epochs=1, lam=[0.01, 0.1]))
    assert _wait_done(lab, sweep["id"])["status"] == "FINISHED"
    before = wait_for(
        lambda: _listed(lab),
        lambda s: s.get(sweep["id"]) == "FINISHED" and not ACTIVE & set(s.values()),
        "every sweep listed as ended",
        SWEEP_TIMEOUT_S,
        lab,
    )

    # The README's commands, from docker/.
    dump = tmp_path / "mlflow.dump"
    with open(dump, "wb") as out:
        done = subprocess.run(
            lab.compose_argv(
                "exec", "-T", "postgres", "sh", "-c",
                'pg_dump -U "$POSTGRES_USER" -d "$POSTGRES_DB" --format=custom',
            ),
            stdout=out, stderr=subprocess.PIPE, env=lab.engine.env(), timeout=300,
        )  # fmt: skip
    assert done.returncode == 0 and dump.stat().st_size > 0, done.stderr

    fresh = Stack.create(lab.engine, tmp_path, images)
    try:
        fresh.up("postgres")
        with open(dump, "rb") as data:
            done = subprocess.run(
                fresh.compose_argv(
                    "exec", "-T", "postgres", "sh", "-c",
                    'pg_restore -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists',
                ),
                stdin=data, capture_output=True, env=fresh.engine.env(), timeout=300,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        fresh.up("--scale", "ray-worker=0")
        wait_for(lambda: _listed(fresh), lambda s: s == before, "the sweeps back", 120, fresh)
        with fresh.api() as api:
            trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
        assert {t["status"] for t in trials} == {"FINISHED"} and len(trials) == 2
    finally:
        fresh.down()
