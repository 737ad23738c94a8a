"""What the machine can do, published and measured in the same run: matmul peaks, memory
bandwidth, peak memory, and a description of the machine and library versions.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. We report it against two peaks:

* the **published** dense peak of the accelerator (the datasheet figure: H200 989 TFLOP/s bf16
  dense); CPUs have no published figure we can look up reliably (it depends on the SKU, clock,
  AVX width and how many cores the VM gets), so for CPUs this is ``None``, said so in the report;
* the **measured** matmul peak: one large square ``jnp.dot`` timed in the same process, fp32 and
  bf16 x bf16 -> fp32 (``preferred_element_type``), plus NumPy's fp32 ``@`` (BLAS). This is what
  the same library reaches on the same (possibly shared, possibly throttled) machine, so the
  ratio isolates how well the model's step uses it.

Memory bandwidth is measured the same way (a large reduction: reads only; a copy: reads +
writes) and is the denominator of the decoding bound (``flops.decode_bytes_per_token``).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# jax and torch are imported inside the functions that use them: the torch.compile worker
# (``python -m bigmodel_apps.bench.torch_side``) imports this module and loads neither jax nor,
# until it measures, torch (optional: the ``test`` extra).

# Published dense peaks: FLOP/s by dtype and bytes/s of memory bandwidth. Substring-matched (in
# order) against the device kind jax reports ("NVIDIA H200", "NVIDIA H100 80GB HBM3", ...).
# fp32 is the non-tensor-core figure; on GPUs JAX's default matmul precision runs fp32 dots as
# TF32 (or bf16 passes), so the fp32 row is a floor, stated as such in the report.
PUBLISHED_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12, "bandwidth": 4.8e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12, "bandwidth": 2.0e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12, "bandwidth": 3.35e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12, "bandwidth": 2.0e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12, "bandwidth": 0.3e12}),
)


def published_peak(device_kind: str) -> dict[str, float] | None:
    """Datasheet peaks of ``device_kind`` (see ``PUBLISHED_PEAKS``), or None when unknown (CPUs)."""
    for key, peaks in PUBLISHED_PEAKS:
        if key.lower() in device_kind.lower():
            return dict(peaks, source=f"datasheet ({key}, dense, no sparsity)")
    return None


def best_time(fn: Callable[[], Any], *, reps: int = 5, min_time: float = 0.0) -> float:
    """Fastest of ``reps`` calls (at least ``min_time`` seconds of calls) after one warm-up call.
    ``fn`` must block until its result is ready. The minimum is the right statistic for a peak:
    interference from other processes only ever adds time."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < reps or spent < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
        if n >= 50 * reps:
            break
    return best


def measure_matmul_peaks(n: int, *, reps: int = 5, with_numpy: bool = True) -> dict[str, Any]:
    """FLOP/s of an (n, n) x (n, n) matmul: JAX fp32, JAX bf16 x bf16 -> fp32, NumPy fp32.

    JAX dots run at ``precision="highest"`` for fp32 (true fp32 on GPUs, not TF32) and at the
    default for bf16; the entry ``jax_fp32_default`` is the default precision (TF32 on Ampere+).
    """
    import jax
    import jax.numpy as jnp

    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out: dict[str, Any] = {"n": n}
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f32 = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    out["jax_float32"] = flops / best_time(lambda: f32(ja, jb).block_until_ready(), reps=reps)
    if jax.default_backend() != "cpu":
        f32d = jax.jit(jnp.dot)
        out["jax_float32_default"] = flops / best_time(lambda: f32d(ja, jb).block_until_ready(), reps=reps)
    ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    bf = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    out["jax_bfloat16"] = flops / best_time(lambda: bf(ha, hb).block_until_ready(), reps=reps)
    if with_numpy:
        out["numpy_float32"] = flops / best_time(lambda: a @ b, reps=reps)
    return out


def measure_torch_matmul(n: int, *, reps: int = 5) -> dict[str, float]:
    """FLOP/s of torch's fp32 matmul at (n, n) on its default device (CPU here), for context."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    return {"torch_float32": 2.0 * n**3 / best_time(lambda: a @ b, reps=reps), "torch_threads": torch.get_num_threads()}


def measure_bandwidth(n_bytes: int, *, reps: int = 5) -> dict[str, Any]:
    """Memory bandwidth in bytes/s from one large fp32 array: JAX's sum on the default device
    (reads every byte once) and a copy (reads and writes every byte, counted twice): on GPUs
    ``x * c`` into a new buffer, on CPUs NumPy's ``copyto`` into a preallocated one (a new XLA CPU
    buffer of that size is page-faulted in on first touch, which measures the kernel, not DRAM).
    NumPy's sum is measured on CPUs too. The array must be much larger than the last-level cache
    (we use >= 256 MiB on CPUs, 4 GiB on GPUs)."""
    import jax
    import jax.numpy as jnp

    n = n_bytes // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    out: dict[str, Any] = {"bytes": int(n * 4)}
    out["jax_read"] = n * 4 / best_time(lambda: total(x).block_until_ready(), reps=reps)
    if jax.default_backend() == "cpu":
        xn = np.ones(n, np.float32)
        yn = np.zeros_like(xn)
        out["numpy_read"] = n * 4 / best_time(lambda: xn.sum(), reps=reps)
        out["numpy_copy"] = 2 * n * 4 / best_time(lambda: np.copyto(yn, xn), reps=reps)
        del xn, yn
    else:
        copy = jax.jit(lambda v: v * 1.0000001)  # not x + 0: XLA would elide it
        out["jax_copy"] = 2 * n * 4 / best_time(lambda: copy(x).block_until_ready(), reps=reps)
    del x
    out["best"] = max(v for k, v in out.items() if k != "bytes")
    return out


# --------------------------------------------------------------------------------------------
# peak memory


class PeakMemory:
    """Peak resident memory of this process during a ``with`` block (CPU), or the JAX / torch
    device allocators' peak (GPU).

    On Linux the kernel's high-water mark ``VmHWM`` is reset by writing ``5`` to
    ``/proc/self/clear_refs``, so each block gets its own peak; ``delta`` is that peak minus the
    resident size when the block started, i.e. what the measured code added on top of what was
    already loaded (weights of every side live in the same process). Without that file (not
    Linux) we fall back to ``getrusage``'s lifetime maximum, flagged ``resettable = False``.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self.delta: int | None = None
        self.resettable = os.path.exists("/proc/self/clear_refs")

    def __enter__(self) -> PeakMemory:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False
        self._start = current_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = peak_rss(self.resettable)
        self.delta = None if self._start is None or self.peak is None else self.peak - self._start

    def as_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak, "delta_rss_bytes": self.delta, "rss_peak_resettable": self.resettable}


def _status_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux ``VmRSS``), or None."""
    return _status_field("VmRSS")


def peak_rss(from_status: bool = True) -> int | None:
    """Peak resident set size in bytes: ``VmHWM`` (resettable) or ``ru_maxrss`` (lifetime)."""
    if from_status:
        v = _status_field("VmHWM")
        if v is not None:
            return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def jax_device_memory() -> dict[str, Any] | None:
    """The JAX device allocator's statistics (GPU/TPU: ``bytes_in_use``, ``peak_bytes_in_use``);
    None on CPU, where the allocator keeps none."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


# --------------------------------------------------------------------------------------------
# machine description


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags that decide fp32 / bf16 matmul speed (avx2, avx512*, amx*), if readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def versions() -> dict[str, str]:
    """Versions of everything that decides the numbers (missing packages are left out)."""
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch", "transformers",
                "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    """Host, CPU, core count, load average, JAX backend and device kind."""
    import jax

    dev = jax.devices()[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    threads = {k: v for k, v in os.environ.items()
               if k.startswith(("OMP_", "MKL_", "OPENBLAS_", "XLA_FLAGS", "XLA_PYTHON"))}
    return {
        "host": platform.node(),
        "thread_env": threads,
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }
