"""Incremental decoding for the GPT / Llama decoder: a KV cache, sampling and beam search.

Everything after the inputs are checked runs as one jit-compiled program: the prompt is
``prefill``ed in one step (its keys and values written into the cache), then a
``jax.lax.scan`` over the new tokens runs one ``decode_step`` each, so the loop never retraces
per token. Shapes are static: the cache holds ``S = prompt length + max_new_tokens`` slots.

Positions are slot indices (``arange``), exactly as in the full forward, so cached decoding
equals a full recompute. A left-padded prompt is handled by the key mask (padded slots are never
attended to), as in the full forward with ``attention_mask``.

Cache layout, stacked like the layer parameters: ``{"k": (L, B, S, K, E), "v": (L, B, S, K, E)}``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.activations import softmax
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.mlp import gated_mlp, mlp
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.layers.rope import rope
from reference_numpy.checks import check_array
from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.layers.attention import key_bias_matters
from reference_numpy.models.common import check_token_batch

Tree = dict[str, Any]


def init_cache(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """Zeroed cache with ``slots`` positions per sequence."""
    shape = (config.n_layers, batch, slots, config.kv_heads, config.e)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _proj(p: Tree, x: jax.Array, spec: str, use_bias: bool = True) -> jax.Array:
    y = jnp.einsum(spec, x, p["kernel"])
    return y + p["bias"] if use_bias and "bias" in p else y


def attend_cached(a: Tree, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Attention of new queries q (B, N, H, E) over cached keys/values (B, S, K, E).

    allowed: (B, 1, 1, N, S) bool. Same math as ``layers.attention`` (masked rows give zeros).
    Returns the output projection (B, N, D).
    """
    B, N, H, E = q.shape
    K = k.shape[2]
    logits = jnp.einsum("BNKGE,BSKE->BKGNS", q.reshape(B, N, K, H // K, E), k) / math.sqrt(E)
    probs = softmax(jnp.where(allowed, logits, jnp.finfo(logits.dtype).min), axis=-1)
    probs = jnp.where(allowed, probs, 0.0)
    o = jnp.einsum("BKGNS,BSKE->BNKGE", probs, v).reshape(B, N, H, E)
    y = jnp.einsum("BNHE,HED->BND", o, a["out"]["kernel"])
    return y + a["out"]["bias"] if "bias" in a["out"] else y


def decode_step(
    params: Tree, cache: Tree, ids: jax.Array, pos: jax.Array, key_mask: jax.Array, config: GPTConfig
) -> tuple[jax.Array, Tree]:
    """Run tokens ids (B, N) at slots [pos, pos + N) against the cache.

    key_mask: (B, S) bool, False for padded slots. Returns logits (B, N, V) and the cache with
    the new keys/values written in.
    """
    B, N = ids.shape
    S = cache["k"].shape[2]
    slots = pos + jnp.arange(N)  # (N,)
    x = embed(params["embed"], ids)  # (B, N, D)
    if config.positions == "learned":
        x = x + position_embedding(params["position"], slots)[None]
    norm = layer_norm if config.norm == "layer" else rms_norm
    rope_on = config.positions == "rope"
    # query i (slot pos + i) may see slot s iff s <= pos + i and the slot is not padding
    allowed = (jnp.arange(S)[None, :] <= slots[:, None])[None] & key_mask[:, None, :]  # (B, N, S)
    allowed = allowed[:, None, None]  # (B, 1, 1, N, S)

    def layer(h: jax.Array, xs: tuple[Tree, jax.Array, jax.Array]):
        p, k_cache, v_cache = xs
        a = p["attn"]
        n = norm(p["attn_norm"], h, config.norm_eps)
        q = _proj(a["query"], n, "BND,DHE->BNHE")
        k = _proj(a["key"], n, "BND,DKE->BNKE", key_bias_matters(config.rope_theta if rope_on else None))
        v = _proj(a["value"], n, "BND,DKE->BNKE")
        if rope_on:
            q = rope(q, slots, theta=config.rope_theta)
            k = rope(k, slots, theta=config.rope_theta)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
        h = h + attend_cached(a, q, k_cache, v_cache, allowed)
        mlp_fn = gated_mlp if config.gated_mlp else mlp
        h = h + mlp_fn(p["mlp"], norm(p["mlp_norm"], h, config.norm_eps), activation=config.activation)
        return h, (k_cache, v_cache)

    x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], cache["k"], cache["v"]))
    h = norm(params["final_norm"], x, config.norm_eps)
    if config.tie_embeddings:
        logits = attend(params["embed"], h)
    else:
        logits = jnp.einsum("BND,DV->BNV", h, params["lm_head"]["kernel"])
    return logits, {"k": k_new, "v": v_new}


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
                         temperature: float, top_k: int | None, top_p: float | None) -> None:
    check_token_batch({"input_ids": input_ids, "attention_mask": attention_mask}, "input_ids",
                      config.vocab_size, config.max_len)
    total = input_ids.shape[1] + max_new_tokens
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if total > config.max_len:
        raise ValueError(f"prompt + max_new_tokens = {total} is longer than the model supports "
                         f"(max_len={config.max_len})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Continue each prompt by ``max_new_tokens`` tokens -> (B, T0 + max_new_tokens) ids.

    ``temperature=0`` is greedy (argmax); otherwise sample from softmax(logits / temperature)
    restricted to the ``top_k`` tokens and the ``top_p`` nucleus, with ``key`` (required),
    folding in the step index so every step draws fresh randomness. After ``eos_token_id`` a
    sequence emits ``pad_token_id``.
    """
    input_ids = jnp.asarray(input_ids)
    _check_generate_args(config, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    key = jax.random.key(0) if key is None else key
    return _generate(params, input_ids, mask, key, config, max_new_tokens, float(temperature), top_k,
                     top_p, eos_token_id, pad_token_id)


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9, 10))
def _generate(params, input_ids, mask, key, config, max_new_tokens, temperature, top_k, top_p,
              eos_token_id, pad_token_id):
    B, T0 = input_ids.shape
    S = T0 + max_new_tokens
    dtype = params["embed"]["embedding"].dtype
    key_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    cache = init_cache(config, B, S, dtype)
    logits, cache = decode_step(params, cache, input_ids, jnp.asarray(0), key_mask, config)

    def choose(last_logits: jax.Array, step: jax.Array) -> jax.Array:
        if temperature == 0:
            return jnp.argmax(last_logits, axis=-1)
        z = filter_logits(last_logits / temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(key, step), z, axis=-1)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = decode_step(params, cache, tok[:, None], T0 + i, key_mask, config)
        return logits[:, -1], cache

    new = token_loop(step, choose, logits[:, -1], cache, max_new_tokens, eos_token_id, pad_token_id)
    return jnp.concatenate([input_ids, new.astype(input_ids.dtype)], axis=1)


def token_loop(step, choose, last_logits: jax.Array, cache: Tree, max_new_tokens: int,
               eos_token_id: int | None, pad_token_id: int) -> jax.Array:
    """Shared one-token-per-step decoding as a ``lax.scan``: ``choose(logits (B, V), i) -> tok``,
    ``step(cache, tok (B,), i) -> (logits, cache)``; after EOS a sequence emits pad.
    Returns (B, max_new_tokens). The last step's forward is not needed for its logits; running
    it keeps the loop uniform."""

    def body(carry, i):
        last, cache, done = carry
        tok = jnp.where(done, pad_token_id, choose(last, i))
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        last, cache = step(cache, tok, i)
        return (last, cache, done), tok

    done = jnp.zeros((last_logits.shape[0],), bool)
    _, toks = jax.lax.scan(body, (last_logits, cache, done), jnp.arange(max_new_tokens))
    return toks.T


def beam_search(
    params: Tree,
    input_ids: Any,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Beam search -> the best continuation per prompt, (B, T0 + max_new_tokens) ids.

    Each of ``num_beams`` beams keeps its summed log-probability; every step expands all beams
    by every token and keeps the best ``num_beams`` of the ``num_beams * V`` candidates. A beam
    that emitted ``eos_token_id`` is finished: it continues only with ``pad_token_id`` at no
    cost. The winner maximises ``score / length ** length_penalty``, length counting generated
    tokens up to and including EOS. Same algorithm as ``reference_numpy.generation``.
    """
    input_ids = jnp.asarray(input_ids)
    _check_generate_args(config, input_ids, None, max_new_tokens, 0.0, None, None)
    if num_beams < 1 or num_beams > config.vocab_size:
        raise ValueError(f"num_beams must be in [1, {config.vocab_size}], got {num_beams}")
    return _beam_search(params, input_ids, config, max_new_tokens, num_beams, float(length_penalty),
                        eos_token_id, pad_token_id)


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _beam_search(params, input_ids, config, max_new_tokens, W, length_penalty, eos_token_id, pad_token_id):
    B, T0 = input_ids.shape
    S = T0 + max_new_tokens
    ids = jnp.repeat(input_ids, W, axis=0)  # (B*W, T0), beam-major within each prompt
    key_mask = jnp.ones((B * W, S), bool)
    cache = init_cache(config, B * W, S, params["embed"]["embedding"].dtype)
    logits, cache = decode_step(params, cache, ids, jnp.asarray(0), key_mask, config)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = decode_step(params, cache, tok[:, None].astype(ids.dtype), T0 + i, key_mask, config)
        return logits[:, -1], cache

    out = beam_loop(step, logits[:, -1], cache, B, W, max_new_tokens, length_penalty, eos_token_id,
                    pad_token_id, input_ids.dtype)
    return jnp.concatenate([input_ids, out], axis=1)


def beam_loop(step, last_logits, cache: Tree, B: int, W: int, max_new_tokens: int, length_penalty: float,
              eos_token_id: int | None, pad_token_id: int, dtype: Any) -> jax.Array:
    """The beam search shared by the decoder-only and encoder-decoder models.

    ``step(cache, tok (B*W,), i) -> (logits (B*W, V), cache)`` runs one token per beam;
    ``last_logits`` (B*W, V) are the prompt's; every cache leaf has the B*W rows on axis 1.
    Returns the best beam's tokens (B, max_new_tokens).
    """
    V = last_logits.shape[-1]
    # Only beam 0 is live at the start, so the first expansion does not pick W copies.
    scores = jnp.where(jnp.arange(W)[None, :] == 0, 0.0, -jnp.inf).astype(jnp.float32)
    scores = jnp.broadcast_to(scores, (B, W))
    finished = jnp.zeros((B, W), bool)
    lengths = jnp.zeros((B, W), jnp.int32)
    tokens = jnp.full((B, W, max_new_tokens), pad_token_id, dtype)
    pad_row = jnp.full((V,), -jnp.inf).at[pad_token_id].set(0.0)

    def body(carry, i):
        last_logits, cache, scores, finished, lengths, tokens = carry
        logp = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1).reshape(B, W, V)
        logp = jnp.where(finished[..., None], pad_row, logp)  # finished: only pad, at zero cost
        cand = (scores[..., None] + logp).reshape(B, W * V)
        scores, flat = jax.lax.top_k(cand, W)  # (B, W)
        beam, tok = flat // V, flat % V
        gather = lambda a: jnp.take_along_axis(a, beam.reshape(B, W, *([1] * (a.ndim - 2))), axis=1)  # noqa: E731
        was_finished = gather(finished)
        tokens = gather(tokens).at[:, :, i].set(tok.astype(tokens.dtype))
        lengths = gather(lengths) + (~was_finished).astype(jnp.int32)
        finished = was_finished if eos_token_id is None else was_finished | (tok == eos_token_id)
        rows = (jnp.arange(B)[:, None] * W + beam).reshape(-1)  # source beam of each new beam
        cache = jax.tree_util.tree_map(lambda c: c[:, rows], cache)
        last_logits, cache = step(cache, tok.reshape(B * W), i)
        return (last_logits, cache, scores, finished, lengths, tokens), None

    carry = (last_logits, cache, scores, finished, lengths, tokens)
    (_, _, scores, finished, lengths, tokens), _ = jax.lax.scan(body, carry, jnp.arange(max_new_tokens))
    final = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(final, axis=1)  # (B,)
    return jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]


# --------------------------------------------------------------------------------------------
# encoder-decoder


def seq2seq_init_cache(params: Tree, enc: jax.Array, config: Seq2SeqConfig, slots: int) -> Tree:
    """Decoder self-attention cache (L, B, slots, K, E) plus the cross-attention keys/values of
    the encoder output, computed once: (L, B, S, H, E)."""
    Ld, B = config.decoder_layers, enc.shape[0]
    K, E = config.n_kv_heads or config.n_heads, config.d_model // config.n_heads
    cross = params["decoder"]["layers"]["cross_attn"]
    # no key bias: without RoPE it cannot change attention (see layers.attention.key_bias_matters)
    ck = jnp.einsum("BSD,LDHE->LBSHE", enc, cross["key"]["kernel"])
    cv = jnp.einsum("BSD,LDHE->LBSHE", enc, cross["value"]["kernel"])
    if "bias" in cross["value"]:
        cv = cv + cross["value"]["bias"][:, None, None]
    zeros = jnp.zeros((Ld, B, slots, K, E), enc.dtype)
    return {"k": zeros, "v": zeros, "ck": ck, "cv": cv}


def seq2seq_decode_step(params: Tree, cache: Tree, ids: jax.Array, pos: jax.Array,
                        src_mask: jax.Array, config: Seq2SeqConfig) -> tuple[jax.Array, Tree]:
    """Target tokens ids (B, N) at slots [pos, pos + N) -> logits (B, N, V), updated cache."""
    from bigmodel_jax.models.seq2seq import _embed_at
    from reference_numpy.models.seq2seq import decoder_spec

    B, N = ids.shape
    T = cache["k"].shape[2]
    S = cache["ck"].shape[2]
    slots = pos + jnp.arange(N)
    table = params["embed"] if config.share_embeddings else params["target_embed"]
    y = _embed_at(table, ids, slots, config)
    spec = decoder_spec(config)
    self_allowed = jnp.broadcast_to((jnp.arange(T)[None, :] <= slots[:, None]), (B, N, T))[:, None, None]
    cross_allowed = jnp.broadcast_to(src_mask[:, None, :], (B, N, S))[:, None, None]

    def layer(h: jax.Array, xs):
        p, k_cache, v_cache, ck, cv = xs

        def self_attn(n):
            nonlocal k_cache, v_cache
            a = p["attn"]
            q = _proj(a["query"], n, "BND,DHE->BNHE")
            k_cache = jax.lax.dynamic_update_slice(k_cache, _proj(a["key"], n, "BND,DKE->BNKE", False), (0, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, _proj(a["value"], n, "BND,DKE->BNKE"), (0, pos, 0, 0))
            return attend_cached(a, q, k_cache, v_cache, self_allowed)

        def cross_attn(n):
            a = p["cross_attn"]
            return attend_cached(a, _proj(a["query"], n, "BND,DHE->BNHE"), ck, cv, cross_allowed)

        def sublayer(name, h, fn):
            if spec.prenorm:
                return h + fn(layer_norm(p[name + "_norm"], h, spec.norm_eps))
            return layer_norm(p[name + "_norm"], h + fn(h), spec.norm_eps)

        h = sublayer("attn", h, self_attn)
        h = sublayer("cross", h, cross_attn)
        h = sublayer("mlp", h, lambda n: mlp(p["mlp"], n, activation=spec.activation))
        return h, (k_cache, v_cache)

    y, (k_new, v_new) = jax.lax.scan(
        layer, y, (params["decoder"]["layers"], cache["k"], cache["v"], cache["ck"], cache["cv"]))
    if config.prenorm:
        y = layer_norm(params["decoder"]["final_norm"], y, config.norm_eps)
    if config.share_embeddings:
        logits = attend(params["embed"], y)
    else:
        logits = jnp.einsum("BND,DV->BNV", y, params["lm_head"]["kernel"])
    return logits, {**cache, "k": k_new, "v": v_new}


def seq2seq_generate(
    params: Tree,
    batch: dict[str, Any],
    config: Seq2SeqConfig,
    *,
    max_new_tokens: int,
    decoder_start_token_id: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Translate: encode ``input_ids`` once, then decode with the cache.

    Greedy for ``num_beams=1``, else beam search (rules of ``beam_search``). Returns
    (B, 1 + max_new_tokens) target ids starting with ``decoder_start_token_id``, as HF does.
    """
    from reference_numpy.models.seq2seq import check_source

    ids, mask = check_source(batch, config)
    if not 1 <= max_new_tokens < config.max_len:
        raise ValueError(f"max_new_tokens must be in [1, {config.max_len - 1}] (max_len={config.max_len}), "
                         f"got {max_new_tokens}")
    if not 1 <= num_beams <= config.vocab_size:
        raise ValueError(f"num_beams must be in [1, {config.vocab_size}], got {num_beams}")
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask)
    return _seq2seq_generate(params, jnp.asarray(ids), mask, config, max_new_tokens, decoder_start_token_id,
                             num_beams, float(length_penalty), eos_token_id, pad_token_id)


@partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8, 9))
def _seq2seq_generate(params, src, src_mask, config, max_new_tokens, start, W, length_penalty, eos_token_id,
                      pad_token_id):
    from bigmodel_jax.models.seq2seq import encode

    B = src.shape[0]
    enc = encode(params, {"input_ids": src, "attention_mask": src_mask}, config)
    if W > 1:  # every beam of a sentence reads the same encoder output
        enc, src_mask = jnp.repeat(enc, W, axis=0), jnp.repeat(src_mask, W, axis=0)
    cache = seq2seq_init_cache(params, enc, config, 1 + max_new_tokens)
    first = jnp.full((B * W, 1), start, src.dtype)
    logits, cache = seq2seq_decode_step(params, cache, first, jnp.asarray(0), src_mask, config)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = seq2seq_decode_step(params, cache, tok[:, None].astype(src.dtype), 1 + i, src_mask, config)
        return logits[:, -1], cache

    if W > 1:
        out = beam_loop(step, logits[:, -1], cache, B, W, max_new_tokens, length_penalty, eos_token_id,
                        pad_token_id, src.dtype)
    else:
        greedy = lambda last, i: jnp.argmax(last, axis=-1)  # noqa: E731
        out = token_loop(step, greedy, logits[:, -1], cache, max_new_tokens, eos_token_id,
                         pad_token_id).astype(src.dtype)
    return jnp.concatenate([jnp.full((B, 1), start, src.dtype), out], axis=1)


def check_prompt(name: str, ids: Any) -> None:
    """Prompts are (B, T0) integer arrays."""
    check_array(name, ids, ("B", "T"), kind="int")
