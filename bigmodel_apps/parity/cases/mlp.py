"""Cases for the MLP and the gated MLP (SwiGLU), biases random so they matter."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bigmodel_jax.layers.mlp import gated_mlp, mlp
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers.mlp import gated_mlp_backward, gated_mlp_forward, init_mlp, mlp_backward, mlp_forward

_mlp_jit = jax.jit(mlp, static_argnames=("activation",))
_gated_mlp_jit = jax.jit(gated_mlp, static_argnames=("activation",))


def _params(rng: np.random.Generator, dtype: Any, d_model: int, d_ff: int, gated: bool, bias: bool) -> dict:
    params = init_mlp(rng, d_model, d_ff, gated=gated, bias=bias, dtype=dtype)
    for p in params.values():
        if "bias" in p:
            p["bias"] = rng.standard_normal(p["bias"].shape).astype(dtype)
    return params


def _case(rng, dtype, gated, activation, bias, batch_shape, d_model, d_ff) -> CaseData:
    params = _params(rng, dtype, d_model, d_ff, gated, bias)
    x = rng.standard_normal((*batch_shape, d_model)).astype(dtype)
    fwd, bwd, jfn = (gated_mlp_forward, gated_mlp_backward, _gated_mlp_jit) if gated else (
        mlp_forward, mlp_backward, _mlp_jit)
    return CaseData(
        params=params,
        inputs={"x": x},
        ref_forward=lambda p, i: fwd(p, i["x"], activation),
        ref_backward=lambda p, c, dy: (lambda dx, g: ({"x": dx}, g))(*bwd(p, c, dy)),
        jax_forward=lambda p, i: jfn(p, i["x"], activation=activation),
    )


@register(
    "mlp",
    ({"activation": "gelu"}, {"activation": "gelu_tanh"}, {"activation": "relu"},
     {"activation": "gelu", "bias": False, "batch_shape": (1,)}),
)
def mlp_case(
    rng: np.random.Generator, dtype: Any, activation: str = "gelu", bias: bool = True,
    batch_shape: tuple[int, ...] = (2, 3), d_model: int = 4, d_ff: int = 6,
) -> CaseData:
    return _case(rng, dtype, False, activation, bias, batch_shape, d_model, d_ff)


@register(
    "gated_mlp",
    ({"activation": "silu"}, {"activation": "silu", "bias": False}, {"activation": "gelu_tanh"}),
)
def gated_mlp_case(
    rng: np.random.Generator, dtype: Any, activation: str = "silu", bias: bool = True,
    batch_shape: tuple[int, ...] = (2, 3), d_model: int = 4, d_ff: int = 6,
) -> CaseData:
    return _case(rng, dtype, True, activation, bias, batch_shape, d_model, d_ff)
