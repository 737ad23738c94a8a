"""Inverted dropout with an explicit keep-mask, so the reference and JAX see the same mask.

    y = x * mask / (1 - rate)        mask: True = keep, drawn with P(keep) = 1 - rate

The ``1 / (1 - rate)`` scale keeps ``E[y] = x``, so evaluation is plain identity. Drawing the
mask is separate from applying it (``dropout_mask``), which is what lets a test draw one mask and
feed it to both implementations. The mask may be broadcast over axes of ``x`` (e.g. one mask per
(B, 1, D) shared across T) but must not enlarge ``x``.

``rate == 0`` is exactly the identity (``y is x``) whatever the mask says: training code passes a
mask of ones then, and skipping the multiply keeps evaluation bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference_numpy.checks import check_array, shape_str


def check_rate(rate: float) -> None:
    """Shared by both implementations: 0 <= rate < 1 (rate 1 would divide by zero)."""
    if not (np.isscalar(rate) and 0.0 <= rate < 1.0):
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")


def check_mask(mask: Any, x: Any) -> None:
    """``mask`` is boolean and broadcasts to exactly ``x.shape``."""
    check_array("mask", mask, kind="bool")
    try:
        out = np.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
    except ValueError:
        out = None
    if out != tuple(x.shape):
        raise ValueError(
            f"mask must have x's shape {shape_str(x.shape)} (or broadcast to it), got {shape_str(mask.shape)}"
        )


def dropout_mask(rng: np.random.Generator, shape: Sequence[int], rate: float) -> np.ndarray:
    """A boolean keep-mask of ``shape``; each entry True with probability ``1 - rate``."""
    check_rate(rate)
    return rng.random(tuple(shape)) >= rate


def dropout_forward(x: np.ndarray, mask: np.ndarray, rate: float) -> tuple[np.ndarray, Any]:
    """x: (...), mask: bool broadcastable to x.shape -> y: (...) = x * mask / (1 - rate)."""
    check_array("x", x, kind="float")
    check_mask(mask, x)
    check_rate(rate)
    if rate == 0:
        return x, None
    keep = (mask * (1.0 / (1.0 - rate))).astype(x.dtype)  # 0 or 1/(1 - rate), in x's dtype
    return x * keep, keep


def dropout_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    """dy: (...) -> dx: (...) = dy * mask / (1 - rate)."""
    keep = cache
    return dy if keep is None else dy * keep
