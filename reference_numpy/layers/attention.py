"""Multi-head attention with grouped kv heads, masks and RoPE, as a forward/backward pair.

Dims: B batch, T query time, S key/value time, D model width, H query heads, K kv heads,
G = H // K query heads per kv head, E head dim.

    q = x W_q + b_q                        (B, T, H, E)
    k = kv W_k + b_k,  v = kv W_v + b_v    (B, S, K, E)
    q, k = rope(q), rope(k)                (optional, self-attention only)
    a = softmax_S(scale * q . k, allowed)  (B, K, G, T, S); query head h = k * G + g
    a = a * dropout_mask / (1 - rate)      (optional)
    o = a . v                              (B, T, H, E)
    y = o W_o + b_o                        (B, T, D)

Grouped-query attention (HF's ``repeat_kv``: query head h reads kv head h // G) is computed on a
(B, T, K, G, E) view of q, so K/V are never copied G times. ``K == H`` is plain MHA, ``K == 1``
is MQA.

Decoding with a KV cache is the same function: ``kv_cache`` holds the keys/values of earlier
slots (B, S, K, E); a call writes its own T keys/values at slots [cache_pos, cache_pos + T) and
its queries attend over all S slots. Cross-attention reads a cache holding the source's
projected keys/values (``project_keys_values``), computed once.

Masking (``allowed_keys``): a key padding mask and/or a causal mask. Masked logits
are excluded from the softmax; a query row with *no* allowed key gets all-zero weights (its
output is just ``b_o``), not NaN, and passes zero gradient back.

Without RoPE the key bias cancels in the softmax, so it is left out (``key_bias_matters``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from reference_numpy.speed.contract import einsum
from reference_numpy.checks import check_array, check_divides, check_same_dtype
from reference_numpy.layers.activations import softmax_backward, softmax_forward
from reference_numpy.layers.rope import (
    check_positions,
    check_rope_args,
    rope_backward,
    rope_forward,
)

Params = dict[str, dict[str, np.ndarray]]

_PROJECTIONS = ("query", "key", "value", "out")


class AttentionDims(NamedTuple):
    """The sizes one attention call works with (letters as in the module legend)."""

    B: int
    T: int
    S: int
    D: int
    H: int
    K: int
    E: int

    @property
    def G(self) -> int:  # noqa: N802  (the legend's letter)
        return self.H // self.K


def check_attention_args(
    params: Params,
    x: Any,
    kv: Any = None,
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    key_padding_mask: Any = None,
    rope_theta: float | None = None,
    rope_layout: str = "half",
    positions: Any = None,
    dropout_mask: Any = None,
    dropout_rate: float = 0.0,
) -> AttentionDims:
    """Validate every argument of an attention call and return its sizes.

    Looks only at shapes and dtypes, so the JAX twin calls it too (also under ``jit``).
    """
    if not isinstance(params, dict) or any(
        not isinstance(params.get(n), dict) or "kernel" not in params[n] for n in _PROJECTIONS
    ):
        raise ValueError(
            f"params must hold {{name: {{'kernel', 'bias'?}}}} for each of {_PROJECTIONS}"
        )
    wq, wk, wv, wo = (params[n]["kernel"] for n in _PROJECTIONS)
    check_array("params['query']['kernel']", wq, ("D", "H", "E"), kind="float")
    D, H, E = wq.shape
    check_array("params['key']['kernel']", wk, (D, "K", E), kind="float")
    K = wk.shape[1]
    check_array("params['value']['kernel']", wv, (D, K, E), kind="float")
    check_array("params['out']['kernel']", wo, (H, E, D), kind="float")
    # q/k/v biases come together (HF's qkv_bias); the output bias is separate (ViT keeps it alone)
    has_bias = ["bias" in params[n] for n in _PROJECTIONS[:3]]
    if any(has_bias) and not all(has_bias):
        raise ValueError(
            "query / key / value biases must be all present or all absent, got bias in "
            f"{[n for n, b in zip(_PROJECTIONS, has_bias) if b]} only"
        )
    for name, shape in zip(_PROJECTIONS, ((H, E), (K, E), (K, E), (D,))):
        if "bias" in params[name]:
            check_array(f"params[{name!r}]['bias']", params[name]["bias"], shape)
    if n_heads is not None and n_heads != H:
        raise ValueError(
            f"n_heads ({n_heads}) must match params['query']['kernel'] (D, H, E), {wq.shape}"
        )
    if n_kv_heads is not None and n_kv_heads != K:
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) must match params['key']['kernel'] (D, K, E), {wk.shape}"
        )
    check_divides("n_heads", H, "n_kv_heads", K)

    check_array("x", x, ("B", "T", D), kind="float")
    B, T, _ = x.shape
    S = T
    if kv is not None:
        check_array("kv", kv, (B, "S", D), kind="float")
        S = kv.shape[1]
    check_same_dtype(
        x=x, kv=kv, **{f"{n}/{leaf}": a for n in _PROJECTIONS for leaf, a in params[n].items()}
    )

    if key_padding_mask is not None:
        check_array("key_padding_mask", key_padding_mask, (B, S), kind="bool")
    if dropout_mask is not None:
        check_array("dropout_mask", dropout_mask, (B, H, T, S), kind="bool")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate}")
    if rope_theta is not None:
        if kv is not None:
            raise ValueError(
                "rope_theta must be None for cross-attention (kv given): "
                "RoPE is self-attention only"
            )
        check_rope_args(E, rope_theta, rope_layout)
    if positions is not None:
        # Checked even without RoPE (where they are unused) so a block may pass them always.
        check_positions(positions, B, T)
    return AttentionDims(B, T, S, D, H, K, E)


def allowed_keys(
    dims: AttentionDims, key_padding_mask: np.ndarray | None, causal: bool, offset: int | None = None
) -> np.ndarray | None:
    """Which keys each query may attend: (B or 1, 1, 1, T or 1, S) bool, or None for all.

    Causal: query t sits at slot ``t + offset`` and sees key s iff ``s <= t + offset``. The
    default offset ``S - T`` aligns the queries with the *last* keys (the full sequence: offset
    0); a KV cache passes the slot of its first new token.
    """
    allowed = None
    if causal:
        t = np.arange(dims.T)[:, None]
        s = np.arange(dims.S)[None, :]
        offset = dims.S - dims.T if offset is None else offset
        allowed = (s <= t + offset)[None, None, None]  # (1, 1, 1, T, S)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, None, :]  # (B, 1, 1, 1, S)
        allowed = pad if allowed is None else allowed & pad
    return allowed


def init_attention(
    rng: np.random.Generator,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    bias: bool = True,
    dtype: Any = np.float32,
) -> Params:
    """Normal(0, 1/fan_in) kernels (fan_in D for q/k/v, H*E for out), zero biases.

    ``n_kv_heads`` defaults to ``n_heads`` (MHA), ``head_dim`` to ``d_model // n_heads``.
    """
    K = n_heads if n_kv_heads is None else n_kv_heads
    check_divides("n_heads", n_heads, "n_kv_heads", K)
    E = d_model // n_heads if head_dim is None else head_dim
    if E <= 0:
        raise ValueError(
            f"head_dim must be positive, got {E} (d_model {d_model}, n_heads {n_heads})"
        )
    H, D = n_heads, d_model

    def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(dtype)

    params: Params = {
        "query": {"kernel": normal((D, H, E), D)},
        "key": {"kernel": normal((D, K, E), D)},
        "value": {"kernel": normal((D, K, E), D)},
        "out": {"kernel": normal((H, E, D), H * E)},
    }
    if bias:
        for name, shape in zip(_PROJECTIONS, ((H, E), (K, E), (K, E), (D,))):
            params[name]["bias"] = np.zeros(shape, dtype)
    return params


def _project(
    p: dict[str, np.ndarray], x: np.ndarray, spec: str, use_bias: bool = True
) -> np.ndarray:
    y = einsum(spec, x, p["kernel"])
    return y + p["bias"] if use_bias and "bias" in p else y


def check_kv_cache(dims: AttentionDims, kv_cache: Any, cache_pos: int | None) -> int:
    """A decoding cache ``{"k", "v"}``, each (B, S, K, E) in the input dtype, with room for this
    call's T tokens at ``cache_pos`` (None: a read-only cross-attention cache). Returns S."""
    if not isinstance(kv_cache, dict) or not {"k", "v"} <= set(kv_cache):
        raise ValueError("kv_cache must be a dict with 'k' and 'v' arrays (B, S, K, E)")
    check_array("kv_cache['k']", kv_cache["k"], (dims.B, "S", dims.K, dims.E), kind="float")
    S = kv_cache["k"].shape[1]
    check_array("kv_cache['v']", kv_cache["v"], (dims.B, S, dims.K, dims.E), kind="float")
    if cache_pos is not None and not 0 <= cache_pos <= S - dims.T:
        raise ValueError(f"cache_pos {cache_pos} + {dims.T} new tokens does not fit the cache's {S} slots")
    return S


def project_keys_values(
    params: Params, src: np.ndarray, rope_theta: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """src (B, S, D) -> keys, values (B, S, K, E) before RoPE; the key bias only where it
    matters (``key_bias_matters``). Also what a cross-attention cache holds."""
    k = _project(params["key"], src, "BSD,DKE->BSKE", key_bias_matters(rope_theta))
    return k, _project(params["value"], src, "BSD,DKE->BSKE")


def key_bias_matters(rope_theta: float | None) -> bool:
    """Whether the key bias can change the output.

    Without RoPE, b_k adds ``q_t . b_k`` to every logit of query row t, a shift the softmax
    cancels exactly (masked or not): the output does not depend on b_k and its gradient is 0.
    Both implementations then leave b_k out, so that zero is exact rather than rounding noise
    (which no relative tolerance can judge). With RoPE the key at position s is rotated by its
    own angle, so ``q_t . R_s b_k`` varies along the row and b_k counts.
    """
    return rope_theta is not None


def attention_forward(
    params: Params,
    x: np.ndarray,
    kv: np.ndarray | None = None,
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    key_padding_mask: np.ndarray | None = None,
    causal: bool = False,
    rope_theta: float | None = None,
    rope_layout: str = "half",
    positions: np.ndarray | None = None,
    scale: float | None = None,
    dropout_mask: np.ndarray | None = None,
    dropout_rate: float = 0.0,
    kv_cache: dict[str, np.ndarray] | None = None,
    cache_pos: int | None = None,
) -> tuple[np.ndarray, Any]:
    """x: (B, T, D) queries, kv: (B, S, D) keys/values or None (self) -> y: (B, T, D).

    key_padding_mask: (B, S) bool, True = attend. causal: query t sees keys s <= t + S - T.
    rope_theta: apply RoPE (layout ``rope_layout``) to q and k at ``positions`` ((T,) or
    (B, T) ints, default ``arange(T)``). scale: logit scale, default 1/sqrt(E).
    dropout_mask: (B, H, T, S) bool, True = keep; kept weights are scaled by
    1/(1 - dropout_rate). No mask means no dropout (evaluation), whatever the rate.

    kv_cache: decoding (forward only). Self-attention: ``{"k", "v"}`` (B, S, K, E); this call's
    keys/values are written *in place* at slots [cache_pos, cache_pos + T), the queries attend
    over all S slots (query t sits at slot cache_pos + t; positions default to those slots;
    key_padding_mask is (B, S)). Cross-attention (``cache_pos=None``): the cache holds the
    source's ``project_keys_values`` and ``kv`` may be None.
    """
    cached = kv_cache is not None
    dims = check_attention_args(
        params, x, kv, n_heads=n_heads, n_kv_heads=n_kv_heads,
        key_padding_mask=None if cached else key_padding_mask,
        rope_theta=rope_theta, rope_layout=rope_layout, positions=positions,
        dropout_mask=None if cached else dropout_mask, dropout_rate=dropout_rate,
    )
    if cached:
        if dropout_mask is not None:
            raise ValueError("dropout masks are for training; decoding with kv_cache is evaluation")
        dims = dims._replace(S=check_kv_cache(dims, kv_cache, cache_pos))
        if key_padding_mask is not None:
            check_array("key_padding_mask", key_padding_mask, (dims.B, dims.S), kind="bool")
    B, T, S, D, H, K, E = dims
    G = dims.G
    src = x if kv is None else kv
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)

    q = _project(params["query"], x, "BTD,DHE->BTHE")  # (B, T, H, E)
    if cached and cache_pos is None:  # cross-attention: the source's keys/values, projected once
        k, v = kv_cache["k"], kv_cache["v"]
    else:
        k, v = project_keys_values(params, src, rope_theta)  # (B, T or S, K, E)
    rope_caches = None
    if rope_theta is not None:
        pos = (np.arange(T) + (cache_pos or 0)) if positions is None else positions
        q, q_rope = rope_forward(q, pos, theta=rope_theta, layout=rope_layout)
        k, k_rope = rope_forward(k, pos, theta=rope_theta, layout=rope_layout)
        rope_caches = (q_rope, k_rope)
    if cached and cache_pos is not None:  # write this call's slots, then read all S of them
        kv_cache["k"][:, cache_pos:cache_pos + T] = k
        kv_cache["v"][:, cache_pos:cache_pos + T] = v
        k, v = kv_cache["k"], kv_cache["v"]

    qg = q.reshape(B, T, K, G, E)
    logits = einsum("BTKGE,BSKE->BKGTS", qg, k) * scale  # (B, K, G, T, S)
    allowed = allowed_keys(dims, key_padding_mask, causal, cache_pos)
    if allowed is not None:
        logits = np.where(allowed, logits, logits.dtype.type(-np.inf))
    # softmax_forward gives an all -inf row zero weights (and zero gradient), not NaN.
    probs, softmax_cache = softmax_forward(logits, axis=-1)

    keep = None
    weights = probs
    if dropout_mask is not None:
        keep = dropout_mask.reshape(B, K, G, T, S).astype(x.dtype) * (1.0 / (1.0 - dropout_rate))
        weights = probs * keep

    o = einsum("BKGTS,BSKE->BTKGE", weights, v).reshape(B, T, H, E)
    y = einsum("BTHE,HED->BTD", o, params["out"]["kernel"])
    if "bias" in params["out"]:
        y = y + params["out"]["bias"]
    cache = (dims, x, kv, qg, k, v, softmax_cache, weights, keep, o, scale, rope_caches)
    return y, cache


def attention_backward(
    params: Params, cache: Any, dy: np.ndarray
) -> tuple[np.ndarray | tuple[np.ndarray, np.ndarray], Params]:
    """dy: (B, T, D) -> (dx, grads); dx is (B, T, D), or ``(dx_q, dx_kv)`` with dx_kv (B, S, D)
    when forward was given ``kv``. ``grads`` has the shape of ``params``."""
    dims, x, kv, qg, k, v, softmax_cache, weights, keep, o, scale, rope_caches = cache
    B, T, S, D, H, K, E = dims
    G = dims.G
    src = x if kv is None else kv
    grads: Params = {name: {} for name in _PROJECTIONS}

    # y = o W_o + b_o
    grads["out"]["kernel"] = einsum("BTHE,BTD->HED", o, dy)
    if "bias" in params["out"]:
        grads["out"]["bias"] = dy.sum(axis=(0, 1))
    do = einsum("BTD,HED->BTHE", dy, params["out"]["kernel"]).reshape(B, T, K, G, E)

    # o = weights . v
    dweights = einsum("BTKGE,BSKE->BKGTS", do, v)
    dv = einsum("BKGTS,BTKGE->BSKE", weights, do)
    dprobs = dweights if keep is None else dweights * keep

    # logits = scale * q . k (masked entries have zero weight, so get zero gradient)
    dlogits = softmax_backward(softmax_cache, dprobs) * scale
    dq = einsum("BKGTS,BSKE->BTKGE", dlogits, k).reshape(B, T, H, E)
    dk = einsum("BKGTS,BTKGE->BSKE", dlogits, qg)
    if rope_caches is not None:
        dq = rope_backward(rope_caches[0], dq)
        dk = rope_backward(rope_caches[1], dk)

    # q = x W_q + b_q; k, v = src W_{k,v} + b_{k,v}
    grads["query"]["kernel"] = einsum("BTD,BTHE->DHE", x, dq)
    grads["key"]["kernel"] = einsum("BSD,BSKE->DKE", src, dk)
    grads["value"]["kernel"] = einsum("BSD,BSKE->DKE", src, dv)
    if "bias" in params["query"]:
        grads["query"]["bias"] = dq.sum(axis=(0, 1))
        # RoPE on <=> key_bias_matters; otherwise forward left b_k out and its gradient is 0.
        grads["key"]["bias"] = (
            dk.sum(axis=(0, 1)) if rope_caches is not None else np.zeros_like(params["key"]["bias"])
        )
        grads["value"]["bias"] = dv.sum(axis=(0, 1))
    dx = einsum("BTHE,DHE->BTD", dq, params["query"]["kernel"])
    dsrc = einsum("BSKE,DKE->BSD", dk, params["key"]["kernel"]) + einsum(
        "BSKE,DKE->BSD", dv, params["value"]["kernel"]
    )
    if kv is None:
        return dx + dsrc, grads
    return (dx, dsrc), grads
