"""``einsum`` for the reference's two-operand tensor contractions, as one BLAS call on views.

``np.einsum`` without ``optimize`` runs its own single-threaded C loop instead of BLAS, which
makes it the bulk of a reference training step. ``optimize=True`` hands the product to BLAS but
first copies both operands into its own layout; for the per-head attention products
(``BTKGE,BSKE->BKGTS`` and friends) those transposing copies cost more than the multiply itself.
Numbers: ``benchmarks/results/README.md``. Here every letter is classed as

    batch       in a, b and the output      -> leading stack axes of ``np.matmul``
    free a / b  in one operand and the output -> rows of a / columns of b
    contracted  in a and b only              -> the inner (summed) axis

and each operand is transposed into ``(batch..., rows, inner)`` / ``(batch..., inner, cols)`` as a
*view*. ``np.matmul`` passes views whose matrices have a unit stride on one axis straight to BLAS
(a transposed matrix is BLAS's ``trans`` flag), so the per-head products read q, k, v where
they lie; merging several free or contracted letters into one axis copies only when their
strides do not allow a view. The result is returned as a view in the requested letter order.
The sums are the same; BLAS picks their order (float64 agreement with ``np.einsum`` is ~1e-16).

Specs outside that pattern (a letter summed within one operand, repeated letters) fall back to
``np.einsum(..., optimize=True)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from reference_numpy.qweight import dense


class _Plan(NamedTuple):
    a_axes: tuple[int, ...]  # transpose of a into (batch, free a, contracted)
    b_axes: tuple[int, ...]  # transpose of b into (batch, contracted, free b)
    n_batch: int
    n_free_a: int
    n_free_b: int
    out_axes: tuple[int, ...]  # transpose of (batch, free a, free b) into the output's order


@lru_cache(maxsize=256)
def _plan(spec: str) -> _Plan | None:
    try:
        ins, out = spec.replace(" ", "").split("->")
        sa, sb = ins.split(",")
    except ValueError:
        return None
    letters = set(sa) | set(sb)
    if (len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out)
            or not set(out) <= letters
            or any(c not in sb and c not in out for c in sa)
            or any(c not in sa and c not in out for c in sb)):
        return None
    batch = [c for c in out if c in sa and c in sb]
    free_a = [c for c in out if c in sa and c not in sb]
    free_b = [c for c in out if c in sb and c not in sa]
    contracted = [c for c in sa if c in sb and c not in out]
    order = batch + free_a + free_b
    return _Plan(
        a_axes=tuple(sa.index(c) for c in batch + free_a + contracted),
        b_axes=tuple(sb.index(c) for c in batch + contracted + free_b),
        n_batch=len(batch), n_free_a=len(free_a), n_free_b=len(free_b),
        out_axes=tuple(order.index(c) for c in out),
    )


def einsum(spec: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.einsum(spec, a, b)`` as one (batched) BLAS product (see the module docstring). A
    quantised weight ``b`` (``reference_numpy.quant``) is dequantised here, at use."""
    plan = _plan(spec)
    a, b = np.asarray(a), np.asarray(dense(b))
    if plan is None or a.ndim != len(plan.a_axes) or b.ndim != len(plan.b_axes):
        return np.einsum(spec, a, b, optimize=True)
    at, bt = a.transpose(plan.a_axes), b.transpose(plan.b_axes)
    nb, nfa, nfb = plan.n_batch, plan.n_free_a, plan.n_free_b
    batch, free_a = at.shape[:nb], at.shape[nb:nb + nfa]
    inner, free_b = at.shape[nb + nfa:], bt.shape[bt.ndim - nfb:]
    if bt.shape[:nb] != batch or bt.shape[nb:bt.ndim - nfb] != inner:
        return np.einsum(spec, a, b, optimize=True)  # mismatched sizes: NumPy's own error
    rows, cols, k = math.prod(free_a), math.prod(free_b), math.prod(inner)
    product = np.matmul(at.reshape(*batch, rows, k), bt.reshape(*batch, k, cols))
    return product.reshape(*batch, *free_a, *free_b).transpose(plan.out_axes)


def rows_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w`` for x: (..., In) and w: (In, Out) -> (..., Out), as one GEMM over all rows.

    ``np.matmul`` treats a 3-D x as a stack and calls BLAS once per leading index (B GEMMs of T
    rows); flattening the leading axes first gives one GEMM of B*T rows, which BLAS blocks and
    threads better (``benchmarks/results/README.md``). Same sums.
    """
    w = dense(w)  # a quantised weight is dequantised at use
    rows = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    return (rows @ w).reshape(*x.shape[:-1], w.shape[-1])
