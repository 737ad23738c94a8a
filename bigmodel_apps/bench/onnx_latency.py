"""onnxruntime's latency beside our JAX forward (issue #16): ``bigmodel bench --onnx``.

The suite exports the benchmarked model with the project's own exporter (``bigmodel export
--format onnx``: ``torch.onnx`` of the ``hf`` export, ``bigmodel_port.export.onnx``) from the HF
directory it already writes for the torch side, runs the graph in onnxruntime (CPU provider) on
the same batch as the JAX forward, and times both **interleaved** with the suite's rules
(``timing.time_interleaved``: same ``--min-time`` / ``--max-reps``, the median reported), so
their ratio survives a shared machine's load drift. The record (``suite``'s ``result["onnx"]``)
holds both latencies, their ratio, the max abs difference of the logits, the opset,
onnxruntime's version and the CPU flags that decide both sides' matmul speed.

``onnx_vs_jax`` does the same for any ONNX file and JAX function, outside the suite.

Imports neither jax, torch nor onnxruntime at module level: ``report`` renders the section with
``markdown_lines`` and must load without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_apps.bench.hardware import PeakMemory, cpu_flags
from bigmodel_apps.bench.timing import Prepared, Stopwatch, time_interleaved

__all__ = ["export_onnx", "feed_for", "markdown_lines", "onnx_vs_jax", "prepare_onnxruntime", "summarise"]

PROVIDER = "CPUExecutionProvider"  # what issue #16 asks to time; the GPU providers are not measured


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        from bigmodel_train.extras import missing_extra

        raise missing_extra("onnxruntime", "timing the ONNX graph", err, extra="deploy") from err
    return onnxruntime


def export_onnx(hf_dir: str | Path, architecture: str, out: str | Path) -> dict[str, Any]:
    """Export the HF directory ``hf_dir`` (class ``architecture``) to ONNX in ``out`` with
    ``bigmodel export``'s exporter; returns the graph's path, the opset, the exporter and the
    export seconds. Raises ``MissingExtraError`` naming the extra when torch or onnxruntime is
    missing, ``ValueError`` when the model cannot be exported."""
    from bigmodel_train.extras import missing_extra

    for package, extra in (("torch", "hf"), ("onnx", "deploy")):
        try:
            __import__(package)
        except ImportError as err:
            raise missing_extra(package, "the ONNX export (torch.onnx of the hf export)", err, extra=extra) from err
    _import_onnxruntime()  # fail before the export's seconds are spent when it cannot run the graph
    from bigmodel_port.export import export, from_hf_dir

    model = from_hf_dir(hf_dir, architecture)
    with Stopwatch() as sw:
        summary = export(model, out, "onnx", overwrite=True)
    manifest = json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8"))
    return {"path": str(Path(out) / manifest["graphs"]["model"]["file"]), "opset": summary["opset"],
            "exporter": manifest["exporter"], "export_s": sw.seconds}


def feed_for(names: list[str], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs ``names`` from a suite batch (HF key names). An ``attention_mask`` the
    batch lacks (GPT batches carry ``input_ids`` only) is all ones: no padding, which is what the
    JAX forward computes without a mask. Any other missing input is a ``ValueError``."""
    feed = {}
    for n in names:
        if n in batch:
            feed[n] = np.ascontiguousarray(batch[n])
        elif n == "attention_mask" and "input_ids" in batch:
            feed[n] = np.ones_like(batch["input_ids"], dtype=np.int64)
        else:
            raise ValueError(f"the ONNX graph takes input {n!r}, which the batch lacks (it has {sorted(batch)})")
    return feed


def prepare_onnxruntime(onnx_path: str | Path, batch: dict[str, np.ndarray],
                        name: str = "onnxruntime forward") -> Prepared:
    """An onnxruntime session (CPU provider) on ``onnx_path``, run once on ``batch`` (its peak
    memory measured on that call); ``info["logits"]`` is that call's first output, which the
    caller compares and drops before the record is written."""
    ort = _import_onnxruntime()
    with Stopwatch() as load:
        session = ort.InferenceSession(str(onnx_path), providers=[PROVIDER])
    feed = feed_for([i.name for i in session.get_inputs()], batch)
    out: dict[str, Any] = {}

    def call() -> None:
        out["logits"] = session.run(None, feed)[0]

    with PeakMemory() as mem:
        call()
    return Prepared(name, call, {"session_s": load.seconds, "memory": mem.as_dict(),
                                 "providers": session.get_providers(), "logits": out["logits"],
                                 # 0 = onnxruntime's default (one thread per physical core)
                                 "intra_op_threads": session.get_session_options().intra_op_num_threads})


def summarise(jax_rec: dict[str, Any], ort_rec: dict[str, Any], jax_logits: np.ndarray, ort_logits: np.ndarray,
              exported: dict[str, Any], units: int) -> dict[str, Any]:
    """The suite's ``onnx`` record from the two timed records (``measure_together``), both
    sides' logits on the batch, and ``export_onnx``'s summary. ``units``: tokens (or images) per
    call, for the throughput column."""
    ort = _import_onnxruntime()
    if jax_logits.shape != ort_logits.shape:
        raise ValueError(f"logits shapes differ: JAX {jax_logits.shape}, onnxruntime {ort_logits.shape}")
    rec: dict[str, Any] = {
        "opset": exported["opset"], "exporter": exported["exporter"], "export_s": exported["export_s"],
        "onnxruntime": ort.__version__, "provider": PROVIDER, "cpu_flags": cpu_flags(),
        "max_abs_diff": float(np.max(np.abs(np.asarray(jax_logits, np.float32) - ort_logits))),
        "logits_max_abs": float(np.max(np.abs(ort_logits))), "logits_shape": list(ort_logits.shape), "runs": [],
    }
    for side, r in (("jax", jax_rec), ("onnxruntime", ort_rec)):
        if "timing" in r:
            t = r["timing"]["median"]
            r = {**r, "ms": 1e3 * t, "units_per_s": units / t}
        rec["runs"].append({"side": side, **r})
    j, o = (r.get("ms") for r in rec["runs"])
    rec.update({"jax_ms": j, "onnxruntime_ms": o, "onnxruntime_over_jax": o / j if j and o else None})
    return rec


def markdown_lines(rec: dict[str, Any], unit: str = "tok") -> list[str]:
    """The report's section for a suite ``onnx`` record (``report.markdown``)."""
    lines = ["", "## ONNX Runtime beside our JAX forward (same batch, timed interleaved)", ""]
    if "error" in rec:
        return lines + [f"not measured: {rec['error'][:300]}"]
    lines += [f"| runtime | ms per forward | {unit}/s | time / JAX | max abs logits diff vs JAX |", "|---|---|---|---|---|"]
    for r in rec["runs"]:
        label = "our JAX forward" if r["side"] == "jax" else f"onnxruntime {rec['onnxruntime']} ({rec['provider']})"
        if "ms" not in r:
            lines.append(f"| {label} | error: {str(r.get('error', 'not timed'))[:120]} | | | |")
            continue
        diff = "" if r["side"] == "jax" else f"{rec['max_abs_diff']:.1e} (logits up to {rec['logits_max_abs']:.3g})"
        speed = 1.0 if r["side"] == "jax" else rec.get("onnxruntime_over_jax")
        lines.append(f"| {label} | {r['ms']:.2f} | {r['units_per_s']:.1f} | "
                     f"{'n/a' if speed is None else f'{speed:.2f}x'} | {diff} |")
    lines += ["", f"Graph: `bigmodel export --format onnx` of the benchmarked weights, opset {rec['opset']}, "
              f"{rec['exporter']} (export {rec['export_s']:.1f} s); onnxruntime's session options are its "
              "defaults. time / JAX: the median time per forward over JAX's (below 1: onnxruntime is faster); "
              "the CPU flags are in the header."]
    return lines


def onnx_vs_jax(onnx_path: str | Path, jax_forward: Callable[..., Any], inputs: dict[str, np.ndarray], *,
                runs: int = 20) -> dict[str, Any]:
    """Median latency (ms) of onnxruntime (CPU provider) on ``onnx_path`` and of
    ``jax_forward(**inputs)`` (jit-compiled here), the same ``inputs`` (NumPy, the graph's input
    names), ``runs`` timed calls each, interleaved after one warm-up call; plus the max abs
    difference of their first outputs."""
    import jax

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    ort = _import_onnxruntime()
    theirs = prepare_onnxruntime(onnx_path, inputs, "onnxruntime")
    fwd = jax.jit(jax_forward)
    jax_in = {k: (v.astype(np.int32) if v.dtype.kind == "i" else v) for k, v in inputs.items()}
    got: dict[str, Any] = {}

    def run_jax() -> None:
        got["out"] = jax.block_until_ready(fwd(**jax_in))

    run_jax()  # compile and warm up, as prepare_onnxruntime ran its session once
    timings = time_interleaved([Prepared("jax", run_jax, {}), theirs], min_time=0.0, min_reps=runs, max_reps=runs)
    ours = got["out"]
    first = ours[0] if isinstance(ours, (tuple, list)) else ours
    return {
        "onnxruntime_ms": 1e3 * timings["onnxruntime"].median, "jax_ms": 1e3 * timings["jax"].median,
        "runs": runs, "max_abs_diff": float(np.max(np.abs(np.asarray(first) - theirs.info["logits"]))),
        "shapes": {k: list(v.shape) for k, v in inputs.items()},
        "onnxruntime": ort.__version__, "jax": jax.__version__, "cpu_flags": cpu_flags(),
    }
