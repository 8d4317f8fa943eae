"""Reconciliation at start-up: the service keeps no state, MLflow and Ray say what to do.

A sweep recorded but never submitted (the service died in between) gets its driver; a sweep
recorded as RUNNING whose Ray job the cluster does not know (the cluster was restarted) is
resubmitted under the next attempt's submission id and finishes.
"""

from __future__ import annotations

import copy
import time

import pytest

from service.jobs import JobRunner
from service.record import SweepStore
from sweeps.spec import SweepSpec
from sweeps.vocabulary import Tag
from tests.service.conftest import TINY_SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_status(store: SweepStore, sweep_id: str, done, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while True:
        record = store.get(sweep_id)
        if done(record):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(1)


def test_reconcile_submits_and_resubmits(make_api, mlflow_uri) -> None:
    store = SweepStore(mlflow_uri)
    orphan = store.create(SweepSpec.model_validate(TINY_SPEC | {"name": "never-submitted"}), {})
    lost_spec = copy.deepcopy(TINY_SPEC) | {"name": "job-lost"}
    lost = store.create(SweepSpec.model_validate(lost_spec), {})
    store.set_status(lost, "RUNNING")
    store.set_tags(lost, {Tag.JOB_ID: JobRunner.submission_id(lost, 0)})  # unknown to Ray

    with make_api() as api:
        jobs = api.app.state.control.jobs
        # Start-up reconciliation submits the orphan under attempt 0 ...
        deadline = time.monotonic() + 30
        while jobs.state(JobRunner.submission_id(orphan, 0)) is None:
            assert time.monotonic() < deadline, "orphan sweep was not submitted"
            time.sleep(0.5)
        assert api.post(f"/sweeps/{orphan}/cancel").status_code == 202
        # ... and resubmits the lost one under attempt 1, which runs it to the end.
        record = _wait_status(store, lost, lambda r: r.job_attempt == 1, timeout_s=30)
        assert record.job_id == JobRunner.submission_id(lost, 1)
        assert _wait_status(store, orphan, lambda r: r.terminal).status == "CANCELLED"
        assert _wait_status(store, lost, lambda r: r.terminal).status == "FINISHED"
        deadline = time.monotonic() + 10  # the listing follows MLflow within a refresh
        while (listed := api.get("/sweeps", params={"name": "job-lost"}).json()["items"])[0][
            "status"
        ] != "FINISHED":
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        assert len(listed) == 1 and listed[0]["progress"]["finished"] == 2
