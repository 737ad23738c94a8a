"""Linear layer ``y = f(x W + b)`` with the kernel stored ``(In, Out)``.

The seed writes ``y = f(Wx + b)`` for a column vector x; with row-vector batches (``..., In``)
that is ``x W^T``. We store ``W`` as ``(In, Out)`` (Flax's convention) so ``y = x @ kernel``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import check_array, check_same_dtype
from reference_numpy.speed.contract import rows_matmul
from reference_numpy.layers.activations import activation as _activation

Params = dict[str, np.ndarray]


def init_linear(
    rng: np.random.Generator, d_in: int, d_out: int, *, bias: bool = True, dtype: Any = np.float32,
    std: float | None = None,
) -> Params:
    """Normal(0, std) kernel (default std = 1/sqrt(d_in)), zero bias."""
    std = 1.0 / np.sqrt(d_in) if std is None else std
    p = {"kernel": (rng.standard_normal((d_in, d_out)) * std).astype(dtype)}
    if bias:
        p["bias"] = np.zeros((d_out,), dtype)
    return p


def linear_forward(
    params: Params, x: np.ndarray, activation: str = "identity"
) -> tuple[np.ndarray, Any]:
    """x: (..., In) -> y: (..., Out); y = f(x @ kernel + bias)."""
    w = params["kernel"]
    check_array("kernel", w, ndim=2, kind="float")
    check_array("x", x, kind="float")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape (..., {w.shape[0]}), got {x.shape}")
    check_same_dtype(x=x, kernel=w, bias=params.get("bias"))
    z = rows_matmul(x, w)  # (..., In) @ (In, Out) -> (..., Out)
    if "bias" in params:
        z = z + params["bias"]
    act_fwd, _ = _activation(activation)
    y, act_cache = act_fwd(z)
    return y, (x, activation, act_cache)


def linear_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    """dy: (..., Out) -> dx: (..., In), grads {kernel: (In, Out), bias: (Out,)}."""
    x, activation, act_cache = cache
    _, act_bwd = _activation(activation)
    dz = act_bwd(act_cache, dy)
    x2 = x.reshape(-1, x.shape[-1])  # (N, In)
    dz2 = dz.reshape(-1, dz.shape[-1])  # (N, Out)
    grads = {"kernel": x2.T @ dz2}
    if "bias" in params:
        grads["bias"] = dz2.sum(axis=0)
    dx = rows_matmul(dz, params["kernel"].T)
    return dx, grads
