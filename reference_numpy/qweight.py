"""Weight-only quantisation of one weight: the reference math (int8 per output channel, int4
group-wise). Whole parameter trees: ``reference_numpy.quant`` (which re-exports this module; the
layers import this one, which needs nothing of the package, so ``configs`` can import the layers).

Dims: K the contraction (input) length of a weight, N its output channels, g the int4 group size,
G = K / g groups per output channel. Every weight is symmetric (no zero point)::

    int8, per output channel n:    s[n]    = max_k |W[k, n]| / 127
                                   q[k, n] = clip(round(W[k, n] / s[n]), -127, 127)
    int4, per group j of g inputs: s[j, n] = max_{k in group j} |W[k, n]| / 7
                                   q[k, n] = clip(round(W[k, n] / s[k // g, n]), -7, 7)
    dequantise:                    W_hat[k, n] = q[k, n] * s[(group of k), n]
    quantised matmul:              y = x @ W_hat            (..., K) -> (..., N)

A scale is computed as ``max|W| * (1/127)`` (the reciprocal rounded to the weight's dtype): XLA
rewrites a division by a constant into that product, so both sides round it identically.
``round`` is round-half-to-even (``np.round``; XLA rounds the same way). A channel or group of
zeros gets scale 0 and codes 0. int4 uses [-7, 7], not [-8, 7]: symmetric, so ``-W`` quantises
to ``-q``, at the cost of one unused code (llama.cpp's q4_0 uses -8 with scale max/-8).
Two int4 codes are packed per uint8 along the contraction axis, the even index in the low
nibble, each stored as ``code + 8`` (so 1..15); the contraction length must be even.

Group size: ``group_size=None`` picks 128 when it divides K, else the largest divisor of K that is
<= 128 (K = 64 -> 64, K = 96 -> 96, K = 100 -> 100 ... K = 300 -> 100). An explicit group size
must divide K (a ValueError says which sizes would).

Which axes are contracted: weights keep their own layout (so a lookup still gathers rows and the
models' einsum strings are unchanged); ``reference_numpy.quant.contraction_axes`` says, from the leaf's logical axis
names (``reference_numpy.configs.axes_for_path``), which axes a matmul sums over:

    kernel (In, Out), (D, H, E)     axis 0 (D / In); every other axis is an output channel
    attention out kernel (H, E, D)  axes H and E; int8 scales per D; int4 groups along E
    embedding table (V, D)          axis D (the tied head computes x @ E^T; a lookup reads rows)

Axes are stored counted from the end (negative), so a leading stacked L axis (``layers/...``)
does not move them and a ``lax.scan`` slice of a quantised leaf is still a valid one.

Quantised weights are frozen: inference only. There is no gradient for ``q`` or the scales (a
rounding step has zero derivative almost everywhere); the gradient of ``y = x @ W_hat`` with
respect to ``x`` is ``dy @ W_hat^T`` (``quantized_matmul_backward``), which is what the existing
layer backwards compute on ``quant.dequantize_tree(params)`` (they read ``kernel.T``; the
forwards take quantised leaves directly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


BITS = (4, 8)
QMAX = {8: 127, 4: 7}  # symmetric code range [-QMAX, QMAX]
DEFAULT_GROUP = 128  # int4 group size where it divides K
# Leaves kept in float by default: norms (a handful of scalars that set every activation's scale).
# Only "kernel" and "embedding" leaves are candidates at all (biases, cls token stay float);
# patterns are regular expressions searched in the "a/b/c" leaf path.
DEFAULT_EXCLUDE = (r"norm",)
# With int4, leaves matching these stay int8: the vocabulary head (its rounding error lands
# directly on the logits) and, when tied, the embedding table that is that head.
DEFAULT_INT8_KEEP = (r"lm_head", r"(^|/)embed/embedding$", r"word/embedding$", r"target_embed")


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantised weight leaf. ``q``: int8 codes (bits 8) in the weight's shape, or uint8 with two
    int4 codes per byte (bits 4), the contraction axis ``axes[-1]`` halved. ``scale``: float, the
    weight's shape with the contraction axes reduced to 1 (int8) or the group axis reduced to
    K / group_size (int4). ``axes``: the contraction axes, negative. ``dtype``: the dtype the
    weight is dequantised to (the original's). The same class on both sides; the JAX side
    registers it as a pytree (``q``, ``scale`` children; the rest static)."""

    q: Any  # int8 (..., K, ...) or uint8 (..., K / 2, ...)
    scale: Any  # float (..., 1 or K / g, ...)
    bits: int  # 8 or 4
    group_size: int  # int4: inputs per scale; int8: 0 (one scale per output channel)
    axes: tuple[int, ...]  # contraction axes, counted from the end (-1 = last)
    dtype: str  # dequantised dtype name, e.g. "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantised) shape."""
        s = list(self.q.shape)
        if self.bits == 4:
            s[self.axes[-1]] *= 2
        return tuple(s)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    def __getitem__(self, index: Any) -> QuantizedWeight:
        """Index the leading (stacked, L) axis as an array would: ``qw[i]`` is layer i's weight
        (the reference's layer loop slices stacked leaves so). Only an int or a slice on axis 0,
        and never on a contraction axis."""
        if not isinstance(index, (int, np.integer, slice)):
            raise TypeError(f"a QuantizedWeight indexes only its leading axis with an int or slice, got {index!r}")
        if -len(self.q.shape) in self.axes:
            raise ValueError(f"axis 0 of this weight (shape {self.shape}) is a contraction axis; it cannot be indexed")
        return QuantizedWeight(self.q[index], self.scale[index], self.bits, self.group_size, self.axes, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales (what the quantised leaf stores)."""
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def check_axes(shape: tuple[int, ...], axes: Sequence[int]) -> tuple[int, ...]:
    """``axes`` as sorted distinct negative ints valid for ``shape``."""
    n = len(shape)
    out = []
    for a in axes:
        if int(a) != a or not -n <= a < n:
            raise ValueError(f"axes must be ints in [-{n}, {n}) for a weight of shape {shape}, got {tuple(axes)}")
        out.append(int(a) - n if a >= 0 else int(a))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"axes must name at least one axis, each once, got {tuple(axes)}")
    return tuple(sorted(out))


def default_group_size(k: int) -> int:
    """128 if it divides ``k``, else the largest divisor of ``k`` not above 128."""
    return next(g for g in range(min(DEFAULT_GROUP, k), 0, -1) if k % g == 0)


def resolve_group_size(k: int, group_size: int | None) -> int:
    """``group_size`` checked to divide ``k``, or the default for ``k`` when None."""
    if group_size is None:
        return default_group_size(k)
    if int(group_size) != group_size or group_size < 1 or k % group_size:
        divisors = [g for g in range(1, min(k, 1024) + 1) if k % g == 0]
        raise ValueError(f"group_size must divide the contraction length {k}; divisors up to 1024 are "
                         f"{divisors}, got {group_size!r}")
    return int(group_size)


def _check_weight(w: Any) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind != "f" or w.ndim < 1:
        raise ValueError(f"the weight must be a floating-point array of rank >= 1, got {w.dtype} {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("the weight must be finite (it holds NaN or inf): quantising it would hide that")
    return w


def _codes(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """round(w / scale) clipped to [-qmax, qmax]; a zero scale (all-zero channel) gives code 0."""
    safe = np.where(scale == 0, np.ones_like(scale), scale)
    return np.clip(np.round(w / safe), -qmax, qmax)


def quantize_int8(w: Any, axes: Sequence[int] = (0,)) -> QuantizedWeight:
    """w (any float shape) -> int8 codes with one scale per output channel (every index of the
    axes not in ``axes``): ``s = max|w| / 127`` over the contraction ``axes``."""
    w = _check_weight(w)
    axes = check_axes(w.shape, axes)
    scale = np.max(np.abs(w), axis=axes, keepdims=True) * (1 / QMAX[8])  # (..., 1, ...)
    q = _codes(w, scale, QMAX[8]).astype(np.int8)
    return QuantizedWeight(q, scale.astype(w.dtype), 8, 0, axes, w.dtype.name)


def _split_groups(a: np.ndarray, axis: int, g: int) -> np.ndarray:
    """(..., K, ...) -> (..., K / g, g, ...) along ``axis`` (negative)."""
    shape = a.shape
    ax = axis % a.ndim
    return a.reshape(*shape[:ax], shape[ax] // g, g, *shape[ax + 1:])


def pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    """int codes in [-8, 7] (..., K, ...) -> uint8 (..., K / 2, ...): index 2i in the low nibble,
    2i + 1 in the high one, each stored as code + 8."""
    ax = axis % codes.ndim
    if codes.shape[ax] % 2:
        raise ValueError(f"int4 packing needs an even length along axis {axis}, got shape {codes.shape}")
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    lo = np.take(u, np.arange(0, u.shape[ax], 2), axis=ax)
    hi = np.take(u, np.arange(1, u.shape[ax], 2), axis=ax)
    return (lo | (hi << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``pack_int4``: uint8 (..., K / 2, ...) -> int8 codes (..., K, ...)."""
    ax = axis % packed.ndim
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    both = np.stack([lo, hi], axis=ax + 1)  # (..., K / 2, 2, ...)
    return both.reshape(*packed.shape[:ax], packed.shape[ax] * 2, *packed.shape[ax + 1:])


def quantize_int4(w: Any, axes: Sequence[int] = (0,), group_size: int | None = None) -> QuantizedWeight:
    """w -> int4 codes in [-7, 7], one scale per group of ``group_size`` consecutive inputs along
    the innermost contraction axis ``axes[-1]`` (per every other index), packed two per byte."""
    w = _check_weight(w)
    axes = check_axes(w.shape, axes)
    ax = axes[-1]
    k = w.shape[ax]
    if k % 2:
        raise ValueError(f"int4 needs an even contraction length to pack two codes per byte; axis {ax} of "
                         f"shape {w.shape} has {k} (quantise this weight to int8 instead)")
    g = resolve_group_size(k, group_size)
    wg = _split_groups(w, ax, g)  # (..., G, g, ...); the g axis is ax + 1 of the new array
    gax = ax % w.ndim + 1
    scale = np.max(np.abs(wg), axis=gax, keepdims=True) * (1 / QMAX[4])  # (..., G, 1, ...)
    q = _codes(wg, scale, QMAX[4]).reshape(w.shape)
    return QuantizedWeight(pack_int4(q, ax), np.squeeze(scale, gax).astype(w.dtype), 4, g, axes, w.dtype.name)


def quantize(w: Any, bits: int, axes: Sequence[int] = (0,), group_size: int | None = None) -> QuantizedWeight:
    """``quantize_int8`` or ``quantize_int4`` by ``bits``."""
    if bits == 8:
        return quantize_int8(w, axes)
    if bits == 4:
        return quantize_int4(w, axes, group_size)
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """W_hat = q * s, in ``qw.dtype`` and the logical shape."""
    if not is_quantized(qw):
        raise TypeError(f"dequantize needs a QuantizedWeight, got {type(qw).__name__}")
    dtype = np.dtype(qw.dtype)
    scale = np.asarray(qw.scale, dtype)
    if qw.bits == 8:
        return np.asarray(qw.q).astype(dtype) * scale
    ax = qw.axes[-1]
    codes = unpack_int4(np.asarray(qw.q), ax).astype(dtype)  # (..., K, ...)
    grouped = _split_groups(codes, ax, qw.group_size)  # (..., G, g, ...)
    s = np.expand_dims(scale, ax % codes.ndim + 1)  # (..., G, 1, ...)
    return (grouped * s).reshape(codes.shape)


def dense(w: Any) -> Any:
    """The array a layer multiplies by: ``dequantize(w)`` for a quantised leaf, else ``w``
    unchanged. Layers call this where they read a weight (dequantise at use)."""
    return dequantize(w) if is_quantized(w) else w


def take_rows(table: Any, ids: np.ndarray) -> np.ndarray:
    """``table[ids]`` for a plain or quantised (rows, D) table; a quantised one dequantises only the
    looked-up rows (its scales are per row, or per row and group of D)."""
    if not is_quantized(table):
        return np.asarray(table)[ids]
    if table.axes != (-1,):
        raise ValueError(f"a quantised lookup table must contract over its last axis (axes (-1,)), got {table.axes}")
    ids = np.asarray(ids)
    return dequantize(QuantizedWeight(np.asarray(table.q)[ids], np.asarray(table.scale)[ids], table.bits,
                                      table.group_size, table.axes, table.dtype))


def quantized_matmul(x: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """y = x @ W_hat for a (K, N) weight quantised along axis 0: (..., K) -> (..., N)."""
    if qw.axes != (-2,) or len(qw.shape) != 2:
        raise ValueError(f"quantized_matmul needs a (K, N) weight quantised along K (axes (-2,)), got "
                         f"shape {qw.shape}, axes {qw.axes}")
    w = dequantize(qw)  # (K, N)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape (..., {w.shape[0]}), got {x.shape}")
    return x @ w


def quantized_matmul_backward(qw: QuantizedWeight, dy: np.ndarray) -> np.ndarray:
    """dy (..., N) -> dx = dy @ W_hat^T (..., K). No gradient for the frozen q and scales."""
    return dy @ dequantize(qw).T
