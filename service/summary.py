"""What the listing shows of a sweep without its trials: progress counts and the best trial.

A finished sweep never changes, so its summary is computed once from its trials and kept on its
parent run as the tag ``l0sweep.summary``; listing a thousand finished sweeps then reads their
parent runs only. The tag carries the run's end time: a sweep resumed and ended again has a new
end time, so a summary written at an earlier end is recognised as stale and computed again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.schemas import Progress
from sweeps.records import SweepRecord, TrialRecord, finite
from sweeps.vocabulary import TRIAL_PROGRESS

__all__ = ["Summary", "best_trial", "end_ms", "summarize", "summarize_progress"]


@dataclass(frozen=True)
class Summary:
    """Progress and best trial of a sweep as of ``end_time`` (ms; None while it runs)."""

    progress: Progress
    best: dict[str, Any] | None
    end_time: int | None

    def to_tag(self) -> str:
        return json.dumps(
            {"end_time": self.end_time, "progress": self.progress.model_dump(), "best": self.best},
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_tag(cls, text: str | None, end_time: int | None) -> Summary | None:
        """The summary in ``text`` if it was written at ``end_time``; None if absent, unreadable
        or stale (the sweep ended again since)."""
        if not text or end_time is None:
            return None
        try:
            value = json.loads(text)
            if value["end_time"] != end_time:
                return None
            best = value["best"]
            return cls(Progress(**value["progress"]), best if isinstance(best, dict) else None,
                       end_time)  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


def summarize(
    trials: list[TrialRecord],
    num_trials: int,
    objectives: list[dict[str, Any]],
    end_time: int | None,
) -> Summary:
    """The summary of a sweep from its trials."""
    return Summary(summarize_progress(trials, num_trials), best_trial(trials, objectives), end_time)


def summarize_progress(trials: list[TrialRecord], num_trials: int) -> Progress:
    """Count trials by state; trials not yet created count as pending."""
    counts = {"pending": 0, "running": 0, "finished": 0, "failed": 0, "stopped": 0}
    for trial in trials:
        counts[TRIAL_PROGRESS.get(str(trial.status).upper(), "pending")] += 1
    total = max(num_trials, len(trials))
    counts["pending"] += total - len(trials)
    return Progress(total=total, **counts)


def best_trial(trials: list[TrialRecord], objectives: list[dict[str, Any]]) -> dict | None:
    """The trial best on the first objective so far, with its objective metrics."""
    if not objectives:
        return None
    metric, mode = objectives[0]["metric"], objectives[0].get("mode", "max")
    scored = [t for t in trials if finite(t.metrics.get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda t: t.metrics[metric])
    names = [o["metric"] for o in objectives]
    return {
        "trial_id": best.trial_id,
        "run_id": best.run_id,
        "metrics": {n: best.metrics.get(n) for n in names if n in best.metrics},
    }


def end_ms(record: SweepRecord) -> int | None:
    """The end time of the sweep's run, in MLflow's milliseconds (what a summary is tied to)."""
    return round(record.ended_at.timestamp() * 1000) if record.ended_at else None
