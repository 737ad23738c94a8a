"""Every numerical tolerance the project uses, in one place, with the reason for each.

Errors are *normwise*: ``max_abs = max|a - b|`` and ``rel = max|a - b| / max(max|b|, TINY)``.
Normwise rather than elementwise, because an elementwise relative error is unbounded for
entries that happen to be near zero while the computation is perfectly accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TINY = 1e-30


@dataclass(frozen=True)
class Tolerance:
    """A pass/fail bound on the normwise relative error (and an absolute floor)."""

    rel: float  # bound on max|a-b| / max|b|
    abs: float  # pass anyway when max|a-b| <= abs (for outputs that are ~0 everywhere)

    def passes(self, max_abs: float, rel: float) -> bool:
        return bool(rel <= self.rel or max_abs <= self.abs)


# Reference layer vs JAX layer, same parameters and inputs.
#  float64: both sides do the same arithmetic in a different order; the error is a few ulps
#    (2.2e-16) times a condition number of at most ~1e3 for our small layers -> 1e-10 leaves
#    four orders of margin yet still catches any genuinely different formula (those give >1e-6).
#  float32: eps is 1.2e-7; reductions over up to a few hundred terms plus exp/erf/rsqrt
#    differences between NumPy and XLA give ~1e-6; 2e-5 keeps margin without hiding a bug (a
#    wrong formula gives >=1e-3).
LAYER_PARITY = {
    "float64": Tolerance(rel=1e-10, abs=1e-13),
    "float32": Tolerance(rel=2e-5, abs=1e-6),
}

# Whole models (issue 3): more layers compose, so float32 rounding accumulates further.
MODEL_PARITY = {
    "float64": Tolerance(rel=1e-9, abs=1e-12),
    "float32": Tolerance(rel=1e-4, abs=1e-5),
}

# Parameters after a few AdamW steps driven by each side's own gradients (model families).
#  float64: the gradients agree to ~1e-12, and Adam's update is smooth away from g = 0, so the
#    model tolerance holds.
#  float32: Adam divides by sqrt(v) ~ |g|: an entry whose gradient is as small as the float32
#    rounding of the gradient itself (~1e-7 of the leaf's scale) gets an O(1)-wrong update of size
#    ~lr. Such entries are few, so normwise the leaf is off by ~1e-4 (observed up to 3e-4 with
#    lr = 1e-2 after 5 steps); 2e-3 still fails any real bug (a wrong gradient moves every
#    entry by ~lr, i.e. rel ~1e-1).
TRAJECTORY_PARITY = {
    "float64": Tolerance(rel=1e-9, abs=1e-12),
    "float32": Tolerance(rel=2e-3, abs=1e-5),
}

# Reference optimizer vs optax, per step, float64: same formulas, different op order.
OPTIMIZER_PARITY = Tolerance(rel=1e-10, abs=1e-14)

# Hand-written backward vs central finite differences, float64.
#  Central differences have truncation error O(h^2 |f'''|) ~ 1e-12 and rounding error
#  O(eps |f| / h) ~ 1e-10 for h = 1e-6, so a correct backward lands near 1e-9; 1e-6 catches a
#  wrong derivative (which is off by O(1)) with a wide margin.
GRADCHECK_REL = 1e-6
GRADCHECK_STEP = 1e-6


def tolerance_for(table: dict[str, Tolerance], dtype: object) -> Tolerance:
    """Look up a dtype's tolerance (``np.float32``, ``"float64"``, a jax dtype...)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {name}; known: {sorted(table)}") from None


def normwise_error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(max_abs, rel)`` of ``a`` against reference ``b`` computed in float64."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {b64.shape}")
    if a64.size == 0:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a64 - b64)))
    scale = float(np.max(np.abs(b64)))
    return max_abs, max_abs / max(scale, TINY)
