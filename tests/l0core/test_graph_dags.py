"""Randomly generated DAGs of convolutions, BatchNorms, GroupNorms, adds and concatenations: for
any gate state, the shrunk model computes what the gated one does."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from l0core import L0Regularizer

from .exact import close_half, gated_and_shrunk


class Dag(nn.Module):
    """Node 0 is the stem; node i applies ``spec[i-1]`` to earlier nodes:
    ``("conv", a, width, norm)`` (norm: ``None``, ``"bn"`` or ``"gn"``), ``("dw", a)``,
    ``("add", a, b)`` (same width) or ``("cat", a, b)``;
    the head pools the last node."""

    def __init__(self, spec: list[tuple], stem: int) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.layers = nn.ModuleDict()
        widths = [stem]
        for i, op in enumerate(spec):
            if op[0] == "conv":
                _, a, w, norm = op
                seq = [nn.Conv2d(widths[a], w, 3, padding=1, bias=norm is None)]
                if norm == "bn":
                    seq.append(nn.BatchNorm2d(w))
                elif norm == "gn":  # a group closes whole
                    seq.append(nn.GroupNorm(2 if w % 2 == 0 else 1, w))
                self.layers[str(i)] = nn.Sequential(*seq, nn.ReLU())
                widths.append(w)
            elif op[0] == "dw":
                c = widths[op[1]]
                self.layers[str(i)] = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
                )
                widths.append(c)
            elif op[0] == "add":
                widths.append(widths[op[1]])
            else:
                widths.append(widths[op[1]] + widths[op[2]])
        self.fc = nn.Linear(widths[-1], 4)

    def forward(self, x):
        vals = [self.stem(x)]
        for i, op in enumerate(self.spec):
            if op[0] in ("conv", "dw"):
                vals.append(self.layers[str(i)](vals[op[1]]))
            elif op[0] == "add":
                vals.append(vals[op[1]] + vals[op[2]])
            else:
                vals.append(torch.cat([vals[op[1]], vals[op[2]]], 1))
        return self.fc(vals[-1].mean((2, 3)))


@st.composite
def dags(draw):
    widths = [draw(st.integers(2, 6))]
    spec = []
    for _ in range(draw(st.integers(1, 7))):
        n = len(widths)
        kind = draw(st.sampled_from(["conv", "conv", "dw", "add", "cat"]))
        a = draw(st.integers(0, n - 1))
        same = [b for b in range(n) if widths[b] == widths[a]]
        if kind == "add" and len(same) > 1:
            b = draw(st.sampled_from(same))
            spec.append(("add", a, b))
            widths.append(widths[a])
        elif kind == "cat":
            b = draw(st.integers(0, n - 1))
            spec.append(("cat", a, b))
            widths.append(widths[a] + widths[b])
        elif kind == "dw":
            spec.append(("dw", a))
            widths.append(widths[a])
        else:
            w = draw(st.integers(2, 6))
            spec.append(("conv", a, w, draw(st.sampled_from([None, "bn", "gn"]))))
            widths.append(w)
    return spec, widths[0], draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_shrunk_dag_equals_the_gated_dag(case):
    spec, stem, seed = case
    torch.manual_seed(seed)
    model = Dag(spec, stem)
    reg = L0Regularizer(model, 0.1, granularity="output")
    assert reg.check_export() == []
    if reg.unit_log_alpha is None:
        return  # nothing to gate (every channel reaches the head unchanged... or is fixed)
    close_half(reg, seed, open_low=4.0)
    x = torch.randn(4, 3, 6, 6)
    gated, (small, report) = gated_and_shrunk(reg, x)
    with torch.no_grad():
        out = small(x)
    assert (out - gated).abs().max() <= 1e-5 * max(1.0, float(gated.abs().max()))
    assert report.params_after <= report.params_before
