"""The control plane's decisions, against in-memory fakes of MLflow's store and Ray's job runner
(tests/fakes.py): each branch of reconciliation, the cache's merge of what changed, the rendered
bodies' invalidation. The same paths with the real Ray and MLflow: test_reconcile, test_faults,
test_local_runs, test_scale."""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import BaseModel

from service.cache import SweepCache
from service.control import SweepControl
from service.errors import BackendUnavailable
from service.jobs import JobRunner, JobState
from service.record import ListedSweep, SweepStore
from service.routes.sweeps import RenderedCache
from service.search import Changes, SweepSearch
from tests.fakes import FakeJobs, FakeSearch, FakeStore, record, trial

pytestmark = pytest.mark.fast

A, B = "a" * 32, "b" * 32
JOB_A0 = JobRunner.submission_id(A, 0)


class _Body(BaseModel):
    """A response body as the routes render it."""

    n: int


def _control(store: FakeStore, jobs: FakeJobs, **kw) -> SweepControl:
    cache = SweepCache(store)  # type: ignore[arg-type]
    cache.search = FakeSearch()  # type: ignore[assignment]
    for r in store.records.values():
        cache.put(r, trials=[])
    options = {"max_concurrent_sweeps": 4, "max_resubmits": 2, "local_run_timeout_s": 300.0} | kw
    return SweepControl(store, jobs, cache, **options)  # type: ignore[arg-type]


def test_the_fakes_have_the_real_interfaces():
    """A fake method is one the control plane calls on the real class, with its parameters."""
    for fake, real in ((FakeStore, SweepStore), (FakeJobs, JobRunner), (FakeSearch, SweepSearch)):
        for name, method in inspect.getmembers(fake, inspect.isfunction):
            if name.startswith("_"):
                continue
            assert hasattr(real, name), (real.__name__, name)
            fake_params = list(inspect.signature(method).parameters)
            real_params = list(inspect.signature(getattr(real, name)).parameters)
            assert fake_params == real_params, (real.__name__, name, real_params)


# --- reconciliation --------------------------------------------------------------------------


def test_a_live_driver_is_followed_and_nothing_is_read_or_written():
    store = FakeStore(record(A, job_id=JOB_A0))
    jobs = FakeJobs({JOB_A0: JobState(JOB_A0, "RUNNING", None)})
    control = _control(store, jobs)
    reads = store.reads
    control.reconcile()
    assert jobs.submitted == [] and store.writes == [] and store.reads == reads


def test_a_sweep_its_driver_ended_meanwhile_is_only_read_again():
    """The cache lags: the store says FINISHED; nothing is resubmitted, the cache catches up."""
    store = FakeStore(record(A, job_id=JOB_A0))
    jobs = FakeJobs({JOB_A0: JobState(JOB_A0, "SUCCEEDED", None)})
    control = _control(store, jobs)
    store.records[A] = record(A, "FINISHED", job_id=JOB_A0)
    store.trial_lists[A] = [trial("r1", "FINISHED", 0.9)]
    control.reconcile()
    assert jobs.submitted == [] and store.writes == []
    view = control.cache.get(A)
    assert (
        view is not None
        and view.record.status == "FINISHED"
        and view.trials == store.trial_lists[A]
    )
    assert control.cache.active() == []


def test_a_sweep_recorded_but_never_submitted_is_submitted():
    """The service died between recording and submitting: Ray knows no job, no job id recorded."""
    store = FakeStore(record(A, "PENDING"))
    jobs = FakeJobs()
    _control(store, jobs).reconcile()
    assert jobs.submitted == [(A, 0)]
    assert store.writes == [("set_tags", A, {"l0sweep.job_id": JOB_A0})]


def test_a_cancelled_sweep_whose_driver_stopped_ends_cancelled():
    store = FakeStore(record(A, job_id=JOB_A0, cancel_requested=True))
    jobs = FakeJobs({JOB_A0: JobState(JOB_A0, "STOPPED", None)})
    control = _control(store, jobs)
    control.reconcile()
    assert store.writes == [("end", A, ("CANCELLED", "cancelled; its driver stopped"))]
    assert jobs.submitted == [] and control.cache.active() == []


def test_a_driver_that_died_is_resubmitted_as_the_next_attempt():
    store = FakeStore(record(A, job_id=JOB_A0))
    jobs = FakeJobs({JOB_A0: JobState(JOB_A0, "FAILED", "node died")})
    _control(store, jobs).reconcile()
    job_a1 = JobRunner.submission_id(A, 1)
    assert jobs.submitted == [(A, 1)]
    assert store.writes == [("set_tags", A, {"l0sweep.job_attempt": "1", "l0sweep.job_id": job_a1})]
    assert store.records[A].job_attempt == 1 and store.records[A].job_id == job_a1


@pytest.mark.parametrize(("state", "reason"), [
    (JobState(JobRunner.submission_id(A, 2), "FAILED", "OOM"), "OOM"),
    (None, "the Ray job is gone"),
])  # fmt: skip
def test_a_driver_that_died_too_often_fails_the_sweep(state, reason):
    job_a2 = JobRunner.submission_id(A, 2)
    store = FakeStore(record(A, job_id=job_a2, job_attempt=2))
    jobs = FakeJobs({job_a2: state})
    control = _control(store, jobs, max_resubmits=2)
    control.reconcile()
    assert jobs.submitted == []
    assert store.writes == [
        ("end", A, ("FAILED", f"driver ended 3 times without finishing: {reason}"))
    ]


def test_a_local_run_is_ended_only_once_its_heartbeat_is_silent_too_long():
    now = datetime.now(timezone.utc)
    fresh = record(A, managed=False, last_heartbeat=now - timedelta(seconds=10))
    silent = record(B, managed=False, last_heartbeat=now - timedelta(seconds=900))
    store = FakeStore(fresh, silent)
    jobs = FakeJobs()
    control = _control(store, jobs, local_run_timeout_s=300.0)
    control.reconcile()
    assert jobs.submitted == []
    [(what, sweep_id, (status, message))] = store.writes
    assert (what, sweep_id, status) == ("end", B, "FAILED")
    assert "no heartbeat for 900 s" in message and "`l0sweep run`" in message
    assert [v.record.id for v in control.cache.active()] == [A]


def test_a_local_run_whose_heartbeat_came_meanwhile_is_left_alone():
    """Silent in the cache, but the store has a newer heartbeat: it is alive."""
    now = datetime.now(timezone.utc)
    store = FakeStore(record(A, managed=False, last_heartbeat=now - timedelta(seconds=900)))
    control = _control(store, FakeJobs())
    store.records[A] = record(A, managed=False, last_heartbeat=now)
    control.reconcile()
    assert store.writes == []
    assert control.cache.get(A).record.last_heartbeat == now


def test_one_sweep_whose_backend_is_down_does_not_stop_the_others(caplog):
    store = FakeStore(record(A, job_id=JOB_A0), record(B, "PENDING"))

    class FlakyJobs(FakeJobs):
        def state(self, submission_id: str) -> JobState | None:
            if submission_id == JOB_A0:
                raise BackendUnavailable("Ray", "could not read the job (fake)")
            return super().state(submission_id)

    jobs = FlakyJobs()
    with caplog.at_level(logging.WARNING, logger="service.control"):
        _control(store, jobs).reconcile()
    assert jobs.submitted == [(B, 0)]
    assert f"reconciling sweep {A}" in caplog.text and "Ray is unavailable" in caplog.text


# --- creation --------------------------------------------------------------------------------


def test_a_creation_whose_submission_fails_leaves_nothing(monkeypatch):
    """Ray down after the record was made (and any other failure of the submit): undone."""
    from sweeps.spec import SweepSpec
    from tests.service.conftest import TINY_SPEC

    store = FakeStore()
    monkeypatch.setattr(store, "ping", lambda: None, raising=False)
    monkeypatch.setattr(store, "find_by_idempotency_key", lambda key: None, raising=False)
    monkeypatch.setattr(store, "create", lambda spec, tags: store.records.setdefault(A, record(A, "PENDING")).id, raising=False)  # fmt: skip

    class RefusingJobs(FakeJobs):
        def submit(self, sweep_id: str, attempt: int) -> str:
            raise RuntimeError("our bug in the submission")

    control = _control(store, RefusingJobs())
    control.cache.refreshed_at = 0.0
    with pytest.raises(RuntimeError, match="our bug"):
        control.create(SweepSpec.model_validate(TINY_SPEC))
    assert A not in store.records and ("delete", A, None) in store.writes


# --- the cache's merge -----------------------------------------------------------------------


def _look(cache: SweepCache, *sweeps, trials=None, running=()) -> None:
    cache.search.found = Changes(  # type: ignore[attr-defined]
        {r.id: ListedSweep(r, None) for r in sweeps}, frozenset(running), trials or {}
    )
    cache.refresh()


def test_the_cache_reads_an_active_sweeps_trials_once_then_merges_what_changed():
    store = FakeStore(record(A))
    store.trial_lists[A] = [trial("r1", val_accuracy=0.5), trial("r2", val_accuracy=0.6)]
    cache = SweepCache(store)  # type: ignore[arg-type]
    cache.search = FakeSearch()  # type: ignore[assignment]
    _look(cache, store.records[A], running=[A])
    first = cache.get(A)
    assert [t.run_id for t in first.trials] == ["r1", "r2"]
    reads = store.reads

    changed = trial("r2", "FINISHED", 0.8)
    _look(cache, store.records[A], trials={A: [changed]}, running=[A])
    merged = cache.get(A)
    assert store.reads == reads, "the merge read the trials again"
    assert merged.trials == [trial("r1", val_accuracy=0.5), changed]
    assert cache.generation > 0

    generation = cache.generation
    _look(cache, store.records[A], trials={A: [changed]}, running=[A])
    assert cache.get(A) is merged and cache.generation == generation, "nothing changed"


def test_the_cache_settles_a_sweep_that_ended_out_of_sight_and_keeps_its_summary():
    """Gone from the running set: read again, ended with all its trials and a summary written."""
    store = FakeStore(record(A))
    store.trial_lists[A] = [trial("r1")]
    cache = SweepCache(store)  # type: ignore[arg-type]
    cache.search = FakeSearch()  # type: ignore[assignment]
    _look(cache, store.records[A], running=[A])
    ended = datetime.now(timezone.utc)
    store.records[A] = replace(record(A, "FINISHED"), ended_at=ended)
    store.trial_lists[A] = [trial("r1", "FINISHED", 0.9), trial("r2", "FINISHED", 0.7)]
    _look(cache)  # the look finds nothing running; the active sweep is read on its own
    view = cache.get(A)
    assert view.record.status == "FINISHED" and len(view.trials) == 2
    assert cache.active() == [] and view.summary is not None
    assert view.summary.progress.finished == 2
    assert A in cache.search.summaries  # type: ignore[attr-defined]


def test_a_sweep_deleted_meanwhile_leaves_the_cache():
    store = FakeStore(record(A))
    cache = SweepCache(store)  # type: ignore[arg-type]
    cache.search = FakeSearch()  # type: ignore[assignment]
    _look(cache, store.records[A], running=[A])
    del store.records[A]
    _look(cache)
    assert cache.get(A) is None and cache.active() == []


def test_a_failed_look_keeps_the_last_view_and_says_why():
    store = FakeStore(record(A))
    cache = SweepCache(store)  # type: ignore[arg-type]
    cache.search = FakeSearch()  # type: ignore[assignment]
    _look(cache, store.records[A], running=[A])
    before = cache.get(A)
    store.down = True
    with pytest.raises(BackendUnavailable):
        _look(cache)
    assert cache.get(A) is before and isinstance(cache.last_error, BackendUnavailable)
    with pytest.raises(BackendUnavailable):
        cache.ensure_fresh()


# --- the rendered bodies ---------------------------------------------------------------------


def test_rendered_bodies_live_as_long_as_their_view():
    store = FakeStore(record(A))
    cache = SweepCache(store)  # type: ignore[arg-type]
    rendered = RenderedCache()
    view = cache.put(store.records[A], trials=[trial("r1")])
    renders: list[int] = []

    def render(n: int):
        renders.append(n)
        return _Body(n=n)

    assert rendered.of("sweep", view, lambda: render(1)) == b'{"n":1}'
    assert rendered.of("sweep", view, lambda: render(2)) == b'{"n":1}', "rendered again"
    newer = cache.put(store.records[A], trials=[trial("r1", "FINISHED", 0.9)])
    assert newer is not view
    assert rendered.of("sweep", newer, lambda: render(3)) == b'{"n":3}'
    assert renders == [1, 3]


def test_rendered_pages_last_until_the_cache_changes():
    store = FakeStore(record(A))
    cache = SweepCache(store)  # type: ignore[arg-type]
    rendered = RenderedCache()
    generation = cache.generation
    assert rendered.page(generation, ("list",)) is None
    rendered.keep_page(generation, ("list",), b"page-1")
    assert rendered.page(generation, ("list",)) == b"page-1"
    cache.put(store.records[A], trials=[])
    assert cache.generation != generation
    assert rendered.page(cache.generation, ("list",)) is None
    rendered.keep_page(generation, ("list",), b"stale")  # rendered from the old generation
    assert rendered.page(cache.generation, ("list",)) is None
