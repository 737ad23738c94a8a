"""Layer norm and RMS norm, the JAX twins of ``reference_numpy.layers.norms``.

Dims: D model width; ``...`` any leading axes. Same equations and parameter trees as the
reference (see its docstring); gradients come from ``jax.grad``.

Half-precision inputs (bfloat16 / float16) compute their statistics in float32 and cast back,
as HF's Llama and Flax's own norms do: a bfloat16 mean over D = 4096 would lose most of its
digits. float32 and float64 inputs compute in their own dtype, exactly as the reference.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from reference_numpy.layers.norms import check_eps, check_norm_args


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def layer_norm(params: dict[str, jax.Array], x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x: (..., D) -> (..., D); params {scale: (D,), bias: (D,)} (bias optional)."""
    check_norm_args(params, x, ("scale",))
    check_eps(eps)
    xf = x.astype(_compute_dtype(x.dtype))
    mu = jnp.mean(xf, axis=-1, keepdims=True)  # (..., 1)
    xc = xf - mu
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    y = (xc * rstd).astype(x.dtype) * params["scale"]
    if "bias" in params:
        y = y + params["bias"]
    return y


def rms_norm(params: dict[str, jax.Array], x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x: (..., D) -> (..., D); params {scale: (D,)}; y = x * rsqrt(mean(x^2) + eps) * scale."""
    check_norm_args(params, x, ("scale",))
    if "bias" in params:
        raise ValueError("RMS norm params have no bias; expected keys ['scale']")
    check_eps(eps)
    xf = x.astype(_compute_dtype(x.dtype))
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)  # (..., 1)
    return (xf * rstd).astype(x.dtype) * params["scale"]


class LayerNorm(nn.Module):
    """Flax twin of the reference layer norm; params ``{scale: (D,), bias: (D,)}``."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: Any = jnp.float32  # parameter dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        params = {"scale": self.param("scale", nn.initializers.ones, (D,), self.dtype)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (D,), self.dtype)
        return layer_norm(params, x, self.eps)


class RMSNorm(nn.Module):
    """Flax twin of the reference RMS norm; params ``{scale: (D,)}``."""

    eps: float = 1e-6
    dtype: Any = jnp.float32  # parameter dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return rms_norm({"scale": scale}, x, self.eps)
