"""Encoder-decoder generation: encode once, then greedy or beam decoding with the cache
(``models.seq2seq.decode_step``), as transformers' ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.generation.beam import beam_loop
from bigmodel_jax.generation.sampling import token_loop
from bigmodel_jax.generation.step import seq2seq_decode_step
from bigmodel_jax.models import seq2seq as s2s_model
from reference_numpy.configs import Seq2SeqConfig
from reference_numpy.generation import (
    beam_fill,
    beam_rules,
    check_decoding,
    check_logits_rules,
    check_sampling_options,
    check_seq2seq_request,
    greedy_fill,
)

Tree = dict[str, Any]


def seq2seq_generate(
    params: Tree,
    batch: dict[str, Any],
    config: Seq2SeqConfig,
    *,
    max_new_tokens: int,
    decoder_start_token_id: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    suppress_tokens: tuple[int, ...] = (),
    forced_eos_token_id: int | None = None,
) -> jax.Array:
    """Translate: encode ``input_ids`` once, then decode with the cache.

    Greedy for ``num_beams=1``, else beam search (rules of ``beam_search`` / ``beam_loop``), as
    transformers' ``generate``. Returns (B * num_return_sequences, 1 + n) target ids starting
    with ``decoder_start_token_id``, n <= max_new_tokens (cropped after the compiled loop), as HF.
    ``suppress_tokens`` / ``forced_eos_token_id``: HF's logits rules, see ``constrain_logits``;
    Marian checkpoints use them (never pad, EOS forced at the last step). Greedy applies them to
    the logits, beam search to the log-probabilities (as HF).
    """
    ids, mask = check_seq2seq_request(config, batch, max_new_tokens)
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    eos = check_decoding(config.vocab_size, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    suppress = check_logits_rules(config.vocab_size, num_beams, suppress_tokens, forced_eos_token_id)
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask)
    # as in beam_search: the rules and the EOS / fill ids are traced, not compiled in
    fill = greedy_fill(pad_token_id, eos) if num_beams == 1 else beam_fill(pad_token_id, eos)
    rules = beam_rules(max_new_tokens, float(length_penalty), early_stopping)
    out, length = _seq2seq_generate(params, jnp.asarray(ids), mask, rules, jnp.asarray(eos, jnp.int32),
                                    jnp.asarray(fill, jnp.int32), config, max_new_tokens, decoder_start_token_id,
                                    num_beams, num_return_sequences, suppress, forced_eos_token_id)
    return out[:, :int(length)]


def constrain_logits(logits: jax.Array, i: jax.Array, max_new_tokens: int, suppress_tokens: tuple[int, ...],
                     forced_eos_token_id: int | None) -> jax.Array:
    """HF's logits rules on the logits (B, V) of new token ``i`` (0-based; may be traced): the
    twin of ``reference_numpy.generation.constrain_logits`` (see there)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if suppress_tokens:
        logits = logits.at[:, jnp.asarray(suppress_tokens)].set(neg)
    if forced_eos_token_id is not None:
        forced = jnp.full_like(logits, neg).at[:, forced_eos_token_id].set(0)
        logits = jnp.where(i == max_new_tokens - 1, forced, logits)
    return logits


@partial(jax.jit, static_argnums=(6, 7, 8, 9, 10, 11, 12))
def _seq2seq_generate(params, src, src_mask, rules, eos, fill, config, max_new_tokens, start, W, R, suppress=(),
                      forced_eos=None):
    B = src.shape[0]
    enc = s2s_model.encode(params, {"input_ids": src, "attention_mask": src_mask}, config)
    if W > 1:  # every beam of a sentence reads the same encoder output
        enc, src_mask = jnp.repeat(enc, W, axis=0), jnp.repeat(src_mask, W, axis=0)
    cache = s2s_model.init_cache(params, enc, config, 1 + max_new_tokens)
    first = jnp.full((B * W, 1), start, src.dtype)
    logits, cache = seq2seq_decode_step(params, cache, first, jnp.asarray(0), src_mask, config)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = seq2seq_decode_step(params, cache, tok[:, None].astype(src.dtype), 1 + i, src_mask, config)
        return logits[:, -1], cache

    if W > 1:
        def process(logp: jax.Array, i: jax.Array) -> jax.Array:
            return constrain_logits(logp, i, max_new_tokens, suppress, forced_eos)

        out, n = beam_loop(step, logits[:, -1], cache, B, W, max_new_tokens, rules=rules, eos=eos, fill=fill,
                           num_return_sequences=R, dtype=src.dtype,
                           process=process if suppress or forced_eos is not None else None)
    else:
        def greedy(last: jax.Array, i: jax.Array) -> jax.Array:  # new token i from its logits (B, V)
            return jnp.argmax(constrain_logits(last, i, max_new_tokens, suppress, forced_eos), axis=-1)

        out, n = token_loop(step, greedy, logits[:, -1], cache, max_new_tokens, eos, fill)
        out = out.astype(src.dtype)
    return jnp.concatenate([jnp.full((out.shape[0], 1), start, src.dtype), out], axis=1), 1 + n
