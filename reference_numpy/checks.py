"""Checks at public boundaries: a bad argument raises ``ValueError`` saying what was expected.

These run on NumPy arrays and on JAX arrays alike (they only look at ``shape`` and ``dtype``;
value checks are skipped for JAX tracers, whose values are unknown at trace time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_tracer(x: Any) -> bool:
    """True for a JAX tracer (no concrete value under jit); checked by type name so this module
    needs no jax import."""
    return "Tracer" in type(x).__name__


def shape_str(shape: Sequence[Any]) -> str:
    """Render ``(B, T, 4)``-style expected shapes."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_array(
    name: str,
    x: Any,
    shape: Sequence[int | str | None] | None = None,
    *,
    ndim: int | Sequence[int] | None = None,
    kind: str | None = None,
    dtype: Any = None,
) -> None:
    """Check ``x`` has the expected rank / shape / dtype kind.

    ``shape`` entries may be ints (must match), or strings / None (any size; the string is the
    dimension's name used in the message). ``kind`` is ``"float"``, ``"int"`` or ``"bool"``.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    xshape = tuple(x.shape)
    if shape is not None:
        ok = len(xshape) == len(shape) and all(
            not isinstance(s, int) or s == d for s, d in zip(shape, xshape)
        )
        if not ok:
            raise ValueError(f"{name} must have shape {shape_str(shape)}, got {shape_str(xshape)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if len(xshape) not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {shape_str(xshape)}"
            )
    dname = str(x.dtype)
    if kind == "float" and dname not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array, got dtype {dname}")
    if kind == "int" and not (dname.startswith("int") or dname.startswith("uint")):
        raise ValueError(f"{name} must be an integer array (token ids), got dtype {dname}")
    if kind == "bool" and dname != "bool":
        raise ValueError(f"{name} must be a boolean array, got dtype {dname}")
    if dtype is not None and dname != (str(dtype) if str(dtype) == "bfloat16" else np.dtype(dtype).name):
        raise ValueError(f"{name} must have dtype {dtype}, got {dname}")


def check_ids(name: str, ids: Any, vocab_size: int, shape: Sequence[int | str | None] | None = None) -> None:
    """Token ids: an integer array with every value in ``[0, vocab_size)``."""
    check_array(name, ids, shape, kind="int")
    if is_tracer(ids) or np.size(ids) == 0:
        return
    a = np.asarray(ids)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {vocab_size}), found id {bad}")


def check_same_dtype(**arrays: Any) -> None:
    """All named arrays share one dtype (the reference never silently upcasts)."""
    dtypes = {k: str(v.dtype) for k, v in arrays.items() if v is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}={d}" for k, d in dtypes.items())
        raise ValueError(f"arrays must share one dtype, got {listing}")


def check_divides(name_a: str, a: int, name_b: str, b: int) -> None:
    """``b`` must divide ``a`` (e.g. kv heads must divide query heads)."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{name_b} ({b}) must be a positive divisor of {name_a} ({a})")
