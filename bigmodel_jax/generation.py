"""Incremental decoding for the GPT / Llama decoder: a KV cache, sampling and beam search.

Everything after the inputs are checked runs as one jit-compiled program: the prompt is
``prefill``ed in one step (its keys and values written into the cache), then a
``jax.lax.while_loop`` over the new tokens runs one ``decode_step`` each, so the loop never
retraces per token, and stops once every sequence has finished. Shapes are static: the cache
holds ``S = prompt length + max_new_tokens`` slots and the loop writes into a fixed
(B, max_new_tokens) buffer; the public functions crop the result to the steps actually taken
after the compiled program returns, so the output has the shape transformers' ``generate`` gives.

Greedy decoding and beam search reproduce transformers' ``generate`` (v5) token for token: see
``token_loop`` and ``beam_loop`` (HF's ``_beam_search``: running beams plus a separate set of
finished hypotheses, its length penalty and ``early_stopping`` rule). The length penalty, the
early-stopping rule and the EOS / pad ids are traced arguments, so one compilation serves every
setting of them.

Positions are slot indices (``arange``), exactly as in the full forward, so cached decoding
equals a full recompute. A left-padded prompt is handled by the key mask (padded slots are never
attended to), as in the full forward with ``attention_mask``.

Cache layout, stacked like the layer parameters: ``{"k": (L, B, S, K, E), "v": (L, B, S, K, E)}``.
The unrolled decoding layout (``decode_params``) keeps one array per layer instead, heads-major
with the values transposed, the form its attention products read in place
(``init_layer_caches``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange

from bigmodel_jax.layers.activations import activation as _activation
from bigmodel_jax.layers.activations import softmax
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.mlp import gated_mlp, mlp
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.layers.rope import rope
from bigmodel_jax.perf import PerfOptions
from reference_numpy.checks import check_array
from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.generation import BeamRules, beam_fill, beam_rules, check_decoding, greedy_fill
from reference_numpy.layers.attention import key_bias_matters
from reference_numpy.models.common import check_token_batch

Tree = dict[str, Any]


def init_cache(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """Zeroed cache with ``slots`` positions per sequence."""
    shape = (config.n_layers, batch, slots, config.kv_heads, config.e)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _proj(p: Tree, x: jax.Array, spec: str, use_bias: bool = True) -> jax.Array:
    if "rows" in p:  # (Out, In) layout from decode_params; the bias keeps the output's shape
        y = jnp.einsum("BNi,oi->BNo", x, p["rows"])
        if "bias" in p:
            y = y.reshape(*y.shape[:2], *p["bias"].shape)
        return y + p["bias"] if use_bias and "bias" in p else y
    y = jnp.einsum(spec, x, p["kernel"])
    return y + p["bias"] if use_bias and "bias" in p else y


def _rows(p: Tree, n_in: int) -> Tree:
    """A projection's kernel with its first ``n_in`` axes as input, as (Out, In) rows: at batch 1
    every output is then a dot product along contiguous memory (measured 28% more bandwidth on a
    2-core CPU than the (In, Out) layout's column walk)."""
    k = p["kernel"]
    n = math.prod(k.shape[:n_in])
    return {**{k2: v for k2, v in p.items() if k2 != "kernel"}, "rows": k.reshape(n, -1).T}


def _mlp_rows(p: Tree, x: jax.Array, config: GPTConfig) -> jax.Array:
    """The (gated) MLP on ``rows`` weights: down(act(gate(x)) * up(x)) or down(act(up(x)))."""
    act = _activation(config.activation)
    if config.gated_mlp:
        h = act(_proj(p["gate"], x, "")) * _proj(p["up"], x, "")
    else:
        h = act(_proj(p["up"], x, ""))
    return _proj(p["down"], h, "")


def _masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over the last axis (slots) where ``allowed``; rows with no allowed slot give zeros."""
    probs = softmax(jnp.where(allowed, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return jnp.where(allowed, probs, 0.0)


def attend_cached(a: Tree, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Attention of new queries q (B, N, H, E) over cached keys/values (B, S, K, E).

    allowed: (B, 1, 1, N, S) bool. Same math as ``layers.attention`` (masked rows give zeros).
    Returns the output projection (B, N, D).
    """
    B, N, H, E = q.shape
    K = k.shape[2]
    logits = jnp.einsum("BNKGE,BSKE->BKGNS", q.reshape(B, N, K, H // K, E), k) / math.sqrt(E)
    o = jnp.einsum("BKGNS,BSKE->BNKGE", _masked_softmax(logits, allowed), v).reshape(B, N, H, E)
    y = jnp.einsum("BNHE,HED->BND", o, a["out"]["kernel"])
    return y + a["out"]["bias"] if "bias" in a["out"] else y


def init_layer_caches(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """Zeroed per-layer caches for the unrolled decoding layout (``decode_params``):
    ``{"k": L x (B K, S, E), "v": L x (B K, E, S)}``, heads-major with the values stored transposed.

    Why this layout: at one query per head, XLA's CPU backend computes both attention products as
    matrix-vector products ``k @ q`` and ``v^T @ p``, and wants each head's matrix as contiguous
    rows. From the (B, S, K, E) cache it copied every layer's keys and values into that form on
    every token, transposing the values (measured 1.0-1.2 ms of a 17 ms GPT-2 step on a 2-core
    CPU); from this layout it reads them in place. The batch and head axes are merged so a
    dot operand is the cache array itself: with a separate size-1 batch axis XLA fused the
    cache update into the dot's reshape too and kept a copy of the old cache alive."""
    K, E = config.kv_heads, config.e
    return {"k": [jnp.zeros((batch * K, slots, E), dtype) for _ in range(config.n_layers)],
            "v": [jnp.zeros((batch * K, E, slots), dtype) for _ in range(config.n_layers)]}


def attend_layer_cache(a: Tree, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """``attend_cached`` on one layer's ``init_layer_caches`` arrays: keys k (B K, S, E), values
    v (B K, E, S), queries q (B, N, H, E), allowed (B, 1, 1, N, S); the output projection as
    (D, H E) ``rows``. Returns (B, N, D)."""
    B, N, H, E = q.shape
    K = k.shape[0] // B
    G = H // K
    # queries grouped by the head they share keys with: (B K, G N, E)
    q = rearrange(q, "B N (K G) E -> (B K) (G N) E", K=K)
    per_head = (((2,), (2,)), ((0,), (0,)))  # contract E (then S), batch over B K
    logits = jax.lax.dot_general(q, k, per_head) / math.sqrt(E)  # (B K, G N, S)
    probs = _masked_softmax(logits.reshape(B, K, G, N, -1), allowed).reshape(B * K, G * N, -1)
    o = jax.lax.dot_general(probs, v, per_head)  # (B K, G N, E)
    o = rearrange(o, "(B K) (G N) E -> B N (K G E)", B=B, G=G)
    y = jnp.einsum("BNF,DF->BND", o, a["out"]["rows"])
    return y + a["out"]["bias"] if "bias" in a["out"] else y


def decode_params(params: Tree, config: GPTConfig, perf: PerfOptions | None) -> Tree:
    """The weights as ``decode_step`` reads them under ``perf``, prepared ONCE per generate call,
    outside the token loop (XLA does not hoist such copies out of a while loop by itself):

    * ``scan_layers=False``: ``params["layers"]`` becomes a list of L per-layer trees, so the
      unrolled step reads each weight in place. Under the default scan every token's step
      dynamic-slices (copies) every layer's weights out of the stack: at batch 1 decoding is a
      chain of matrix-vector products bound by memory traffic, and those copies add to it.
    * ``fused_qkv``: each layer's q / k / v kernels (and biases) concatenated into one
      ``attn["qkv"]`` (D, H + 2K, E) projection (a key bias that does not matter, i.e. without
      RoPE, enters as zeros, as in ``layers.attention.project_qkv``).

    The unrolled layout also stores every projection as (Out, In) ``rows`` (``_layer_rows``):
    at batch 1 each output is a dot product along contiguous memory, and XLA needs no transpose
    copy of a kernel inside the token loop.
    The default (None) returns ``params`` unchanged; so do already prepared params. Call it once
    yourself (outside ``jit``) to keep the preparation out of every ``generate`` call: it copies
    every layer weight once."""
    if perf is None or (perf.scan_layers and not perf.fused_qkv) or isinstance(params["layers"], list):
        return params
    layers = params["layers"]
    a = layers["attn"]
    if perf.fused_qkv:
        kernel = jnp.concatenate([a["query"]["kernel"], a["key"]["kernel"], a["value"]["kernel"]], axis=2)
        fused = {"kernel": kernel}  # (L, D, H + 2K, E)
        if any("bias" in a[n] for n in ("query", "key", "value")):
            def bias(name: str, used: bool = True) -> jax.Array:
                b = a[name].get("bias")
                shape = a[name]["kernel"].shape[:1] + a[name]["kernel"].shape[2:]  # (L, heads, E)
                return b if used and b is not None else jnp.zeros(shape, kernel.dtype)
            rope_on = config.positions == "rope"
            fused["bias"] = jnp.concatenate(  # (L, H + 2K, E)
                [bias("query"), bias("key", key_bias_matters(config.rope_theta if rope_on else None)),
                 bias("value")], axis=1)
        a = {**a, "qkv": fused}
    layers = {**layers, "attn": a}
    if not perf.scan_layers:
        L = a["out"]["kernel"].shape[0]
        layers = [_layer_rows(jax.tree.map(lambda x, i=i: x[i], layers)) for i in range(L)]
    return {**params, "layers": layers}


def _layer_rows(p: Tree) -> Tree:
    """One layer's projections in the (Out, In) ``rows`` layout (``_rows``); q / k / v are read
    through the fused ``qkv`` when there is one, so the separate kernels are dropped then."""
    a = dict(p["attn"])
    names = ["qkv"] if "qkv" in a else ["query", "key", "value"]
    for name in names:
        a[name] = _rows(a[name], 1)  # (D, M, E) -> (M E, D)
    if "qkv" in a:
        a = {k: v for k, v in a.items() if k not in ("query", "key", "value")}
    a["out"] = _rows(a["out"], 2)  # (H, E, D) -> (D, H E)
    mlp = {name: _rows(w, 1) for name, w in p["mlp"].items()}
    return {**p, "attn": a, "mlp": mlp}


def decode_step(
    params: Tree, cache: Tree, ids: jax.Array, pos: jax.Array, key_mask: jax.Array, config: GPTConfig,
) -> tuple[jax.Array, Tree]:
    """Run tokens ids (B, N) at slots [pos, pos + N) against the cache.

    key_mask: (B, S) bool, False for padded slots. Returns logits (B, N, V) and the cache with
    the new keys/values written in. ``params`` may come from ``decode_params`` (layers as a
    per-layer list: an unrolled loop; a fused ``attn["qkv"]`` projection); the plain tree runs
    ``lax.scan`` over the stacked layers. ``cache`` matches the weights: ``init_cache``'s stacked
    cache for the stacked layers, ``init_layer_caches``' per-layer arrays for the unrolled ones.
    """
    B, N = ids.shape
    unrolled = isinstance(params["layers"], list)
    if unrolled != isinstance(cache["k"], list):
        raise ValueError("the cache does not match the weights' layout: decode_params' unrolled weights "
                         "(PerfOptions(scan_layers=False)) take init_layer_caches' per-layer caches, the "
                         "stacked layers take init_cache's stacked cache")
    S = cache["k"][0].shape[1] if unrolled else cache["k"].shape[2]
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
        if "qkv" in a:  # fused by decode_params: one (D, H + 2K, E) matmul
            H, K = config.n_heads, config.kv_heads
            qkv = _proj(a["qkv"], n, "BND,DME->BNME")
            if qkv.ndim == 3:  # rows layout without a bias: (B, N, (H + 2K) E)
                qkv = qkv.reshape(B, N, H + 2 * K, config.e)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + K], qkv[:, :, H + K:]
        else:
            q = _proj(a["query"], n, "BND,DHE->BNHE")
            k = _proj(a["key"], n, "BND,DKE->BNKE", key_bias_matters(config.rope_theta if rope_on else None))
            v = _proj(a["value"], n, "BND,DKE->BNKE")
            q, k, v = (t.reshape(B, N, -1, config.e) for t in (q, k, v))  # rows layout gives (B, N, M E)
        if rope_on:
            q = rope(q, slots, theta=config.rope_theta)
            k = rope(k, slots, theta=config.rope_theta)
        if unrolled:  # init_layer_caches: k (B K, S, E), v (B K, E, S)
            k_rows = rearrange(k, "B N K E -> (B K) N E").astype(k_cache.dtype)
            v_cols = rearrange(v, "B N K E -> (B K) E N").astype(v_cache.dtype)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_rows, (0, pos, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_cols, (0, 0, pos))
            h = h + attend_layer_cache(a, q, k_cache, v_cache, allowed)
        else:
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
            h = h + attend_cached(a, q, k_cache, v_cache, allowed)
        if unrolled:  # (Out, In) rows from decode_params
            h = h + _mlp_rows(p["mlp"], norm(p["mlp_norm"], h, config.norm_eps), config)
        else:
            mlp_fn = gated_mlp if config.gated_mlp else mlp
            h = h + mlp_fn(p["mlp"], norm(p["mlp_norm"], h, config.norm_eps), activation=config.activation)
        return h, (k_cache, v_cache)

    if unrolled:  # decode_params: weights read in place, and the cache as L per-layer arrays,
        # each updated in place
        k_new, v_new = list(cache["k"]), list(cache["v"])
        for i, p in enumerate(params["layers"]):
            x, (k_new[i], v_new[i]) = layer(x, (p, k_new[i], v_new[i]))
    else:
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
    (``decode_params``); the same tokens either way.
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
                            float(temperature), top_k, top_p, perf)
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


def beam_search(
    params: Tree,
    input_ids: Any,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    attention_mask: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Beam search, token for token transformers' ``generate(do_sample=False, num_beams=W, ...)``.

    Returns (B * num_return_sequences, T0 + n) ids, each prompt's best hypotheses first, n <=
    max_new_tokens (cropped after the compiled loop). The algorithm (W running beams, a separate
    set of W finished hypotheses scored ``sum log p / length ** length_penalty``, HF's
    ``early_stopping`` rule) is described at ``beam_loop``. ``num_beams=1`` is greedy decoding
    (``generate``), as HF's ``generate`` dispatches it. Same algorithm as
    ``reference_numpy.generation.beam_search``.
    """
    input_ids = jnp.asarray(input_ids)
    _check_generate_args(config, input_ids, attention_mask, max_new_tokens, 0.0, None, None)
    eos = check_decoding(config.vocab_size, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if num_beams == 1:
        return generate(params, input_ids, config, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                        eos_token_id=eos, pad_token_id=pad_token_id)
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    # the length penalty, early-stopping rule and EOS / fill ids are traced arguments: one
    # compilation per shape, W, R and number of EOS ids serves every setting
    rules = beam_rules(max_new_tokens, float(length_penalty), early_stopping)
    out, length = _beam_search(params, input_ids, mask, rules, jnp.asarray(eos, jnp.int32),
                               jnp.asarray(beam_fill(pad_token_id, eos), jnp.int32), config, max_new_tokens,
                               num_beams, num_return_sequences)
    return out[:, :int(length)]


@partial(jax.jit, static_argnums=(6, 7, 8, 9))
def _beam_search(params, input_ids, mask, rules, eos, fill, config, max_new_tokens, W, R):
    B, T0 = input_ids.shape
    S = T0 + max_new_tokens
    ids = jnp.repeat(input_ids, W, axis=0)  # (B*W, T0), beam-major within each prompt
    key_mask = jnp.repeat(jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1), W, axis=0)
    cache = init_cache(config, B * W, S, params["embed"]["embedding"].dtype)
    logits, cache = decode_step(params, cache, ids, jnp.asarray(0), key_mask, config)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = decode_step(params, cache, tok[:, None].astype(ids.dtype), T0 + i, key_mask, config)
        return logits[:, -1], cache

    out, n = beam_loop(step, logits[:, -1], cache, B, W, max_new_tokens, rules=rules, eos=eos, fill=fill,
                       num_return_sequences=R, dtype=input_ids.dtype)
    return jnp.concatenate([jnp.repeat(input_ids, R, axis=0), out], axis=1), T0 + n


# HF marks impossible candidates with this large finite score, not -inf, and adds it in float32
# (see reference_numpy.generation.IMPOSSIBLE): the same arithmetic, the same comparisons.
IMPOSSIBLE = -1.0e9


def beam_loop(step, last_logits: jax.Array, cache: Tree, B: int, W: int, max_new_tokens: int, *,
              rules: BeamRules, eos: Sequence[int] | jax.Array, fill: int | jax.Array,
              num_return_sequences: int = 1, dtype: Any = jnp.int32, process=None) -> tuple[jax.Array, jax.Array]:
    """The beam search shared by the decoder-only and encoder-decoder models: HF ``_beam_search``.

    ``step(cache, tok (B*W,), i) -> (logits (B*W, V), cache)`` runs one token per running beam;
    ``last_logits`` (B*W, V) are the prompt's; every cache leaf has the B*W rows (beam-major per
    prompt) on axis 1; ``rules``: ``beam_rules(N, length_penalty, early_stopping)`` (NumPy or
    traced arrays); ``eos``: the EOS ids, (n_eos,), may be traced; ``fill``: ``beam_fill``, may be
    traced; ``process(logp (B*W, V), i)``: HF's logits processors on the log-probabilities of new
    token i (after the log-softmax, as HF's beam search). Per prompt and step, with N = max_new_tokens:

    1. score the W*V continuations of the W running beams (float32 log-softmax + beam score;
       at the start only beam 0 is live, the others score -1e9) and keep the best
       ``K = max(2, 1 + n_eos) * W``, so at least W of them do not end in EOS;
    2. a candidate ending in EOS (or every candidate, at step N) is *done*; the best W not-done
       candidates are the new running beams;
    3. the done candidates among the best W of step 1 enter the finished set (size W) with
       score ``sum log p / length ** length_penalty``, length = generated tokens incl. the EOS,
       if they beat its worst -- unless the prompt has stopped adding (below);
    4. a prompt stops adding once its finished set is full and its best running beam cannot win:
       best running score / ``n ** length_penalty`` <= worst finished score, n = the current
       length (``early_stopping=False`` or True), or N when ``early_stopping="never"`` and
       ``length_penalty > 0``; with ``early_stopping=True`` also as soon as the set is full.
       The ``lax.while_loop`` ends when no prompt adds any more (or after step N).

    Returns each prompt's best ``num_return_sequences`` hypotheses, best first, as tokens
    (B * num_return_sequences, N) filled after their ends (``beam_fill``), and ``n``, the length
    of the longest of them: HF returns the first ``n`` columns.
    """
    N, V, R = max_new_tokens, last_logits.shape[-1], num_return_sequences
    eos = jnp.asarray(eos, jnp.int32).reshape(-1)
    K = max(2, 1 + eos.shape[0]) * W
    f32 = jnp.float32
    penalty, judge_len, stop_when_full = (jnp.asarray(r) for r in rules)
    top_w = jnp.arange(K) < W  # only the best W candidates may finish (HF's top_num_beam_mask)

    def gather(a: jax.Array, idx: jax.Array) -> jax.Array:  # a (B, M, ...) by idx (B, k) -> (B, k, ...)
        return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    def body(c: Tree) -> Tree:
        i = c["i"]
        # 1. the best K continuations
        logp = jax.nn.log_softmax(c["last"].astype(f32), axis=-1)
        logp = (logp if process is None else process(logp, i)).reshape(B, W, V)
        cand = (logp + c["run_score"][..., None]).reshape(B, W * V)
        top_score, idx = jax.lax.top_k(cand, K)  # best first, ties to the lower index
        src, tok = idx // V, idx % V
        top_seq = gather(c["run_seq"], src).at[:, :, i].set(tok)
        done = (i + 1 == N) | jnp.isin(tok, eos)  # (B, K)
        # 2. the next running beams
        run_lp = top_score + done.astype(f32) * IMPOSSIBLE
        nxt = jax.lax.top_k(run_lp, W)[1]
        run_seq, run_score, run_src = gather(top_seq, nxt), gather(run_lp, nxt), gather(src, nxt)
        # 3. the finished set (HF adds the penalties one after another, in float32)
        just = done & top_w
        s = top_score / penalty[i + 1]
        s = s + (jnp.all(c["is_fin"], axis=1, keepdims=True) & stop_when_full).astype(f32) * IMPOSSIBLE
        s = s + (~c["adding"]).astype(f32) * IMPOSSIBLE
        s = s + (~just).astype(f32) * IMPOSSIBLE
        fin_score, keep = jax.lax.top_k(jnp.concatenate([c["fin_score"], s], axis=1), W)
        fin_seq = gather(jnp.concatenate([c["fin_seq"], top_seq], axis=1), keep)
        fin_len = gather(jnp.concatenate([c["fin_len"], jnp.broadcast_to(i + 1, (B, K))], axis=1), keep)
        is_fin = gather(jnp.concatenate([c["is_fin"], just], axis=1), keep)
        # 4. stop?
        best = run_score[:, :1] / penalty[jnp.where(judge_len > 0, judge_len, i + 1)]
        worst = jnp.where(is_fin, jnp.min(fin_score, axis=1, keepdims=True), IMPOSSIBLE)
        adding = c["adding"] & jnp.any(best > worst, axis=1, keepdims=True)
        go = jnp.any(adding) & ~(jnp.all(is_fin) & stop_when_full) & ~jnp.all(done)
        rows = (jnp.arange(B)[:, None] * W + run_src).reshape(-1)  # source row of each new beam
        cache = jax.tree_util.tree_map(lambda a: a[:, rows], c["cache"])
        last, cache = step(cache, run_seq[:, :, i].reshape(B * W), i)
        return dict(i=i + 1, go=go, last=last, cache=cache, run_seq=run_seq, run_score=run_score,
                    fin_seq=fin_seq, fin_score=fin_score, fin_len=fin_len, is_fin=is_fin, adding=adding)

    seq = jnp.full((B, W, N), fill, jnp.int32)
    init = dict(
        i=jnp.asarray(0), go=jnp.asarray(True), last=last_logits, cache=cache,
        run_seq=seq, run_score=jnp.broadcast_to(jnp.where(jnp.arange(W) == 0, 0.0, IMPOSSIBLE).astype(f32), (B, W)),
        fin_seq=seq, fin_score=jnp.full((B, W), IMPOSSIBLE, f32), fin_len=jnp.zeros((B, W), jnp.int32),
        is_fin=jnp.zeros((B, W), bool),
        adding=jnp.ones((B, 1), bool),  # HF's is_early_stop_heuristic_unsatisfied
    )
    c = jax.lax.while_loop(lambda c: c["go"] & (c["i"] < N), body, init)
    return c["fin_seq"][:, :R].reshape(B * R, N).astype(dtype), jnp.max(c["fin_len"][:, :R])


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
    from bigmodel_jax.models.seq2seq import _embed_at, output_logits
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
    logits = output_logits(params, y, config)  # (B, N, V), with final_logits_bias if any
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
    from reference_numpy.generation import check_logits_rules
    from reference_numpy.models.seq2seq import check_source

    ids, mask = check_source(batch, config)
    if not 1 <= max_new_tokens < config.max_len:
        raise ValueError(f"max_new_tokens must be in [1, {config.max_len - 1}] (max_len={config.max_len}), "
                         f"got {max_new_tokens}")
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


def check_prompt(name: str, ids: Any) -> None:
    """Prompts are (B, T0) integer arrays."""
    check_array(name, ids, ("B", "T"), kind="int")


def hf_generate(params: Tree, inputs: dict[str, Any], config: GPTConfig | Seq2SeqConfig, *,
                max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0, num_beams: int = 1,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                decoder_start_token_id: int | None = None, suppress_tokens: Sequence[int] = (),
                forced_eos_token_id: int | None = None) -> jax.Array:
    """transformers' ``generate`` arguments -> greedy, sampling or beam decoding (the model
    classes' ``generate``); the twin of ``reference_numpy.generation.hf_generate``.

    ``do_sample=True`` samples (decoders) from softmax(logits / temperature) within ``top_k`` /
    ``top_p`` with ``jax.random.key(seed)``; the draws are JAX's, not PyTorch's, so sampled
    tokens differ from HF's while greedy and beam tokens are the same.
    """
    beam = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if isinstance(config, Seq2SeqConfig):
        if do_sample:
            raise ValueError("encoder-decoder generation is greedy or beam search (do_sample=False)")
        if decoder_start_token_id is None:
            raise ValueError("an encoder-decoder needs decoder_start_token_id (HF: the config's, often pad)")
        batch = {k: v for k, v in inputs.items() if v is not None}
        return seq2seq_generate(params, batch, config, decoder_start_token_id=decoder_start_token_id,
                                suppress_tokens=tuple(suppress_tokens), forced_eos_token_id=forced_eos_token_id,
                                **beam)
    if suppress_tokens or forced_eos_token_id is not None:
        raise ValueError("suppress_tokens / forced_eos_token_id are implemented for encoder-decoders only")
    mask = inputs.get("attention_mask")
    if do_sample:
        if num_beams != 1 or num_return_sequences != 1:
            raise ValueError("sampling is implemented with num_beams=1, num_return_sequences=1")
        return generate(params, inputs["input_ids"], config, max_new_tokens=max_new_tokens, attention_mask=mask,
                        temperature=temperature, top_k=top_k, top_p=top_p, key=jax.random.key(seed),
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return beam_search(params, inputs["input_ids"], config, attention_mask=mask, **beam)
