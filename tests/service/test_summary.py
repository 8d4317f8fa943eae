"""Summaries of ended sweeps and the name filter pushed into MLflow: pure logic, no MLflow."""

from __future__ import annotations

import pytest

from service.search import like_fragment
from service.summary import Summary, summarize
from sweeps.records import TrialRecord

TRIALS = [
    TrialRecord("r0", "t0", status="FINISHED", metrics={"val_accuracy": 0.8, "sparsity": 0.5}),
    TrialRecord("r1", "t1", status="FAILED"),
    TrialRecord("r2", "t2", status="STOPPED", metrics={"val_accuracy": 0.9, "sparsity": 0.2}),
]
OBJECTIVES = [{"metric": "val_accuracy", "mode": "max"}, {"metric": "sparsity", "mode": "max"}]


def test_a_summary_round_trips_through_its_tag_at_the_same_end_time() -> None:
    summary = summarize(TRIALS, 4, OBJECTIVES, end_time=1_700_000_000_123)
    assert (summary.progress.total, summary.progress.pending) == (4, 1)
    assert (summary.progress.finished, summary.progress.failed) == (1, 1)
    assert summary.progress.stopped == 1 and summary.best["trial_id"] == "t2"
    assert Summary.from_tag(summary.to_tag(), 1_700_000_000_123) == summary


@pytest.mark.parametrize(
    ("text", "end_time"),
    [
        (None, 5),  # never summarized
        ('{"end_time": 4, "progress": {"total": 1}, "best": null}', 5),  # ended again since
        ('{"end_time": 5, "progress": {"total": 1}, "best": null}', None),  # running again
        ("not json", 5),
        ('{"end_time": 5}', 5),
        ('{"end_time": 5, "progress": {"total": "many"}, "best": null}', 5),
        ("[1, 2]", 5),
    ],
)
def test_a_missing_stale_or_unreadable_summary_is_none(text, end_time) -> None:
    assert Summary.from_tag(text, end_time) is None


@pytest.mark.parametrize(
    ("needle", "fragment"),
    [
        ("mnist-l0", "mnist-l0"),
        ("lenet_5 caffe", "5 caffe"),  # "_" is a LIKE wildcard: the longest run without it
        ("100%", "100"),
        ("it's", "it"),
        ("日本語-run", "-run"),  # non-ASCII left to the exact check after the search
        ("日本語", None),
        ("%_'", None),
    ],
)
def test_the_name_filter_pushes_a_safe_fragment(needle, fragment) -> None:
    assert like_fragment(needle) == fragment
