"""Losses, each a forward/backward pair returning a scalar (0-d array in the input dtype).

Dims: V vocabulary / classes; ``...`` any leading axes (B, T, ...); N = number of elements
averaged over (MSE, BCE).

``*_forward(prediction, target, ...) -> (loss, cache)`` and ``*_backward(cache, dloss) ->
dprediction``. Targets (integer labels, regression targets, binary targets) are constants: no
gradient is returned for them.

Cross-entropy (PyTorch semantics, ``reduction="mean"``)::

    logp = log_softmax(logits)                                  (..., V)
    t    = (1 - eps) * onehot(label) + eps / V                  label smoothing eps
    l_n  = -sum_v t_v logp_v = (1 - eps) nll_n + eps * mean_v(-logp_v)
    loss = sum_n valid_n l_n / sum_n valid_n                    valid = label != ignore_index
    dlogits_n = dloss * valid_n / n_valid * (softmax_n - t_n)

When *every* label is ignored, ``n_valid = 0`` and PyTorch returns 0/0 = NaN; we define the
loss as 0.0 with a zero gradient instead, so an all-padding micro-batch cannot poison a
gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference_numpy.checks import is_tracer, check_array, check_same_dtype, shape_str
from reference_numpy.layers.activations import sigmoid

IGNORE_INDEX = -100  # the label every loss skips (PyTorch's CrossEntropyLoss default, as in HF)


def check_labels(
    labels: Any, n_classes: int, name: str = "labels", ignore_index: int | None = IGNORE_INDEX,
    shape: Sequence[int | str | None] | None = None,
) -> None:
    """Integer class labels: each in ``[0, n_classes)`` or equal to ``ignore_index`` (None: no
    label is ignored). The one label check of every loss, on both sides and in every family.

    ``shape`` (optional) is checked as ``check_array`` does. Values are checked when they are
    known: a JAX tracer has none, so under ``jit`` the caller checks the concrete labels on the
    host before tracing (the models' ``loss_and_grad`` and the training step do). Cheap when
    the labels are valid: one min and one max.
    """
    check_array(name, labels, shape, kind="int")
    if is_tracer(labels) or np.size(labels) == 0:
        return
    lab = np.asarray(labels).astype(np.int64, copy=False)  # uint labels compare safely with -100
    if lab.min() >= 0 and lab.max() < n_classes:
        return
    bad = (lab < 0) | (lab >= n_classes)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = f"[0, {n_classes})" + ("" if ignore_index is None else f" or equal ignore_index ({ignore_index})")
        raise ValueError(f"{name} must lie in {allowed}, found label {int(lab[where])} "
                         f"at {name}[{', '.join(map(str, where))}]")


def check_cross_entropy_args(logits: Any, labels: Any, ignore_index: int, label_smoothing: float) -> None:
    """Shapes, dtypes and label values (values only when known). Shared by both implementations."""
    check_array("logits", logits, kind="float")
    if len(logits.shape) < 1:
        raise ValueError("logits must have shape (..., V), got a scalar")
    check_array("labels", labels, kind="int")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have logits' leading shape {shape_str(logits.shape[:-1])}, got {shape_str(labels.shape)}"
        )
    if not (np.isscalar(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    check_labels(labels, logits.shape[-1], "labels", ignore_index)


def cross_entropy_forward(
    logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
) -> tuple[np.ndarray, Any]:
    """logits: (..., V) float, labels: (...) ints -> mean loss over non-ignored labels, 0-d.

    Stable for logits of any finite size (the row max is subtracted before ``exp``).
    """
    check_cross_entropy_args(logits, labels, ignore_index, label_smoothing)
    labels = np.asarray(labels)
    eps = label_smoothing
    valid = labels != ignore_index  # (...)
    safe = np.where(valid, labels, 0)  # ignored rows read class 0, then get weight 0
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (..., V), max 0
    e = np.exp(shifted)
    s = e.sum(axis=-1, keepdims=True)  # (..., 1), in [1, V]
    log_s = np.log(s)[..., 0]  # (...)
    nll = log_s - np.take_along_axis(shifted, safe[..., None], axis=-1)[..., 0]  # -logp[label]
    per_row = nll
    if eps:
        per_row = (1 - eps) * nll + eps * (log_s - shifted.mean(axis=-1))  # mean_v(-logp_v)
    n_valid = int(valid.sum())
    loss = np.sum(np.where(valid, per_row, 0)) / max(n_valid, 1)  # 0 (not 0/0) when none is valid
    weight = (valid / max(n_valid, 1)).astype(logits.dtype)  # (...) each row's share of the mean
    return np.asarray(loss, dtype=logits.dtype), (e / s, safe, weight, eps)


def cross_entropy_backward(cache: Any, dloss: Any) -> np.ndarray:
    """dloss: scalar -> dlogits: (..., V) = dloss * weight * (softmax - t)."""
    p, safe, weight, eps = cache
    V = p.shape[-1]
    dloss = np.asarray(dloss).astype(p.dtype)  # the scalar cotangent, in the logits' dtype
    t = np.full_like(p, eps / V)  # (..., V) smoothed target: eps / V everywhere ...
    np.put_along_axis(t, safe[..., None], (1 - eps) + eps / V, axis=-1)  # ... plus 1 - eps at the label
    return (p - t) * (weight * dloss)[..., None]


def mse_forward(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, Any]:
    """pred, target: (...) same shape and dtype -> mean((pred - target)^2), 0-d."""
    check_array("pred", pred, kind="float")
    check_array("target", target, tuple(pred.shape), kind="float")
    check_same_dtype(pred=pred, target=target)
    err = pred - target
    return np.asarray(np.mean(err * err), dtype=pred.dtype), err


def mse_backward(cache: Any, dloss: Any) -> np.ndarray:
    """dloss: scalar -> dpred: (...) = dloss * 2 (pred - target) / N."""
    err = cache
    dloss = np.asarray(dloss).astype(err.dtype)
    return err * (dloss * (2.0 / max(err.size, 1)))


def check_bce_args(logits: Any, targets: Any) -> None:
    """Same shape and dtype; target values in [0, 1] (when known). Shared by both implementations."""
    check_array("logits", logits, kind="float")
    check_array("targets", targets, tuple(logits.shape), kind="float")
    check_same_dtype(logits=logits, targets=targets)
    if is_tracer(targets) or np.size(targets) == 0:
        return
    t = np.asarray(targets)
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"targets must lie in [0, 1], found values in [{t.min()}, {t.max()}]")


def bce_with_logits_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, Any]:
    """logits, targets (in [0, 1]): (...) -> mean binary cross-entropy of sigmoid(logits), 0-d.

    Per element ``-t log s(x) - (1 - t) log(1 - s(x)) = max(x, 0) - x t + log1p(exp(-|x|))``,
    which never exponentiates a positive number (stable for |x| = 1e4).
    """
    check_bce_args(logits, targets)
    per = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    return np.asarray(np.mean(per), dtype=logits.dtype), (logits, targets)


def bce_with_logits_backward(cache: Any, dloss: Any) -> np.ndarray:
    """dloss: scalar -> dlogits: (...) = dloss * (sigmoid(x) - t) / N."""
    logits, targets = cache
    dloss = np.asarray(dloss).astype(logits.dtype)
    return (sigmoid(logits) - targets) * (dloss / max(logits.size, 1))
