"""Fine-tuning from a dense sweep, end to end on real Ray (local) and MLflow (SQLite): a dense
sweep, then sparse sweeps that name it in ``train.init_from``; magnitude pruning as a method."""

from __future__ import annotations

import json

import pytest

from sweeps import tracking
from sweeps.driver import run_sweep
from sweeps.records import TrialRecord
from sweeps.spec import SweepSpec
from tests.sweeps.conftest import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _by_seed(trials: list[TrialRecord]) -> dict[int, TrialRecord]:
    return {int(t.config["seed"]): t for t in trials}


def test_sparse_sweeps_start_from_the_dense_trial_with_their_seed(
    ray_local, tracking_uri, storage_path
):
    dense = SweepSpec.model_validate(
        tiny_spec(name="dense-source", regularizer={"kind": "none"}, search={"seeds": [0, 1]})
    )
    first = run_sweep(dense, tracking_uri, storage_path)
    assert first.status == "FINISHED"
    dense_trials = _by_seed(first.trials)

    # Gates nearly shut off nothing (droprate 0.001) and nothing moves (lr 1e-12): the eval
    # model is the dense model it started from, so it scores exactly what the dense trial did.
    frozen = SweepSpec.model_validate(
        tiny_spec(
            name="from-dense",
            regularizer={"kind": "l0", "lam": 0.0, "droprate_init": 0.001,
                         "gate_init": "magnitude"},
            train={"epochs": 1, "lr": 1e-12, "gate_lr": 1e-12,
                   "init_from": {"sweep": "dense-source"}},
            search={"seeds": [0, 1]},
        )
    )  # fmt: skip
    second = run_sweep(frozen, tracking_uri, storage_path)
    assert second.status == "FINISHED", second.trials
    c = tracking.client(tracking_uri)
    for seed, trial in _by_seed(second.trials).items():
        source = dense_trials[seed]
        tags = c.get_run(trial.run_id).data.tags
        assert tags["l0sweep.init_from_run"] == source.run_id
        assert trial.metrics["val_accuracy"] == source.metrics["val_accuracy"] > 0.5
    assert dense_trials[0].metrics["val_accuracy"] != dense_trials[1].metrics["val_accuracy"]

    # One-shot magnitude pruning of the dense model at the first step, then a fine-tuning epoch
    # with the zeros fixed; the sweep names the dense sweep by id this time.
    magnitude = SweepSpec.model_validate(
        tiny_spec(
            name="magnitude-from-dense",
            regularizer={"kind": "magnitude", "target_sparsity": {"grid": [0.5, 0.8]},
                         "prune_end": 0.0},
            train={"epochs": 2, "finetune_epochs": 1, "init_from": {"sweep": first.sweep_id}},
        )
    )  # fmt: skip
    third = run_sweep(magnitude, tracking_uri, storage_path)
    assert third.status == "FINISHED", third.trials
    gated = 64 * 32 + 32 * 10
    for trial in third.trials:
        target = json.loads(trial.config["regularizer.target_sparsity"])
        history = c.get_metric_history(trial.run_id, "sparsity")
        assert [m.step for m in history] == [1, 2]
        assert all(m.value == pytest.approx(target, abs=1 / gated) for m in history)
        m = trial.metrics
        assert m["nonzero_params"] == gated - round(target * gated) + 32 + 10  # + biases
        assert m["test_accuracy"] > 0.5 and trial.architecture == "64-32-10"
        tags = c.get_run(trial.run_id).data.tags
        assert tags["l0sweep.init_from_run"] == dense_trials[0].run_id


def test_an_unknown_source_sweep_fails_the_trials_with_the_reason(
    ray_local, tracking_uri, storage_path
):
    spec = SweepSpec.model_validate(
        tiny_spec(name="orphan", train={"epochs": 1, "init_from": {"sweep": "never-ran"}})
    )
    result = run_sweep(spec, tracking_uri, storage_path)
    assert result.status == "FAILED"
    (trial,) = result.trials
    assert "no FINISHED sweep named 'never-ran' in experiment 'tests'" in trial.failure_reason
