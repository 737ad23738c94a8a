"""Multi-head / grouped-query attention, the JAX twin of ``reference_numpy.layers.attention``.

Dims: B batch, T query time, S key/value time, D model width, H query heads, K kv heads,
G = H // K, E head dim. Same parameter tree as the reference:
``{"query": {kernel (D, H, E), bias (H, E)}, "key"/"value": {kernel (D, K, E), bias (K, E)},
"out": {kernel (H, E, D), bias (D,)}}``.

Everything is computed in the input dtype and every branch is on static shapes / options, so
``attention`` is jit-able with masks and positions as traced arrays. ``perf``
(``bigmodel_jax.perf.PerfOptions``) switches the layout: one fused q/k/v projection,
``jax.nn.dot_product_attention`` for the core, bf16 matmuls with fp32 accumulation (scores and
softmax in fp32); the default is the plain path.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from einops import rearrange

from bigmodel_jax.layers.activations import softmax
from bigmodel_jax.layers.rope import rope
from bigmodel_jax.perf import PerfOptions, einsum
from bigmodel_jax.quant import dense
from reference_numpy.checks import check_array
from reference_numpy.layers.attention import check_attention_args, key_bias_matters

Params = dict[str, dict[str, jax.Array]]
Cache = dict[str, jax.Array]


def _project(p: dict[str, jax.Array], x: jax.Array, spec: str, use_bias: bool = True,
             perf: PerfOptions | None = None) -> jax.Array:
    """One projection of x (B, T, *In) -> (B, T, *Out): ``kernel`` (*In, *Out) by ``spec``, or the
    decoding layout's ``rows`` (*Out, *In) (``bigmodel_jax.generation.layout``), read as one
    (Out, In) matrix: at batch 1 each output is a dot product along contiguous memory."""
    if "rows" in p:
        w = dense(p["rows"])
        n_in = x.ndim - 2
        out_shape = w.shape[:w.ndim - n_in]
        y = jnp.einsum("BTi,oi->BTo", x.reshape(*x.shape[:2], -1), w.reshape(math.prod(out_shape), -1))
        y = y.reshape(*x.shape[:2], *out_shape)
    else:
        y = einsum(spec, x, p["kernel"], perf)
    return y + p["bias"] if use_bias and "bias" in p else y


def project_keys_values(params: Params, src: jax.Array, rope_theta: float | None = None,
                        perf: PerfOptions | None = None) -> tuple[jax.Array, jax.Array]:
    """src (B, S, D) -> keys, values (B, S, K, E) before RoPE; the key bias only where it
    matters (``key_bias_matters``). Also what a cross-attention cache holds."""
    k = _project(params["key"], src, "BSD,DKE->BSKE", key_bias_matters(rope_theta), perf)
    return k, _project(params["value"], src, "BSD,DKE->BSKE", perf=perf)


def project_qkv(params: Params, x: jax.Array, key_bias: bool, perf: PerfOptions | None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention's q (B, T, H, E), k, v (B, T, K, E) as ONE matmul against the kernels
    concatenated on the head axis, (D, H + 2K, E): x is read once and the GEMM is larger. The
    tree keeps its three leaves; the concatenation's transpose splits the gradient back. An
    unused key bias (no RoPE) enters as zeros, so its gradient stays an exact 0 as unfused.
    A ``qkv`` entry (``bigmodel_jax.generation.layout``: concatenated once, outside the
    decoding loop) is used as it is."""
    H, K = _heads(params)
    if "qkv" in params:
        y = _project(params["qkv"], x, "BTD,DNE->BTNE", perf=perf)
        return y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]
    pq, pk, pv = params["query"], params["key"], params["value"]
    w = jnp.concatenate([dense(pq["kernel"]), dense(pk["kernel"]), dense(pv["kernel"])], axis=1)  # (D, H + 2K, E)
    y = einsum("BTD,DNE->BTNE", x, w, perf)  # (B, T, H + 2K, E)
    if any("bias" in p for p in (pq, pk, pv)):
        def bias(p: dict[str, jax.Array], n: int, used: bool = True) -> jax.Array:
            return p["bias"] if used and "bias" in p else jnp.zeros((n, w.shape[2]), y.dtype)
        y = y + jnp.concatenate([bias(pq, H), bias(pk, K, key_bias), bias(pv, K)], axis=0).astype(y.dtype)
    return y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]


def _heads(params: Params) -> tuple[int, int]:
    """(H, K) from the weights in either layout: H from the output projection ((H, E, D) kernel
    or (D, H, E) rows), K from the key projection or the fused ``qkv`` (H + 2K heads)."""
    out = params["out"]
    H = out["kernel"].shape[0] if "kernel" in out else out["rows"].shape[1]
    if "qkv" in params:
        qkv = params["qkv"]
        M = qkv["kernel"].shape[1] if "kernel" in qkv else qkv["rows"].shape[0]
        return H, (M - H) // 2
    key = params["key"]
    return H, key["kernel"].shape[1] if "kernel" in key else key["rows"].shape[0]


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None,
                           causal_only: bool, scale: float, perf: PerfOptions) -> jax.Array:
    """q (B, T, H, E), k / v (B, S, K, E) -> (B, T, H, E) by ``jax.nn.dot_product_attention``
    (cuDNN flash attention on a GPU for half precision unless ``perf.attention_impl`` says
    otherwise). A plain causal mask over a full sequence is passed as ``is_causal`` (cuDNN then
    skips the masked blocks); anything else as a boolean mask."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    impl = perf.attention_impl
    if impl is None:
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    mask = None if allowed is None or causal_only else jnp.broadcast_to(allowed[:, :, 0], (B, 1, T, S))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal_only,
                                        implementation=impl)


def _allowed_keys(
    T: int, S: int, key_padding_mask: jax.Array | None, causal: bool, offset: Any = None
) -> jax.Array | None:
    """(B or 1, 1, 1, T or 1, S) bool, True = may attend. Causal: query t sits at slot
    ``t + offset`` (default S - T, aligned at the end) and sees keys s <= t + offset; the offset
    may be traced (a decoding cache's position) and may be a (B,) vector, one per row."""
    allowed = None
    if causal:
        t = jnp.arange(T)[:, None]
        s = jnp.arange(S)[None, :]
        off = jnp.asarray(S - T if offset is None else offset)
        if off.ndim == 1:  # per-row slots: (B, T, S)
            allowed = (s[None] <= t[None] + off[:, None, None])[:, None, None]
        else:
            allowed = (s <= t + off)[None, None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def _masked_softmax(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Softmax over the last axis where ``allowed``. A finite fill, and the mask applied again
    after the softmax: with -inf a fully masked row would be inf - inf (NaN) somewhere in forward
    or backward. With the finite fill such a row is a uniform softmax that the second where
    zeroes (and whose gradient it stops); in any other row exp(fill - max) underflows to exactly
    0, as the reference's -inf does."""
    if allowed is None:
        return softmax(logits, axis=-1)
    probs = softmax(jnp.where(allowed, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return jnp.where(allowed, probs, 0.0)


def init_heads_major_cache(batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype: Any) -> Cache:
    """One layer's zeroed cache in the heads-major layout: keys (B K, S, E), values stored
    transposed, (B K, E, S).

    Why this layout: at one query per head, XLA's CPU backend computes both attention products as
    matrix-vector products ``k @ q`` and ``v^T @ p`` and wants each head's matrix as contiguous
    rows. From a (B, S, K, E) cache it copies every layer's keys and values into that form on
    every token; from this layout it reads them in place. The batch and head axes are merged so
    a dot operand is the cache array itself (with a separate size-1 batch axis XLA fused the
    cache update into the dot's reshape and kept a copy of the old cache alive). Numbers:
    ``benchmarks/results/README.md``."""
    return {"k": jnp.zeros((batch * n_kv_heads, slots, head_dim), dtype),
            "v": jnp.zeros((batch * n_kv_heads, head_dim, slots), dtype)}


def _write_cache(cache: Cache, k: jax.Array, v: jax.Array, pos: Any) -> Cache:
    """This call's keys/values k, v (B, T, K, E) written into ``cache`` at slots [pos, pos + T).
    A (B, S, K, E) cache, or the heads-major one (``init_heads_major_cache``, 3-D). ``pos`` may
    be a (B,) vector: row b's slots start at pos[b] (one scatter per row, under vmap)."""
    if jnp.ndim(pos) == 1:
        return _write_cache_rows(cache, k, v, jnp.asarray(pos))
    if cache["k"].ndim == 4:
        return {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0)),
                "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))}
    k_rows = rearrange(k, "B T K E -> (B K) T E").astype(cache["k"].dtype)
    v_cols = rearrange(v, "B T K E -> (B K) E T").astype(cache["v"].dtype)
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k_rows, (0, pos, 0)),
            "v": jax.lax.dynamic_update_slice(cache["v"], v_cols, (0, 0, pos))}


def _write_cache_rows(cache: Cache, k: jax.Array, v: jax.Array, pos: jax.Array) -> Cache:
    """``_write_cache`` with per-row start slots pos (B,): the same update, vmapped over rows."""
    def put(c: jax.Array, x: jax.Array, p: jax.Array, axis: int) -> jax.Array:
        start = tuple(p if a == axis else jnp.zeros_like(p) for a in range(c.ndim))  # one index dtype
        return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), start)

    if cache["k"].ndim == 4:  # (B, S, K, E): row b's (S, K, E) block, slots on its axis 0
        return {"k": jax.vmap(put, (0, 0, 0, None))(cache["k"], k, pos, 0),
                "v": jax.vmap(put, (0, 0, 0, None))(cache["v"], v, pos, 0)}
    K = k.shape[2]
    rows = jnp.repeat(pos, K)  # heads-major (B K, ...): row b's K heads share its slot
    k_rows = rearrange(k, "B T K E -> (B K) T E")
    v_cols = rearrange(v, "B T K E -> (B K) E T")
    return {"k": jax.vmap(put, (0, 0, 0, None))(cache["k"], k_rows, rows, 0),
            "v": jax.vmap(put, (0, 0, 0, None))(cache["v"], v_cols, rows, 1)}


def _core(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, scale: float,
          dropout_mask: jax.Array | None, dropout_rate: float, perf: PerfOptions | None) -> jax.Array:
    """softmax(scale q . k, allowed) . v -> o (B, T, H, E); q (B, T, H, E), keys/values
    (B, S, K, E), or the heads-major cache's (B K, S, E) / (B K, E, S)."""
    B, T, H, E = q.shape
    if k.ndim == 3:  # heads-major: queries grouped by the head they share keys with, (B K, G T, E)
        K = k.shape[0] // B
        G = H // K
        qh = rearrange(q, "B T (K G) E -> (B K) (G T) E", K=K)
        per_head = (((2,), (2,)), ((0,), (0,)))  # contract E (then S), batch over B K
        logits = jax.lax.dot_general(qh, k, per_head) * scale  # (B K, G T, S)
        probs = _masked_softmax(logits.reshape(B, K, G, T, -1), allowed).reshape(B * K, G * T, -1)
        o = jax.lax.dot_general(probs.astype(v.dtype), v, per_head)  # (B K, G T, E)
        return rearrange(o, "(B K) (G T) E -> B T (K G) E", B=B, G=G)
    K = k.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, E)  # query head h = k * G + g reads kv head k
    # scores and softmax in fp32 under mixed precision (keep_fp32); the input dtype otherwise
    probs = _masked_softmax(einsum("BTKGE,BSKE->BKGTS", qg, k, perf, keep_fp32=True) * scale, allowed)
    if dropout_mask is not None:
        keep = dropout_mask.reshape(B, K, G, T, -1).astype(q.dtype) * (1.0 / (1.0 - dropout_rate))
        probs = probs * keep
    return einsum("BKGTS,BSKE->BTKGE", probs.astype(v.dtype), v, perf).reshape(B, T, H, E)


def attention(
    params: Params,
    x: jax.Array,
    kv: jax.Array | None = None,
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    key_padding_mask: jax.Array | None = None,
    causal: bool = False,
    rope_theta: float | None = None,
    rope_layout: str = "half",
    positions: jax.Array | None = None,
    scale: float | None = None,
    dropout_mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    perf: PerfOptions | None = None,
    cache: Cache | None = None,
    cache_pos: Any = None,
) -> jax.Array | tuple[jax.Array, Cache]:
    """x: (B, T, D) queries, kv: (B, S, D) keys/values or None (self) -> (B, T, D).

    Options as ``reference_numpy.layers.attention.attention_forward``: key_padding_mask (B, S)
    bool (True = attend), causal (query t sees keys s <= t + S - T), RoPE on q/k when
    ``rope_theta`` is set (positions (T,) or (B, T), default arange(T)), logit ``scale``
    (default 1/sqrt(E)), dropout_mask (B, H, T, S) bool with 1/(1 - rate) scaling.
    ``perf``: layout options (module docstring); dot_product_attention is not used with a
    dropout mask (it has no attention-probability dropout) nor for float64 inputs (its softmax
    runs in float32).

    ``cache``: decoding; returns ``(y, new cache)``. Self-attention: ``{"k", "v"}`` of S slots,
    (B, S, K, E) or heads-major (``init_heads_major_cache``); this call's keys/values go to slots
    [cache_pos, cache_pos + T) (``cache_pos`` may be traced, and may be a (B,) vector of per-row
    start slots), the queries attend over all S slots
    (query t sits at slot cache_pos + t; positions default to those slots; key_padding_mask is
    (B, S)). Cross-attention (``cache_pos=None``): the cache holds the source's
    ``project_keys_values`` and is returned unchanged; ``kv`` may be None. The weights may be in
    the decoding layout (``rows``, a fused ``qkv``: ``bigmodel_jax.generation.layout``).
    """
    cached = cache is not None
    plain = all("kernel" in params.get(n, {}) for n in ("query", "key", "value", "out"))
    if plain:  # the decoding layout's weights were checked when prepared
        check_attention_args(
            params, x, kv, n_heads=n_heads, n_kv_heads=n_kv_heads,
            key_padding_mask=None if cached else key_padding_mask, rope_theta=rope_theta,
            rope_layout=rope_layout, positions=positions, dropout_mask=dropout_mask, dropout_rate=dropout_rate,
        )
    if cached and dropout_mask is not None:
        raise ValueError("dropout masks are for training; decoding with a cache is evaluation")
    T = x.shape[1]
    src = x if kv is None else kv
    self_cached = cached and cache_pos is not None

    # b_k only counts under RoPE (see key_bias_matters); unused, its gradient is an exact 0.
    if kv is None and not (cached and not self_cached) and ("qkv" in params or (perf is not None and perf.fused_qkv)):
        q, k, v = project_qkv(params, x, key_bias_matters(rope_theta), perf)
    else:
        q = _project(params["query"], x, "BTD,DHE->BTHE", perf=perf)
        k, v = (cache["k"], cache["v"]) if cached and not self_cached else project_keys_values(
            params, src, rope_theta, perf)
    E = q.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    if rope_theta is not None:
        pos = (jnp.asarray(cache_pos if self_cached else 0)[..., None] + jnp.arange(T)
               if positions is None else positions)  # (T,), or (B, T) for per-row cache_pos
        q = rope(q, pos, theta=rope_theta, layout=rope_layout)
        k = rope(k, pos, theta=rope_theta, layout=rope_layout)
    new_cache = cache
    if self_cached:  # write this call's slots, then read all S of them
        new_cache = _write_cache(cache, k, v, cache_pos)
        k, v = new_cache["k"], new_cache["v"]
    S = k.shape[1]  # slots are axis 1 of (B, S, K, E) keys and of heads-major (B K, S, E) keys
    if cached and key_padding_mask is not None:
        check_array("key_padding_mask", key_padding_mask, (x.shape[0], S), kind="bool")
    allowed = _allowed_keys(T, S, key_padding_mask, causal, cache_pos if self_cached else None)

    # jax.nn.dot_product_attention runs its softmax in float32: float64 keeps the exact path
    if perf is not None and perf.attention == "dot_product_attention" and dropout_mask is None \
            and q.dtype != jnp.float64 and k.ndim == 4:
        o = _dot_product_attention(q, k, v, allowed, causal and key_padding_mask is None and T == S,
                                   scale, perf)  # (B, T, H, E)
    else:
        o = _core(q, k, v, allowed, scale, dropout_mask, dropout_rate, perf)  # (B, T, H, E)
    y = _project(params["out"], o, "BTHE,HED->BTD", perf=perf)
    return (y, new_cache) if cached else y


class _ProjectionParams(nn.Module):
    """Holds one projection's ``{"kernel", "bias"?}`` so the tree nests as ``query/kernel``."""

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    kernel_init: Any
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        p = {"kernel": self.param("kernel", self.kernel_init, self.kernel_shape, self.dtype)}
        if self.use_bias:
            p["bias"] = self.param("bias", nn.initializers.zeros, self.bias_shape, self.dtype)
        return p


class Attention(nn.Module):
    """Flax twin of ``reference_numpy.layers.attention``: same tree under ``params``."""

    n_heads: int  # H, query heads
    n_kv_heads: int | None = None  # K, kv heads; None = n_heads (MHA), 1 = MQA
    head_dim: int | None = None  # E; None = d_model // n_heads
    use_bias: bool = True  # biases on all four projections, or none
    causal: bool = False  # end-aligned causal mask
    rope_theta: float | None = None  # RoPE base; None = no rotary embeddings
    rope_layout: str = "half"  # "half" (HF/Llama) or "interleaved" (GPT-J, Meta Llama)
    dtype: Any = jnp.float32  # parameter (and therefore compute) dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        key_padding_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        dropout_mask: jax.Array | None = None,
        dropout_rate: float = 0.0,
    ) -> jax.Array:
        """x: (B, T, D), kv: (B, S, D) or None -> (B, T, D)."""
        D = x.shape[-1]
        H = self.n_heads
        K = H if self.n_kv_heads is None else self.n_kv_heads
        E = D // H if self.head_dim is None else self.head_dim
        # Fan-in is every input axis of a kernel: D for q/k/v, H*E for out (as the reference).
        qkv_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        shapes = {
            "query": ((D, H, E), (H, E), qkv_init),
            "key": ((D, K, E), (K, E), qkv_init),
            "value": ((D, K, E), (K, E), qkv_init),
            "out": ((H, E, D), (D,), out_init),
        }
        params: Params = {
            name: _ProjectionParams(k_shape, b_shape, init, self.use_bias, self.dtype, name=name)()
            for name, (k_shape, b_shape, init) in shapes.items()
        }
        return attention(
            params, x, kv, n_heads=H, n_kv_heads=K, key_padding_mask=key_padding_mask,
            causal=self.causal, rope_theta=self.rope_theta, rope_layout=self.rope_layout,
            positions=positions, dropout_mask=dropout_mask, dropout_rate=dropout_rate,
        )
