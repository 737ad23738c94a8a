"""Cases for activations, (log-)softmax and linear."""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_jax.layers import activations as jact
from bigmodel_jax.layers.linear import linear
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers import activations as ract
from reference_numpy.layers.linear import init_linear, linear_backward, linear_forward


@register("activation", tuple({"name": n} for n in ract.ACTIVATIONS))
def activation_case(rng: np.random.Generator, dtype: Any, name: str = "gelu", shape=(2, 3, 5)) -> CaseData:
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    fwd, bwd = ract.activation(name)
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: fwd(i["x"]),
        ref_backward=lambda p, c, dy: ({"x": bwd(c, dy)}, {}),
        jax_forward=lambda p, i: jact.activation(name)(i["x"]),
    )


@register("softmax", ({"log": False}, {"log": True}))
def softmax_case(
    rng: np.random.Generator, dtype: Any, log: bool = False, shape=(2, 3, 7), scale: float = 3.0
) -> CaseData:
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    fwd, bwd = (ract.log_softmax_forward, ract.log_softmax_backward) if log else (
        ract.softmax_forward, ract.softmax_backward)
    jfn = jact.log_softmax if log else jact.softmax
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: fwd(i["x"]),
        ref_backward=lambda p, c, dy: ({"x": bwd(c, dy)}, {}),
        jax_forward=lambda p, i: jfn(i["x"]),
    )


@register(
    "linear",
    ({"bias": True, "activation": "identity"}, {"bias": False, "activation": "gelu"},
     {"bias": True, "activation": "silu"}),
)
def linear_case(
    rng: np.random.Generator, dtype: Any, bias: bool = True, activation: str = "identity",
    batch_shape=(2, 3), d_in: int = 5, d_out: int = 4,
) -> CaseData:
    params = init_linear(rng, d_in, d_out, bias=bias, dtype=dtype)
    if bias:
        params["bias"] = rng.standard_normal(d_out).astype(dtype)
    x = rng.standard_normal((*batch_shape, d_in)).astype(dtype)
    return CaseData(
        params=params,
        inputs={"x": x},
        ref_forward=lambda p, i: linear_forward(p, i["x"], activation),
        ref_backward=lambda p, c, dy: (lambda dx, g: ({"x": dx}, g))(*linear_backward(p, c, dy)),
        jax_forward=lambda p, i: linear(p, i["x"], activation),
    )
