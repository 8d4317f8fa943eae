"""Does L0 find sparsity that is really there? A teacher with 90% zero weights, and L1 alongside."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer, L1Regularizer

from .models import mlp


def _teacher_data(n=4096, d_in=40, d_out=8, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * 2
    mask = torch.rand(d_out, d_in, generator=g) < density
    w = w * mask
    x = torch.randn(n, d_in, generator=g)
    y = x @ w.t() + 0.01 * torch.randn(n, d_out, generator=g)
    return x, y, w


def _train(reg, x, y, epochs, lr=1e-2, gate_lr=5e-2):
    opt = torch.optim.Adam(
        [{"params": list(reg.weight_parameters()), "lr": lr},
         {"params": list(reg.gate_parameters()), "lr": gate_lr}]
    )  # fmt: skip
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            loss = F.mse_loss(reg(x[i : i + 128]), y[i : i + 128]) + reg.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.slow
def test_l0_recovers_a_sparse_teacher():
    x, y, w = _teacher_data()
    torch.manual_seed(0)
    student = nn.Linear(40, 8)
    reg = L0Regularizer(student, 1e-3, droprate_init=0.3)
    _train(reg, x, y, epochs=30)
    reg.eval()
    pruned = reg.prune().model
    kept = pruned.weight != 0
    teacher_nz = w != 0
    assert reg.sparsity() >= 0.80
    assert (kept & teacher_nz).sum() >= 0.9 * teacher_nz.sum()  # keeps the teacher's weights
    with torch.no_grad():
        assert F.mse_loss(pruned(x), y) < 0.05 * y.var()


def test_l1_regularizer_interface_and_threshold_pruning():
    model = mlp((10, 8, 3))
    reg = L1Regularizer(model, 0.5, threshold=0.1)
    expected = 0.5 * sum(p.abs().sum() for n, p in model.named_parameters() if p.dim() >= 2)
    assert reg.regularization().item() == pytest.approx(expected.item(), rel=1e-6)
    small = sum(int((p.abs() <= 0.1).sum()) for p in (model[0].weight, model[2].weight))
    assert reg.sparsity() == pytest.approx(small / 104)
    assert int(reg.count_l0()) == 104 - small
    x = torch.randn(4, 10)
    out = reg(x)
    assert torch.equal(out, model(x))
    pruned = reg.prune().model
    assert int((pruned[0].weight == 0).sum() + (pruned[2].weight == 0).sum()) == small
    assert torch.equal(pruned[0].bias, model[0].bias)  # biases are not selected by default
    rows = {r.name: r for r in reg.summary()}
    assert rows["0.weight"].gated and not rows["0.bias"].gated
    assert reg.expected_flops() == pytest.approx(104 - small)
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0\.0, got -1"):
        L1Regularizer(model, 0.5, threshold=-1)


@pytest.mark.slow
def test_l1_training_drives_weights_to_the_threshold():
    x, y, _ = _teacher_data(seed=1)
    reg = L1Regularizer(nn.Linear(40, 8), 1e-2, threshold=1e-2)
    _train(reg, x, y, epochs=15, lr=5e-3)
    assert reg.sparsity() > 0.6
