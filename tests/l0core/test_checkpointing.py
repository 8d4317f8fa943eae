"""Activation checkpointing inside the wrapped model: the recomputation during backward must see
the same gated weights and unit gates as the forward, so gradients equal those of the same model
without checkpointing (same noise)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from l0core import L0Regularizer


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, dim=6, reentrant=None):
        super().__init__()
        self.stem = nn.Linear(5, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, 3)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            if self.reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _grads(model, reentrant, kwargs, x):
    m = copy.deepcopy(model)
    m.reentrant = reentrant
    reg = L0Regularizer(m, 0.0, droprate_init=0.5, **kwargs)
    torch.manual_seed(3)
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.normal_(0.0, 2.0)
    torch.manual_seed(4)
    for _ in range(2):  # twice: the second backward must not see the first forward's gates
        reg.zero_grad(set_to_none=True)
        reg(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in reg.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"granularity": "weight"},
        {"granularity": "output"},
        {"granularity": "input"},
        {"granularity": "output", "per_sample": True},
    ],
    ids=["weight", "output", "input", "per-sample"],
)
def test_checkpointed_gradients_equal_the_plain_ones(reentrant, kwargs):
    model = Net()
    x = torch.randn(4, 5)
    plain = _grads(model, None, kwargs, x)
    ckpt = _grads(model, reentrant, kwargs, x)
    assert plain.keys() == ckpt.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    for p in model.parameters():
        assert isinstance(p, nn.Parameter)


def test_the_module_is_restored_after_a_checkpointed_backward():
    model = Net(reentrant=False)
    reg = L0Regularizer(model, 0.0, granularity="output")
    reg(torch.randn(4, 5)).sum().backward()
    assert all(isinstance(p, nn.Parameter) for m in model.modules() for p in m._parameters.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_two_forwards_in_one_backward():
    x = torch.randn(4, 5)
    plain = L0Regularizer(Net(), 0.0, granularity="output")
    (plain(x) - plain(x)).pow(2).sum().backward()  # no checkpointing: nothing to replay
    assert all(p.grad is not None for p in plain.gate_parameters())
    reg = L0Regularizer(Net(reentrant=False), 0.0, granularity="output")
    with pytest.raises(RuntimeError, match="spans several of its forwards"):
        (reg(x) - reg(x)).pow(2).sum().backward()
    reg(x).sum().backward()  # the failed backward left nothing behind
    params = [p for m in reg.module.modules() for p in m._parameters.values()]
    assert all(isinstance(p, nn.Parameter) for p in params)
