"""Sentence embeddings from token states (the twin of ``reference_numpy.layers.pooling``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_pool(h: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """last_hidden_state (B, T, D), attention_mask (B, T) with 1 = token -> mean over tokens (B, D)."""
    m = jnp.asarray(attention_mask).astype(h.dtype)[..., None]  # (B, T, 1)
    return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of x (..., D) scaled to unit Euclidean norm (a zero row stays zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
