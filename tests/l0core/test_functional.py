"""The hard-concrete math: closed forms against Monte Carlo, hand-written gradients against autograd."""

import math

import pytest
import torch

from l0core.functional import (
    HardConcrete,
    eval_gate,
    expected_count,
    log_alpha_from_droprate,
    prob_nonzero,
    sample_gates,
    splitmix64,
    uniform_noise,
)
from l0core.masking import masked_weights

HC = HardConcrete()


def _reference_gates(u, log_alpha, hc=HC):
    """The authors' formula written out with autograd ops."""
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / hc.temperature)
    return torch.clamp(s * (hc.limit_b - hc.limit_a) + hc.limit_a, 0, 1)


def test_sampled_prob_nonzero_matches_closed_form():
    torch.manual_seed(0)
    la = torch.linspace(-4, 4, 9)
    z = sample_gates(la, HC, batch_size=40_000)
    empirical = (z != 0).float().mean(0)
    assert torch.allclose(empirical, prob_nonzero(la, HC), atol=0.01)
    # and the probability of an exact 1 is the mirror image: P(z = 1) = sigmoid(beta*log((1-gamma)/(zeta-1)) - ...)
    assert ((z == 1).float().mean(0)[-1] > 0.5) and ((z == 0).float().mean(0)[0] > 0.5)


def test_droprate_is_not_probability_of_zero():
    la = torch.tensor(log_alpha_from_droprate(0.5))
    assert la.item() == 0.0
    assert prob_nonzero(la, HC).item() == pytest.approx(0.83, abs=0.01)


def test_eval_gate_mean_is_paper_eq13():
    la = torch.linspace(-6, 6, 25)
    expected = torch.clamp(torch.sigmoid(la) * 1.2 - 0.1, 0, 1)
    assert torch.allclose(eval_gate(la, HC, "mean"), expected)
    # exactly zero below sigmoid(la) = 1/12, exactly one above 11/12
    assert (eval_gate(torch.tensor([-2.5]), HC) == 0).all()
    assert (eval_gate(torch.tensor([2.5]), HC) == 1).all()


def test_eval_gate_median_is_the_sample_median():
    torch.manual_seed(1)
    la = torch.tensor([-1.5, -0.3, 0.4, 1.2])
    z = sample_gates(la, HC, batch_size=50_001)
    assert torch.allclose(z.median(0).values, eval_gate(la, HC, "median"), atol=0.01)
    s = torch.sigmoid(la / HC.temperature)
    assert torch.allclose(eval_gate(la, HC, "median"), (s * 1.2 - 0.1).clamp(0, 1))


def test_bad_constants_and_rules_are_rejected():
    with pytest.raises(ValueError, match="limit_a"):
        HardConcrete(limit_a=0.1)
    with pytest.raises(ValueError, match="temperature"):
        HardConcrete(temperature=0)
    with pytest.raises(ValueError, match="test_gate"):
        eval_gate(torch.zeros(2), HC, "mode")
    with pytest.raises(ValueError, match=r"droprate_init must be in \(0, 1\), got 1.5"):
        log_alpha_from_droprate(1.5)


def _our_gradient(la: torch.Tensor, seed: int, batch_size: int | None):
    """Gates sampled from ``la`` at ``seed``, random weights ``w`` and the hand-written gradient
    of ``(z * w).sum()``; the generator is left at ``seed`` again, for the reference's noise."""
    torch.manual_seed(seed)
    z = sample_gates(la, HC, batch_size=batch_size)
    w = torch.randn_like(z)
    (z * w).sum().backward()
    ours = la.grad.clone()
    la.grad = None
    torch.manual_seed(seed)
    return z, w, ours


@pytest.mark.parametrize("batch_size", [None, 7])
def test_sample_gradient_matches_autograd_reference(batch_size):
    la = torch.randn(50, dtype=torch.float64, requires_grad=True)
    z, w, ours = _our_gradient(la, 3, batch_size)
    shape = la.shape if batch_size is None else (batch_size, *la.shape)
    u = torch.empty(shape, dtype=la.dtype).uniform_(HC.epsilon, 1 - HC.epsilon)
    ref = _reference_gates(u, la)
    assert torch.allclose(ref, z.detach())
    (ref * w).sum().backward()
    assert torch.allclose(ours, la.grad, atol=1e-10)
    assert (ours != 0).any()


@pytest.mark.parametrize("batch_size", [None, 7])
def test_float32_gates_and_gradient_match_the_reference_on_the_same_noise(batch_size):
    """float32 on CPU draws its noise through ``uniform_noise`` (not ``uniform_``): the gates and
    the hand-written backward equal the authors' formula with autograd on that noise."""
    la = torch.randn(4099, requires_grad=True)  # above uniform_noise's small-size cut
    z, w, ours = _our_gradient(la, 5, batch_size)
    shape = la.shape if batch_size is None else (batch_size, *la.shape)
    ref = _reference_gates(uniform_noise(shape, HC, torch.float32, "cpu").double(), la.double())
    assert torch.allclose(ref.float(), z.detach(), atol=1e-5)
    (ref * w.double()).sum().backward()
    assert torch.allclose(ours, la.grad, atol=1e-4, rtol=1e-4)
    assert ((z > 0) & (z < 1)).any() and (ours != 0).any()


def test_uniform_noise_is_uniform_in_the_interval_and_follows_the_seed():
    """The float32 noise lies in ``[eps, 1 - eps]``, is uniform (also near the ends, where
    ``logit`` makes the gates' tails), its values are not correlated, and ``torch.manual_seed``
    reproduces it."""
    eps = HC.epsilon
    torch.manual_seed(0)
    u = uniform_noise((400_001,), HC, torch.float32, "cpu")
    torch.manual_seed(0)
    assert torch.equal(u, uniform_noise((400_001,), HC, torch.float32, "cpu"))
    assert not torch.equal(u, uniform_noise((400_001,), HC, torch.float32, "cpu"))
    assert eps * (1 - 1e-6) <= float(u.min()) and float(u.max()) <= 1 - eps
    # Kolmogorov-Smirnov distance to U(0, 1): 1.63 / sqrt(n) is its 1% critical value
    srt = u.double().sort().values
    grid = torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()
    assert float((srt - grid).abs().max()) < 1.63 / math.sqrt(u.numel())
    # the tails: P(u < q) = q for q = 1e-3 (about 400 values, 4 standard deviations = 80)
    assert abs(int((u < 1e-3).sum()) - 400) < 80 and abs(int((u > 1 - 1e-3).sum()) - 400) < 80
    # the two halves of one 64-bit output, and neighbouring outputs, are not correlated
    c = u.double() - 0.5
    for a, b in ((c[:-1:2], c[1::2]), (c[:-2:2], c[2::2])):
        assert abs(float((a * b).mean() / (a.std() * b.std()))) < 0.01


def test_splitmix64_equals_the_reference_generator():
    """Element ``i`` is splitmix64's output for state ``key + (i + 1) * golden`` (the
    reference algorithm in Python integers), whatever the sign of the 64-bit values."""
    mask = (1 << 64) - 1

    def reference(state: int) -> int:
        z = state & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for key in (0, 12345, (1 << 63) - 1):
        out = splitmix64(key, 1000)
        for i in (0, 1, 2, 511, 999):
            assert int(out[i]) & mask == reference(key + (i + 1) * 0x9E3779B97F4A7C15)


def test_float64_noise_uses_uniform():
    f64 = uniform_noise((5,), HC, torch.float64, "cpu")
    assert f64.dtype == torch.float64 and bool(((f64 > 0) & (f64 < 1)).all())


def test_masked_weights_gradients_match_autograd_reference():
    torch.manual_seed(0)
    w1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)  # one gate per element
    w2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)  # row gates ...
    b2 = torch.randn(5, dtype=torch.float64, requires_grad=True)  # ... shared with the bias
    la = torch.randn(24 + 5, dtype=torch.float64, requires_grad=True)
    layout = ((0, 24, (6, 4), ()), (24, 5, (5, 1), (1,)), (24, 5, (5,), ()))
    torch.manual_seed(9)
    outs = masked_weights(la, HC, [w1, w2, b2], layout)
    coefs = [torch.randn_like(o) for o in outs]
    sum((o * c).sum() for o, c in zip(outs, coefs, strict=True)).backward()
    ours = [t.grad.clone() for t in (la, w1, w2, b2)]
    for t in (la, w1, w2, b2):
        t.grad = None
    torch.manual_seed(9)
    u = torch.empty(29, dtype=la.dtype).uniform_(HC.epsilon, 1 - HC.epsilon)
    z = _reference_gates(u, la)
    ref = [w1 * z[:24].view(6, 4), w2 * z[24:].view(5, 1), b2 * z[24:]]
    sum((o * c).sum() for o, c in zip(ref, coefs, strict=True)).backward()
    for a, t in zip(ours, (la, w1, w2, b2), strict=True):
        assert torch.allclose(a, t.grad, atol=1e-10)


def test_expected_count_value_and_gradient():
    la = torch.randn(30, dtype=torch.float64, requires_grad=True)
    sizes = torch.arange(1, 31, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: expected_count(x, HC, sizes), (la,))
    torch.autograd.gradcheck(lambda x: expected_count(x, HC), (la,))
    value = expected_count(la, HC, sizes).detach()
    assert value.item() == pytest.approx(float((prob_nonzero(la, HC) * sizes).sum().detach()))


def test_l0_shift_constant():
    assert HC.l0_shift == pytest.approx((2 / 3) * math.log(0.1 / 1.1))
