"""Rotary position embeddings, the JAX twin of ``reference_numpy.layers.rope``.

Dims: B batch, T time, H heads, E head dim (even), P = E / 2 pairs. Layouts: ``"half"`` pairs
features (i, i + E/2) (HF/Llama ``rotate_half``), ``"interleaved"`` pairs (2i, 2i + 1) (GPT-J,
Meta's original Llama). See the reference module for the equations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reference_numpy.checks import check_array
from reference_numpy.layers.rope import check_positions, check_rope_args, rope_inverse_frequencies


def rope_angles(
    positions: jax.Array, head_dim: int, theta: float = 10000.0, dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """positions: (...) ints -> ``(cos, sin)``, each (..., P) in ``dtype``."""
    w = jnp.asarray(rope_inverse_frequencies(head_dim, theta), dtype=dtype)  # (P,)
    angle = positions.astype(dtype)[..., None] * w  # (..., P)
    return jnp.cos(angle), jnp.sin(angle)


def rope(
    x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, layout: str = "half"
) -> jax.Array:
    """x: (B, T, H, E), positions: (T,) or (B, T) ints -> (B, T, H, E), same dtype."""
    check_array("x", x, ("B", "T", "H", "E"), kind="float")
    check_rope_args(x.shape[-1], theta, layout)
    check_positions(positions, x.shape[0], x.shape[1])
    cos, sin = rope_angles(positions, x.shape[-1], theta, x.dtype)  # (T, P) or (B, T, P)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B or 1, T, 1, P)

    P = x.shape[-1] // 2
    if layout == "half":
        a, b = x[..., :P], x[..., P:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if layout == "half":
        return jnp.concatenate([ra, rb], axis=-1)
    return jnp.stack([ra, rb], axis=-1).reshape(x.shape)
