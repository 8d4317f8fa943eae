"""Coupled-group gates and the graph export on real architectures (ResNet, GoogLeNet,
MobileNetV2, ViT), small enough to run in seconds."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer
from sweeps.zoo import GoogLeNet, MobileNetV2, ViT, cifar_resnet, resnet

from .exact import close_half, gated_and_shrunk

SHAPE = (3, 16, 16)
FAMILIES = {
    "resnet20": (lambda: cifar_resnet(20, SHAPE, 10, width=0.5), "output"),
    "resnet18": (lambda: resnet(18, SHAPE, 10, width=0.125), "output"),
    "resnet50": (lambda: resnet(50, SHAPE, 10, width=0.125), "output"),
    "googlenet": (lambda: GoogLeNet(SHAPE, 10, width=0.0625, blocks=3), "output"),
    "mobilenet_v2": (lambda: MobileNetV2(SHAPE, 10, width=0.25, stages=4), "output"),
    "vit_heads": (lambda: ViT(SHAPE, 10, patch=4, dim=32, depth=2, heads=4), "head"),
    "vit_heads_mlp": (
        lambda: ViT(SHAPE, 10, patch=4, dim=32, depth=2, heads=4),
        ["head", "output"],
    ),
}


def _warm(reg: L0Regularizer, x: torch.Tensor, steps: int = 3) -> None:
    reg.train()
    with torch.no_grad():
        for _ in range(steps):
            reg(x)
    reg.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_random_half_closed_state_equals_the_gated_model(family):
    build, granularity = FAMILIES[family]
    torch.manual_seed(0)
    reg = L0Regularizer(build(), 0.1, granularity=granularity)
    assert reg.check_export() == []
    close_half(reg, seed=1)
    x = torch.randn(6, *SHAPE)
    _warm(reg, x)
    with torch.no_grad():
        gated = reg(x)
        small, report = reg.prune(shrink=True)
        out = small(x)
    modules = {type(m).__module__ for m in small.modules()}
    assert all(m == "l0core.modules" for m in modules if m.startswith("l0core"))  # plain modules
    assert (out - gated).abs().max() <= 1e-5 * gated.abs().max()
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert any(after < before for before, after in report.groups.values())
    buf = io.BytesIO()
    torch.save(small, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_data_gradient_reaches_every_gate(family):
    """Deterministic gates at 0.5 (differentiable in eval) and batch statistics: no gate is cut
    off from the loss (a sampled gate at exactly 0 or 1 would have none in that step)."""
    build, granularity = FAMILIES[family]
    torch.manual_seed(0)
    reg = L0Regularizer(build(), 0.0, granularity=granularity, droprate_init=0.5)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    reg.eval()
    for m in reg.module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    F.cross_entropy(reg(x), y).backward()
    grad = reg.unit_log_alpha.grad
    assert bool((grad != 0).all()), f"{int((grad == 0).sum())} gates get no gradient"


@pytest.mark.parametrize("family", ["resnet20", "resnet18", "googlenet", "mobilenet_v2"])
def test_gate_gradient_with_batch_statistics_is_of_the_order_of_frozen_statistics(family):
    """A gate before a BatchNorm is rescaled away by batch statistics (~100x smaller). The gates
    are deterministic (0.5, differentiable in eval); the frozen statistics are those of the batch,
    so both forwards compute the same outputs and differ only in the path through the stats."""
    build, granularity = FAMILIES[family]
    torch.manual_seed(0)
    reg = L0Regularizer(build(), 0.0, granularity=granularity, droprate_init=0.5)
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    bns = [m for m in reg.module.modules() if isinstance(m, nn.BatchNorm2d)]
    reg.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        m.train()
    with torch.no_grad():
        reg(x)

    def gate_grad(batch_stats: bool) -> torch.Tensor:
        for m in bns:
            m.train(batch_stats)
        reg.zero_grad()
        F.cross_entropy(reg(x), y).backward()
        return reg.unit_log_alpha.grad.abs().mean()

    ratio = float(gate_grad(True) / gate_grad(False))
    assert 0.2 < ratio < 5, ratio


def test_residual_stream_is_one_group_and_downsample_starts_another():
    reg = L0Regularizer(resnet(18, SHAPE, 10, width=0.125), 0.1, granularity="output")
    groups = {g["group"]: g for g in reg.group_summary()}
    stream = next(g for g in groups.values() if "layer1.0.bn2.weight[norm]" in g["members"])
    assert {"bn1.weight[norm]", "layer1.1.bn2.weight[norm]"} <= set(stream["members"])
    assert "layer2.0.conv1.weight[cols]" in stream["members"]
    down = next(g for g in groups.values() if "layer2.0.downsample.1.weight[norm]" in g["members"])
    assert "layer2.1.bn2.weight[norm]" in down["members"]
    rows = {r.name: r for r in reg.summary()}
    assert rows["layer1.0.bn1.weight"].applied.startswith("group:")
    assert not rows["fc.weight"].gated  # the model's outputs stay


def test_closed_channel_is_zero_after_its_batchnorm_attribute_in_training():
    model = resnet(18, SHAPE, 10, width=0.125)
    reg = L0Regularizer(model, 0.1, granularity="output")
    site = next(s for s in reg._asites if s.name.startswith("layer1.0.bn1"))
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[site.slice][:3] = -10.0
    feats = {}
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: feats.setdefault("bn1", o))
    reg.train()
    reg(torch.randn(4, *SHAPE))
    assert (feats["bn1"][:, :3] == 0).all() and (feats["bn1"][:, 3:] != 0).any()


def test_depthwise_conv_joins_its_producers_group():
    reg = L0Regularizer(MobileNetV2(SHAPE, 10, width=0.25, stages=2), 0.1, granularity="output")
    members = [set(g["members"]) for g in reg.group_summary()]
    expand = next(m for m in members if "features.2.conv.0.1.weight[norm]" in m)
    assert {"features.2.conv.1.0.weight[depthwise]", "features.2.conv.1.1.weight[norm]"} <= expand


def test_concatenation_feeds_consumers_at_offsets():
    reg = L0Regularizer(GoogLeNet(SHAPE, 10, width=0.0625, blocks=2), 0.1, granularity="output")
    plan = reg._group_plan
    cols = next(
        i
        for i in plan.graph.incidences
        if i.module == "inception3b.branch1.conv" and i.role == "cols"
    )
    branch4 = next(
        i
        for i in plan.graph.incidences
        if i.module == "inception3a.branch4.1.conv" and i.role == "rows"
    )
    n = branch4.ids.numel()
    assert plan.graph.roots(cols.ids[-n:]) == plan.graph.roots(branch4.ids)


def test_heads_and_mlp_units_are_gated_together_and_shrink():
    model = ViT(SHAPE, 10, patch=4, dim=32, depth=2, heads=4)
    reg = L0Regularizer(model, 0.1, granularity=["head", "output"])
    kinds = {g["group"]: (g["kind"], g["n_gates"]) for g in reg.group_summary()}
    # MLP hidden units, heads, and each LayerNorm's output (its input keeps its width)
    expected = [("channels", 32)] * 5 + [("channels", 128)] * 2 + [("heads", 4)] * 2
    assert sorted(kinds.values()) == expected
    heads = next(s for s in reg._asites if s.group.kind == "heads")
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[heads.slice][:2] = -10.0
    reg.eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert torch.allclose(small(x), reg(x), atol=1e-5)
    attn = small.get_submodule(heads.name.split(":")[0].rpartition(".")[0])
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 8


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def test_encoder_layer_mlp_units_shrink():
    torch.manual_seed(0)
    reg = L0Regularizer(_Encoder(), 0.1, granularity="output")
    assert reg.check_export() == []
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[:10] = -10.0
    x = torch.randn(2, 5, 16)
    reg(x)
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert small.layer.linear1.out_features == 22
        assert torch.allclose(small(x), reg(x), atol=1e-5)


def test_bad_granularities_name_the_value():
    with pytest.raises(ValueError, match="'rows'"):
        L0Regularizer(cifar_resnet(20, SHAPE, 10), 0.1, granularity=["head", "rows"])
    with pytest.raises(ValueError, match="'channel'"):
        L0Regularizer(cifar_resnet(20, SHAPE, 10), 0.1, granularity="channel")
    with pytest.raises(ValueError, match="heads 5 must divide dim 32"):
        ViT(SHAPE, 10, dim=32, heads=5)


def test_a_selection_whose_units_cannot_be_gated_is_refused_at_construction():
    """Only the classifier selected, with output gates: its units are the model's output, so
    nothing would be gated; the constructor says so and why, instead of the first
    ``regularization()`` failing on a missing count."""
    model = cifar_resnet(20, SHAPE, 10)
    with pytest.raises(
        ValueError, match=r"gates none of the 2 selected parameters \(fc.weight: the model's output"
    ):
        L0Regularizer(model, 0.1, granularity="output", include=["fc.*"])
    assert L0Regularizer(model, 0.1, granularity="weight", include=["fc.*"]).n_gated == 650


@pytest.mark.parametrize("family", ["resnet18", "vit_heads_mlp"])
def test_torch_export_accepts_the_shrunk_model(family):
    build, granularity = FAMILIES[family]
    torch.manual_seed(0)
    reg = L0Regularizer(build(), 0.1, granularity=granularity)
    close_half(reg, seed=2)
    reg.eval()
    x = torch.randn(2, *SHAPE)
    small = reg.prune(shrink=True).model
    program = torch.export.export(small, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), small(x), atol=1e-6)


def test_output_gates_on_a_conv_transpose_close_its_output_channels():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.ReLU(), nn.Conv2d(6, 3, 1))
    reg = L0Regularizer(model, 0.1, granularity="output")
    feats = {}
    model[0].register_forward_hook(lambda m, i, o: feats.setdefault("up", o))
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[:2] = -10.0  # the first two of the transposed conv's 6 outputs
    reg.eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        reg(x)
        assert (feats["up"][:, :2] == 0).all() and (feats["up"][:, 2:] != 0).any()
        small = reg.prune(shrink=True).model
        assert small[0].out_channels == 4 and torch.allclose(small(x), reg(x), atol=1e-6)


def test_depthwise_conv_in_a_sequential_shares_its_producers_gates():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 5 * 5, 2),
    )  # fmt: skip
    reg = L0Regularizer(model, 0.1, granularity="output")
    group = next(g for g in reg.group_summary() if "3.weight[depthwise]" in g["members"])
    assert group["n_gates"] == 8 and "1.weight[norm]" in group["members"]
    close_half(reg, seed=3)
    x = torch.randn(4, 3, 5, 5)
    _warm(reg, x)
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert torch.allclose(small(x), reg(x), atol=1e-5)
    assert small[3].groups == small[3].out_channels < 8


class _Attention(nn.Module):
    """The hand-written pattern on a rank-3 input; ``literal`` hard-codes the head count."""

    def __init__(self, literal: bool, num_heads: bool = True) -> None:
        super().__init__()
        if num_heads:
            self.num_heads = 4
        self.literal = literal
        self.qkv, self.proj, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        b, n, _ = x.shape
        heads = 4 if self.literal or not hasattr(self, "num_heads") else self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * 4)
        return self.head(self.proj(y).mean(1))


@pytest.mark.parametrize(
    ("literal", "num_heads", "problem"),
    [(False, True, None), (True, True, "fails on an input"), (False, False, None)],
)
def test_head_shrink_lowers_num_heads_or_says_why_not(literal, num_heads, problem):
    """With an int ``num_heads`` export lowers it (the forward must read it); without one, the
    module's reshapes are rewritten with the narrower sizes (an ``fx.GraphModule``)."""
    from l0core.export import ShrinkError

    reg = L0Regularizer(_Attention(literal, num_heads), 0.1, granularity="head")
    assert reg.check_export() == []
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[1] = -10.0
    x = torch.randn(2, 5, 16)
    reg(x)
    reg.eval()
    if problem is None:
        with torch.no_grad():
            small = reg.prune(shrink=True).model
            assert torch.allclose(small(x), reg(x), atol=1e-6)
        assert small.qkv.out_features == 36
        if num_heads:
            assert small.num_heads == 3 and type(small) is _Attention
        else:
            assert (
                isinstance(small, torch.fx.GraphModule)
                and "reshape(getitem, getitem_1, 3, 3, 4)" in small.code
            )
    else:
        with pytest.raises(ShrinkError, match=problem):
            reg.prune(shrink=True)


class _ShapeAttention(nn.Module):
    """Hand-written attention that reads its widths from the input: ``d = x.shape[-1]``."""

    def __init__(self, dim: int, heads: int, scale: bool = False) -> None:
        super().__init__()
        self.heads, self.scale = heads, scale
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        if self.scale:  # the width itself enters the result: it must keep its value
            y = y * d**-0.5
        return self.proj(y)


class _ConvAttention(nn.Module):
    def __init__(self, scale: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.attn = _ShapeAttention(16, 4, scale)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        t = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        return self.fc(self.attn(t).mean(1))


@pytest.mark.parametrize("granularity", ["head", ["head", "output"], "output"])
def test_attention_that_reads_widths_from_shapes_exports_exactly_and_smaller(granularity):
    reg = L0Regularizer(_ConvAttention(), 0.1, granularity=granularity)
    assert reg.check_export() == []
    close_half(reg, seed=5)
    x = torch.randn(4, 3, 6, 6)
    want, (small, _) = gated_and_shrunk(reg, x)
    assert torch.allclose(small(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    n = sum(p.numel() for p in small.parameters())
    assert n < sum(p.numel() for p in reg.module.parameters())
    assert isinstance(small.attn, torch.fx.GraphModule)  # its reshapes read the new sizes
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    if "head" in granularity:
        assert small.attn.qkv.out_features < 48


def test_a_width_read_into_the_result_keeps_its_channels():
    """``y * d ** -0.5`` with ``d`` read from the input: the input's channels keep their width
    (a narrower ``d`` would change the scale), heads still shrink."""
    reg = L0Regularizer(_ConvAttention(scale=True), 0.1, granularity=["head", "output"])
    kinds = [g["group"] for g in reg.group_summary()]
    assert "attn.qkv:heads" in kinds and "bn:channels" not in kinds
    reasons = " ".join(reg.check_export(ungated=True))
    assert "read from a shape by node 'mul'" in reasons
    close_half(reg, seed=6)
    x = torch.randn(4, 3, 6, 6)
    want, (small, _) = gated_and_shrunk(reg, x)
    assert torch.allclose(small(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert small.conv.out_channels == 16


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x  # fx cannot trace this branch


class _WithUntraceableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.odd = _DataDependent()
        self.c2, self.b2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.odd(torch.relu(self.b1(self.c1(x))))
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


def test_a_block_fx_cannot_trace_is_kept_whole_and_named():
    with pytest.warns(UserWarning, match=r"odd \(_DataDependent\)"):
        reg = L0Regularizer(_WithUntraceableBlock(), 0.1, granularity="output")
    assert [g["group"] for g in reg.group_summary()] == ["b2:channels"]
    assert [s.name for s in reg._wsites] == ["odd.conv.weight"]
    (line,) = reg.check_export()
    assert line.startswith("odd.conv.weight") and "_DataDependent" in line
    with pytest.raises(ValueError, match="cannot trace _DataDependent"):
        L0Regularizer(_DataDependent(), 0.1, granularity="head")


def test_group_wrapper_pickles_deepcopies_and_counts_l2_of_what_each_gate_owns():
    import copy
    import pickle

    torch.manual_seed(0)
    reg = L0Regularizer(cifar_resnet(20, (3, 8, 8), 10, width=0.5), 0.1, granularity="output",
                        weight_decay=1e-4)  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    reg(x)
    with torch.no_grad():
        reg.unit_log_alpha.fill_(10.0)  # P(open) ~ 1: count_l2 is the owned parameters' norm
    owned = {r.name for r in reg.summary() if r.gated}
    params = reg.module.named_parameters()
    expected = sum(float(p.detach().pow(2).sum()) for n, p in params if n in owned)
    assert float(reg.count_l2().detach()) == pytest.approx(expected, rel=1e-3)
    reg.eval()
    for clone in (copy.deepcopy(reg), pickle.loads(pickle.dumps(reg))):
        clone.eval()
        assert clone._group_plan.masks[0].module is clone.module.bn1
        with torch.no_grad():
            assert torch.equal(clone(x), reg(x))
