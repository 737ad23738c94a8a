"""Cases for explicit-mask dropout: one NumPy mask fed to both implementations."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bigmodel_jax.layers.dropout import dropout
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers.dropout import dropout_backward, dropout_forward, dropout_mask

_dropout_jit = jax.jit(dropout, static_argnames=("rate",))


@register("dropout", ({"rate": 0.0}, {"rate": 0.3}, {"rate": 0.3, "broadcast": True}, {"rate": 0.9}))
def dropout_case(
    rng: np.random.Generator, dtype: Any, rate: float = 0.3, broadcast: bool = False,
    shape: tuple[int, ...] = (2, 3, 4),
) -> CaseData:
    """``broadcast``: one mask per (B, 1, D), shared across time."""
    x = rng.standard_normal(shape).astype(dtype)
    mask_shape = (shape[0], 1, *shape[2:]) if broadcast else shape
    mask = dropout_mask(rng, mask_shape, rate)
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: dropout_forward(i["x"], mask, rate),
        ref_backward=lambda p, c, dy: ({"x": dropout_backward(c, dy)}, {}),
        jax_forward=lambda p, i: _dropout_jit(i["x"], mask, rate=rate),
    )
