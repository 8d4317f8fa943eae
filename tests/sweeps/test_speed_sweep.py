"""Real Ray (local, 2 CPUs) and real MLflow (SQLite): every finished trial carries measured
speed, the driver times the front against the dense model, and the front uses the speedup."""

from __future__ import annotations

import json

import mlflow
import pytest

from sweeps import tracking
from sweeps.config import SweepSettings
from sweeps.driver import run_sweep
from sweeps.spec import SweepSpec
from sweeps.vocabulary import ExportFormat, Tag
from tests.sweeps.conftest import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_sweep_measures_its_models_and_ranks_accuracy_against_measured_speedup(
    ray_local, tracking_uri, storage_path
):
    spec = SweepSpec.model_validate(
        tiny_spec(
            name="speed",
            model={"name": "mlp", "params": {"hidden": [256, 128]}},
            regularizer={"kind": {"grid": ["l0", "none"]}, "granularity": "output", "lam": 2.0},
            objectives=[{"metric": "val_accuracy"}, {"metric": "speedup_vs_dense"}],
        )
    )
    result = run_sweep(spec, tracking_uri, storage_path)
    assert result.status == "FINISHED"
    c = tracking.client(tracking_uri)
    trials = {t.name.split()[0]: t for t in tracking.sweep_trials(result.sweep_id, tracking_uri)}
    assert set(trials) == {"l0", "dense"}
    for t in trials.values():
        assert t.status == "FINISHED"
        assert {"latency_ms_b1", "throughput", "model_bytes"} <= set(t.metrics)
        tags = c.get_run(t.run_id).data.tags
        assert tags[Tag.SPEED_DEVICE] == "cpu" and tags[Tag.SPEED_THREADS] == "1"
        # the setting as the trial's process read it from the environment it inherited
        assert tags[Tag.SPEED_ROUNDS] == str(SweepSettings().speed_rounds)
        # trained and timed with the allocator settings of l0core.cpu (glibc, as here)
        assert tags[Tag.SPEED_ALLOCATOR] == "tuned"
        assert Tag.ONNX_ERROR not in tags, tags.get(Tag.ONNX_ERROR)
        assert tracking.ONNX_ARTIFACT in {f.path for f in c.list_artifacts(t.run_id, "onnx")}
        # both are on the (val_accuracy, speedup_vs_dense) front's candidates: both timed
        assert t.metrics["speedup_vs_dense"] > 0
        assert tags[Tag.SPEEDUP_THREADS] == "1"
    assert trials["l0"].export_format == ExportFormat.SHRUNK
    assert trials["dense"].export_format == ExportFormat.UNPRUNED
    assert trials["l0"].metrics["model_bytes"] < trials["dense"].metrics["model_bytes"]

    parent = c.get_run(result.sweep_id).data.metrics
    assert parent["speed_pass_seconds"] > 0 and parent["dense_throughput"] > 0
    report = result.report
    assert report["objectives"][1] == {"metric": "speedup_vs_dense", "mode": "max"}
    assert report["front"], "the front over measured speedup is empty"
    mlflow.set_tracking_uri(tracking_uri)
    for t in trials.values():
        on_front = any(f["run_id"] == t.run_id for f in report["front"])
        model = c.get_logged_model(t.model_uri.removeprefix("models:/"))
        assert model.tags[Tag.PARETO] == json.dumps(on_front)
