"""Greedy and beam decoding with a KV cache for the GPT / Llama decoder, in NumPy.

The same algorithm as ``bigmodel_jax.generation`` (see there for the cache layout and the beam
rules), written plainly: one forward of the prompt fills the cache, then one step per new token
attends over the cached keys and values. Forward only: decoding needs no backward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference_numpy.configs import GPTConfig
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
    done = np.zeros(B, bool)
    out = []
    for step in range(max_new_tokens):
        tok = np.where(done, pad_token_id, np.argmax(last, axis=-1))
        if eos_token_id is not None:
            done |= tok == eos_token_id
        out.append(tok)
        if step + 1 < max_new_tokens:
            last = decode_step(params, cache, tok[:, None], T0 + step, key_mask, config)[:, -1]
    return np.concatenate([input_ids, np.stack(out, axis=1).astype(input_ids.dtype)], axis=1)


def beam_search(params: Tree, input_ids: np.ndarray, config: GPTConfig, *, max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, eos_token_id: int | None = None,
                pad_token_id: int = 0) -> np.ndarray:
    """Beam search with the rules of ``bigmodel_jax.generation.beam_search``."""
    input_ids = np.asarray(input_ids)
    _check(config, input_ids, None, max_new_tokens)
    B, T0 = input_ids.shape
    W, V = num_beams, config.vocab_size
    if W < 1 or W > V:
        raise ValueError(f"num_beams must be in [1, {V}], got {W}")
    ids = np.repeat(input_ids, W, axis=0)
    key_mask = np.ones((B * W, T0 + max_new_tokens), bool)
    cache = init_cache(config, B * W, T0 + max_new_tokens, params["embed"]["embedding"].dtype)
    last = decode_step(params, cache, ids, 0, key_mask, config)[:, -1]
    scores = np.where(np.arange(W)[None, :] == 0, 0.0, -np.inf).astype(np.float32).repeat(B, 0).reshape(B, W)
    finished = np.zeros((B, W), bool)
    lengths = np.zeros((B, W), np.int32)
    tokens = np.full((B, W, max_new_tokens), pad_token_id, input_ids.dtype)
    pad_row = np.full(V, -np.inf, np.float32)
    pad_row[pad_token_id] = 0.0
    for step in range(max_new_tokens):
        logp = log_softmax_forward(last.astype(np.float32), axis=-1)[0].reshape(B, W, V)
        logp = np.where(finished[..., None], pad_row, logp)
        cand = (scores[..., None] + logp).reshape(B, W * V)
        # top-W by score, ties broken by the lower flat index (as jax.lax.top_k does)
        flat = np.argsort(-cand, axis=1, kind="stable")[:, :W]
        scores = np.take_along_axis(cand, flat, axis=1)
        beam, tok = flat // V, flat % V
        was_finished = np.take_along_axis(finished, beam, axis=1)
        tokens = np.take_along_axis(tokens, beam[..., None], axis=1)
        tokens[:, :, step] = tok
        lengths = np.take_along_axis(lengths, beam, axis=1) + (~was_finished)
        finished = was_finished | (tok == eos_token_id) if eos_token_id is not None else was_finished
        rows = (np.arange(B)[:, None] * W + beam).reshape(-1)
        cache = {n: c[:, rows] for n, c in cache.items()}
        if step + 1 < max_new_tokens:
            last = decode_step(params, cache, tok.reshape(B * W, 1), T0 + step, key_mask, config)[:, -1]
    final = scores / np.maximum(lengths, 1).astype(np.float32) ** np.float32(length_penalty)
    best = np.argmax(final, axis=1)
    out = np.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
    return np.concatenate([input_ids, out], axis=1)
