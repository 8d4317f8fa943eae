"""The driver's latency pass: the front's exported models timed against the dense model.

After the trials finish, the driver loads the MLflow logged models of the candidate trials
(:func:`sweeps.pareto.speed_candidates`: the spec's front, the accuracy/sparsity front and the
accuracy/throughput front) and a dense model of the same architecture (the spec's model, freshly
built: its speed does not depend on its weights), and times them interleaved in this one process
(:func:`sweeps.latency.compare`). Each candidate gets ``speedup_vs_dense`` (throughput ratio, batch
256) and ``latency_speedup_b1`` (batch-1 latency ratio), tagged with the device and threads used;
the parent run gets the dense model's own figures and the pass's wall time
(``speed_pass_seconds``), which is what this pass adds to a sweep.
"""

from __future__ import annotations

import logging
import math
import time

import mlflow
import torch
from mlflow.entities import Metric, RunTag

from . import tracking
from .config import DataDirs
from .latency import compare, speedups
from .model_log import timing_inputs
from .pareto import speed_candidates
from .spec import SweepSpec
from .training import build_model, seed_everything
from .vocabulary import Tag

__all__ = ["record_speedups"]

log = logging.getLogger(__name__)

_DENSE = "dense"


def _dense_model(spec: SweepSpec, dirs: DataDirs | None) -> torch.nn.Module:
    seed_everything(0)
    return build_model(spec.model, spec.dataset.load(dirs))


def record_speedups(
    spec: SweepSpec,
    sweep_id: str,
    tracking_uri: str | None,
    rounds: int = 7,
    dirs: DataDirs | None = None,
) -> dict[str, dict[str, float]]:
    """Time the candidates against the dense model and log the ratios on their runs (the dense
    model built for the dataset in ``dirs``, default: the settings read now).

    Returns:
        run id -> ``{"speedup_vs_dense": ..., "latency_speedup_b1": ...}`` for the trials timed.
        A candidate whose model cannot be loaded is tagged with the reason and left out.
    """
    started = time.perf_counter()
    c = tracking.client(tracking_uri)
    trials = tracking.sweep_trials(sweep_id, tracking_uri)
    candidates = speed_candidates(trials, spec.objectives)
    if not candidates:
        return {}
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    models: dict[str, torch.nn.Module] = {_DENSE: _dense_model(spec, dirs)}
    for t in candidates:
        uri = c.get_run(t.run_id).data.tags.get(Tag.MODEL_URI)
        try:
            if uri is None:
                raise LookupError(f"the run has no {Tag.MODEL_URI} tag (no logged model)")
            models[t.run_id] = mlflow.pytorch.load_model(uri, map_location="cpu")
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"[:500]
            log.warning("trial %s not timed against dense: %s", t.trial_id, reason)
            c.set_tag(t.run_id, Tag.SPEEDUP_ERROR, reason)
    threads = max(1, math.floor(spec.resources.cpus_per_trial))
    speeds = compare(models, timing_inputs(spec.dataset, dirs), "cpu", threads, rounds)
    ratios = speedups(speeds, _DENSE)
    now = int(time.time() * 1000)
    for run_id, r in ratios.items():
        if run_id == _DENSE:
            continue
        c.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in r.items()],
            tags=[
                RunTag(Tag.SPEEDUP_DEVICE, speeds[run_id].device),
                RunTag(Tag.SPEEDUP_THREADS, str(threads)),
            ],
        )
    dense = speeds[_DENSE]
    c.log_batch(
        sweep_id,
        metrics=[
            Metric("dense_latency_ms_b1", dense.latency_ms_b1, now, 0),
            Metric("dense_throughput", dense.throughput, now, 0),
            Metric("speed_pass_seconds", time.perf_counter() - started, now, 0),
        ],
    )
    return {k: v for k, v in ratios.items() if k != _DENSE}
