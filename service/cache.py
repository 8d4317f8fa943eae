"""The API's in-memory view of the sweeps, kept in step with MLflow at the cost of what changes.

MLflow searches take tens of milliseconds and the API must answer reads in a few, so reads are
served from here. What is held, and what each costs:

- the **active** sweeps with their trials, followed by `refresh` (every ``refresh_interval_s``):
  two searches on run attributes (`service.search.SweepSearch.changes`) bring the runs running
  now and those ended since the last look; a sweep's trials are read whole once, when it is first
  seen active, then only the trials that run or ended are merged in;
- an **index** of every sweep listed so far, as its record and summary (progress and best trial,
  `service.summary`) without its trials: filled page by page in the background after a start
  (`warm_step`) and by the pages the API reads from MLflow until then; once complete the listing
  is served from it (the total count included);
- a bounded LRU of **finished** sweeps with their trials (``finished_cache_size``), read when
  their trials or front are first asked for. A finished sweep never changes: no refresh reads it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from service.errors import BackendUnavailable, NotFound
from service.record import ListedSweep, SweepStore
from service.schemas import Progress
from service.search import SweepSearch, like_fragment
from service.summary import Summary, best_trial, end_ms, summarize, summarize_progress
from sweeps.records import SweepRecord, TrialRecord
from sweeps.vocabulary import ACTIVE_SWEEP

__all__ = ["SweepCache", "SweepView"]

_EPOCH = datetime.fromtimestamp(0, tz=timezone.utc)


@dataclass(frozen=True, eq=False)
class SweepView:
    """A sweep as the API shows it (immutable, hashed by identity).

    ``trials`` is None for a finished sweep listed by its summary alone; a view has its trials
    or a summary, or it cannot be shown (`showable`).
    """

    record: SweepRecord
    trials: list[TrialRecord] | None = None
    summary: Summary | None = None

    @property
    def showable(self) -> bool:
        return self.trials is not None or self.summary is not None

    @property
    def progress(self) -> Progress:
        if self.trials is not None:
            return summarize_progress(self.trials, self.record.num_trials)
        assert self.summary is not None, f"sweep {self.record.id} shown before it was read"
        return self.summary.progress

    @property
    def best(self) -> dict[str, Any] | None:
        if self.trials is not None:
            return best_trial(self.trials, self.record.objectives)
        assert self.summary is not None, f"sweep {self.record.id} shown before it was read"
        return self.summary.best


class SweepCache:
    """Active sweeps, the index of listed sweeps and recently read finished ones (see above).

    Args:
        store: the MLflow record.
        finished_cache_size: finished sweeps kept with their trials (least recently read go).
        warm_page_size: sweeps read per page by `warm_step`.
        overlap_s: how far back each look for ended runs reaches before the previous one (runs
            are ended with the clock of the node that ends them, and an ending may reach MLflow
            while a look runs); every run ended this recently is read again by each look.
    """

    def __init__(
        self,
        store: SweepStore,
        *,
        finished_cache_size: int = 32,
        warm_page_size: int = 200,
        overlap_s: float = 10.0,
    ) -> None:
        self.store = store
        self.search = SweepSearch(store)
        self.finished_cache_size = finished_cache_size
        self.warm_page_size = warm_page_size
        self.overlap_ms = int(overlap_s * 1000)
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._active: dict[str, SweepView] = {}
        self._index: dict[str, SweepView] = {}
        self._order: list[str] = []  # the index's ids, newest first once sorted
        self._order_sorted = True
        self._recent: OrderedDict[str, SweepView] = OrderedDict()
        self._dropped: set[str] = set()  # deleted here: an older read must not bring them back
        self._touched: dict[str, float] = {}  # written through (put, drop), when
        # Bumped on every change, so that renderings of the listing can be reused until then.
        self.generation = 0
        self.last_error: BackendUnavailable | None = None
        self.refreshed_at: float | None = None
        self._tried_at: float | None = None
        self._since_ms: int | None = None
        self.warm = False
        self._warm_token: str | None = None
        self._warm_experiments: list[str] | None = None

    # --- following what changes ------------------------------------------------------------

    def refresh(self) -> None:
        """Read what changed since the last look; keeps the old view on failure."""
        with self._refresh_lock:
            started = self._tried_at = time.monotonic()
            look_ms = int(time.time() * 1000)
            since = (self._since_ms if self._since_ms is not None else look_ms) - self.overlap_ms
            try:
                changes = self.search.changes(since)
                listed: dict[str, ListedSweep | None] = dict(changes.sweeps)
                for sweep_id in self.active_ids():
                    if sweep_id not in listed:  # no longer running, ended out of sight, deleted
                        listed[sweep_id] = self._listed_or_none(sweep_id)
                for sweep_id, found in listed.items():
                    if self._touched.get(sweep_id, -1.0) >= started:
                        continue  # written through since this look began: newer than it
                    if found is None:
                        self._forget(sweep_id)
                    elif found.record.terminal:
                        self._settle(found)
                    else:
                        self._follow(found, changes.trials.get(sweep_id, []))
            except BackendUnavailable as exc:
                self.last_error = exc
                raise
            with self._lock:
                self._touched = {k: t for k, t in self._touched.items() if t >= started}
            self._since_ms = look_ms
            self.last_error = None
            self.refreshed_at = time.monotonic()

    def ensure_fresh(self, retry_after_s: float = 1.0) -> None:
        """Refresh once if the cache never was (one refresh at a time; after a failure, again
        only ``retry_after_s`` later); raise the last failure, if the last refresh failed."""
        if self.refreshed_at is None:
            with self._refresh_lock:
                tried = self._tried_at
            if tried is None or time.monotonic() - tried >= retry_after_s:
                with contextlib.suppress(BackendUnavailable):
                    self.refresh()  # a failure is kept in last_error
        if self.last_error is not None:
            raise self.last_error
        if self.refreshed_at is None:
            raise BackendUnavailable("MLflow", "the sweeps have not been read yet")

    def _listed_or_none(self, sweep_id: str) -> ListedSweep | None:
        try:
            return self.store.listed(sweep_id)
        except NotFound:
            return None

    def _follow(self, found: ListedSweep, changed_trials: list[TrialRecord]) -> None:
        """An active sweep: its trials read whole the first time, then the changed ones merged."""
        sweep_id = found.record.id
        old = self._active.get(sweep_id)
        if old is None or old.trials is None:
            trials = self._trials(sweep_id)
        else:
            by_run = {t.run_id: t for t in old.trials}
            by_run.update({t.run_id: t for t in changed_trials})
            trials = sorted(by_run.values(), key=lambda t: t.trial_id or "")
            if found.record == old.record and trials == old.trials:
                return
        self._store_view(SweepView(found.record, trials))

    def _settle(self, found: ListedSweep, trials: list[TrialRecord] | None = None) -> SweepView:
        """An ended sweep: its summary from its tag, else from its trials (read once, and the
        summary written back so that no later start reads them for the listing)."""
        record = found.record
        sweep_id = record.id
        with self._lock:
            was_active = sweep_id in self._active
            current = self._recent.get(sweep_id) or self._index.get(sweep_id)
        seen = current is not None and current.record == record and current.showable
        if trials is None and not was_active and seen:
            return current  # seen ended already (it stays in the look back for a while)
        summary = Summary.from_tag(found.summary_tag, end_ms(record))
        if trials is None and (summary is None or was_active):
            # Ended since it was followed (its last trials are not all seen), or never summarized.
            trials = self._trials(sweep_id)
        if trials is not None:
            computed = summarize(trials, record.num_trials, record.objectives, end_ms(record))
            if summary is None or summary != computed:
                self._write_summary(sweep_id, computed)
            summary = computed
        return self._store_view(SweepView(record, trials, summary))

    def _write_summary(self, sweep_id: str, summary: Summary) -> None:
        if summary.end_time is None:
            return
        with contextlib.suppress(BackendUnavailable, NotFound):
            # Kept in memory anyway; a later start computes it again if this failed.
            self.search.write_summary(sweep_id, summary.to_tag())

    def _trials(self, sweep_id: str) -> list[TrialRecord]:
        try:
            return self.store.trials(sweep_id)
        except NotFound:
            return []

    # --- the views -------------------------------------------------------------------------

    def _store_view(self, view: SweepView) -> SweepView:
        """Place ``view`` where it belongs: active, or finished (index header and LRU)."""
        sweep_id = view.record.id
        with self._lock:
            self._dropped.discard(sweep_id)
            if view.record.status in ACTIVE_SWEEP:
                self._active[sweep_id] = view
                self._recent.pop(sweep_id, None)
                header = view
            else:
                self._active.pop(sweep_id, None)
                header = SweepView(view.record, None, view.summary) if view.summary else view
                if view.trials is not None:
                    self._recent[sweep_id] = view
                    self._recent.move_to_end(sweep_id)
                    while len(self._recent) > self.finished_cache_size:
                        self._recent.popitem(last=False)
                else:
                    self._recent.pop(sweep_id, None)
            self._index_add(header)
            self.generation += 1
            return view

    def _index_add(self, view: SweepView) -> None:
        if view.record.id not in self._index:
            self._order.append(view.record.id)
            self._order_sorted = False
        self._index[view.record.id] = view

    def _forget(self, sweep_id: str) -> None:
        with self._lock:
            self._active.pop(sweep_id, None)
            self._recent.pop(sweep_id, None)
            if self._index.pop(sweep_id, None) is not None:
                self._order.remove(sweep_id)
            self._dropped.add(sweep_id)
            self.generation += 1

    def get(self, sweep_id: str) -> SweepView | None:
        """The sweep as held now (with its trials if they are held), or None; never reads MLflow."""
        with self._lock:
            view = self._active.get(sweep_id) or self._recent.get(sweep_id)
            if view is not None:
                if sweep_id in self._recent:
                    self._recent.move_to_end(sweep_id)
                return view
            return self._index.get(sweep_id)

    def view(self, sweep_id: str) -> SweepView:
        """The sweep ready to show (progress, best trial), read from MLflow if not held.

        Raises:
            NotFound: no such sweep. BackendUnavailable: MLflow is down.
        """
        held = self.get(sweep_id)
        if held is not None and held.showable:
            return held
        return self._read(sweep_id)

    def with_trials(self, sweep_id: str) -> SweepView:
        """The sweep with its trials, read from MLflow if they are not held (then kept: in the
        active set while it runs, in the LRU once it has ended)."""
        held = self.get(sweep_id)
        if held is not None and held.trials is not None:
            return held
        return self._read(sweep_id, trials=True)

    def _read(self, sweep_id: str, trials: bool = False) -> SweepView:
        found = self.store.listed(sweep_id)
        if found.record.terminal:
            return self._settle(found, self._trials(sweep_id) if trials else None)
        return self._store_view(SweepView(found.record, self._trials(sweep_id)))

    def put(self, record: SweepRecord, trials: list[TrialRecord] | None = None) -> SweepView:
        """Write-through after a change made by this process, so readers see it at once."""
        with self._lock:
            self._touched[record.id] = time.monotonic()
            old = self._active.get(record.id) or self._recent.get(record.id)
        if trials is None and old is not None and old.trials is not None:
            trials = old.trials
        if record.terminal and trials is not None:
            summary = summarize(trials, record.num_trials, record.objectives, end_ms(record))
            self._write_summary(record.id, summary)
            return self._store_view(SweepView(record, trials, summary))
        return self._store_view(SweepView(record, trials if trials is not None else []))

    def drop(self, sweep_id: str) -> None:
        with self._lock:
            self._touched[sweep_id] = time.monotonic()
        self._forget(sweep_id)

    def active(self) -> list[SweepView]:
        """The active sweeps (what reconciliation and the concurrency limit need)."""
        with self._lock:
            return list(self._active.values())

    def active_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)

    def held(self) -> dict[str, int]:
        """How many sweeps are held, by kind (for tests and the benchmark)."""
        with self._lock:
            return {"active": len(self._active), "index": len(self._index),
                    "finished_with_trials": len(self._recent)}  # fmt: skip

    # --- the listing -----------------------------------------------------------------------

    def warm_step(self) -> bool:
        """Read the next page of the history into the index; True once all of it is read."""
        if self.warm:
            return True
        if self._warm_experiments is None:
            self._warm_experiments = self.search.experiment_ids()
        listed, token = self.search.page(
            self._warm_experiments, max_results=self.warm_page_size, page_token=self._warm_token
        )
        with self._lock:
            for found in listed:
                self._add_listed(found)
            self._warm_token = token
            self.warm = token is None
            self.generation += 1
        return self.warm

    def _add_listed(self, found: ListedSweep) -> SweepView:
        """The held view of a listed sweep, or a header for it (a newer view is never replaced)."""
        sweep_id = found.record.id
        held = self.get(sweep_id)
        if held is not None or sweep_id in self._dropped:
            return held
        summary = None
        if found.record.terminal:
            summary = Summary.from_tag(found.summary_tag, end_ms(found.record))
        view = SweepView(found.record, None, summary)
        self._index_add(view)
        return view

    def page(
        self, status: str | None, name: str | None, limit: int, offset: int
    ) -> tuple[list[SweepView], int | None, bool]:
        """Sweeps newest first, filtered, ready to show; how many match (None while the index is
        not complete and MLflow's pages did not reach the end); whether more follow."""
        if self.warm:
            with self._lock:
                if not self._order_sorted:
                    self._order.sort(key=lambda i: self._index[i].record.created_at or _EPOCH,
                                     reverse=True)  # fmt: skip
                    self._order_sorted = True
                views = [self._index[i] for i in self._order]
            views = [v for v in views if _matches(v.record, status, name)]
            total: int | None = len(views)
            chosen = views[offset : offset + limit]
            more = offset + limit < len(views)
        else:
            chosen, total, more = self._page_from_mlflow(status, name, limit, offset)
        return [v if v.showable else self.view(v.record.id) for v in chosen], total, more

    def _page_from_mlflow(
        self, status: str | None, name: str | None, limit: int, offset: int
    ) -> tuple[list[SweepView], int | None, bool]:
        """A page read from MLflow's own pages (while the index is being filled)."""
        experiments = self.search.experiment_ids()
        fragment = like_fragment(name) if name else None
        want = offset + limit + 1
        matched: list[ListedSweep] = []
        token = None
        while True:
            listed, token = self.search.page(
                experiments,
                status=status,
                name_like=fragment,
                max_results=min(1000, max(want - len(matched), 50)),
                page_token=token,
            )
            matched += [f for f in listed if _matches(f.record, None, name)]
            if token is None or len(matched) >= want:
                break
        with self._lock:
            chosen = [self._add_listed(f) for f in matched[offset : offset + limit]]
        total = len(matched) if token is None else None
        return [v for v in chosen if v is not None], total, len(matched) > offset + limit


def _matches(record: SweepRecord, status: str | None, name: str | None) -> bool:
    if status is not None and record.status != status:
        return False
    return not name or name.casefold() in record.name.casefold()
