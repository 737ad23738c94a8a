"""Activations by name, matching ``reference_numpy.layers.activations``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # x * Phi(x), erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF "gelu_new"
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name``; unknown names list the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """Stable softmax; an all ``-inf`` row gives zeros (as the reference), not NaN."""
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(x - jax.lax.stop_gradient(m))
    s = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """x - logsumexp(x)."""
    return jax.nn.log_softmax(x, axis=axis)
