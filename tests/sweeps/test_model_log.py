"""A trial's exported model through a real ``mlflow server``: speed metrics, the ONNX artifact
checked with ONNX Runtime, and the MLflow logged model registered and loaded back (the worker's
session server, ``mlflow_uri`` in ``tests/conftest.py``; the runs go to an experiment of their own)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from sweeps import tracking
from sweeps.model_log import record_exported_model, timing_inputs
from sweeps.spec import TrialConfig
from sweeps.training import train
from sweeps.vocabulary import ExportFormat, Tag
from tests.sweeps.conftest import tiny_spec

pytestmark = pytest.mark.integration


def _trained(**regularizer) -> tuple[dict, object]:
    spec = tiny_spec(regularizer=regularizer)
    cfg = TrialConfig.of({**spec, "seed": 0})
    return cfg, train(cfg, "cpu")


def _new_run(uri: str, name: str) -> str:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("model-log") or c.get_experiment(
        c.create_experiment("model-log")
    )
    return c.create_run(exp.experiment_id, run_name=name).info.run_id


def test_structured_trial_model_round_trips_through_a_real_mlflow_server(mlflow_uri, tmp_path):
    cfg, result = _trained(kind="l0", lam=0.1, granularity="output")
    run_id = _new_run(mlflow_uri, "structured")
    metrics = record_exported_model(run_id, result, cfg, torch.device("cpu"), 1, mlflow_uri, 3)

    c = tracking.client(mlflow_uri)
    run = c.get_run(run_id)
    for name in ("latency_ms_b1", "throughput", "model_bytes", "onnx_latency_ms_b1"):
        assert run.data.metrics[name] == pytest.approx(metrics[name]) and metrics[name] > 0
    tags = run.data.tags
    assert tags[Tag.SPEED_DEVICE] == "cpu" and tags[Tag.SPEED_THREADS] == "1"
    assert tags[Tag.SPEED_ROUNDS] == "3"  # the medians of three samples each
    assert tags[Tag.EXPORT_FORMAT] == ExportFormat.SHRUNK
    assert Tag.ONNX_ERROR not in tags
    assert metrics["model_bytes"] == 4 * sum(p.numel() for p in result.shrunk.parameters())

    # ONNX: the artifact reproduces the torch model on validation inputs.
    import onnxruntime as ort

    onnx_path = c.download_artifacts(run_id, tracking.ONNX_ARTIFACT, str(tmp_path))
    x = timing_inputs(cfg.dataset)
    got = ort.InferenceSession(onnx_path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, result.shrunk(x).detach().numpy(), atol=1e-4)

    # The logged model: under the run, registered, loaded back with the same outputs.
    model_uri = tags[Tag.MODEL_URI]
    model_id = model_uri.removeprefix("models:/")
    logged = c.get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.name == tracking.LOGGED_MODEL_NAME
    mlflow.set_tracking_uri(mlflow_uri)
    outputs = [o.model_id for o in mlflow.get_run(run_id).outputs.model_outputs]
    assert model_id in outputs
    version = mlflow.register_model(model_uri, "l0sweep-model-log-test")
    loaded = mlflow.pytorch.load_model(f"models:/l0sweep-model-log-test/{version.version}")
    torch.testing.assert_close(loaded(x), result.shrunk(x))
    info = mlflow.models.get_model_info(model_uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]


def test_unstructured_trial_is_logged_as_dense_tensors_and_an_onnx_failure_is_a_tag(
    mlflow_uri, monkeypatch
):
    cfg, result = _trained(kind="l0", lam=0.1, granularity="weight")
    assert result.shrunk is None
    import sweeps.onnx_export as onnx_export

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX is not supported")

    monkeypatch.setattr(onnx_export, "_export", refuse)
    run_id = _new_run(mlflow_uri, "unstructured")
    metrics = record_exported_model(run_id, result, cfg, torch.device("cpu"), 1, mlflow_uri, 1)
    tags = tracking.client(mlflow_uri).get_run(run_id).data.tags
    # timed as stored (dense tensors) and with CSR weights, side by side; the faster one kept
    kept = tags[Tag.SPARSE_EXPORT].rsplit("kept ", 1)[1]
    assert tags[Tag.EXPORT_FORMAT] == {
        "dense tensors": ExportFormat.DENSE, "CSR": ExportFormat.CSR
    }[kept]  # fmt: skip
    assert metrics["csr_latency_ms_b1"] > 0 and metrics["csr_throughput"] > 0
    assert tags[Tag.ONNX_ERROR].startswith("export failed: RuntimeError: Exporting")
    assert "onnx_latency_ms_b1" not in metrics and metrics["latency_ms_b1"] > 0
    onnx_files = {f.path for f in tracking.client(mlflow_uri).list_artifacts(run_id, "onnx")}
    assert tracking.ONNX_ARTIFACT not in onnx_files
    loaded = mlflow.pytorch.load_model(tags[Tag.MODEL_URI])  # the model is still logged
    x = timing_inputs(cfg.dataset)
    torch.testing.assert_close(loaded(x), result.pruned(x), atol=1e-5, rtol=1e-4)
