"""Measured speed of exported models: batch-1 latency, large-batch throughput, size on disk.

Pure measurement, free of Ray and MLflow (like :mod:`sweeps.training`): the trainable times the
model a trial exports, the driver compares the Pareto front's models with the dense model of the
same architecture. Two rules keep the numbers honest on a shared machine:

* every timing starts with a warm-up (first calls allocate, pick kernels and fill caches), and
  the number of calls per sample is calibrated so that a sample lasts long enough to time;
* a comparison of models is *interleaved*: each round times every model once, in turn, and a
  model's figure is its median over the rounds, so that load which comes and goes on the machine
  falls on all models alike and ``speedup_vs_dense`` is a ratio taken in one run, never two
  absolute times from different moments.

On CPU the timings use :class:`torch.utils.benchmark.Timer` with the given thread count; on a
GPU, CUDA events around the calls and a synchronisation before reading them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "SPEEDUP_METRICS",
    "THROUGHPUT_BATCH",
    "Speed",
    "compare",
    "measure",
    "model_bytes",
    "speedups",
    "timed_batches",
]

THROUGHPUT_BATCH = 256  # the "large batch" of the throughput figure
SPEEDUP_METRICS = ("speedup_vs_dense", "latency_speedup_b1")
"""What :func:`speedups` gives each model; the driver logs them on finished trials at the end."""
_SAMPLE_S = 0.02  # calls per sample are calibrated to last about this long


@dataclass(frozen=True)
class Speed:
    """One model's measured speed.

    Attributes:
        latency_ms_b1: median time of one forward pass on a batch of one example, milliseconds.
        throughput: examples per second, forward passes on batches of ``batch`` examples.
        batch: the throughput batch size.
        device: where it was timed (``cpu``, ``cuda:0``).
        threads: CPU threads torch used (intra-op).
    """

    latency_ms_b1: float
    throughput: float
    batch: int
    device: str
    threads: int

    def metrics(self) -> dict[str, float]:
        """The two figures as trial metrics (names of :data:`sweeps.spec.SPEED_METRICS`)."""
        return {"latency_ms_b1": self.latency_ms_b1, "throughput": self.throughput}

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored: the dense tensors' elements, or a
    sparse tensor's values and indices (so a CSR export is counted at its real size)."""
    total = 0
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: Tensor) -> int:
    if t.layout == torch.sparse_csr:
        parts = (t.values(), t.crow_indices(), t.col_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    if t.is_sparse:
        return sum(p.numel() * p.element_size() for p in (t._values(), t._indices()))
    return t.numel() * t.element_size()


def timed_batches(example: Tensor, batch: int = THROUGHPUT_BATCH) -> tuple[Tensor, Tensor]:
    """A batch of one example and a batch of ``batch`` examples built from ``example`` (one or
    more real inputs, first dimension the batch), repeated as needed."""
    if example.dim() < 2 or len(example) == 0:
        raise ValueError(
            f"example must be a non-empty batch of inputs (shape (N, ...)), got {tuple(example.shape)}"
        )
    reps = -(-batch // len(example))
    big = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch]
    return example[:1].contiguous(), big.contiguous()


def _calibrate(call: Callable[[], object], sync: Callable[[], None]) -> int:
    """Warm up ``call`` and return how many calls make a sample of about :data:`_SAMPLE_S`."""
    for _ in range(3):
        call()
    sync()
    n, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= _SAMPLE_S / 4 or n >= 1 << 16:
            break
        n *= 4
    return max(1, round(n * _SAMPLE_S / max(elapsed, 1e-9)))


class _Clock:
    """Times ``number`` calls of a model on one input: one sample, seconds per call."""

    def __init__(self, model: nn.Module, x: Tensor, device: torch.device, threads: int) -> None:
        self.model, self.x, self.device, self.threads = model, x, device, threads
        self.cuda = device.type == "cuda"
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        with torch.inference_mode():
            self.number = _calibrate(lambda: model(x), sync)
        if not self.cuda:
            from torch.utils import benchmark

            self.timer = benchmark.Timer(
                stmt="model(x)",
                setup="",
                globals={"model": model, "x": x},
                num_threads=threads,
            )

    def sample(self) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.inference_mode():
                start.record()
                for _ in range(self.number):
                    self.model(self.x)
                end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / self.number
        with torch.inference_mode():
            return self.timer.timeit(self.number).median


def compare(
    models: Mapping[str, nn.Module],
    example: Tensor,
    device: torch.device | str = "cpu",
    threads: int = 1,
    rounds: int = 7,
    batch: int = THROUGHPUT_BATCH,
) -> dict[str, Speed]:
    """Time several models side by side, interleaved round by round.

    Args:
        models: name -> model; each is put in eval mode and moved to ``device``.
        example: real inputs (shape ``(N, ...)``), from which the timed batches are built.
        device: where to time them.
        threads: CPU intra-op threads during the timing (the caller's setting is restored).
        rounds: samples per model and batch size; the figure is the median.
        batch: the throughput batch size.

    Returns:
        name -> :class:`Speed`.

    Raises:
        ValueError: no models, fewer than one round or thread, or a bad example.
    """
    if not models:
        raise ValueError("compare needs at least one model")
    if rounds < 1 or threads < 1:
        raise ValueError(f"rounds and threads must be >= 1, got rounds={rounds} threads={threads}")
    device = torch.device(device)
    one, big = (t.to(device) for t in timed_batches(example, batch))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        clocks = {}
        for name, model in models.items():
            model = model.eval().to(device)
            clocks[name] = (
                _Clock(model, one, device, threads),
                _Clock(model, big, device, threads),
            )
        samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in models}
        for _ in range(rounds):
            for name, (c1, cb) in clocks.items():
                samples[name][0].append(c1.sample())
                samples[name][1].append(cb.sample())
    finally:
        torch.set_num_threads(previous)
    label = str(device) if device.type == "cpu" or device.index is not None else "cuda:0"
    return {
        name: Speed(
            latency_ms_b1=1000 * statistics.median(s1),
            throughput=batch / statistics.median(sb),
            batch=batch,
            device=label,
            threads=threads,
        )
        for name, (s1, sb) in samples.items()
    }


def measure(
    model: nn.Module,
    example: Tensor,
    device: torch.device | str = "cpu",
    threads: int = 1,
    rounds: int = 5,
    batch: int = THROUGHPUT_BATCH,
) -> Speed:
    """One model's :class:`Speed` (see :func:`compare`)."""
    return compare({"model": model}, example, device, threads, rounds, batch)["model"]


def speedups(speeds: Mapping[str, Speed], reference: str) -> dict[str, dict[str, float]]:
    """Each model's speed relative to ``reference`` (from one :func:`compare` run):
    ``speedup_vs_dense`` (throughput ratio, > 1 is faster) and ``latency_speedup_b1`` (the
    reference's batch-1 latency over the model's).

    Raises:
        KeyError: ``reference`` is not among ``speeds``.
    """
    if reference not in speeds:
        raise KeyError(f"reference {reference!r} not among the compared models {list(speeds)}")
    ref = speeds[reference]
    throughput, latency = SPEEDUP_METRICS
    return {
        name: {
            throughput: s.throughput / ref.throughput,
            latency: ref.latency_ms_b1 / s.latency_ms_b1,
        }
        for name, s in speeds.items()
    }
