"""Finite-difference gradient checking for hand-written backward passes.

Point it at any forward/backward pair:

    >>> report = gradcheck_layer(linear_forward, linear_backward, params, x, rng=rng)
    >>> assert report.ok, report

Method: central differences ``(f(θ + h v) - f(θ - h v)) / 2h`` on the scalar
``J = sum(y * dy)`` for a fixed random ``dy``, whose exact gradient is what backward returns
for that ``dy``. Leaves with at most ``max_elements`` entries are checked element by element;
larger leaves along ``n_directions`` random unit directions ``v`` (checking ``<g, v>``).

Error, per leaf, normwise: ``rel = max|analytic - numeric| / max(max|numeric|, max|analytic|,
tiny)``; a leaf passes when ``rel <= tol`` (default ``tolerances.GRADCHECK_REL``), or when the
absolute error is below the finite-difference noise floor ``4 eps max(|J|, 1) / h`` (~1e-9):
rounding in ``J`` makes smaller differences unmeasurable, which matters for leaves whose
gradient is itself tiny (a saturated softmax). Run it in float64: in float32 the rounding
error ``eps * |J| / h`` swamps any useful step size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference_numpy.tolerances import GRADCHECK_REL, GRADCHECK_STEP, TINY
from reference_numpy.tree import Tree, tree_get, tree_leaves_with_path, tree_map


@dataclass
class GradcheckRow:
    name: str
    max_abs: float
    rel: float
    passed: bool
    method: str  # "elementwise" or "k directions"


@dataclass
class GradcheckReport:
    rows: list[GradcheckRow] = field(default_factory=list)
    tol: float = GRADCHECK_REL

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'tensor':<40} {'max abs err':>12} {'rel err':>12}  method"]
        for r in self.rows:
            flag = "OK" if r.passed else "NOT OK"
            lines.append(f"{r.name:<40} {r.max_abs:12.3e} {r.rel:12.3e}  {r.method:<14} {flag}")
        lines.append(f"tolerance: rel <= {self.tol:.1e}")
        return "\n".join(lines)


def _copy_tree(tree: Tree) -> Tree:
    return tree_map(lambda a: np.array(a, copy=True), tree)


def gradcheck(
    fun: Callable[[Tree], float],
    inputs: Tree,
    grads: Tree,
    *,
    step: float = GRADCHECK_STEP,
    tol: float = GRADCHECK_REL,
    max_elements: int = 48,
    n_directions: int = 6,
    rng: np.random.Generator | None = None,
) -> GradcheckReport:
    """Compare ``grads`` (a tree like ``inputs``) with central differences of scalar ``fun``.

    ``inputs`` must be float64 (the method needs the precision). ``fun(inputs)`` must not
    mutate its argument.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    work = _copy_tree(inputs)
    report = GradcheckReport(tol=tol)
    noise_floor = 4 * np.finfo(np.float64).eps * max(abs(float(fun(work))), 1.0) / step
    for path, leaf in tree_leaves_with_path(inputs):
        leaf = np.asarray(leaf)
        if leaf.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs; {path} is {leaf.dtype}")
        g = np.asarray(tree_get(grads, path), dtype=np.float64)
        if g.shape != leaf.shape:
            raise ValueError(f"gradient {path} has shape {g.shape}, expected {leaf.shape}")
        target = tree_get(work, path)
        if leaf.size <= max_elements:
            numeric = np.empty(leaf.size)
            flat = target.reshape(-1)
            for i in range(leaf.size):  # per element: this is a test utility, not a hot path
                orig = flat[i]
                flat[i] = orig + step
                fp = fun(work)
                flat[i] = orig - step
                fm = fun(work)
                flat[i] = orig
                numeric[i] = (fp - fm) / (2 * step)
            analytic = g.reshape(-1)
            method = "elementwise"
        else:
            numeric = np.empty(n_directions)
            analytic = np.empty(n_directions)
            for k in range(n_directions):
                v = rng.standard_normal(leaf.shape)
                v /= np.linalg.norm(v)
                target += step * v
                fp = fun(work)
                target -= 2 * step * v
                fm = fun(work)
                target += step * v
                numeric[k] = (fp - fm) / (2 * step)
                analytic[k] = float(np.sum(g * v))
            np.copyto(target, leaf)  # undo any rounding drift
            method = f"{n_directions} directions"
        diff = float(np.max(np.abs(analytic - numeric))) if numeric.size else 0.0
        scale = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.max(np.abs(analytic), initial=0.0)))
        rel = diff / max(scale, TINY) if diff > 0 else 0.0
        report.rows.append(GradcheckRow(path, diff, rel, rel <= tol or diff <= noise_floor, method))
    return report


def gradcheck_layer(
    forward: Callable[..., tuple[Any, Any]],
    backward: Callable[..., tuple[Any, Any]],
    params: Tree,
    x: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    **kwargs: Any,
) -> GradcheckReport:
    """Check a ``forward(params, x, **kwargs) -> (y, cache)`` /
    ``backward(params, cache, dy) -> (dx, grads)`` pair on ``dx`` and every parameter."""
    rng = np.random.default_rng(0) if rng is None else rng
    y, cache = forward(params, x, **kwargs)
    dy = rng.standard_normal(np.shape(y))
    dx, grads = backward(params, cache, dy)

    def fun(tree: Tree) -> float:
        out, _ = forward(tree["params"], tree["x"], **kwargs)
        return float(np.sum(out * dy))

    return gradcheck(fun, {"params": params, "x": x}, {"params": grads, "x": dx}, rng=rng)
