"""Every sparsity method implements ``l0core.SparsityMethod``: the protocol's members with the
protocol's signatures, typed summary rows, one ``expected_flops``, and ``prune`` returning the
model with its report."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from torch import nn

from l0core import (
    ChannelNormPruner,
    Dense,
    FixedMask,
    L0Regularizer,
    L1Regularizer,
    MagnitudePruner,
    Pruned,
    SparsityMethod,
    SummaryRow,
)

from .models import mlp

pytestmark = pytest.mark.fast

METHODS = {
    "l0-weight": lambda m: L0Regularizer(m, 0.1),
    "l0-output": lambda m: L0Regularizer(m, 0.1, granularity="output"),
    "l1": lambda m: L1Regularizer(m, 0.1),
    "magnitude": lambda m: MagnitudePruner(m, 0.5, end_step=4),
    "channel-norm": lambda m: ChannelNormPruner(m, 0.5, end_step=4),
    "fixed-mask": lambda m: FixedMask(m),
    "dense": Dense,
}
SIZES = (12, 16, 8, 3)


def _method(kind: str) -> SparsityMethod:
    torch.manual_seed(0)
    return METHODS[kind](mlp(SIZES))


def _protocol_methods() -> list[str]:
    """The protocol's own callables (torch.nn.Module's, which every method inherits, aside)."""
    return [
        name
        for name, value in vars(SparsityMethod).items()
        if callable(value) and not name.startswith("_") and not hasattr(nn.Module, name)
    ]


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # self aside
    return [(p.name, p.kind, p.default) for p in params]


def test_the_protocol_names_what_the_sweep_asks():
    assert set(_protocol_methods()) == {
        "regularization", "weight_parameters", "gate_parameters", "count_l0",
        "expected_density", "sparsity", "summary", "expected_flops", "export_cost", "prune",
    }  # fmt: skip


@pytest.mark.parametrize("kind", METHODS)
def test_every_method_implements_the_protocol_with_its_signatures(kind):
    method = _method(kind)
    assert isinstance(method, SparsityMethod)
    assert isinstance(method.module, nn.Module) and isinstance(method.n_gated, int)
    cls = type(method)
    for name in _protocol_methods():
        want, got = getattr(SparsityMethod, name), getattr(cls, name)
        assert _parameters(got) == _parameters(want), f"{cls.__name__}.{name}"
        hints = typing.get_type_hints(got).get("return")
        assert hints == typing.get_type_hints(want)["return"], f"{cls.__name__}.{name}"
    for name in ("group_plan", "example_rows"):
        assert isinstance(inspect.getattr_static(method, name), property), name


@pytest.mark.parametrize("kind", METHODS)
def test_summary_rows_are_typed_one_per_parameter_of_the_plain_model(kind):
    method = _method(kind)
    method(torch.randn(4, SIZES[0]))
    rows = method.summary()
    assert all(type(row) is SummaryRow for row in rows)
    plain = method.prune().model
    assert [(r.name, r.shape) for r in rows] == [
        (n, tuple(p.shape)) for n, p in plain.named_parameters()
    ]
    assert all(r.numel == torch.Size(r.shape).numel() for r in rows)
    gated = [r for r in rows if r.gated]
    assert (gated == []) == (kind == "dense")
    assert all(r.granularity is not None and r.applied is not None for r in gated)


@pytest.mark.parametrize("kind", METHODS)
def test_prune_returns_the_plain_model_and_the_report_of_its_shrinking(kind):
    method = _method(kind)
    x = torch.randn(4, SIZES[0])
    method(x)
    method.eval()
    plain = method.prune()
    assert isinstance(plain, Pruned) and plain.report is None
    assert not plain.model.training and not any(
        type(m).__module__.startswith("l0core") for m in plain.model.modules()
    )
    shrunk, report = method.prune(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), plain.model(x), rtol=1e-5, atol=1e-5)
    if kind == "dense":
        assert report is None  # nothing to remove
    else:
        assert report.params_after == sum(p.numel() for p in shrunk.parameters())


@pytest.mark.parametrize("kind", METHODS)
def test_expected_flops_has_one_signature_and_an_example_does_not_step_a_schedule(kind):
    method = _method(kind)
    x = torch.randn(2, SIZES[0])
    method.train()
    steps = getattr(method, "steps", None)
    flops = method.expected_flops(x)
    assert method.training and getattr(method, "steps", None) == steps
    assert flops == method.expected_flops()  # the shapes the example recorded
    dense = 12 * 16 + 16 * 8 + 8 * 3
    assert 0 < flops <= dense
    if kind in ("dense", "fixed-mask", "magnitude", "channel-norm"):  # nothing closed yet
        assert flops == dense


def test_expected_flops_needs_a_forward_or_an_example():
    with pytest.raises(RuntimeError, match="needs one forward first"):
        Dense(mlp(SIZES)).expected_flops()
