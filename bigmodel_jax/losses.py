"""Losses, the JAX twins of ``reference_numpy.losses``: same semantics, built on optax.

Dims: V classes; ``...`` any leading axes. Each returns a 0-d array in the input dtype and is
jit-able (``ignore_index`` and ``label_smoothing`` are static Python numbers).

Cross-entropy follows PyTorch (mean over labels != ``ignore_index``, smoothed target
``(1 - eps) onehot + eps / V``), except that when every label is ignored the loss is 0.0 with a
zero gradient, not NaN. Label smoothing is written as ``(1 - eps) nll + eps (lse - mean(logits))``
rather than ``optax.softmax_cross_entropy`` against a dense smoothed target: the same value, but
it never materialises a (..., V) target array, which at V = 50k is as large as the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from reference_numpy.checks import check_array, check_same_dtype
from reference_numpy.losses import IGNORE_INDEX, check_bce_args, check_cross_entropy_args


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
) -> jax.Array:
    """logits: (..., V) float, labels: (...) ints -> mean loss over non-ignored labels, 0-d."""
    check_cross_entropy_args(logits, labels, ignore_index, label_smoothing)
    eps = label_smoothing
    valid = labels != ignore_index  # (...)
    # An ignored label (IGNORE_INDEX) would gather out of bounds (NaN); read class 0 and mask it out.
    safe = jnp.where(valid, labels, 0)
    # Shift by the row max first (CE is shift-invariant, so no gradient flows through it): then
    # lse(shifted) and shifted[label] are O(spread), not O(offset), and a row like 1e4 + N(0, 1)
    # keeps its float32 digits, exactly as the reference computes it.
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # (..., V)
    per_row = optax.softmax_cross_entropy_with_integer_labels(shifted, safe)  # (...) nll
    if eps:
        smooth = jax.nn.logsumexp(shifted, axis=-1) - jnp.mean(shifted, axis=-1)  # mean_v(-logp_v)
        per_row = (1 - eps) * per_row + eps * smooth
    n_valid = jnp.sum(valid).astype(logits.dtype)
    # `where`, not a multiply, so an ignored row's value never reaches the sum or its gradient.
    return jnp.sum(jnp.where(valid, per_row, 0)) / jnp.maximum(n_valid, 1)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """pred, target: (...) same shape and dtype -> mean((pred - target)^2), 0-d."""
    check_array("pred", pred, kind="float")
    check_array("target", target, tuple(pred.shape), kind="float")
    check_same_dtype(pred=pred, target=target)
    return jnp.mean(optax.squared_error(pred, target))


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits, targets (in [0, 1]): (...) -> mean binary cross-entropy of sigmoid(logits), 0-d."""
    check_bce_args(logits, targets)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
