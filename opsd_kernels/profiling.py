"""Incremental peak memory of one call: the most memory it held at once beyond what was
already in use when it started (inputs, weights, caches of earlier calls excluded).

CUDA: the caching allocator's own counters. CPU: PyTorch's CPU allocator has no such counters,
so we read the kernel's resident-set high-water mark, resetting it first by writing "5" to
/proc/self/clear_refs (Linux >= 4.0). Call the function once before measuring so that
one-time costs (torch.compile, library loading, thread pools) are not counted.
"""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} missing from {_STATUS}")
    return int(match.group(1))


def _malloc_trim() -> None:
    # glibc keeps freed small/medium blocks in its heap; handing them back to the OS makes the
    # baseline RSS honest, so a call that reuses them is not measured as using no memory.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_supported() -> str | None:
    """None if the CPU high-water mark can be reset here, else the reason it cannot."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError as e:
        return f"cannot reset VmHWM via {_CLEAR_REFS}: {e}"
    return None


def peak_bytes(fn: Callable[[], T], device: torch.device) -> tuple[int | None, T]:
    """Run ``fn`` once; return its incremental peak memory in bytes (None if unmeasurable here)
    and its result.

    The CUDA figure counts bytes the allocator handed out; the CPU figure counts resident
    pages, so it also includes allocator overhead and any memory touched by libraries.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    if cpu_peak_supported() is not None:
        return None, fn()
    _malloc_trim()
    before = _status_kib("VmRSS")
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")  # VmHWM := current VmRSS
    out = fn()
    return max(0, _status_kib("VmHWM") - before) * 1024, out
