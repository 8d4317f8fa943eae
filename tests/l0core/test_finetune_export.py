"""Fine-tuning after a structured method (``FixedMask.after``): the pruned model trains with its
zeros fixed, and its export removes the closed units through the coupled groups' graph export,
on residual and attention networks as on chains; the result equals the fine-tuned model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from l0core import FixedMask, L0Regularizer, Pruned
from l0core.channel_norm import ChannelNormPruner
from sweeps.zoo import ViT, cifar_resnet
from tests.l0core.exact import close_half, gated_and_shrunk


def _n(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fine_tune(fixed: FixedMask, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(fixed.parameters(), lr=0.05)
    y = torch.arange(len(x)) % 10
    fixed.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(fixed(x), y).backward()
        opt.step()


def _export_matches(fixed: FixedMask, x: torch.Tensor) -> Pruned:
    fixed.eval()
    with torch.no_grad():
        want = fixed(x)
        shrunk = fixed.prune(shrink=True)
        torch.testing.assert_close(
            shrunk.model(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())
        )
    return shrunk


def test_a_fine_tuned_residual_network_exports_as_small_as_the_gated_one():
    torch.manual_seed(0)
    model = cifar_resnet(20, (3, 16, 16), 10, width=0.5)
    dense = _n(model)
    reg = L0Regularizer(model, 0.1, granularity="output")
    close_half(reg, seed=1)
    x = torch.randn(8, 3, 16, 16)
    _, (gated_export, _) = gated_and_shrunk(reg, x)
    fixed = FixedMask.after(reg)
    _fine_tune(fixed, x)
    shrunk, report = _export_matches(fixed, x)
    # the same units go: as small as the export without fine-tuning, and smaller than dense
    assert _n(shrunk) == _n(gated_export) < dense
    assert report.params_after == _n(shrunk)


def test_fine_tuned_attention_heads_are_removed():
    torch.manual_seed(2)
    vit = ViT((3, 8, 8), 10, patch=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)
    reg = L0Regularizer(vit, 0.1, granularity="head")
    close_half(reg, seed=3)
    x = torch.randn(6, 3, 8, 8)
    _, (gated_export, _) = gated_and_shrunk(reg, x)
    fixed = FixedMask.after(reg)
    _fine_tune(fixed, x)
    shrunk = _export_matches(fixed, x).model
    heads = [b.attn.num_heads for b in shrunk.blocks]
    assert heads == [b.attn.num_heads for b in gated_export.blocks] and sum(heads) < 8


def test_fine_tuning_after_channel_norm_pruning_exports_through_its_groups():
    torch.manual_seed(4)
    model = cifar_resnet(8, (3, 16, 16), 10, width=0.5)
    pruner = ChannelNormPruner(model, 0.5, end_step=0)
    x = torch.randn(8, 3, 16, 16)
    pruner.train()
    with torch.no_grad():
        pruner(x)
    pruner.eval()
    before = _n(pruner.prune(shrink=True).model)
    fixed = FixedMask.after(pruner)
    _fine_tune(fixed, x)
    assert _n(_export_matches(fixed, x).model) == before
