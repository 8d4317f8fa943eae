"""Property-based tests of the sweep spec: generated input never gets anything but a validation
error with field paths, and valid specs survive the round trip every layer relies on (the
service stores ``model_dump(mode="json")`` in MLflow; the driver and the trial validate it again).
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sweeps.spec import SweepSpec

_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
)  # NaN and inf included
_json = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=25,
)
_SECTIONS = ("name", "model", "dataset", "regularizer", "train", "search", "objectives",
             "scheduler", "resources", "tags", "experiment")  # fmt: skip


def _valid_or_validation_error(body: object) -> SweepSpec | None:
    try:
        return SweepSpec.model_validate(body)
    except ValidationError as err:  # anything else would be a 500 in the service
        for e in err.errors():
            assert e["msg"], e
        return None


@settings(max_examples=300, deadline=None)
@given(body=_json)
def test_any_json_is_a_spec_or_a_validation_error(body) -> None:
    _valid_or_validation_error(body)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(_SECTIONS), value=_json)
def test_a_bad_section_is_reported_under_its_own_path(section, value) -> None:
    body = {"name": "p", "model": {"name": "mlp"}, "dataset": {"name": "digits"}, section: value}
    try:
        SweepSpec.model_validate(body)
    except ValidationError as err:
        # field errors sit under the section; cross-field checks (epochs vs grace period, trial
        # count vs the limit) are spec-level, with the fields named in their message
        assert all(not e["loc"] or e["loc"][0] == section for e in err.errors()), err.errors()


_lam = st.floats(min_value=0, max_value=100, allow_nan=False) | st.builds(
    lambda lo, span: {"loguniform": [lo, lo * (1 + span)]},
    st.floats(min_value=1e-6, max_value=10),
    st.floats(min_value=0.01, max_value=100),
)
_grid = st.lists(st.sampled_from(["weight", "output", "input"]), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    lam=_lam,
    granularity=st.sampled_from(["weight", "output"]) | _grid.map(lambda g: {"grid": g}),
    target=st.none() | st.floats(min_value=0.01, max_value=0.99),
    lr=st.floats(min_value=1e-5, max_value=1.0),
    epochs=st.integers(min_value=1, max_value=50),
    seeds=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),
    samples=st.integers(min_value=1, max_value=4),
)
def test_valid_specs_round_trip_and_count_their_trials(
    lam, granularity, target, lr, epochs, seeds, samples
) -> None:
    spec = SweepSpec.model_validate(
        {
            "name": "prop",
            "model": {"name": "mlp", "params": {"hidden": [8]}},
            "dataset": {"name": "digits"},
            "regularizer": {"lam": lam, "granularity": granularity, "target_sparsity": target},
            "train": {"epochs": epochs, "lr": lr},
            "search": {"seeds": seeds, "num_samples": samples},
        }
    )
    again = SweepSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec
    grid = granularity["grid"] if isinstance(granularity, dict) else [granularity]
    # Repeats of one config with one seed train the same model: each distinct trial runs once.
    # A random lam is drawn afresh for each grid point of each sample, so every one differs; a
    # fixed lam makes every sample, and every repeated grid value, the same trial.
    draws = len(grid) * samples if isinstance(lam, dict) else len(set(grid))
    distinct = draws * len(set(seeds))
    assert spec.num_trials() == distinct
    assert spec.duplicate_trials() == len(grid) * samples * len(seeds) - distinct
    assert math.isfinite(spec.train.lr) and spec.train.epochs == epochs
