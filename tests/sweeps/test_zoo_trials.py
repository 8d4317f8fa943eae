"""Structured L0 and channel-norm pruning train and export every zoo family through the trial's
own training function (:func:`sweeps.training.train`: build from the registry, wrap, train,
export, test), on digits with tiny widths; and a real sweep (Ray, MLflow) with channel-norm
pruning logs the same parameters and FLOPs as the L0 trials."""

from __future__ import annotations

import pytest

from sweeps import tracking
from sweeps.driver import run_sweep
from sweeps.spec import EPOCH_METRICS, FINAL_METRICS, SweepSpec, TrialConfig
from sweeps.training import train
from tests.sweeps.conftest import tiny_spec

TINY = {
    "resnet": {"depth": 8, "width": 0.5},
    "googlenet": {"width": 0.125, "blocks": 2},
    "mobilenetv2": {"width": 0.25, "stages": 2},
    "vit": {"patch": 4, "depth": 1, "heads": 4, "dim": 16, "mlp_ratio": 2.0},
}
# Gates driven to half closed within one epoch (about 22 steps on digits).
L0_TO_HALF = {"kind": "l0", "lam": 0.0, "target_sparsity": 0.5, "dual_lr": 2.0,
              "droprate_init": 0.3}  # fmt: skip


def _cfg(model: str, regularizer: dict, epochs: int = 1) -> dict:
    spec = tiny_spec(model={"name": model, "params": TINY[model]}, regularizer=regularizer,
                     train={"epochs": epochs, "lr": 3e-3, "gate_lr": 0.3})  # fmt: skip
    d = SweepSpec.model_validate(spec).model_dump(mode="json")
    return TrialConfig.of({**{k: d[k] for k in ("model", "dataset", "regularizer", "train")},
                            "seed": 0})  # fmt: skip


@pytest.mark.parametrize(
    ("model", "granularity"),
    [("resnet", "output"), ("googlenet", "output"), ("mobilenetv2", "output"),
     ("vit", "output"), ("vit", "head"), ("vit", ["head", "output"])],
)  # fmt: skip
def test_structured_l0_trains_and_shrinks_every_zoo_family(model, granularity):
    result = train(_cfg(model, {**L0_TO_HALF, "granularity": granularity}))
    m = result.metrics
    assert result.shrunk is not None
    assert m["sparsity"] > 0.1, m
    assert m["shrunk_params"] < m["total_params"], m
    assert m["expected_flops"] > 0 and 0 <= m["test_accuracy"] <= 1


def test_channel_norm_trains_and_shrinks_an_inception_network():
    # resnet: the sweep below; mobilenetv2 and vit: tests/l0core/test_channel_norm.py
    result = train(_cfg("googlenet", {"kind": "channel-norm", "target_sparsity": 0.5,
                                "prune_begin": 0.0, "prune_end": 0.0}))  # fmt: skip
    m = result.metrics
    assert m["sparsity"] == pytest.approx(0.5, abs=0.08)
    assert m["shrunk_params"] < 0.8 * m["total_params"]
    assert m["expected_flops"] > 0 and m["nonzero_params"] < m["total_params"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_channel_norm_sweep_finishes_and_logs_params_and_flops(
    ray_local, tracking_uri, storage_path
):
    spec = SweepSpec.model_validate(
        tiny_spec(
            name="channel-norm",
            model={"name": "resnet", "params": TINY["resnet"]},
            regularizer={"kind": "channel-norm", "target_sparsity": 0.5,
                         "prune_end": {"grid": [0.0, 0.5]}},
            train={"epochs": 2},
        )
    )  # fmt: skip
    result = run_sweep(spec, tracking_uri, storage_path)
    assert result.status == "FINISHED"
    trials = tracking.sweep_trials(result.sweep_id, tracking_uri)
    assert sorted(t.name for t in trials) == [
        "channel-norm target=0.5 prune_end=0 seed=0",
        "channel-norm target=0.5 prune_end=0.5 seed=0",
    ]
    for t in trials:  # every figure an L0 trial reports, parameters and FLOPs of the export
        assert t.status == "FINISHED"
        m = t.metrics
        assert set(EPOCH_METRICS) | set(FINAL_METRICS) <= set(m), t.name
        assert m["shrunk_params"] < 0.8 * m["total_params"]
        assert m["sparsity"] == pytest.approx(0.5, abs=0.08) and m["expected_flops"] > 0
