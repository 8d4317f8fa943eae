"""Whole sweeps through the service, on a real Ray head and MLflow server: submit, follow,
read the Pareto front, delete; cancel a running sweep; restart the API in the middle of a sweep.
"""

from __future__ import annotations

import copy
import re

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from service.cli import main as cli
from service.client import ApiError, Client
from tests.service.conftest import TINY_SPEC, ApiProcess, alive_actors, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _children(client: MlflowClient, sweep: dict) -> list:
    return client.search_runs(
        [sweep["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sweep['id']}'"
    )


def test_submit_follow_pareto_delete(make_api, mlflow_client) -> None:
    with make_api() as api:
        first = api.post("/sweeps", json=TINY_SPEC, headers={"Idempotency-Key": "lifecycle-1"})
        assert first.status_code == 202, first.text
        sweep = first.json()
        assert first.headers["Location"] == f"/sweeps/{sweep['id']}"
        assert sweep["status"] in {"PENDING", "RUNNING"} and sweep["progress"]["total"] == 2
        assert sweep["links"]["mlflow"].endswith(f"/runs/{sweep['id']}")
        assert sweep["job_id"] and sweep["links"]["ray_job"].endswith(sweep["job_id"])

        replay = api.post("/sweeps", json=TINY_SPEC, headers={"Idempotency-Key": "lifecycle-1"})
        assert replay.status_code == 202 and replay.json()["id"] == sweep["id"]
        other = copy.deepcopy(TINY_SPEC) | {"name": "another"}
        reused = api.post("/sweeps", json=other, headers={"Idempotency-Key": "lifecycle-1"})
        assert reused.status_code == 409 and "different spec" in reused.json()["detail"]
        assert api.delete(f"/sweeps/{sweep['id']}").status_code == 409  # still active

        done = wait_for(
            lambda: api.get(f"/sweeps/{sweep['id']}").json(),
            lambda s: s["status"] not in {"PENDING", "RUNNING"},
        )
        assert done["status"] == "FINISHED", done
        assert done["progress"]["finished"] == 2 and done["progress"]["pending"] == 0
        assert done["best"]["metrics"]["val_accuracy"] > 0

        trials = api.get(f"/sweeps/{sweep['id']}/trials").json()
        assert len(trials) == 2
        assert all("val_accuracy" in t["metrics"] and t["run_id"] for t in trials)
        front = api.get(f"/sweeps/{sweep['id']}/pareto").json()
        assert 1 <= len(front["front"]) <= 2 and front["num_trials"] == 2
        png = api.get(f"/sweeps/{sweep['id']}/pareto", params={"format": "png"})
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        logs = api.get(f"/sweeps/{sweep['id']}/logs", params={"tail": 50})
        assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
        assert "FINISHED" in logs.text
        listed = api.get("/sweeps", params={"status": "FINISHED", "name": "tiny"}).json()
        assert sweep["id"] in {s["id"] for s in listed["items"]}
        assert api.post(f"/sweeps/{sweep['id']}/cancel").status_code == 409

        parent = mlflow_client.get_run(sweep["id"])
        assert parent.data.tags["l0sweep.status"] == "FINISHED"
        assert parent.info.status == "FINISHED"
        children = _children(mlflow_client, sweep)
        assert len(children) == 2
        assert {c.info.status for c in children} == {"FINISHED"}
        assert all("val_accuracy" in c.data.metrics for c in children)

        assert api.delete(f"/sweeps/{sweep['id']}").status_code == 204
        assert api.get(f"/sweeps/{sweep['id']}").status_code == 404
        assert mlflow_client.get_run(sweep["id"]).info.lifecycle_stage == "deleted"


def test_cancel_running_sweep_and_concurrency_limit(make_api, mlflow_client, ray_address) -> None:
    spec = copy.deepcopy(TINY_SPEC) | {"name": "to-cancel"}
    spec["train"] = {"epochs": 200, "batch_size": 8}
    with make_api(max_concurrent_sweeps=1) as api:
        response = api.post("/sweeps", json=spec)
        assert response.status_code == 202, response.text
        sweep = response.json()
        second = api.post("/sweeps", json=TINY_SPEC)
        assert second.status_code == 429 and "limit is 1" in second.json()["detail"]
        assert second.headers["Retry-After"]

        wait_for(
            lambda: api.get(f"/sweeps/{sweep['id']}").json(),
            lambda s: s["progress"]["running"] >= 1,
            timeout_s=180,
        )
        cancel = api.post(f"/sweeps/{sweep['id']}/cancel")
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["cancel_requested"] is True
        done = wait_for(
            lambda: api.get(f"/sweeps/{sweep['id']}").json(),
            lambda s: s["status"] not in {"PENDING", "RUNNING"},
            timeout_s=120,
        )
        assert done["status"] == "CANCELLED", done
        assert done["progress"]["running"] == 0
        children = _children(mlflow_client, sweep)
        assert children and {c.info.status for c in children} == {"KILLED"}
        assert api.post(f"/sweeps/{sweep['id']}/cancel").status_code == 409
        jobs = api.app.state.control.jobs
        wait_for(lambda: jobs.state(done["job_id"]).status, lambda s: s == "STOPPED", timeout_s=60)
        # The trials' CPUs are free again: no trial actor is left alive on the cluster.
        wait_for(lambda: alive_actors(ray_address), lambda actors: not actors, timeout_s=60)


def test_api_restart_mid_sweep(ray_address, mlflow_uri, storage_path, tmp_path, capsys) -> None:
    spec = copy.deepcopy(TINY_SPEC) | {"name": "survives-restart"}
    spec["train"] = {"epochs": 3, "batch_size": 16}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    server = ApiProcess(ray_address, mlflow_uri, storage_path, tmp_path / "api.log").start()
    try:
        assert cli(["--url", server.url, "submit", str(spec_file)]) == 0
        sweep_id = re.search(r"submitted sweep (\w+)", capsys.readouterr().out).group(1)
        server.kill()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/healthz", timeout=2)
        server.start()
        with Client(server.url) as api:
            assert sweep_id in {s.id for s in api.list().items}
            done = api.wait(sweep_id, poll_s=1, timeout_s=240)
            assert done.status == "FINISHED", done
            assert done.progress.finished == 2
            assert sweep_id in {s.id for s in api.list(status="FINISHED").items}
            with pytest.raises(ApiError) as err:
                api.cancel(sweep_id)
            assert err.value.status_code == 409
        capsys.readouterr()
        assert cli(["--url", server.url, "status", sweep_id]) == 0
        assert "FINISHED" in capsys.readouterr().out
        assert cli(["--url", server.url, "list", "--status", "FINISHED"]) == 0
        assert sweep_id in capsys.readouterr().out
        assert cli(["--url", server.url, "pareto", sweep_id]) == 0
        assert "val_accuracy (max)" in capsys.readouterr().out
        assert cli(["--url", server.url, "logs", sweep_id, "--tail", "5"]) == 0
        assert capsys.readouterr().out.strip()
        assert cli(["--url", server.url, "cancel", sweep_id]) == 1
        assert "409" in capsys.readouterr().err
    finally:
        server.kill()
