"""Quantised models deployed: ``bigmodel serve --quantize`` decodes on the quantised tree, and
``bigmodel export --format stablehlo --quantize`` closes over it; hf / onnx refuse ``--quantize``.

The reference for both is our own JAX code on the same quantised tree
(``bigmodel_jax.quant.quantize_tree``): the engine's greedy tokens must be ``generate``'s
token for token, and the StableHLO artifact's logits our forward's within 1e-6 (float32; the
same XLA program, as in ``test_export``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_apps.serve.app import create_app
from bigmodel_apps.serve.encoders import ClassifierModel
from bigmodel_apps.serve.engine import Engine, Request, SamplingParams
from bigmodel_apps.serve.model import ServedModel, load_model, quantize_served
from bigmodel_jax.generation import generate
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.quant import is_quantized, quantize_tree
from bigmodel_jax.tree import to_jax
from bigmodel_port.export import export
from bigmodel_port.native import save_native
from reference_numpy.configs import GPTConfig, preset
from serve_util import TIMEOUT, Server, tiny_gpt_hf_dir
from test_export import HLO_TOL, inputs_for, make_model, run_fresh

CHARS = [chr(c) for c in range(32, 127)]  # ids 0..94; EOS = 95
EOS = len(CHARS)
CONFIG = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=EOS + 1, max_len=64, dropout=0.0)


def _encode(text: str, chat: bool = False) -> list[int]:
    return [EOS] + [CHARS.index(c) if c in CHARS else 0 for c in text]


def _decode(ids: Sequence[int]) -> str:
    return "".join(CHARS[i] for i in ids if 0 <= i < EOS)


def _quantized_paths(tree) -> dict[str, int]:
    """"a/b/c" -> bits of every quantised leaf of a nested-dict (or list-of-layers) tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
        if is_quantized(leaf):
            out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf.bits
    return out


def _greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    toks: list[int] = []
    done = threading.Event()
    engine.submit(Request(prompt, SamplingParams(max_tokens=n), toks.append, lambda _: done.set()))
    assert done.wait(TIMEOUT)
    return toks


# -- serving --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_greedy_on_int8_equals_generate_on_the_same_tree():
    """A served int8 model: the engine holds QuantizedWeight leaves (in its decoding layout),
    and the server's greedy completions are ``generate``'s on the quantised tree, which here
    differ from the float model's (so the comparison can tell the two apart)."""
    params = jax.tree.map(lambda w: w * 6.0, jgpt.init(CONFIG, seed=3))  # varied greedy tokens (test_serve)
    model = quantize_served(ServedModel("tiny", CONFIG, params, _encode, _decode, (EOS,)), 8)
    assert model.quantization["bits"] == 8
    bits = _quantized_paths(model.params)
    assert bits and set(bits.values()) == {8}
    assert "layers/mlp/up/kernel" in bits and "embed/embedding" in bits
    assert not any("norm" in p for p in bits)  # norms stay float
    engine = Engine(model.params, CONFIG, slots=2, context=48, eos_ids=(EOS,))
    assert _quantized_paths(engine.params)  # the decoding layout kept them quantised
    srv = Server(create_app(model, engine))
    try:
        differs = False
        n = 20
        for prompt in ("def f(x):", "import os", "x = y + 1"):  # one length: generate compiles once per tree
            r = srv.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0})
            assert r.status_code == 200, r.text
            ids = np.asarray([_encode(prompt)], np.int32)
            want = np.asarray(generate(model.params, ids, CONFIG, max_new_tokens=n, eos_token_id=EOS))[0, ids.shape[1]:]
            want = want.tolist()
            want = want[:want.index(EOS)] if EOS in want else want
            assert r.json()["choices"][0]["text"] == _decode(want), prompt
            fp = np.asarray(generate(params, ids, CONFIG, max_new_tokens=n, eos_token_id=EOS))[0, ids.shape[1]:]
            differs |= fp.tolist()[:len(want)] != want
        assert differs, "int8 and float greedy outputs agree on every prompt: the test cannot tell them apart"
        listed = httpx.get(srv.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]
        assert listed["quantization"]["bits"] == 8
    finally:
        srv.stop()
        engine.stop()


@pytest.mark.slow
def test_load_model_quantizes_an_hf_lm_at_load_int4(tmp_path: Path):
    """``load_model(SRC, quantize=4)`` (``bigmodel serve --quantize int4``): int4 kernels, the
    tied embedding / LM head int8, and the engine's tokens are ``generate``'s on that tree."""
    model = load_model(tiny_gpt_hf_dir(tmp_path / "gpt"), quantize=4)
    assert isinstance(model, ServedModel) and model.quantization["bits"] == 4
    bits = _quantized_paths(model.params)
    assert bits["layers/mlp/up/kernel"] == 4 and bits["layers/attn/out/kernel"] == 4
    assert bits["embed/embedding"] == 8  # tied head kept int8
    engine = Engine(model.params, model.config, slots=2, context=48)
    engine.start()
    try:
        prompt = model.encode("def f(x):")
        toks = _greedy(engine, prompt, 10)
    finally:
        engine.stop()
    want = np.asarray(generate(model.params, np.asarray([prompt], np.int32), model.config, max_new_tokens=10))
    assert toks == want[0, len(prompt):].tolist()


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stablehlo_int8_export_runs_fresh_matches_our_quantised_forward_and_is_smaller(tmp_path: Path):
    model = make_model("gpt2-tiny", "GPT2LMHeadModel", {}, seed=1)
    fp_out, q_out = tmp_path / "fp32", tmp_path / "int8"
    export(model, fp_out, "stablehlo")
    assert main(["export", str(_native(model, tmp_path)), str(q_out), "--format", "stablehlo",
                 "--quantize", "int8"]) == 0
    manifest = json.loads((q_out / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["bits"] == 8 and quant["exclude"] == ["norm"]
    assert quant["leaves"]["layers/mlp/up/kernel"] == {"bits": 8, "group_size": 0, "axes": [-2]}
    assert any("norm" in p for p in quant["float_leaves"]) and not any("norm" in p for p in quant["leaves"])
    assert json.loads((fp_out / "manifest.json").read_text())["quantization"] is None
    for name in ("forward", "decode_step"):  # int8 codes instead of float32 weights
        q_size, fp_size = ((d / f"{name}.jax_export").stat().st_size for d in (q_out, fp_out))
        assert q_size < 0.6 * fp_size, (name, q_size, fp_size)

    qtree = quantize_tree(to_jax(model.params), 8)
    c = model.config
    feed, want = {}, {}
    for b, t in ((1, 3), (3, 7)):
        x = inputs_for(model, b, t, seed=b)
        for n in ("input_ids", "attention_mask"):
            feed[f"forward#{b}x{t}|{n}"] = x[n].astype(np.int32)
        want[f"forward#{b}x{t}|logits"] = np.asarray(jgpt.forward(
            qtree, {"input_ids": jax.numpy.asarray(x["input_ids"], np.int32),
                    "attention_mask": jax.numpy.asarray(x["attention_mask"] != 0)}, c))
    ids = np.random.default_rng(5).integers(0, c.vocab_size, (2, 3)).astype(np.int32)
    k = np.zeros((c.n_layers, 2, 8, c.kv_heads, c.e), np.float32)
    mask = np.zeros((2, 8), np.int32)
    mask[:, :3] = 1
    for n, v in (("input_ids", ids), ("cache_pos", np.int32(0)), ("attention_mask", mask), ("cache_k", k),
                 ("cache_v", k)):
        feed[f"decode_step#pre|{n}"] = v
    want["decode_step#pre|logits"] = np.asarray(jgpt.forward(qtree, {"input_ids": jax.numpy.asarray(ids)}, c))
    got = run_fresh(q_out, feed)
    for key, v in want.items():
        err = float(np.max(np.abs(got[key] - v)))
        assert err <= HLO_TOL, (key, err)
    # and it is the quantised model, not the float one
    fp_logits = np.asarray(jgpt.forward(to_jax(model.params), {"input_ids": jax.numpy.asarray(ids)}, c))
    assert float(np.max(np.abs(got["decode_step#pre|logits"] - fp_logits))) > 10 * HLO_TOL


def _native(model, tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_native(path, model.params, model.config)
    return path


# -- refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
def test_hf_and_onnx_refuse_quantize_with_exit_2(tmp_path: Path, capsys, fmt: str):
    model = make_model("gpt2-tiny", "GPT2LMHeadModel", {})
    out = tmp_path / "out"
    assert main(["export", str(_native(model, tmp_path)), str(out), "--format", fmt, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --quantize applies to --format stablehlo only") and "transformers" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="stablehlo only"):
        export(model, out, fmt, quantize=4)


def test_serve_refuses_a_native_file_and_unknown_bits(tmp_path: Path, capsys):
    model = make_model("gpt2-tiny", "GPT2LMHeadModel", {})
    assert main(["serve", str(_native(model, tmp_path)), "--quantize", "int8", "--no-warmup"]) == 2
    assert "error:" in (err := capsys.readouterr().err) and "native weight file without a tokenizer" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a choice
        main(["serve", str(tmp_path), "--quantize", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    served = ServedModel("tiny", CONFIG, {}, _encode, _decode, ())
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_served(served, 2)


def test_quantize_refuses_encoder_models():
    cls = ClassifierModel("cls", preset("bert-tiny"), {}, lambda texts: [[0] for _ in texts], 16, "test")
    with pytest.raises(ValueError, match="causal LMs only; this is a classification model"):
        quantize_served(cls, 8)
