"""``nn.MultiheadAttention`` and the ``nn.Transformer*Layer``s with granularity ``head``: closed
heads act, and export replaces the attention by a ``HeadAttention`` with fewer heads that returns
what the gated module returns (outputs, attention weights, masks)."""

import io

import pytest
import torch
from torch import nn

from l0core import L0Regularizer
from l0core.modules import HeadAttention


class Encoder(nn.Module):
    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)  # fmt: skip
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, tgt, memory):
        return self.head(self.layer(tgt, memory).mean(1))


class SelfAttention(nn.Module):
    """A bare ``nn.MultiheadAttention`` on a stream no norm touches, sequence-first, returning
    its attention weights too (``need_weights`` is True by default)."""

    def __init__(self, average: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4)
        self.head = nn.Linear(16, 3)
        self.average = average

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        h = torch.relu(self.embed(x))  # (T, B, 16)
        out, weights = self.attn(h, h, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                 average_attn_weights=self.average)  # fmt: skip
        return self.head(out), weights


def _close(reg: L0Regularizer, kind: str, which: list[int]) -> None:
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        for s in reg._asites:
            if s.group.kind == kind:
                reg.unit_log_alpha[s.slice][which] = -10.0


def _roundtrip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_loses_heads_in_export(norm_first):
    reg = L0Regularizer(Encoder(norm_first), 0.1, granularity=["head", "output"])
    assert reg.check_export() == []
    _close(reg, "heads", [0, 2])
    x = torch.randn(2, 5, 16)
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        gated = reg(x)
        assert torch.allclose(small(x), gated, atol=1e-5)
    attn = small.layer.self_attn
    assert isinstance(attn, HeadAttention) and attn.num_heads == 2
    assert attn.in_proj_weight.shape == (3 * 2 * 4, 16) and attn.out_proj.in_features == 8
    with torch.no_grad():
        assert torch.equal(_roundtrip(small)(x), small(x))
    program = torch.export.export(small, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), small(x), atol=1e-6)


def test_decoder_layer_self_and_cross_attention_lose_heads():
    reg = L0Regularizer(Decoder(), 0.1, granularity="head")
    assert reg.check_export() == []
    heads = [g for g in reg.group_summary() if g["kind"] == "heads"]
    assert len(heads) == 2  # self-attention and cross-attention
    _close(reg, "heads", [1])
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert torch.allclose(small(tgt, memory), reg(tgt, memory), atol=1e-5)
    assert small.layer.self_attn.num_heads == small.layer.multihead_attn.num_heads == 3


@pytest.mark.parametrize("average", [True, False])
def test_bare_attention_returns_the_same_outputs_and_weights_with_masks(average):
    reg = L0Regularizer(SelfAttention(average), 0.1, granularity=["head", "output"])
    assert reg.check_export() == []
    _close(reg, "heads", [3])
    with torch.no_grad():
        reg.unit_log_alpha[:5] = -10.0  # a few channels as well
    x = torch.randn(5, 2, 6)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    per_head = torch.randn(2 * 4, 5, 5)
    reg.eval()
    with torch.no_grad():
        reg(x)
        small = reg.prune(shrink=True).model
        assert isinstance(small.attn, HeadAttention) and small.attn.num_heads == 3
        for kwargs in ({}, {"attn_mask": causal, "key_padding_mask": pad},
                       {"attn_mask": per_head}):  # fmt: skip
            (out, w), (want, want_w) = small(x, **kwargs), reg(x, **kwargs)
            assert torch.allclose(out, want, atol=1e-5)
            assert w.shape == want_w.shape and torch.allclose(w, want_w, atol=1e-6)
        unbatched = x[:, 0]
        (out, w), (want, want_w) = small(unbatched), reg(unbatched)
        assert torch.allclose(out, want, atol=1e-5) and torch.allclose(w, want_w, atol=1e-6)


def test_closing_every_head_changes_the_output_and_export_keeps_one_zero_head():
    reg = L0Regularizer(Encoder(), 0.1, granularity="head")
    x = torch.randn(2, 5, 16)
    reg.eval()
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        before = reg(x)
        _close(reg, "heads", [0, 1, 2, 3])
        assert not torch.allclose(reg(x), before)
        small = reg.prune(shrink=True).model
        assert small.layer.self_attn.num_heads == 1
        assert torch.allclose(small(x), reg(x), atol=1e-5)


def test_per_module_granularities_through_include():
    from sweeps.zoo import ViT

    model = ViT((3, 16, 16), 10, patch=4, dim=32, depth=2, heads=4)
    reg = L0Regularizer(model, 0.1, include={"blocks.*.attn": "head", "blocks.*.mlp.fc1": "output"})
    kinds = sorted((g["kind"], g["n_gates"]) for g in reg.group_summary())
    assert kinds == [("channels", 128)] * 2 + [("heads", 4)] * 2  # no LayerNorm outputs
    assert reg._wsites == []
    _close(reg, "heads", [1])
    with torch.no_grad():
        reg.unit_log_alpha[-20:] = -10.0  # some MLP hidden units
    x = torch.randn(2, 3, 16, 16)
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert torch.allclose(small(x), reg(x), atol=1e-5)
    assert small.blocks[0].attn.num_heads == 3


def test_per_module_granularities_mix_weight_gates_with_groups():
    reg = L0Regularizer(Encoder(), 0.1, include={"layer.self_attn": "head", "head": "weight"})
    assert [s.name for s in reg._wsites] == ["head.weight"]
    assert [g["kind"] for g in reg.group_summary()] == ["heads"]


@pytest.mark.parametrize(
    ("include", "granularity", "match"),
    [
        ({"layer.self_attn": "heads"}, "weight", r"'heads' is not a granularity; allowed: \("),
        ({"layer.nothing": "head"}, "weight", "'layer.nothing' matches no module"),
        ({"layer.self_attn": "head"}, "output", "granularity='output' given with include"),
        ({}, "weight", "is empty"),
    ],
)
def test_bad_per_module_granularities_name_the_value(include, granularity, match):
    with pytest.raises(ValueError, match=match):
        L0Regularizer(Encoder(), 0.1, include=include, granularity=granularity)


class Stack(nn.Module):
    """``nn.TransformerEncoder`` (a stack of layers and a final LayerNorm), with padding."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                         enable_nested_tensor=False)  # fmt: skip
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad=None):
        return self.head(self.enc(x, src_key_padding_mask=pad).mean(1))


def test_transformer_encoder_stack_loses_heads_and_hidden_units():
    reg = L0Regularizer(Stack(), 0.1, granularity=["head", "output"])
    assert reg.check_export() == []
    assert sorted(g["kind"] for g in reg.group_summary()) == ["channels"] * 2 + ["heads"] * 2
    _close(reg, "heads", [1])
    with torch.no_grad():
        reg.unit_log_alpha[4:14] = -10.0
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        for mask in (None, pad):
            assert torch.allclose(small(x, mask), reg(x, mask), atol=1e-5)
    assert [layer.self_attn.num_heads for layer in small.enc.layers] == [3, 3]
