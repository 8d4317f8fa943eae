"""The sweep cache at a lab's scale (issue 18), on the session's real MLflow server.

What the cache asks MLflow is seen on the wire: `recorded` wraps the REST store's
``call_endpoint`` (every request this process makes to MLflow, whichever client makes it) and
keeps each request's endpoint and body and each answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.protobuf.json_format import MessageToJson
from mlflow.store.tracking import rest_store

from service.app import create_app
from service.cache import SweepCache
from service.record import SweepStore
from service.settings import Settings
from sweeps import tracking
from sweeps.spec import SweepSpec
from sweeps.vocabulary import Tag
from tests.service.conftest import TINY_SPEC

OBJECTIVES = [{"metric": "val_accuracy", "mode": "max"}, {"metric": "sparsity", "mode": "max"}]


def _sweep(uri: str, name: str, status: str, trials: int = 2) -> tuple[str, list[str]]:
    """A sweep recorded by `sweeps.tracking` as a driver records it; ``trials`` trial runs."""
    spec = SweepSpec.model_validate(TINY_SPEC | {"name": name, "objectives": OBJECTIVES})
    sweep_id = tracking.create_sweep_run(spec, uri)
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=uri)
    runs = []
    for n in range(trials):
        run_id = tracking.start_trial_run(sweep_id, f"{name}_{n:05d}", {"lam": n}, uri)
        metrics = {"val_accuracy": 0.5 + n / 10, "sparsity": 0.9 - n / 10, "epoch": 1}
        tracking.log_epoch(run_id, metrics, 1, uri)
        runs.append(run_id)
    if status != "RUNNING":
        for run_id in runs:
            tracking.end_trial_run(run_id, "FINISHED", tracking_uri=uri)
        tracking.set_sweep_status(sweep_id, status, f"{trials} trials", tracking_uri=uri)
    return sweep_id, runs


@pytest.fixture
def recorded(monkeypatch) -> list[dict[str, Any]]:
    """Every request to MLflow from this process from now on: endpoint, body, answer."""
    calls: list[dict[str, Any]] = []
    real = rest_store.call_endpoint

    def spy(host_creds, endpoint, method, json_body, response_proto, **kwargs):
        answer = real(host_creds, endpoint, method, json_body, response_proto, **kwargs)
        calls.append({"endpoint": endpoint, "body": str(json_body),
                      "answer": MessageToJson(answer)})  # fmt: skip
        return answer

    monkeypatch.setattr(rest_store, "call_endpoint", spy)
    return calls


def _mentions(calls: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    return [c for c in calls if any(i in c["body"] or i in c["answer"] for i in ids)]


def test_refresh_asks_nothing_about_a_finished_sweep_once_read(mlflow_uri, recorded) -> None:
    """The issue's "done when": after a finished sweep is read once, the refresh loop neither
    asks MLflow about it nor gets it back, while it follows an active sweep's changes."""
    tag = uuid.uuid4().hex[:8]
    done_id, done_runs = _sweep(mlflow_uri, f"done-{tag}", "FINISHED")
    cache = SweepCache(SweepStore(mlflow_uri), overlap_s=0)
    cache.refresh()
    active_id, active_runs = _sweep(mlflow_uri, f"active-{tag}", "RUNNING", trials=1)
    try:
        view = cache.with_trials(done_id)
        assert view.progress.finished == 2 and view.best["trial_id"] == f"done-{tag}_00001"
        assert _mentions(recorded, [done_id]), "the first read asks MLflow"
        cache.refresh()  # the active sweep appears: its trials are read whole, once
        assert cache.get(active_id).progress.running == 1

        tracking.end_trial_run(active_runs[0], "FINISHED", tracking_uri=mlflow_uri)
        recorded.clear()
        for _ in range(3):
            cache.refresh()
        assert cache.get(active_id).progress.finished == 1  # the ended trial was merged in
        assert cache.get(done_id).trials is not None
        assert not _mentions(recorded, [done_id, *done_runs]), _mentions(recorded, [done_id])
        # Each look: the experiments and two searches on run attributes, whatever the history.
        searches = [c["body"] for c in recorded if c["endpoint"].endswith("runs/search")]
        assert len(searches) == 6, searches
        assert all("attributes." in s and "sweep_id" not in s for s in searches), searches
        assert not [c for c in recorded if c["endpoint"].endswith("runs/get")]
    finally:
        _end(mlflow_uri, active_id)


def test_a_sweep_that_ends_is_read_once_more_and_summarized(mlflow_uri, recorded) -> None:
    """An active sweep that ends: its final trials are read once, its summary is kept on its
    run, and a later cache (a restart) lists it from that summary without reading its trials."""
    tag = uuid.uuid4().hex[:8]
    sweep_id, runs = _sweep(mlflow_uri, f"ends-{tag}", "RUNNING")
    cache = SweepCache(SweepStore(mlflow_uri))
    cache.refresh()
    for run_id in runs:
        tracking.end_trial_run(run_id, "FINISHED", tracking_uri=mlflow_uri)
    tracking.set_sweep_status(sweep_id, "FINISHED", "2 trials", tracking_uri=mlflow_uri)
    cache.refresh()
    view = cache.get(sweep_id)
    assert view.record.status == "FINISHED" and view.progress.finished == 2
    assert sweep_id not in cache.active_ids()
    tags = SweepStore(mlflow_uri).client.get_run(sweep_id).data.tags
    assert '"finished":2' in tags[Tag.SUMMARY]

    restarted = SweepCache(SweepStore(mlflow_uri))
    restarted.refresh()
    recorded.clear()
    views, _, _ = restarted.page(None, f"ends-{tag}", 10, 0)
    assert [v.record.id for v in views] == [sweep_id]
    assert views[0].trials is None and views[0].progress == view.progress
    assert views[0].best == view.best
    assert not [c for c in recorded if sweep_id in c["body"]]  # no search of its trials


def test_a_stale_summary_is_computed_again(mlflow_uri) -> None:
    """A sweep resumed and ended again has a new end time: its old summary is not shown."""
    tag = uuid.uuid4().hex[:8]
    sweep_id, _ = _sweep(mlflow_uri, f"again-{tag}", "CANCELLED")
    SweepCache(SweepStore(mlflow_uri)).view(sweep_id)  # writes the summary
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=mlflow_uri)
    tracking.start_trial_run(sweep_id, f"again-{tag}_00002", {"lam": 2}, mlflow_uri)
    tracking.close_open_trials(sweep_id, "FINISHED", mlflow_uri)
    tracking.set_sweep_status(sweep_id, "FINISHED", tracking_uri=mlflow_uri)
    view = SweepCache(SweepStore(mlflow_uri)).view(sweep_id)
    assert view.record.status == "FINISHED"
    assert view.progress.total == 3 and view.progress.finished == 3, view.progress


def test_finished_sweeps_with_trials_are_bounded(mlflow_uri) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [_sweep(mlflow_uri, f"lru-{tag}-{n}", "FINISHED", trials=1)[0] for n in range(3)]
    cache = SweepCache(SweepStore(mlflow_uri), finished_cache_size=2)
    for sweep_id in ids:
        assert cache.with_trials(sweep_id).trials is not None
    assert cache.held()["finished_with_trials"] == 2
    first = cache.get(ids[0])
    assert first.trials is None and first.progress.finished == 1  # still listed, by its summary
    assert cache.get(ids[2]).trials is not None
    cache.with_trials(ids[0])  # read again: the least recently read goes
    assert cache.get(ids[1]).trials is None and cache.get(ids[0]).trials is not None


def _end(uri: str, sweep_id: str) -> None:
    """End a sweep left running: the session's other tests count the active sweeps."""
    tracking.close_open_trials(sweep_id, "KILLED", uri)
    tracking.set_sweep_status(sweep_id, "CANCELLED", tracking_uri=uri)


@pytest.fixture(scope="module")
def history(mlflow_uri) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """Seven sweeps of one family of names (oldest first): (id, name, status)."""
    tag = uuid.uuid4().hex[:8]
    statuses = ["FINISHED", "FAILED", "FINISHED", "CANCELLED", "FINISHED", "RUNNING", "FINISHED"]
    names = [f"hist-{tag}-{'a_b' if n % 2 else 'ab'}-{n}" for n in range(len(statuses))]
    made = []
    for name, status in zip(names, statuses, strict=True):
        made.append((_sweep(mlflow_uri, name, status, trials=1)[0], name, status))
    yield tag, made
    _end(mlflow_uri, made[5][0])


QUERIES = [
    (None, "", 50, 0),
    (None, "", 3, 0),
    (None, "", 3, 3),
    (None, "", 3, 6),
    (None, "", 2, 10),
    ("FINISHED", "", 2, 1),
    ("RUNNING", "", 5, 0),
    (None, "-a_b-", 2, 0),
    (None, "-A_B-", 5, 1),
    ("FINISHED", "-ab-", 5, 0),
    ("PENDING", "", 5, 0),
]


@pytest.mark.parametrize(("status", "name", "limit", "offset"), QUERIES)
def test_pages_from_mlflow_match_pages_from_the_index(
    mlflow_uri, history, status, name, limit, offset
) -> None:
    """While the index is filled the listing comes from MLflow's own pages, filters pushed into
    the search; both give the same sweeps in the same order, newest first, with the same
    limit/offset semantics as the whole listing would."""
    tag, made = history
    needle = f"hist-{tag}{name}"
    expected = [i for i, n, s in reversed(made)
                if (status is None or s == status) and needle.casefold() in n.casefold()]  # fmt: skip
    cache = SweepCache(SweepStore(mlflow_uri), warm_page_size=3)
    cache.refresh()
    cold, cold_total, cold_more = cache.page(status, needle, limit, offset)
    while not cache.warm_step():
        pass
    warm, warm_total, warm_more = cache.page(status, needle, limit, offset)
    page = expected[offset : offset + limit]
    assert [v.record.id for v in cold] == page == [v.record.id for v in warm]
    assert warm_total == len(expected) and cold_total in (None, len(expected))
    assert cold_more == warm_more == (offset + limit < len(expected))
    for view in [*cold, *warm]:
        progress = view.progress  # one trial of the spec's two, read or summarized
        assert progress.finished + progress.running == 1 and progress.total == 2, progress
        assert view.best is not None


def _settings(mlflow_uri: str, ray_url: str) -> Settings:
    return Settings(ray_address=ray_url, tracking_uri=mlflow_uri, refresh_interval_s=0.5,
                    storage_path="/nonexistent")  # fmt: skip


def test_the_api_lists_at_once_after_a_start(mlflow_uri, dead_url, history) -> None:
    """The first GET /sweeps after a start answers from MLflow's pages, filtered, before the
    history is read; GET /sweeps/{id}, /trials and /pareto of a finished sweep read it then."""
    tag, made = history
    with TestClient(create_app(_settings(mlflow_uri, dead_url))) as api:
        page = api.get("/sweeps", params={"name": f"hist-{tag}", "limit": 2, "offset": 1})
        assert page.status_code == 200, page.text
        body = page.json()
        assert [s["id"] for s in body["items"]] == [made[5][0], made[4][0]]
        assert body["next_offset"] == 3 and body["total"] in (None, 7)
        running = api.get("/sweeps", params={"status": "RUNNING", "name": f"hist-{tag}"}).json()
        assert [s["id"] for s in running["items"]] == [made[5][0]]
        assert running["items"][0]["progress"]["running"] == 1
        sweep_id = made[0][0]
        one = api.get(f"/sweeps/{sweep_id}").json()
        assert one["status"] == "FINISHED" and one["progress"]["finished"] == 1
        trials = api.get(f"/sweeps/{sweep_id}/trials").json()
        assert [t["status"] for t in trials] == ["FINISHED"]
        front = api.get(f"/sweeps/{sweep_id}/pareto").json()
        assert front["num_trials"] == 1 and len(front["front"]) == 1
        assert api.get(f"/sweeps/{uuid.uuid4().hex}").status_code == 404
