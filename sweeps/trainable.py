"""The Ray Tune trainable: one trial, reported to Tune every epoch and recorded in MLflow.

The trial creates its own MLflow child run (so it works on any node and can log artifacts),
keeps the run id in every checkpoint, and on a retry or a restore continues that run: it tags the
epoch it resumes after (``l0sweep.resumed_from_epoch``) and logs only the epochs the run does not
hold yet (training is seeded per epoch and the RNG state travels in the checkpoint, so an epoch
done again gives the same figures). A diverged trial (NaN/inf loss) ends FAILED with the reason in
MLflow and is not retried. A trial whose run already ended FINISHED or STOPPED (Tune restored it
from an experiment state saved before it ended) reports its recorded metrics and trains no more.
A finished trial's exported model is timed, exported to ONNX and logged as an MLflow logged
model (:mod:`sweeps.model_log`) before the run ends; the speed metrics join its last report.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune

from l0core import SummaryRow
from l0core.cpu import tune_allocator

from . import tracking
from .config import SweepSettings, get_settings, use_settings
from .model_log import record_exported_model
from .space import trial_config
from .spec import TrialConfig
from .training import TrainResult, TrialDiverged, train
from .variants import run_name
from .vocabulary import TRUE, RunStatus, Tag, TrialStatus

if TYPE_CHECKING:
    from mlflow.entities import Run
from .warmstart import load_init_weights, resolve_init_run

__all__ = ["SweepContext", "train_trial"]

_STATE_FILE = "state.pt"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares: where to record, its CPU share, and the spec's
    searched fields (named in the names of the trials' runs)."""

    sweep_id: str
    tracking_uri: str | None
    cpus_per_trial: float
    searched: tuple[str, ...] = ()


def _device() -> torch.device:
    """CUDA when Tune gave this trial a GPU (Ray sets CUDA_VISIBLE_DEVICES), CPU otherwise."""
    return (
        torch.device("cuda")
        if ray.get_gpu_ids() and torch.cuda.is_available()
        else torch.device("cpu")
    )


def _load_checkpoint() -> dict[str, Any] | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / _STATE_FILE, map_location="cpu", weights_only=False)


def _init_weights(
    cfg: TrialConfig, run_id: str, context: SweepContext
) -> dict[str, torch.Tensor] | None:
    """The starting weights ``train.init_from`` names; the source run is tagged on the trial."""
    source = resolve_init_run(cfg.train.init_from, cfg.seed, context.sweep_id, context.tracking_uri)
    if source is None:
        return None
    tracking.client(context.tracking_uri).set_tag(run_id, Tag.INIT_FROM_RUN, source)
    return load_init_weights(source, context.tracking_uri)


def _log_artifacts(run_id: str, result: TrainResult, tracking_uri: str | None) -> None:
    c = tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        torch.save(result.pruned.state_dict(), model_dir / "state_dict.pt")
        if result.shrunk is not None:
            torch.save(result.shrunk, model_dir / "shrunk_model.pt")
        c.log_artifacts(run_id, str(model_dir), "model")
    columns = [f.name for f in fields(SummaryRow)]
    c.log_table(
        run_id, {k: [str(getattr(r, k)) for r in result.layers] for k in columns}, "layers.json"
    )
    c.set_tag(run_id, Tag.ARCHITECTURE, result.architecture)


def train_trial(config: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable (bind ``context`` with ``tune.with_parameters``).

    The trial's process reads its settings once, here, from the environment its job gave it (a
    node's data directory is its own), and puts them in force for all it does: the MLflow retry
    window, the tracking URI's default and the data directories are never read again."""
    with use_settings(SweepSettings()):
        _train_trial(config, context)


def _train_trial(config: dict[str, Any], context: SweepContext) -> None:
    threads = max(1, math.floor(context.cpus_per_trial))
    torch.set_num_threads(threads)
    # Small CPU steps free and allocate the same buffers many times a step: keep them in the
    # heap (1.3-1.5x faster MLP steps here; the speed record tags the allocator it ran with).
    tune_allocator()
    own = trial_config(config)
    cfg = TrialConfig.of(own)
    trial_id = tune.get_context().get_trial_id()
    state = _load_checkpoint()
    c = tracking.client(context.tracking_uri)
    run_id = state["run_id"] if state else tracking.find_trial_run(c, context.sweep_id, trial_id)
    prior = c.get_run(run_id) if run_id else None
    if prior is not None and _ended_before(prior, context):
        return
    name = run_name(own, trial_id, context.searched)
    run_id = tracking.start_trial_run(
        context.sweep_id, trial_id, cfg.dump(), context.tracking_uri, run_id, name
    )
    logged = 0  # the last epoch the run holds: a killed attempt may have logged past its checkpoint
    if prior is not None:
        logged = int(prior.data.metrics.get("epoch", 0))
        c.set_tag(run_id, Tag.RESUMED_FROM_EPOCH, str(state["epoch"] if state else 0))

    def log(metrics: dict[str, float]) -> None:
        if int(metrics["epoch"]) > logged:
            tracking.log_epoch(run_id, metrics, int(metrics["epoch"]), context.tracking_uri)

    def on_epoch(metrics: dict[str, float], get_state: Any) -> None:
        log(metrics)
        _report(metrics, {**get_state(), "run_id": run_id})

    try:
        init = _init_weights(cfg, run_id, context)
        device = _device()
        settings = get_settings()
        result = train(cfg, device, on_epoch, state, init, settings.data_dirs())
        log(result.metrics)
        _log_artifacts(run_id, result, context.tracking_uri)
        record = record_exported_model(
            run_id, result, cfg, device, threads, context.tracking_uri, settings.speed_rounds
        )
        result.metrics.update(record)
    except TrialDiverged as err:
        c.set_tag(run_id, Tag.DIVERGED, TRUE)
        tracking.end_trial_run(run_id, TrialStatus.FAILED, str(err), context.tracking_uri)
        raise
    except Exception as err:
        tracking.end_trial_run(
            run_id, TrialStatus.FAILED, f"{type(err).__name__}: {err}", context.tracking_uri
        )
        raise
    # Record first: a scheduler may stop the trial at its last report (ASHA does at max_t).
    tracking.end_trial_run(run_id, TrialStatus.FINISHED, tracking_uri=context.tracking_uri)
    _report(result.metrics, {**result.state, "run_id": run_id})


def _ended_before(run: Run, context: SweepContext) -> bool:
    """Whether the trial's run says it is done; True: report its last metrics, train no more.

    Raises:
        TrialDiverged: the trial diverged before; a retry would diverge again.
    """
    tags = run.data.tags
    if tags.get(Tag.DIVERGED) == TRUE:
        reason = tags.get(Tag.FAILURE_REASON, "diverged")
        if run.info.status == RunStatus.RUNNING:  # killed between its two records
            tracking.end_trial_run(
                run.info.run_id, TrialStatus.FAILED, reason, context.tracking_uri
            )
        raise TrialDiverged(f"not retried: {reason}")
    if tags.get(Tag.TRIAL_STATUS) in (TrialStatus.FINISHED, TrialStatus.STOPPED):
        tune.report(dict(run.data.metrics))
        return True
    return False


def _report(metrics: dict[str, float], state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / _STATE_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
