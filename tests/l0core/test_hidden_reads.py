"""Gates on layers whose forward is never called: their weights are read by another module
(``nn.MultiheadAttention`` reads ``out_proj.weight``) or through ``F.linear`` / ``F.conv2d``.
A forward hook on such a layer never fires, so its gates must act on the weight itself."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer


class FunctionalReads(nn.Module):
    """Reads its layers' weights through the functional API, never calling their forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1))
        return F.linear(h.mean((2, 3)), self.fc.weight, self.fc.bias)


class CalledAndRead(nn.Module):
    """Calls its layer once and also reads the layer's weight directly."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.fc.weight)


def _site(reg, name):
    for sites, la in ((reg._wsites, reg.weight_log_alpha), (reg._asites, reg.unit_log_alpha)):
        for s in sites:
            if s.name == name:
                return s, la
    raise KeyError(name)


def _set_gates(reg, name, value):
    site, la = _site(reg, name)
    with torch.no_grad():
        la[site.slice] = value


def _open_all(reg):
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.fill_(10.0)


def _cases():
    mha = lambda: nn.MultiheadAttention(8, 2, batch_first=True)  # noqa: E731
    q = torch.randn(2, 3, 8)
    return [
        pytest.param(mha, "out_proj.weight", "output", (q, q, q), id="mha-out_proj-output"),
        pytest.param(mha, "out_proj.weight", "input", (q, q, q), id="mha-out_proj-input"),
        pytest.param(FunctionalReads, "fc.weight", "output", (torch.randn(2, 3, 5, 5),),
                     id="F.linear-output"),
        pytest.param(FunctionalReads, "fc.weight", "input", (torch.randn(2, 3, 5, 5),),
                     id="F.linear-input"),
        pytest.param(CalledAndRead, "fc.weight", "output", (torch.randn(3, 5),),
                     id="called-and-read"),
    ]  # fmt: skip


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(("make", "name", "granularity", "args"), _cases())
def test_closing_a_site_read_outside_its_forward_acts(make, name, granularity, args):
    model = make()
    reg = L0Regularizer(model, 0.0, granularity=granularity)
    _open_all(reg)
    reg.eval()
    with torch.no_grad():
        reg(*args)  # the first forward finds where the weights are really read
        open_out = _first(reg(*args))
        _set_gates(reg, name, -10.0)
        closed_out = _first(reg(*args))
        pruned_out = _first(reg.prune().model(*args))
    assert not torch.allclose(open_out, closed_out)
    torch.testing.assert_close(closed_out, pruned_out, rtol=1e-5, atol=1e-6)
    reg.train()
    torch.manual_seed(1)
    closed_train = _first(reg(*args))  # a closed gate is exactly 0 in training as well
    assert not torch.allclose(closed_train.detach(), open_out, atol=1e-3)


@pytest.mark.parametrize(("make", "name", "granularity", "args"), _cases())
def test_random_gates_on_hidden_reads_equal_the_pruned_model(make, name, granularity, args):
    reg = L0Regularizer(make(), 0.0, granularity=granularity, droprate_init=0.5)
    with torch.no_grad():
        for la in reg.gate_parameters():
            la.normal_(0.0, 3.0)  # about half the gates closed, the rest partly open
    out = _first(reg(*args))  # a training forward: gradients reach the gates of the site
    out.float().pow(2).sum().backward()
    site, la = _site(reg, name)
    assert la.grad[site.slice].abs().sum() > 0
    reg.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _first(reg(*args)), _first(reg.prune().model(*args)), rtol=1e-5, atol=1e-6
        )


def test_per_sample_gates_on_a_hidden_read_fall_back_to_shared_gates_with_a_warning():
    reg = L0Regularizer(FunctionalReads(), 0.0, granularity="output", per_sample=True)
    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"fc\.weight.*not called"):
        reg(x)
    _set_gates(reg, "fc.weight", -10.0)
    reg.eval()
    with torch.no_grad():
        torch.testing.assert_close(reg(x), reg.prune().model(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(reg(x), torch.zeros(4, 4))
    assert reg.summary()[2].applied == "weight"  # fc.weight: on the weight, not a hook
