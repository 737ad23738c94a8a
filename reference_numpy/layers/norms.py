"""Layer norm and RMS norm over the last axis, each a forward/backward pair.

Dims: D model width; ``...`` any leading axes (B, T, ...), each row normalised on its own.

Layer norm (Ba et al. 2016; GPT-2, BERT, ViT)::

    mu   = mean(x)                     rstd = 1 / sqrt(mean((x - mu)^2) + eps)
    xhat = (x - mu) * rstd             y    = xhat * scale + bias

RMS norm (Zhang & Sennrich 2019; Llama, T5)::

    rstd = 1 / sqrt(mean(x^2) + eps)   xhat = x * rstd          y = xhat * scale

Both caches keep ``xhat`` and ``rstd``: with ``g = dy * scale`` the input gradients are

    layer norm:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    RMS norm:    dx = rstd * (g - xhat * mean(g * xhat))

(the ``mean(g)`` term is what the mean subtraction adds; RMS norm has no mean to subtract).

The variance is the two-pass ``mean((x - mu)^2)``, never ``mean(x^2) - mu^2``, which cancels
catastrophically for rows with a large offset. Everything is computed in the input dtype; HF's
Llama upcasts half-precision inputs to float32 for the statistics, which the reference (float32
and float64 only) never needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import check_array, check_same_dtype

Params = dict[str, np.ndarray]


def check_eps(eps: float) -> None:
    """Shared by both implementations: eps is a finite number >= 0."""
    if not (np.isscalar(eps) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_norm_args(params: Params, x: Any, keys: tuple[str, ...]) -> None:
    """``params`` holds ``keys`` (each (D,)), ``x`` is a float (..., D) array of the same dtype.

    Used by both implementations, so a wrong width says the same thing on either side.
    """
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"norm params are missing {missing}; expected keys {list(keys)}")
    scale = params["scale"]
    check_array("scale", scale, ("D",), kind="float")
    D = scale.shape[0]
    if "bias" in params:
        check_array("bias", params["bias"], (D,), kind="float")
    check_array("x", x, kind="float")
    if len(x.shape) < 1 or x.shape[-1] != D:
        raise ValueError(f"x must have shape (..., D) = (..., {D}) to match scale, got {tuple(x.shape)}")
    check_same_dtype(x=x, scale=scale, bias=params.get("bias"))


def init_layer_norm(d_model: int, *, bias: bool = True, dtype: Any = np.float32) -> Params:
    """The identity layer norm: scale ones (D,), bias zeros (D,)."""
    params = {"scale": np.ones((d_model,), dtype)}
    if bias:
        params["bias"] = np.zeros((d_model,), dtype)
    return params


def init_rms_norm(d_model: int, *, dtype: Any = np.float32) -> Params:
    """The identity RMS norm: scale ones (D,)."""
    return {"scale": np.ones((d_model,), dtype)}


def _sum_rows(a: np.ndarray) -> np.ndarray:
    """(..., D) -> (D,): a per-channel parameter's gradient sums over every row."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def layer_norm_forward(params: Params, x: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Any]:
    """x: (..., D) -> y: (..., D); params {scale: (D,), bias: (D,)} (bias optional).

    Cache: ``(xhat (..., D), rstd (..., 1))``.
    """
    check_norm_args(params, x, ("scale",))
    check_eps(eps)
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = xc * rstd
    y = xhat * params["scale"]
    if "bias" in params:
        y = y + params["bias"]
    return y, (xhat, rstd)


def layer_norm_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    """dy: (..., D) -> dx: (..., D), grads {scale: (D,), bias: (D,)}."""
    xhat, rstd = cache
    g = dy * params["scale"]
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    grads = {"scale": _sum_rows(dy * xhat)}
    if "bias" in params:
        grads["bias"] = _sum_rows(dy)
    return dx, grads


def rms_norm_forward(params: Params, x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, Any]:
    """x: (..., D) -> y: (..., D); params {scale: (D,)}; y = x * rsqrt(mean(x^2) + eps) * scale.

    Cache: ``(xhat (..., D), rstd (..., 1))``.
    """
    check_norm_args(params, x, ("scale",))
    if "bias" in params:
        raise ValueError("RMS norm params have no bias; expected keys ['scale']")
    check_eps(eps)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x * rstd
    return xhat * params["scale"], (xhat, rstd)


def rms_norm_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    """dy: (..., D) -> dx: (..., D), grads {scale: (D,)}."""
    xhat, rstd = cache
    g = dy * params["scale"]
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, {"scale": _sum_rows(dy * xhat)}
