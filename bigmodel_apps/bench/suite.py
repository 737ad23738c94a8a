"""The benchmark suite: one run measures, on one machine and one workload, every side (our JAX,
HF transformers on PyTorch eager and ``torch.compile``, our NumPy reference), the machine's own
peaks, and the JAX optimisations on / off, and returns one JSON-able dict (``report`` renders it).

Sections of the result:

* ``meta``      date, machine, versions, the command line
* ``peaks``     matmul FLOP/s (JAX fp32 / bf16, NumPy fp32, torch fp32) and memory bandwidth
                measured in this run, and the published peak of the device (None on CPUs)
* ``workload``  config, batch, length, dtype, the analytic FLOP count per example
* ``agreement`` the three sides' logits on the batch (max normwise error vs HF): they run the
                same weights
* ``runs``      one record per (side, kind = train | forward): throughput, achieved FLOP/s,
                MFU against both peaks, compile time, memory
* ``decode``    greedy KV-cache decoding per side: tokens/s, the bandwidth bound, identical tokens
* ``sweep``     forward throughput against batch size per side (the plot)
* ``optimisations``  JAX training step per ``PerfOptions`` variant, with bf16's parity to fp32
* ``depth``     compile time of the training step at two depths, scanned and unrolled
* ``flop_check`` the analytic count against XLA's ``cost_analysis`` of an unrolled step
* ``onnx``      (``--onnx``) onnxruntime on the ``bigmodel export --format onnx`` graph beside the
                JAX forward, timed interleaved: both latencies, their ratio, the logits'
                max abs difference, the opset (``bench.onnx_latency``)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_apps.bench import flops as F
from bigmodel_apps.bench import hardware as hw
from bigmodel_apps.bench import onnx_latency
from bigmodel_apps.bench.jax_side import JaxSide, cost_of, forward_fn, loss_fn, make_optimizer
from bigmodel_apps.bench.numpy_side import NumpySide
from bigmodel_apps.bench.timing import Prepared, time_interleaved
from bigmodel_apps.bench.torch_side import TorchSide, run_compiled
from bigmodel_apps.bench.workloads import (
    KINDS,
    SIDES,
    Workload,
    hf_architecture,
    init_reference,
    inputs_only,
    make_batch,
    tokens_per_example,
    units_per_step,
    write_shared_weights,
)
from bigmodel_jax.perf import PerfOptions, mlm_rows
from reference_numpy.configs import BertConfig, GPTConfig, param_count
from reference_numpy.tree import tree_leaves_with_path



@dataclass(frozen=True)
class SuiteOptions:
    """What one suite run measures (``bigmodel bench --help`` documents each flag)."""

    workload: Workload
    sides: tuple[str, ...] = SIDES
    kinds: tuple[str, ...] = KINDS
    min_time: float = 3.0  # seconds of timed calls per measurement (at least min_reps calls)
    max_reps: int = 20
    decode_prompt_len: int = 8
    decode_new_tokens: int = 32
    decode_batch: int = 1
    sweep_batches: tuple[int, ...] = ()  # forward throughput vs batch size (the plot)
    sweep_sides: tuple[str, ...] = ("jax", "torch", "numpy")
    optimisations: tuple[PerfOptions, ...] = ()  # JAX train-step variants measured against the default
    bf16_parity: bool = False  # report bf16 mixed precision's loss / gradient distance to fp32
    depths: tuple[int, ...] = ()  # compile time of the train step at these n_layers (scan / unrolled)
    flop_check: bool = True  # analytic FLOPs vs XLA cost_analysis of an unrolled step
    matmul_n: int = 2048
    bandwidth_bytes: int = 512 * 2**20
    torch_compile_timeout: float = 900.0
    perf: PerfOptions = PerfOptions()  # the JAX side's options for the headline runs
    # JAX decoding layout ("jax" row; generate's default scan layout is measured too, "jax scan")
    decode_layout: PerfOptions = PerfOptions(scan_layers=False, fused_qkv=True)
    workdir: str | None = None  # where the shared HF directory is written (default: a temp dir)
    # onnxruntime (CPU) on the ONNX export of the same weights, beside the JAX forward (opt-in: the
    # export needs torch and the deploy extra, and costs seconds to minutes for large models)
    onnx: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        bad = set(self.sides) - set(SIDES)
        if bad:
            raise ValueError(f"unknown sides {sorted(bad)}; known: {SIDES}")
        bad = set(self.kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown kinds {sorted(bad)}; known: {KINDS}")
        if self.onnx and "forward" not in self.kinds:
            raise ValueError(f"onnx compares onnxruntime with the JAX forward: kinds must include 'forward', "
                             f"got {list(self.kinds)}")


def _log(msg: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def _guard(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; an exception becomes ``{"error": ...}`` so one failing side does not
    lose the others' results."""
    _log(what)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the results
        _log(f"  {what} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e)[:800]}", "traceback": traceback.format_exc()[-2000:]}


def measured_peak(peaks: dict[str, Any], dtype: str) -> tuple[float | None, str | None]:
    """The best matmul FLOP/s measured in this run for ``dtype`` (fp32: the best library; bf16:
    JAX's bf16 x bf16 -> fp32), and which measurement it was."""
    m = peaks.get("matmul", {})
    keys = ("jax_bfloat16",) if dtype == "bfloat16" else ("jax_float32", "numpy_float32", "torch_float32")
    vals = [(m[k], k) for k in keys if isinstance(m.get(k), (int, float))]
    return max(vals) if vals else (None, None)


def annotate(rec: dict[str, Any], *, flops_per_step: float, units: int, peaks: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Add throughput, achieved FLOP/s and MFU (both peaks) to a timed record."""
    if "timing" not in rec:
        return rec
    t = rec["timing"]["median"]
    achieved = flops_per_step / t
    peak, peak_name = measured_peak(peaks, dtype)
    pub = (peaks.get("published") or {}).get(dtype)
    rec.update({
        "step_s": t, "units": units, "units_per_s": units / t, "flops_per_step": flops_per_step, "achieved_flops": achieved,
        "mfu_measured": achieved / peak if peak else None, "measured_peak": peak, "measured_peak_name": peak_name,
        "mfu_published": achieved / pub if pub else None, "published_peak": pub,
    })
    return rec


def _peaks(opts: SuiteOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"published": hw.published_peak(jax.devices()[0].device_kind)}
    if out["published"] is None:
        out["published_note"] = (f"no published peak for {jax.devices()[0].device_kind!r} "
                                 f"({hw.cpu_model()}): MFU is against the measured matmul peak only")
    out["matmul"] = _guard(f"matmul peak n={opts.matmul_n}", lambda: hw.measure_matmul_peaks(
        opts.matmul_n, with_numpy=jax.default_backend() == "cpu"))
    if "torch" in opts.sides and jax.default_backend() == "cpu":
        out["matmul"].update(_guard("torch matmul peak", lambda: hw.measure_torch_matmul(opts.matmul_n)))
    out["bandwidth"] = _guard(f"memory bandwidth {opts.bandwidth_bytes >> 20} MiB",
                              lambda: hw.measure_bandwidth(opts.bandwidth_bytes))
    return out


def _relerr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def run_suite(opts: SuiteOptions) -> dict[str, Any]:
    """Run everything ``opts`` asks for; never raises for a failing side (see ``_guard``)."""
    w = opts.workload
    config = w.config()
    T = tokens_per_example(config, w.seq_len)
    count = F.forward_flops(config, T)
    result: dict[str, Any] = {
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": hw.machine(), "versions": hw.versions(), "command": opts.command,
                 "perf": opts.perf.label(), "min_time": opts.min_time},
        "workload": {**w.describe(), "param_count": param_count(config), "flops_per_example": count.as_dict(),
                     "architecture": hf_architecture(config)},
    }
    result["peaks"] = peaks = _peaks(opts)
    batch = make_batch(config, w.batch, w.seq_len, w.seed)
    units = units_per_step(config, w.batch, w.seq_len)

    tmp = tempfile.TemporaryDirectory(prefix="bigmodel-bench-") if opts.workdir is None else None
    workdir = Path(opts.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = workdir / "weights"
    try:
        _log(f"weights: {w.preset} ({param_count(config) / 1e6:.1f}M parameters) -> {hf_dir}")
        config, params = write_shared_weights(config, hf_dir, w.seed)
        sides = _build_sides(opts, config, params, hf_dir)
        if getattr(sides.get("numpy"), "allocator_tuned", False):
            result["meta"]["allocator"] = ("glibc keeps freed memory for reuse (reference_numpy.speed.allocator, "
                                           "process-wide: every side runs with it)")
        result["sides"] = {k: (v.get("error") if isinstance(v, dict) else "ok") for k, v in sides.items()}
        result["agreement"] = _agreement(sides, batch)
        result["runs"] = _runs(opts, sides, batch, count, units, peaks, hf_dir, workdir)
        if opts.onnx:
            result["onnx"] = _onnx(opts, config, sides, batch, units, hf_dir, workdir)
        if "decode" in opts.kinds and isinstance(config, GPTConfig):
            result["decode"] = _decode(opts, config, sides, peaks)
        if opts.sweep_batches:
            result["sweep"] = _sweep(opts, config, sides, peaks)
        if opts.optimisations or opts.bf16_parity:
            result["optimisations"] = _optimisations(opts, config, params, batch, count, units, peaks, sides)
        if opts.depths:
            result["depth"] = _depth(opts, config, params, batch)
        if opts.flop_check:
            result["flop_check"] = _guard("analytic FLOPs vs XLA cost_analysis (unrolled step)",
                                          lambda: flop_check(config, params, batch, count))
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["meta"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return result


def run_in_own_process(opts: SuiteOptions) -> dict[str, Any]:
    """``run_suite(opts)`` in a fresh Python process (``spawn``), returning its result.

    A fresh process keeps one workload's memory, threads and compiled code from slowing the
    next one down (numbers: ``benchmarks/results/README.md``); a plan of several workloads runs
    each one so.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_suite, opts).result()


def _headline_perf(opts: SuiteOptions) -> PerfOptions:
    """The JAX side's options for the headline runs: ``opts.perf`` in the workload's dtype."""
    w = opts.workload
    if w.dtype != "float32" and opts.perf.compute_dtype is None:
        return dataclasses.replace(opts.perf, compute_dtype=w.dtype)
    return opts.perf


def _build_sides(opts: SuiteOptions, config: Any, params: dict[str, Any], hf_dir: Path) -> dict[str, Any]:
    w = opts.workload
    sides: dict[str, Any] = {}
    if "jax" in opts.sides or "decode" in opts.kinds or opts.onnx:
        sides["jax"] = JaxSide(config, params, _headline_perf(opts))
    if "torch" in opts.sides:
        def make_torch() -> Any:
            return TorchSide(hf_dir, hf_architecture(config), dtype=w.dtype)
        try:
            sides["torch"] = make_torch()
        except Exception as e:  # noqa: BLE001
            sides["torch"] = {"error": f"{type(e).__name__}: {e}"}
    if "numpy" in opts.sides:
        if w.dtype != "float32":
            sides["numpy"] = {"error": "the NumPy reference computes in fp32 only (NumPy has no bf16 matmul)"}
        else:
            sides["numpy"] = NumpySide(config, params)
    return sides


def _live(sides: dict[str, Any], names: tuple[str, ...]) -> list[tuple[str, Any]]:
    return [(n, sides[n]) for n in names if n in sides and not isinstance(sides[n], dict)]


def _agreement(sides: dict[str, Any], batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each side's forward logits on the batch against HF's (or JAX's when torch is absent)."""
    logits = {}
    for name, side in _live(sides, ("jax", "torch", "numpy")):
        got = _guard(f"{name} logits", lambda side=side: {"logits": side.logits(batch)})
        if "logits" in got:
            logits[name] = got["logits"]
    if not logits:
        return {}
    ref = "torch" if "torch" in logits else next(iter(logits))
    return {"reference": ref, **{f"{n}_vs_{ref}": _relerr(v, logits[ref]) for n, v in logits.items() if n != ref}}


def measure_together(what: str, prepare: dict[str, Callable[[], Prepared]], opts: SuiteOptions,
                     *, min_time: float | None = None, max_reps: int | None = None) -> dict[str, dict[str, Any]]:
    """Prepare every step (compile + one call each; a failure becomes ``{"error": ...}``), then
    time them **interleaved** (``timing.time_interleaved``), so that their ratios survive the
    load drift of a shared machine. Returns one record per name: the step's info + ``timing``."""
    ready: list[Prepared] = []
    out: dict[str, dict[str, Any]] = {}
    for name, make in prepare.items():
        got = _guard(f"{what}: prepare {name}", lambda make=make: {"prepared": make()})
        if "prepared" in got:
            got["prepared"].name = name
            ready.append(got["prepared"])
        else:
            out[name] = got
    if ready:
        _log(f"{what}: timing {', '.join(p.name for p in ready)} interleaved")
        try:
            timings = time_interleaved(ready, min_time=opts.min_time if min_time is None else min_time,
                                       max_reps=opts.max_reps if max_reps is None else max_reps)
        except Exception as e:  # noqa: BLE001
            err = {"error": f"{type(e).__name__}: {str(e)[:800]}", "traceback": traceback.format_exc()[-2000:]}
            return {**out, **{p.name: {**p.info, **err} for p in ready}}
        for p in ready:
            out[p.name] = {**p.info, "timing": timings[p.name].as_dict(), "interleaved_with": len(ready)}
    return {name: out[name] for name in prepare}


def _runs(opts: SuiteOptions, sides: dict[str, Any], batch: dict[str, np.ndarray], count: F.FlopCount,
          units: int, peaks: dict[str, Any], hf_dir: Path, workdir: Path) -> list[dict[str, Any]]:
    w = opts.workload
    runs: list[dict[str, Any]] = []
    for kind in ("train", "forward"):
        if kind not in opts.kinds:
            continue
        per_step = w.batch * (count.train if kind == "train" else count.forward)
        names = [n for n in ("jax", "torch", "numpy") if n in opts.sides and n in sides]
        prepare = {n: (lambda side=sides[n]: getattr(side, f"prepare_{kind}")(batch))
                   for n in names if not isinstance(sides[n], dict)}
        got = measure_together(f"{kind} B={w.batch}", prepare, opts)
        for n in names:
            rec = dict(sides[n]) if isinstance(sides[n], dict) else got[n]
            runs.append(annotate({"side": n, "kind": kind, **rec}, flops_per_step=per_step, units=units,
                                 peaks=peaks, dtype=w.dtype))
    if "torch.compile" in opts.sides:
        kinds = [k for k in ("train", "forward") if k in opts.kinds]
        spec = {"workload": dataclasses.asdict(w), "hf_dir": str(hf_dir),
                "architecture": hf_architecture(w.config()), "kinds": kinds, "min_time": opts.min_time,
                "max_reps": opts.max_reps}
        _log(f"torch.compile {kinds} (subprocess, timeout {opts.torch_compile_timeout:.0f} s)")
        got = run_compiled(spec, timeout=opts.torch_compile_timeout, workdir=workdir)
        for kind in kinds:
            per_step = w.batch * (count.train if kind == "train" else count.forward)
            runs.append(annotate({"side": "torch.compile", "kind": kind, **got.get(kind, {"error": "missing"})},
                                 flops_per_step=per_step, units=units, peaks=peaks, dtype=w.dtype))
    base = {r["kind"]: r.get("units_per_s") for r in runs if r["side"] == "torch"}
    for r in runs:
        b = base.get(r["kind"])
        r["vs_torch"] = r["units_per_s"] / b if b and r.get("units_per_s") else None
    return runs


def _onnx(opts: SuiteOptions, config: Any, sides: dict[str, Any], batch: dict[str, np.ndarray], units: int,
          hf_dir: Path, workdir: Path) -> dict[str, Any]:
    """onnxruntime on the ONNX export of the shared HF directory, beside the JAX forward on the
    same batch, both prepared and then timed interleaved (``measure_together``). Any failure
    (torch / onnxruntime missing, a model the exporter refuses, a side that fails) is the
    record's ``error``, as for every other side."""
    w = opts.workload
    if w.dtype != "float32":
        return {"error": f"onnxruntime runs the fp32 graph of the hf export; it is compared with the JAX "
                         f"forward in float32 only (this run: --dtype {w.dtype})"}
    jax_side = sides.get("jax")
    if jax_side is None or isinstance(jax_side, dict):
        return {"error": f"the JAX side did not build: {(jax_side or {}).get('error')}"}
    exported = _guard("onnx export (bigmodel export --format onnx)", lambda: onnx_latency.export_onnx(
        hf_dir, hf_architecture(config), workdir / "onnx"))
    if "error" in exported:
        return exported
    got = measure_together(f"forward B={w.batch}: JAX vs onnxruntime", {
        "jax": lambda: jax_side.prepare_forward(batch),
        "onnxruntime": lambda: onnx_latency.prepare_onnxruntime(exported["path"], inputs_only(batch))}, opts)
    ort_logits = got["onnxruntime"].pop("logits", None)
    failed = [f"{n}: {r['error']}" for n, r in got.items() if "error" in r]
    if failed:
        return {"error": "; ".join(failed), "opset": exported["opset"], "runs": list(got.values())}
    return _guard("onnx record", lambda: onnx_latency.summarise(got["jax"], got["onnxruntime"],
                                                                jax_side.logits(batch), ort_logits, exported, units))


def _decode(opts: SuiteOptions, config: GPTConfig, sides: dict[str, Any], peaks: dict[str, Any]) -> dict[str, Any]:
    """Batch-``decode_batch`` greedy decoding of ``decode_new_tokens`` after a random prompt."""
    B, P, n = opts.decode_batch, opts.decode_prompt_len, opts.decode_new_tokens
    prompt = np.random.default_rng(opts.workload.seed + 1).integers(0, config.vocab_size, (B, P)).astype(np.int64)
    bw = (peaks.get("bandwidth") or {}).get("best")
    out: dict[str, Any] = {"batch": B, "prompt_len": P, "new_tokens": n, "bandwidth": bw, "runs": []}
    tokens: dict[str, np.ndarray] = {}
    live = [(name, side) for name, side in _live(sides, ("jax", "torch", "numpy")) if name in opts.sides or name == "jax"]
    prepare = {name: (lambda side=side: side.prepare_decode(prompt, n)) for name, side in live}
    if "jax" in prepare:  # our layout for decoding, and generate's default (scan) next to it
        prepare["jax"] = lambda: sides["jax"].prepare_decode(prompt, n, layout=opts.decode_layout)
        prepare["jax scan"] = lambda: sides["jax"].prepare_decode(prompt, n, layout=PerfOptions())
    got = measure_together(f"decode B={B} new={n}", prepare, opts)
    for name in prepare:
        rec = got[name]
        if "tokens" in rec:
            tokens[name] = np.asarray(rec.pop("tokens"))
        itemsize = 2 if opts.workload.dtype == "bfloat16" and name != "numpy" else 4
        need = F.decode_bytes_per_token(config, param_count(config) * itemsize, batch=B, prompt_len=P,
                                        new_tokens=n, kv_itemsize=itemsize)
        rec.update({"side": name, "bytes_per_step": need})
        if "timing" in rec:
            t = rec["timing"]["median"]
            rec["tokens_per_s"] = B * n / t
            if bw:
                rec["bound_tokens_per_s"] = B * bw / need["total"]
                rec["fraction_of_bound"] = rec["tokens_per_s"] / rec["bound_tokens_per_s"]
        out["runs"].append(rec)
    ref = tokens.get("torch")
    base = next((r.get("tokens_per_s") for r in out["runs"] if r["side"] == "torch"), None)
    for r in out["runs"]:
        got = tokens.get(r["side"])
        r["identical_to_torch"] = None if ref is None or got is None else bool(np.array_equal(got, ref))
        r["vs_torch"] = r["tokens_per_s"] / base if base and r.get("tokens_per_s") else None
        if got is not None:
            r["first_tokens"] = got[0, :8].tolist()
    return out


def _sweep(opts: SuiteOptions, config: Any, sides: dict[str, Any], peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """Forward throughput against batch size, per side (short timings: this is the plot)."""
    w = opts.workload
    T = tokens_per_example(config, w.seq_len)
    count = F.forward_flops(config, T)
    out = []
    for B in opts.sweep_batches:
        b = make_batch(config, B, w.seq_len, w.seed)
        live = _live(sides, opts.sweep_sides)
        got = measure_together(f"sweep forward B={B}", {
            name: (lambda side=side: side.prepare_forward(b)) for name, side in live}, opts,
            min_time=max(opts.min_time / 3, 0.2), max_reps=max(opts.max_reps // 2, 3))
        for name, _ in live:
            rec = annotate({"side": name, "batch": B, **got[name]}, flops_per_step=B * count.forward,
                           units=units_per_step(config, B, w.seq_len), peaks=peaks, dtype=w.dtype)
            out.append({k: rec.get(k) for k in ("side", "batch", "units_per_s", "step_s", "achieved_flops",
                                                 "mfu_measured", "error")})
    return out


def _tree_relerr(a: Any, b: Any) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(np.max(np.abs(y))) for y in lb)
    return num / max(den, 1e-30)


TORCH_REFERENCE = "HF torch eager (reference)"


def _optimisations(opts: SuiteOptions, config: Any, params: dict[str, Any], batch: dict[str, np.ndarray],
                   count: F.FlopCount, units: int, peaks: dict[str, Any], sides: dict[str, Any]) -> dict[str, Any]:
    """The JAX training step per PerfOptions variant (the first is the baseline), plus HF's
    eager step when torch is measured, all prepared first and then timed **interleaved**: "vs
    first" and "vs HF torch" compare steps that saw the same load."""
    w = opts.workload
    T = tokens_per_example(config, w.seq_len)
    out: dict[str, Any] = {"runs": [], "note": "achieved FLOP/s and MFU count the FLOPs each variant executes "
                           "(mlm_capacity runs the vocabulary head on fewer rows); tokens/s compare the same work"}
    variants = list(dict.fromkeys(opts.optimisations))
    shared = jax.tree.map(jnp.asarray, params)  # one device copy for every non-donating variant
    shared_opt = make_optimizer().init(shared)
    prepare = {perf.label(): (lambda perf=perf: JaxSide(config, params, perf, params=shared, opt_state=shared_opt)
                              .prepare_train(batch)) for perf in variants}
    torch_side = sides.get("torch")
    if torch_side is not None and not isinstance(torch_side, dict):
        prepare[TORCH_REFERENCE] = lambda: torch_side.prepare_train(batch)
    got = measure_together("optimisations", prepare, opts)
    torch_rate = None
    if TORCH_REFERENCE in got and "timing" in got[TORCH_REFERENCE]:
        torch_rate = units / got[TORCH_REFERENCE]["timing"]["median"]
        out["torch_reference"] = annotate(dict(got[TORCH_REFERENCE]), flops_per_step=w.batch * count.train,
                                          units=units, peaks=peaks, dtype=w.dtype)
    base_rate = None
    for perf in variants:
        per_step = w.batch * count.train
        if perf.mlm_capacity is not None and isinstance(config, BertConfig):
            per_step = w.batch * F.forward_flops(
                config, T, mlm_positions=mlm_rows(perf, w.batch, T) / w.batch).train
        rec = got[perf.label()]
        dtype = perf.compute_dtype or "float32"
        rec = annotate({"perf": perf.label(), "options": dataclasses.asdict(perf), **rec},
                       flops_per_step=per_step, units=units, peaks=peaks, dtype=dtype)
        if base_rate is None:
            base_rate = rec.get("units_per_s")
        rec["vs_first"] = rec["units_per_s"] / base_rate if base_rate and rec.get("units_per_s") else None
        rec["vs_torch"] = rec["units_per_s"] / torch_rate if torch_rate and rec.get("units_per_s") else None
        out["runs"].append(rec)
    if opts.bf16_parity:
        out["bf16_parity"] = _guard("bf16 mixed precision vs fp32: loss and gradients",
                                    lambda: bf16_parity(config, params, batch))
    return out


def bf16_parity(config: Any, params: dict[str, Any], batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Loss and gradients of bf16 mixed precision against fp32 on the same weights and batch:
    relative loss difference and the normwise gradient error (max |g_bf16 - g_fp32| / max |g_fp32|)
    over the whole tree, plus the worst leaf."""
    l32, g32 = JaxSide(config, params, PerfOptions()).loss_and_grads(batch)
    l16, g16 = JaxSide(config, params, PerfOptions(compute_dtype="bfloat16")).loss_and_grads(batch)

    worst = ("", 0.0)
    d32 = dict(tree_leaves_with_path(g32))
    for path, a in tree_leaves_with_path(g16):
        b = d32[path]
        e = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        if e > worst[1]:
            worst = (path, e)
    return {"loss_fp32": l32, "loss_bf16": l16, "loss_rel_diff": abs(l16 - l32) / max(abs(l32), 1e-30),
            "grad_rel_err": _tree_relerr(g16, g32), "worst_leaf": worst[0], "worst_leaf_rel_err": worst[1]}


def _depth(opts: SuiteOptions, config: Any, params: dict[str, Any], batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compile time of the training step at each depth in ``opts.depths``, with ``lax.scan`` over
    the layers and unrolled. New random weights per depth (compile time does not read values)."""
    rows = []
    for L in opts.depths:
        cfg = dataclasses.replace(config, n_layers=L)
        p = init_reference(cfg, 0)
        for scan in (True, False):
            perf = dataclasses.replace(opts.perf, scan_layers=scan)
            side = JaxSide(cfg, p, perf)

            def go(side: Any = side) -> dict[str, Any]:
                c = side.compile_train(batch)
                return {"lower_s": c["lower_s"], "compile_s": c["compile_s"],
                        "total_s": c["lower_s"] + c["compile_s"]}

            rows.append({"n_layers": L, "scan": scan, **_guard(f"compile train L={L} scan={scan}", go)})
    out: dict[str, Any] = {"rows": rows}
    if len(opts.depths) >= 2:
        lo, hi = min(opts.depths), max(opts.depths)
        for scan in (True, False):
            a = next((r for r in rows if r["n_layers"] == lo and r["scan"] == scan and "total_s" in r), None)
            b = next((r for r in rows if r["n_layers"] == hi and r["scan"] == scan and "total_s" in r), None)
            if a and b:
                out[f"ratio_{hi}_over_{lo}_{'scan' if scan else 'unrolled'}"] = b["total_s"] / a["total_s"]
    return out


def flop_check(config: Any, params: dict[str, Any], batch: dict[str, np.ndarray], count: F.FlopCount,
               perf: PerfOptions | None = None) -> dict[str, Any]:
    """Analytic FLOPs of one training step (``value_and_grad`` of the loss, no optimizer) and of
    one forward, against XLA's ``cost_analysis`` of the same computation compiled **unrolled**
    (``scan_layers=False``: XLA counts a while-loop body once, whatever its trip count)."""
    perf = dataclasses.replace(perf or PerfOptions(), scan_layers=False)
    B = next(iter(batch.values())).shape[0]
    p = jax.tree.map(jnp.asarray, params)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    grad = jax.jit(jax.value_and_grad(loss_fn(config, perf))).lower(p, b).compile()
    fwd = jax.jit(forward_fn(config, perf)).lower(p, inputs_only(b)).compile()
    xla_train, xla_fwd = cost_of(grad)["flops"], cost_of(fwd)["flops"]
    a_train, a_fwd = B * count.train, B * count.forward
    return {"analytic_train": a_train, "xla_train": xla_train,
            "train_ratio": xla_train / a_train if xla_train else None,
            "analytic_forward": a_fwd, "xla_forward": xla_fwd,
            "forward_ratio": xla_fwd / a_fwd if xla_fwd else None,
            "note": "XLA counts every op (elementwise, softmax, norms, loss) and matmuls at 2 FLOPs "
                    "per multiply-add; the analytic count is matmuls only, so XLA's is a few % higher"}


def shell_command(argv: list[str]) -> str:
    """The command line as one shell string, for the record."""
    return " ".join(shlex.quote(a) for a in argv)

