"""KV-cached decoding: equals full recompute, NumPy and JAX agree token for token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax import generation as jgen
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.tree import to_jax
from reference_numpy import generation as rgen
from reference_numpy.configs import preset
from reference_numpy.models import gpt as rgpt

NAMES = ["gpt2-tiny", "llama-tiny"]


def _setup(name: str, seed: int = 0, dtype: str = "float32"):
    config = dataclasses.replace(preset(name), dtype=dtype)
    # Larger-than-default init so the logits are far from uniform and argmax is well separated.
    params = rgpt.init(config, np.random.default_rng(seed))
    params = jax.tree_util.tree_map(lambda a: a * 20 if a.ndim >= 2 else a, params)
    return config, params


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cached_logits_equal_full_recompute(name):
    config, params = _setup(name)
    jp = to_jax(params)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 7))
    full = np.asarray(jgpt.forward(jp, {"input_ids": ids}, config))
    cache = jgen.init_cache(config, 2, 7, jnp.float32)
    mask = jnp.ones((2, 7), bool)
    prefill, cache = jgen.decode_step(jp, cache, jnp.asarray(ids[:, :4]), jnp.asarray(0), mask, config)
    steps = [prefill]
    for t in range(4, 7):
        logits, cache = jgen.decode_step(jp, cache, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(t), mask, config)
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert np.max(np.abs(cached - full)) <= 1e-5 * max(1.0, np.max(np.abs(full)))
    # the NumPy cache agrees with the NumPy full forward too
    rcache = rgen.init_cache(config, 2, 7, np.float32)
    r_pre = rgen.decode_step(params, rcache, ids[:, :4], 0, np.ones((2, 7), bool), config)
    r_full = rgpt.forward(params, {"input_ids": ids}, config)
    np.testing.assert_allclose(r_pre, r_full[:, :4], rtol=1e-5, atol=1e-5 * np.max(np.abs(r_full)))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_unrolled_layer_caches_equal_full_recompute(name, fused_qkv):
    """The unrolled decoding layout (``decode_params`` weights, ``init_layer_caches``: keys
    (B K, S, E), values (B K, E, S)) gives the full forward's logits at every cached step, with a
    left-padded row and, for llama, grouped KV heads and RoPE. float64: the same sums in another
    order, so agreement to ~1e-12 relative; anything looser means different math."""
    from bigmodel_jax.perf import PerfOptions

    config, params = _setup(name, dtype="float64")
    jp = to_jax(params)
    B, T, P = 2, 7, 4
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, :2] = False  # row 1 left-padded
    full = np.asarray(jgpt.forward(jp, {"input_ids": ids, "attention_mask": mask}, config))
    layout = PerfOptions(scan_layers=False, fused_qkv=fused_qkv)
    prepared = jgen.decode_params(jp, config, layout)
    assert isinstance(prepared["layers"], list)
    cache = jgen.init_layer_caches(config, B, T, jnp.float64)
    assert cache["k"][0].shape == (B * config.kv_heads, T, config.e)
    assert cache["v"][0].shape == (B * config.kv_heads, config.e, T)
    key_mask = jnp.asarray(mask)
    logits, cache = jgen.decode_step(prepared, cache, jnp.asarray(ids[:, :P]), jnp.asarray(0), key_mask, config)
    steps = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = jgen.decode_step(prepared, cache, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(t), key_mask,
                                         config)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    with pytest.raises(ValueError, match="init_layer_caches"):  # per-layer caches need unrolled weights
        jgen.decode_step(jp, cache, jnp.asarray(ids[:, :1]), jnp.asarray(0), key_mask, config)
    with pytest.raises(ValueError, match="init_cache"):  # and unrolled weights need per-layer caches
        jgen.decode_step(prepared, jgen.init_cache(config, B, T, jnp.float64), jnp.asarray(ids[:, :1]),
                         jnp.asarray(0), key_mask, config)
    keep = np.broadcast_to(mask[:, :, None], full.shape)  # padded query slots have no defined output
    scale = np.max(np.abs(full))
    assert np.max(np.abs(cached - full)[keep]) <= 1e-12 * scale


def _greedy_by_recompute(params, ids, config, n):
    for _ in range(n):
        logits = rgpt.forward(params, {"input_ids": ids}, config)
        ids = np.concatenate([ids, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
    return ids


@pytest.mark.parametrize("name", NAMES)
def test_greedy_identical_across_implementations_and_recompute(name):
    config, params = _setup(name, seed=2)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 3))
    want = _greedy_by_recompute(params, ids, config, 6)
    got_ref = rgen.greedy(params, ids, config, max_new_tokens=6)
    got_jax = np.asarray(jgen.generate(to_jax(params), ids, config, max_new_tokens=6))
    np.testing.assert_array_equal(got_ref, want)
    np.testing.assert_array_equal(got_jax, want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_identical_across_implementations(name, length_penalty):
    config, params = _setup(name, seed=4)
    ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 3))
    for early_stopping in (False, True, "never"):
        kw = dict(max_new_tokens=5, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping,
                  num_return_sequences=2, eos_token_id=7, pad_token_id=0)
        got_ref = rgen.beam_search(params, ids, config, **kw)
        got_jax = np.asarray(jgen.beam_search(to_jax(params), ids, config, **kw))
        np.testing.assert_array_equal(got_jax, got_ref)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    config, params = _setup("gpt2-tiny", seed=6)
    ids = np.random.default_rng(7).integers(0, config.vocab_size, (3, 2))

    def logprob(seq):
        logits = rgpt.forward(params, {"input_ids": seq}, config).astype(np.float64)
        lp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
        tok = seq[:, 2:]
        return np.take_along_axis(lp[:, 1:-1], tok[..., None], -1)[..., 0].sum(-1)

    greedy = rgen.greedy(params, ids, config, max_new_tokens=4)
    beam = rgen.beam_search(params, ids, config, max_new_tokens=4, num_beams=4, length_penalty=0.0)
    assert np.all(logprob(beam) >= logprob(greedy) - 1e-4)
    one = rgen.beam_search(params, ids, config, max_new_tokens=4, num_beams=1, length_penalty=0.0)
    np.testing.assert_array_equal(one, greedy)


def test_eos_then_padding():
    config, params = _setup("gpt2-tiny", seed=8)
    ids = np.random.default_rng(9).integers(0, config.vocab_size, (2, 3))
    free = rgen.greedy(params, ids, config, max_new_tokens=6)
    eos = int(free[0, 4])  # the second generated token of row 0
    out = np.asarray(jgen.generate(to_jax(params), ids, config, max_new_tokens=6, eos_token_id=eos, pad_token_id=0))
    first = np.flatnonzero(out[0, 3:] == eos)[0]
    assert np.all(out[0, 3 + first + 1:] == 0)
    np.testing.assert_array_equal(rgen.greedy(params, ids, config, max_new_tokens=6, eos_token_id=eos,
                                              pad_token_id=0), out)
    # pad_token_id=None pads with the EOS id, as transformers does
    hf_default = rgen.greedy(params, ids, config, max_new_tokens=6, eos_token_id=eos)
    after_eos = np.cumsum(out[:, 3:] == eos, axis=1) - (out[:, 3:] == eos) > 0
    np.testing.assert_array_equal(hf_default[:, 3:], np.where(after_eos, eos, out[:, 3:]))


@pytest.mark.slow
def test_sampling_is_keyed_and_filters_behave():
    config, params = _setup("llama-tiny", seed=10)
    jp = to_jax(params)
    ids = np.random.default_rng(11).integers(0, config.vocab_size, (2, 3))
    greedy = np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5))
    k = jax.random.key(0)
    a = np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5, temperature=1.0, key=k))
    b = np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5, temperature=1.0, key=k))
    np.testing.assert_array_equal(a, b)
    draws = {tuple(np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5, temperature=3.0,
                                            key=jax.random.key(s))).ravel()) for s in range(4)}
    assert len(draws) > 1
    top1 = np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5, temperature=1.0, top_k=1, key=k))
    np.testing.assert_array_equal(top1, greedy)
    nucleus = np.asarray(jgen.generate(jp, ids, config, max_new_tokens=5, temperature=1.0, top_p=1e-6, key=k))
    np.testing.assert_array_equal(nucleus, greedy)


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(jgen.filter_logits(logits, None, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(np.asarray(jgen.filter_logits(logits, 3, None)))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_reference_filter_keeps_the_same_tokens_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = np.isfinite(rgen.filter_logits(logits, None, 0.7))
    np.testing.assert_array_equal(kept, [[True, True, False, False], [True, True, True, False]])
    kept = np.isfinite(rgen.filter_logits(logits, 2, None))  # ties with the k-th value stay
    np.testing.assert_array_equal(kept, [[True, True, False, False], [True, True, True, True]])
    np.testing.assert_array_equal(rgen.filter_logits(logits, 2, 0.7)[0, :2], logits[0, :2])


@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 40), top_k=st.none() | st.integers(1, 40),
       top_p=st.none() | st.floats(0.05, 1.0), ties=st.booleans())
def test_filter_logits_equals_the_reference(seed, v, top_k, top_p, ties):
    """The JAX filter (generate's sampling) and the NumPy reference's (the server's) keep the
    same tokens and leave their logits untouched (float64)."""
    logits = np.random.default_rng(seed).normal(size=(3, v)) * 3
    if ties:
        logits = np.round(logits)  # many equal logits: top-k ties and top-p's order of ties
    top_k = None if top_k is None else min(top_k, v)
    want = rgen.filter_logits(logits, top_k, top_p)
    got = np.asarray(jgen.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])


def test_decoding_compiles_once_per_shape():
    config, params = _setup("gpt2-tiny", seed=12)
    jp = to_jax(params)
    before = jgen.sampling._generate._cache_size()
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, config.vocab_size, (2, 3))
        jgen.generate(jp, ids, config, max_new_tokens=4)
    assert jgen.sampling._generate._cache_size() - before <= 1


def test_bad_generation_arguments():
    config, params = _setup("gpt2-tiny")
    jp = to_jax(params)
    ids = np.zeros((1, 3), np.int64)
    with pytest.raises(ValueError, match="longer than the model supports"):
        jgen.generate(jp, ids, config, max_new_tokens=config.max_len)
    with pytest.raises(ValueError, match="longer than the model supports"):
        rgen.greedy(params, ids, config, max_new_tokens=config.max_len)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        jgen.generate(jp, ids, config, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        jgen.generate(jp, ids, config, max_new_tokens=2, temperature=0.7, top_p=1.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        jgen.generate(jp, np.array([[1, 500]]), config, max_new_tokens=2)
