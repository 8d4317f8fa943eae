"""When the target-sparsity controller takes its dual step: once per update of the gate logits
(an optimizer step), however often ``regularization()`` is called in between."""

import pytest
import torch
import torch.nn.functional as F

from l0core import L0Regularizer, SparsityController

from .models import mlp


def test_the_term_uses_the_multipliers_and_step_moves_them_by_the_measured_gap():
    ctl = SparsityController(0.5, dual_lr=0.1, damping=0.0)
    expected = torch.tensor(0.5, requires_grad=True)
    ctl(expected).backward()
    assert float(ctl.lambda1) == 0.0 and float(expected.grad) == 0.0  # no step in the term
    ctl.step(torch.tensor(0.3))  # on target in expectation, 20 points short measured
    assert float(ctl.lambda1) == pytest.approx(-0.02) and float(ctl.lambda2) == pytest.approx(0.004)
    ctl(expected).backward()
    assert float(expected.grad) < 0  # now it pushes the expected sparsity up


def _wrapped():
    return L0Regularizer(mlp((12, 16, 3)), 0.0, target_sparsity=0.9, dual_lr=0.05)


def test_extra_regularization_calls_do_not_move_the_multipliers():
    reg = _wrapped()
    opt = torch.optim.Adam(reg.parameters(), lr=1e-2)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    for _ in range(3):
        loss = F.cross_entropy(reg(x), y) + reg.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lambdas = reg.controller.lambda1.clone(), reg.controller.lambda2.clone()
    for _ in range(3):
        reg.regularization()  # for logging
    assert torch.equal(reg.controller.lambda1, lambdas[0])
    assert torch.equal(reg.controller.lambda2, lambdas[1])


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_gradient_accumulation_takes_one_dual_step_per_optimizer_step(micro_batches):
    torch.manual_seed(0)
    reg = _wrapped()
    opt = torch.optim.SGD(reg.parameters(), lr=0.0)  # the logits move only by the clamp: no-op
    x = torch.randn(8, 12)
    history = []
    for _ in range(5):
        opt.zero_grad()
        for _ in range(micro_batches):
            (reg(x).pow(2).mean() + reg.regularization()).div(micro_batches).backward()
        opt.step()
        history.append(float(reg.controller.lambda1))
    gap = 0.0 - 0.9  # nothing is sparse: measured sparsity 0, target 0.9
    steps = [b - a for a, b in zip([0.0, *history[:-1]], history, strict=True)]
    assert steps == [pytest.approx(0.05 * gap, rel=1e-5)] * 5
