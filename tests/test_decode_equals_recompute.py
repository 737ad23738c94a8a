"""Cached decoding equals decoding by full recompute, for every config field that changes the math.

Hypothesis draws GPT-family configs (learned / RoPE positions, ``rope_layout``, ``rope_theta``,
norm, activation, ``gated_mlp``, ``bias``, ``tie_embeddings``, MHA / GQA / MQA, ``head_dim`` !=
D/H) and encoder-decoder configs (pre/post-norm, ``position_layout``, ``final_logits_bias``,
decoder ``n_kv_heads``, shared or separate embeddings), with left-padded batches. For each, in
float64:

* the prefill's and every cached step's logits equal the model's own full forward within 1e-12
  of the largest logit, on the NumPy side (``kv_cache=``), the JAX scanned layout and the JAX
  fast decoding layout (``generation.layout.DECODE_LAYOUT``: unrolled weights as rows, fused
  q/k/v, per-layer heads-major caches). The cache is an option of the same forward, so the
  arithmetic is the same up to summation order: ~1e-16 relative is what float64 gives; 1e-12
  leaves room for the length of the sums and still catches any difference in the math (a wrong
  rotary layout is ~1e-3);
* greedy and beam decoding with the cache (NumPy, JAX scanned, JAX fast) give exactly the
  tokens of the same search run by recomputing the full forward at every step;
* the per-layer trace (``bigmodel diff``) ends in the forward's own logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmodel_jax import generation as jgen
from bigmodel_jax import trace as jtrace
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.perf import PerfOptions
from bigmodel_jax.tree import to_jax
from reference_numpy import generation as rgen
from reference_numpy import trace as rtrace
from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.models import gpt as rgpt
from reference_numpy.models import seq2seq as rs2s

pytestmark = pytest.mark.slow

RTOL = 1e-12  # float64, same math in another summation order (module docstring)
V, D, H, L = 41, 16, 4, 2
# a third of the profile's examples (ci: 4; BIGMODEL_HYPOTHESIS_PROFILE=thorough: 100): each example
# runs every decoder of both packages against recompute, tens of seconds on 2 cores
SETTINGS = settings(max_examples=max(settings().max_examples // 3, 1), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _x64():
    with jax.enable_x64(True):
        yield


@st.composite
def gpt_configs(draw) -> GPTConfig:
    rope = draw(st.booleans())
    llama_like = draw(st.booleans())
    return GPTConfig(
        n_layers=L, d_model=D, n_heads=H, d_ff=24, vocab_size=V, max_len=24, dropout=0.0, dtype="float64",
        n_kv_heads=draw(st.sampled_from([None, 2, 1])),  # MHA, GQA, MQA
        head_dim=draw(st.sampled_from([None, 6])),  # 6 != D / H
        positions="rope" if rope else "learned",
        rope_layout=draw(st.sampled_from(["half", "interleaved"])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0, 31.0])),
        norm="rms" if llama_like else "layer",
        activation=draw(st.sampled_from(["silu", "gelu_tanh", "gelu", "relu"])),
        gated_mlp=draw(st.booleans()),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
    )


@st.composite
def seq2seq_configs(draw) -> Seq2SeqConfig:
    return Seq2SeqConfig(
        n_layers=L, n_decoder_layers=draw(st.sampled_from([None, 1])), d_model=D, n_heads=H, d_ff=24,
        vocab_size=V, max_len=24, dropout=0.0, label_smoothing=0.0, dtype="float64",
        n_kv_heads=draw(st.sampled_from([None, 2, 1])),
        prenorm=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "gelu", "silu"])),
        share_embeddings=draw(st.booleans()),
        scale_embeddings=draw(st.booleans()),
        position_layout=draw(st.sampled_from(["interleaved", "concat"])),
        final_logits_bias=draw(st.booleans()),
    )


def _params(init, config, seed: int):
    """Fresh parameters, the matrices scaled up so the logits are far from uniform (argmax and
    the beams well separated), the biases made non-zero so every bias path counts."""
    params = init(config, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    return jax.tree_util.tree_map(lambda a: a * 8 if a.ndim >= 2 else a + 0.3 * rng.standard_normal(a.shape),
                                  params)


def _padded_batch(rng, B: int, T: int, pad_rows: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), bool)
    for b in range(pad_rows):
        mask[b, :b + 1] = False  # row b left-padded by b + 1 slots
    return ids, mask


def _close(cached: np.ndarray, full: np.ndarray, keep: np.ndarray, what: str) -> None:
    err = np.max(np.abs(cached - full)[np.broadcast_to(keep[..., None], full.shape)])
    scale = np.max(np.abs(full))
    assert err <= RTOL * scale, f"{what}: cached logits differ from the full forward by {err:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------------------------
# GPT family


def _gpt_steps_numpy(params, config, ids, mask, prefill: int) -> np.ndarray:
    cache = rgpt.init_cache(config, ids.shape[0], ids.shape[1], np.float64)
    out = [rgpt.forward(params, {"input_ids": ids[:, :prefill], "attention_mask": mask}, config, kv_cache=cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(rgpt.forward(params, {"input_ids": ids[:, t:t + 1], "attention_mask": mask}, config,
                                kv_cache=cache, cache_pos=t))
    return np.concatenate(out, axis=1)


def _gpt_steps_jax(params, config, ids, mask, prefill: int, layout: PerfOptions | None) -> np.ndarray:
    B, T = ids.shape
    prepared = jgen.decode_params(params, config, layout)
    unrolled = isinstance(prepared["layers"], list)
    cache = (jgpt.init_layer_caches if unrolled else jgpt.init_cache)(config, B, T, jnp.float64)
    step = jax.jit(lambda p, c, x, pos: jgen.decode_step(p, c, x, pos, jnp.asarray(mask), config))
    logits, cache = step(prepared, cache, jnp.asarray(ids[:, :prefill]), jnp.asarray(0))
    out = [np.asarray(logits)]
    for t in range(prefill, T):
        logits, cache = step(prepared, cache, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(t))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def _greedy_by_recompute(params, config, ids, mask, n: int) -> np.ndarray:
    for _ in range(n):
        logits = rgpt.forward(params, {"input_ids": ids, "attention_mask": mask}, config)
        ids = np.concatenate([ids, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), bool)], axis=1)
    return ids


def _beam_by_recompute(params, config, ids, mask, n: int, W: int, eos: int) -> np.ndarray:
    """HF's beam search (``reference_numpy.generation.beam_loop``, the algorithm both packages
    share) whose every step recomputes the full forward of each beam's whole sequence: the
    'cache' it reorders is just the sequences so far."""
    B, T0 = ids.shape
    seqs = np.repeat(ids, W, axis=0)
    key_mask = np.repeat(mask, W, axis=0)
    state = {"seq": seqs[None]}  # (1, B W, T): beam_loop reorders axis 1

    def step(state, tok, i):
        state["seq"] = np.concatenate([state["seq"], tok[None, :, None]], axis=2)
        m = np.concatenate([key_mask, np.ones((B * W, i + 1), bool)], axis=1)
        return rgpt.forward(params, {"input_ids": state["seq"][0], "attention_mask": m}, config)[:, -1]

    last = rgpt.forward(params, {"input_ids": seqs, "attention_mask": key_mask}, config)[:, -1]
    out = rgen.beam_loop(step, last, state, B, W, n, rules=rgen.beam_rules(n, 1.0, False), eos=(eos,),
                         fill=rgen.beam_fill(None, (eos,)), dtype=ids.dtype)
    return np.concatenate([ids, out], axis=1)


@SETTINGS
@given(config=gpt_configs(), seed=st.integers(0, 2**16))
def test_gpt_cached_decoding_equals_recompute(config, seed):
    rng = np.random.default_rng(seed)
    params = _params(rgpt.init, config, seed)
    jp = to_jax(params)
    B, T, P = 3, 9, 4
    ids, mask = _padded_batch(rng, B, T, pad_rows=2)
    batch = {"input_ids": ids, "attention_mask": mask}

    # logits: prefill + one-token steps against each side's own full forward
    full = rgpt.forward(params, batch, config)
    _close(_gpt_steps_numpy(params, config, ids, mask, P), full, mask, "numpy")
    j_full = np.asarray(jgpt.forward(jp, batch, config))
    _close(j_full, full, mask, "jax forward vs numpy forward")
    for layout in (None, jgen.DECODE_LAYOUT, PerfOptions(fused_qkv=True)):
        _close(_gpt_steps_jax(jp, config, ids, mask, P, layout), j_full, mask, f"jax {layout}")

    # the trace of bigmodel diff ends in the forward's own logits
    r_rows = rtrace.trace(config, params, batch, "causal_lm")
    np.testing.assert_array_equal(r_rows[-1][1], full)
    assert [n for n, _ in r_rows] == [n for n, _ in jtrace.trace(config, jp, batch, "causal_lm")]
    _close(jtrace.trace(config, jp, batch, "causal_lm")[-1][1], j_full, mask, "jax trace")

    # tokens: greedy and beam with the cache equal the same search by recompute
    prompt, pmask, n = ids[:, :5], mask[:, :5], 5
    want = _greedy_by_recompute(params, config, prompt, pmask, n)
    np.testing.assert_array_equal(rgen.greedy(params, prompt, config, max_new_tokens=n, attention_mask=pmask), want)
    for layout in (PerfOptions(), jgen.DECODE_LAYOUT):
        got = jgen.generate(jp, prompt, config, max_new_tokens=n, attention_mask=pmask, perf=layout)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"jax greedy {layout}")
    eos = int(want[0, -2])  # a token greedy emits, so some beams finish early
    want_beam = _beam_by_recompute(params, config, prompt, pmask, n, 3, eos)
    kw = dict(max_new_tokens=n, num_beams=3, attention_mask=pmask, eos_token_id=eos)
    np.testing.assert_array_equal(rgen.beam_search(params, prompt, config, **kw), want_beam)
    np.testing.assert_array_equal(np.asarray(jgen.beam_search(jp, prompt, config, **kw)), want_beam)


def test_interleaved_rope_decodes_like_recompute():
    """The bug this file was written for: cached decoding ignored ``rope_layout``. A fixed
    Llama-style config with interleaved RoPE, on both sides."""
    config = GPTConfig(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=32, vocab_size=V, max_len=24,
                       dropout=0.0, norm="rms", activation="silu", gated_mlp=True, positions="rope",
                       rope_layout="interleaved", bias=False, tie_embeddings=False, dtype="float64")
    params = _params(rgpt.init, config, 7)
    ids, mask = _padded_batch(np.random.default_rng(8), 2, 8, pad_rows=1)
    full = rgpt.forward(params, {"input_ids": ids, "attention_mask": mask}, config)
    _close(_gpt_steps_numpy(params, config, ids, mask, 3), full, mask, "numpy")
    _close(_gpt_steps_jax(to_jax(params), config, ids, mask, 3, jgen.DECODE_LAYOUT), full, mask, "jax fast")
    # and a mutation: the other layout's prefill is far off, so the check above can fail
    other = dataclasses.replace(config, rope_layout="half")
    wrong = rgpt.forward(params, {"input_ids": ids, "attention_mask": mask}, other)
    assert np.max(np.abs(wrong - full)) > 1e-6 * np.max(np.abs(full))


# --------------------------------------------------------------------------------------------
# encoder-decoder


def _s2s_greedy_by_recompute(params, config, batch, n: int) -> np.ndarray:
    tgt = np.zeros((batch["input_ids"].shape[0], 1), np.int64)
    for _ in range(n):
        logits = rs2s.forward(params, {**batch, "decoder_input_ids": tgt}, config)
        tgt = np.concatenate([tgt, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
    return tgt


def _s2s_beam_by_recompute(params, config, batch, n: int, W: int, eos: int) -> np.ndarray:
    """As ``_beam_by_recompute``, for the encoder-decoder (decoder start token 0)."""
    B = batch["input_ids"].shape[0]
    src = {"input_ids": np.repeat(batch["input_ids"], W, 0), "attention_mask": np.repeat(batch["attention_mask"], W, 0)}
    state = {"tgt": np.zeros((1, B * W, 1), np.int64)}

    def last_logits(tgt):
        return rs2s.forward(params, {**src, "decoder_input_ids": tgt}, config)[:, -1]

    def step(state, tok, i):
        state["tgt"] = np.concatenate([state["tgt"], tok[None, :, None]], axis=2)
        return last_logits(state["tgt"][0])

    out = rgen.beam_loop(step, last_logits(state["tgt"][0]), state, B, W, n, rules=rgen.beam_rules(n, 1.0, False),
                         eos=(eos,), fill=rgen.beam_fill(None, (eos,)), dtype=np.int64)
    return np.concatenate([np.zeros((B, 1), np.int64), out], axis=1)


@SETTINGS
@given(config=seq2seq_configs(), seed=st.integers(0, 2**16))
def test_seq2seq_cached_decoding_equals_recompute(config, seed):
    rng = np.random.default_rng(seed)
    params = _params(rs2s.init, config, seed)
    jp = to_jax(params)
    src, src_mask = _padded_batch(rng, 3, 6, pad_rows=2)
    tgt = rng.integers(0, V, (3, 5))
    batch = {"input_ids": src, "attention_mask": src_mask}
    full = rs2s.forward(params, {**batch, "decoder_input_ids": tgt}, config)
    keep = np.ones(tgt.shape, bool)

    # NumPy: prefill of 2 target tokens, then one-token steps
    cache = rs2s.init_cache(params, rs2s.encode(params, batch, config), config, tgt.shape[1])
    steps = [rs2s.decode_with_cache(params, None, {"decoder_input_ids": tgt[:, :2], "attention_mask": src_mask},
                                    config, kv_cache=cache)[0]]
    for t in range(2, tgt.shape[1]):
        steps.append(rgen.seq2seq_decode_step(params, cache, tgt[:, t:t + 1], t, src_mask, config))
    _close(np.concatenate(steps, axis=1), full, keep, "numpy")

    # JAX: the same through the model's decode_step, jit-compiled
    j_full = np.asarray(js2s.forward(jp, {**batch, "decoder_input_ids": tgt}, config))
    _close(j_full, full, keep, "jax forward vs numpy forward")
    j_cache = js2s.init_cache(jp, js2s.encode(jp, batch, config), config, tgt.shape[1])
    step = jax.jit(lambda c, x, pos: jgen.seq2seq_decode_step(jp, c, x, pos, jnp.asarray(src_mask), config))
    logits, j_cache = step(j_cache, jnp.asarray(tgt[:, :2]), jnp.asarray(0))
    j_steps = [np.asarray(logits)]
    for t in range(2, tgt.shape[1]):
        logits, j_cache = step(j_cache, jnp.asarray(tgt[:, t:t + 1]), jnp.asarray(t))
        j_steps.append(np.asarray(logits))
    _close(np.concatenate(j_steps, axis=1), j_full, keep, "jax")

    # the trace ends in the forward's logits
    r_rows = rtrace.trace(config, params, {**batch, "decoder_input_ids": tgt}, "seq2seq_lm")
    np.testing.assert_array_equal(r_rows[-1][1], full)
    j_rows = jtrace.trace(config, jp, {**batch, "decoder_input_ids": tgt}, "seq2seq_lm")
    assert [n for n, _ in j_rows] == [n for n, _ in r_rows]
    _close(j_rows[-1][1], j_full, keep, "jax trace")

    # tokens
    n = 4
    want = _s2s_greedy_by_recompute(params, config, batch, n)
    np.testing.assert_array_equal(rgen.seq2seq_generate(params, batch, config, max_new_tokens=n), want)
    np.testing.assert_array_equal(np.asarray(jgen.seq2seq_generate(jp, batch, config, max_new_tokens=n)), want)
    eos = int(want[0, -1])
    want_beam = _s2s_beam_by_recompute(params, config, batch, n, 3, eos)
    kw = dict(max_new_tokens=n, num_beams=3, eos_token_id=eos)
    np.testing.assert_array_equal(rgen.seq2seq_generate(params, batch, config, **kw), want_beam)
    np.testing.assert_array_equal(np.asarray(jgen.seq2seq_generate(jp, batch, config, **kw)), want_beam)
