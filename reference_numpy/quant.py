"""Weight-only quantisation of whole parameter trees, plus everything of ``reference_numpy.qweight``
(the per-weight math: read its docstring for the equations, ranges, packing and group sizes).

``quantize_tree(params, bits)`` replaces every matmul / lookup weight by a ``QuantizedWeight``;
``contraction_axes`` finds which axes a matmul sums over from the logical axis names of
``reference_numpy.configs``; norms (and biases, which are vectors) stay as they are, and with
int4 the vocabulary head / tied embedding stays int8 (``DEFAULT_INT8_KEEP``). The models run a
quantised tree through their one forward: the layers read weights via ``dense`` / ``take_rows``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from reference_numpy.configs import axes_for_path
from reference_numpy.qweight import (  # noqa: F401  (re-exported)
    BITS, DEFAULT_EXCLUDE, DEFAULT_GROUP, DEFAULT_INT8_KEEP, QMAX, QuantizedWeight, default_group_size,
    dense, dequantize, is_quantized, pack_int4, quantize, quantize_int4, quantize_int8, quantized_matmul,
    quantized_matmul_backward, take_rows, unpack_int4,
)


# --------------------------------------------------------------------------------------------
# whole parameter trees


def contraction_axes(path: str, ndim: int, stacked: bool | None = None) -> tuple[int, ...] | None:
    """The contraction axes (negative) of the matmul weight at ``path`` ("layers/mlp/up/kernel")
    with ``ndim`` dims, or None when the leaf is not a matmul / lookup weight (norms, biases, cls
    token, unknown leaves). ``stacked``: a leading L axis; default: "layers/" in the path."""
    if path.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
        return None  # biases (even (H, E) ones), norm scales, cls token: not matmul weights
    stacked = "layers/" in f"/{path}" if stacked is None else stacked
    names = axes_for_path(path, ndim, stacked)
    if names is None:
        return None
    own = names[1:] if stacked else names  # the unstacked leaf's axes
    if len(own) < 2:
        return None
    n = len(own)
    if path.endswith("embedding"):
        return (-1,)  # (rows, D): x @ E^T contracts D; a lookup reads rows
    if own[0] == "heads" and own[1] == "head_dim":
        return (-n, -n + 1)  # attention out (H, E, D)
    return (-n,)  # (In, *Out)


def _walk(tree: Any, path: str, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _walk(v, f"{path}/{k}" if path else k, fn) for k, v in tree.items()}
    if isinstance(tree, list):  # the decoding layout's per-layer list
        return [_walk(v, f"{path}/{i}" if path else str(i), fn) for i, v in enumerate(tree)]
    return fn(path, tree)


def quantize_plan(tree: Any, bits: int, *, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                  int8_keep: Sequence[str] | None = None, group_size: int | None = None) -> dict[str, tuple]:
    """What ``quantize_tree`` does to each leaf, as {path: (bits or None, axes)}: None keeps the
    leaf as it is. ``int8_keep`` (int4 only; default ``DEFAULT_INT8_KEEP``) names leaves kept at 8
    bits; an int4 leaf whose innermost contraction length is odd also falls back to int8."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    int8_keep = DEFAULT_INT8_KEEP if int8_keep is None else int8_keep
    for p in (*exclude, *int8_keep):
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad exclude / int8_keep pattern {p!r}: {e}") from None
    plan: dict[str, tuple] = {}

    def decide(path: str, leaf: Any) -> None:
        shape = tuple(getattr(leaf, "shape", ()))
        axes = contraction_axes(path, len(shape))
        if axes is None or is_quantized(leaf) or np.dtype(leaf.dtype).kind != "f" \
                or any(re.search(p, path) for p in exclude):
            plan[path] = (None, ())
            return
        b = bits
        if b == 4 and (any(re.search(p, path) for p in int8_keep) or shape[axes[-1]] % 2):
            b = 8
        plan[path] = (b, axes)

    _walk(tree, "", decide)
    return plan


def quantize_tree(tree: Any, bits: int, *, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                  int8_keep: Sequence[str] | None = None, group_size: int | None = None) -> Any:
    """Every matmul / lookup weight of a parameter tree (nested dicts, our leaf names) as a
    ``QuantizedWeight`` (``quantize_plan`` says which and how); other leaves unchanged. An int4
    ``group_size`` that does not divide a leaf's contraction length falls back, for that leaf,
    to ``default_group_size``."""
    plan = quantize_plan(tree, bits, exclude=exclude, int8_keep=int8_keep, group_size=group_size)

    def q(path: str, leaf: Any) -> Any:
        b, axes = plan[path]
        if b is None:
            return leaf
        gs = None
        if b == 4:
            k = leaf.shape[axes[-1]]
            gs = group_size if group_size is not None and k % group_size == 0 else None
        return quantize(np.asarray(leaf), b, axes, gs)

    return _walk(tree, "", q)


def dequantize_tree(tree: Any) -> Any:
    """Every ``QuantizedWeight`` leaf replaced by its dequantised array."""
    return _walk(tree, "", lambda _, leaf: dense(leaf))


def tree_nbytes(tree: Any) -> int:
    """Bytes of every leaf (codes + scales for quantised ones)."""
    total = 0

    def add(_: str, leaf: Any) -> None:
        nonlocal total
        total += leaf.nbytes if is_quantized(leaf) else int(np.asarray(leaf).nbytes)

    _walk(tree, "", add)
    return total


def quantized_bits(tree: Any) -> dict[str, int]:
    """{path: bits} of the quantised leaves (what ``quantize_tree`` chose)."""
    out: dict[str, int] = {}
    _walk(tree, "", lambda p, leaf: out.__setitem__(p, leaf.bits) if is_quantized(leaf) else None)
    return out


def max_error_bound(qw: QuantizedWeight) -> float:
    """Largest |W - W_hat| allowed by the rounding: half a step, max(scale) / 2."""
    return float(np.max(np.asarray(qw.scale))) / 2 if np.size(qw.scale) else 0.0


__all__ = [
    "BITS", "DEFAULT_EXCLUDE", "DEFAULT_GROUP", "DEFAULT_INT8_KEEP", "QMAX", "QuantizedWeight",
    "contraction_axes", "default_group_size", "dense", "dequantize", "dequantize_tree", "is_quantized",
    "max_error_bound", "pack_int4", "quantize", "quantize_int4", "quantize_int8", "quantize_plan",
    "quantize_tree", "quantized_bits", "quantized_matmul", "quantized_matmul_backward", "take_rows",
    "tree_nbytes", "unpack_int4",
]
