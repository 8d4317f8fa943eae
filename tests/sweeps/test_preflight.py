"""The driver's check before any trial (no Ray): the zoo exports at its granularities; a model
that cannot be built for the data, or a dataset that cannot load, is named with the reason.
The sweep-level path (status FAILED with the node and op, no trial) runs in test_plugin.py."""

from __future__ import annotations

import pytest

from sweeps.preflight import export_granularities, preflight
from sweeps.spec import SweepSpec
from tests.sweeps.conftest import tiny_spec

VIT = {"name": "vit", "params": {"patch": 4, "dim": 16, "heads": 2, "depth": 1}}


def _spec(**overrides) -> SweepSpec:
    return SweepSpec.model_validate(tiny_spec(**overrides))


@pytest.mark.parametrize(
    ("model", "regularizer"),
    [
        ({"name": "resnet", "params": {"depth": 8, "width": 0.5}}, {"granularity": "output"}),
        (VIT, {"granularity": {"grid": ["output", "head"]}}),
        (VIT, {"kind": {"grid": ["l0", "channel-norm"]}, "target_sparsity": 0.5,
               "granularity": {"grid": ["head", ["head", "output"]]}}),
        ({"name": "mobilenetv2", "params": {"width": 0.25, "stages": 2}},
         {"kind": "channel-norm", "target_sparsity": 0.5}),
    ],
)  # fmt: skip
def test_zoo_models_pass_the_export_check(model, regularizer):
    assert preflight(_spec(model=model, regularizer=regularizer)) is None


def test_the_granularities_checked_are_those_trials_export_at():
    reg = {"kind": {"grid": ["l0", "channel-norm", "magnitude"]},
           "granularity": {"grid": ["weight", "head"]}, "target_sparsity": 0.5}  # fmt: skip
    assert export_granularities(_spec(model=VIT, regularizer=reg)) == ["head", "output"]
    assert export_granularities(_spec(regularizer={"kind": "l1"})) == []
    both = {"kind": {"grid": ["l0", "channel-norm"]}, "target_sparsity": 0.5,
            "granularity": {"grid": ["weight", ["output", "head"]]}}  # fmt: skip
    assert export_granularities(_spec(model=VIT, regularizer=both)) == [
        ["head", "output"],
        "output",
    ]
    assert export_granularities(_spec(model=VIT, regularizer=both), "l0") == [["head", "output"]]


def test_models_that_cannot_take_the_data_and_missing_datasets_fail_with_the_reason(tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    bad_patch = {"name": "vit", "params": {"patch": 3, "dim": 16, "heads": 2}}
    problem = preflight(_spec(model=bad_patch, regularizer={"granularity": "output"}))
    assert problem == (
        "model 'vit' cannot be built for inputs (1, 8, 8): ValueError: vit patch 3 does not "
        "divide the image size 8x8; patches that do: [1, 2, 4, 8]"
    )
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(tmp_path))
    problem = preflight(_spec(dataset={"name": "npz", "params": {"path": "missing.npz"}}))
    assert problem.startswith("dataset 'npz' cannot be loaded: FileNotFoundError")
    assert "missing.npz" in problem
