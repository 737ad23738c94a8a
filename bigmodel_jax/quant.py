"""Weight-only quantisation in JAX: the twin of ``reference_numpy.quant`` (read its docstring for
the equations, the int4 range and packing, the group-size rule and which axes are contracted).

``QuantizedWeight`` is the reference's own class, registered here as a pytree: ``q`` and
``scale`` are children (so ``jit``, ``lax.scan`` over a stacked L axis, ``device_put`` and
sharding see two arrays), ``bits``, ``group_size``, ``axes`` and ``dtype`` are static. A quantised
tree therefore goes through the models' one forward unchanged: the layers read weights through
``dense`` (matmuls, via ``bigmodel_jax.perf.einsum``) and ``take_rows`` (lookups), which
dequantise at use, inside the jitted step.

``qdot`` is the speed path for a batch-1 decoding step: with per-output-channel int8 scales
``x @ (q * s) = (x @ q) * s`` exactly (s is constant along the contraction), so the product can
read the int8 codes instead of a dequantised copy. ``mode="w8a8"`` also quantises the activation
rows to int8 and multiplies int8 x int8 -> int32. Measurements: ``benchmarks/results/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference_numpy.quant import DEFAULT_EXCLUDE, quantize_plan
from reference_numpy.qweight import BITS, QMAX, QuantizedWeight, check_axes, is_quantized, resolve_group_size

jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["q", "scale"], meta_fields=["bits", "group_size", "axes", "dtype"]
)

QDOT_MODES = ("dequant", "int8", "w8a8")


def _codes(w: jax.Array, scale: jax.Array, qmax: int) -> jax.Array:
    safe = jnp.where(scale == 0, jnp.ones_like(scale), scale)
    return jnp.clip(jnp.round(w / safe), -qmax, qmax)


def _check_weight(w: Any) -> jax.Array:
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim < 1:
        raise ValueError(f"the weight must be a floating-point array of rank >= 1, got {w.dtype} {w.shape}")
    return w


def quantize_int8(w: Any, axes: Sequence[int] = (0,)) -> QuantizedWeight:
    """Twin of ``reference_numpy.quant.quantize_int8``: s = max|w| / 127 per output channel."""
    w = _check_weight(w)
    axes = check_axes(w.shape, axes)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) * (1 / QMAX[8])
    q = _codes(w, scale, QMAX[8]).astype(jnp.int8)
    return QuantizedWeight(q, scale.astype(w.dtype), 8, 0, axes, jnp.dtype(w.dtype).name)


def _split_groups(a: jax.Array, axis: int, g: int) -> jax.Array:
    ax = axis % a.ndim
    return a.reshape(*a.shape[:ax], a.shape[ax] // g, g, *a.shape[ax + 1:])


def pack_int4(codes: jax.Array, axis: int) -> jax.Array:
    """Twin of the reference's ``pack_int4``: index 2i low nibble, 2i + 1 high, code + 8."""
    ax = axis % codes.ndim
    if codes.shape[ax] % 2:
        raise ValueError(f"int4 packing needs an even length along axis {axis}, got shape {codes.shape}")
    u = (codes.astype(jnp.int16) + 8).astype(jnp.uint8)
    pairs = u.reshape(*u.shape[:ax], u.shape[ax] // 2, 2, *u.shape[ax + 1:])
    lo, hi = jnp.take(pairs, 0, axis=ax + 1), jnp.take(pairs, 1, axis=ax + 1)
    return lo | (hi << 4)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """uint8 (..., K / 2, ...) -> int8 codes (..., K, ...)."""
    ax = axis % packed.ndim
    lo = (packed & 0x0F).astype(jnp.int8) - 8
    hi = (packed >> 4).astype(jnp.int8) - 8
    both = jnp.stack([lo, hi], axis=ax + 1)
    return both.reshape(*packed.shape[:ax], packed.shape[ax] * 2, *packed.shape[ax + 1:])


def quantize_int4(w: Any, axes: Sequence[int] = (0,), group_size: int | None = None) -> QuantizedWeight:
    """Twin of ``reference_numpy.quant.quantize_int4``: codes in [-7, 7], one scale per group."""
    w = _check_weight(w)
    axes = check_axes(w.shape, axes)
    ax = axes[-1]
    k = w.shape[ax]
    if k % 2:
        raise ValueError(f"int4 needs an even contraction length to pack two codes per byte; axis {ax} of "
                         f"shape {w.shape} has {k} (quantise this weight to int8 instead)")
    g = resolve_group_size(k, group_size)
    gax = ax % w.ndim + 1
    wg = _split_groups(w, ax, g)
    scale = jnp.max(jnp.abs(wg), axis=gax, keepdims=True) * (1 / QMAX[4])
    q = _codes(wg, scale, QMAX[4]).reshape(w.shape)
    return QuantizedWeight(pack_int4(q, ax), jnp.squeeze(scale, gax).astype(w.dtype), 4, g, axes,
                           jnp.dtype(w.dtype).name)


def quantize(w: Any, bits: int, axes: Sequence[int] = (0,), group_size: int | None = None) -> QuantizedWeight:
    if bits == 8:
        return quantize_int8(w, axes)
    if bits == 4:
        return quantize_int4(w, axes, group_size)
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def dequantize(qw: QuantizedWeight) -> jax.Array:
    """W_hat = q * s in ``qw.dtype`` (inside ``jit`` XLA fuses this into the consumer's producer
    chain; the codes are what is read from memory)."""
    if not is_quantized(qw):
        raise TypeError(f"dequantize needs a QuantizedWeight, got {type(qw).__name__}")
    dtype = jnp.dtype(qw.dtype)
    scale = jnp.asarray(qw.scale).astype(dtype)
    if qw.bits == 8:
        return jnp.asarray(qw.q).astype(dtype) * scale
    ax = qw.axes[-1]
    codes = unpack_int4(jnp.asarray(qw.q), ax).astype(dtype)
    grouped = _split_groups(codes, ax, qw.group_size)
    return (grouped * jnp.expand_dims(scale, ax % codes.ndim + 1)).reshape(codes.shape)


def dense(w: Any) -> Any:
    """``dequantize(w)`` for a quantised leaf, else ``w``: where a layer reads a weight."""
    return dequantize(w) if is_quantized(w) else w


def take_rows(table: Any, ids: jax.Array) -> jax.Array:
    """``jnp.take(table, ids, axis=0, mode="fill")`` for a plain or quantised (rows, D) table; a
    quantised one gathers code and scale rows and dequantises only those (out-of-range ids give
    NaN scales, hence NaN rows, as the plain lookup's fill does)."""
    if not is_quantized(table):
        return jnp.take(table, ids, axis=0, mode="fill")
    if table.axes != (-1,):
        raise ValueError(f"a quantised lookup table must contract over its last axis (axes (-1,)), got {table.axes}")
    rows = QuantizedWeight(jnp.take(table.q, ids, axis=0, mode="clip"),
                           jnp.take(table.scale, ids, axis=0, mode="fill"),
                           table.bits, table.group_size, table.axes, table.dtype)
    return dequantize(rows)


def concatenate(ws: Sequence[Any], axis: int) -> Any:
    """``jnp.concatenate(ws, axis)`` for plain arrays, or for quantised weights of one format
    along an output axis (codes and scales side by side): the fused q / k / v kernel of the
    decoding layout (``bigmodel_jax.generation.layout``)."""
    if not any(is_quantized(w) for w in ws):
        return jnp.concatenate(ws, axis=axis)
    first = ws[0]
    fmt = (first.bits, first.group_size, first.axes, first.dtype) if is_quantized(first) else None
    if any(not is_quantized(w) or (w.bits, w.group_size, w.axes, w.dtype) != fmt for w in ws):
        raise ValueError("concatenate needs all weights quantised alike (bits, group size, axes, dtype), got "
                         f"{[(w.bits, w.group_size, w.axes) if is_quantized(w) else 'float' for w in ws]}")
    neg = axis - first.ndim if axis >= 0 else axis
    if neg in first.axes:
        raise ValueError(f"cannot concatenate quantised weights along their contraction axis {axis}")
    return QuantizedWeight(jnp.concatenate([w.q for w in ws], axis=axis),
                           jnp.concatenate([w.scale for w in ws], axis=axis), *fmt)


def transpose(w: Any, order: Sequence[int]) -> Any:
    """``jnp.transpose(w, order)`` for a plain or quantised weight (codes and scales permuted
    alike, the contraction axes renumbered): the decoding layout's ``rows``."""
    if not is_quantized(w):
        return jnp.transpose(w, order)
    n = w.ndim
    new_axes = tuple(order.index(a % n) - n for a in w.axes)
    if w.bits == 4 and new_axes[-1] != max(new_axes):
        raise ValueError(f"transpose {tuple(order)} would move the int4 group axis before another contraction axis")
    return QuantizedWeight(jnp.transpose(w.q, order), jnp.transpose(w.scale, order), w.bits, w.group_size,
                           tuple(sorted(new_axes)), w.dtype)


# --------------------------------------------------------------------------------------------
# the int8 speed path


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row activation quantisation: x (..., K) -> int8 codes (..., K), scales (..., 1)."""
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) * (1 / QMAX[8])
    return _codes(x, s, QMAX[8]).astype(jnp.int8), s


def qdot(x: jax.Array, qw: QuantizedWeight, mode: str = "int8") -> jax.Array:
    """y = x @ W_hat for a (K, N) int8 weight quantised along K: (..., K) -> (..., N).

    ``"dequant"``: x @ (q * s). ``"int8"``: (x @ q) * s, the dot reads int8 codes (converted in
    the dot). ``"w8a8"``: x quantised per row to int8 (scale t), (x_q @ q) in int32, times t * s:
    an extra rounding of the activations (~0.4% of each row's max)."""
    if mode not in QDOT_MODES:
        raise ValueError(f"mode must be one of {QDOT_MODES}, got {mode!r}")
    if qw.bits != 8 or qw.axes != (-2,) or qw.ndim != 2:
        raise ValueError(f"qdot needs an int8 (K, N) weight quantised along K, got bits {qw.bits}, axes {qw.axes}, "
                         f"shape {qw.shape}")
    if x.shape[-1] != qw.shape[0]:
        raise ValueError(f"x must have shape (..., {qw.shape[0]}), got {tuple(x.shape)}")
    s = qw.scale[0].astype(x.dtype)  # (N,)
    if mode == "dequant":
        return x @ dequantize(qw).astype(x.dtype)
    if mode == "int8":
        y = jax.lax.dot_general(x, qw.q.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        return y * s
    xq, t = quantize_rows(x)
    acc = jax.lax.dot_general(xq, qw.q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(x.dtype) * t.astype(x.dtype) * s


# --------------------------------------------------------------------------------------------
# whole trees


def _walk(tree: Any, path: str, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _walk(v, f"{path}/{k}" if path else k, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_walk(v, f"{path}/{i}" if path else str(i), fn) for i, v in enumerate(tree)]
    return fn(path, tree)


def quantize_tree(tree: Any, bits: int, *, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                  int8_keep: Sequence[str] | None = None, group_size: int | None = None) -> Any:
    """Twin of ``reference_numpy.quant.quantize_tree`` (same plan, same codes) on JAX arrays."""
    plan = quantize_plan(tree, bits, exclude=exclude, int8_keep=int8_keep, group_size=group_size)

    def q(path: str, leaf: Any) -> Any:
        b, axes = plan[path]
        if b is None:
            return leaf
        gs = None
        if b == 4:
            k = leaf.shape[axes[-1]]
            gs = group_size if group_size is not None and k % group_size == 0 else None
        return quantize(leaf, b, axes, gs)

    return _walk(tree, "", q)


def dequantize_tree(tree: Any) -> Any:
    return jax.tree.map(dense, tree, is_leaf=is_quantized)


def to_numpy(tree: Any) -> Any:
    """A (quantised) tree with NumPy leaves, for the reference or for saving."""
    return jax.tree.map(np.asarray, tree)


__all__ = [
    "QDOT_MODES", "QuantizedWeight", "concatenate", "dense", "dequantize", "dequantize_tree", "is_quantized", "pack_int4",
    "qdot", "quantize", "quantize_int4", "quantize_int8", "quantize_rows", "quantize_tree", "take_rows",
    "to_numpy", "transpose", "unpack_int4",
]
