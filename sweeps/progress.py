"""Live progress of a sweep, and the driver-side bookkeeping of trials Tune ends by itself.

:class:`SweepCallback` is a Tune callback in the driver. It counts trials by state, tracks the
best result so far, hands a :class:`SweepProgress` to a sink (the CLI prints it), and ends the
MLflow run of a trial the scheduler stopped early (STOPPED) or that died without recording its
own failure (FAILED), since such a trial's process cannot.

A failed attempt of a trial is recorded on its run whether Tune retries it
(``resources.max_failures``) or not: ``l0sweep.retries`` (the retries so far) and
``l0sweep.last_error`` (what Tune saw: the trial's exception, or the death of its worker process).
A trial that failed for good ends FAILED with that reason, with a run created for it if it died
before it made its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray import cloudpickle
from ray.exceptions import RayTaskError
from ray.tune import Callback

from . import tracking
from .space import trial_config
from .spec import SweepSpec
from .variants import run_name
from .vocabulary import RunStatus, Tag, TrialStatus

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = ["SweepCallback", "SweepProgress"]

log = logging.getLogger(__name__)


@dataclass
class SweepProgress:
    """Counts of trials by state, and the best objective values reported so far."""

    total: int
    pending: int = 0
    running: int = 0
    finished: int = 0
    stopped: int = 0
    failed: int = 0
    best: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One line for a terminal: ``3/8 done, 2 running, 1 failed | best val_accuracy 0.91``."""
        done = self.finished + self.stopped + self.failed
        best = ", ".join(f"{k} {v:.4g}" for k, v in self.best.items())
        return (f"{done}/{self.total} done ({self.stopped} stopped early, {self.failed} failed), "
                f"{self.running} running, {self.pending} pending" + (f" | best {best}" if best else ""))  # fmt: skip


class SweepCallback(Callback):
    """Progress and MLflow bookkeeping for one sweep (picklable: the sink is not saved)."""

    def __init__(
        self,
        sweep_id: str,
        tracking_uri: str | None,
        spec: SweepSpec,
        sink: Callable[[SweepProgress], None] | None = None,
    ) -> None:
        self.sweep_id = sweep_id
        self.tracking_uri = tracking_uri
        self.objectives = [(o.metric, o.mode) for o in spec.objectives]
        self.epochs = spec.train.epochs
        self.total = spec.num_trials()
        self.searched = tuple(spec.searched_fields())
        self.sink = sink
        self._trials: list[Any] = []
        self._stopped: set[str] = set()
        self._best: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "sink": None, "_trials": []}

    def unfinished(self) -> int:
        """Trials neither TERMINATED nor ERROR (after ``fit``: > 0 means it was interrupted)."""
        return sum(t.status not in ("TERMINATED", "ERROR") for t in self._trials)

    def flush(self) -> None:
        """Emit the final counts (after ``fit`` returns)."""
        self._emit(self._trials)

    def _emit(self, trials: list[Any]) -> None:
        self._trials = list(trials)
        if self.sink is None:
            return
        p = SweepProgress(total=max(self.total, len(trials)), best=dict(self._best))
        for t in trials:
            if t.status == "TERMINATED":
                if t.trial_id in self._stopped:
                    p.stopped += 1
                else:
                    p.finished += 1
            elif t.status == "ERROR":
                p.failed += 1
            elif t.status == "RUNNING":
                p.running += 1
        p.pending = p.total - p.finished - p.stopped - p.failed - p.running
        self.sink(p)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._emit(trials)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        for metric, mode in self.objectives:
            if metric in result:
                value = float(result[metric])
                old = self._best.get(metric)
                if old is None or (value > old if mode == "max" else value < old):
                    self._best[metric] = value
        self._emit(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("epoch", self.epochs) < self.epochs:
            self._stopped.add(trial.trial_id)
            self._end_if_open(
                trial,
                TrialStatus.STOPPED,
                f"stopped early by the scheduler at epoch {last.get('epoch')}",
            )
        self._emit(trials)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        with self._recording(trial):
            run = self._run(trial)
            if run is not None:  # the retry continues it (RUNNING again once the retry starts)
                self._record_failure(run, trial, retries=trial.num_failures)
                if Tag.FAILURE_REASON in run.data.tags:  # the failed attempt's own record
                    tracking.client(self.tracking_uri).delete_tag(
                        run.info.run_id, Tag.FAILURE_REASON
                    )
        self._emit(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        with self._recording(trial):
            run = self._run(trial)
            if run is None:  # it died before it created its run: the sweep still records it
                config = trial_config(trial.config)
                name = run_name(config, trial.trial_id, self.searched)
                params = {k: v for k, v in config.items() if k != "name"}
                run_id = tracking.start_trial_run(
                    self.sweep_id, trial.trial_id, params, self.tracking_uri, name=name
                )
                run = tracking.client(self.tracking_uri).get_run(run_id)
            reason = self._record_failure(run, trial, retries=max(0, trial.num_failures - 1))
            if run.info.status == RunStatus.RUNNING:
                tracking.end_trial_run(
                    run.info.run_id, TrialStatus.FAILED, reason, self.tracking_uri
                )
        self._emit(trials)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._trials = list(trials)

    @contextmanager
    def _recording(self, trial: Any) -> Iterator[None]:
        """A failure that cannot be recorded (MLflow unreachable) must not end the whole sweep:
        the driver closes the runs still open when ``fit`` returns."""
        try:
            yield
        except Exception as err:
            log.warning("could not record the failure of trial %s in MLflow: %s", trial, err)

    def _run(self, trial: Any) -> Run | None:
        c = tracking.client(self.tracking_uri)
        run_id = tracking.find_trial_run(c, self.sweep_id, trial.trial_id)
        return c.get_run(run_id) if run_id is not None else None

    def _record_failure(self, run: Run, trial: Any, retries: int) -> str:
        reason = _error_summary(trial)
        tags = {Tag.RETRIES: str(retries), Tag.LAST_ERROR: reason}
        tracking.tag_run(run.info.run_id, tags, self.tracking_uri)
        return reason

    def _end_if_open(self, trial: Any, status: str, reason: str) -> None:
        run = self._run(trial)
        if run is not None and run.info.status == RunStatus.RUNNING:
            tracking.end_trial_run(run.info.run_id, status, reason, self.tracking_uri)


def _error_summary(trial: Any) -> str:
    """The trial's last error in a line: the trial's own exception, or why its worker died.

    Tune keeps the last error pickled (and every error as text) in the trial's driver-side
    directory; a task error wraps the trial's exception, an actor error says how the worker died.
    """
    exc: BaseException | None = None
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        try:
            with open(trial.pickled_error_file, "rb") as f:
                exc = cloudpickle.load(f)
        except Exception:  # an exception class this process cannot import: use the text
            exc = None
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if exc is not None:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"trial failed; see {trial.path}"
