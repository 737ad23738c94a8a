"""MLP and gated MLP (SwiGLU): JAX twins of ``reference_numpy.layers.mlp``, same trees.

Dims: D model width, F hidden width.

    MLP        y = down(act(up(x)))
    gated MLP  y = down(act(gate(x)) * up(x))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel_jax.layers.linear import Linear, linear
from bigmodel_jax.perf import PerfOptions
from reference_numpy.layers.mlp import check_mlp_params


def mlp(params: dict[str, Any], x: jax.Array, activation: str = "gelu", *, perf: PerfOptions | None = None) -> jax.Array:
    """x: (..., D) -> (..., D); params {up: linear (D, F), down: linear (F, D)}."""
    if "kernel" in params["up"]:  # (the decoding layout's ``rows`` were checked when prepared)
        check_mlp_params(params, gated=False)
    return linear(params["down"], linear(params["up"], x, activation, perf=perf), perf=perf)


def gated_mlp(params: dict[str, Any], x: jax.Array, activation: str = "silu", *,
              perf: PerfOptions | None = None) -> jax.Array:
    """x: (..., D) -> (..., D); params {gate, up: linear (D, F), down: linear (F, D)}."""
    if "kernel" in params["up"]:  # (the decoding layout's ``rows`` were checked when prepared)
        check_mlp_params(params, gated=True)
    gate = linear(params["gate"], x, activation, perf=perf)
    return linear(params["down"], gate * linear(params["up"], x, perf=perf), perf=perf)


class MLP(nn.Module):
    """Flax twin of the reference MLP; params ``{up: {kernel, bias}, down: {kernel, bias}}``."""

    d_ff: int  # F
    activation: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32  # parameter dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(self.d_ff, self.use_bias, self.activation, self.dtype, name="up")(x)
        return Linear(x.shape[-1], self.use_bias, dtype=self.dtype, name="down")(h)


class GatedMLP(nn.Module):
    """Flax twin of the reference gated MLP; params ``{gate, up, down}``, each a linear tree."""

    d_ff: int  # F
    activation: str = "silu"
    use_bias: bool = True  # Llama's checkpoints have none: pass False to load them
    dtype: Any = jnp.float32  # parameter dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = Linear(self.d_ff, self.use_bias, self.activation, self.dtype, name="gate")(x)
        u = Linear(self.d_ff, self.use_bias, dtype=self.dtype, name="up")(x)
        return Linear(x.shape[-1], self.use_bias, dtype=self.dtype, name="down")(a * u)
