"""Wrapping modules that are not plain MLPs: BatchNorm CNNs, RNNs, attention, tied weights,
weights read twice, keyword arguments and tuple outputs, torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer

from .models import cnn_bn, mlp


def _train_step(reg, *args, **kwargs):
    out = reg(*args, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    (first.float().pow(2).mean() + reg.regularization()).backward()
    return out


def _grads_flow(reg):
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.gate_parameters())


@pytest.mark.parametrize("granularity", ["weight", "output", "input"])
def test_conv_batchnorm_cnn(granularity):
    reg = L0Regularizer(cnn_bn(), 0.01, granularity=granularity)
    _train_step(reg, torch.randn(4, 3, 16, 16))
    assert _grads_flow(reg)
    reg.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reg.prune().model(x), reg(x), atol=1e-5)


@pytest.mark.parametrize("granularity", ["weight", "output", "input"])
def test_lstm(granularity):
    lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
    reg = L0Regularizer(lstm, 0.01, granularity=granularity)
    assert {s.name for s in reg._wsites} == {
        f"{k}_l{i}" for k in ("weight_ih", "weight_hh") for i in (0, 1)
    }
    out, (h, _c) = _train_step(reg, torch.randn(3, 5, 6))
    assert out.shape == (3, 5, 8) and h.shape == (2, 3, 8)
    assert _grads_flow(reg)
    reg.eval()
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        assert torch.allclose(reg.prune().model(x)[0], reg(x)[0], atol=1e-5)


def test_transformer_encoder_layer_and_attention():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    reg = L0Regularizer(layer, 0.01)
    names = {s.name for s in reg._wsites}
    assert {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight"} <= names
    x = torch.randn(2, 5, 16)
    _train_step(reg, x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert _grads_flow(reg)
    reg.eval()
    with torch.no_grad():
        assert torch.allclose(reg.prune().model(x), reg(x), atol=1e-5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    reg = L0Regularizer(mha, 0.01, granularity="output")
    q = torch.randn(2, 3, 8)
    out, weights = _train_step(reg, q, q, q, need_weights=True)
    assert out.shape == (2, 3, 8) and weights.shape == (2, 3, 3)
    assert _grads_flow(reg)


class TiedLM(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("granularity", ["weight", "output"])
def test_tied_weights_share_one_set_of_gates(granularity):
    model = TiedLM()
    reg = L0Regularizer(model, 0.01, granularity=granularity)
    names = [s.name for s in reg._wsites + reg._asites]
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    tokens = torch.randint(0, 20, (3, 7))
    seen = []
    model.head.register_forward_pre_hook(lambda m, i: seen.append(m.weight))
    model.embed.register_forward_pre_hook(lambda m, i: seen.append(m.weight))
    _train_step(reg, tokens)
    assert seen[0] is seen[1]  # both uses see the same gated tensor
    assert not isinstance(seen[0], nn.Parameter)
    assert _grads_flow(reg)
    assert isinstance(model.head.weight, nn.Parameter) and model.head.weight is model.embed.weight


class ReadsTwice(nn.Module):
    """Uses its weight twice in one forward: both reads must see one mask."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6))
        self.reads = []

    def forward(self, x):
        a = self.weight
        b = self.weight
        self.reads.append((a, b))
        return x @ a @ b.t()


def test_a_weight_read_twice_sees_one_mask():
    m = ReadsTwice()
    reg = L0Regularizer(m, 0.01, droprate_init=0.5)
    _train_step(reg, torch.randn(2, 6))
    a, b = m.reads[-1]
    assert a is b and (a == 0).any()
    assert isinstance(m.weight, nn.Parameter)  # restored after the forward


class KwargsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 4)
        self.dec = nn.Linear(4, 5)

    def forward(self, x, *, scale=1.0, return_hidden=False):
        h = torch.relu(self.enc(x)) * scale
        out = self.dec(h)
        return (out, h) if return_hidden else out


def test_keyword_arguments_and_tuple_outputs_pass_through():
    m = KwargsTuple()
    reg = L0Regularizer(m, 0.01, granularity="input")
    out, h = _train_step(reg, torch.randn(3, 5), scale=2.0, return_hidden=True)
    assert out.shape == (3, 5) and h.shape == (3, 4)
    assert isinstance(reg(torch.randn(3, 5)), torch.Tensor)
    assert _grads_flow(reg)


def test_hooks_do_not_outlive_the_forward():
    model = mlp((8, 6, 3))
    reg = L0Regularizer(model, 0.01, granularity="output")
    reg(torch.randn(2, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(isinstance(p, nn.Parameter) for m in model.modules() for p in m._parameters.values())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    reg = L0Regularizer(mlp((20, 16, 4)), 0.01)
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    compiled = torch.compile(reg)
    loss = F.cross_entropy(compiled(x), y) + reg.regularization()
    loss.backward()
    assert _grads_flow(reg)
    reg.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), reg(x), atol=1e-5)
