"""Several sweeps submitted at once share the cluster, on a real Ray head and MLflow server.

Six clients POST at the same instant (threads released by one barrier) to one service over real
HTTP. The concurrent-sweep limit must hold exactly under the race: ``LIMIT`` answers 202, the rest
429 naming the limit, and nothing recorded for them. Every accepted sweep then ends FINISHED with
all its trials accounted for, in the API and in MLflow, and the next submission is accepted.

The sweeps' names, experiment and tags are non-ASCII: they must come back from MLflow unchanged.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.app import create_app
from tests.service.conftest import TINY_SPEC, count_sweep_runs, wait_for
from tests.service.live import serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 2
CLIENTS = 6
EXPERIMENT = "l0sweep-tests-並行"
TAGS = {"заметка": "テスト ✓", "owner": "Zoë"}


def _spec(i: int) -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(name=f"conc-{i}-эксперимент-日本語", experiment=EXPERIMENT, tags=TAGS)
    return spec


def _submit_at_once(url: str, specs: list[dict]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(specs))

    def post(spec: dict) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.get("/healthz")  # connected and warm before the barrier
            barrier.wait()
            return client.post("/sweeps", json=spec)

    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(post, specs))


def _active(client: httpx.Client) -> list[str]:
    page = client.get("/sweeps", params={"limit": 500}).json()
    return [s["id"] for s in page["items"] if s["status"] in {"PENDING", "RUNNING"}]


def test_concurrent_submissions_respect_the_limit_and_all_trials_are_accounted(
    make_settings, mlflow_client: MlflowClient
) -> None:
    settings = make_settings(max_concurrent_sweeps=LIMIT)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as api:
        # The session's MLflow is shared: sweeps other tests left active would take slots.
        wait_for(lambda: _active(api), lambda active: not active, timeout_s=180)
        before = count_sweep_runs(mlflow_client)

        answers = _submit_at_once(url, [_spec(i) for i in range(CLIENTS)])
        codes = sorted(a.status_code for a in answers)
        assert codes == [202] * LIMIT + [429] * (CLIENTS - LIMIT), [a.text for a in answers]
        for refused in (a for a in answers if a.status_code == 429):
            assert f"the limit is {LIMIT}" in refused.json()["detail"], refused.text
            assert refused.headers["Retry-After"]
        accepted = [a.json() for a in answers if a.status_code == 202]
        assert len({s["id"] for s in accepted}) == LIMIT
        assert count_sweep_runs(mlflow_client) == before + LIMIT  # nothing recorded for a 429

        done = [
            wait_for(
                lambda s=s: api.get(f"/sweeps/{s['id']}").json(),
                lambda got: got["status"] not in {"PENDING", "RUNNING"},
                timeout_s=600,
            )
            for s in accepted
        ]
        for sweep in done:
            assert sweep["status"] == "FINISHED", sweep
            progress = sweep["progress"]
            assert progress["total"] == 2 and progress["pending"] == progress["running"] == 0
            assert progress["finished"] + progress["failed"] == progress["total"], progress
            _check_mlflow_record(mlflow_client, sweep)
        # Both ran at once: each started before the other ended.
        first, second = (mlflow_client.get_run(s["id"]).info for s in done)
        assert first.start_time < second.end_time and second.start_time < first.end_time

        # The slots are free again: the next submission is accepted (and cancelled at once).
        again = api.post("/sweeps", json=_spec(CLIENTS))
        assert again.status_code == 202, again.text
        next_id = again.json()["id"]
        assert api.post(f"/sweeps/{next_id}/cancel").status_code == 202
        wait_for(
            lambda: api.get(f"/sweeps/{next_id}").json()["status"],
            lambda status: status == "CANCELLED",
            timeout_s=180,
        )
        for sweep_id in [s["id"] for s in done] + [next_id]:
            assert api.delete(f"/sweeps/{sweep_id}").status_code == 204


def _check_mlflow_record(client: MlflowClient, sweep: dict) -> None:
    """The parent run holds the sweep's non-ASCII name, experiment and tags; one child run per
    trial, none left RUNNING."""
    parent = client.get_run(sweep["id"])
    assert parent.data.tags["l0sweep.name"] == sweep["name"] and "日本語" in sweep["name"]
    assert parent.data.tags["l0sweep.status"] == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == EXPERIMENT
    assert {k: parent.data.tags[f"user.{k}"] for k in TAGS} == TAGS
    children = client.search_runs(
        [sweep["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sweep['id']}'"
    )
    assert len(children) == sweep["progress"]["total"], [c.info for c in children]
    assert {c.info.status for c in children} <= {"FINISHED", "FAILED"}, [c.info for c in children]
