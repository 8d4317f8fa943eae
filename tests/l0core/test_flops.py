"""Expected multiply-adds follow the cascade of closed units, and match the exported model's
exact cost when the gates are saturated."""

import pytest
import torch
from torch import nn

from l0core import L0Regularizer
from l0core.flops import model_macs
from sweeps.zoo import MobileNetV2, cifar_resnet


def _chain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )  # fmt: skip


def test_a_closed_output_removes_the_next_layers_input_from_expected_flops():
    reg = L0Regularizer(_chain(), 0.1, granularity="output")
    with torch.no_grad():
        reg.weight_log_alpha.fill_(10.0)
        reg.weight_log_alpha[:4] = -10.0  # half of the first conv's channels
    assert reg.unit_log_alpha is None  # the Linear's units are the model's outputs
    reg.eval()
    with torch.no_grad():
        reg(torch.randn(2, 3, 8, 8))
    # conv 0: 64 positions x 4 x 27; conv 2 reads 4 channels: 64 x 16 x 4 x 9 = 36,864; fc: 10,240
    exact = 64 * 4 * 27 + 36_864 + 10_240
    assert reg.export_cost()["macs"] == exact
    assert reg.expected_flops() == pytest.approx(exact, rel=1e-3)
    # What a trial logs as shrunk_flops: the exported model counted as it is, from one example.
    shrunk = reg.prune(shrink=True).model.train()
    assert model_macs(shrunk, torch.randn(1, 3, 8, 8)) == exact and shrunk.training


@pytest.mark.parametrize(
    "build",
    [
        lambda: cifar_resnet(20, (3, 8, 8), 10, width=0.5),
        lambda: MobileNetV2((3, 8, 8), 10, 0.25, 3),
    ],
)
def test_expected_flops_of_saturated_gates_equal_the_exported_models(build):
    torch.manual_seed(0)
    reg = L0Regularizer(build(), 0.1, granularity="output")
    with torch.no_grad():
        la = reg.unit_log_alpha
        la.copy_(torch.where(torch.rand(la.shape) < 0.5, -10.0, 10.0))
    reg.eval()
    with torch.no_grad():
        reg(torch.randn(2, 3, 8, 8))
    cost = reg.export_cost()
    assert reg.expected_flops() == pytest.approx(cost["macs"], rel=2e-3)
    assert cost["params"] == reg.prune(shrink=True).report.params_after
