"""The API against a real Ray head and MLflow server, without running any sweep: catalog, health,
bad input (each answer a 4xx with a message, never a 5xx), auth, and 503 with nothing created.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket

import httpx
import pytest

from service.app import create_app
from sweeps.config import get_settings
from tests.service.conftest import TINY_SPEC, count_sweep_runs
from tests.service.live import serve

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
    (
        "open range",
        _spec(regularizer__target_sparsity={"uniform": [0.5, None]}),
        "regularizer.target_sparsity.uniform",
    ),
    ("unknown objective", _spec(objectives=[{"metric": "val_acc"}]), "objectives.0"),
    ("head gates without attention", _spec(regularizer__granularity="head"), "body"),
    ("too many trials", _spec(search={"num_samples": 10**9}), "body"),
    ("empty name", _spec(name=""), "name"),
    ("unicode name", _spec(name="экспер\u0000имент"), "name"),
    # \w takes letters of any script, but a name starts with an ASCII letter or digit.
    ("name starts non-ASCII", _spec(name="эксперимент"), "name"),
    ("emoji name", _spec(name="run-\U0001f680"), "name"),
    ("lone surrogate tag", _spec(tags={"k": "\udfff"}), "body"),
    ("lone surrogate key", _spec(tags={"\ud800": "v"}), "body"),
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


def _raw(body: str) -> dict:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


_NESTED = '{"a":' * 100_000 + "1" + "}" * 100_000  # 600 kB, under the body limit


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (_NESTED, "nested too deeply"),
        (json.dumps(TINY_SPEC)[:-1] + f', "tags": {_NESTED}}}', "nested too deeply"),
        ('{"name": "caf\xe9"}', "not UTF-8"),
        (json.dumps(_spec(train__epochs=1))[:-1] + ', "x": ' + "9" * 5000 + "}", "4300 digits"),
    ],
    ids=["syntax", "100k lists", "100k objects", "100k inside a spec", "latin-1", "5000 digits"],
)
def test_unparsable_bodies_get_422_saying_why(api, body, reason) -> None:
    """Python's JSON parser raises RecursionError, UnicodeDecodeError or ValueError on these;
    each is the client's fault, answered like any other JSON that does not decode."""
    raw = body.encode("latin-1") if "caf" in body else body.encode()
    response = api.post("/sweeps", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == "body" and detail["type"] == "json_invalid", detail
    assert "not valid JSON" in detail["msg"] and reason in detail["msg"], detail


def test_huge_search_spaces_get_422_naming_the_count_and_the_limit(api, mlflow_client) -> None:
    limit = get_settings().max_trials
    grids = _spec(
        regularizer__lam={"grid": [i / 100 for i in range(1, 41)]},
        regularizer__droprate_init={"grid": [i / 100 for i in range(1, 41)]},
        train__lr={"grid": [i / 1000 for i in range(1, 41)]},
        train__batch_size={"grid": list(range(1, 41))},
        search={"num_samples": 10**6, "seeds": list(range(100))},
    )
    before = count_sweep_runs(mlflow_client)
    for spec, count in [
        (_spec(search={"num_samples": 10**9}), 2 * 10**9),
        (_spec(search={"seeds": list(range(limit))}), 2 * limit),
        (grids, 40**4 * 10**6 * 100),
    ]:
        response = api.post("/sweeps", json=spec)
        assert response.status_code == 422, response.text
        msg = " ".join(d["msg"] for d in response.json()["detail"])
        # past 64 x the limit the expansion itself is refused: "expands to N configurations"
        assert f"expands to {count} " in msg and f"limit {limit}" in msg, msg
    assert count_sweep_runs(mlflow_client) == before


_NON_FINITE = [
    ("train.lr", "NaN"),
    ("train.lr", "Infinity"),
    ("train.lr", "1e400"),
    ("train.lr", "-0.001"),
    ("train.epochs", "Infinity"),
    ("train.epochs", "-3"),
    ("train.momentum", "-Infinity"),
    ("regularizer.lam", "Infinity"),
    ("regularizer.lam", "-0.5"),
    ("regularizer.lam", '{"loguniform": [1e-4, Infinity]}'),
    ("regularizer.lam", '{"grid": [0.1, NaN]}'),
    ("regularizer.temperature", "1e400"),
    ("regularizer.target_sparsity", "NaN"),
    ("resources.cpus_per_trial", "Infinity"),
    ("resources.cpus_per_trial", "-1"),
    ("resources.time_budget_s", "NaN"),
    ("scheduler.reduction_factor", "Infinity"),
    ("search.num_samples", "1e400"),
    ("search.num_samples", "-1"),
    ("dataset.val_fraction", "NaN"),
]


@pytest.mark.parametrize(("field", "token"), _NON_FINITE, ids=[f"{f}={t}" for f, t in _NON_FINITE])
def test_non_finite_and_negative_numbers_get_422_naming_the_field(api, field, token) -> None:
    """JSON's NaN and Infinity tokens and 1e400 parse to floats no spec field accepts."""
    section, key = field.split(".")
    spec = _spec(**{f"{section}__{key}": "__TOKEN__"})
    response = api.post("/sweeps", **_raw(json.dumps(spec).replace('"__TOKEN__"', token)))
    assert response.status_code == 422, response.text
    fields = [d["field"] for d in response.json()["detail"]]
    # A dataset's fields sit under its registry name ("dataset.digits.val_fraction").
    assert any(f.startswith(section) and key in f for f in fields), fields
    assert all(d["msg"] for d in response.json()["detail"])


@pytest.mark.parametrize(
    "chunks",
    [[b"x" * 600_000, b"y" * 600_000], [b"{" + b" " * 65_536] * 20],
    ids=["two big chunks", "many small chunks"],
)
def test_oversized_bodies_over_real_http_get_413(make_settings, chunks) -> None:
    """Through uvicorn: a declared Content-Length over the limit is refused before the body is
    read; a chunked body (no Content-Length) is refused once it passes the limit."""
    with serve(create_app(make_settings())) as url:
        host, port = url.removeprefix("http://").split(":")
        # Not one byte of the body is sent: the answer must not wait for it.
        declared = _exchange(host, int(port), b"Content-Length: 5000000\r\n", [])
        assert declared.startswith(b"HTTP/1.1 413"), declared
        assert b"over the limit of 1000000 bytes" in declared
        chunked = _exchange(host, int(port), b"Transfer-Encoding: chunked\r\n", chunks)
        assert chunked.startswith(b"HTTP/1.1 413"), chunked[:300]
        assert json.loads(chunked.split(b"\r\n\r\n", 1)[1])["detail"]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # still serving


def _exchange(host: str, port: int, header: bytes, chunks: list[bytes]) -> bytes:
    """POST /sweeps by hand; returns the raw answer (the server may close mid-body)."""
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(
            b"POST /sweeps HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + header
            + b"\r\n"
        )
        with contextlib.suppress(OSError):  # the 413 may come, and the socket close, mid-body
            for chunk in chunks:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if chunks:
                conn.sendall(b"0\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer or not _complete(answer):
                data = conn.recv(65_536)
                if not data:
                    break
                answer += data
        return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


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
        # every operation of the schema, not only the ones listed above
        operations = [
            (method, path.replace("{sweep_id}", VALID_ID))
            for path, item in api.app.openapi()["paths"].items()
            for method in item
            if path != "/healthz"
        ]
        assert len(operations) >= 10, operations
        for method, path in operations:
            answer = api.request(method, path, json=TINY_SPEC if method == "post" else None)
            assert answer.status_code == 401, (method, path, answer.status_code)
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
