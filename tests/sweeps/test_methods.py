"""build_method: the spec's regularizer section becomes the right l0core wrapper."""

import inspect

import pytest
import torch

from l0core import L0Regularizer, MagnitudePruner, SparsityController
from sweeps.methods import FINETUNE_DUAL_LR, build_method
from sweeps.models import MlpParams, mlp
from sweeps.spec import RegularizerSpec, TrainSpec


def _reg(**fields) -> RegularizerSpec:
    return RegularizerSpec.model_validate(fields)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(MlpParams(hidden=[16]), (12,), 3)


def test_magnitude_schedule_is_placed_in_the_training_steps():
    reg = _reg(kind="magnitude", target_sparsity=0.9, prune_begin=0.1, prune_end=0.6,
               prune_scope="layer")  # fmt: skip
    method = build_method(_model(), reg, num_train=1000, total_steps=1000)
    assert isinstance(method, MagnitudePruner)
    assert (method.begin_step, method.end_step, method.frequency) == (100, 600, 10)
    assert method.scope == "layer" and method.target_sparsity == 0.9
    one_shot = build_method(
        _model(), reg.model_copy(update={"prune_begin": 0.0, "prune_end": 0.0}), 1000, 50
    )
    assert (one_shot.begin_step, one_shot.end_step, one_shot.frequency) == (0, 0, 1)
    with pytest.raises(ValueError, match="needs total_steps"):
        build_method(_model(), reg, num_train=1000)


def test_auto_gate_init_opens_the_gates_of_large_weights_only_when_pretrained():
    reg = _reg(kind="l0", droprate_init=0.3)
    assert reg.gate_init == "auto" and reg.dual_lr is None  # l0core's controller default
    assert TrainSpec().gate_lr == 0.1  # the measured recipe (docs/benchmarks.md)
    scratch = build_method(_model(), reg, 1000)
    tuned = build_method(_model(), reg, 1000, pretrained=True)
    explicit = build_method(_model(), reg.model_copy(update={"gate_init": "magnitude"}), 1000)
    assert isinstance(tuned, L0Regularizer)
    assert torch.equal(tuned.weight_log_alpha, explicit.weight_log_alpha)
    assert scratch.weight_log_alpha.std() < 0.02  # the authors' N(logit, 0.01)
    w = tuned.module[1].weight.detach().abs().flatten()
    la = tuned.weight_log_alpha[: w.numel()]
    assert la[w.argmax()] > la[w.argmin()] + 3


def test_dual_lr_reaches_the_controller_or_follows_the_start():
    default = inspect.signature(SparsityController).parameters["dual_lr"].default
    reg = _reg(kind="l0", lam=0.0, target_sparsity=0.9)
    assert build_method(_model(), reg, 1000).controller.dual_lr == default  # from scratch
    finetuned = build_method(_model(), reg, 1000, pretrained=True)
    assert finetuned.controller.dual_lr == FINETUNE_DUAL_LR != default
    tuned = build_method(_model(), reg.model_copy(update={"dual_lr": 0.25}), 1000, pretrained=True)
    assert tuned.controller.dual_lr == 0.25 and tuned.controller.target == 0.9
