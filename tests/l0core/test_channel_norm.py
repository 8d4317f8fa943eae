"""Channel-norm pruning (Li et al. 2017) on l0core's coupled groups: on a real residual network
the lowest-norm units close, the export equals the masked model and is smaller, and the
schedule, counts and checkpoints behave like magnitude pruning's."""

from __future__ import annotations

import itertools

import pytest
import torch

from l0core.channel_norm import ChannelNormPruner, unit_filter_norms
from l0core.flops import layer_macs, record_shapes
from sweeps.zoo import GoogLeNet, MobileNetV2, ViT, cifar_resnet

SHAPE = (3, 16, 16)


def _warm(method: torch.nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    method.train()
    with torch.no_grad():  # BatchNorm statistics with the masks in place
        for _ in range(steps):
            method(x)


def test_one_shot_closes_the_lowest_norm_units_and_exports_the_same_smaller_model():
    torch.manual_seed(0)
    model = cifar_resnet(20, SHAPE, 10, width=0.5)
    dense = sum(p.numel() for p in model.parameters())
    pruner = ChannelNormPruner(model, 0.5, end_step=0)
    norms = unit_filter_norms(pruner.plan)
    x = torch.randn(16, *SHAPE)
    _warm(pruner, x)
    closed = pruner.closed
    assert 0 < int(closed.sum()) < pruner.plan.n_gates
    for g in pruner.plan.groups:  # in each group, no open unit has a lower norm than a closed one
        sl = slice(g.offset, g.offset + len(g.roots))
        assert not closed[sl].all()
    assert float(norms[closed].median()) < float(norms[~closed].median())
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.05)

    pruner.eval()
    with torch.no_grad():
        want = pruner(x)
        shrunk, report = pruner.prune(shrink=True)
        got = shrunk(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert sum(p.numel() for p in shrunk.parameters()) < 0.7 * dense
    assert report.params_before == dense and report.params_after < dense
    plain = pruner.prune().model
    torch.testing.assert_close(plain(x), want)
    # the FLOPs are the exported model's: a closed unit also removes the next layers' inputs
    assert pruner.expected_flops() == pytest.approx(_macs(shrunk, x))
    assert pruner.expected_flops() < 0.8 * _macs(cifar_resnet(20, SHAPE, 10, width=0.5), x)


def _macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.no_grad(), record_shapes(model, shapes):
        model.eval()(x[:1])
    modules = dict(model.named_modules())
    return sum(layer_macs(modules[n], s, modules[n].weight.numel()) for n, s in shapes.items())


def test_gradual_schedule_only_closes_more_and_closed_units_get_no_gradient():
    torch.manual_seed(1)
    pruner = ChannelNormPruner(cifar_resnet(8, SHAPE, 10, width=0.5), 0.6, end_step=6,
                               begin_step=2, frequency=2)  # fmt: skip
    opt = torch.optim.SGD(pruner.parameters(), lr=0.1)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    seen = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(pruner(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append((pruner.closed.clone(), pruner.sparsity()))
    assert seen[0][1] == 0.0 and seen[-1][1] == pytest.approx(0.6, abs=0.06)
    for (a, _), (b, _) in itertools.pairwise(seen):
        assert bool((b | ~a).all())  # closed stays closed
    sparsities = [s for _, s in seen]
    assert sparsities == sorted(sparsities) and len(set(sparsities)) >= 3
    for m in pruner.plan.masks:  # closed entries are zero and get no gradient
        mask = getattr(m.module, f"{m.attr}_mask")
        assert float((getattr(m.module, m.attr).detach() * (1 - mask)).abs().sum()) == 0.0


def test_state_dict_round_trip_keeps_the_closed_units_and_the_step():
    torch.manual_seed(2)
    a = ChannelNormPruner(cifar_resnet(8, SHAPE, 10, width=0.5), 0.4, end_step=3)
    x = torch.randn(4, *SHAPE)
    _warm(a, x, steps=4)
    b = ChannelNormPruner(cifar_resnet(8, SHAPE, 10, width=0.5), 0.4, end_step=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.closed, b.closed) and b.steps == 4
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_depthwise_and_concatenating_networks_prune_and_export():
    torch.manual_seed(4)
    for model in (MobileNetV2((3, 8, 8), 10, width=0.25, stages=3),
                  GoogLeNet((3, 8, 8), 10, width=0.125, blocks=2)):  # fmt: skip
        dense = sum(p.numel() for p in model.parameters())
        pruner = ChannelNormPruner(model, 0.5, end_step=0)
        x = torch.randn(4, 3, 8, 8)
        _warm(pruner, x, steps=2)
        pruner.eval()
        with torch.no_grad():
            want = pruner(x)
            shrunk = pruner.prune(shrink=True).model
            torch.testing.assert_close(
                shrunk(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())
            )
        assert sum(p.numel() for p in shrunk.parameters()) < dense


def test_heads_of_a_vit_prune_and_export():
    torch.manual_seed(3)
    vit = ViT((3, 8, 8), 10, patch=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)
    pruner = ChannelNormPruner(vit, 0.5, end_step=0, granularity="head")
    x = torch.randn(4, 3, 8, 8)
    _warm(pruner, x, steps=1)
    pruner.eval()
    with torch.no_grad():
        want = pruner(x)
        shrunk = pruner.prune(shrink=True).model
    assert sum(b.attn.num_heads for b in shrunk.blocks) < 8
    torch.testing.assert_close(shrunk(x), want, rtol=1e-5, atol=1e-5)


def test_bad_values_and_models_without_units_are_errors():
    with pytest.raises(ValueError, match=r"target_sparsity must be a number in \(0, 1\), got 1.5"):
        ChannelNormPruner(cifar_resnet(8, SHAPE, 10), 1.5, end_step=1)
    with pytest.raises(ValueError, match="end_step must be an integer >= 3"):
        ChannelNormPruner(cifar_resnet(8, SHAPE, 10), 0.5, end_step=1, begin_step=3)
    with pytest.raises(ValueError, match="found no unit to remove at granularity 'head'"):
        ChannelNormPruner(cifar_resnet(8, SHAPE, 10), 0.5, end_step=1, granularity="head")
