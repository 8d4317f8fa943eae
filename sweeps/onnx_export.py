"""ONNX export of a trial's exported model, checked and timed with ONNX Runtime.

Free of Ray and MLflow. The export uses ``torch.onnx.export`` with a dynamic batch dimension;
the model ONNX Runtime loads back must give the torch model's outputs to within ``atol`` on real
inputs, or the export is refused with the largest difference found. A model that cannot be
exported is not an error of the trial: :func:`export_onnx` returns the reason, and the caller
logs the trial without the ONNX file.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .latency import THROUGHPUT_BATCH, timed_batches

__all__ = ["OnnxExport", "export_onnx"]

log = logging.getLogger(__name__)

ATOL = 1e-4
OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    """The outcome of :func:`export_onnx`.

    Attributes:
        path: the ``.onnx`` file, or None when the export failed.
        error: why it failed (None when it worked).
        max_abs_diff: the largest |torch - ONNX Runtime| output difference on the check inputs.
        latency_ms_b1, throughput: ONNX Runtime's speed (batch 1; batch ``THROUGHPUT_BATCH``).
    """

    path: Path | None
    error: str | None = None
    max_abs_diff: float | None = None
    latency_ms_b1: float | None = None
    throughput: float | None = None

    def metrics(self) -> dict[str, float]:
        """The figures as trial metrics (only those measured)."""
        values = {
            "onnx_max_abs_diff": self.max_abs_diff,
            "onnx_latency_ms_b1": self.latency_ms_b1,
            "onnx_throughput": self.throughput,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


def export_onnx(
    model: nn.Module,
    example: Tensor,
    path: str | Path,
    threads: int = 1,
    atol: float = ATOL,
    rounds: int = 5,
) -> OnnxExport:
    """Export ``model`` to ``path``, check it against torch on ``example``, time it.

    Args:
        model: the exported (pruned or shrunk) model, on CPU.
        example: a batch of real validation inputs; outputs are compared on all of it.
        path: where to write the ``.onnx`` file.
        threads: ONNX Runtime's intra-op threads.
        atol: the largest output difference accepted.
        rounds: timing samples per batch size (the median is reported).

    Returns:
        The file and figures, or the reason the model has no ONNX export (never raises for a
        model ONNX cannot export or reproduce).
    """
    path = Path(path)
    model = model.eval().cpu()
    example = example.cpu()
    try:
        _export(model, example, path)
        session = _session(path, threads)
    except Exception as err:
        path.unlink(missing_ok=True)
        return OnnxExport(None, f"export failed: {type(err).__name__}: {_first_line(err)}")
    with torch.inference_mode():
        expected = model(example).numpy()
    got = _run(session, example)
    if got.shape != expected.shape:
        path.unlink(missing_ok=True)
        return OnnxExport(None, f"ONNX Runtime output shape {got.shape} != torch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not diff <= atol:
        path.unlink(missing_ok=True)
        return OnnxExport(
            None, f"ONNX Runtime outputs differ from torch by {diff:.3g} (> {atol:g})", diff
        )
    one, big = timed_batches(example, THROUGHPUT_BATCH)
    b1 = _median_seconds(session, one, rounds)
    bn = _median_seconds(session, big, rounds)
    return OnnxExport(path, None, diff, 1000 * b1, len(big) / bn)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _export(model: nn.Module, example: Tensor, path: Path) -> None:
    # The TorchScript-based exporter (dynamo=False): the models here are plain module chains,
    # and it needs neither onnxscript nor a torch.export trace of the whole model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example[:2],),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _session(path: Path, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, x: Tensor) -> np.ndarray:
    return session.run(None, {"input": x.numpy()})[0]


def _median_seconds(session, x: Tensor, rounds: int) -> float:
    """Seconds per call: warm-up, calls per sample calibrated to about 20 ms, median of samples."""
    feed = {"input": x.numpy()}
    for _ in range(3):
        session.run(None, feed)
    t0 = time.perf_counter()
    session.run(None, feed)
    number = max(1, round(0.02 / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            session.run(None, feed)
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)
