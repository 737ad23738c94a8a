"""Encoder-decoder decoding with a KV cache (self-attention cached, cross-attention K/V computed
once): equals greedy by full recompute; beam search finds at least the greedy likelihood."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from bigmodel_jax import generation as jgen
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.tree import to_jax
from reference_numpy.configs import preset
from reference_numpy.models import seq2seq as rs2s


def _setup(prenorm: bool, seed: int = 0):
    config = dataclasses.replace(preset("seq2seq-tiny"), prenorm=prenorm, n_layers=2, n_decoder_layers=1)
    params = rs2s.init(config, np.random.default_rng(seed))
    # larger weights so the distributions are peaked and argmax is well separated
    params = jax.tree_util.tree_map(lambda a: a * 15 if a.ndim >= 2 else a, params)
    src = np.random.default_rng(seed + 1).integers(1, config.vocab_size, (2, 5))
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0  # padded source row
    return config, params, {"input_ids": src, "attention_mask": mask}


def _greedy_by_recompute(params, batch, config, n, start=0):
    tgt = np.full((batch["input_ids"].shape[0], 1), start)
    for _ in range(n):
        logits = rs2s.forward(params, {**batch, "decoder_input_ids": tgt}, config)
        tgt = np.concatenate([tgt, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
    return tgt


def _logprob(params, batch, config, tgt):
    logits = rs2s.forward(params, {**batch, "decoder_input_ids": tgt[:, :-1]}, config).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return np.take_along_axis(lp, tgt[:, 1:, None], -1)[..., 0].sum(-1)


@pytest.mark.parametrize("prenorm", [False, True])
def test_cached_greedy_equals_full_recompute(prenorm):
    config, params, batch = _setup(prenorm)
    want = _greedy_by_recompute(params, batch, config, 6)
    got = np.asarray(jgen.seq2seq_generate(to_jax(params), batch, config, max_new_tokens=6))
    np.testing.assert_array_equal(got, want)


def test_cached_logits_equal_full_decode():
    config, params, batch = _setup(False, seed=3)
    jp = to_jax(params)
    tgt = np.random.default_rng(4).integers(0, config.vocab_size, (2, 4))
    full = rs2s.forward(params, {**batch, "decoder_input_ids": tgt}, config)
    from bigmodel_jax.models.seq2seq import encode

    enc = encode(jp, batch, config)
    cache = js2s.init_cache(jp, enc, config, 4)
    mask = jax.numpy.asarray(batch["attention_mask"]).astype(bool)
    steps = []
    for t in range(4):
        logits, cache = jgen.seq2seq_decode_step(jp, cache, jax.numpy.asarray(tgt[:, t:t + 1]), jax.numpy.asarray(t),
                                                 mask, config)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    # float32, JAX vs the reference (BLAS) with logits up to ~80: the model-level float32
    # tolerance (normwise 1e-4, reference_numpy.tolerances.MODEL_PARITY); observed ~1.3e-5
    assert np.max(np.abs(cached - full)) <= 1e-4 * max(1.0, np.max(np.abs(full)))


def test_beam_search_one_beam_is_greedy_and_more_beams_are_no_worse():
    config, params, batch = _setup(True, seed=5)
    jp = to_jax(params)
    greedy = np.asarray(jgen.seq2seq_generate(jp, batch, config, max_new_tokens=5))
    one = np.asarray(jgen.seq2seq_generate(jp, batch, config, max_new_tokens=5, num_beams=1))
    np.testing.assert_array_equal(one, greedy)
    beam = np.asarray(jgen.seq2seq_generate(jp, batch, config, max_new_tokens=5, num_beams=4, length_penalty=0.0))
    assert np.all(_logprob(params, batch, config, beam) >= _logprob(params, batch, config, greedy) - 1e-4)


def test_bad_seq2seq_generation_arguments():
    config, params, batch = _setup(False)
    jp = to_jax(params)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jgen.seq2seq_generate(jp, batch, config, max_new_tokens=config.max_len)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        jgen.seq2seq_generate(jp, {"input_ids": np.array([[1, 10_000]])}, config, max_new_tokens=2)
    with pytest.raises(ValueError, match="missing"):
        jgen.seq2seq_generate(jp, {"src": np.array([[1]])}, config, max_new_tokens=2)


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_numpy_and_jax_decode_identically(prenorm, num_beams):
    from reference_numpy import generation as rgen

    config, params, batch = _setup(prenorm, seed=7)
    kw = dict(max_new_tokens=5, num_beams=num_beams, eos_token_id=9, length_penalty=1.0)
    want = rgen.seq2seq_generate(params, batch, config, **kw)
    got = np.asarray(jgen.seq2seq_generate(to_jax(params), batch, config, **kw))
    np.testing.assert_array_equal(got, want)
    if num_beams == 1:
        np.testing.assert_array_equal(
            rgen.seq2seq_generate(params, batch, config, max_new_tokens=5),
            _greedy_by_recompute(params, batch, config, 5))
