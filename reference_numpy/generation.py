"""Greedy and beam decoding with a KV cache for the GPT / Llama decoder, in NumPy.

The same algorithm as ``bigmodel_jax.generation`` (see there for the cache layout and the beam
rules), written plainly: one forward of the prompt fills the cache, then one step per new token
attends over the cached keys and values. Forward only: decoding needs no backward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.layers.activations import log_softmax_forward, softmax_forward
from reference_numpy.layers.attention import key_bias_matters
from reference_numpy.layers.embeddings import embedding_attend, embedding_forward, position_embedding_forward
from reference_numpy.layers.mlp import gated_mlp_forward, mlp_forward
from reference_numpy.layers.norms import layer_norm_forward, rms_norm_forward
from reference_numpy.layers.rope import rope_forward
from reference_numpy.models.common import check_token_batch, layer

Tree = dict[str, Any]


def init_cache(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """Zeroed cache ``{"k", "v"}`` of shape (L, B, S, K, E)."""
    shape = (config.n_layers, batch, slots, config.kv_heads, config.e)
    return {"k": np.zeros(shape, dtype), "v": np.zeros(shape, dtype)}


def _proj(p: Tree, x: np.ndarray, spec: str, use_bias: bool = True) -> np.ndarray:
    y = np.einsum(spec, x, p["kernel"])
    return y + p["bias"] if use_bias and "bias" in p else y


def decode_step(params: Tree, cache: Tree, ids: np.ndarray, pos: int, key_mask: np.ndarray,
                config: GPTConfig) -> np.ndarray:
    """Tokens ids (B, N) at slots [pos, pos + N); writes their k/v into ``cache`` in place.

    Returns logits (B, N, V).
    """
    B, N = ids.shape
    S = cache["k"].shape[2]
    slots = pos + np.arange(N)
    x, _ = embedding_forward(params["embed"], ids)
    if config.positions == "learned":
        x = x + position_embedding_forward(params["position"], slots)[0][None]
    norm = layer_norm_forward if config.norm == "layer" else rms_norm_forward
    rope_on = config.positions == "rope"
    H, K, E = config.n_heads, config.kv_heads, config.e
    G = H // K
    allowed = (np.arange(S)[None, :] <= slots[:, None])[None] & key_mask[:, None, :]  # (B, N, S)
    allowed = allowed[:, None, None]  # (B, 1, 1, N, S)
    for i in range(config.n_layers):
        p = layer(params["layers"], i)
        a = p["attn"]
        n, _ = norm(p["attn_norm"], x, eps=config.norm_eps)
        q = _proj(a["query"], n, "BND,DHE->BNHE")
        k = _proj(a["key"], n, "BND,DKE->BNKE", key_bias_matters(config.rope_theta if rope_on else None))
        v = _proj(a["value"], n, "BND,DKE->BNKE")
        if rope_on:
            q, _ = rope_forward(q, slots, theta=config.rope_theta)
            k, _ = rope_forward(k, slots, theta=config.rope_theta)
        cache["k"][i, :, pos:pos + N] = k
        cache["v"][i, :, pos:pos + N] = v
        logits = np.einsum("BNKGE,BSKE->BKGNS", q.reshape(B, N, K, G, E), cache["k"][i]) / math.sqrt(E)
        probs, _ = softmax_forward(np.where(allowed, logits, logits.dtype.type(-np.inf)), axis=-1)
        o = np.einsum("BKGNS,BSKE->BNKGE", probs, cache["v"][i]).reshape(B, N, H, E)
        y = np.einsum("BNHE,HED->BND", o, a["out"]["kernel"])
        if "bias" in a["out"]:
            y = y + a["out"]["bias"]
        x = x + y
        mlp_fwd = gated_mlp_forward if config.gated_mlp else mlp_forward
        x = x + mlp_fwd(p["mlp"], norm(p["mlp_norm"], x, eps=config.norm_eps)[0], activation=config.activation)[0]
    h, _ = norm(params["final_norm"], x, eps=config.norm_eps)
    if config.tie_embeddings:
        return embedding_attend(params["embed"], h)[0]
    return h @ params["lm_head"]["kernel"]


def _check(config: GPTConfig, input_ids: np.ndarray, attention_mask: Any, max_new_tokens: int) -> None:
    check_token_batch({"input_ids": input_ids, "attention_mask": attention_mask}, "input_ids",
                      config.vocab_size, config.max_len)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.shape[1] + max_new_tokens > config.max_len:
        raise ValueError(f"prompt + max_new_tokens = {input_ids.shape[1] + max_new_tokens} is longer "
                         f"than the model supports (max_len={config.max_len})")


def greedy(params: Tree, input_ids: np.ndarray, config: GPTConfig, *, max_new_tokens: int,
           attention_mask: Any = None, eos_token_id: int | None = None, pad_token_id: int = 0) -> np.ndarray:
    """Greedy continuation -> (B, T0 + max_new_tokens) ids; after EOS a sequence emits pad."""
    input_ids = np.asarray(input_ids)
    _check(config, input_ids, attention_mask, max_new_tokens)
    B, T0 = input_ids.shape
    mask = np.ones((B, T0), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    key_mask = np.concatenate([mask, np.ones((B, max_new_tokens), bool)], axis=1)
    cache = init_cache(config, B, T0 + max_new_tokens, params["embed"]["embedding"].dtype)
    last = decode_step(params, cache, input_ids, 0, key_mask, config)[:, -1]

    def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:
        return decode_step(params, cache, tok[:, None], T0 + i, key_mask, config)[:, -1]

    out = greedy_loop(step, last, cache, max_new_tokens, eos_token_id, pad_token_id, input_ids.dtype)
    return np.concatenate([input_ids, out], axis=1)


def greedy_loop(step, last: np.ndarray, cache: Tree, max_new_tokens: int, eos_token_id: int | None,
                pad_token_id: int, dtype: Any) -> np.ndarray:
    """Shared greedy decoding: argmax each step; after EOS a sequence emits pad. ``step(cache,
    tok (B,), i) -> logits (B, V)`` updates ``cache`` in place. Returns (B, max_new_tokens)."""
    done = np.zeros(last.shape[0], bool)
    out = []
    for i in range(max_new_tokens):
        tok = np.where(done, pad_token_id, np.argmax(last, axis=-1))
        if eos_token_id is not None:
            done |= tok == eos_token_id
        out.append(tok)
        if i + 1 < max_new_tokens:
            last = step(cache, tok, i)
    return np.stack(out, axis=1).astype(dtype)


def beam_search(params: Tree, input_ids: np.ndarray, config: GPTConfig, *, max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, eos_token_id: int | None = None,
                pad_token_id: int = 0) -> np.ndarray:
    """Beam search with the rules of ``bigmodel_jax.generation.beam_search``."""
    input_ids = np.asarray(input_ids)
    _check(config, input_ids, None, max_new_tokens)
    B, T0 = input_ids.shape
    W = num_beams
    if W < 1 or W > config.vocab_size:
        raise ValueError(f"num_beams must be in [1, {config.vocab_size}], got {W}")
    ids = np.repeat(input_ids, W, axis=0)
    key_mask = np.ones((B * W, T0 + max_new_tokens), bool)
    cache = init_cache(config, B * W, T0 + max_new_tokens, params["embed"]["embedding"].dtype)
    last = decode_step(params, cache, ids, 0, key_mask, config)[:, -1]

    def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:
        return decode_step(params, cache, tok[:, None], T0 + i, key_mask, config)[:, -1]

    out = beam_loop(step, last, cache, B, W, max_new_tokens, length_penalty, eos_token_id, pad_token_id,
                    input_ids.dtype)
    return np.concatenate([input_ids, out], axis=1)


def beam_loop(step, last: np.ndarray, cache: Tree, B: int, W: int, max_new_tokens: int, length_penalty: float,
              eos_token_id: int | None, pad_token_id: int, dtype: Any) -> np.ndarray:
    """Shared beam search: ``step(cache, tok (B*W,), i) -> logits (B*W, V)`` updates ``cache`` in
    place; cache leaves hold the B*W rows on axis 1. Returns the best beam's tokens."""
    V = last.shape[-1]
    scores = np.where(np.arange(W)[None, :] == 0, 0.0, -np.inf).astype(np.float32).repeat(B, 0).reshape(B, W)
    finished = np.zeros((B, W), bool)
    lengths = np.zeros((B, W), np.int32)
    tokens = np.full((B, W, max_new_tokens), pad_token_id, dtype)
    pad_row = np.full(V, -np.inf, np.float32)
    pad_row[pad_token_id] = 0.0
    for i in range(max_new_tokens):
        logp = log_softmax_forward(last.astype(np.float32), axis=-1)[0].reshape(B, W, V)
        logp = np.where(finished[..., None], pad_row, logp)
        cand = (scores[..., None] + logp).reshape(B, W * V)
        # top-W by score, ties broken by the lower flat index (as jax.lax.top_k does)
        flat = np.argsort(-cand, axis=1, kind="stable")[:, :W]
        scores = np.take_along_axis(cand, flat, axis=1)
        beam, tok = flat // V, flat % V
        was_finished = np.take_along_axis(finished, beam, axis=1)
        tokens = np.take_along_axis(tokens, beam[..., None], axis=1)
        tokens[:, :, i] = tok
        lengths = np.take_along_axis(lengths, beam, axis=1) + (~was_finished)
        finished = was_finished | (tok == eos_token_id) if eos_token_id is not None else was_finished
        rows = (np.arange(B)[:, None] * W + beam).reshape(-1)
        for name in cache:
            cache[name] = cache[name][:, rows]
        if i + 1 < max_new_tokens:
            last = step(cache, tok.reshape(B * W), i)
    final = scores / np.maximum(lengths, 1).astype(np.float32) ** np.float32(length_penalty)
    best = np.argmax(final, axis=1)
    return np.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]


# --------------------------------------------------------------------------------------------
# encoder-decoder


def seq2seq_init_cache(params: Tree, enc: np.ndarray, config: Seq2SeqConfig, slots: int) -> Tree:
    """Self-attention cache (L, B, slots, K, E) and cross-attention K/V of ``enc`` (L, B, S, H, E)."""
    K, E = config.n_kv_heads or config.n_heads, config.d_model // config.n_heads
    cross = params["decoder"]["layers"]["cross_attn"]
    ck = np.einsum("BSD,LDHE->LBSHE", enc, cross["key"]["kernel"])  # key bias cannot matter (no RoPE)
    cv = np.einsum("BSD,LDHE->LBSHE", enc, cross["value"]["kernel"])
    if "bias" in cross["value"]:
        cv = cv + cross["value"]["bias"][:, None, None]
    shape = (config.decoder_layers, enc.shape[0], slots, K, E)
    return {"k": np.zeros(shape, enc.dtype), "v": np.zeros(shape, enc.dtype), "ck": ck, "cv": cv}


def _attend_cached(a: Tree, q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    B, N, H, E = q.shape
    K = k.shape[2]
    logits = np.einsum("BNKGE,BSKE->BKGNS", q.reshape(B, N, K, H // K, E), k) / math.sqrt(E)
    probs, _ = softmax_forward(np.where(allowed, logits, logits.dtype.type(-np.inf)), axis=-1)
    o = np.einsum("BKGNS,BSKE->BNKGE", probs, v).reshape(B, N, H, E)
    y = np.einsum("BNHE,HED->BND", o, a["out"]["kernel"])
    return y + a["out"]["bias"] if "bias" in a["out"] else y


def seq2seq_decode_step(params: Tree, cache: Tree, ids: np.ndarray, pos: int, src_mask: np.ndarray,
                        config: Seq2SeqConfig) -> np.ndarray:
    """Target tokens ids (B, N) at slots [pos, pos + N) -> logits (B, N, V); cache updated in place."""
    from reference_numpy.layers.embeddings import sinusoidal_positions
    from reference_numpy.models.seq2seq import POSITION_LAYOUT, decoder_spec, embed_scale

    B, N = ids.shape
    T = cache["k"].shape[2]
    slots = pos + np.arange(N)
    table = params["embed"] if config.share_embeddings else params["target_embed"]
    y, _ = embedding_forward(table, ids)
    y = y * y.dtype.type(embed_scale(config)) + sinusoidal_positions(slots, config.d_model, y.dtype,
                                                                      layout=POSITION_LAYOUT)[None]
    spec = decoder_spec(config)
    self_allowed = (np.arange(T)[None, :] <= slots[:, None])[None, None, None]  # (1, 1, 1, N, T)
    cross_allowed = src_mask[:, None, None, None, :]  # (B, 1, 1, 1, S)

    def norm(p, x):
        return layer_norm_forward(p, x, eps=spec.norm_eps)[0]

    for i in range(config.decoder_layers):
        p = layer(params["decoder"]["layers"], i)

        def self_attn(n, p=p, i=i):
            a = p["attn"]
            cache["k"][i, :, pos:pos + N] = _proj(a["key"], n, "BND,DKE->BNKE", False)
            cache["v"][i, :, pos:pos + N] = _proj(a["value"], n, "BND,DKE->BNKE")
            return _attend_cached(a, _proj(a["query"], n, "BND,DHE->BNHE"), cache["k"][i], cache["v"][i], self_allowed)

        def cross_attn(n, p=p, i=i):
            a = p["cross_attn"]
            return _attend_cached(a, _proj(a["query"], n, "BND,DHE->BNHE"), cache["ck"][i], cache["cv"][i],
                                  cross_allowed)

        for name, fn in (("attn", self_attn), ("cross", cross_attn),
                         ("mlp", lambda n, p=p: mlp_forward(p["mlp"], n, activation=spec.activation)[0])):
            y = y + fn(norm(p[name + "_norm"], y)) if spec.prenorm else norm(p[name + "_norm"], y + fn(y))
    if config.prenorm:
        y = norm(params["decoder"]["final_norm"], y)
    if config.share_embeddings:
        return embedding_attend(params["embed"], y)[0]
    return y @ params["lm_head"]["kernel"]


def seq2seq_generate(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, max_new_tokens: int,
                     decoder_start_token_id: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
                     eos_token_id: int | None = None, pad_token_id: int = 0) -> np.ndarray:
    """Greedy (``num_beams=1``) or beam decoding with the cache -> (B, 1 + max_new_tokens) ids;
    the rules of ``bigmodel_jax.generation.seq2seq_generate``."""
    from reference_numpy.models.seq2seq import check_source, encode

    ids, mask = check_source(batch, config)
    if not 1 <= max_new_tokens < config.max_len:
        raise ValueError(f"max_new_tokens must be in [1, {config.max_len - 1}] (max_len={config.max_len}), "
                         f"got {max_new_tokens}")
    B, W = ids.shape[0], num_beams
    if not 1 <= W <= config.vocab_size:
        raise ValueError(f"num_beams must be in [1, {config.vocab_size}], got {W}")
    mask = np.ones(ids.shape, bool) if mask is None else mask
    enc = encode(params, batch, config)
    enc, mask = np.repeat(enc, W, axis=0), np.repeat(mask, W, axis=0)
    cache = seq2seq_init_cache(params, enc, config, 1 + max_new_tokens)
    start = np.full((B * W, 1), decoder_start_token_id, ids.dtype)
    last = seq2seq_decode_step(params, cache, start, 0, mask, config)[:, -1]

    def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:
        return seq2seq_decode_step(params, cache, tok[:, None], 1 + i, mask, config)[:, -1]

    if W > 1:
        out = beam_loop(step, last, cache, B, W, max_new_tokens, length_penalty, eos_token_id, pad_token_id,
                        ids.dtype)
    else:
        out = greedy_loop(step, last, cache, max_new_tokens, eos_token_id, pad_token_id, ids.dtype)
    return np.concatenate([np.full((B, 1), decoder_start_token_id, ids.dtype), out], axis=1)
