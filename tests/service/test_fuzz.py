"""Generated bad input on POST /sweeps: every answer is a 4xx with a message, never a 5xx.

Ray is pointed at a dead address so that a generated body that happens to be a valid spec stops
at the Ray probe (503, nothing created) instead of launching a sweep.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import TINY_SPEC

pytestmark = pytest.mark.integration

# Lone surrogates included: JSON's \uD800 escapes carry them, and no UTF-8 encoder takes them.
_text = st.text(max_size=20) | st.builds(
    str.__add__, st.text(max_size=8), st.characters(categories=["Cs"])
)
_leaf = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


@st.composite
def _mutated_spec(draw):
    spec = copy.deepcopy(TINY_SPEC)
    path = draw(st.sampled_from([p for p in _paths(spec) if p]))
    node = spec
    for key in path[:-1]:
        node = node[key]
    if draw(st.booleans()):
        node[path[-1]] = draw(_json)
    else:
        node[draw(_text.filter(bool))] = draw(_json)
    return spec


@pytest.fixture(scope="module")
def fuzz_api(ray_address, mlflow_uri, storage_path, dead_url):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(ray_address=dead_url, tracking_uri=mlflow_uri, storage_path=storage_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _check(api, body) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity as bare tokens, as some clients send
    response = api.post("/sweeps", content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500 or (
        response.status_code == 503 and "Ray is unavailable" in response.json()["detail"]
    ), response.text
    assert response.json()["detail"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_json)
def test_random_json_bodies(fuzz_api, body) -> None:
    _check(fuzz_api, body)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_mutated_spec())
def test_mutated_specs(fuzz_api, body) -> None:
    _check(fuzz_api, body)
