"""CPU performance settings for training processes (opt-in; nothing here runs on import).

Small CPU training steps allocate and free activation and gradient buffers of a few hundred KB
many times per step. glibc serves allocations above its mmap threshold (128 KiB at start) with
fresh ``mmap`` calls and unmaps them on free, so every such buffer is page-faulted in again on
each step. Raising the threshold keeps them in the heap: on a 2-core machine this halves the
step time of an MLP 784-300-100 at batch 128 (see ``benchmarks/step_overhead.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["allocator", "tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_log = logging.getLogger(__name__)
_tuned = False  # tune_allocator() applied in this process (mallopt has no getter)


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed buffers below ``mmap_threshold`` bytes in the process heap (glibc only).

    Call it once at the start of a training process (a trial, a benchmark, the demo); it affects
    the whole process. Returns whether the setting was applied (False on non-glibc platforms).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _log.info("tune_allocator: no glibc mallopt on this platform; nothing changed")
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    global _tuned
    _tuned = _tuned or bool(ok)
    return bool(ok)


def allocator() -> str:
    """``"tuned"`` once :func:`tune_allocator` applied its settings in this process, else
    ``"default"``: what a speed measured here was measured with."""
    return "tuned" if _tuned else "default"
