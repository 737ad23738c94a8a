"""Inverted dropout with an explicit keep-mask: the JAX twin of ``reference_numpy.layers.dropout``.

    y = x * mask / (1 - rate)        mask: True = keep, P(keep) = 1 - rate

Masks come from an explicit PRNG key (``dropout_mask``), never hidden state, so a test can
draw one mask with NumPy and feed it to both sides. ``rate`` is a static Python float.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from reference_numpy.checks import check_array
from reference_numpy.layers.dropout import check_mask, check_rate


def dropout_mask(key: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
    """A boolean keep-mask of ``shape``, each entry True with probability ``1 - rate``."""
    check_rate(rate)
    return jax.random.bernoulli(key, 1.0 - rate, tuple(shape))


def dropout(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """x: (...), mask: bool broadcastable to x.shape -> (...) = x * mask / (1 - rate).

    ``rate == 0`` returns ``x`` unchanged, as the reference.
    """
    check_array("x", x, kind="float")
    check_mask(mask, x)
    check_rate(rate)
    if rate == 0:
        return x
    return x * (mask.astype(x.dtype) * (1.0 / (1.0 - rate)))
