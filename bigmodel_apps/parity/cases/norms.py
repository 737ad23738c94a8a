"""Cases for layer norm and RMS norm.

Scale and bias are random (not the identity init) so every parameter gradient is exercised;
``offset`` shifts every row, which a one-pass variance ``mean(x^2) - mean(x)^2`` would get wrong.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers.norms import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

_layer_norm_jit = jax.jit(layer_norm, static_argnames=("eps",))
_rms_norm_jit = jax.jit(rms_norm, static_argnames=("eps",))


def _with_dx(backward):
    """Adapt ``backward -> (dx, grads)`` to the harness's ``({"x": dx}, grads)``."""
    return lambda p, c, dy: (lambda dx, g: ({"x": dx}, g))(*backward(p, c, dy))


def _params_and_x(rng, dtype, batch_shape, d_model, bias, offset, scale):
    params = {"scale": (1.0 + 0.5 * rng.standard_normal(d_model)).astype(dtype)}
    if bias:
        params["bias"] = rng.standard_normal(d_model).astype(dtype)
    x = (offset + scale * rng.standard_normal((*batch_shape, d_model))).astype(dtype)
    return params, x


@register(
    "layer_norm",
    ({"eps": 1e-5}, {"eps": 1e-12, "offset": 3.0}, {"eps": 0.5, "bias": False},
     {"eps": 1e-6, "batch_shape": (1, 1), "d_model": 1}),
)
def layer_norm_case(
    rng: np.random.Generator, dtype: Any, eps: float = 1e-5, bias: bool = True,
    batch_shape: tuple[int, ...] = (2, 3), d_model: int = 6, offset: float = 0.0, scale: float = 1.0,
) -> CaseData:
    params, x = _params_and_x(rng, dtype, batch_shape, d_model, bias, offset, scale)
    return CaseData(
        params=params,
        inputs={"x": x},
        ref_forward=lambda p, i: layer_norm_forward(p, i["x"], eps),
        ref_backward=_with_dx(layer_norm_backward),
        jax_forward=lambda p, i: _layer_norm_jit(p, i["x"], eps=eps),
    )


@register("rms_norm", ({"eps": 1e-6}, {"eps": 1e-5, "offset": 2.0}, {"eps": 0.1, "batch_shape": (1,)}))
def rms_norm_case(
    rng: np.random.Generator, dtype: Any, eps: float = 1e-6, batch_shape: tuple[int, ...] = (2, 3),
    d_model: int = 6, offset: float = 0.0, scale: float = 1.0,
) -> CaseData:
    params, x = _params_and_x(rng, dtype, batch_shape, d_model, False, offset, scale)
    return CaseData(
        params=params,
        inputs={"x": x},
        ref_forward=lambda p, i: rms_norm_forward(p, i["x"], eps),
        ref_backward=_with_dx(rms_norm_backward),
        jax_forward=lambda p, i: _rms_norm_jit(p, i["x"], eps=eps),
    )
