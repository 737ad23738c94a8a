"""The benchmark suite (issue #6) and the switchable JAX performance options.

* Every ``PerfOptions`` layout (scan / unrolled, remat policies, fused q/k/v,
  ``dot_product_attention``, the gathered MLM head) computes the same model: loss and every
  gradient against the NumPy reference's hand-written backward in float64. bf16 mixed precision
  against the fp32 reference, at bf16's tolerance.
* The analytic FLOP count against two independent counters: ``torch.utils.flop_counter`` on HF's
  models (eager attention: exact) and XLA's ``cost_analysis`` of our unrolled step (a few %
  above: XLA also counts the elementwise ops).
* The smoke plan, run through ``benchmarks/gpu.sh`` (its CPU path), writes JSON / Markdown / PNG
  with every section and no failed measurement. Speed is never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from bigmodel_apps.bench.flops import decode_bytes_per_token, forward_flops
from bigmodel_apps.bench.jax_side import loss_fn
from bigmodel_apps.bench.suite import flop_check
from bigmodel_apps.bench.workloads import (
    Workload,
    hf_architecture,
    init_reference,
    make_batch,
    tokens_per_example,
    write_shared_weights,
)
from bigmodel_jax.perf import PerfOptions, layer_loop, mlm_rows
from reference_numpy.configs import param_count, preset
from reference_numpy.tolerances import MODEL_PARITY, normwise_error
from reference_numpy.tree import tree_leaves_with_path

pytestmark = [pytest.mark.bench, pytest.mark.hf]

ROOT = Path(__file__).resolve().parent.parent

# bf16 mixed precision vs the fp32 reference. bf16 keeps 8 significant bits (eps 7.8e-3); a
# forward through two blocks and a backward compound a few roundings, observed 6e-3..9e-3
# normwise on the gradients of these tiny models. 4e-2 keeps margin; a wrong formula (or bf16
# accumulation over long sums, which the fp32 accumulation prevents) is off by O(1).
BF16_GRAD_REL = 4e-2
BF16_LOSS_REL = 1e-2

TINY = {  # (preset, config overrides): small but every feature on (GQA and RoPE for llama)
    "bert": ("bert-tiny", {}),
    "gpt2": ("gpt2-tiny", {}),
    "llama": ("llama-tiny", {}),
    "vit": ("vit-tiny", {}),
}


def _reference_loss_and_grad(config, params, batch):
    from reference_numpy.models import bert, gpt, vit

    if config.family == "bert":
        return bert.loss_and_grad(params, batch, config, "mlm")
    return (gpt if config.family == "gpt" else vit).loss_and_grad(params, batch, config)


def _compare_trees(got, want, tol, what: str) -> None:
    """Every leaf by name; the failure message lists each leaf past tolerance."""
    want_leaves = dict(tree_leaves_with_path(want))
    bad = []
    for path, g in tree_leaves_with_path(got):
        max_abs, rel = normwise_error(np.asarray(g), want_leaves[path])
        if not tol.passes(max_abs, rel):
            bad.append(f"{path}: max_abs {max_abs:.2e} rel {rel:.2e}")
    assert not bad, f"{what}: gradients past tolerance:\n" + "\n".join(bad)


perf_options = st.builds(
    PerfOptions,
    scan_layers=st.booleans(),
    remat=st.sampled_from(["none", "full", "dots", "dots_no_batch"]),
    attention=st.sampled_from(["einsum", "dot_product_attention"]),
    fused_qkv=st.booleans(),
)


@pytest.mark.slow
@settings(max_examples=8)
@given(family=st.sampled_from(sorted(TINY)), perf=perf_options, mlm_capacity=st.sampled_from([None, 0.3, 1.0]))
def test_every_layout_computes_the_reference_model(family, perf, mlm_capacity):
    """Loss and every gradient of each PerfOptions layout vs the hand-written backward, float64."""
    name, over = TINY[family]
    config = dataclasses.replace(Workload(name, 2, 12).config(), dtype="float64", **over)
    if family == "bert":
        perf = dataclasses.replace(perf, mlm_capacity=mlm_capacity)
    params = {k: v for k, v in init_reference(config, seed=1).items()}
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    batch = make_batch(config, 2, 12, seed=2)
    if family == "vit":
        batch["pixel_values"] = batch["pixel_values"].astype(np.float64)
    want_loss, want_grads = _reference_loss_and_grad(config, params, batch)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss_fn(config, perf)))(
        jax.tree.map(jnp.asarray, params), {k: jnp.asarray(v) for k, v in batch.items()})
    tol = MODEL_PARITY["float64"]
    max_abs, rel = normwise_error(np.asarray(got_loss), np.asarray(want_loss))
    assert tol.passes(max_abs, rel), f"{perf.label()}: loss {float(got_loss)} vs {float(want_loss)}"
    _compare_trees(got_grads, want_grads, tol, f"{family} {perf.label()}")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_bf16_mixed_precision_close_to_fp32_reference(family):
    """bf16 compute with fp32 master weights: fp32 gradients come back, within bf16's tolerance."""
    name, over = TINY[family]
    config = dataclasses.replace(Workload(name, 2, 12).config(), **over)
    params = init_reference(config, seed=3)
    batch = make_batch(config, 2, 12, seed=4)
    want_loss, want_grads = _reference_loss_and_grad(config, params, batch)
    perf = PerfOptions(compute_dtype="bfloat16")
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss_fn(config, perf)))(
        jax.tree.map(jnp.asarray, params), {k: jnp.asarray(v) for k, v in batch.items()})
    assert {str(g.dtype) for g in jax.tree.leaves(got_grads)} == {"float32"}  # master-weight grads
    assert abs(float(got_loss) - float(want_loss)) <= BF16_LOSS_REL * abs(float(want_loss))
    num = max(float(np.max(np.abs(np.asarray(g) - w))) for (_, g), (_, w) in
              zip(tree_leaves_with_path(got_grads), tree_leaves_with_path(want_grads)))
    den = max(float(np.max(np.abs(w))) for _, w in tree_leaves_with_path(want_grads))
    assert num / den <= BF16_GRAD_REL, f"bf16 gradients rel error {num / den:.2e}"


def test_perf_options_reject_bad_values():
    for field, value in (("remat", "sometimes"), ("attention", "flash"), ("compute_dtype", "int8"),
                         ("attention_impl", "triton"), ("mlm_capacity", 0.0), ("scan_layers", 1)):
        with pytest.raises(ValueError, match=f"PerfOptions.{field}"):
            PerfOptions(**{field: value})
    assert PerfOptions().label() == "default"
    assert PerfOptions(remat="full", donate=True).label() == "remat=full,donate=True"


def test_layer_loop_unrolled_equals_scan():
    """The unrolled loop and lax.scan give the same carry and the same stacked outputs."""
    xs = {"w": jnp.arange(12.0).reshape(3, 2, 2), "none": None}

    def body(h, x):
        return jnp.tanh(h @ x["w"]), h.sum()

    h0 = jnp.ones((2,))
    for perf in (PerfOptions(scan_layers=False), PerfOptions(scan_layers=False, remat="full")):
        got = layer_loop(body, h0, xs, perf)
        want = jax.lax.scan(body, h0, xs)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


def test_mlm_capacity_too_small_is_loud():
    """More labelled positions than gathered rows: loss_and_grad raises, the jitted loss is NaN."""
    from bigmodel_jax.models import bert

    config = Workload("bert-tiny", 2, 12).config()
    params = jax.tree.map(jnp.asarray, init_reference(config))
    batch = make_batch(config, 2, 12)
    batch["labels"] = batch["input_ids"].copy()  # every position labelled
    perf = PerfOptions(mlm_capacity=0.5)
    assert mlm_rows(perf, 2, 12) == 12
    with pytest.raises(ValueError, match="mlm_capacity"):
        bert.loss_and_grad(params, batch, config, "mlm", perf=perf)
    value = jax.jit(loss_fn(config, perf))(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isnan(float(value))


# --------------------------------------------------------------------------------------------
# FLOP counts


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_flops_equal_torch_flop_counter(family, tmp_path):
    """Analytic forward and training FLOPs == torch's FlopCounterMode on HF's model with eager
    attention (its QK^T and PV are plain matmuls there), same weights and batch. Exact: both count
    2 per multiply-add of every matmul. One known difference: torch never forms the gradient of
    the pixels, so ViT's first projection has no input gradient there (2 N P D per image)."""
    name, _ = TINY[family]
    wide = {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_ff": 96}
    if family != "vit":
        wide["vocab_size"] = 211
    config = dataclasses.replace(Workload(name, 3, 20).config(), **wide)
    config, _ = write_shared_weights(config, tmp_path)
    model = getattr(transformers, hf_architecture(config)).from_pretrained(tmp_path, attn_implementation="eager")
    B, T = 3, 20
    batch = {k: torch.from_numpy(v) for k, v in make_batch(config, B, T).items()}
    count = forward_flops(config, tokens_per_example(config, T))

    fwd = FlopCounterMode(display=False)
    with fwd, torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    train = FlopCounterMode(display=False)
    with train:
        model(**batch).loss.backward()

    assert fwd.get_total_flops() == pytest.approx(B * count.forward, rel=1e-12)
    pixel_grad = 2 * config.n_patches * config.n_channels * config.patch_size**2 * config.d_model if family == "vit" else 0
    assert train.get_total_flops() == pytest.approx(B * (count.train - pixel_grad), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_flops_close_to_xla_cost_analysis(family):
    """XLA's own count of the unrolled step is 1-10% above the analytic matmul count (it adds
    softmax, norms, GELU, the loss); the scanned step counts its loop body once (why the suite
    compares an unrolled step)."""
    name, _ = TINY[family]
    mid = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 512}
    if family == "vit":
        mid.update(image_size=32, patch_size=4, n_channels=3, num_labels=100)
    else:
        mid.update(vocab_size=1000, max_len=128)
    config = dataclasses.replace(Workload(name, 2, 64).config(), **mid)
    params = init_reference(config)
    batch = make_batch(config, 2, 64)
    T = tokens_per_example(config, 64)
    got = flop_check(config, params, batch, forward_flops(config, T))
    assert 1.0 <= got["train_ratio"] <= 1.10, got
    assert 1.0 <= got["forward_ratio"] <= 1.12, got
    # the scanned step: one block counted instead of two
    p = jax.tree.map(jnp.asarray, params)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    scanned = jax.jit(jax.value_and_grad(loss_fn(config, PerfOptions()))).lower(p, b).compile()
    assert scanned.cost_analysis()["flops"] < 0.85 * got["xla_train"]
    if family == "bert":  # the gathered MLM head: its own analytic count
        perf = PerfOptions(mlm_capacity=0.25)
        rows = mlm_rows(perf, 2, 64) / 2
        got = flop_check(config, params, batch, forward_flops(config, T, mlm_positions=rows), perf=perf)
        assert 1.0 <= got["train_ratio"] <= 1.10, got


def test_decode_bytes_count_weights_and_cache():
    """Bytes per decoding step: every weight once, plus K/V of every layer at the mean length."""
    c = preset("gpt2")
    got = decode_bytes_per_token(c, param_count(c) * 4, batch=1, prompt_len=8, new_tokens=65, kv_itemsize=4)
    assert got["weights"] == 124_439_808 * 4
    # mean cache length 8 + 32 = 40 slots; 2 (K, V) x 12 layers x 40 x 768 x 4 bytes
    assert got["kv_cache"] == 2 * 12 * 40 * 768 * 4
    assert got["total"] == got["weights"] + got["kv_cache"]


# --------------------------------------------------------------------------------------------
# the suite end to end (CPU path of benchmarks/gpu.sh)


@pytest.fixture(scope="module")
def smoke_out():
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as d:
        env = dict(os.environ, OUT=d, BENCH_PLAN="smoke", PYTHON=sys.executable, BENCH_TIMEOUT="900")
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1000)
        log = (Path(d) / "log.txt").read_text() if (Path(d) / "log.txt").exists() else ""
        assert proc.returncode == 0, f"gpu.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{log[-3000:]}"
        yield Path(d)


@pytest.mark.slow
def test_gpu_sh_smoke_writes_every_file(smoke_out):
    names = {p.name for p in smoke_out.iterdir()}
    for stem in ("smoke-bert-tiny", "smoke-gpt2-tiny-decode"):
        assert {f"{stem}.json", f"{stem}.md"} <= names
    assert {"smoke-bert-tiny.png", "targets-smoke.md", "targets-smoke.json", "env.txt", "log.txt"} <= names
    # the test process has 8 simulated devices (conftest), so the multi-device section runs too
    assert {"mesh-gpu.json", "mesh-gpu.md"} <= names and "mesh-skipped.txt" not in names
    assert json.loads((smoke_out / "mesh-gpu.json").read_text())["simulated_devices"] is True
    assert (smoke_out / "smoke-bert-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (smoke_out / "smoke-bert-tiny.md").read_text()
    for section in ("## Training step and forward", "## Optimisations", "## Compile time against depth",
                    "## Analytic FLOPs against XLA", "## Forward throughput against batch size", "vs HF torch"):
        assert section in md


@pytest.mark.slow
def test_smoke_results_are_complete_and_consistent(smoke_out):
    r = json.loads((smoke_out / "smoke-bert-tiny.json").read_text())
    assert {"meta", "workload", "peaks", "agreement", "runs", "sweep", "optimisations", "depth", "flop_check"} <= set(r)
    assert r["meta"]["versions"]["jax"] == jax.__version__
    for key in ("jax_float32", "jax_bfloat16", "numpy_float32", "torch_float32"):
        assert r["peaks"]["matmul"][key] > 0
    assert r["peaks"]["bandwidth"]["best"] > 0
    # the three sides run the same weights: logits agree to fp32 rounding
    assert r["agreement"]["reference"] == "torch"
    assert r["agreement"]["jax_vs_torch"] < 1e-4 and r["agreement"]["numpy_vs_torch"] < 1e-4
    runs = {(x["side"], x["kind"]): x for x in r["runs"]}
    for side in ("jax", "torch", "numpy"):
        for kind in ("train", "forward"):
            rec = runs[(side, kind)]
            assert "error" not in rec, rec.get("error")
            assert rec["units_per_s"] > 0 and rec["achieved_flops"] > 0 and rec["mfu_measured"] > 0
            assert rec["mfu_published"] is None  # no published peak for a CPU
    assert runs[("torch", "train")]["vs_torch"] == 1.0
    # the first training loss is the same model's loss on every side
    losses = [runs[(s, "train")]["first_loss"] for s in ("jax", "torch", "numpy")]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
    assert all("error" not in x for x in r["optimisations"]["runs"]), r["optimisations"]["runs"]
    assert r["optimisations"]["bf16_parity"]["grad_rel_err"] < BF16_GRAD_REL
    assert {(x["n_layers"], x["scan"]) for x in r["depth"]["rows"]} == {(2, True), (2, False), (4, True), (4, False)}
    assert all("error" not in x for x in r["depth"]["rows"])
    # bert-tiny (D = 32) at 2 x 16 tokens: softmax, norms, GELU and the optimizer-free loss are
    # no longer small next to the matmuls (XLA counts them, the analytic count does not), so only a
    # loose bound here; test_flops_close_to_xla_cost_analysis checks the count tightly at D = 128
    assert 1.0 <= r["flop_check"]["train_ratio"] < 2.0
    assert {x["batch"] for x in r["sweep"]} == {1, 2}


@pytest.mark.slow
def test_smoke_decoding_tokens_identical(smoke_out):
    r = json.loads((smoke_out / "smoke-gpt2-tiny-decode.json").read_text())
    runs = {x["side"]: x for x in r["decode"]["runs"]}
    assert set(runs) == {"jax", "jax scan", "torch", "numpy"}  # "jax": the unrolled decoding layout
    for side, rec in runs.items():
        assert "error" not in rec, rec.get("error")
        assert rec["identical_to_torch"] is True, side
        assert rec["tokens_per_s"] > 0 and rec["bound_tokens_per_s"] > 0
    targets = json.loads((smoke_out / "targets-smoke.json").read_text())["targets"]
    assert len(targets) == 5 and all(t["value"] is not None for t in targets)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_decoding_layouts_give_the_same_tokens(name):
    """``generate(perf=...)``: unrolled layers with (Out, In) weight rows, fused q/k/v, and both,
    prepared inside the call or once beforehand (``decode_params``), and the default (None:
    ``DECODE_LAYOUT``) decode the same tokens as the scanned layout (GQA and RoPE on for llama)."""
    from bigmodel_jax.generation import decode_params, generate

    config = preset(name)
    params = jax.tree.map(jnp.asarray, init_reference(config, seed=1))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 5))
    want = np.asarray(generate(params, ids, config, max_new_tokens=8, perf=PerfOptions()))
    for perf in (None, PerfOptions(scan_layers=False), PerfOptions(fused_qkv=True),
                 PerfOptions(scan_layers=False, fused_qkv=True)):
        np.testing.assert_array_equal(generate(params, ids, config, max_new_tokens=8, perf=perf), want)
        prepared = decode_params(params, config, perf)
        np.testing.assert_array_equal(generate(prepared, ids, config, max_new_tokens=8, perf=perf), want)
