"""Greedy and sampled decoding for the GPT / Llama decoder, as one compiled program.

Everything after the inputs are checked runs as one jit-compiled program: the prompt is
prefilled in one step (its keys and values written into the cache), then a
``jax.lax.while_loop`` over the new tokens runs one ``decode_step`` each, so the loop never
retraces per token, and stops once every sequence has finished. Shapes are static: the cache
holds ``S = prompt length + max_new_tokens`` slots and the loop writes into a fixed
(B, max_new_tokens) buffer; the public functions crop the result to the steps actually taken
after the compiled program returns, so the output has the shape transformers' ``generate`` gives.

Positions are slot indices (``arange``), exactly as in the full forward, so cached decoding
equals a full recompute. A left-padded prompt is handled by the key mask (padded slots are never
attended to), as in the full forward with ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.generation.layout import DECODE_LAYOUT, decode_params
from bigmodel_jax.generation.step import decode_step
from bigmodel_jax.models.gpt import init_cache, init_layer_caches
from bigmodel_jax.perf import PerfOptions
from reference_numpy.configs import GPTConfig
from reference_numpy.generation import (
    check_decoding,
    check_lm_request,
    check_prompt,  # noqa: F401 (re-exported by bigmodel_jax.generation)
    check_sampling_options,
    greedy_fill,
)

Tree = dict[str, Any]


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is < p (so the top token always stays)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def _check_generate_args(config: GPTConfig, input_ids: Any, attention_mask: Any, max_new_tokens: int,
                         temperature: float, top_k: int | None, top_p: float | None,
                         length_penalty: float = 1.0) -> None:
    """The request and the settings, by the checks the NumPy reference uses (one set of rules):
    non-empty prompts within max_len, no NaN / inf / out-of-range setting."""
    check_lm_request(config, input_ids, attention_mask, max_new_tokens)
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, length_penalty=length_penalty)


def generate(
    params: Tree,
    input_ids: Any,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    attention_mask: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    perf: PerfOptions | None = None,
) -> jax.Array:
    """Continue each prompt by up to ``max_new_tokens`` tokens -> (B, T0 + n) ids.

    ``temperature=0`` is greedy (argmax), token for token transformers'
    ``generate(do_sample=False, num_beams=1)``; otherwise sample from softmax(logits / temperature)
    restricted to the ``top_k`` tokens and the ``top_p`` nucleus, with ``key`` (required),
    folding in the step index so every step draws fresh randomness. After an EOS id a sequence
    emits ``pad_token_id`` (None: the first EOS id, as HF), and decoding stops once every
    sequence has finished, so ``n <= max_new_tokens`` (the compiled loop has a fixed shape; the
    result is cropped to ``n`` after it, as HF returns it). ``perf``
    (``bigmodel_jax.perf.PerfOptions``): the decoding layout, ``scan_layers`` / ``fused_qkv``
    (``layout.decode_params``); None = ``layout.DECODE_LAYOUT``, the fastest measured. The same
    tokens either way.
    """
    input_ids = jnp.asarray(input_ids)
    _check_generate_args(config, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    eos = check_decoding(config.vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    key = jax.random.key(0) if key is None else key
    # EOS / pad ids are traced arguments (only the number of EOS ids is static): one compilation
    # serves every choice of them
    out, length = _generate(params, input_ids, mask, key, jnp.asarray(eos, jnp.int32),
                            jnp.asarray(greedy_fill(pad_token_id, eos), jnp.int32), config, max_new_tokens,
                            float(temperature), top_k, top_p, DECODE_LAYOUT if perf is None else perf)
    return out[:, :int(length)]


@partial(jax.jit, static_argnums=(6, 7, 8, 9, 10, 11))
def _generate(params, input_ids, mask, key, eos, pad, config, max_new_tokens, temperature, top_k, top_p, perf=None):
    B, T0 = input_ids.shape
    S = T0 + max_new_tokens
    dtype = params["embed"]["embedding"].dtype
    key_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    params = decode_params(params, config, perf)  # once, outside the token loop
    # unrolled: one cache array per layer (no stacked copies), in the layout its dots read in place
    unrolled = isinstance(params["layers"], list)
    cache = (init_layer_caches if unrolled else init_cache)(config, B, S, dtype)
    logits, cache = decode_step(params, cache, input_ids, jnp.asarray(0), key_mask, config)

    def choose(last_logits: jax.Array, step: jax.Array) -> jax.Array:
        if temperature == 0:
            return jnp.argmax(last_logits, axis=-1)
        z = filter_logits(last_logits / temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(key, step), z, axis=-1)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = decode_step(params, cache, tok[:, None].astype(input_ids.dtype), T0 + i, key_mask, config)
        return logits[:, -1], cache

    new, n = token_loop(step, choose, logits[:, -1], cache, max_new_tokens, eos, pad)
    return jnp.concatenate([input_ids, new.astype(input_ids.dtype)], axis=1), T0 + n


def token_loop(step, choose, last_logits: jax.Array, cache: Tree, max_new_tokens: int,
               eos_token_id: int | Sequence[int] | jax.Array | None,
               pad_token_id: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shared one-token-per-step decoding (HF ``_sample``) as a ``lax.while_loop``.

    ``choose(logits (B, V), i) -> tok (B,)``, ``step(cache, tok (B,), i) -> (logits, cache)``;
    ``last_logits`` (B, V) are the prompt's; the EOS ids may be a traced (n_eos,) array and the
    pad id a traced scalar. After an EOS id a row emits ``pad_token_id``; the loop stops when
    every row has finished. Returns tokens (B, max_new_tokens), of which the
    first ``n`` (a scalar, also returned) were generated and the rest are ``pad_token_id``. The
    last step's forward is not needed for its logits; running it keeps the loop body uniform.
    """
    eos = jnp.asarray(() if eos_token_id is None else eos_token_id, jnp.int32).reshape(-1)
    B = last_logits.shape[0]

    def cond(carry) -> jax.Array:
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, last, cache, done, toks = carry
        tok = choose(last, i).astype(jnp.int32)
        if eos.size:  # HF pads finished rows only when there is an EOS criterion
            tok = jnp.where(done, pad_token_id, tok)
            done = done | jnp.isin(tok, eos)
        last, cache = step(cache, tok, i)
        return i + 1, last, cache, done, toks.at[:, i].set(tok)

    toks = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32)  # columns past n are cropped off
    carry = (jnp.asarray(0), last_logits, cache, jnp.zeros((B,), bool), toks)
    n, _, _, _, toks = jax.lax.while_loop(cond, body, carry)
    return toks, n

