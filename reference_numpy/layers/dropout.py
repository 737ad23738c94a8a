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


# --------------------------------------------------------------------------------------------
# mask trees: a whole model's masks, one nested dict (shared by the model families)


def check_mask_tree(masks: Any, shapes: dict[str, Any], name: str = "masks") -> None:
    """``masks`` has exactly the keys of ``shapes`` (a nested dict of shape tuples) and every leaf
    is a boolean array of exactly its shape. Only shapes and dtypes are read, so this runs on JAX
    arrays and tracers too."""
    if not isinstance(masks, dict):
        raise ValueError(f"{name} must be a dict of boolean masks, got {type(masks).__name__}")
    if set(masks) != set(shapes):
        raise ValueError(
            f"{name} must have the keys {sorted(shapes)}, got {sorted(masks)} "
            "(build it with the model's dropout_masks)"
        )
    for key, want in shapes.items():
        path = f"{name}/{key}"
        if isinstance(want, dict):
            check_mask_tree(masks[key], want, path)
        else:
            check_array(path, masks[key], tuple(want), kind="bool")


def dropout_mask_tree(rng: np.random.Generator, shapes: dict[str, Any], rate: float) -> dict[str, Any]:
    """A tree of keep-masks shaped like ``shapes`` (nested dict of shape tuples), each leaf drawn
    by ``dropout_mask`` in sorted-path order (the NumPy trainer's masks; the JAX models draw
    their own from a key)."""
    check_rate(rate)
    return {k: dropout_mask_tree(rng, v, rate) if isinstance(v, dict) else dropout_mask(rng, v, rate)
            for k, v in sorted(shapes.items())}


def resolve_mask_tree(
    masks: dict[str, Any] | None, shapes: dict[str, Any], rate: float, name: str = "masks"
) -> dict[str, Any] | None:
    """What a model forward does with its optional ``masks`` argument: None stays None
    (evaluation); a tree is checked against ``shapes`` and returned, or None when ``rate == 0``
    (then dropout is the identity whatever the masks say, which keeps attention, whose prob
    dropout multiplies by the mask at any rate, consistent with the residual dropout)."""
    if masks is None:
        return None
    check_mask_tree(masks, shapes, name)
    check_rate(rate)
    return masks if rate > 0 else None


def optional_dropout_forward(x: np.ndarray, mask: np.ndarray | None, rate: float) -> tuple[np.ndarray, Any]:
    """``dropout_forward``, or the identity (cache None; ``dropout_backward`` passes ``dy``
    through) when ``mask`` is None (evaluation)."""
    return (x, None) if mask is None else dropout_forward(x, mask, rate)
