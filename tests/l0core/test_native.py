"""``l0core.native``: the fused CPU gate kernels compute what the eager code computes, from the
same noise, on any number of threads, without side effects on the process; where they cannot be
built the eager code runs and the reason is logged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from l0core import L0Regularizer, native
from l0core.functional import (
    HardConcrete,
    _gate_grad_,
    draw_gates,
    draw_gates_and_prob,
    prob_nonzero,
    sample_gates,
)
from l0core.masking import masked_weights

HC = HardConcrete()

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None or not sys.platform.startswith("linux"),
    reason="no C compiler: the kernels are not built here",
)


def _both(fn, seed: int):
    """``fn()`` with the kernels and with the eager code, from the same generator state."""
    torch.manual_seed(seed)
    fused = fn()
    torch.manual_seed(seed)
    with native.disabled():
        eager = fn()
    return fused, eager


def test_the_kernels_are_built_on_this_machine() -> None:
    assert native.status() == "native"


@pytest.mark.parametrize("rows", [None, 3])
def test_drawn_gates_equal_the_eager_draw_on_the_same_noise(rows) -> None:
    la = torch.randn(50_001) * 4  # odd: the last 64-bit output gives one half
    if rows is None:
        fused, eager = _both(lambda: draw_gates(la, HC), 7)
    else:  # per-sample gates: the noise runs on across rows like one flat draw
        fused, eager = _both(lambda: sample_gates(la, HC, batch_size=rows).detach(), 7)
    assert fused.shape == eager.shape
    assert float((fused - eager).abs().max()) < 2e-6
    assert torch.equal(fused == 0, eager == 0) and torch.equal(fused == 1, eager == 1)
    assert 0.05 < float((fused == 0).float().mean()) < 0.95  # both clamps are exercised
    assert not torch.equal(fused, draw_gates(la, HC))  # and the generator moved on


def test_the_penalty_probabilities_come_with_the_draw() -> None:
    """``draw_gates_and_prob``: the same gates as ``draw_gates`` on the same seed, and
    ``P(z != 0)`` of each logit from the same pass."""
    la = torch.randn(20_000) * 5
    torch.manual_seed(2)
    z, p = draw_gates_and_prob(la, HC)
    torch.manual_seed(2)
    assert torch.equal(z, draw_gates(la, HC))
    assert torch.allclose(p, prob_nonzero(la, HC), atol=1e-6, rtol=1e-5)


def test_per_sample_gates_of_a_batch_of_one_keep_their_batch_dim() -> None:
    la = torch.randn(5_000, requires_grad=True)
    fused, eager = _both(lambda: sample_gates(la, HC, batch_size=1), 4)
    assert fused.shape == eager.shape == (1, 5_000)
    fused.sum().backward()
    assert la.grad.shape == (5_000,)


def test_the_gates_do_not_depend_on_the_number_of_threads() -> None:
    la = torch.randn(300_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        one = draw_gates(la, HC)
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(3)
        many = draw_gates(la, HC)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_masked_weight_gradients_equal_the_eager_backward() -> None:
    w1 = torch.randn(300, 40, requires_grad=True)
    w2 = torch.randn(20, 30, requires_grad=True)
    la = torch.randn(12_600, requires_grad=True)
    layout = ((0, 12_000, (300, 40), ()), (12_000, 600, (20, 30), ()))
    coefs = (torch.randn(300, 40), torch.randn(20, 30))

    def grads():
        outs = masked_weights(la, HC, [w1, w2], layout)
        sum((o * c).sum() for o, c in zip(outs, coefs, strict=True)).backward()
        got = [t.grad.clone() for t in (la, w1, w2)]
        for t in (la, w1, w2):
            t.grad = None
        return got

    fused, eager = _both(grads, 11)
    for a, b in zip(fused, eager, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert (fused[0] != 0).any() and (fused[0] == 0).any()  # gates inside and at the clamps


def test_a_weight_without_gradient_gets_none_and_the_gates_still_learn() -> None:
    w = torch.randn(100, 100)  # a frozen weight
    la = torch.randn(10_000, requires_grad=True)
    (out,) = masked_weights(la, HC, [w], ((0, 10_000, (100, 100), ()),))
    out.sum().backward()
    assert la.grad is not None and (la.grad != 0).any()


def test_gate_gradient_equals_the_eager_formula() -> None:
    torch.manual_seed(0)
    z = draw_gates(torch.randn(40_000) * 3, HC)
    grad = torch.randn(40_000)
    fused = _gate_grad_(grad.clone(), z, HC)
    with native.disabled():
        eager = _gate_grad_(grad.clone(), z, HC)
    assert torch.allclose(fused, eager, atol=1e-6)
    assert torch.equal(fused == 0, eager == 0)


def test_a_weight_gated_model_trains_the_same_with_either_implementation() -> None:
    """A few Adam steps of a weight-gated MLP: losses and logits agree to float32 rounding."""

    def train():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
        )
        reg = L0Regularizer(net, 1e-3)
        opt = torch.optim.Adam(reg.parameters(), lr=1e-2)
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(reg(x), y) + reg.regularization()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return torch.tensor(losses), reg.weight_log_alpha.detach().clone()

    (loss_f, la_f), (loss_e, la_e) = _both(train, 0)
    assert torch.allclose(loss_f, loss_e, rtol=1e-4)
    assert torch.allclose(la_f, la_e, atol=1e-4)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def test_loading_the_kernels_leaves_denormals_alone() -> None:
    """Linked with ``-ffast-math``, gcc would add ``crtfastmath.o``, whose constructor turns on
    flush-to-zero for the whole process: every torch op after the first weight-gated step would
    round subnormal floats to zero."""
    code = (
        "import torch\nfrom l0core import native\n"
        "tiny = lambda: float(torch.tensor([1e-38]) / 100)\n"
        "before = tiny()\nassert native.status() == 'native', native.status()\n"
        "print(before, tiny())"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    before, after = map(float, done.stdout.split())
    assert before > 0 and after == before


def test_without_a_compiler_the_eager_code_runs_and_says_why(tmp_path) -> None:
    code = (
        "import logging, torch\nlogging.basicConfig()\nfrom l0core import native\n"
        "from l0core.functional import HardConcrete, draw_gates\n"
        "torch.manual_seed(0)\nz = draw_gates(torch.randn(10_000), HardConcrete())\n"
        "print(native.status())"
    )
    done = _run(code, CC=str(tmp_path / "no-such-cc"), L0CORE_CACHE_DIR=str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("eager (could not be built")
    assert "fused CPU gate kernels could not be built" in done.stderr
    assert "weight gates run as eager torch ops" in done.stderr
    off = _run("from l0core import native\nprint(native.status())", L0CORE_NATIVE="0")
    assert off.stdout.strip() == "eager (turned off by L0CORE_NATIVE)"


def test_the_library_is_built_once_into_the_cache(tmp_path) -> None:
    code = "from l0core import native\nprint(native.status())"
    for _ in range(2):
        done = _run(code, L0CORE_CACHE_DIR=str(tmp_path))
        assert done.stdout.strip() == "native", done.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
