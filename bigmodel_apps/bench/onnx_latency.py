"""onnxruntime's latency beside our JAX forward, for one exported model (``bigmodel export
--format onnx``): the median of N timed calls each, on the same inputs, with the CPU flags
(``bench.hardware.cpu_flags``) that decide both sides' matmul speed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_apps.bench.hardware import cpu_flags

__all__ = ["median_latency", "onnx_vs_jax"]


def median_latency(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    """Median seconds of ``runs`` calls of ``fn`` (which blocks until its result is ready), after
    ``warmup`` untimed calls (compilation, allocator warm-up)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def onnx_vs_jax(onnx_path: str | Path, jax_forward: Callable[..., Any], inputs: dict[str, np.ndarray], *,
                runs: int = 20) -> dict[str, Any]:
    """Median latency (ms) of onnxruntime (CPU provider) on ``onnx_path`` and of
    ``jax_forward(**inputs)`` (jit-compiled by the caller or here), the same ``inputs`` (NumPy,
    the graph's input names), plus the max abs difference of their first outputs."""
    import jax
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    missing = sorted(set(names) - set(inputs))
    if missing:
        raise ValueError(f"inputs lack {missing}; the graph takes {names}")
    feed = {n: inputs[n] for n in names}
    fwd = jax.jit(jax_forward)
    jax_in = {k: (v.astype(np.int32) if v.dtype.kind == "i" else v) for k, v in inputs.items()}

    def run_jax() -> Any:
        return jax.block_until_ready(fwd(**jax_in))

    ours = run_jax()
    theirs = session.run(None, feed)[0]
    first = ours[0] if isinstance(ours, (tuple, list)) else ours
    return {
        "onnxruntime_ms": 1e3 * median_latency(lambda: session.run(None, feed), runs),
        "jax_ms": 1e3 * median_latency(run_jax, runs),
        "runs": runs, "max_abs_diff": float(np.max(np.abs(np.asarray(first) - theirs))),
        "shapes": {k: list(v.shape) for k, v in feed.items()},
        "onnxruntime": ort.__version__, "jax": jax.__version__, "cpu_flags": cpu_flags(),
    }
