"""Searches for the sweep cache: pages of sweeps, and what changed since the last look.

The cache (`service.cache`) never lists the whole history: it asks MLflow for one page of
sweeps at a time (newest first, MLflow doing the filtering) and, to follow what runs, for the
runs that are running now or ended since its last look; both searches filter on run attributes
(``attributes.status``, ``attributes.end_time``) that MLflow's stores index or scan cheaply,
so their cost follows the work in flight, not the size of the history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.entities import Run, ViewType
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from service.record import (
    ListedSweep,
    MlflowErrors,
    SweepStore,
)
from sweeps import tracking
from sweeps.records import TrialRecord
from sweeps.vocabulary import (
    KIND_SWEEP,
    KIND_TRIAL,
    NEWEST_FIRST,
    SweepStatus,
    Tag,
    ended_since_filter,
    running_filter,
    sweeps_filter,
)

__all__ = ["Changes", "SweepSearch", "like_fragment"]

# What `SweepSearch.page` puts into an ILIKE pattern unescaped (no quote, no wildcard, ASCII:
# MLflow's ILIKE and Python's casefold agree on it).
_SAFE_LIKE = re.compile(r"[A-Za-z0-9 .-]+")


@dataclass(frozen=True)
class Changes:
    """The runs running now or ended since a time, as sweeps and trials.

    Attributes:
        sweeps: those of the runs that are sweeps, by id.
        running: the ids of the sweeps whose run is running (active, as MLflow sees it).
        trials: those of the runs that are trials, by the id of their sweep.
    """

    sweeps: dict[str, ListedSweep]
    running: frozenset[str]
    trials: dict[str, list[TrialRecord]]


class SweepSearch:
    """The cache's searches in the store's MLflow; each raises `BackendUnavailable` when MLflow
    cannot answer, like the store's methods."""

    def __init__(self, store: SweepStore) -> None:
        self.store = store

    def experiment_ids(self) -> list[str]:
        """The ids of the active experiments (where sweeps are searched)."""
        with MlflowErrors("list the experiments"):
            return [e.experiment_id for e in self.store._experiments()]

    def page(
        self,
        experiment_ids: list[str],
        *,
        status: str | None = None,
        name_like: str | None = None,
        max_results: int = 100,
        page_token: str | None = None,
    ) -> tuple[list[ListedSweep], str | None]:
        """One page of sweeps, newest first, filtered by MLflow; and the next page's token.

        Args:
            status: only sweeps with this status.
            name_like: only sweeps whose name contains this, case-insensitively; a fragment of
                `like_fragment`'s alphabet (the caller filters on the rest of a name itself).

        Raises:
            ValueError: an unknown status, or a name fragment outside that alphabet.
        """
        if status is not None and status not in set(SweepStatus):
            raise ValueError(
                f"unknown sweep status {status!r}; one of {sorted(s.value for s in SweepStatus)}"
            )
        if name_like is not None and not _SAFE_LIKE.fullmatch(name_like):
            raise ValueError(f"name fragment {name_like!r} has characters MLflow needs escaped")
        if not experiment_ids:
            return [], None
        query = sweeps_filter(status=status, name_ilike=name_like or None)
        with MlflowErrors("list sweeps"):
            found = self.store.client.search_runs(
                experiment_ids=experiment_ids,
                filter_string=query,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results,
                order_by=[NEWEST_FIRST],
                page_token=page_token,
            )
        return [ListedSweep.from_run(run) for run in found], found.token or None

    def changes(self, since_ms: int) -> Changes:
        """Sweeps and trials whose runs are running now or ended at ``since_ms`` or later.

        Two searches on run attributes, whatever the size of the history: what is running is
        what can change, and a run that ended since the last look changed once more.
        """
        with MlflowErrors("follow the active sweeps"):
            ids = [e.experiment_id for e in self.store._experiments()]
            if not ids:
                return Changes({}, frozenset(), {})
            running = self._all(ids, running_filter())
            ended = self._all(ids, ended_since_filter(since_ms))
        sweeps: dict[str, ListedSweep] = {}
        trials: dict[str, dict[str, TrialRecord]] = {}
        for run in [*running, *ended]:
            kind = run.data.tags.get(Tag.KIND)
            if kind == KIND_SWEEP:
                sweeps[run.info.run_id] = ListedSweep.from_run(run)
            elif kind == KIND_TRIAL and run.data.tags.get(Tag.SWEEP_ID):
                by_run = trials.setdefault(run.data.tags[Tag.SWEEP_ID], {})
                by_run[run.info.run_id] = tracking.trial_from_run(run).json_safe()
        active = frozenset(r.info.run_id for r in running if r.info.run_id in sweeps)
        return Changes(sweeps, active, {k: list(v.values()) for k, v in trials.items()})

    def write_summary(self, sweep_id: str, text: str) -> None:
        """Keep an ended sweep's summary on its parent run (``service.summary``)."""
        if len(text) <= MAX_TAG_VAL_LENGTH:
            self.store.set_tags(sweep_id, {Tag.SUMMARY: text})

    def _all(self, experiment_ids: list[str], query: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            found = self.store.client.search_runs(
                experiment_ids=experiment_ids,
                filter_string=query,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=token,
            )
            runs.extend(found)
            token = found.token
            if not token:
                return runs


def like_fragment(needle: str) -> str | None:
    """The longest part of ``needle`` that MLflow's ILIKE can search for unescaped, if any.

    Every name containing ``needle`` contains it, so MLflow narrows the search with it and the
    caller checks the whole needle on what comes back.
    """
    parts = _SAFE_LIKE.findall(needle)
    return max(parts, key=len) if parts else None
