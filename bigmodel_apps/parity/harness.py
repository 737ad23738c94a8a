"""One harness drives finite-difference checks, reference-vs-JAX parity and the parity report.

A *case* builds a layer's parameters and inputs and wraps both implementations behind one
signature (``CaseData``). The scalar that ties forward and backward together is
``J = sum(y * dy)`` for a fixed random cotangent ``dy``: the reference's hand-written backward
returns ``dJ/dθ`` given ``dy``, ``jax.vjp`` returns the same, and finite differences of ``J``
check the reference alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax

from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy import optim as roptim
from reference_numpy.gradcheck import GradcheckReport, gradcheck
from reference_numpy.tolerances import (
    LAYER_PARITY,
    MODEL_PARITY,
    TRAJECTORY_PARITY,
    Tolerance,
    normwise_error,
    tolerance_for,
)
from reference_numpy.tree import Tree, tree_leaves_with_path

# Parity always runs with full-precision matmuls: XLA's default on GPU/TPU uses TF32 / bf16
# passes, which would look like (false) mismatches against float32/float64 NumPy.
MATMUL_PRECISION = "highest"


@dataclass
class CaseData:
    """One concrete instance of a layer, in both implementations.

    ``ref_forward(params, inputs) -> (y, cache)``;
    ``ref_backward(params, cache, dy) -> (dinputs: dict like inputs, grads: tree like params)``;
    ``jax_forward(params, inputs) -> y`` (differentiated with ``jax.vjp``).
    ``inputs`` holds only the differentiable float inputs; ids, masks and options live in the
    closures.
    """

    params: Tree
    inputs: dict[str, np.ndarray]
    ref_forward: Callable[[Tree, dict[str, np.ndarray]], tuple[Any, Any]]
    ref_backward: Callable[[Tree, Any, Any], tuple[dict[str, np.ndarray], Tree]]
    jax_forward: Callable[[Tree, dict[str, Any]], Any]
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: LAYER_PARITY)


@dataclass(frozen=True)
class Case:
    """A registered layer: ``make(rng, dtype, **options) -> CaseData``."""

    name: str
    make: Callable[..., CaseData]
    default_options: tuple[dict[str, Any], ...] = ({},)


REGISTRY: dict[str, Case] = {}


def register(name: str, default_options: tuple[dict[str, Any], ...] = ({},)) -> Callable:
    """Decorator registering ``make`` under ``name`` for tests and the parity report."""

    def deco(make: Callable[..., CaseData]) -> Callable[..., CaseData]:
        if name in REGISTRY:
            raise ValueError(f"parity case {name!r} registered twice")
        REGISTRY[name] = Case(name, make, tuple(default_options))
        return make

    return deco


@dataclass
class Row:
    """One compared quantity: the output or one gradient leaf."""

    quantity: str
    max_abs: float
    rel: float
    tol: Tolerance
    passed: bool


def _cotangent(y: Any, rng: np.random.Generator) -> np.ndarray:
    y = np.asarray(y)
    return rng.standard_normal(y.shape).astype(y.dtype)


def compare(data: CaseData, dtype: Any, *, seed: int = 0) -> list[Row]:
    """Reference vs JAX on ``data``: output, then every input and parameter gradient by name."""
    rng = np.random.default_rng(seed)
    tol = tolerance_for(data.tolerances, dtype)
    y_ref, cache = data.ref_forward(data.params, data.inputs)
    dy = _cotangent(y_ref, rng)
    d_inputs, grads = data.ref_backward(data.params, cache, dy)

    # Strict promotion: a float32 layer that silently computes in float64 (or back) raises.
    with jax.default_matmul_precision(MATMUL_PRECISION), jax.numpy_dtype_promotion("strict"):
        p_j, i_j = to_jax(data.params), to_jax(data.inputs)
        # jit: one compiled program instead of dozens of op-by-op dispatches (much faster on CPU)
        y_jax, vjp = jax.vjp(jax.jit(data.jax_forward), p_j, i_j)
        g_params, g_inputs = vjp(jax.numpy.asarray(dy))

    rows: list[Row] = []

    def add(name: str, got: Any, want: Any) -> None:
        got = np.asarray(got)
        want = np.asarray(want)
        if got.shape != want.shape:
            raise AssertionError(f"{name}: JAX shape {got.shape} vs reference {want.shape}")
        if got.dtype != want.dtype:
            raise AssertionError(f"{name}: JAX dtype {got.dtype} vs reference {want.dtype}")
        max_abs, rel = normwise_error(got, want)
        rows.append(Row(name, max_abs, rel, tol, tol.passes(max_abs, rel)))

    add("output", y_jax, y_ref)
    g_inputs_np = to_numpy(g_inputs) if g_inputs else {}
    if g_inputs_np.keys() != d_inputs.keys():
        raise AssertionError(f"input gradients differ: JAX {sorted(g_inputs_np)} vs reference {sorted(d_inputs)}")
    for name in sorted(d_inputs):
        add(f"d/{name}", g_inputs_np[name], d_inputs[name])
    g_params_np = to_numpy(g_params) if g_params else {}
    ref_leaves = dict(tree_leaves_with_path(grads))
    jax_leaves = dict(tree_leaves_with_path(g_params_np))
    if ref_leaves.keys() != jax_leaves.keys():
        raise AssertionError(
            f"gradient trees differ: only in reference {sorted(ref_leaves.keys() - jax_leaves.keys())},"
            f" only in JAX {sorted(jax_leaves.keys() - ref_leaves.keys())}"
        )
    for path in sorted(ref_leaves):
        add(f"d/params/{path}", jax_leaves[path], ref_leaves[path])
    return rows


def gradcheck_case(data: CaseData, *, seed: int = 0, **kwargs: Any) -> GradcheckReport:
    """Finite differences of ``J = sum(y * dy)`` vs the reference backward (float64 data)."""
    rng = np.random.default_rng(seed)
    y, cache = data.ref_forward(data.params, data.inputs)
    dy = _cotangent(y, rng)
    d_inputs, grads = data.ref_backward(data.params, cache, dy)

    def fun(tree: Tree) -> float:
        out, _ = data.ref_forward(tree["params"], tree["inputs"])
        return float(np.sum(np.asarray(out) * dy))

    return gradcheck(
        fun,
        {"params": data.params, "inputs": data.inputs},
        {"params": grads, "inputs": d_inputs},
        rng=rng,
        **kwargs,
    )


def format_rows(title: str, rows: list[Row]) -> str:
    """A readable table for test failures and the report."""
    lines = [title, f"  {'quantity':<44} {'max abs':>10} {'rel':>10} {'tol':>8}"]
    for r in rows:
        lines.append(
            f"  {r.quantity:<44} {r.max_abs:10.2e} {r.rel:10.2e} {r.tol.rel:8.0e}"
            f"  {'OK' if r.passed else 'NOT OK'}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class TrajectoryCase:
    """A whole model trained a few steps on each side: ``make(dtype) -> (params, ref_lg, jax_lg)``
    where ``*_lg(params) -> (loss, grads)`` close over the batch and config."""

    name: str
    make: Callable[[Any], tuple[Tree, Callable, Callable]]


TRAJECTORIES: dict[str, TrajectoryCase] = {}


def register_trajectory(name: str) -> Callable:
    """Decorator registering a model for the AdamW-trajectory comparison."""

    def deco(make: Callable) -> Callable:
        TRAJECTORIES[name] = TrajectoryCase(name, make)
        return make

    return deco


def adamw_trajectory(
    params: Tree, ref_lg: Callable, jax_lg: Callable, dtype: Any, *, steps: int = 5,
    learning_rate: float = 1e-2, weight_decay: float = 0.1,
) -> list[Row]:
    """Train ``steps`` AdamW steps on both sides (reference optimizer vs optax, each side with its
    own gradients) and compare the loss at every step and every parameter at the end."""
    loss_tol = tolerance_for(MODEL_PARITY, dtype)
    tol = tolerance_for(TRAJECTORY_PARITY, dtype)
    ref_opt = roptim.adamw(learning_rate, weight_decay=weight_decay, mask=roptim.decay_mask)
    jax_opt = optax.adamw(learning_rate, weight_decay=weight_decay, mask=roptim.decay_mask(params))
    r_params, j_params = params, to_jax(params)
    r_state, j_state = ref_opt.init(r_params), jax_opt.init(j_params)
    rows: list[Row] = []
    for step in range(steps):
        r_loss, r_grads = ref_lg(r_params)
        j_loss, j_grads = jax_lg(j_params)
        max_abs, rel = normwise_error(np.asarray(j_loss), np.asarray(r_loss))
        rows.append(Row(f"loss at step {step}", max_abs, rel, loss_tol, loss_tol.passes(max_abs, rel)))
        r_upd, r_state = ref_opt.update(r_grads, r_state, r_params)
        r_params = roptim.apply_updates(r_params, r_upd)
        j_upd, j_state = jax_opt.update(j_grads, j_state, j_params)
        j_params = optax.apply_updates(j_params, j_upd)
    want = dict(tree_leaves_with_path(r_params))
    for path, leaf in tree_leaves_with_path(to_numpy(j_params)):
        max_abs, rel = normwise_error(leaf, want[path])
        rows.append(Row(f"params after {steps}: {path}", max_abs, rel, tol, tol.passes(max_abs, rel)))
    return rows
