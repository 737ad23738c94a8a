"""Elementwise activations and the (log-)softmax, each a forward/backward pair.

``*_forward(x) -> (y, cache)`` and ``*_backward(cache, dy) -> dx``. The cache is whatever
backward needs, nothing more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference_numpy.checks import check_array

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

# (series terms, continued-fraction depth) giving erf to ~1e-15 (float64) / ~1e-8 (float32).
_ERF_TERMS = {np.dtype(np.float64): (36, 26), np.dtype(np.float32): (24, 12)}


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised error function (NumPy has none), accurate to a few float64 ulps.

    For |x| < 2.5 the everywhere-positive series
        erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))
    (no cancellation); beyond, erfc's continued fraction
        erfc(x) = exp(-x^2) / sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
    The loops run over series terms, not over elements.
    """
    x = np.asarray(x)
    n_series, n_cf = _ERF_TERMS.get(x.dtype, _ERF_TERMS[np.dtype(np.float64)])
    a = np.abs(x).astype(np.float64)
    out = np.empty_like(a)
    small = a < 2.5
    s = a[small]
    s2 = s * s
    term = s.copy()
    total = s.copy()
    for n in range(1, n_series + 1):
        term *= 2.0 * s2 / (2 * n + 1)
        total += term
    out[small] = _TWO_OVER_SQRT_PI * np.exp(-s2) * total
    big = a[~small]
    frac = big.copy()
    for k in range(n_cf, 0, -1):
        frac = big + (0.5 * k) / frac
    out[~small] = 1.0 - np.exp(-big * big) / (math.sqrt(math.pi) * frac)
    return (np.sign(x) * out).astype(x.dtype, copy=False)


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    """relu(x) = max(x, 0)."""
    return np.maximum(x, 0), x > 0


def relu_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    return dy * cache


def gelu_forward(x: np.ndarray, approximate: bool = False) -> tuple[np.ndarray, Any]:
    """GELU. ``approximate=False``: x * Phi(x) = x/2 (1 + erf(x/sqrt2)) (BERT, ViT).

    ``approximate=True``: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) ("gelu_new", GPT-2).
    The two differ by up to ~1e-3, enough to fail a port: pick the one the checkpoint used.
    """
    if approximate:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = np.tanh(u)
        return 0.5 * x * (1.0 + t), (x, t, True)
    cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
    return x * cdf, (x, cdf, False)


def gelu_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    x, aux, approximate = cache
    if approximate:
        t = aux
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    cdf = aux
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic: never exponentiates a large positive number."""
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z)).astype(x.dtype, copy=False)


def sigmoid_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    y = sigmoid(x)
    return y, y


def sigmoid_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    y = cache
    return dy * y * (1.0 - y)


def silu_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    """silu(x) = x * sigmoid(x) (a.k.a. swish; the gate of SwiGLU)."""
    s = sigmoid(x)
    return x * s, (x, s)


def silu_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    x, s = cache
    return dy * s * (1.0 + x * (1.0 - s))


def tanh_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    y = np.tanh(x)
    return y, y


def tanh_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    y = cache
    return dy * (1.0 - y * y)


def identity_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    return x, None


def identity_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    return dy


# name -> (forward, backward); "gelu_tanh" is HF's "gelu_new" / "gelu_pytorch_tanh".
ACTIVATIONS = {
    "identity": (identity_forward, identity_backward),
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (
        lambda x: gelu_forward(x, approximate=True),
        gelu_backward,
    ),
    "silu": (silu_forward, silu_backward),
    "tanh": (tanh_forward, tanh_backward),
    "sigmoid": (sigmoid_forward, sigmoid_backward),
}


def activation(name: str) -> tuple[Any, Any]:
    """``(forward, backward)`` for an activation name; unknown names list the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def softmax_forward(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, Any]:
    """softmax along ``axis``, stable for any finite input (subtracts the max first).

    A row that is entirely ``-inf`` gives all zeros rather than NaN.
    """
    check_array("x", x, kind="float")
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    y = e / np.where(s > 0, s, 1.0)
    return y, (y, axis)


def softmax_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    # dx = y * (dy - <dy, y>)
    y, axis = cache
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def log_softmax_forward(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, Any]:
    """log softmax = x - logsumexp(x), stable for logits of any magnitude."""
    check_array("x", x, kind="float")
    m = np.max(x, axis=axis, keepdims=True)
    shifted = x - m
    lse = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    y = shifted - lse
    return y, (y, axis)


def log_softmax_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    # dx = dy - softmax(x) * sum(dy)
    y, axis = cache
    return dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True)
