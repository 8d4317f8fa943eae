"""The trial's training loop with magnitude pruning and a fine-tuning phase: schedule, frozen
zeros, and resuming from a checkpoint in either phase (real training on digits)."""

import pytest

from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import train
from tests.sweeps.conftest import tiny_spec


def _cfg(**overrides):
    d = SweepSpec.model_validate(tiny_spec(**overrides)).model_dump(mode="json")
    return TrialConfig.of(
        {**{k: d[k] for k in ("model", "dataset", "regularizer", "train")}, "seed": 0}
    )


def _run(cfg, **kw):
    seen, states = [], []

    def on_epoch(metrics, get_state):
        seen.append(metrics)
        states.append(get_state())

    return train(cfg, on_epoch=on_epoch, **kw), seen, states


def test_magnitude_follows_its_schedule_then_fine_tunes_with_the_zeros_fixed():
    cfg = _cfg(
        regularizer={"kind": "magnitude", "target_sparsity": 0.8, "prune_end": 0.5},
        train={"epochs": 6, "finetune_epochs": 2},
    )
    result, seen, _ = _run(cfg)
    sparsity = [m["sparsity"] for m in seen] + [result.metrics["sparsity"]]
    gated = 64 * 32 + 32 * 10
    assert 0 < sparsity[0] < sparsity[1] == pytest.approx(0.8, abs=1 / gated)  # ends at epoch 2
    assert sparsity[1:] == pytest.approx([0.8] * 5, abs=1 / gated)
    nonzero = [m["nonzero_params"] for m in seen[3:]] + [result.metrics["nonzero_params"]]
    assert len(set(nonzero)) == 1  # the fine-tuning epochs (5, 6) keep every zero
    assert result.metrics["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "regularizer",
    [
        {"kind": "magnitude", "target_sparsity": 0.9, "prune_end": 0.8},
        {"kind": "l0", "lam": 0.5, "granularity": "output"},
        {"kind": "l1", "lam": 3.0},
    ],
    ids=["magnitude", "l0-output", "l1"],
)
def test_resuming_in_either_phase_matches_the_uninterrupted_run(regularizer):
    cfg = _cfg(regularizer=regularizer, train={"epochs": 4, "finetune_epochs": 2})
    full, _, states = _run(cfg)
    for state in (states[0], states[2]):  # mid-schedule, and in the fine-tuning phase
        resumed = train(cfg, state=state)
        for key in ("train_loss", "val_accuracy", "sparsity", "nonzero_params", "test_accuracy"):
            assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-6), key
        assert resumed.architecture == full.architecture


def test_fine_tuning_a_structured_residual_network_exports_it_shrunk():
    """The fine-tuning phase after output gates on a residual network (not a chain) exports
    through the coupled groups, and resuming inside that phase gives the same model."""
    resnet = {"name": "resnet", "params": {"depth": 8, "width": 0.5}}
    cfg = _cfg(model=resnet, regularizer={"kind": "l0", "lam": 2.0, "granularity": "output"},
               train={"epochs": 3, "finetune_epochs": 1})  # fmt: skip
    full, _, states = _run(cfg)
    dense = sum(p.numel() for p in full.pruned.parameters())
    assert full.shrunk is not None and sum(p.numel() for p in full.shrunk.parameters()) < dense
    resumed = train(cfg, state=states[-1])  # in the fine-tuning phase
    assert resumed.metrics["test_accuracy"] == pytest.approx(full.metrics["test_accuracy"])
    assert resumed.architecture == full.architecture
