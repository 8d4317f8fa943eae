"""``l0core.cpu``: the allocator settings of a CPU training process, and the record of them that
speed measurements carry (process-wide state, so each check runs in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# glibc serves a large allocation with mmap (mallinfo2's hblks counts those chunks) while it is
# above the mmap threshold: 128 KiB at start, raised to a freed mmapped chunk's size after each
# free, 64 MiB once tuned. An 8 MiB buffer after a freed 4 MiB one is mmapped unless tuned.
_PROBE = """
import ctypes, ctypes.util
from l0core.cpu import allocator, tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

def mmapped(nbytes):
    before = libc.mallinfo2().hblks
    p = libc.malloc(nbytes)
    grew = libc.mallinfo2().hblks - before
    libc.free(p)
    return grew

print(allocator(), mmapped(4 << 20), tune_allocator(), allocator(), mmapped(8 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_keeps_buffers_in_the_heap_and_is_reported() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["default", "1", "True", "tuned", "0"], out


_UNTUNED = _PROBE.replace("tune_allocator(), allocator()", "True, 'tuned'")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_probe_sees_an_untuned_process() -> None:
    """The check above can fail: without tuning the 8 MiB buffer is mmapped."""
    out = subprocess.run(
        [sys.executable, "-c", _UNTUNED], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-1] == "1", out
