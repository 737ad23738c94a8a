"""Render a suite result: JSON (everything), Markdown (the tables, ratios against HF-PyTorch), and
a PNG plot of forward throughput against batch size (matplotlib, optional: without it the plot
is skipped and the Markdown says so)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_apps.bench.onnx_latency import markdown_lines as onnx_markdown_lines
from bigmodel_port.atomic import atomic_write_bytes, atomic_write_text


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def si(x: float | None, unit: str = "") -> str:
    """1.23e11 -> '123 G' + unit; None -> 'n/a'."""
    if x is None:
        return "n/a"
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def num(x: float | None, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def _mem(rec: dict[str, Any]) -> str:
    """The most meaningful memory figure of a record: device peak (GPU), else XLA's plan for JAX
    and the RSS increase during the timed calls for the others."""
    dev = rec.get("device_memory") or {}
    if dev.get("peak_bytes_in_use"):
        return f"{mib(dev['peak_bytes_in_use'])} (device peak)"
    parts = []
    xm = (rec.get("xla_memory") or {}).get("peak_estimate")
    if xm:
        parts.append(f"{mib(xm)} (XLA plan)")
    m = rec.get("memory") or {}
    if m.get("delta_rss_bytes") is not None:
        parts.append(f"+{mib(max(m['delta_rss_bytes'], 0))} RSS")
    return ", ".join(parts) or "n/a"


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(_jsonable(result), indent=1, sort_keys=False) + "\n")
    return path


def meta_lines(meta: dict[str, Any], devices: int | None = None) -> list[str]:
    """The bullet lines every benchmark report starts with: date, machine (with its SIMD flags),
    backend (and device count), versions, the command."""
    m = meta["machine"]
    return [
        f"- date: {meta['date']}; machine: {m['cpu']} ({m['cpu_count']} cores, load {m.get('load_average')}), "
        f"backend {m['backend']} / {m['device_kind']}" + (f" x {devices}" if devices is not None else "")
        + (f"; SIMD: {', '.join(m['cpu_flags'])}" if m.get("cpu_flags") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- command: `{meta.get('command') or 'n/a'}`",
    ]


def markdown(result: dict[str, Any], plot_name: str | None = None) -> str:
    """The whole result as Markdown tables."""
    meta, wl, peaks = result["meta"], result["workload"], result.get("peaks", {})
    unit = wl.get("unit", "tokens")
    u = "img" if unit == "images" else "tok"
    lines = [
        f"# Benchmark: {wl['preset']} ({wl['architecture']}), batch {wl['batch']} x {wl['seq_len']}, {wl['dtype']}",
        "",
        *meta_lines(meta),
        *([f"- allocator: {meta['allocator']}"] if meta.get("allocator") else []),
        f"- parameters: {wl['param_count'] / 1e6:.2f}M; analytic FLOPs per example: forward "
        f"{si(wl['flops_per_example']['forward'])}, train {si(wl['flops_per_example']['train'])} "
        f"(6N + attention, full T x T scores{'; causal: only ~half of the attention term is needed' if wl['flops_per_example']['causal'] else ''})",
        "",
        "## Machine peaks measured in this run",
        "",
    ]
    mm = peaks.get("matmul", {})
    bw = peaks.get("bandwidth", {})
    lines += ["| measurement | value |", "|---|---|"]
    for k in ("jax_float32", "jax_float32_default", "jax_bfloat16", "numpy_float32", "torch_float32"):
        if isinstance(mm.get(k), (int, float)):
            lines.append(f"| matmul {k} (n={mm.get('n')}) | {si(mm[k], 'FLOP/s')} |")
    for k in ("jax_read", "jax_copy", "numpy_read", "numpy_copy"):
        if isinstance(bw.get(k), (int, float)):
            lines.append(f"| bandwidth {k} ({mib(bw.get('bytes'))} MiB) | {si(bw[k], 'B/s')} |")
    pub = peaks.get("published")
    lines.append(f"| published peak | {', '.join(f'{k} {si(v)}' for k, v in pub.items() if isinstance(v, float)) if pub else peaks.get('published_note', 'n/a')} |")
    ag = result.get("agreement") or {}
    if ag:
        lines += ["", "Same weights on every side: forward logits, max normwise error vs "
                  f"{ag['reference']}: " + ", ".join(f"{k} {v:.1e}" for k, v in ag.items() if k != "reference")]
    runs = result.get("runs") or []
    if runs:
        lines += ["", "## Training step and forward", "",
                  f"| side | kind | {u}/s | vs HF torch | step ms | achieved FLOP/s | MFU (measured peak) | "
                  "MFU (published) | compile s | memory MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            if "error" in r:
                lines.append(f"| {r['side']} | {r['kind']} | error: {r['error'][:120]} | | | | | | | |")
                continue
            comp = r.get("compile_s")
            if r["side"] == "jax" and r.get("lower_s") is not None:
                comp = r["lower_s"] + (r.get("compile_s") or 0)
            lines.append(
                f"| {r['side']} | {r['kind']} | {num(r['units_per_s'], '.1f')} | {ratio(r.get('vs_torch'))} | "
                f"{num(1e3 * r['step_s'], '.1f')} | {si(r['achieved_flops'], 'FLOP/s')} | "
                f"{pct(r.get('mfu_measured'))} | {pct(r.get('mfu_published'))} | {num(comp, '.2f')} | {_mem(r)} |")
        peak_names = {r.get("measured_peak_name") for r in runs if r.get("measured_peak_name")}
        lines += ["", f"MFU (measured peak) divides by the best matmul measured above for the dtype "
                  f"({', '.join(sorted(peak_names))}); MFU (published) by the datasheet peak (n/a on CPUs)."]
    dec = result.get("decode")
    if dec:
        lines += ["", f"## Greedy decoding, batch {dec['batch']}, prompt {dec['prompt_len']}, "
                  f"{dec['new_tokens']} new tokens (KV cache)", "",
                  "| side | tok/s | vs HF torch | bandwidth bound tok/s | % of bound | bytes/step | identical tokens to HF |",
                  "|---|---|---|---|---|---|---|"]
        for r in dec["runs"]:
            if "error" in r:
                lines.append(f"| {r['side']} | error: {r['error'][:120]} | | | | | |")
                continue
            lines.append(
                f"| {r['side']} | {num(r.get('tokens_per_s'), '.1f')} | {ratio(r.get('vs_torch'))} | "
                f"{num(r.get('bound_tokens_per_s'), '.1f')} | {pct(r.get('fraction_of_bound'))} | "
                f"{si(r['bytes_per_step']['total'], 'B')} | {r.get('identical_to_torch')} |")
        lines += ["", f"Bound = batch x bandwidth ({si(dec.get('bandwidth'), 'B/s')}, best measured above) / "
                  "bytes every step must read (all weights + the KV cache so far)."]
    if result.get("onnx"):
        lines += onnx_markdown_lines(result["onnx"], u)
    opt = result.get("optimisations")
    if opt:
        lines += ["", "## Optimisations (JAX training step; all rows timed interleaved, in one group)", "",
                  f"| options | {u}/s | vs first | vs HF torch | MFU (measured) | compile s | XLA memory plan MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in opt.get("runs", []):
            if "error" in r:
                lines.append(f"| {r['perf']} | error: {r['error'][:120]} | | | | | |")
                continue
            lines.append(f"| {r['perf']} | {num(r['units_per_s'], '.1f')} | {ratio(r.get('vs_first'))} | "
                         f"{ratio(r.get('vs_torch'))} | {pct(r.get('mfu_measured'))} | "
                         f"{num(r['lower_s'] + r['compile_s'], '.2f')} | "
                         f"{mib((r.get('xla_memory') or {}).get('peak_estimate'))} |")
        t = opt.get("torch_reference")
        if t and "units_per_s" in t:
            lines.append(f"| HF torch eager (same group) | {num(t['units_per_s'], '.1f')} | | 1.00x | "
                         f"{pct(t.get('mfu_measured'))} | | |")
        if opt.get("note"):
            lines += ["", opt["note"] + "."]
        par = opt.get("bf16_parity")
        if par and "error" not in par:
            lines += ["", f"bf16 mixed precision vs fp32 (same weights and batch): loss {par['loss_bf16']:.5f} vs "
                      f"{par['loss_fp32']:.5f} (rel. diff {par['loss_rel_diff']:.1e}); gradients normwise rel. error "
                      f"{par['grad_rel_err']:.1e} (worst leaf {par['worst_leaf']}: {par['worst_leaf_rel_err']:.1e})."]
    depth = result.get("depth")
    if depth:
        lines += ["", "## Compile time against depth (training step)", "",
                  "| layers | layer loop | trace + lower s | compile s | total s |", "|---|---|---|---|---|"]
        for r in depth["rows"]:
            if "error" in r:
                lines.append(f"| {r['n_layers']} | {'scan' if r['scan'] else 'unrolled'} | error: {r['error'][:100]} | | |")
                continue
            lines.append(f"| {r['n_layers']} | {'scan' if r['scan'] else 'unrolled'} | {r['lower_s']:.2f} | "
                         f"{r['compile_s']:.2f} | {r['total_s']:.2f} |")
        ratios = {k: v for k, v in depth.items() if k.startswith("ratio_")}
        if ratios:
            lines += ["", ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())]
    fc = result.get("flop_check")
    if fc and "error" not in fc:
        lines += ["", "## Analytic FLOPs against XLA's cost_analysis (unrolled step)", "",
                  f"train (value_and_grad): analytic {si(fc['analytic_train'])}, XLA {si(fc['xla_train'])}, "
                  f"XLA / analytic = {num(fc['train_ratio'], '.3f')}; forward: analytic {si(fc['analytic_forward'])}, "
                  f"XLA {si(fc['xla_forward'])}, ratio {num(fc['forward_ratio'], '.3f')}. {fc['note']}."]
    if result.get("sweep"):
        lines += ["", "## Forward throughput against batch size", "",
                  "| side | batch | " + f"{u}/s |", "|---|---|---|"]
        for r in result["sweep"]:
            lines.append(f"| {r['side']} | {r['batch']} | {num(r.get('units_per_s'), '.1f')} |")
        lines += ["", f"![throughput]({plot_name})" if plot_name else "(plot skipped: matplotlib not installed)"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Forward throughput against batch size, one line per side; None without matplotlib or data."""
    sweep = [r for r in result.get("sweep") or [] if r.get("units_per_s")]
    if not sweep:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    wl = result["workload"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for side in dict.fromkeys(r["side"] for r in sweep):
        pts = sorted((r["batch"], r["units_per_s"]) for r in sweep if r["side"] == side)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=side)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"forward {wl.get('unit', 'tokens')}/s")
    ax.set_title(f"{wl['preset']} forward, T={wl['seq_len']}, {wl['dtype']} ({result['meta']['machine']['device_kind']})",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_all(result: dict[str, Any], out_dir: str | Path, name: str) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and (with a sweep and matplotlib) ``<name>.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(result, out / f"{name}.json")}
    png = plot(result, out / f"{name}.png")
    if png is not None:
        paths["png"] = Path(png)
    md = out / f"{name}.md"
    atomic_write_text(md, markdown(result, Path(png).name if png else None))
    paths["md"] = md
    return paths
