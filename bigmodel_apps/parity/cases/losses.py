"""Cases for cross-entropy, MSE and binary cross-entropy with logits (scalar outputs).

The harness's cotangent of a scalar loss is a random scalar. Only the prediction is
differentiated; labels and targets are constants closed over by the case.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bigmodel_jax import losses as jlosses
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy import losses as rlosses
from reference_numpy.losses import IGNORE_INDEX

_cross_entropy_jit = jax.jit(jlosses.cross_entropy, static_argnames=("ignore_index", "label_smoothing"))
_mse_jit = jax.jit(jlosses.mse)
_bce_jit = jax.jit(jlosses.bce_with_logits)


def _labels(rng: np.random.Generator, shape: tuple[int, ...], vocab_size: int, ignored_fraction: float) -> np.ndarray:
    """Random labels with about ``ignored_fraction`` of them set to IGNORE_INDEX (1.0: all)."""
    labels = rng.integers(0, vocab_size, size=shape)
    ignored = rng.random(shape) < ignored_fraction if ignored_fraction < 1 else np.ones(shape, bool)
    return np.where(ignored, IGNORE_INDEX, labels)


@register(
    "cross_entropy",
    ({"ignored_fraction": 0.3, "label_smoothing": 0.0}, {"ignored_fraction": 0.3, "label_smoothing": 0.1},
     {"scale": 1e4}, {"scale": 1e4, "label_smoothing": 0.1}, {"offset": 1e3},
     {"ignored_fraction": 1.0, "label_smoothing": 0.1}, {"batch_shape": (1,), "vocab_size": 2}),
)
def cross_entropy_case(
    rng: np.random.Generator, dtype: Any, ignored_fraction: float = 0.0, label_smoothing: float = 0.0,
    scale: float = 2.0, offset: float = 0.0, batch_shape: tuple[int, ...] = (2, 4), vocab_size: int = 7,
) -> CaseData:
    """logits = offset + scale * N(0, 1); ``scale=1e4`` saturates the softmax (probabilities
    exactly 0 or 1); a large ``offset`` checks that float32 keeps its digits, i.e. that the row max
    is subtracted before anything else. (Finite differences need ``offset <~ 1e3``: a step of
    1e-6 on a logit of 1e4 is only resolved to ~2e-6 relative in float64.)"""
    logits = (offset + scale * rng.standard_normal((*batch_shape, vocab_size))).astype(dtype)
    labels = _labels(rng, batch_shape, vocab_size, ignored_fraction)
    kw = {"ignore_index": IGNORE_INDEX, "label_smoothing": label_smoothing}
    return CaseData(
        params={},
        inputs={"logits": logits},
        ref_forward=lambda p, i: rlosses.cross_entropy_forward(i["logits"], labels, **kw),
        ref_backward=lambda p, c, dy: ({"logits": rlosses.cross_entropy_backward(c, dy)}, {}),
        jax_forward=lambda p, i: _cross_entropy_jit(i["logits"], labels, **kw),
    )


@register("mse", ({}, {"shape": (1,)}))
def mse_case(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...] = (2, 3, 4)) -> CaseData:
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    return CaseData(
        params={},
        inputs={"pred": pred},
        ref_forward=lambda p, i: rlosses.mse_forward(i["pred"], target),
        ref_backward=lambda p, c, dy: ({"pred": rlosses.mse_backward(c, dy)}, {}),
        jax_forward=lambda p, i: _mse_jit(i["pred"], target),
    )


@register("bce_with_logits", ({}, {"soft": True}, {"scale": 1e4}, {"scale": 30.0, "soft": True}))
def bce_with_logits_case(
    rng: np.random.Generator, dtype: Any, scale: float = 2.0, soft: bool = False,
    shape: tuple[int, ...] = (3, 5),
) -> CaseData:
    """Binary targets, or ``soft`` probabilities in [0, 1]; ``scale`` 1e4 saturates the sigmoid."""
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    targets = (rng.random(shape) if soft else rng.random(shape) < 0.5).astype(dtype)
    return CaseData(
        params={},
        inputs={"logits": logits},
        ref_forward=lambda p, i: rlosses.bce_with_logits_forward(i["logits"], targets),
        ref_backward=lambda p, c, dy: ({"logits": rlosses.bce_with_logits_backward(c, dy)}, {}),
        jax_forward=lambda p, i: _bce_jit(i["logits"], targets),
    )
