"""sweeps.vocabulary: the words MLflow's records are written and read in."""

from __future__ import annotations

import json

import pytest
from mlflow.utils.search_utils import SearchUtils

from sweeps import vocabulary as v
from sweeps.vocabulary import RunStatus, SweepStatus, Tag, TrialStatus


def test_statuses_are_their_words():
    """A status is the string MLflow stores: equal, hashed, formatted and dumped as its value."""
    assert SweepStatus.FINISHED == "FINISHED" and "FINISHED" in {SweepStatus.FINISHED}
    assert f"{TrialStatus.STOPPED}" == str(TrialStatus.STOPPED) == "STOPPED"
    assert json.dumps({"s": SweepStatus.CANCELLED}) == '{"s": "CANCELLED"}'
    assert SweepStatus("RUNNING") is SweepStatus.RUNNING


def test_every_status_ends_a_run_in_an_mlflow_status():
    assert set(v.TRIAL_RUN_STATUS) == set(TrialStatus)
    assert set(v.SWEEP_RUN_STATUS) == v.TERMINAL_SWEEP
    assert set(SweepStatus) == v.ACTIVE_SWEEP | v.TERMINAL_SWEEP
    assert not v.ACTIVE_SWEEP & v.TERMINAL_SWEEP
    assert set(v.TRIAL_RUN_STATUS.values()) | set(v.SWEEP_RUN_STATUS.values()) <= set(RunStatus)


def test_tag_names_are_unique_and_namespaced():
    names = {k: getattr(Tag, k) for k in vars(Tag) if k.isupper()}
    ours = {k: n for k, n in names.items() if not n.startswith("mlflow.")}
    assert all(n.startswith("l0sweep.") for k, n in ours.items() if "LEGACY" not in k
               and k != "USER_PREFIX"), ours  # fmt: skip
    # The Ray job metadata reuses the trial's sweep-id word on purpose; nothing else repeats.
    repeated = [n for n in ours.values() if list(ours.values()).count(n) > 1]
    assert set(repeated) <= {Tag.SWEEP_ID}, repeated


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({Tag.PARETO: "true"}, True),
        ({Tag.PARETO: "false", Tag.LEGACY_PARETO: "true"}, False),  # the new tag wins
        ({Tag.LEGACY_PARETO: "true"}, True),  # a store written before the rename
        ({Tag.LEGACY_PARETO: "false"}, False),
        ({}, False),
    ],
)
def test_is_pareto_reads_the_old_tag_too(tags, expected):
    assert v.is_pareto(tags) is expected


@pytest.mark.parametrize(
    "query",
    [
        v.sweeps_filter(),
        v.sweeps_filter(status=SweepStatus.FINISHED, name="bench"),
        v.sweeps_filter(status="RUNNING", name_like="ben", name_ilike="ch"),
        v.trials_filter("a" * 32),
        v.trials_filter("a" * 32, trial_id="t_00001", run_status=RunStatus.RUNNING),
        v.children_filter("b" * 32),
        v.request_filter("c" * 32),
        v.idempotency_filter("key-1"),
        v.running_filter(),
        v.ended_since_filter(1_700_000_000_000),
    ],
)
def test_filters_parse_as_mlflow_filters(query):
    """Every filter is one MLflow accepts (its own parser), with the values spelt in."""
    parsed = SearchUtils.parse_search_filter(query)
    assert parsed, query
    for clause in parsed:
        assert clause["type"] in {"tag", "attribute"}, clause
        assert "SweepStatus" not in str(clause["value"]) and "RunStatus" not in str(clause["value"])


def test_sweeps_filter_spells_its_words():
    query = v.sweeps_filter(status=SweepStatus.FINISHED, name="n")
    assert SearchUtils.parse_search_filter(query) == [
        {"type": "tag", "key": Tag.KIND, "comparator": "=", "value": v.KIND_SWEEP},
        {"type": "tag", "key": Tag.NAME, "comparator": "=", "value": "n"},
        {"type": "tag", "key": Tag.STATUS, "comparator": "=", "value": "FINISHED"},
    ]
