"""The eval path caches the deterministic gates; it must never return stale gated weights, even
after writes it cannot see through the version counter (``.data``, ``load_state_dict(assign=)``)."""

import pytest
import torch

from l0core import L0Regularizer

from .models import mlp


@pytest.mark.parametrize("granularity", ["weight", "output", "input"])
def test_logit_writes_through_data_reach_the_eval_forward(granularity):
    reg = L0Regularizer(mlp((12, 10, 3)), 0.01, granularity=granularity).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = reg(x)
        for la in reg.gate_parameters():
            la.data.copy_(torch.full_like(la, -10.0))  # close every gate behind autograd's back
        after = reg(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, reg.prune().model(x))
    assert reg.sparsity() == 1.0


@pytest.mark.parametrize("granularity", ["weight", "output", "input"])
def test_weight_writes_through_data_reach_the_eval_forward(granularity):
    model = mlp((12, 10, 3))
    reg = L0Regularizer(model, 0.01, granularity=granularity).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = reg(x)
        model[0].weight.data.mul_(-2.0)
        model[0].bias.data.add_(1.0)
        after = reg(x)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, reg.prune().model(x))
        model[0].weight.data = torch.randn(10, 12)  # a new tensor through the setter
        torch.testing.assert_close(reg(x), reg.prune().model(x))


@pytest.mark.parametrize("granularity", ["weight", "output"])
def test_load_state_dict_with_assign_reaches_every_path(granularity):
    model = mlp((12, 10, 3))
    reg = L0Regularizer(model, 0.01, weight_decay=1e-3, granularity=granularity)
    l2 = reg.count_l2().item()
    doubled = {k: 2 * v for k, v in model.state_dict().items()}
    model.load_state_dict(doubled, assign=True)  # new Parameter objects
    assert reg.count_l2().item() == pytest.approx(4 * l2, rel=1e-5)
    x = torch.randn(4, 12)
    reg.eval()
    with torch.no_grad():
        torch.testing.assert_close(reg(x), reg.prune().model(x))
    reg.train()
    reg(x).sum().backward()
    assert model[0].weight.grad is not None  # the new parameters are the ones trained


def test_eval_gates_are_computed_once_while_the_logits_hold_their_bits():
    reg = L0Regularizer(mlp((12, 10, 3)), 0.01).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        reg(x)
        cached = reg._eval_cache.get(tuple(reg.gate_parameters()), lambda: None)
        assert cached is not None  # the gates of the first forward, not recomputed
        reg(x)
        assert reg._eval_cache.get(tuple(reg.gate_parameters()), lambda: None) is cached
        reg.weight_log_alpha.data[5] += 1.0
        assert reg._eval_cache.get(tuple(reg.gate_parameters()), lambda: None) is None
