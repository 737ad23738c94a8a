"""Weight-only quantisation on CPU: GPT-2-sized matmuls (M = 1) and batch-1 GPT-2 124M decoding,
fp32 vs int8 / int4 (dequantise at use), plus the parameter bytes (random weights: speed and
bytes do not depend on the values); and, for trained run directories (``--runs DIR ...``), each
run's test metrics with fp32 / int8 / int4 weights. Writes benchmarks/results/quant_bench.json.

    .venv/bin/python benchmarks/quant_bench.py [--tokens 16] [--skip-decode] [--skip-matmul]
        [--runs runs/gpt-stdlib runs/vit-digits] [--split test] [--out NAME.json] [--hf]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax import quant as jq
from bigmodel_jax.generation.sampling import generate
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.perf import PerfOptions
from reference_numpy import quant as rq
from reference_numpy.configs import preset


def _median_us(f, *args, n: int = 30) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e6)


def matmuls() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for K, N in ((768, 3072), (3072, 768), (768, 50257)):
        w = jnp.asarray(rng.standard_normal((K, N)).astype(np.float32) * 0.02)
        x = jnp.asarray(rng.standard_normal((1, K)).astype(np.float32))
        qw = jq.quantize_int8(w, (0,))
        row = {"K": K, "N": N, "fp32_us": _median_us(jax.jit(lambda a, b: a @ b), x, w),
               "bf16_us": _median_us(jax.jit(lambda a, b: (a.astype(b.dtype) @ b).astype(jnp.float32)), x,
                                     w.astype(jnp.bfloat16))}
        for mode in jq.QDOT_MODES:
            row[f"int8_{mode}_us"] = _median_us(jax.jit(lambda a, q, m=mode: jq.qdot(a, q, m)), x, qw)
        rows.append(row)
        print(row, flush=True)
    return rows


def decode(tokens: int, hf: bool = False) -> list[dict]:
    config = preset("gpt2")
    params = jax.tree.map(jnp.asarray, jgpt.init(config, seed=0))
    prompt = jnp.asarray(np.arange(8)[None] % config.vocab_size)
    plain = PerfOptions()  # the scan layout: the only one that takes quantised leaves today
    rows = []
    for label, tree, perf in (("fp32 (decode layout)", params, None), ("fp32", params, plain),
                              ("int8", jq.quantize_tree(params, 8), plain),
                              ("int4", jq.quantize_tree(params, 4), plain)):
        def run(p, ids, perf=perf):  # generate jits its own token loop
            return generate(p, ids, config, max_new_tokens=tokens, perf=perf)

        jax.block_until_ready(run(tree, prompt))
        t = time.perf_counter()
        jax.block_until_ready(run(tree, prompt))
        dt = time.perf_counter() - t
        row = {"variant": label, "tokens_per_s": tokens / dt, "param_bytes": rq.tree_nbytes(tree)}
        rows.append(row)
        print(row, flush=True)
    if hf:
        rows.append(hf_generate(config, np.asarray(prompt), tokens))
    return rows


def hf_generate(config, prompt: np.ndarray, tokens: int) -> dict:
    """HF transformers' greedy ``generate`` (PyTorch fp32, KV cache) on a random GPT-2 of the same
    config, batch 1, exactly ``tokens`` new tokens: the field's baseline for the same decode."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=config.n_layers, n_embd=config.d_model, n_head=config.n_heads,
                                        n_inner=config.d_ff, vocab_size=config.vocab_size,
                                        n_positions=config.max_len)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    ids = torch.as_tensor(prompt, dtype=torch.long)

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    run()
    t = time.perf_counter()
    run()
    dt = time.perf_counter() - t
    row = {"variant": f"HF transformers {transformers.__version__} generate (torch {torch.__version__}, fp32, "
                      f"{torch.get_num_threads()} threads)", "tokens_per_s": tokens / dt,
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    print(row, flush=True)
    return row


def run_metrics(run_dir: str, split: str) -> list[dict]:
    """The run's task metrics on ``split`` with its fp32 weights and with int8 / int4 ones (the
    task's own evaluate, i.e. the model's one forward, on the quantised tree)."""
    from bigmodel_train.trainer import load_run  # the app layer: only this measurement needs it

    _, task, params, state = load_run(run_dir)
    rows = []
    for label, tree in (("fp32", params), ("int8", rq.quantize_tree(params, 8)), ("int4", rq.quantize_tree(params, 4))):
        m = task.evaluate(jax.tree.map(jnp.asarray, tree), split, "jax")
        row = {"run": run_dir, "step": int(state["step"]), "split": split, "weights": label,
               "param_bytes": rq.tree_nbytes(tree), **{k: (float(v) if not isinstance(v, str) else v) for k, v in m.items() if np.isscalar(v)}}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--hf", action="store_true", help="decode: also HF transformers' generate (needs torch)")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default=None, help="file name under benchmarks/results (default: by what ran)")
    args = ap.parse_args()
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    out = {"jax": jax.__version__, "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(),
           "simd": [f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f],
           "matmul_m1": [] if args.skip_matmul else matmuls(),
           "decode_batch1": [] if args.skip_decode else decode(args.tokens, args.hf),
           "runs": [r for d in args.runs for r in run_metrics(d, args.split)]}
    path = Path(__file__).parent / "results" / (args.out or (f"quant_runs_{args.split}.json" if args.skip_matmul
                                                             and args.skip_decode else "quant_bench.json"))
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
