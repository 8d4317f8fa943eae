"""Per-sample structured gates: one gate set per example per forward, on the examples' dim."""

import pytest
import torch
from torch import nn

from l0core import L0Regularizer


def _identity_linear(dim):
    fc = nn.Linear(dim, dim)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(dim))
        fc.bias.zero_()
    return fc


class CallsTwice(nn.Module):
    """One layer applied twice in one forward; ``seen`` records the first call's output."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = _identity_linear(dim)
        self.seen = []

    def forward(self, x):
        h = self.fc(x)
        self.seen.append(h)
        return self.fc(h)


def test_a_layer_called_twice_sees_the_same_per_sample_gates():
    model = CallsTwice()
    reg = L0Regularizer(model, 0.0, granularity="output", per_sample=True, droprate_init=0.5)
    x = torch.ones(8, 16)
    out = reg(x)  # fc(x) = z, fc(fc(x)) = z * z with one z per example
    z = model.seen[-1]
    assert 0 < float((z == 0).float().mean()) < 1 and z.std(0).sum() > 0
    torch.testing.assert_close(out, z * z)


def test_sequence_first_input_draws_gates_per_example():
    reg = L0Regularizer(
        _identity_linear(16), 0.0, granularity="output", per_sample=True, droprate_init=0.5,
        batch_dim=1,
    )  # fmt: skip
    out = reg(torch.ones(5, 3, 16))  # (T, B, C)
    assert torch.equal(out, out[:1].expand_as(out))  # one gate set per example, for all steps
    assert out.std(1).sum() > 0  # and different examples get different gates


def test_batch_first_false_attention_layers_draw_gates_per_example():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False)
    reg = L0Regularizer(
        layer, 0.0, granularity="output", per_sample=True, include="linear1.weight",
        droprate_init=0.5,
    )  # fmt: skip
    seen = []
    layer.linear2.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 1, 8).expand(4, 3, 8)  # (T, B, E), every token the same
    reg(x)
    hidden = seen[-1]  # (T, B, F): the gated units of linear1, after the activation
    assert torch.equal(hidden, hidden[:1].expand_as(hidden))  # the same gates at every step
    assert hidden.std(1).sum() > 0  # different gates for different examples


@pytest.mark.parametrize("bad", [-1, 1.0, "1", True])
def test_batch_dim_must_be_a_dimension_index(bad):
    with pytest.raises(ValueError, match=rf"batch_dim must be an integer >= 0, got {bad!r}"):
        L0Regularizer(nn.Linear(4, 6), 0.0, granularity="output", per_sample=True, batch_dim=bad)


def test_an_activation_without_a_batch_dim_is_rejected():
    reg = L0Regularizer(nn.Linear(4, 6), 0.0, granularity="output", per_sample=True, batch_dim=1)
    with pytest.raises(ValueError, match=r"weight: .* shape \(3, 6\).* batch_dim=1 is its units"):
        reg(torch.randn(3, 4))  # (B, C): dim 1 indexes units, not examples
