"""``train.precision``: bf16 autocast trains on CPU with the gates' own math in fp32; fp16 needs a
GPU (its gradient scaler) and is refused without one; the data stay on the trial's device when
they fit."""

import pytest
import torch
from pydantic import ValidationError

from sweeps.spec import SweepSpec, TrialConfig
from sweeps.training import data_fits_on_device, train
from tests.sweeps.conftest import tiny_spec


def _cfg(**overrides):
    d = SweepSpec.model_validate(tiny_spec(**overrides)).model_dump(mode="json")
    return TrialConfig.of(
        {**{k: d[k] for k in ("model", "dataset", "regularizer", "train")}, "seed": 0}
    )


def test_bf16_autocast_trains_on_cpu_with_the_gates_in_fp32(monkeypatch):
    import sweeps.training as training

    seen: dict[str, set] = {"layer": set(), "gates": set(), "gate_grads": set()}
    real_build = training.build_method

    def build(*args, **kwargs):
        method = real_build(*args, **kwargs)
        layer = next(m for m in method.modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(
            lambda m, i, out: seen["layer"].add(out.dtype) if m.training else None
        )
        for p in method.gate_parameters():
            seen["gates"].add(p.dtype)
            p.register_hook(lambda g: seen["gate_grads"].add(g.dtype))
        return method

    monkeypatch.setattr(training, "build_method", build)
    cfg = _cfg(regularizer={"kind": "l0", "granularity": "output", "lam": 0.1},
               train={"epochs": 3, "precision": "bf16"})  # fmt: skip
    m = train(cfg).metrics
    assert seen["layer"] == {torch.bfloat16}  # the model's matmuls ran in bf16
    assert seen["gates"] == seen["gate_grads"] == {torch.float32}
    assert m["val_accuracy"] > 0.8 and m["penalty"] > 0 and 0 <= m["sparsity"] < 1
    fp32 = train(_cfg(regularizer={"kind": "l0", "granularity": "output", "lam": 0.1},
                      train={"epochs": 3})).metrics  # fmt: skip
    assert abs(m["val_accuracy"] - fp32["val_accuracy"]) < 0.05


def test_fp16_needs_a_gpu():
    with pytest.raises(ValidationError, match=r"train.precision 'fp16' needs a GPU"):
        SweepSpec.model_validate(tiny_spec(train={"precision": "fp16"}))
    spec = tiny_spec(train={"precision": "fp16"}, resources={"gpus_per_trial": 0.5})
    assert SweepSpec.model_validate(spec).train.precision == "fp16"
    with pytest.raises(ValidationError, match=r"'fp32', 'bf16' or 'fp16'"):
        SweepSpec.model_validate(tiny_spec(train={"precision": "fp64"}))
    # A trial that lands on a CPU anyway (no CUDA on the node) says so before training.
    with pytest.raises(ValueError, match=r"precision 'fp16' needs CUDA .* device cpu"):
        train(_cfg(train={"precision": "fp16"}, resources={"gpus_per_trial": 0.5}))


def test_the_data_move_to_the_device_when_they_fit():
    assert not data_fits_on_device(10, torch.device("cpu"), free_bytes=None)  # already there
    assert data_fits_on_device(1 << 20, torch.device("cuda"), free_bytes=1 << 30)
    assert not data_fits_on_device(1 << 29, torch.device("cuda"), free_bytes=1 << 30)
