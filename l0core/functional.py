"""The hard-concrete distribution as pure functions.

Louizos, Welling & Kingma (2017), "Learning Sparse Neural Networks through L0 Regularization",
https://arxiv.org/abs/1712.01312. A gate ``z`` is a concrete (relaxed Bernoulli) variable ``s``
stretched to the interval ``(gamma, zeta)`` and clamped to ``[0, 1]``, so it is exactly 0 or
exactly 1 with non-zero probability while staying differentiable in its location ``log_alpha``:

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)
    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))          (the L0 penalty, Eq. 12)

``beta`` is the temperature, ``gamma = limit_a < 0`` and ``zeta = limit_b > 1`` the stretch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

__all__ = [
    "HardConcrete",
    "draw_gates",
    "draw_gates_and_prob",
    "eval_gate",
    "eval_zero_logit",
    "expected_count",
    "log_alpha_from_droprate",
    "prob_nonzero",
    "sample_gates",
    "splitmix64",
    "uniform_noise",
]

LOG_ALPHA_BOUND = 10.0
"""Gate logits are kept in [-10, 10]: P(z != 0) is then within 2e-4 of 0 or 1, and every
quantity derived from them stays finite in half precision."""

_FEW = 4096
"""Below this many gates, per-op overhead outweighs per-element work: one ``uniform_`` instead
of the hash of :func:`uniform_noise`, native autograd ops instead of Python Functions."""


@dataclass(frozen=True)
class HardConcrete:
    """The constants of the hard-concrete distribution (the authors' defaults)."""

    temperature: float = 2.0 / 3.0
    limit_a: float = -0.1
    limit_b: float = 1.1
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not self.limit_a < 0:
            raise ValueError(f"limit_a must be < 0 (the stretch below 0), got {self.limit_a!r}")
        if not self.limit_b > 1:
            raise ValueError(f"limit_b must be > 1 (the stretch above 1), got {self.limit_b!r}")
        if not 0 < self.epsilon < 0.5:
            raise ValueError(f"epsilon must be in (0, 0.5), got {self.epsilon!r}")

    @property
    def span(self) -> float:
        """``zeta - gamma``, the length of the stretched interval."""
        return self.limit_b - self.limit_a

    @property
    def slope(self) -> float:
        """``1 / ((zeta - gamma) beta)``: inside (0, 1), ``dz/dlog_alpha = (z - gamma)(zeta - z)``
        times this."""
        return 1.0 / (self.span * self.temperature)

    @property
    def l0_shift(self) -> float:
        """``beta * log(-gamma / zeta)``: ``P(z != 0) = sigmoid(log_alpha - l0_shift)``."""
        return self.temperature * math.log(-self.limit_a / self.limit_b)


def log_alpha_from_droprate(droprate: float) -> float:
    """The authors' initial gate logit ``log(1 - p) - log(p)`` for ``droprate_init = p``.

    Note that ``p`` is *not* ``P(z = 0)``: with the default constants, ``p = 0.5`` gives
    ``log_alpha = 0`` and ``P(z != 0) = sigmoid(-beta * log(-gamma / zeta)) ~ 0.83``.
    """
    if not 0 < droprate < 1:
        raise ValueError(f"droprate_init must be in (0, 1), got {droprate!r}")
    return math.log(1 - droprate) - math.log(droprate)


def prob_nonzero(log_alpha: Tensor, hc: HardConcrete) -> Tensor:
    """``P(z != 0)`` for each gate, the differentiable L0 count (paper Eq. 12)."""
    return torch.sigmoid(log_alpha - hc.l0_shift)


_SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.default


class _ExpectedCount(torch.autograd.Function):
    """``sum(P(z != 0) * group_sizes)`` with one buffer forward and one backward."""

    @staticmethod
    def forward(
        ctx, log_alpha: Tensor, shift: float, group_sizes: Tensor | None, p: Tensor | None
    ) -> Tensor:
        if p is None:
            p = torch.sub(log_alpha, shift).sigmoid_()
        ctx.save_for_backward(p, group_sizes)
        return p.sum() if group_sizes is None else torch.dot(p, group_sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        p, group_sizes = ctx.saved_tensors
        g = _SIGMOID_BACKWARD(grad.expand_as(p), p)  # grad * p * (1 - p), one pass
        return (g if group_sizes is None else g.mul_(group_sizes)), None, None, None


def expected_count(
    log_alpha: Tensor,
    hc: HardConcrete,
    group_sizes: Tensor | None = None,
    prob: Tensor | None = None,
) -> Tensor:
    """``sum_g P(z_g != 0) * group_sizes[g]`` (all ones if ``None``): the expected L0 norm.

    ``prob``: ``prob_nonzero(log_alpha, hc)`` computed before (no gradient; see
    :func:`draw_gates_and_prob`), to use instead of computing it again; differentiable with
    respect to ``log_alpha`` all the same.
    """
    if log_alpha.numel() < _FEW:  # native autograd: cheaper than a Python Function when small
        p = prob_nonzero(log_alpha, hc)
        return p.sum() if group_sizes is None else torch.dot(p, group_sizes)
    return _ExpectedCount.apply(log_alpha, hc.l0_shift, group_sizes, prob)


def eval_gate(log_alpha: Tensor, hc: HardConcrete, rule: str = "mean") -> Tensor:
    """The deterministic gate used at test time.

    Args:
        log_alpha: gate logits.
        hc: the distribution's constants.
        rule: ``"mean"``: the paper's Eq. 13, ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma,
            0, 1)``. ``"median"``: the median of the gate, which is the stretched and clamped median
            ``sigmoid(log_alpha / beta)`` of the concrete variable ``s`` (``u = 1/2``).

    Returns:
        Gates in [0, 1], exactly 0 for pruned groups.
    """
    if rule == "mean":
        s = torch.sigmoid(log_alpha)
    elif rule == "median":
        s = torch.sigmoid(log_alpha / hc.temperature)
    else:
        raise ValueError(f"test_gate must be 'mean' or 'median', got {rule!r}")
    return (s * hc.span + hc.limit_a).clamp_(0.0, 1.0)


def eval_zero_logit(hc: HardConcrete, rule: str = "mean") -> float:
    """The gate logit at or below which :func:`eval_gate` is exactly 0.

    The eval gate is 0 when its concrete value ``s <= -gamma / (zeta - gamma)``; for the ``"mean"``
    rule ``s = sigmoid(log_alpha)``, for ``"median"`` ``s = sigmoid(log_alpha / beta)``. With the
    default constants: ``log(1/11) ~ -2.40`` and ``-1.60``.
    """
    q = -hc.limit_a / hc.span
    logit = math.log(q) - math.log1p(-q)
    if rule == "mean":
        return logit
    if rule == "median":
        return logit * hc.temperature
    raise ValueError(f"test_gate must be 'mean' or 'median', got {rule!r}")


def _signed64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64 (Steele, Lea & Flood 2014, the finalizer of Java's SplittableRandom): the Weyl
# increment and the two multipliers, as the signed 64-bit values torch's int64 arithmetic wraps.
_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX = ((30, _signed64(0xBF58476D1CE4E5B9)), (27, _signed64(0x94D049BB133111EB)), (31, None))


@functools.lru_cache(maxsize=8)
def _weyl(m: int, device: torch.device) -> Tensor:
    """``(i + 1) * golden`` (mod 2**64) for ``i < m``: the counters of one draw, before its key."""
    return torch.arange(1, m + 1, dtype=torch.int64, device=device).mul_(_GOLDEN)


def splitmix64(key: int, m: int, device: torch.device | str = "cpu") -> Tensor:
    """``m`` outputs of splitmix64 from state ``key``: element ``i`` is the generator's output
    for ``key + (i + 1) * golden``, each computed alone (a counter-based generator), so the
    whole draw is a few vectorized, multi-threaded int64 passes instead of ``m`` serial calls
    of a stateful generator. Logical right shifts are arithmetic shifts with the sign bits
    masked off. Returns int64 (the 64 output bits, two's complement)."""
    z = torch.add(_weyl(m, torch.device(device)), key)
    t = torch.empty_like(z)
    for shift, mul in _MIX:
        torch.bitwise_right_shift(z, shift, out=t).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mul is not None:
            z.mul_(mul)
    return z


def uniform_noise(
    size: tuple[int, ...], hc: HardConcrete, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """``U(eps, 1 - eps)`` noise of ``size``, as ``Tensor.uniform_(eps, 1 - eps)`` draws it.

    On CPU, ``uniform_`` makes one serial call of the Mersenne Twister per float (a third of an
    MLP's training step with weight gates). For float32, the noise is cut here from
    :func:`splitmix64` outputs keyed by one 64-bit draw of torch's generator (so
    ``torch.manual_seed`` governs it as before): each 64-bit output gives two 32-bit integers
    ``k``, and ``u = 1/2 + k (1 - 2 eps) / 2**32`` rounded to float32, so each float in the
    interval takes the probability of the 32-bit values that round to it (finer than
    ``uniform_``'s 24-bit steps). The hash runs vectorized on all intra-op threads and needs
    no mask. Other dtypes and devices use ``uniform_``.
    """
    eps = hc.epsilon
    n = math.prod(size)
    if not _hashed(n, dtype, device):
        return torch.empty(size, dtype=dtype, device=device).uniform_(eps, 1.0 - eps)
    k = splitmix64(_noise_key(), (n + 1) // 2, device).view(torch.int32)[:n]  # two halves each
    # 0.5 + k * (1 - 2 eps) / 2**32 for k in [-2**31, 2**31): (eps, 1 - eps), rounded to float32,
    # written over k (elementwise, same bytes): no second buffer
    u = k.view(torch.float32)
    return torch.add(_scalar(0.5), k, alpha=_noise_scale(hc), out=u).view(size)


def _hashed(n: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether :func:`uniform_noise` cuts ``n`` values of ``dtype`` from splitmix64."""
    return dtype == torch.float32 and torch.device(device).type == "cpu" and n >= _FEW


def _noise_key() -> int:
    """One 64-bit draw of the default CPU generator: the key of one draw of hashed noise."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _noise_scale(hc: HardConcrete) -> float:
    """``(1 - 2 eps) / 2**32``: the step from a 32-bit integer of the hash to the noise."""
    return (1.0 - 2.0 * hc.epsilon) * 2.0**-32


def _fused_draw(
    log_alpha: Tensor, hc: HardConcrete, size: tuple[int, ...], prob: bool = False
) -> tuple[Tensor, Tensor | None] | None:
    """``_noise_to_gate_(uniform_noise(size, ...), log_alpha)`` in one fused pass
    (:mod:`l0core.native`), from the same noise, with ``prob_nonzero(log_alpha)`` from the same
    pass when ``prob``; ``None`` where the kernels do not apply."""
    if not _hashed(math.prod(size), log_alpha.dtype, log_alpha.device):
        return None
    if not native.usable(log_alpha):
        return None
    return native.draw(
        log_alpha.detach(), size, _noise_key(), _noise_scale(hc), 1.0 / hc.temperature,
        hc.limit_a, hc.span, hc.l0_shift if prob else None,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _scalar(x: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 0-dim CPU tensor of ``x`` (the ``input`` of one-pass ``add``/``addcmul`` on any device)."""
    return torch.tensor(x, dtype=dtype)


def _noise_to_gate_(u: Tensor, log_alpha: Tensor, hc: HardConcrete) -> Tensor:
    """Turn uniform noise ``u`` into gates, in place (no temporary of the gates' size)."""
    u.logit_().add_(log_alpha).mul_(1.0 / hc.temperature).sigmoid_()
    return torch.add(_scalar(hc.limit_a, u.dtype), u, alpha=hc.span, out=u).clamp_(0.0, 1.0)


_CLAMP_BACKWARD = torch.ops.aten.hardtanh_backward.grad_input  # grad where min < x < max, else 0


def _gate_grad_(grad: Tensor, z: Tensor, hc: HardConcrete) -> Tensor:
    """Multiply ``grad`` (a fresh buffer) in place by ``dz/dlog_alpha``, computed from ``z`` alone.

    Inside (0, 1), ``z = s * span + gamma`` so ``s = (z - gamma) / span`` and
    ``dz/dlog_alpha = span * s * (1 - s) / beta = (z - gamma) * (zeta - z) * c`` with
    ``c = 1 / (span * beta)``: ``z * t - gamma * zeta * c`` with ``t = c * (gamma + zeta - z)``.
    Where the clamp is active (z == 0 or z == 1) the derivative is 0: ``hardtanh_backward`` (the
    clamp's own backward) keeps ``grad`` exactly where ``0 < z < 1``. Four passes (eight with a
    separate indicator), one temporary buffer.
    """
    a, b, c = hc.limit_a, hc.limit_b, hc.slope
    if grad.numel() >= _FEW and native.usable(grad, z):  # the same, in one fused pass
        return native.gate_grad_(grad, z, a, b, c)
    t = torch.rsub(z, (a + b) * c, alpha=c)  # c * (a + b - z)
    grad.mul_(torch.addcmul(_scalar(-a * b * c, z.dtype), t, z, out=t))
    return _CLAMP_BACKWARD(grad, z, 0.0, 1.0, grad_input=grad)


class _SampleGates(torch.autograd.Function):
    """Sampled gates with a hand-written backward that keeps only ``z`` (not ``s``, not ``u``)."""

    @staticmethod
    def forward(
        ctx, log_alpha: Tensor, hc: HardConcrete, size: tuple[int, ...], gates: Tensor | None
    ) -> Tensor:
        # a replay: the same gates, a new node
        z = _draw(log_alpha, hc, size) if gates is None else gates.clone()
        ctx.save_for_backward(z)
        ctx.hc = hc
        ctx.expanded = tuple(size) != tuple(log_alpha.shape)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (z,) = ctx.saved_tensors
        g = _gate_grad_(grad.clone(), z, ctx.hc)
        if ctx.expanded:  # per-sample gates: (B, n) -> (n,)
            g = g.sum(0)
        return g, None, None, None


def sample_gates(
    log_alpha: Tensor,
    hc: HardConcrete,
    batch_size: int | None = None,
    gates: Tensor | None = None,
) -> Tensor:
    """Draw hard-concrete gates with the reparametrization trick.

    Args:
        log_alpha: gate logits, shape ``(n,)``.
        hc: the distribution's constants.
        batch_size: draw ``(batch_size, n)`` independent gates (one set per example) instead of one
            set shared by the whole batch.
        gates: the values of gates drawn before (no gradient): return them again, differentiable
            with respect to ``log_alpha`` as when they were drawn (replaying a forward).

    Returns:
        Gates in [0, 1], differentiable with respect to ``log_alpha``.
    """
    size = tuple(log_alpha.shape) if batch_size is None else (batch_size, *log_alpha.shape)
    if gates is not None and tuple(gates.shape) != size:
        raise ValueError(f"gates of shape {tuple(gates.shape)} given for gates of shape {size}")
    if gates is None and batch_size is None and log_alpha.numel() < _FEW:
        return _sample_few(log_alpha, hc, size)
    return _SampleGates.apply(log_alpha, hc, size, gates)


def _sample_few(log_alpha: Tensor, hc: HardConcrete, size: tuple[int, ...]) -> Tensor:
    """:class:`_SampleGates` for a few shared gates (a layer's units): the same values from the
    same noise, through four native autograd ops, since for small tensors a Python
    ``autograd.Function`` costs more than the memory it saves (an MLP's output gates). Not for
    per-sample gates: those may be drawn inside a checkpointed region, whose recomputation
    replays them through :class:`_SampleGates` and must save the same tensors."""
    beta = hc.temperature
    noise = uniform_noise(size, hc, log_alpha.dtype, log_alpha.device).logit_().mul_(1.0 / beta)
    s = torch.add(noise, log_alpha, alpha=1.0 / beta).sigmoid()
    return F.hardtanh(torch.add(_scalar(hc.limit_a, s.dtype), s, alpha=hc.span), 0.0, 1.0)


def draw_gates(log_alpha: Tensor, hc: HardConcrete) -> Tensor:
    """Hard-concrete gates drawn without gradient, one per logit (see ``masked_weights``).
    No ``no_grad`` block needed: nothing here requires grad, so autograd records nothing."""
    return _draw(log_alpha, hc, tuple(log_alpha.shape))


def _draw(log_alpha: Tensor, hc: HardConcrete, size: tuple[int, ...]) -> Tensor:
    """Gates of ``size`` (``log_alpha``'s shape, or a batch of rows of it) without gradient:
    the fused kernel where it applies, else the eager noise and formula, from the same noise."""
    fused = _fused_draw(log_alpha, hc, size)
    if fused is not None:
        return fused[0]
    u = uniform_noise(size, hc, log_alpha.dtype, log_alpha.device)
    return _noise_to_gate_(u, log_alpha.detach(), hc)


def draw_gates_and_prob(log_alpha: Tensor, hc: HardConcrete) -> tuple[Tensor, Tensor]:
    """:func:`draw_gates` and ``prob_nonzero(log_alpha)`` (no gradient), the probabilities from
    the same pass over the logits where the fused kernels apply: the penalty of the forward
    that drew the gates then needs no pass of its own (``expected_count(..., prob=p)``)."""
    fused = _fused_draw(log_alpha, hc, tuple(log_alpha.shape), prob=True)
    if fused is not None:
        return fused
    return draw_gates(log_alpha, hc), prob_nonzero(log_alpha.detach(), hc)
