"""Models torch.fx cannot trace (Python control flow on data): with example inputs the real call
graph of one forward places the coupled gates, and the export still shrinks exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer

from .exact import close_half, gated_and_shrunk


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if x.sum() > 0:  # fx stops here: a Python branch on data
            out = out * 2
        return F.relu(out + x)


class ControlFlowResNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        for block in self.blocks:
            x = block(x)
        if x.mean() > 1e6:  # never taken; the trace would fail at the root as well
            x = x.flip(1)
        return self.fc(x.mean((2, 3)))


def test_without_example_inputs_the_untraceable_model_falls_back_and_says_how_to_fix_it():
    with pytest.warns(UserWarning, match="pass example_inputs"):
        reg = L0Regularizer(ControlFlowResNet(), 0.1, granularity="output")
    assert reg.group_summary() == []


def test_recorded_graph_gives_coupled_groups_and_an_exact_export():
    x = torch.randn(4, 3, 8, 8)
    reg = L0Regularizer(ControlFlowResNet(), 0.1, granularity="output", example_inputs=(x,))
    groups = {g["group"]: g for g in reg.group_summary()}
    stream = next(g for g in groups.values() if "bn.weight[norm]" in g["members"])
    assert {"blocks.0.bn2.weight[norm]", "blocks.1.bn2.weight[norm]"} <= set(stream["members"])
    assert len(groups) == 3  # the stream and the two block interiors
    assert reg.check_export() == []
    close_half(reg, seed=0, open_low=4.0)
    gated, (small, report) = gated_and_shrunk(reg, x)
    with torch.no_grad():
        assert (small(x) - gated).abs().max() <= 1e-5 * gated.abs().max()
    assert report.params_after < report.params_before
    x.requires_grad_(False)
    reg.zero_grad()
    F.cross_entropy(reg(x), torch.randint(0, 5, (4,))).backward()
    assert reg.unit_log_alpha.grad is not None


def test_recording_leaves_the_model_and_the_random_state_alone():
    from l0core.record import record_graph

    model = ControlFlowResNet()
    model.blocks[0].conv1.register_forward_hook(lambda m, i, o: F.dropout(o))  # draws noise
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    state = torch.random.get_rng_state()
    graph = record_graph(model, ((x,), {}))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert called[:3] == ["conv", "bn", "blocks.0.conv1"]


def _signature(graph) -> list:
    """Per unit: the tensor slices it ties and whether it is free (plain data to compare)."""
    units: dict[int, set] = {}
    for inc in graph.incidences:
        for i in inc.ids.tolist():
            r = graph.find(i)
            units.setdefault(r, set()).add((inc.module, inc.attr, inc.role, r in graph.fixed))
    return sorted(tuple(sorted(u)) for u in units.values())


@pytest.mark.parametrize("family", ["vit", "googlenet", "mobilenet_v2"])
def test_recorded_graph_ties_the_same_channels_as_the_fx_trace(family):
    from l0core.record import record_graph
    from l0core.trace import _Walker, trace_channels
    from sweeps.zoo import GoogLeNet, MobileNetV2, ViT

    shape = (3, 16, 16)
    model = {
        "vit": lambda: ViT(shape, 10, patch=4, dim=32, depth=2, heads=4),
        "googlenet": lambda: GoogLeNet(shape, 10, width=0.0625, blocks=2),
        "mobilenet_v2": lambda: MobileNetV2(shape, 10, width=0.25, stages=3),
    }[family]()
    traced = trace_channels(model, heads=True)
    recorded = _Walker(record_graph(model, ((torch.randn(2, *shape),), {})), True, model).run()
    assert _signature(recorded) == _signature(traced)
