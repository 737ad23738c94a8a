"""Elementwise activations and the (log-)softmax, each a forward/backward pair.

``*_forward(x) -> (y, cache)`` and ``*_backward(cache, dy) -> dx``. The cache is whatever
backward needs, nothing more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference_numpy.checks import check_array
from reference_numpy.speed.chunks import elementwise

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

# W. J. Cody-style rational approximations as tabulated by S. L. Moshier's Cephes library
# (public domain): erf(x) = x T(x^2) / U(x^2) on |x| <= 1, and erfc(x) = exp(-x^2) P(x) / Q(x)
# on 1 < x < 8; both good to a few float64 ulps. Coefficients from the highest power down.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)


def _horner(coefficients: tuple[float, ...], z: np.ndarray) -> np.ndarray:
    out = np.full_like(z, coefficients[0])
    for c in coefficients[1:]:
        out *= z
        out += c
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised error function (NumPy has none), within ~4e-16 relative of ``math.erf``.

    Computed in float64 for float64 input and in float32 otherwise (float32 results within
    ~2e-7 of the exact value: a few ulps, as XLA's own float32 erf): for |x| <= 1,
    erf(x) = x T(x^2) / U(x^2); beyond, erf(x) = 1 - exp(-x^2) P(|x|) / Q(|x|) with the sign of
    x, |x| clamped at 6 (erfc(6) = 2e-17 already rounds 1 - erfc to 1). Both branches
    are evaluated on every element and one is picked (cheaper than gathering masked subsets),
    a chunk at a time (``reference_numpy.speed.chunks``) so that the ~30 elementwise passes stay in
    cache.
    """
    x = np.asarray(x)
    compute = np.float64 if x.dtype == np.float64 else np.float32

    def erf_chunk(v: np.ndarray) -> np.ndarray:
        v = v.astype(compute)
        a = np.minimum(np.abs(v), 6.0)  # NaN stays NaN; inf -> 6 -> erf = +-1
        z = a * a
        near = a * _horner(_ERF_T, z) / _horner(_ERF_U, z)
        far = 1.0 - np.exp(-z) * _horner(_ERFC_P, a) / _horner(_ERFC_Q, a)
        return np.copysign(np.where(a <= 1.0, near, far), v).astype(x.dtype, copy=False)

    return elementwise(erf_chunk, x)


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
    cdf = elementwise(lambda xs: 0.5 * (1.0 + erf(xs * _INV_SQRT_2)), x)  # Phi(x), chunk by chunk
    return x * cdf, (x, cdf, False)


def gelu_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    x, aux, approximate = cache
    if approximate:
        t = aux
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    cdf = aux

    def dgelu(xs: np.ndarray, cs: np.ndarray, gs: np.ndarray) -> np.ndarray:  # dy (Phi(x) + x phi(x))
        pdf = np.exp(-0.5 * xs * xs) / math.sqrt(2.0 * math.pi)
        return gs * (cs + xs * pdf)

    # chunked (``reference_numpy.speed.chunks``): the same arithmetic as on the whole array, with its
    # temporaries in cache
    return elementwise(dgelu, *np.broadcast_arrays(x, cdf, dy))


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
