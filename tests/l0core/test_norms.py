"""LayerNorm and GroupNorm: structured gates act after the normalization (never normalized away),
a GroupNorm group closes whole, a LayerNorm's input keeps its width, and the export stays exact."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer
from l0core.modules import NarrowLayerNorm

from .exact import close_half, gated_and_shrunk


class GNBlock(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups, c)

    def forward(self, x):
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + x)


class GNResNet(nn.Module):
    """A residual network normalized by GroupNorm (BatchNorm-free, as for small batches)."""

    def __init__(self, c: int = 16, groups: int = 4, affine: bool = True) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c, affine=affine)
        self.blocks = nn.Sequential(GNBlock(c, groups), GNBlock(c, groups))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.gn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class LNMlp(nn.Module):
    """Pre-norm residual MLP blocks on a LayerNorm-ed stream, and a final LayerNorm."""

    def __init__(self, d: int = 24, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 16 * 16, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.fc1 = nn.ModuleList([nn.Linear(d, hidden), nn.Linear(d, hidden)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, d), nn.Linear(hidden, d)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x.flatten(1))
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2, strict=True):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(self.norm(x))


SHAPE = (3, 16, 16)
FAMILIES = {"groupnorm_resnet": GNResNet, "layernorm_mlp": LNMlp}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_random_half_closed_state_equals_the_gated_model(family):
    reg = L0Regularizer(FAMILIES[family](), 0.1, granularity="output")
    assert reg.check_export() == []
    close_half(reg, seed=1)
    x = torch.randn(6, *SHAPE)
    gated, (small, report) = gated_and_shrunk(reg, x)
    with torch.no_grad():
        out = small(x)
    assert (out - gated).abs().max() <= 1e-5 * gated.abs().max()
    assert report.params_after < report.params_before
    buf = io.BytesIO()
    torch.save(small, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    program = torch.export.export(small, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), out, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_data_gradient_reaches_every_gate(family):
    reg = L0Regularizer(FAMILIES[family](), 0.0, granularity="output", droprate_init=0.5)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    reg.eval()  # deterministic gates at 0.5: differentiable, never exactly 0 or 1
    F.cross_entropy(reg(x), y).backward()
    grad = reg.unit_log_alpha.grad
    assert bool((grad != 0).all()), f"{int((grad == 0).sum())} gates get no gradient"


def test_a_groupnorm_group_is_one_unit_gated_after_the_normalization():
    model = GNResNet(c=16, groups=4)
    reg = L0Regularizer(model, 0.1, granularity="output")
    groups = {g["group"]: g for g in reg.group_summary()}
    interior = next(g for g in groups.values() if "blocks.0.gn1.weight[norm]" in g["members"])
    assert interior["n_gates"] == 4  # one gate per GroupNorm group, not per channel
    assert interior["params_per_gate"] == 4 * (16 * 9 + 2)  # conv rows + gn entries of 4 channels
    rows = {r.name: r for r in reg.summary()}
    assert rows["blocks.0.gn1.weight"].applied.startswith("group:")
    site = next(s for s in reg._asites if s.name == interior["group"])
    with torch.no_grad():
        reg.unit_log_alpha.fill_(8.0)
        reg.unit_log_alpha[site.slice][1] = -10.0  # channels 4..7
    feats = {}
    hook = model.blocks[0].gn1.register_forward_hook(lambda m, i, o: feats.update(gn1=o))
    reg.train()
    reg(torch.randn(4, *SHAPE))
    hook.remove()
    assert (feats["gn1"][:, 4:8] == 0).all() and (feats["gn1"][:, 8:] != 0).any()
    reg.eval()
    small = reg.prune(shrink=True).model
    assert (small.blocks[0].gn1.num_groups, small.blocks[0].gn1.num_channels) == (3, 12)
    assert small.blocks[0].conv1.out_channels == 12


def test_a_layernorm_input_keeps_its_width_and_its_output_is_gated():
    reg = L0Regularizer(LNMlp(), 0.1, granularity="output")
    rows = {r.name: r for r in reg.summary()}
    assert not rows["embed.weight"].gated  # writes the stream the LayerNorms normalize
    assert not rows["fc2.0.weight"].gated
    assert rows["norms.0.weight"].applied.startswith("group:")
    assert rows["fc1.0.weight"].gated
    reasons = "\n".join(reg.check_export(ungated=True))
    assert "embed.weight" in reasons and "LayerNorm" in reasons
    close_half(reg, seed=4)
    reg.eval()
    small = reg.prune(shrink=True).model
    norm = small.norms[0]
    assert isinstance(norm, NarrowLayerNorm) and norm.width == 24
    assert small.fc1[0].in_features == norm.keep.numel() < 24


def test_groupnorm_without_affine_is_not_gated_and_check_export_says_why():
    reg = L0Regularizer(GNResNet(affine=False), 0.1, granularity="output")
    assert reg.check_export() == []  # nothing gated that would not shrink exactly
    lines = reg.check_export(ungated=True)
    assert any(line.startswith("stem.weight") and "no affine" in line for line in lines)
    rows = {r.name: r for r in reg.summary()}
    assert not rows["stem.weight"].gated


def test_a_sequential_with_groupnorm_is_gated_by_data_flow_not_per_layer():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    reg = L0Regularizer(model, 0.1, granularity="output")
    group = next(g for g in reg.group_summary() if "1.weight[norm]" in g["members"])
    assert group["n_gates"] == 2
    close_half(reg, seed=5)
    x = torch.randn(3, *SHAPE)
    reg.eval()
    with torch.no_grad():
        small = reg.prune(shrink=True).model
        assert torch.allclose(small(x), reg(x), atol=1e-5)
