"""Fused CPU kernels for the hard-concrete gates, built from ``_gates.c`` on first use.

A weight-gated step draws, gates and differentiates one gate per weight. Eager torch does that in
many passes over the gates, each a few microseconds of dispatch and thread start-up plus a pass
over memory: 19 for the draw (the 12 integer passes of the noise hash, its conversion, and the
six of the gate formula) and 6 for the two gradients of a masked weight. ``_gates.c`` does each
in one pass, vectorized (glibc's vector math library for ``log`` and ``exp``) and on torch's
OpenMP threads. On the 2-core development machine this takes a weight-gated MLP 784-300-100
step from about 2.1x to about 1.8x a plain one (``benchmarks/step_overhead.py``).

The kernels compute what :mod:`l0core.functional`'s eager code computes, from the same noise
(the same key drawn from torch's generator, the same splitmix64 bits), to float32 rounding: the
eager code stays the reference (the tests compare the two) and the fallback wherever a kernel
does not apply (other dtypes and devices, small tensors) or cannot be built.

The shared library is compiled with the system C compiler (``$CC``, else ``cc``) for the
machine it runs on (``-march=native``) into ``$L0CORE_CACHE_DIR`` (default
``~/.cache/l0core``), once per source, compiler and CPU; other processes load it from there.
Where that fails (no compiler, no glibc vector math, not x86-64 Linux), the reason is logged once
and the eager code runs. ``L0CORE_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["disabled", "draw", "gate_grad_", "masked_grads", "status", "usable"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("_gates.c")
_GRAIN = 32768  # below this many elements, one thread (torch's own grain size for such loops)

_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are not in use; None: not yet decided
_off = 0  # depth of ``disabled()`` blocks


def _cache_dir() -> Path:
    explicit = os.environ.get("L0CORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l0core"


def _cpu_flags() -> str:
    """What ``-march=native`` compiles for: a library built on one CPU may not run on another
    that shares the cache directory."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


# Compiled with -ffast-math (the vector math library's log and exp), linked without it: gcc would
# add crtfastmath.o, which turns on flush-to-zero for the whole process when the library loads.
_COMPILE = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
_LINK = ("-shared", "-fopenmp", "-lmvec", "-lm")


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "gates.o", Path(tmp) / "gates.so"
        compile_ = [cc, *_COMPILE, str(_SOURCE), "-o", str(obj)]
        link = [cc, str(obj), "-o", str(lib), *_LINK]
        for cmd in (compile_, link):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
        os.replace(lib, out)  # atomic: processes building at once each replace a whole file


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(
            f"built for x86-64 Linux only, this is {platform.system()} {platform.machine()}"
        )
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    recipe = (_SOURCE.read_text(), cc, version, _cpu_flags(), *_COMPILE, "|", *_LINK)
    key = hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gates-{key}.so"
    if not path.exists():
        try:
            _build(cc, path)
        except PermissionError:  # an unwritable cache: build for this process only
            path = Path(tempfile.mkdtemp(prefix="l0core-")) / path.name
            _build(cc, path)
        _log.info("l0core: built the fused gate kernels at %s", path)
    lib = ctypes.CDLL(str(path))
    c_float, c_int, c_i64, ptr = ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.l0_draw.argtypes = [ptr, ptr, ptr, c_i64, c_i64, ctypes.c_uint64, *[c_float] * 5, c_int]
    lib.l0_gate_grad.argtypes = [ptr, ptr, c_i64, c_float, c_float, c_float, c_int]
    lib.l0_masked_grads.argtypes = [*[ptr] * 5, c_i64, c_float, c_float, c_float, c_int]
    for fn in (lib.l0_draw, lib.l0_gate_grad, lib.l0_masked_grads):
        fn.restype = None
    return lib


def _kernels() -> ctypes.CDLL | None:
    global _lib, _reason
    if _off:
        return None
    if _reason is None:
        if os.environ.get("L0CORE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "turned off by L0CORE_NATIVE"
        else:
            try:
                _lib, _reason = _load(), ""
            except (OSError, subprocess.SubprocessError) as e:
                _reason = f"could not be built: {e}"
                _log.warning(
                    "l0core: the fused CPU gate kernels %s; weight gates run as eager torch "
                    "ops (the same values, slower on CPU)",
                    _reason,
                )
    return _lib


def status() -> str:
    """``"native"`` where the fused kernels run in this process, else ``"eager (why)"``."""
    return "native" if _kernels() is not None else f"eager ({_reason or 'disabled'})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block with the eager implementations (a reference, or a benchmark's baseline)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def usable(*tensors: Tensor) -> bool:
    """The kernels apply: contiguous float32 CPU tensors and the library loaded."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return _kernels() is not None


def _threads(n: int) -> int:
    return 1 if n < _GRAIN else torch.get_num_threads()


def draw(
    log_alpha: Tensor,
    size: tuple[int, ...],
    key: int,
    scale: float,
    inv_beta: float,
    a: float,
    span: float,
    shift: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gates of ``size`` (``log_alpha``'s shape, or rows of it: per-sample gates) from the noise
    of ``key`` (see ``l0core.functional.draw_gates``), and with ``shift`` ``P(z != 0) =
    sigmoid(log_alpha - shift)`` of each logit from the same pass, else ``None``."""
    cols = log_alpha.numel()
    rows = math.prod(size) // cols
    z = torch.empty(size, dtype=torch.float32)
    p = None if shift is None else torch.empty_like(log_alpha, dtype=torch.float32)
    if p is not None and rows != 1:
        raise ValueError(f"P(z != 0) comes with one row of gates, not {rows}")
    _lib.l0_draw(
        log_alpha.data_ptr(), z.data_ptr(), None if p is None else p.data_ptr(), rows, cols,
        key & ((1 << 64) - 1), scale, inv_beta, a, span, 0.0 if shift is None else shift,
        _threads(rows * cols),
    )  # fmt: skip
    return z, p


def gate_grad_(grad: Tensor, z: Tensor, a: float, b: float, c: float) -> Tensor:
    """``grad *= dz/dlog_alpha`` in place (see ``l0core.functional._gate_grad_``)."""
    n = grad.numel()
    _lib.l0_gate_grad(grad.data_ptr(), z.data_ptr(), n, a, b, c, _threads(n))
    return grad


def masked_grads(
    g: Tensor, w: Tensor, z: Tensor, gla: Tensor, want_w: bool, a: float, b: float, c: float
) -> Tensor | None:
    """Writes ``g * w * dz/dlog_alpha`` into ``gla`` and returns ``g * z`` (``None`` unless
    ``want_w``): the two gradients of ``w * z`` in one pass."""
    n = g.numel()
    gw = torch.empty_like(g) if want_w else None
    _lib.l0_masked_grads(
        g.data_ptr(), w.data_ptr(), z.data_ptr(), gla.data_ptr(),
        None if gw is None else gw.data_ptr(), n, a, b, c, _threads(n),
    )  # fmt: skip
    return gw
