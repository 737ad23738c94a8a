"""Keep freed memory in the process instead of returning it to the OS (glibc only).

A training step of the reference allocates and frees hundreds of MB of activations and
gradients. glibc serves each allocation above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so every step page-faults all of that memory in again
(zero-filled by the kernel), which on a bert-base step is a large share of its time (numbers in
``benchmarks/results/README.md``). This module raises the mmap threshold and the trim threshold
with ``mallopt`` (the same as the environment variables ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``), for the whole process.

It changes no result, only where memory comes from; the cost is that the process keeps its peak
heap until it exits. Because it is process-wide, it is opt-in: nothing calls it on import or by
default. The NumPy trainer backend calls ``keep_freed_memory()`` only when the environment asks
for it (``BIGMODEL_NUMPY_KEEP_FREED_MEMORY=1``, see ``requested``); the benchmark suite calls it
explicitly for its NumPy side and records that it did in the results' metadata.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the reusable heap
_TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes an int) keep up to 2 GiB of freed heap
_TOP_PAD = 1 << 26  # grow the heap 64 MiB at a time

ENV_VAR = "BIGMODEL_NUMPY_KEEP_FREED_MEMORY"  # "1": the NumPy trainer keeps freed memory

_state: dict[str, bool] = {}


def requested() -> bool:
    """Whether the environment opts in (``BIGMODEL_NUMPY_KEEP_FREED_MEMORY`` set to ``1``,
    ``true`` or ``yes``); unset or anything else: no."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (module docstring). Returns True if the
    settings were applied (now or by an earlier call), False where there is no glibc
    ``mallopt`` (macOS, Windows, musl): nothing changes there."""
    if "applied" in _state:
        return _state["applied"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = all(mallopt(param, value) == 1 for param, value in (
                (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                (_M_TOP_PAD, _TOP_PAD)))
    _state["applied"] = ok
    return ok
