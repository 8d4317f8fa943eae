"""Sweeps run outside the service (``l0sweep run`` against its MLflow): a killed one is ended by
the reconciliation once its heartbeat stops, and an operator's cancel marks a silent one ended;
a live one is left to its driver."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweeps import tracking
from sweeps.spec import SweepSpec
from tests.service.conftest import TINY_SPEC, wait_for


def _record(mlflow_uri: str, name: str, heartbeat_age_s: float | None) -> tuple[str, str]:
    """A RUNNING local sweep with one RUNNING trial, as `l0sweep run` leaves it."""
    sweep_id = tracking.create_sweep_run(
        SweepSpec.model_validate({**TINY_SPEC, "name": name}), mlflow_uri
    )
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=mlflow_uri)
    if heartbeat_age_s is not None:
        beat = f"{time.time() - heartbeat_age_s:.0f}"
        tracking.client(mlflow_uri).set_tag(sweep_id, "l0sweep.heartbeat", beat)
    trial = tracking.start_trial_run(sweep_id, f"{name}_00000", {"seed": 0}, mlflow_uri)
    return sweep_id, trial


def test_a_cancel_marks_a_silent_local_run_ended_and_refuses_a_live_one(
    make_api, mlflow_uri, mlflow_client
) -> None:
    live, _ = _record(mlflow_uri, "local-live", heartbeat_age_s=0)
    dead, trial = _record(mlflow_uri, "local-dead", heartbeat_age_s=3600)
    # not entered: no lifespan, so no reconciliation ends the silent one before the cancel does
    api = make_api(local_run_timeout_s=600)
    try:
        refused = api.post(f"/sweeps/{live}/cancel")
        assert refused.status_code == 409, refused.text
        assert "outside the service" in refused.json()["detail"]
        assert "Ctrl-C" in refused.json()["detail"]

        ended = api.post(f"/sweeps/{dead}/cancel")
        assert ended.status_code == 202, ended.text
        assert ended.json()["status"] == "CANCELLED"
        assert "no heartbeat for 36" in ended.json()["message"]
        assert mlflow_client.get_run(trial).info.status == "KILLED"
        note = mlflow_client.get_run(dead).data.tags["mlflow.note.content"]
        assert note.startswith("**CANCELLED**")
        assert api.delete(f"/sweeps/{dead}").status_code == 204
    finally:
        tracking.set_sweep_status(live, "FINISHED", tracking_uri=mlflow_uri)


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_local_run_is_ended_failed_and_frees_its_slot(
    make_api, mlflow_uri, mlflow_client, tmp_path: Path
) -> None:
    spec = {**TINY_SPEC, "name": "killed-local", "regularizer": {"kind": "l0", "lam": 0.1},
            "train": {"epochs": 200, "batch_size": 8}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "L0SWEEP_HOME": str(tmp_path / "home"),
           "L0SWEEP_HEARTBEAT_INTERVAL_S": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    l0sweep = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "spec.yaml",
        "--tracking-uri",
        mlflow_uri,
    ]
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 (closed in the finally)
    # Its own session: the local Ray it starts is cleaned up with it at the end.
    proc = subprocess.Popen(
        l0sweep, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        with make_api(
            local_run_timeout_s=4, reconcile_interval_s=1, max_concurrent_sweeps=1
        ) as api:

            def sweep() -> dict:
                listed = api.get("/sweeps", params={"name": "killed-local"}).json()["items"]
                return listed[0] if listed else {}

            running = wait_for(
                sweep,
                lambda s: s.get("status") == "RUNNING" and s["progress"]["running"] == 1,
                timeout_s=180,
                what="the local run's trial to run",
            )
            assert api.post(f"/sweeps/{running['id']}/cancel").status_code == 409  # alive
            active = control_active(api)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            ended = wait_for(
                lambda: api.get(f"/sweeps/{running['id']}").json(),
                lambda s: s["status"] != "RUNNING",
                timeout_s=60,
                what="the reconciliation to end the killed run",
            )
            assert ended["status"] == "FAILED" and "stopped: no heartbeat" in ended["message"]
            assert control_active(api) <= active - 1  # its concurrency slot is free
            trials = tracking.sweep_trials(running["id"], mlflow_uri)
            assert [t.run_status for t in trials] == ["KILLED"]
            assert api.delete(f"/sweeps/{running['id']}").status_code == 204
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray's processes, if any are left
        log.close()


def control_active(api) -> int:
    """Active sweeps, as the concurrent-sweep limit counts them."""
    return api.app.state.control.cache.active_count()
