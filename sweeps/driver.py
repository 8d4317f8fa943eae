"""Run one sweep: ``Tuner.fit``, or ``Tuner.restore`` when its experiment already exists.

``python -m sweeps.driver --sweep-id RUN_ID`` is what the service submits as a Ray Job: it reads
the spec from the sweep's MLflow parent run, connects to Ray (``RAY_ADDRESS`` or the running
cluster), runs or resumes the Tune experiment at ``<storage_path>/<sweep id>``, keeps the
``l0sweep.status`` tag (a spec whose model cannot be built or shrunk fails before Tune starts,
:mod:`sweeps.preflight`), the heartbeat (``l0sweep.heartbeat``, every
``L0SWEEP_HEARTBEAT_INTERVAL_S``) and the run's description (`sweeps.note`) current, and writes
the parent's artifacts at the end. SIGINT or SIGTERM
stop it gracefully: Tune saves the experiment, the trials stop, their runs end KILLED and the
sweep ends CANCELLED (resumable).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from . import raycompat, tracking
from .config import (
    DataDirs,
    SweepSettings,
    configure_mlflow_client,
    configure_tune,
    get_settings,
    job_env,
    use_settings,
)
from .note import write_sweep_note
from .preflight import preflight
from .progress import SweepCallback, SweepProgress
from .records import TrialRecord
from .registry import load_builtins
from .report import finalize_sweep
from .space import param_space, scheduler, search_algorithm, tune_num_samples
from .spec import SweepSpec
from .speedup import record_speedups
from .trainable import SweepContext, train_trial
from .vocabulary import SweepStatus, Tag, TrialStatus

__all__ = ["SweepResult", "main", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep`."""

    sweep_id: str
    status: str
    experiment_path: str
    restored: bool
    trials: list[TrialRecord] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _trainable(spec: SweepSpec, sweep_id: str, tracking_uri: str | None) -> Any:
    context = SweepContext(
        sweep_id, tracking_uri, spec.resources.cpus_per_trial, tuple(spec.searched_fields())
    )
    resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(train_trial, context=context), resources)


def _tuner(
    spec: SweepSpec, sweep_id: str, tracking_uri: str | None, storage: Path, callback: SweepCallback
) -> tuple[tune.Tuner, bool]:
    trainable = _trainable(spec, sweep_id, tracking_uri)
    path = storage / sweep_id
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        # Tune restores the pickled RunConfig; this process's callback carries the live sink.
        raycompat.set_tuner_callbacks(tuner, [callback])
        return tuner, True
    run_config = tune.RunConfig(
        name=sweep_id,
        storage_path=str(storage),
        callbacks=[callback],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=3),  # see config.TUNE_STATE_PERIOD_S
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        verbose=0,
    )
    tune_config = tune.TuneConfig(
        search_alg=search_algorithm(spec),
        scheduler=scheduler(spec),
        num_samples=tune_num_samples(spec),
        max_concurrent_trials=(
            spec.resources.max_concurrent_trials if spec.search.algorithm == "optuna" else None
        ),
        time_budget_s=spec.resources.time_budget_s,
        reuse_actors=True,  # a warm worker keeps its imports and its cached dataset
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
    )
    return tune.Tuner(
        trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config
    ), False


class _Heartbeat:
    """Writes the sweep's heartbeat every ``interval_s`` from a daemon thread while the block
    runs: the service ends a local run whose heartbeat stops (its driver was killed)."""

    def __init__(self, sweep_id: str, tracking_uri: str, interval_s: float) -> None:
        self.sweep_id = sweep_id
        self.tracking_uri = tracking_uri
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="l0sweep-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            try:
                tracking.heartbeat(self.sweep_id, self.tracking_uri)
            except Exception as err:  # MLflow unreachable: the next beat tries again
                log.debug("heartbeat of sweep %s not written: %s", self.sweep_id, err)
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Stop:
    """SIGTERM becomes Tune's graceful SIGINT path; remembers that a stop was asked."""

    def __init__(self) -> None:
        self.asked = False
        self._previous: Any = None

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum: int, frame: Any) -> None:
        self.asked = True
        signal.raise_signal(signal.SIGINT)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_sweep(
    spec: SweepSpec,
    tracking_uri: str | None = None,
    storage_path: str | Path | None = None,
    sweep_id: str | None = None,
    progress: Callable[[SweepProgress], None] | None = None,
    settings: SweepSettings | None = None,
) -> SweepResult:
    """Run (or resume) a sweep in this process and record it in MLflow.

    Sets nothing in this process's environment: a local Ray that it starts gets the MLflow
    client settings of the sweep's processes in its runtime environment (`sweeps.config.job_env`);
    this process's own are its start-up's (`sweeps.config.configure_mlflow_client`).

    Args:
        spec: the sweep.
        tracking_uri: MLflow tracking URI; default: the settings (``MLFLOW_TRACKING_URI``).
        storage_path: where Tune experiments live; default: ``L0SWEEP_STORAGE_PATH``.
        sweep_id: an existing parent run to run or resume; default: create one.
        progress: called with a :class:`SweepProgress` whenever a trial starts, reports or ends.
        settings: the engine's settings; default: read from the environment now.

    Returns:
        The final status (FINISHED, FAILED or CANCELLED), the trials and the Pareto report.
    """
    settings = settings or get_settings()
    # One store for every process of the sweep: a relative default (MLflow's sqlite:///mlflow.db)
    # would be another store in each Ray worker's working directory.
    tracking_uri = tracking.absolute_uri(tracking_uri or settings.tracking_uri)
    storage = Path(storage_path or settings.storage_path).resolve()
    sweep_id = sweep_id or tracking.create_sweep_run(spec, tracking_uri)
    with use_settings(settings), _Heartbeat(sweep_id, tracking_uri, settings.heartbeat_interval_s):
        return _run(spec, sweep_id, tracking_uri, storage, progress, settings)


def _run(
    spec: SweepSpec,
    sweep_id: str,
    tracking_uri: str,
    storage: Path,
    progress: Callable[[SweepProgress], None] | None,
    settings: SweepSettings,
) -> SweepResult:
    problem = preflight(spec, settings.data_dirs())
    if problem is not None:  # before Ray and any trial: a sweep that cannot export fails now
        tracking.set_sweep_status(sweep_id, "FAILED", problem, tracking_uri)
        write_sweep_note(spec, sweep_id, "FAILED", problem, tracking_uri)
        return SweepResult(sweep_id, "FAILED", str(storage / sweep_id), False)
    if not ray.is_initialized():
        start_local_ray(settings)
    # (A driver that runs as a Ray job joined its cluster in `main`: the job's runtime
    # environment, `service.jobs`, carries the same to its trials, and Ray refuses a second.)
    callback = SweepCallback(sweep_id, tracking_uri, spec, progress)
    configure_tune()
    tuner, restored = _tuner(spec, sweep_id, tracking_uri, storage, callback)
    message = "restored" if restored else None
    tracking.set_sweep_status(sweep_id, SweepStatus.RUNNING, message, tracking_uri)
    write_sweep_note(spec, sweep_id, SweepStatus.RUNNING, message, tracking_uri)
    started = time.monotonic()
    with _Stop() as stop:
        try:
            tuner.fit()
        except KeyboardInterrupt:
            stop.asked = True
        except Exception as err:
            tracking.close_open_trials(sweep_id, TrialStatus.KILLED, tracking_uri)
            message = f"{type(err).__name__}: {err}"
            tracking.set_sweep_status(sweep_id, SweepStatus.FAILED, message, tracking_uri)
            write_sweep_note(spec, sweep_id, SweepStatus.FAILED, message, tracking_uri)
            raise
    callback.flush()
    budget = spec.resources.time_budget_s
    out_of_time = budget is not None and time.monotonic() - started >= budget
    interrupted = stop.asked or (callback.unfinished() > 0 and not out_of_time)
    killed = tracking.close_open_trials(sweep_id, TrialStatus.KILLED, tracking_uri)
    if not interrupted:
        _latency_pass(spec, sweep_id, tracking_uri, settings.data_dirs())
    report = finalize_sweep(spec, sweep_id, tracking_uri)
    trials = tracking.sweep_trials(sweep_id, tracking_uri)
    if interrupted:
        status, message = (
            SweepStatus.CANCELLED,
            f"stopped; {killed} running trials killed; resumable",
        )
    elif trials and all(t.status == TrialStatus.FAILED for t in trials):
        status, message = SweepStatus.FAILED, f"every trial failed; {_commonest_failure(trials)}"
    else:
        failed = sum(t.status == TrialStatus.FAILED for t in trials)
        status, message = (
            SweepStatus.FINISHED,
            f"{len(trials)} trials, {failed} failed"
            + (", time budget reached" if out_of_time else ""),
        )
    tracking.set_sweep_status(sweep_id, status, message, tracking_uri)
    write_sweep_note(spec, sweep_id, status, message, tracking_uri)
    return SweepResult(sweep_id, status, str(storage / sweep_id), restored, trials, report)


def start_local_ray(settings: SweepSettings) -> None:
    """Start the local Ray of a sweep run outside a cluster (``l0sweep run``): its workers (the
    trials) get the sweep's environment. No dashboard: nobody looks at it, and it would take
    port 8265 (or the next free one) while it runs, the port an ``l0sweep serve`` started at
    the same time wants for its own Ray head, whose dashboard then cannot bind and whose start
    waits on the local run's dashboard instead."""
    ray.init(
        include_dashboard=False,
        runtime_env={"env_vars": job_env(settings.mlflow_retry_window_s)},
    )


def _latency_pass(spec: SweepSpec, sweep_id: str, tracking_uri: str, dirs: DataDirs) -> None:
    """Time the front's models against the dense model (`sweeps.speedup`); a failure here costs
    the sweep its ``speedup_vs_dense`` figures, never its result."""
    try:
        record_speedups(spec, sweep_id, tracking_uri, dirs=dirs)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        log.warning("latency pass of sweep %s failed: %s", sweep_id, reason)
        tracking.client(tracking_uri).set_tag(sweep_id, Tag.SPEEDUP_ERROR, reason[:500])


def _commonest_failure(trials: list[TrialRecord]) -> str:
    """The commonest kind of failure among ``trials`` (the text before a reason's first colon,
    e.g. the exception name), how many trials it ended, and one full reason of that kind."""
    reasons = [t.failure_reason or "no reason recorded" for t in trials]
    kind, count = Counter(r.split(":", 1)[0] for r in reasons).most_common(1)[0]
    example = next(r for r in reasons if r.split(":", 1)[0] == kind)
    return f"{count} of {len(trials)} like {example}"


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.driver --sweep-id ID [--tracking-uri URI] [--storage-path PATH]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.driver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sweep-id", required=True, help="MLflow run id of the sweep's parent run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument(
        "--storage-path", default=None, help="Tune storage path shared by all nodes"
    )
    args = parser.parse_args(argv)
    raycompat.check_ray_version()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = SweepSettings()  # read once; in force for all the driver does
    configure_mlflow_client(settings.mlflow_retry_window_s)
    with use_settings(settings):
        return _drive(args, settings)


def _drive(args: argparse.Namespace, settings: SweepSettings) -> int:
    try:
        load_builtins()  # the plugins the spec may name; one that fails ends the sweep, named
        spec = tracking.load_sweep_spec(args.sweep_id, args.tracking_uri)
    except Exception as err:
        tracking.set_sweep_status(
            args.sweep_id, SweepStatus.FAILED, f"cannot read the spec: {err}", args.tracking_uri
        )
        raise
    ray.init()  # the cluster of this job, with the job's runtime environment
    result = run_sweep(
        spec, args.tracking_uri, args.storage_path, args.sweep_id,
        progress=lambda p: log.info("%s", p.line()), settings=settings,
    )  # fmt: skip
    log.info("sweep %s %s", result.sweep_id, result.status)
    return {SweepStatus.FINISHED: 0, SweepStatus.CANCELLED: 130}.get(result.status, 1)


if __name__ == "__main__":
    raise SystemExit(main())
