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

from bigmodel_jax.layers.activations import softmax
from bigmodel_jax.layers.rope import rope
from bigmodel_jax.perf import PerfOptions, einsum
from reference_numpy.layers.attention import check_attention_args, key_bias_matters

Params = dict[str, dict[str, jax.Array]]


def _project(p: dict[str, jax.Array], x: jax.Array, spec: str, use_bias: bool = True,
             perf: PerfOptions | None = None) -> jax.Array:
    y = einsum(spec, x, p["kernel"], perf)
    return y + p["bias"] if use_bias and "bias" in p else y


def project_qkv(params: Params, x: jax.Array, key_bias: bool, perf: PerfOptions | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention's q (B, T, H, E), k, v (B, T, K, E) as ONE matmul against the kernels
    concatenated on the head axis, (D, H + 2K, E): x is read once and the GEMM is larger. The
    tree keeps its three leaves; the concatenation's transpose splits the gradient back. An
    unused key bias (no RoPE) enters as zeros, so its gradient stays an exact 0 as unfused."""
    pq, pk, pv = params["query"], params["key"], params["value"]
    H, K = pq["kernel"].shape[1], pk["kernel"].shape[1]
    w = jnp.concatenate([pq["kernel"], pk["kernel"], pv["kernel"]], axis=1)  # (D, H + 2K, E)
    y = einsum("BTD,DNE->BTNE", x, w, perf)  # (B, T, H + 2K, E)
    if any("bias" in p for p in (pq, pk, pv)):
        def bias(p: dict[str, jax.Array], n: int, used: bool = True) -> jax.Array:
            return p["bias"] if used and "bias" in p else jnp.zeros((n, w.shape[2]), y.dtype)
        y = y + jnp.concatenate([bias(pq, H), bias(pk, K, key_bias), bias(pv, K)], axis=0).astype(y.dtype)
    return y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_padding_mask: jax.Array | None,
                           causal: bool, scale: float, perf: PerfOptions) -> jax.Array:
    """q (B, T, H, E), k / v (B, S, K, E) -> (B, T, H, E) by ``jax.nn.dot_product_attention``
    (cuDNN flash attention on a GPU for half precision unless ``perf.attention_impl`` says
    otherwise). A plain causal mask is passed as ``is_causal`` (cuDNN then skips the masked
    blocks); padding as a boolean mask."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    impl = perf.attention_impl
    if impl is None:
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    mask, is_causal = None, False
    if causal and key_padding_mask is None and T == S:
        is_causal = True
    else:
        allowed = _allowed_keys(T, S, key_padding_mask, causal)  # (B or 1, 1, 1, T or 1, S)
        if allowed is not None:
            mask = jnp.broadcast_to(allowed[:, :, 0], (B, 1, T, S))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                        implementation=impl)


def _allowed_keys(
    T: int, S: int, key_padding_mask: jax.Array | None, causal: bool
) -> jax.Array | None:
    """(B or 1, 1, 1, T or 1, S) bool, True = may attend; causal aligned at the end."""
    allowed = None
    if causal:
        t = jnp.arange(T)[:, None]
        s = jnp.arange(S)[None, :]
        allowed = (s <= t + (S - T))[None, None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


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
) -> jax.Array:
    """x: (B, T, D) queries, kv: (B, S, D) keys/values or None (self) -> (B, T, D).

    Options as ``reference_numpy.layers.attention.attention_forward``: key_padding_mask (B, S)
    bool (True = attend), causal (query t sees keys s <= t + S - T), RoPE on q/k when
    ``rope_theta`` is set (positions (T,) or (B, T), default arange(T)), logit ``scale``
    (default 1/sqrt(E)), dropout_mask (B, H, T, S) bool with 1/(1 - rate) scaling.
    ``perf``: layout options (module docstring); dot_product_attention is not used with a
    dropout mask (it has no attention-probability dropout) nor for float64 inputs (its softmax
    runs in float32).
    """
    dims = check_attention_args(
        params, x, kv, n_heads=n_heads, n_kv_heads=n_kv_heads, key_padding_mask=key_padding_mask,
        rope_theta=rope_theta, rope_layout=rope_layout, positions=positions,
        dropout_mask=dropout_mask, dropout_rate=dropout_rate,
    )
    B, T, S, D, H, K, E = dims
    G = dims.G
    src = x if kv is None else kv
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)

    # b_k only counts under RoPE (see key_bias_matters); unused, its gradient is an exact 0.
    if perf is not None and perf.fused_qkv and kv is None:
        q, k, v = project_qkv(params, x, key_bias_matters(rope_theta), perf)
    else:
        q = _project(params["query"], x, "BTD,DHE->BTHE", perf=perf)
        k = _project(params["key"], src, "BSD,DKE->BSKE", key_bias_matters(rope_theta), perf)
        v = _project(params["value"], src, "BSD,DKE->BSKE", perf=perf)
    if rope_theta is not None:
        pos = jnp.arange(T) if positions is None else positions
        q = rope(q, pos, theta=rope_theta, layout=rope_layout)
        k = rope(k, pos, theta=rope_theta, layout=rope_layout)

    # jax.nn.dot_product_attention runs its softmax in float32: float64 keeps the exact path
    if perf is not None and perf.attention == "dot_product_attention" and dropout_mask is None \
            and q.dtype != jnp.float64:
        o = _dot_product_attention(q, k, v, key_padding_mask, causal, scale, perf)  # (B, T, H, E)
        y = einsum("BTHE,HED->BTD", o, params["out"]["kernel"], perf)
        return y + params["out"]["bias"] if "bias" in params["out"] else y

    qg = q.reshape(B, T, K, G, E)  # query head h = k * G + g reads kv head k
    # scores and softmax in fp32 under mixed precision (keep_fp32); the input dtype otherwise
    logits = einsum("BTKGE,BSKE->BKGTS", qg, k, perf, keep_fp32=True) * scale
    allowed = _allowed_keys(T, S, key_padding_mask, causal)
    if allowed is None:
        probs = softmax(logits, axis=-1)
    else:
        # A finite fill, and the mask applied again after the softmax: with -inf a fully masked
        # row would be inf - inf (NaN) somewhere in forward or backward. With the finite fill such
        # a row is a uniform softmax that the second where zeroes (and whose gradient it stops);
        # in any other row exp(fill - max) underflows to exactly 0, as the reference's -inf does.
        fill = jnp.finfo(logits.dtype).min
        probs = softmax(jnp.where(allowed, logits, fill), axis=-1)
        probs = jnp.where(allowed, probs, 0.0)
    if dropout_mask is not None:
        keep = dropout_mask.reshape(B, K, G, T, S).astype(x.dtype) * (1.0 / (1.0 - dropout_rate))
        probs = probs * keep

    o = einsum("BKGTS,BSKE->BTKGE", probs.astype(v.dtype), v, perf).reshape(B, T, H, E)
    y = einsum("BTHE,HED->BTD", o, params["out"]["kernel"], perf)
    if "bias" in params["out"]:
        y = y + params["out"]["bias"]
    return y


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
