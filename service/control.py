"""The control plane's operations: create, cancel, delete and reconcile sweeps.

Each operation combines the record (`SweepStore`, MLflow) and the jobs (`JobRunner`, Ray) so that a
failure of either leaves nothing half-done: a sweep whose job cannot be submitted is deleted again
before the 503 goes out. Reconciliation makes the service restartable: a sweep recorded as active
whose driver is gone is resubmitted (the driver resumes the Tune experiment), one whose driver is
alive is followed.

A sweep run outside the service (``l0sweep run`` against the service's MLflow) has no Ray job
the service can follow; its driver writes a heartbeat instead (``l0sweep.heartbeat``). One whose
heartbeat is older than ``local_run_timeout_s`` was killed (its trials died with it): the
reconciliation ends it FAILED, and a cancel marks it ended at once, so that it stops counting
against the concurrent-sweep limit and can be deleted.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from service.cache import SweepCache, SweepView
from service.errors import BackendUnavailable, Conflict, TooManySweeps
from service.jobs import JobRunner
from service.record import SweepStore, spec_digest
from sweeps.records import SweepRecord
from sweeps.spec import SweepSpec
from sweeps.vocabulary import ACTIVE_SWEEP, TRUE, SweepStatus, Tag

__all__ = ["SweepControl"]

logger = logging.getLogger(__name__)


class SweepControl:
    """Create, cancel, delete and reconcile sweeps; one per service process.

    Args:
        store: the MLflow record.
        jobs: the Ray job runner.
        cache: the in-memory view the API reads from.
        max_concurrent_sweeps: active (PENDING or RUNNING) sweeps before `create` refuses.
        max_resubmits: how many times a driver that died is resubmitted before the sweep FAILS.
        local_run_timeout_s: how long a local run's heartbeat may be silent before it is ended.
    """

    def __init__(
        self,
        store: SweepStore,
        jobs: JobRunner,
        cache: SweepCache,
        *,
        max_concurrent_sweeps: int,
        max_resubmits: int,
        local_run_timeout_s: float = 300.0,
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.cache = cache
        self.max_concurrent_sweeps = max_concurrent_sweeps
        self.max_resubmits = max_resubmits
        self.local_run_timeout_s = local_run_timeout_s
        # One creation at a time: the concurrency limit and Idempotency-Key stay exact.
        self._create_lock = threading.Lock()

    def create(self, spec: SweepSpec, idempotency_key: str | None = None) -> tuple[SweepView, bool]:
        """Record the sweep and submit its driver.

        Returns:
            The sweep, and whether it was created now (False: replayed by its Idempotency-Key).

        Raises:
            Conflict: the Idempotency-Key was used with a different spec.
            TooManySweeps: the concurrent-sweep limit is reached.
            BackendUnavailable: Ray or MLflow is down; nothing was created.
        """
        with self._create_lock:
            if idempotency_key is not None:
                existing = self.store.find_by_idempotency_key(idempotency_key)
                if existing is not None:
                    if existing.spec_sha256 != spec_digest(spec):
                        raise Conflict(
                            f"Idempotency-Key {idempotency_key!r} was already used for sweep "
                            f"{existing.id} with a different spec"
                        )
                    return self._view(existing), False
            if self.cache.refreshed_at is None:
                self.cache.refresh()  # the active sweeps, before counting them
            active = self.cache.active_count()
            if active >= self.max_concurrent_sweeps:
                raise TooManySweeps(
                    f"{active} sweeps are active, the limit is {self.max_concurrent_sweeps}: "
                    "wait for one to finish or cancel one"
                )
            # Probe both back ends first so that an outage creates nothing.
            self.jobs.ping()
            self.store.ping()
            extra = {Tag.IDEMPOTENCY_KEY: idempotency_key} if idempotency_key else {}
            sweep_id = self.store.create(spec, extra)
            try:
                job_id = self.jobs.submit(sweep_id, attempt=0)
                self.store.set_tags(sweep_id, {Tag.JOB_ID: job_id})
            except Exception:  # Ray down, or Ray refusing our request (a bug): nothing is left
                self._undo_create(sweep_id)
                raise
            record = self.store.get(sweep_id)
            return self.cache.put(record, trials=[]), True

    def cancel(self, sweep_id: str) -> SweepView:
        """Ask the sweep's driver to stop gracefully; the driver records CANCELLED.

        A sweep run outside the service (``l0sweep run``) cannot be stopped from here; once its
        heartbeat is older than ``local_run_timeout_s`` (its driver was killed), a cancel marks
        it ended (CANCELLED) and closes its trials' runs.

        Raises:
            NotFound: no such sweep.
            Conflict: the sweep has already ended, or runs outside the service and is alive.
        """
        record = self.store.get(sweep_id)
        if record.terminal:
            raise Conflict(
                f"sweep {sweep_id} is {record.status}; only active sweeps can be cancelled"
            )
        if not record.managed:
            silent = record.silent_for(datetime.now(timezone.utc))
            if silent <= self.local_run_timeout_s:
                raise Conflict(
                    f"sweep {sweep_id} runs outside the service (`l0sweep run`) and its driver "
                    f"was alive {silent:.0f} s ago: stop it where it runs (Ctrl-C); a cancel "
                    f"marks it ended once it has been silent for {self.local_run_timeout_s:g} s"
                )
            self.store.end(
                sweep_id,
                SweepStatus.CANCELLED,
                f"marked ended by a cancel: {_silence(record, silent)}",
            )
            return self._put(self.store.get(sweep_id))
        self.store.set_tags(sweep_id, {Tag.CANCEL_REQUESTED: TRUE})
        stopped = record.job_id is not None and self.jobs.stop(record.job_id)
        if not stopped:
            # No driver is running (never started, or already gone): nothing else will record it.
            self.store.set_status(
                sweep_id, SweepStatus.CANCELLED, "cancelled before its driver ran"
            )
        return self._put(self.store.get(sweep_id))

    def delete(self, sweep_id: str) -> None:
        """Delete an ended sweep's runs (MLflow soft delete) and forget its Ray job.

        Raises:
            NotFound: no such sweep.
            Conflict: the sweep is still active.
        """
        record = self.store.get(sweep_id)
        if not record.terminal:
            raise Conflict(f"sweep {sweep_id} is {record.status}; cancel it before deleting it")
        self.store.delete(sweep_id)
        self.cache.drop(sweep_id)
        if record.job_id:
            try:
                self.jobs.delete(record.job_id)
            except BackendUnavailable:
                logger.info(
                    "sweep %s deleted; its Ray job %s stays listed", sweep_id, record.job_id
                )

    def reconcile(self) -> None:
        """Follow, resubmit or close every sweep recorded as active (see the module docstring)."""
        for view in self.cache.active():
            if view.record.status not in ACTIVE_SWEEP:
                continue
            try:
                if view.record.managed:
                    self._reconcile_one(view.record)
                else:
                    self._reconcile_local(view.record)
            except BackendUnavailable as exc:
                logger.warning("reconciling sweep %s: %s", view.record.id, exc.message)

    def _reconcile_local(self, cached: SweepRecord) -> None:
        """End a local run (`l0sweep run`) whose heartbeat stopped: FAILED, with the reason."""
        if cached.silent_for(datetime.now(timezone.utc)) <= self.local_run_timeout_s:
            return
        record = self.store.get(cached.id)  # the cache may lag behind a heartbeat or an end
        silent = record.silent_for(datetime.now(timezone.utc))
        if record.terminal or silent <= self.local_run_timeout_s:
            self._put(record)
            return
        self.store.end(record.id, SweepStatus.FAILED, _silence(record, silent))
        logger.info("sweep %s: local run silent for %.0f s; ended FAILED", record.id, silent)
        self._put(self.store.get(record.id))

    def _reconcile_one(self, cached: SweepRecord) -> None:
        job_id = cached.job_id or self.jobs.submission_id(cached.id, cached.job_attempt)
        state = self.jobs.state(job_id)
        if state is not None and state.alive:
            return
        record = self.store.get(cached.id)  # the cache may lag: the driver may have just ended it
        if record.terminal:
            self._put(record)
            return
        if state is None and record.job_id is None:
            # Recorded, never submitted (the service died in between): submit it now.
            job_id = self.jobs.submit(record.id, attempt=record.job_attempt)
            self.store.set_tags(record.id, {Tag.JOB_ID: job_id})
            logger.info("sweep %s: submitted its driver as job %s", record.id, job_id)
        elif record.cancel_requested:
            self.store.end(record.id, SweepStatus.CANCELLED, "cancelled; its driver stopped")
        elif record.job_attempt >= self.max_resubmits:
            reason = state.message if state is not None else "the Ray job is gone"
            self.store.end(
                record.id,
                SweepStatus.FAILED,
                f"driver ended {record.job_attempt + 1} times without finishing: {reason}",
            )
        else:
            attempt = record.job_attempt + 1
            job_id = self.jobs.submit(record.id, attempt=attempt)
            self.store.set_tags(record.id, {Tag.JOB_ATTEMPT: str(attempt), Tag.JOB_ID: job_id})
            logger.info(
                "sweep %s: driver %s is %s; resubmitted as job %s (resumes from its experiment)",
                record.id,
                cached.job_id,
                state.status if state is not None else "gone",
                job_id,
            )
        self._put(self.store.get(record.id))

    def _put(self, record: SweepRecord) -> SweepView:
        """Write a record through to the cache, with its trials read again once it has ended.

        The refresh re-reads a sweep's trials when it sees the sweep's status change; a terminal
        status written through here hides that change from it, so the trials the cache holds
        (read while the sweep ran) would be shown for good.
        """
        if record.terminal:
            return self.cache.put(record, trials=self.store.trials(record.id))
        return self.cache.put(record)

    def _view(self, record: SweepRecord) -> SweepView:
        return self.cache.get(record.id) or self.cache.put(record)

    def _undo_create(self, sweep_id: str) -> None:
        try:
            self.store.delete(sweep_id)
        except BackendUnavailable:
            logger.error(
                "sweep %s was recorded but not submitted, and could not be deleted", sweep_id
            )


def _silence(record: SweepRecord, silent: float) -> str:
    """Why a local run is taken for dead, for its status message."""
    last = record.last_heartbeat or record.created_at
    what = "heartbeat" if record.last_heartbeat else "sign of life (its start; no heartbeat)"
    when = last.strftime("%Y-%m-%d %H:%M:%S UTC") if last else "never"
    return (
        f"its local driver (`l0sweep run`) stopped: no heartbeat for {silent:.0f} s "
        f"(last {what} at {when}); its running trials were killed"
    )
