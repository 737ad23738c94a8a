"""Linear layer ``y = f(x W + b)``, kernel ``(In, Out)``, same tree as the reference."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel_jax.layers.activations import activation as _activation
from bigmodel_jax.perf import PerfOptions, einsum
from bigmodel_jax.quant import dense
from reference_numpy.checks import check_array


def linear(params: dict[str, Any], x: jax.Array, activation: str = "identity", *,
           perf: PerfOptions | None = None) -> jax.Array:
    """x: (..., In) -> (..., Out). ``perf``: mixed-precision matmul (``bigmodel_jax.perf``).

    ``params`` holds ``kernel`` (In, Out), or ``rows`` (Out, In): the decoding layout
    (``bigmodel_jax.generation.layout``), where at batch 1 each output is a dot product along
    contiguous memory."""
    if "rows" in params:
        z = jnp.einsum("...i,oi->...o", x, dense(params["rows"]))
        return _activation(activation)(z + params["bias"] if "bias" in params else z)
    w = params["kernel"]
    check_array("x", x, kind="float")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape (..., {w.shape[0]}), got {tuple(x.shape)}")
    z = einsum("...i,io->...o", x, w, perf)
    if "bias" in params:
        z = z + params["bias"]
    return _activation(activation)(z)


class Linear(nn.Module):
    """Flax twin of ``reference_numpy.layers.linear``; params ``{kernel: (In, Out), bias}``."""

    features: int
    use_bias: bool = True
    activation: str = "identity"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        params = {
            "kernel": self.param(
                "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype
            )
        }
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return linear(params, x, self.activation)
