"""Real Ray (local, 2 CPUs) and real MLflow (SQLite): a sweep, ASHA, and an interrupted resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sweeps import tracking
from sweeps.driver import run_sweep
from sweeps.records import TrialRecord
from sweeps.spec import SweepSpec
from tests.sweeps.conftest import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _children(sweep_id: str, uri: str) -> list[TrialRecord]:
    return tracking.sweep_trials(sweep_id, uri)


def test_tiny_sweep_records_parent_children_artifacts_and_failures(
    ray_local, tracking_uri, storage_path
):
    spec = SweepSpec.model_validate(
        tiny_spec(
            name="records",
            regularizer={"kind": {"grid": ["l0", "none"]}},
            train={"lr": {"grid": [0.05, 1e6]}, "optimizer": "sgd", "momentum": 0.0},
        )
    )
    seen = []
    result = run_sweep(spec, tracking_uri, storage_path, progress=seen.append)
    assert result.status == "FINISHED" and not result.restored
    assert seen and seen[-1].finished + seen[-1].failed == 4

    c = tracking.client(tracking_uri)
    parent = c.get_run(result.sweep_id)
    assert (
        parent.data.tags["l0sweep.kind"] == "sweep"
        and parent.data.tags["l0sweep.status"] == "FINISHED"
    )
    assert tracking.load_sweep_spec(result.sweep_id, tracking_uri) == spec
    experiment = c.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # training UI
    parent_files = {f.path for f in c.list_artifacts(result.sweep_id)}
    assert {"spec.json", "pareto.json", "pareto.png", "pareto.html", "summary.txt"} <= parent_files

    trials = _children(result.sweep_id, tracking_uri)
    assert len(trials) == 4
    assert sorted(t.name for t in trials) == [
        "dense lr=0.05 seed=0", "dense lr=1e+06 seed=0",
        "l0 weight lr=0.05 seed=0", "l0 weight lr=1e+06 seed=0",
    ]  # fmt: skip
    note = parent.data.tags["mlflow.note.content"]  # the run's description in the MLflow UI
    assert note.startswith("**FINISHED**") and "### Pareto front" in note
    assert "| l0 weight lr=0.05 seed=0 |" in note or "| dense lr=0.05 seed=0 |" in note
    finished = [t for t in trials if t.status == "FINISHED"]
    failed = [t for t in trials if t.status == "FAILED"]
    assert len(finished) == 2 and len(failed) == 2
    assert all("training loss became" in t.failure_reason for t in failed)
    assert all(t.run_status == "FAILED" for t in failed)
    for t in finished:
        run = c.get_run(t.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.sweep_id
        assert [m.step for m in c.get_metric_history(t.run_id, "val_accuracy")] == [1, 2]
        assert "test_accuracy" in t.metrics and t.architecture == "64-32-10"
        files = {f.path for f in c.list_artifacts(t.run_id, "model")}
        assert "model/state_dict.pt" in files
    assert any(t.pareto for t in finished) and not any(t.pareto for t in failed)
    report = json.loads(c.download_artifacts(result.sweep_id, "pareto.json", str(storage_path)) and
                        (storage_path / "pareto.json").read_text())  # fmt: skip
    assert report["counts"] == {"FINISHED": 2, "FAILED": 2}


def test_asha_stops_a_bad_trial_early(ray_local, tracking_uri, storage_path):
    spec = SweepSpec.model_validate(
        tiny_spec(
            name="asha",
            regularizer={"kind": "none"},
            train={"epochs": 4, "lr": {"grid": [0.01, 0.005, 1e-7]}},
            scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            resources={"max_concurrent_trials": 1},
        )
    )
    result = run_sweep(spec, tracking_uri, storage_path)
    assert result.status == "FINISHED"
    by_lr = {json.loads(t.config["train.lr"]): t for t in _children(result.sweep_id, tracking_uri)}
    bad = by_lr[1e-7]
    assert bad.status == "STOPPED" and bad.run_status == "FINISHED"
    assert bad.metrics["epoch"] < 4
    assert by_lr[0.01].status == "FINISHED" and by_lr[0.01].metrics["epoch"] == 4


def _driver(sweep_id: str, uri: str, storage, env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sweeps.driver", "--sweep-id", sweep_id, "--tracking-uri", uri,
           "--storage-path", str(storage)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_interrupted_sweep_resumes_without_duplicate_runs(ray_local, tracking_uri, storage_path):
    spec = SweepSpec.model_validate(
        tiny_spec(
            name="resume",
            regularizer={"kind": "none"},
            train={"epochs": 12, "batch_size": 8, "lr": {"grid": [0.01, 0.003]}},
            resources={"max_concurrent_trials": 1},
        )
    )
    sweep_id = tracking.create_sweep_run(spec, tracking_uri)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = _driver(sweep_id, tracking_uri, storage_path, env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = _children(sweep_id, tracking_uri)
        if trials and trials[0].metrics.get("epoch", 0) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"no trial of sweep {sweep_id} reached epoch 2 within 120 s: {trials}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert tracking.sweep_status(sweep_id, tracking_uri) == "CANCELLED"
    first = _children(sweep_id, tracking_uri)
    assert first and all(t.status in ("KILLED", "FINISHED") for t in first)
    assert any(t.status == "KILLED" for t in first)

    proc = _driver(sweep_id, tracking_uri, storage_path, env)
    assert proc.wait(timeout=240) == 0
    assert tracking.sweep_status(sweep_id, tracking_uri) == "FINISHED"
    after = _children(sweep_id, tracking_uri)
    assert len(after) == 2 and len({t.trial_id for t in after}) == 2
    assert {t.run_id for t in first} <= {t.run_id for t in after}  # continued, not duplicated
    assert all(t.status == "FINISHED" and t.metrics["epoch"] == 12 for t in after)
