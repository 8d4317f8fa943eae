"""Faults on a real Ray cluster and a real MLflow server: a trial's worker, a sweep's driver, and
the whole cluster with the service killed in the middle of a sweep (issue 7, reliability).

What must hold after each: the sweep ends FINISHED, every trial has exactly one MLflow child run
(continued, never duplicated), no run is left RUNNING, a trial that had finished is not run
again, a retried trial continues from its checkpoint to ``train.epochs``, and the failure is
recorded on the trial's run.

Processes are killed by the ids these tests find for their own sweeps only (their cluster's
actors, their driver's command line, their own Ray head's process tree): other clusters on the
machine are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from service.cache import SweepCache
from service.client import Client
from service.control import SweepControl
from service.jobs import JobRunner
from service.record import SweepStore
from service.stack import free_port, start_mlflow, start_ray_head
from sweeps import raycompat, tracking
from sweeps.latency import SPEEDUP_METRICS
from sweeps.spec import SweepSpec
from sweeps.vocabulary import ACTIVE_SWEEP, Tag
from tests.service.conftest import TINY_SPEC, ApiProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 30


# --- waiting and reading MLflow -----------------------------------------------------------------


_wait = functools.partial(wait_for, every_s=0.3)


def _children(client: MlflowClient, sweep_id: str) -> list[Run]:
    exp_id = client.get_run(sweep_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{sweep_id}'")


def _by_trial(client: MlflowClient, sweep_id: str) -> dict[str, Run]:
    return {r.data.tags["l0sweep.trial_id"]: r for r in _children(client, sweep_id)}


def _epoch_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch"))


def _snapshot(client: MlflowClient, run: Run) -> dict[str, Any]:
    """What a finished trial left in MLflow: end time, status and every metric's history."""
    histories = {
        key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }  # fmt: skip
    return {"end_time": run.info.end_time, "status": run.info.status, "metrics": histories}


def _assert_clean_record(client: MlflowClient, sweep_id: str, num_trials: int) -> dict[str, Run]:
    """One child run per trial, none left RUNNING, and the parent ended."""
    runs = _children(client, sweep_id)
    trial_ids = [r.data.tags["l0sweep.trial_id"] for r in runs]
    assert len(runs) == num_trials and len(set(trial_ids)) == num_trials, trial_ids
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert client.get_run(sweep_id).info.status != "RUNNING"
    return dict(zip(trial_ids, runs, strict=True))


def _assert_ran_to_the_end(client: MlflowClient, run: Run) -> None:
    """FINISHED at the last epoch, every epoch recorded once."""
    assert run.info.status == "FINISHED", run.data.tags
    assert run.data.tags["l0sweep.trial_status"] == "FINISHED"
    assert run.data.metrics["epoch"] == EPOCHS
    assert _epoch_steps(client, run.info.run_id) == list(range(1, EPOCHS + 1))
    assert "l0sweep.failure_reason" not in run.data.tags


# --- processes ------------------------------------------------------------------------------------


def _ray_get(ray_address: str, path: str, **params: str) -> Any:
    headers = raycompat.auth_headers()
    response = httpx.get(f"{ray_address}{path}", params=params, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def _trial_worker_pids(ray_address: str, submission_id: str) -> list[int]:
    """Pids of the live trial actors (Tune's ``ImplicitFunc``) of one sweep driver's Ray job."""
    job = _ray_get(ray_address, f"/api/jobs/{submission_id}")["job_id"]
    actors = _ray_get(ray_address, "/api/v0/actors", filter_keys="state", filter_predicates="=",
                      filter_values="ALIVE")["data"]["result"]["result"]  # fmt: skip
    return [
        a["pid"]
        for a in actors
        if a["class_name"] == "ImplicitFunc" and a["job_id"] == job and a["pid"]
    ]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _driver_pids(sweep_id: str) -> list[int]:
    """The sweep's driver (``python -m sweeps.driver --sweep-id ID``), not the shell around it."""
    return [
        pid
        for pid in _pids()
        if (argv := _cmdline(pid))[1:3] == ["-m", "sweeps.driver"] and sweep_id in argv
    ]


def _mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a Ray head's temp dir)."""
    return [pid for pid in _pids() if text in " ".join(_cmdline(pid)) and not _gone(pid)]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents = {pid: _parent(pid) for pid in _pids()}
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait(lambda: [p for p in pids if not _gone(p)], lambda alive: not alive, timeout_s=30)


# --- specs ----------------------------------------------------------------------------------------


def _spec(name: str, batch_size: Any, max_failures: int, lam: Any = 0.01) -> dict[str, Any]:
    """Two digits trials of ``EPOCHS`` short epochs, one CPU each (both run at once on 2 CPUs)."""
    spec = copy.deepcopy(TINY_SPEC) | {"name": name}
    spec["regularizer"] = {"kind": "l0", "lam": lam}
    spec["train"] = {"epochs": EPOCHS, "batch_size": batch_size}
    spec["resources"] = {"cpus_per_trial": 1, "max_failures": max_failures}
    return spec


def _both_midway(client: MlflowClient, sweep_id: str) -> Callable[[], dict[str, float]]:
    def poll() -> dict[str, float]:
        return {
            t: r.data.metrics.get("epoch", 0)
            for t, r in _by_trial(client, sweep_id).items()
            if r.info.status == "RUNNING"
        }

    return poll


def _created(response: Any) -> dict[str, Any]:
    """The created sweep, or a failure that shows what the service answered instead."""
    assert response.status_code == 202, (response.status_code, response.text)
    return response.json()


def _cancel_if_active(api: Any, sweep_id: str) -> None:
    if api.get(f"/sweeps/{sweep_id}").json().get("status") in ACTIVE_SWEEP:
        api.post(f"/sweeps/{sweep_id}/cancel")


# --- 1. a trial's worker process killed -----------------------------------------------------------


def _kill_one_trial_midway(client: MlflowClient, ray_address: str, sweep_id: str):
    """SIGKILL the worker of one of the two running trials once both passed epoch 3."""
    epochs = _wait(
        _both_midway(client, sweep_id),
        lambda e: len(e) == 2 and min(e.values()) >= 3,
        what="for both trials to pass epoch 3",
    )
    assert max(epochs.values()) < EPOCHS - 3, f"trials too fast to kill mid-way: {epochs}"
    job = JobRunner.submission_id(sweep_id, 0)
    pids = _wait(lambda: _trial_worker_pids(ray_address, job), lambda p: len(p) == 2)
    _kill(pids[:1])
    return epochs


def _kill_one_trial_and_wait(
    api: Any, client: MlflowClient, ray_address: str, sweep_id: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """Kill one trial's worker mid-way and wait for the sweep to end; returns the epochs the
    trials had reached at the kill and the ended sweep (cancelled if the wait fails)."""
    try:
        at_kill = _kill_one_trial_midway(client, ray_address, sweep_id)
        done = _wait(
            lambda: api.get(f"/sweeps/{sweep_id}").json(),
            lambda s: s["status"] not in ACTIVE_SWEEP,
            what="for the sweep to end",
        )
    finally:
        _cancel_if_active(api, sweep_id)
    return at_kill, done


def test_killed_trial_is_retried_in_its_own_run(make_api, mlflow_client, ray_address) -> None:
    spec = _spec("trial-killed-retried", batch_size=4, max_failures=1, lam={"grid": [0.01, 0.1]})
    with make_api(reconcile_interval_s=1) as api:
        sweep = _created(api.post("/sweeps", json=spec))
        at_kill, done = _kill_one_trial_and_wait(api, mlflow_client, ray_address, sweep["id"])
    assert done["status"] == "FINISHED", done
    assert done["progress"]["finished"] == 2 and done["progress"]["failed"] == 0, done
    runs = _assert_clean_record(mlflow_client, sweep["id"], 2)
    retried = [t for t, r in runs.items() if "l0sweep.retries" in r.data.tags]
    assert len(retried) == 1, {t: r.data.tags for t, r in runs.items()}
    killed = runs[retried[0]]
    tags = killed.data.tags
    assert tags["l0sweep.retries"] == "1"
    assert "ActorDiedError" in tags["l0sweep.last_error"], tags["l0sweep.last_error"]
    # Continued from its checkpoint, not from scratch: the epoch it resumed after is about the
    # one it had reached when it was killed.
    resumed = int(tags["l0sweep.resumed_from_epoch"])
    assert at_kill[retried[0]] - 2 <= resumed < EPOCHS, (resumed, at_kill)
    for run in runs.values():
        _assert_ran_to_the_end(mlflow_client, run)


def test_killed_trial_without_retries_fails_alone(make_api, mlflow_client, ray_address) -> None:
    spec = _spec("trial-killed-failed", batch_size=4, max_failures=0, lam={"grid": [0.01, 0.1]})
    with make_api(reconcile_interval_s=1) as api:
        sweep = _created(api.post("/sweeps", json=spec))
        _, done = _kill_one_trial_and_wait(api, mlflow_client, ray_address, sweep["id"])
        trials = {t["id"]: t for t in api.get(f"/sweeps/{sweep['id']}/trials").json()}
    assert done["status"] == "FINISHED", done
    assert done["progress"]["finished"] == 1 and done["progress"]["failed"] == 1, done
    runs = _assert_clean_record(mlflow_client, sweep["id"], 2)
    failed = [t for t, r in runs.items() if r.info.status == "FAILED"]
    assert len(failed) == 1, {t: r.info.status for t, r in runs.items()}
    run = runs[failed[0]]
    assert run.data.tags["l0sweep.trial_status"] == "FAILED"
    assert "ActorDiedError" in run.data.tags["l0sweep.failure_reason"], run.data.tags
    assert run.data.tags["l0sweep.retries"] == "0"
    assert run.data.metrics["epoch"] < EPOCHS
    assert trials[failed[0]]["failure_reason"] == run.data.tags["l0sweep.failure_reason"]
    (other,) = set(runs) - set(failed)
    _assert_ran_to_the_end(mlflow_client, runs[other])


# --- 2. the sweep's driver killed -----------------------------------------------------------------


def _one_finished_one_midway(client: MlflowClient, sweep_id: str) -> dict[str, Any]:
    """Wait until the short trial has FINISHED while the long one is mid-way; returns the
    finished trial's snapshot."""

    def poll() -> dict[str, Run]:
        return _by_trial(client, sweep_id)

    def ready(runs: dict[str, Run]) -> bool:
        status = sorted(r.info.status for r in runs.values())
        return len(runs) == 2 and status == ["FINISHED", "RUNNING"]

    runs = _wait(poll, ready, what="for one trial to finish")
    (done,) = [r for r in runs.values() if r.info.status == "FINISHED"]
    (running,) = [r for r in runs.values() if r.info.status == "RUNNING"]
    assert running.data.metrics.get("epoch", 0) < EPOCHS - 3, "the long trial ended too soon"
    return {"trial_id": done.data.tags["l0sweep.trial_id"], **_snapshot(client, done)}


def _assert_not_rerun(client: MlflowClient, runs: dict[str, Run], before: dict[str, Any]) -> None:
    """The finished trial's record is as it was: the driver's speed pass at the end of the sweep
    only adds its ratios to the trials on a front (which this one may or may not be)."""
    run = runs[before["trial_id"]]
    after = _snapshot(client, run)
    for metric in SPEEDUP_METRICS:
        after["metrics"].pop(metric, None)
    assert after == {k: v for k, v in before.items() if k != "trial_id"}
    assert "l0sweep.resumed_from_epoch" not in run.data.tags


def test_killed_driver_is_resubmitted_and_resumes(make_api, mlflow_client) -> None:
    # batch 64 trains in a few seconds, batch 4 in several times as long
    spec = _spec("driver-killed", batch_size={"grid": [64, 4]}, max_failures=0)
    with make_api(reconcile_interval_s=1) as api:
        sweep = _created(api.post("/sweeps", json=spec))
        try:
            finished = _one_finished_one_midway(mlflow_client, sweep["id"])
            drivers = _driver_pids(sweep["id"])
            assert len(drivers) == 1, drivers
            _kill(drivers)
            done = _wait(
                lambda: api.get(f"/sweeps/{sweep['id']}").json(),
                lambda s: s["status"] not in ACTIVE_SWEEP,
                what="for the sweep to end",
            )
            trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
        finally:
            _cancel_if_active(api, sweep["id"])
        jobs = api.app.state.control.jobs
        first_job = jobs.state(JobRunner.submission_id(sweep["id"], 0))
    assert done["status"] == "FINISHED", done
    failures = [(t["id"], t["failure_reason"]) for t in trials if t["failure_reason"]]
    assert done["progress"]["finished"] == 2, (done["progress"], failures)
    assert first_job is not None and first_job.status == "FAILED", first_job
    assert done["job_id"] == JobRunner.submission_id(sweep["id"], 1)
    assert mlflow_client.get_run(sweep["id"]).data.tags["l0sweep.job_attempt"] == "1"
    runs = _assert_clean_record(mlflow_client, sweep["id"], 2)
    _assert_not_rerun(mlflow_client, runs, finished)
    for run in runs.values():
        _assert_ran_to_the_end(mlflow_client, run)
    (resumed,) = set(runs) - {finished["trial_id"]}
    assert int(runs[resumed].data.tags["l0sweep.resumed_from_epoch"]) >= 1


def test_reconcile_reads_the_trials_of_a_sweep_that_ended(mlflow_uri, ray_address) -> None:
    """A driver that records the end of its sweep and exits between a cache refresh and the
    reconciliation after it: the API shows the sweep's trials as they ended, not as they ran
    (found by the test above: a FINISHED sweep showed a finished trial as running for good)."""
    store = SweepStore(mlflow_uri)
    jobs = JobRunner(ray_address, python=sys.executable, tracking_uri=mlflow_uri, storage_path="/")
    control = SweepControl(store, jobs, SweepCache(store), max_concurrent_sweeps=100,
                           max_resubmits=1)  # fmt: skip
    sweep_id = store.create(SweepSpec.model_validate(TINY_SPEC | {"name": "ends-unseen"}), {})
    store.set_status(sweep_id, "RUNNING")
    store.set_tags(sweep_id, {Tag.JOB_ID: JobRunner.submission_id(sweep_id, 0)})  # ended: no job
    trial = tracking.start_trial_run(sweep_id, "ends_00000", {}, mlflow_uri)
    control.cache.refresh()
    assert control.cache.get(sweep_id).progress.running == 1

    tracking.end_trial_run(trial, "FINISHED", tracking_uri=mlflow_uri)
    store.set_status(sweep_id, "FINISHED", "1 trials, 0 failed")
    control.reconcile()
    control.cache.refresh()
    progress = control.cache.get(sweep_id).progress
    assert (progress.finished, progress.running) == (1, 0), progress


# --- 3. the whole cluster and the service killed --------------------------------------------------


def _as_if_saved_before_it_ended(experiment: Path, trial_id: str) -> None:
    """Make the saved Tune experiment state say ``trial_id`` is still RUNNING.

    Tune saves the experiment state every few trial checkpoints (and at least every 10 s), so a
    cluster lost just after a trial ended leaves a state in which the trial still runs, with its
    last checkpoint; the restored sweep then starts it again. This makes that case certain rather
    than a matter of timing (Ray 2.x ``experiment_state-*.json``: each trial as JSON text).
    """
    path = sorted(experiment.glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    (entry,) = [e for e in state["trial_data"] if json.loads(e[0])["trial_id"] == trial_id]
    assert json.loads(entry[0])["status"] in {"TERMINATED", "RUNNING"}, entry[0][:300]
    entry[0] = entry[0].replace('"status": "TERMINATED"', '"status": "RUNNING"')
    assert json.loads(entry[0])["status"] == "RUNNING"
    path.write_text(json.dumps(state))


@pytest.fixture
def own_stack(tmp_path: Path):
    """An MLflow server and a Ray head of this test's own, so that killing the head (and the
    service that follows its sweeps) touches nothing else; the head can be restarted on its port.
    """
    mlflow, mlflow_uri = start_mlflow(tmp_path / "mlflow", port=free_port())
    temp_dir = tempfile.mkdtemp(prefix="l0t-fault-")
    port = free_port()
    heads = []

    def start_head() -> str:
        head, url = start_ray_head(
            tmp_path / "ray", num_cpus=2, dashboard_port=port, temp_dir=temp_dir
        )
        heads.append(head)
        assert url == f"http://127.0.0.1:{port}", url
        return url

    try:
        yield {
            "mlflow_uri": mlflow_uri,
            "start_head": start_head,
            "heads": heads,
            "temp_dir": temp_dir,
        }
    finally:
        for head in heads:
            if head.running:
                _kill(_tree(head.popen.pid))
        mlflow.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_cluster_and_service_restarted_mid_sweep(own_stack, tmp_path: Path) -> None:
    ray_url = own_stack["start_head"]()
    mlflow_uri = own_stack["mlflow_uri"]
    client = MlflowClient(mlflow_uri)
    storage = str(tmp_path / "ray_results")
    server = ApiProcess(ray_url, mlflow_uri, storage, tmp_path / "api.log").start()
    try:
        spec = _spec("cluster-restarted", batch_size={"grid": [64, 4]}, max_failures=0)
        with Client(server.url) as api:
            sweep_id = api.submit(spec).id
        finished = _one_finished_one_midway(client, sweep_id)

        server.kill()
        (head,) = own_stack["heads"]
        _kill(_tree(head.popen.pid))
        assert _driver_pids(sweep_id) == [] and _mentioning(own_stack["temp_dir"]) == []
        _as_if_saved_before_it_ended(Path(storage) / sweep_id, finished["trial_id"])
        own_stack["start_head"]()
        server.start()

        with Client(server.url) as api:
            done = api.wait(sweep_id, poll_s=1, timeout_s=240)
        assert done.status == "FINISHED", done
        assert done.progress.finished == 2, done
        assert done.job_id == JobRunner.submission_id(sweep_id, 1)
    finally:
        server.kill()
    runs = _assert_clean_record(client, sweep_id, 2)
    _assert_not_rerun(client, runs, finished)
    for run in runs.values():
        _assert_ran_to_the_end(client, run)
    (resumed,) = set(runs) - {finished["trial_id"]}
    assert int(runs[resumed].data.tags["l0sweep.resumed_from_epoch"]) >= 1
