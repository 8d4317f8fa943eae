"""A finished trial's exported model in MLflow: measured speed, ONNX, and the logged model.

Called by the trainable once training is done, before the run ends:

* the speed of the model a trial exports (the shrunk model for structured gates, the pruned
  model with its zeros in full-size tensors otherwise), measured on the trial's device with the
  trial's thread count (:mod:`sweeps.latency`): metrics ``latency_ms_b1``, ``throughput``,
  ``model_bytes``, tags for the device, the threads and the export format, so a report can say
  that an unstructured model's dense tensors are not expected to be faster. On CPU an
  unstructured model is also timed with its Linear weights in CSR (:mod:`sweeps.sparse_export`),
  side by side, and the CSR model is kept when it is faster at both batch sizes; the
  ``l0sweep.sparse_export`` tag gives both ratios and says which was kept;
* the ONNX export, checked and timed with ONNX Runtime (:mod:`sweeps.onnx_export`), logged as
  the artifact ``onnx/model.onnx``, or a tag saying why there is none;
* the model as an MLflow logged model (``mlflow.pytorch.log_model``, MLflow 3's first-class
  logged models) with a signature and an input example from the validation split, so it can be
  found under the run, registered, and loaded with ``mlflow.pytorch.load_model``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, RunTag
from torch import nn

from l0core.cpu import allocator

from . import tracking
from .config import DataDirs
from .latency import compare, model_bytes
from .onnx_export import export_onnx
from .sparse_export import to_csr
from .spec import TrialConfig
from .training import TrainResult
from .vocabulary import ExportFormat, Tag

__all__ = [
    "EXAMPLE_SIZE",
    "RECORD_SECONDS",
    "exported_model",
    "record_exported_model",
    "timing_inputs",
]

log = logging.getLogger(__name__)

EXAMPLE_SIZE = 64  # validation inputs the timings, the ONNX check and the signature use
_INPUT_EXAMPLE_SIZE = 4  # rows of the logged model's input example
RECORD_SECONDS = "speed_record_seconds"  # metric: the time record_exported_model took


def exported_model(result: TrainResult, cfg: TrialConfig) -> tuple[nn.Module, str]:
    """The model a trial exports and its format: shrunk (structured), dense tensors holding
    zeros (unstructured), or unpruned (a dense trial)."""
    if result.shrunk is not None:
        return result.shrunk, ExportFormat.SHRUNK
    if cfg.regularizer.kind == "none":
        return result.pruned, ExportFormat.UNPRUNED
    return result.pruned, ExportFormat.DENSE


def timing_inputs(dataset: Any, dirs: DataDirs | None = None) -> torch.Tensor:
    """The first :data:`EXAMPLE_SIZE` validation inputs of a spec's ``dataset`` section (loaded
    once per process)."""
    data = dataset.load(dirs)
    return data.val[0][:EXAMPLE_SIZE].float().cpu()


def record_exported_model(
    run_id: str,
    result: TrainResult,
    cfg: TrialConfig,
    device: torch.device,
    threads: int,
    tracking_uri: str | None,
    rounds: int,
) -> dict[str, float]:
    """Measure, export and log the trial's model; returns the metrics logged (speed, size, ONNX).
    Every speed figure is the median of ``rounds`` timing samples (``SweepSettings.speed_rounds``).

    An ONNX export that fails is recorded in a tag and the rest goes on; an MLflow failure
    raises (the trial then fails with it, as for its other artifacts).
    """
    started = time.perf_counter()
    model, kind = exported_model(result, cfg)
    example = timing_inputs(cfg.dataset)
    candidates = {kind: model}
    if kind == ExportFormat.DENSE and device.type == "cpu":
        csr, converted = to_csr(model)
        if converted:
            candidates[ExportFormat.CSR] = csr
    speeds = compare(candidates, example, device, threads, rounds)
    speed, extra, tags = speeds[kind], {}, {}
    if ExportFormat.CSR in speeds:
        sparse = speeds[ExportFormat.CSR]
        faster = sparse.throughput > speed.throughput and sparse.latency_ms_b1 < speed.latency_ms_b1
        extra = {"csr_latency_ms_b1": sparse.latency_ms_b1, "csr_throughput": sparse.throughput}
        tags[Tag.SPARSE_EXPORT] = (
            f"CSR Linear weights: {sparse.throughput / speed.throughput:.2f}x throughput, "
            f"{speed.latency_ms_b1 / sparse.latency_ms_b1:.2f}x batch-1 speed of the dense "
            f"tensors; kept {'CSR' if faster else 'dense tensors'}"
        )
        if faster:
            kind, speed = ExportFormat.CSR, sparse
    onnx_source, model = model.cpu(), candidates[kind].cpu()
    metrics = {**speed.metrics(), **extra, "model_bytes": float(model_bytes(model))}
    tags.update({
        Tag.SPEED_DEVICE: speed.device,
        Tag.SPEED_THREADS: str(speed.threads),
        Tag.SPEED_ROUNDS: str(rounds),
        Tag.SPEED_ALLOCATOR: allocator(),
        Tag.EXPORT_FORMAT: kind,
    })  # fmt: skip
    c = tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        # ONNX has no sparse Linear: a CSR export goes to ONNX as its dense tensors.
        onnx = export_onnx(onnx_source, example, Path(tmp) / "model.onnx", threads, rounds=rounds)
        if onnx.path is not None:
            c.log_artifact(run_id, str(onnx.path), str(Path(tracking.ONNX_ARTIFACT).parent))
            metrics.update(onnx.metrics())
        else:
            tags[Tag.ONNX_ERROR] = onnx.error or "unknown"
    step = int(result.metrics.get("epoch", 0))
    now = _now_ms()
    c.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    uri = log_pytorch_model(run_id, model, example, tracking_uri, step)
    # What measuring, exporting and logging cost the trial (the latency pass's share of a sweep).
    seconds = time.perf_counter() - started
    c.log_batch(
        run_id,
        metrics=[Metric(RECORD_SECONDS, seconds, _now_ms(), step)],
        tags=[RunTag(Tag.MODEL_URI, uri)],
    )
    return {**metrics, RECORD_SECONDS: seconds}


def log_pytorch_model(
    run_id: str, model: nn.Module, example: torch.Tensor, tracking_uri: str | None, step: int
) -> str:
    """Log ``model`` as the run's MLflow logged model; returns its ``models:/<model_id>`` URI."""
    from mlflow.models import infer_signature

    x = example[:_INPUT_EXAMPLE_SIZE].numpy()
    with torch.inference_mode():
        y = model(example[:_INPUT_EXAMPLE_SIZE]).numpy()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    info = mlflow.pytorch.log_model(
        model,
        name=tracking.LOGGED_MODEL_NAME,
        signature=infer_signature(x, y),
        input_example=x,
        # Given, so MLflow does not infer them by loading the model in a subprocess (seconds).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        # The module itself, not MLflow 3's default torch.export ("pt2") graph: it loads back as
        # the class the trial built (l0sweep's models, importable wherever l0sweep is), which
        # the driver times against a dense module of the same class, like for like.
        serialization_format="pickle",
        run_id=run_id,
        step=step,
    )
    return f"models:/{info.model_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)
