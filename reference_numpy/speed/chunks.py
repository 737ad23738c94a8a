"""Elementwise formulas evaluated a chunk at a time, on every core.

A formula such as Adam's ``m̂ / (√v̂ + ε)`` or GELU's ``Φ(x) + x φ(x)`` is several NumPy
operations. On a whole (B T, F) activation or a 23M-entry embedding table each operation streams
its operands and a fresh temporary through main memory, and NumPy runs it on one core while
BLAS uses them all. Here the flattened arrays are cut into slices of ``CHUNK`` elements, whose
temporaries stay in the CPU's caches, and the slices are shared among ``threads()`` threads
(NumPy releases the GIL inside its loops; slices much smaller than ``CHUNK`` spend their time
handing the GIL around instead). Every element gets exactly the arithmetic it would get on the
whole array, so the values are identical and do not depend on the thread count; the Python loop
is over chunks, never over elements. Timings of GELU and Adam with and without chunks:
``benchmarks/results/README.md``.

The pool of ``threads() - 1`` worker threads is started on the first call that needs it, never
on import; ``BIGMODEL_NUMPY_THREADS`` sets the count (1: no pool, everything on the caller's
thread). No environment variable or library setting is changed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 1 << 18  # elements per slice (1 MiB of float32): temporaries stay in L2 / L3

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    """Threads used: ``BIGMODEL_NUMPY_THREADS`` if set, else the CPUs this process may use."""
    env = os.environ.get("BIGMODEL_NUMPY_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, threads() - 1), thread_name_prefix="reference-chunks")
        return _pool


def elementwise(fn: Callable[..., np.ndarray], *arrays: np.ndarray) -> np.ndarray:
    """``fn(*arrays)`` for an elementwise ``fn`` of same-shaped arrays, chunk by chunk.

    Arrays of different shapes (broadcasting) or with at most two chunks get one plain call.
    The result has ``arrays[0]``'s shape and the dtype ``fn`` returns.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    shape, size = arrays[0].shape, arrays[0].size
    if size <= 2 * CHUNK or any(a.shape != shape for a in arrays[1:]):
        return fn(*arrays)
    flats = [a.reshape(-1) for a in arrays]
    first = np.asarray(fn(*(f[:CHUNK] for f in flats)))
    out = np.empty(size, first.dtype)
    out[:CHUNK] = first

    def run(starts: range) -> None:
        for i in starts:
            out[i:i + CHUNK] = fn(*(f[i:i + CHUNK] for f in flats))

    n = threads()
    starts = range(CHUNK, size, CHUNK)
    if n == 1:
        run(starts)
    else:  # contiguous runs of chunks, one per thread; this thread takes the last
        bounds = [len(starts) * t // n for t in range(n + 1)]
        parts = [starts[bounds[t]:bounds[t + 1]] for t in range(n)]
        futures = [_executor().submit(run, part) for part in parts[:-1]]
        run(parts[-1])
        for f in futures:
            f.result()
    return out.reshape(shape)


def leafwise(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``fn`` as a leaf function for ``tree_map``, run through ``elementwise``."""
    return lambda *leaves: elementwise(fn, *leaves)
