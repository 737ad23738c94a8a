"""Named benchmark plans: a list of suite runs plus the issue's targets read off their results.

* ``smoke``        tiny configs, every section, a few seconds per run: proves the suite works
                   (``tests/test_benchmarks.py`` runs it). Never read its numbers.
* ``cpu-targets``  the CPU targets: bert-base masked-LM at 8 x 128 (JAX / HF eager /
                   torch.compile / NumPy, the optimisations on / off, bf16 parity, the FLOP check,
                   compile time at 2 vs 24 layers, forward against batch size) and GPT-2 124M
                   batch-1 greedy decoding. Tens of minutes on 2 cores.
* ``gpu``          one GPU in at most ~8 minutes: GPT-2 124M and bert-base bf16 training (JAX vs
                   HF eager), the optimisations on GPT-2, and batch-1 bf16 decoding of
                   Llama-3.2-1B shapes against the HBM bandwidth bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bigmodel_apps.bench.suite import SuiteOptions
from bigmodel_apps.bench.workloads import Workload
from bigmodel_jax.perf import PerfOptions


@dataclass(frozen=True)
class Run:
    """One suite run of a plan, written as ``<plan>-<name>.{json,md,png}``."""

    name: str
    options: SuiteOptions


def _variants(*, gpu: bool, bf16: bool, mlm: bool = False) -> tuple[PerfOptions, ...]:
    """The optimisation on/off list: the default first, then each switch alone, then the
    combination we recommend (``mlm``: BERT's gathered masked-LM head alone and with it).
    ``gpu``: a shorter list around the GPU headline (bf16, donated buffers, cuDNN attention),
    each switch turned off or on once, to fit the 8-minute budget (no unrolled compile)."""
    r = dataclasses.replace
    if gpu:
        head = PerfOptions(compute_dtype="bfloat16", donate=True, attention="dot_product_attention")
        return (head, r(head, attention="einsum"), r(head, donate=False), r(head, fused_qkv=True),
                r(head, remat="dots_no_batch"))
    base = PerfOptions(compute_dtype="bfloat16") if bf16 else PerfOptions()
    out = [
        base,
        r(base, donate=True),
        r(base, fused_qkv=True),
        r(base, attention="dot_product_attention"),
        r(base, remat="dots_no_batch"),
        r(base, remat="full"),
        r(base, scan_layers=False),
    ]
    if not bf16:
        out.append(r(base, compute_dtype="bfloat16"))
    best = r(base, donate=True, fused_qkv=True, attention="dot_product_attention")
    out.append(best)
    if mlm:
        out += [r(base, mlm_capacity=0.25), r(best, mlm_capacity=0.25)]
    return tuple(out)


def smoke(command: str = "") -> list[Run]:
    """Seconds: tiny BERT (every side and section) and tiny GPT-2 decoding."""
    quick = dict(min_time=0.05, max_reps=3, matmul_n=256, bandwidth_bytes=16 * 2**20, command=command)
    bert = SuiteOptions(
        Workload("bert-tiny", batch=2, seq_len=16),
        sides=("jax", "torch", "numpy"), kinds=("train", "forward"),
        sweep_batches=(1, 2), optimisations=(PerfOptions(), PerfOptions(donate=True, fused_qkv=True),
                                             PerfOptions(remat="full", attention="dot_product_attention")),
        bf16_parity=True, depths=(2, 4), **quick)
    gpt = SuiteOptions(Workload("gpt2-tiny", batch=2, seq_len=16), sides=("jax", "torch", "numpy"),
                       kinds=("decode",), decode_new_tokens=6, decode_prompt_len=4, flop_check=False, **quick)
    return [Run("bert-tiny", bert), Run("gpt2-tiny-decode", gpt)]


def cpu_targets(command: str = "") -> list[Run]:
    """The CPU targets of the issue (see the module docstring)."""
    bert = SuiteOptions(
        Workload("bert-base", batch=8, seq_len=128),
        sides=("jax", "torch", "torch.compile", "numpy"), kinds=("train", "forward"),
        min_time=20.0, max_reps=10, sweep_batches=(1, 2, 4, 8),
        optimisations=_variants(gpu=False, bf16=False, mlm=True), bf16_parity=True, depths=(2, 24),
        matmul_n=2048, bandwidth_bytes=512 * 2**20, command=command)
    gpt = SuiteOptions(
        Workload("gpt2", batch=1, seq_len=8), sides=("jax", "torch", "numpy"), kinds=("decode",),
        min_time=10.0, max_reps=10, decode_prompt_len=8, decode_new_tokens=64, flop_check=False,
        matmul_n=2048, bandwidth_bytes=512 * 2**20, command=command)
    return [Run("bert-base", bert), Run("gpt2-decode", gpt)]


def gpu(command: str = "") -> list[Run]:
    """One GPU, about 8 minutes: bf16 training of GPT-2 124M and bert-base, optimisations,
    batch-1 decoding of a 1.2B Llama-shaped model."""
    common = dict(min_time=2.0, max_reps=20, matmul_n=8192, bandwidth_bytes=4 * 2**30, command=command,
                  torch_compile_timeout=150.0)
    gpt = SuiteOptions(
        Workload("gpt2", batch=32, seq_len=1024, dtype="bfloat16"),
        sides=("jax", "torch", "torch.compile"), kinds=("train", "forward"),
        perf=PerfOptions(compute_dtype="bfloat16", donate=True, attention="dot_product_attention"),
        optimisations=_variants(gpu=True, bf16=True), bf16_parity=True, flop_check=False, **common)
    bert = SuiteOptions(
        Workload("bert-base", batch=64, seq_len=512, dtype="bfloat16"), sides=("jax", "torch"),
        kinds=("train", "forward"), flop_check=False,
        perf=PerfOptions(compute_dtype="bfloat16", donate=True, attention="dot_product_attention"), **common)
    llama = SuiteOptions(
        Workload("llama-3.2-1b", batch=1, seq_len=8, dtype="bfloat16"), sides=("jax", "torch"),
        kinds=("decode",), decode_prompt_len=128, decode_new_tokens=256, flop_check=False, **common)
    return [Run("gpt2", gpt), Run("bert-base", bert), Run("llama-1b-decode", llama)]


PLANS: dict[str, Callable[[str], list[Run]]] = {"smoke": smoke, "cpu-targets": cpu_targets, "gpu": gpu}


# --------------------------------------------------------------------------------------------
# the targets, read off a plan's results


def _run(results: dict[str, Any], name: str) -> dict[str, Any]:
    return results.get(name) or {}


def _rec(result: dict[str, Any], side: str, kind: str) -> dict[str, Any]:
    return next((r for r in result.get("runs") or [] if r["side"] == side and r["kind"] == kind), {})


def _flops_per_unit(rec: dict[str, Any]) -> float:
    """Analytic FLOPs per token (image) of a timed record."""
    return rec["flops_per_step"] / rec["units"]


def _best_jax_train(result: dict[str, Any], dtype: str | None = None) -> tuple[float | None, str, float | None]:
    """Fastest JAX training step among the headline run and the optimisation variants
    (``dtype``: only variants computing in it): (tokens/s, variant, its ratio to HF torch measured
    in the same interleaved group)."""
    cands = []
    head = _rec(result, "jax", "train")
    if head.get("units_per_s") and (dtype is None or result["workload"]["dtype"] == dtype):
        cands.append((head["units_per_s"], head.get("perf", "default"), head.get("vs_torch")))
    for r in (result.get("optimisations") or {}).get("runs", []):
        d = (r.get("options") or {}).get("compute_dtype") or "float32"
        if r.get("units_per_s") and (dtype is None or d == dtype):
            cands.append((r["units_per_s"], r["perf"], r.get("vs_torch")))
    return max(cands, key=lambda c: c[0]) if cands else (None, "", None)


def _best_jax_mfu(result: dict[str, Any], dtype: str) -> tuple[float | None, str]:
    """Highest MFU against the measured peak among the JAX training steps computing in
    ``dtype``, each counted with the FLOPs that variant executes (the gathered MLM head runs
    fewer than the full one, so tokens/s and MFU can rank variants differently)."""
    cands = []
    head = _rec(result, "jax", "train")
    if head.get("mfu_measured") and result.get("workload", {}).get("dtype") == dtype:
        cands.append((head["mfu_measured"], head.get("perf", "default")))
    for r in (result.get("optimisations") or {}).get("runs", []):
        d = (r.get("options") or {}).get("compute_dtype") or "float32"
        if r.get("mfu_measured") and d == dtype:
            cands.append((r["mfu_measured"], r["perf"]))
    return max(cands) if cands else (None, "")


def targets(plan: str, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{target, value, goal, met, note}`` for the plan's targets."""
    rows: list[dict[str, Any]] = []

    def row(target: str, value: float | None, goal: float, higher: bool, note: str = "") -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        rows.append({"target": target, "value": value, "goal": goal, "higher_is_better": higher, "met": met,
                     "note": note})

    if plan in ("cpu-targets", "smoke"):
        name = "bert-base" if plan == "cpu-targets" else "bert-tiny"
        bert = _run(results, name)
        _, label, vs = _best_jax_train(bert)
        row("JAX masked-LM train step / HF-PyTorch fp32 (tokens/s)", vs, 1.5, True,
            f"fastest JAX variant: {label}; both timed interleaved in one group")
        mfu, label32 = _best_jax_mfu(bert, "float32")
        row("JAX fp32 train step / fp32 matmul peak measured in the run", mfu, 0.6, True,
            f"variant: {label32}; FLOPs it executes")
        row("NumPy reference train step / HF-PyTorch fp32", _rec(bert, "numpy", "train").get("vs_torch"), 0.7, True,
            "timed interleaved with HF and JAX")
        depth = bert.get("depth") or {}
        key = next((k for k in depth if k.startswith("ratio_") and k.endswith("_scan")), None)
        row(f"compile time, {key[6:-5].replace('_over_', ' vs ') if key else '24 vs 2'} layers (scan)",
            depth.get(key) if key else None, 1.5, False)
        gname = "gpt2-decode" if plan == "cpu-targets" else "gpt2-tiny-decode"
        dec = (_run(results, gname).get("decode") or {}).get("runs", [])
        j = next((r for r in dec if r["side"] == "jax"), {})
        row("GPT-2 batch-1 greedy decoding / HF generate (tokens/s)", j.get("vs_torch"), 2.0, True,
            f"identical tokens: {j.get('identical_to_torch')}")
    if plan == "gpu":
        for name, label in (("gpt2", "GPT-2 124M bf16 training MFU"), ("bert-base", "bert-base bf16 training MFU")):
            r = _run(results, name)
            best, variant, _ = _best_jax_train(r, "bfloat16")
            rec = _rec(r, "jax", "train")
            pub = rec.get("published_peak")
            row(label + " (published peak)", best * _flops_per_unit(rec) / pub if best and pub and rec.get("units")
                else None, 0.5, True, f"variant: {variant}")
        dec = (_run(results, "llama-1b-decode").get("decode") or {}).get("runs", [])
        j = next((r for r in dec if r["side"] == "jax"), {})
        row("Llama-3.2-1B batch-1 decoding / bandwidth bound", j.get("fraction_of_bound"), 0.5, True,
            f"identical tokens to HF: {j.get('identical_to_torch')}")
    return rows


def targets_markdown(plan: str, rows: list[dict[str, Any]], files: list[str]) -> str:
    lines = [f"# Targets ({plan})", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.3g}"
        goal = f"{'>=' if r['higher_is_better'] else '<='} {r['goal']}"
        met = {True: "yes", False: "no", None: "n/a"}[r["met"]]
        lines.append(f"| {r['target']} | {v} | {goal} | {met}{' (' + r['note'] + ')' if r['note'] else ''} |")
    lines += ["", "Runs: " + ", ".join(f"[{f}]({f})" for f in files)]
    return "\n".join(lines) + "\n"
