"""The API against a real Ray head and MLflow server, without running any sweep: catalog, health,
bad input (each answer a 4xx with a message, never a 5xx), auth, and 503 with nothing created.
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.service.conftest import TINY_SPEC, count_sweep_runs

pytestmark = pytest.mark.integration

VALID_ID = "0" * 32


def _spec(**changes) -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def test_health_and_catalog(api) -> None:
    health = api.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["ray"]["ok"] and health.json()["mlflow"]["ok"]
    assert "mlp" in {m["name"] for m in api.get("/models").json()}
    assert "digits" in {d["name"] for d in api.get("/datasets").json()}
    assert "properties" in api.get("/schema/sweep").json()
    assert api.get("/openapi.json").status_code == 200
    page = api.get("/sweeps").json()
    assert set(page) == {"items", "total", "limit", "offset", "next_offset"}


BAD_SPECS = [
    ("unknown field", _spec(modle={}), "modle"),
    ("unknown model", _spec(model={"name": "resnet1000"}), "model"),
    ("unknown dataset", _spec(dataset={"name": "imagenet"}), "dataset"),
    ("wrong type", _spec(train__epochs="many"), "train.epochs"),
    ("negative", _spec(train__epochs=-1), "train.epochs"),
    ("nan lr", _spec(train__lr=float("nan")), "train.lr"),
    ("unknown objective", _spec(objectives=[{"metric": "val_acc"}]), "objectives.0"),
    ("too many trials", _spec(search={"num_samples": 10**9}), "body"),
    ("empty name", _spec(name=""), "name"),
    ("unicode name", _spec(name="экспер\u0000имент"), "name"),
    ("missing model", {k: v for k, v in TINY_SPEC.items() if k != "model"}, "model"),
    ("not an object", [1, 2, 3], "body"),
    # Valid for the spec, refused by MLflow after the run exists: nothing may be left behind.
    ("tag key MLflow refuses", _spec(tags={"bad key/..": "x"}), "body"),
    ("tag key too long", _spec(tags={"k" * 300: "x"}), "body"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_SPECS, ids=[c for c, _, _ in BAD_SPECS])
def test_bad_specs_get_422_with_field_paths(api, mlflow_client, case, body, field) -> None:
    before = count_sweep_runs(mlflow_client)
    # json.dumps writes NaN as the bare token some clients send; the service must cope.
    raw = json.dumps(body).encode()
    response = api.post("/sweeps", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert all(d["msg"] for d in detail)
    assert any(d["field"].startswith(field) for d in detail), detail
    assert count_sweep_runs(mlflow_client) == before


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("post", "/sweeps", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("post", "/sweeps", {"content": b"[" * 100_000 + b"]" * 100_000,
                             "headers": {"content-type": "application/json"}}, 400),
        ("post", "/sweeps", {"content": b"x" * 2_000_000}, 413),
        ("post", "/sweeps", {"content": iter([b"x" * 600_000, b"y" * 600_000])}, 413),
        ("post", "/sweeps", {"json": TINY_SPEC, "headers": {"Idempotency-Key": "bad key!"}}, 422),
        ("get", "/sweeps/nope", {}, 404),
        ("get", f"/sweeps/{VALID_ID}", {}, 404),
        ("get", f"/sweeps/{VALID_ID}/trials", {}, 404),
        ("get", f"/sweeps/{VALID_ID}/pareto", {}, 404),
        ("get", f"/sweeps/{VALID_ID}/pareto?format=svg", {}, 422),
        ("get", f"/sweeps/{VALID_ID}/logs", {}, 404),
        ("get", f"/sweeps/{VALID_ID}/logs?tail=0", {}, 422),
        ("post", f"/sweeps/{VALID_ID}/cancel", {}, 404),
        ("post", "/sweeps/../../etc/passwd/cancel", {}, 404),
        ("delete", f"/sweeps/{VALID_ID}", {}, 404),
        ("get", "/sweeps?limit=0", {}, 422),
        ("get", "/sweeps?status=DONE", {}, 422),
        ("get", "/sweeps?offset=-3", {}, 422),
        ("get", "/nowhere", {}, 404),
        ("put", "/sweeps", {}, 405),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_with_a_message(api, method, path, kwargs, status) -> None:
    response = api.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_deleted_experiment_is_a_conflict(api, mlflow_client) -> None:
    experiment_id = mlflow_client.create_experiment("deleted-for-test")
    mlflow_client.delete_experiment(experiment_id)
    before = count_sweep_runs(mlflow_client)
    response = api.post("/sweeps", json=_spec(experiment="deleted-for-test"))
    assert response.status_code == 409, response.text
    assert "deleted" in response.json()["detail"]
    assert count_sweep_runs(mlflow_client) == before


def test_auth_on(make_api) -> None:
    with make_api(token="s3cret") as api:
        assert api.get("/healthz").status_code == 200
        for path in ("/sweeps", f"/sweeps/{VALID_ID}", "/models", "/datasets", "/schema/sweep"):
            assert api.get(path).status_code == 401
            assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert api.get(path, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        response = api.post("/sweeps", json=TINY_SPEC)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert api.get("/sweeps", headers=ok).status_code == 200
        assert api.get(f"/sweeps/{VALID_ID}", headers=ok).status_code == 404


def test_auth_off_on_loopback(api) -> None:
    assert api.get("/sweeps").status_code == 200
    assert api.get("/sweeps", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_ray_down_gives_503_and_creates_nothing(make_api, dead_url, mlflow_client) -> None:
    before = count_sweep_runs(mlflow_client)
    with make_api(ray_address=dead_url) as api:
        response = api.post("/sweeps", json=TINY_SPEC)
        assert response.status_code == 503, response.text
        assert "Ray is unavailable" in response.json()["detail"]
        health = api.get("/healthz")
        assert health.status_code == 503
        assert not health.json()["ray"]["ok"] and health.json()["mlflow"]["ok"]
        assert api.get("/sweeps").status_code == 200  # reads need MLflow only
    assert count_sweep_runs(mlflow_client) == before


def test_mlflow_down_gives_503(make_api, dead_url) -> None:
    with make_api(tracking_uri=dead_url) as api:
        for method, path in (
            ("GET", "/sweeps"),
            ("GET", f"/sweeps/{VALID_ID}"),
            ("POST", "/sweeps"),
        ):
            kwargs = {"json": TINY_SPEC} if method == "POST" else {}
            response = api.request(method, path, **kwargs)
            assert response.status_code == 503, (path, response.text)
            assert "MLflow is unavailable" in response.json()["detail"]
        health = api.get("/healthz").json()
        assert health["ray"]["ok"] and not health["mlflow"]["ok"]


def test_sweeps_run_outside_the_service_are_left_alone(api, mlflow_uri) -> None:
    """A sweep `l0sweep run` records in the same MLflow is listed, never driven by the service."""
    from service.jobs import JobRunner
    from sweeps import tracking
    from sweeps.spec import SweepSpec

    sweep_id = tracking.create_sweep_run(
        SweepSpec.model_validate(_spec(name="local-run")), mlflow_uri
    )
    tracking.set_sweep_status(sweep_id, "RUNNING", tracking_uri=mlflow_uri)
    control = api.app.state.control
    control.cache.refresh()
    control.reconcile()
    assert control.jobs.state(JobRunner.submission_id(sweep_id, 0)) is None
    assert api.get(f"/sweeps/{sweep_id}").json()["status"] == "RUNNING"
    response = api.post(f"/sweeps/{sweep_id}/cancel")
    assert response.status_code == 409 and "outside the service" in response.json()["detail"]
    tracking.set_sweep_status(sweep_id, "FINISHED", tracking_uri=mlflow_uri)
