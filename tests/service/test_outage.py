"""MLflow outages during sweeps, on a real Ray head and a real MLflow server that the tests stop and
start again at the same URI with the same store.

A short outage (well inside ``L0SWEEP_MLFLOW_RETRY_WINDOW_S``) pauses the sweep and loses nothing;
a longer one fails the trials that were waiting, saying why, and leaves no run RUNNING; while MLflow
is down every endpoint that needs it answers 503 with a message, at once.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.app import create_app
from service.settings import Settings
from service.stack import ManagedProcess, free_port, start_mlflow
from sweeps import retry, tracking
from sweeps.config import mlflow_client_env
from sweeps.spec import SweepSpec
from tests.fakes import FakeClock, RecordingClock
from tests.service.conftest import TINY_SPEC, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "l0sweep-outage-tests"
BACKEND_TIMEOUT_S = 5.0


class RestartableMlflow:
    """An MLflow server on a fixed port and store: stopped and started again, it is the same URI."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: ManagedProcess | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self) -> None:
        self.process, uri = start_mlflow(self.home, port=self.port, timeout_s=240)
        assert uri == self.uri, f"port {self.port} was taken while MLflow was down"

    def stop(self) -> None:
        assert self.process is not None
        self.process.stop()


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableMlflow]:
    server = RestartableMlflow(tmp_path_factory.mktemp("outage-mlflow"))
    server.start()
    yield server
    if server.running:
        server.stop()


@pytest.fixture
def mlflow_server(own_mlflow: RestartableMlflow) -> RestartableMlflow:
    """The module's server, running (a test that failed mid-outage leaves it stopped)."""
    if not own_mlflow.running:
        own_mlflow.start()
    return own_mlflow


@pytest.fixture
def outage_api(
    ray_address: str,
    storage_path: str,
    mlflow_server: RestartableMlflow,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[float], TestClient]:
    """``with outage_api(window_s) as api``: the API on the test's MLflow; jobs get that window."""

    def make(window_s: float) -> TestClient:
        # The service hands its environment's window to every job it submits.
        monkeypatch.setenv("L0SWEEP_MLFLOW_RETRY_WINDOW_S", str(window_s))
        settings = Settings(
            ray_address=ray_address,
            tracking_uri=mlflow_server.uri,
            storage_path=storage_path,
            refresh_interval_s=0.5,
            reconcile_interval_s=2.0,
            stop_grace_s=30,
            backend_timeout_s=BACKEND_TIMEOUT_S,
        )
        return TestClient(create_app(settings), raise_server_exceptions=False)

    return make


_wait = functools.partial(wait_for, every_s=0.5)


def _spec(name: str, epochs: int) -> dict:
    spec = copy.deepcopy(TINY_SPEC) | {"name": name, "experiment": EXPERIMENT}
    spec["train"] = {"epochs": epochs, "batch_size": 16}
    spec["resources"] = {"cpus_per_trial": 1}  # both trials running when MLflow stops
    return spec


def _children(client: MlflowClient, sweep_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id], f"tags.`l0sweep.sweep_id` = '{sweep_id}'", max_results=100
    )


def _epochs_logged(client: MlflowClient, sweep_id: str) -> list[int]:
    """The last epoch each trial's run holds (an empty list before the runs exist)."""
    return [int(run.data.metrics.get("epoch", 0)) for run in _children(client, sweep_id)]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _submit_and_start_outage(
    api: TestClient, client: MlflowClient, server: RestartableMlflow, spec: dict
) -> dict:
    """Submit ``spec``; once both trials have logged two epochs, stop MLflow."""
    response = api.post("/sweeps", json=spec)
    assert response.status_code == 202, response.text
    sweep = response.json()
    logged = _wait(
        lambda: _epochs_logged(client, sweep["id"]),
        lambda epochs: len(epochs) == 2 and min(epochs) >= 2,
    )
    server.stop()
    assert max(logged) < spec["train"]["epochs"] - 2, "the trials ended before the outage"
    return sweep


def test_short_outage_loses_nothing(outage_api, mlflow_server) -> None:
    """MLflow stopped and started again (about 20 s here, most of it MLflow's start-up) inside a
    120 s window: the trials wait, then go on; every epoch is recorded once and the sweep ends
    FINISHED without its driver being restarted. Meanwhile the API says 503, then recovers."""
    epochs = 20
    client = MlflowClient(mlflow_server.uri)
    with outage_api(120) as api:
        sweep = _submit_and_start_outage(api, client, mlflow_server, _spec("short-outage", epochs))
        stopped = time.monotonic()
        down = _wait(lambda: api.get(f"/sweeps/{sweep['id']}"), lambda r: r.status_code != 200)
        assert down.status_code == 503 and "MLflow is unavailable" in down.json()["detail"]
        time.sleep(max(0.0, 3 - (time.monotonic() - stopped)))
        mlflow_server.start()
        outage_s = time.monotonic() - stopped
        outage = f"the outage took {outage_s:.0f} s of the 120 s window"
        done = _wait(
            lambda: api.get(f"/sweeps/{sweep['id']}"),
            lambda r: r.status_code == 200 and r.json()["status"] not in {"PENDING", "RUNNING"},
        ).json()
    assert done["status"] == "FINISHED", (outage, done)
    assert done["progress"]["finished"] == 2, done
    assert done["job_id"].endswith("-0"), "the driver was restarted: the outage was not ridden out"

    runs = _children(client, sweep["id"])
    assert len(runs) == 2, "one run per trial, no duplicate"
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["l0sweep.trial_status"] == "FINISHED"
        per_epoch = [k for k in run.data.metrics if _steps(client, run.info.run_id, k)[0] == 1]
        assert "val_accuracy" in per_epoch and "epoch" in per_epoch
        for key in per_epoch:
            steps = _steps(client, run.info.run_id, key)
            assert sorted(set(steps)) == list(range(1, epochs + 1)), (key, steps)
        # The trial did wait: one epoch's record came the outage's length after the one before.
        times = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "epoch"))
        longest_gap_s = max(b - a for a, b in itertools.pairwise(times)) / 1000
        assert longest_gap_s > outage_s / 2, (longest_gap_s, outage_s)
    parent = client.get_run(sweep["id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["l0sweep.status"] == "FINISHED"
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    orphans = client.search_runs(
        [experiment],
        f"attributes.status = 'RUNNING' and tags.`l0sweep.sweep_id` = '{sweep['id']}'",
    )
    assert not orphans


def test_long_outage_fails_the_waiting_trials_clearly(outage_api, mlflow_server) -> None:
    """An outage past a 5 s window: each trial gives up on its epoch's metrics, records why once
    MLflow is back (MLflow, its URL, the time waited) and ends FAILED; the sweep ends FAILED, and
    no run is left RUNNING."""
    window_s = 5
    client = MlflowClient(mlflow_server.uri)
    with outage_api(window_s) as api:
        sweep = _submit_and_start_outage(
            api, client, mlflow_server, _spec("long-outage", epochs=200)
        )
        # Both trials log every epoch (well under a second): they give up within window_s + 1 s.
        time.sleep(window_s + 6)
        mlflow_server.start()
        done = _wait(
            lambda: api.get(f"/sweeps/{sweep['id']}"),
            lambda r: r.status_code == 200 and r.json()["status"] not in {"PENDING", "RUNNING"},
        ).json()
        trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
        logs = api.get(f"/sweeps/{sweep['id']}/logs", params={"tail": 2000}).text
    assert done["status"] == "FAILED", done
    assert done["message"].startswith("every trial failed; 2 of 2 like MlflowUnavailable: "), done
    assert f"MLflow at {mlflow_server.uri} was unavailable" in done["message"], done
    assert done["job_id"].endswith("-0"), "the driver ended the sweep itself"
    assert len(trials) == 2
    for trial in trials:
        reason = trial["failure_reason"] or ""
        assert trial["status"] == "FAILED", trial
        assert f"MLflow at {mlflow_server.uri} was unavailable for" in reason, reason
        assert f"L0SWEEP_MLFLOW_RETRY_WINDOW_S={window_s} s" in reason, reason
        waited = int(re.search(r"unavailable for (\d+) s", reason).group(1))
        assert waited >= window_s, reason
        assert "Connection refused" in reason, reason
    # The driver's log carries the trials' errors too (Tune's report of each failure).
    assert "MlflowUnavailable" in logs and mlflow_server.uri in logs

    runs = _children(client, sweep["id"])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    for run in runs:
        # What was logged before the outage is whole: epochs 1..k, no gap.
        steps = _steps(client, run.info.run_id, "val_accuracy")
        assert steps and steps == list(range(1, steps[-1] + 1)), steps
    assert client.get_run(sweep["id"]).info.status == "FAILED"


ENDPOINTS = [
    ("GET", "/sweeps", {}),
    ("GET", "/sweeps/{id}", {}),
    ("GET", "/sweeps/{id}/trials", {}),
    ("GET", "/sweeps/{id}/pareto", {}),
    ("GET", "/sweeps/{id}/pareto?format=png", {}),
    ("GET", "/sweeps/{id}/logs", {}),
    ("GET", "/sweeps/" + "f" * 32, {}),
    ("POST", "/sweeps", {"json": TINY_SPEC}),
    ("POST", "/sweeps", {"json": TINY_SPEC, "headers": {"Idempotency-Key": "outage-1"}}),
    ("POST", "/sweeps/{id}/cancel", {}),
    ("DELETE", "/sweeps/{id}", {}),
]


def test_api_answers_503_while_mlflow_is_down(outage_api, mlflow_server) -> None:
    """With MLflow stopped under a warm API: every endpoint that needs MLflow says 503 with a
    message and Retry-After, at once (the service never waits on a retry of MLflow: nothing is
    slept on the retries' clock); /healthz names MLflow as the one down; the catalog still
    answers; once MLflow is back the API is whole again without a restart."""
    spec = SweepSpec.model_validate(_spec("recorded-only", epochs=1))
    sweep_id = tracking.create_sweep_run(spec, mlflow_server.uri)
    tracking.set_sweep_status(sweep_id, "FINISHED", "for the outage test", mlflow_server.uri)
    with outage_api(120) as api:
        listed = _wait(lambda: api.get("/sweeps"), lambda r: r.status_code == 200).json()
        assert sweep_id in {s["id"] for s in listed["items"]}
        mlflow_server.stop()
        _wait(lambda: api.get("/sweeps").status_code, lambda code: code == 503, timeout_s=30)
        for method, path, kwargs in ENDPOINTS:
            with retry.use_clock(RecordingClock()) as clock:
                response = api.request(method, path.format(id=sweep_id), **kwargs)
            assert response.status_code == 503, (method, path, response.text)
            assert "MLflow is unavailable" in response.json()["detail"], (method, path)
            assert response.headers["Retry-After"], (method, path)
            assert clock.sleeps == [], (method, path, clock.sleeps)
        health = api.get("/healthz")
        assert health.status_code == 503
        assert health.json()["ray"]["ok"] and not health.json()["mlflow"]["ok"]
        assert mlflow_server.uri in health.json()["mlflow"]["detail"]
        assert api.get("/models").status_code == 200  # needs no MLflow
        mlflow_server.start()
        _wait(lambda: api.get("/sweeps").status_code, lambda code: code == 200, timeout_s=30)
        assert api.get(f"/sweeps/{sweep_id}").json()["status"] == "FINISHED"
        assert api.get("/healthz").status_code == 200


def test_retries_stop_at_the_window_and_refusals_are_not_retried(
    mlflow_server: RestartableMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window bounds the wait at a server that is down (measured on a fake clock: the
    backoff 0.5 s, 1 s, then the rest of the window); an answer that refuses the request (no
    such run) is not an outage and is not retried; the service's `retry_window(0)` wins even
    over the end of a run, which otherwise waits until MLflow answers."""
    for key, value in mlflow_client_env(2).items():  # as in a sweep's job
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("L0SWEEP_MLFLOW_RETRY_WINDOW_S", "2")
    dead = f"http://127.0.0.1:{free_port()}"
    with retry.use_clock(FakeClock()) as clock, pytest.raises(tracking.MlflowUnavailable) as err:
        tracking.log_epoch("0" * 32, {"val_accuracy": 0.5}, 3, dead)
    assert clock.sleeps == [0.5, 1.0, 0.5] and err.value.waited_s == 2
    assert f"MLflow at {dead} was unavailable for 2 s" in str(err.value)
    assert "epoch 3" in str(err.value) and "Connection refused" in str(err.value)

    monkeypatch.setenv("L0SWEEP_MLFLOW_RETRY_WINDOW_S", "60")
    with retry.use_clock(FakeClock()) as clock, pytest.raises(MlflowException) as refused:
        tracking.client(mlflow_server.uri).get_run("0" * 32)
    assert refused.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert clock.sleeps == []

    clock = FakeClock()
    with retry.use_clock(clock), tracking.retry_window(0), pytest.raises(MlflowException):
        tracking.end_trial_run("0" * 32, "FAILED", "test", dead)
    assert clock.sleeps == []
