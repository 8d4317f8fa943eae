"""Schemathesis drives every operation of the service's own OpenAPI schema over real HTTP.

The app runs under uvicorn on a free port, joined to the session's real Ray head and MLflow
server. Every generated request (valid and invalid, from the examples, fuzzing and coverage
phases) must get an answer below 500, and every 4xx must be JSON with a ``detail`` message. Both
back ends are up, so a 503 is a bug too.

Keeping it cheap: ``max_concurrent_sweeps`` is 2 and an "outside" RUNNING sweep (recorded as
`l0sweep run` records one: no driver, but it counts) holds one slot. The first generated spec the
service accepts is launched for real (202, a Ray job); a second outside sweep then takes its slot
and it is cancelled, so every later valid spec is refused with 429 after its full validation. A
third of the requests on ``/sweeps/{sweep_id}...`` aim at these real sweeps (and at an outside
FINISHED one) instead of generated ids.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.settings import Settings
from sweeps import tracking
from sweeps.spec import SweepSpec
from tests.service.conftest import TINY_SPEC
from tests.service.live import serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fuzzing examples per operation and generation mode; the examples and coverage phases add more.
MAX_EXAMPLES = 100
MIN_REQUESTS = 2000
# Not the global `random`: Hypothesis reseeds that one identically for every example.
_aim = random.Random(7)


@dataclass
class FuzzedService:
    url: str
    settings: Settings
    session: requests.Session
    known_ids: list[str] = field(default_factory=list)
    launched: list[str] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def fuzzed(ray_address, mlflow_uri, storage_path) -> Iterator[FuzzedService]:
    settings_ = Settings(
        ray_address=ray_address,
        tracking_uri=mlflow_uri,
        storage_path=storage_path,
        max_concurrent_sweeps=2,
        refresh_interval_s=0.5,
        reconcile_interval_s=2.0,
        stop_grace_s=30,
    )
    with serve(create_app(settings_)) as url:
        state = FuzzedService(url, settings_, requests.Session())
        state.known_ids += [_outside_sweep(mlflow_uri, s) for s in ("RUNNING", "FINISHED")]
        with state.session:
            yield state
            _clean_up(state)


def _openapi() -> dict:
    """The schema the service serves; building the app contacts no back end."""
    nowhere = "http://127.0.0.1:9"
    return create_app(Settings(ray_address=nowhere, tracking_uri=nowhere)).openapi()


schema = schemathesis.openapi.from_dict(_openapi())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_answer_is_below_500_and_rejections_say_why(case, fuzzed: FuzzedService) -> None:
    if "sweep_id" in (case.path_parameters or {}) and fuzzed.known_ids and _aim.random() < 1 / 3:
        case.path_parameters["sweep_id"] = _aim.choice(fuzzed.known_ids)
    response = case.call(base_url=fuzzed.url, session=fuzzed.session, timeout=60)
    fuzzed.sent[case.operation.label] += 1
    fuzzed.statuses[response.status_code] += 1
    fuzzed.answers[(case.operation.label, response.status_code)] += 1
    fuzzed.samples.setdefault((case.operation.label, response.status_code), response.text[:160])
    request = f"{case.method} {response.request.url}\n{case.body!r}"[:2000]
    assert response.status_code < 500, f"{request}\n-> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
            f"{request}\n-> {response.status_code} {response.headers}"
        )
        detail = response.json().get("detail")
        assert detail, f"{request}\n-> {response.status_code} {response.text}"
        if isinstance(detail, list):
            assert all(d.get("msg") for d in detail), response.text
    accepted = response.status_code == 202 and case.operation.label == "POST /sweeps"
    if accepted and response.json()["id"] not in fuzzed.known_ids:  # not a replay of its key
        _launched(fuzzed, response.json()["id"])


@pytest.mark.tally
def test_thousands_of_requests_reached_every_operation(request: pytest.FixtureRequest) -> None:
    """The tally of the generated tests above: it checks them, so it needs them run first
    (alone, or ordered before them, it has nothing to check and says so)."""
    generated = test_every_answer_is_below_500_and_rejections_say_why.__name__
    if not any(item.originalname == generated for item in request.session.items):
        pytest.skip(f"checks the tally of {generated}, which is not part of this run")
    fuzzed: FuzzedService = request.getfixturevalue("fuzzed")
    labels = {op.ok().label for op in schema.get_all_operations()}
    total = sum(fuzzed.sent.values())
    if not total:
        pytest.skip(f"checks the tally of {generated}, which has not run yet in this order")
    print(f"\nschemathesis: {total} requests, answers {dict(sorted(fuzzed.statuses.items()))}")
    for (label, status), count in sorted(fuzzed.answers.items()):
        print(f"  {label:<32} {status} x {count:<5} {fuzzed.samples[label, status][:100]}")
    assert set(fuzzed.sent) == labels, f"not fuzzed: {labels - set(fuzzed.sent)}"
    assert total >= MIN_REQUESTS, fuzzed.sent
    assert not any(status >= 500 for status in fuzzed.statuses)
    assert fuzzed.answers[("POST /sweeps", 429)] > 0, "no valid spec reached the limit"
    assert len(fuzzed.launched) == 1, fuzzed.launched


def _launched(fuzzed: FuzzedService, sweep_id: str) -> None:
    """A generated spec was launched: take its slot with a sweep that costs nothing, cancel it."""
    fuzzed.launched.append(sweep_id)
    fuzzed.known_ids.append(sweep_id)
    occupier = _outside_sweep(fuzzed.settings.tracking_uri, "RUNNING")
    fuzzed.known_ids.append(occupier)
    # Reading an uncached sweep caches it: the slot is taken before the launched one frees it.
    seen = fuzzed.session.get(f"{fuzzed.url}/sweeps/{occupier}", timeout=60)
    assert seen.json()["status"] == "RUNNING", seen.text
    cancel = fuzzed.session.post(f"{fuzzed.url}/sweeps/{sweep_id}/cancel", timeout=60)
    assert cancel.status_code == 202, cancel.text


def _outside_sweep(tracking_uri: str, status: str) -> str:
    """A sweep recorded as `l0sweep run` records one: no driver, yet it counts against the limit."""
    spec = SweepSpec.model_validate(TINY_SPEC | {"name": f"fuzz-outside-{status.lower()}"})
    sweep_id = tracking.create_sweep_run(spec, tracking_uri)
    tracking.set_sweep_status(sweep_id, status, tracking_uri=tracking_uri)
    return sweep_id


def _clean_up(fuzzed: FuzzedService) -> None:
    """The launched sweeps end CANCELLED with no run left RUNNING; every sweep made here goes."""
    from mlflow.tracking import MlflowClient

    uri = fuzzed.settings.tracking_uri
    client = MlflowClient(uri)
    for sweep_id in fuzzed.known_ids:
        if sweep_id not in fuzzed.launched and tracking.sweep_status(sweep_id, uri) == "RUNNING":
            tracking.set_sweep_status(sweep_id, "FINISHED", tracking_uri=uri)
    deadline = time.monotonic() + 180
    for sweep_id in fuzzed.known_ids:
        while True:
            got = fuzzed.session.get(f"{fuzzed.url}/sweeps/{sweep_id}", timeout=60)
            if got.status_code == 404 or got.json()["status"] not in {"PENDING", "RUNNING"}:
                break
            assert time.monotonic() < deadline, got.text
            time.sleep(1)
        if got.status_code == 404:
            continue  # a generated DELETE got there first
        runs = client.search_runs(
            [got.json()["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sweep_id}'"
        )
        assert all(r.info.status != "RUNNING" for r in runs), [r.info for r in runs]
        deleted = fuzzed.session.delete(f"{fuzzed.url}/sweeps/{sweep_id}", timeout=60)
        assert deleted.status_code in {204, 404}, deleted.text
