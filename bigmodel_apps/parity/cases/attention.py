"""Cases for rotary embeddings and multi-head / grouped-query attention.

Sizes stay tiny (B=2, T<=5, D=8): finite differences run one forward per perturbed element.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.layers.attention import attention
from bigmodel_jax.layers.rope import rope
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers.attention import attention_backward, attention_forward, init_attention
from reference_numpy.layers.rope import rope_backward, rope_forward

PADDINGS = ("none", "random", "left", "right", "empty")

# The JAX side runs under jit: that is how it is used, it proves the layer is jit-able with masks
# and positions as traced arrays, and one compile per shape is far cheaper than eager op-by-op.
_rope_jit = jax.jit(rope, static_argnames=("theta", "layout"))
_attention_jit = jax.jit(
    attention,
    static_argnames=(
        "n_heads", "n_kv_heads", "causal", "rope_theta", "rope_layout", "scale", "dropout_rate"
    ),
)
POSITIONS = ("default", "batched")


def _positions(rng: np.random.Generator, kind: str, batch: int, T: int) -> np.ndarray | None:
    """None (the default arange(T)), or distinct random (B, T) positions, e.g. a packed batch."""
    if kind == "default":
        return None
    if kind == "batched":
        return rng.integers(0, 64, size=(batch, T))
    raise ValueError(f"positions must be one of {POSITIONS}, got {kind!r}")


def key_padding(rng: np.random.Generator, kind: str, batch: int, S: int) -> np.ndarray | None:
    """A (B, S) bool key mask, True = attend, for the named pattern (all in batch element 0).

    "left": key 0 padded, so under a causal mask query 0 has no key at all (the fully masked
    row); "right": the last key padded; "empty": every key padded; "random": each key kept with
    probability 0.7 (so fully masked rows happen too).
    """
    if kind == "none":
        return None
    mask = np.ones((batch, S), dtype=bool)
    if kind == "random":
        return rng.random((batch, S)) < 0.7
    if kind == "left":
        mask[0, 0] = False
    elif kind == "right":
        mask[0, -1] = False
    elif kind == "empty":
        mask[0] = False
    else:
        raise ValueError(f"padding must be one of {PADDINGS}, got {kind!r}")
    return mask


@register(
    "rope",
    ({"layout": "half"}, {"layout": "interleaved"}, {"layout": "half", "positions": "batched"},
     {"layout": "interleaved", "positions": "batched", "theta": 100.0}),
)
def rope_case(
    rng: np.random.Generator, dtype: Any, layout: str = "half", batch: int = 2, T: int = 5,
    n_heads: int = 2, head_dim: int = 6, theta: float = 10000.0, positions: str = "default",
) -> CaseData:
    x = rng.standard_normal((batch, T, n_heads, head_dim)).astype(dtype)
    pos = _positions(rng, positions, batch, T)
    pos = np.arange(T) if pos is None else pos
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: rope_forward(i["x"], pos, theta=theta, layout=layout),
        ref_backward=lambda p, c, dy: ({"x": rope_backward(c, dy)}, {}),
        jax_forward=lambda p, i: _rope_jit(i["x"], jnp.asarray(pos), theta=theta, layout=layout),
    )


@register(
    "attention",
    (
        {},  # self-attention, MHA (H = K = 2)
        {"n_heads": 4, "n_kv_heads": 2, "head_dim": 3},  # GQA
        {"n_heads": 4, "n_kv_heads": 1},  # MQA
        {"causal": True, "padding": "left"},  # query 0 of batch 0 sees no key
        {"padding": "empty", "T": 3},  # batch 0 sees no key at all
        {"rope": True, "causal": True, "n_heads": 4, "n_kv_heads": 2, "positions": "batched"},
        {"rope": True, "rope_layout": "interleaved", "padding": "right"},
        {"cross": True, "T": 3, "S": 5, "padding": "random", "n_kv_heads": 1},  # S != T
        {"bias": False, "causal": True},
        {"dropout": True, "causal": True, "n_heads": 4, "n_kv_heads": 2},
    ),
)
def attention_case(
    rng: np.random.Generator,
    dtype: Any,
    *,
    batch: int = 2,
    T: int = 4,
    S: int | None = None,
    d_model: int = 8,
    n_heads: int = 2,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    bias: bool = True,
    causal: bool = False,
    padding: str = "none",
    rope: bool = False,
    rope_layout: str = "half",
    positions: str = "default",
    cross: bool = False,
    dropout: bool = False,
    dropout_rate: float = 0.25,
) -> CaseData:
    """Self-attention over x (B, T, D), or cross-attention to kv (B, S, D) when ``cross``."""
    if not cross and S not in (None, T):
        raise ValueError(f"self-attention has S == T; got S={S}, T={T} (set cross=True)")
    S = (T + 1 if cross else T) if S is None else S
    H = n_heads
    params = init_attention(rng, d_model, n_heads, n_kv_heads, head_dim, bias=bias, dtype=dtype)
    if bias:  # non-zero biases, so their gradients (and their broadcasting) are exercised
        for p in params.values():
            p["bias"] = (rng.standard_normal(p["bias"].shape) * 0.5).astype(dtype)
    inputs = {"x": rng.standard_normal((batch, T, d_model)).astype(dtype)}
    if cross:
        inputs["kv"] = rng.standard_normal((batch, S, d_model)).astype(dtype)

    options: dict[str, Any] = {
        "causal": causal,
        "key_padding_mask": key_padding(rng, padding, batch, S),
        "rope_theta": 10000.0 if rope else None,
        "rope_layout": rope_layout,
        "positions": _positions(rng, positions, batch, T) if rope else None,
    }
    if dropout:
        options["dropout_mask"] = rng.random((batch, H, T, S)) >= dropout_rate
        options["dropout_rate"] = dropout_rate
    jax_options = {
        k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()
    }

    def ref_backward(p: Any, cache: Any, dy: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        dx, grads = attention_backward(p, cache, dy)
        if cross:
            return {"x": dx[0], "kv": dx[1]}, grads
        return {"x": dx}, grads

    return CaseData(
        params=params,
        inputs=inputs,
        ref_forward=lambda p, i: attention_forward(p, i["x"], i.get("kv"), **options),
        ref_backward=ref_backward,
        jax_forward=lambda p, i: _attention_jit(p, i["x"], i.get("kv"), **jax_options),
    )
