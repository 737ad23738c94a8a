"""Reference optimizers and schedules vs optax, step by step, plus their edge cases.

Parity tests run 100 steps on a random parameter tree with fresh random gradients each step
(the same gradients on both sides) and compare every leaf of the parameters after *every* step
within ``tolerances.OPTIMIZER_PARITY`` (float64, normwise per leaf). The JAX trajectory runs as
one jitted ``lax.scan``, so each example costs one compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax import optim as jopt
from reference_numpy import optim as ropt
from reference_numpy import schedules as rsched
from reference_numpy.tolerances import OPTIMIZER_PARITY, normwise_error
from reference_numpy.tree import Tree, tree_get, tree_leaves, tree_leaves_with_path, tree_map

STEPS = 100


def _examples(n: int) -> settings:
    """``n`` examples under the ci profile (12 by default), scaled up by the thorough one.

    Each parity example compiles a fresh optax trajectory (~0.5 s on CPU), so the parity
    tests take fewer than the profile's default to keep this file well under a minute.
    """
    return settings(max_examples=max(1, settings.default.max_examples * n // 12))


# --- trees and gradients -----------------------------------------------------------------------


@st.composite
def tree_shapes(draw: st.DrawFn) -> Tree:
    """A small model-like tree of shapes: kernels (2-D, 3-D), an embedding, 1-D and 2-D biases."""
    d, v, h, e, f = (draw(st.integers(1, 4)) for _ in range(5))
    shapes: Tree = {
        "embed": {"embedding": (v, d)},
        "attn": {"query": {"kernel": (d, h, e)}},
        "mlp": {"up": {"kernel": (d, f), "bias": (f,)}},
        "norm": {"scale": (d,)},
    }
    if draw(st.booleans()):  # an optional (H, E) attention bias: the tree's structure varies too
        shapes["attn"]["query"]["bias"] = (h, e)
    return shapes


def _random_tree(rng: np.random.Generator, shapes: Tree, lead: tuple[int, ...] = (), scale: float = 1.0) -> Tree:
    # Shapes are tuples, which tree_map treats as leaves (only dicts are containers).
    return tree_map(lambda s: scale * rng.standard_normal(lead + s), shapes)


def _make_problem(shapes: Tree, seed: int, grad_scale: float = 1.0) -> tuple[Tree, Tree]:
    """Initial params and ``STEPS`` stacked gradient trees (leading axis = step)."""
    rng = np.random.default_rng(seed)
    params = _random_tree(rng, shapes)
    grads = _random_tree(rng, shapes, lead=(STEPS,), scale=grad_scale)
    return params, grads


def _reference_trajectory(opt: ropt.GradientTransformation, params: Tree, grads: Tree) -> list[Tree]:
    state = opt.init(params)
    out = []
    for t in range(STEPS):
        g = tree_map(lambda x: x[t], grads)
        updates, state = opt.update(g, state, params)
        params = ropt.apply_updates(params, updates)
        out.append(params)
    return out


def _optax_trajectory(opt: optax.GradientTransformation, params: Tree, grads: Tree) -> Tree:
    """Params after each step, stacked along a leading step axis (one compile via ``lax.scan``)."""

    def run(p: Tree, gs: Tree) -> Tree:
        def step(carry: tuple[Tree, Any], g: Tree) -> tuple[tuple[Tree, Any], Tree]:
            p, s = carry
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        return jax.lax.scan(step, (p, opt.init(p)), gs)[1]

    # Every example compiles afresh and runs in milliseconds, so compile time is the test's cost:
    # XLA's backend (LLVM) optimisation level 0 cuts it by about a third. The level changes code
    # generation, not floating-point semantics (XLA:CPU's fast-math is off by default).
    compiled = jax.jit(run).lower(params, grads).compile({"xla_backend_optimization_level": 0})
    return jax.tree.map(np.asarray, compiled(params, grads))


def _assert_same_trajectory(ref_opt: ropt.GradientTransformation, jax_opt: optax.GradientTransformation,
                            params: Tree, grads: Tree, label: str) -> None:
    """Every leaf agrees after every step; on failure print the first bad step and its leaves."""
    ref = _reference_trajectory(ref_opt, params, grads)
    got = _optax_trajectory(jax_opt, params, grads)
    for t in range(STEPS):
        rows, bad = [], False
        for path, want in tree_leaves_with_path(ref[t]):
            assert want.dtype == np.float64, f"{label}: reference leaf {path} became {want.dtype}"
            max_abs, rel = normwise_error(tree_get(got, path)[t], want)
            ok = OPTIMIZER_PARITY.passes(max_abs, rel)
            bad |= not ok
            rows.append(f"  step {t:3d}  {path:<24} max_abs {max_abs:.3e}  rel {rel:.3e}  {'OK' if ok else 'NOT OK'}")
        if bad:
            pytest.fail(f"{label}: reference and optax diverge at step {t} "
                        f"(tolerance rel <= {OPTIMIZER_PARITY.rel:g})\n" + "\n".join(rows))


# --- hyper-parameter strategies ----------------------------------------------------------------

lrs = st.floats(1e-4, 0.3)
betas1 = st.floats(0.0, 0.99)
betas2 = st.floats(0.9, 0.9999)
epss = st.sampled_from([1e-8, 1e-6, 1e-3])
decays = st.floats(0.0, 0.5)
momenta = st.floats(0.0, 0.99)
grad_scales = st.sampled_from([0.01, 1.0, 30.0])  # with clip norms in [0.1, 10]: clip sometimes
clip_norms = st.floats(0.1, 10.0)


def _schedule_kw(draw: Callable[[Any], Any], kind: str) -> dict[str, Any]:
    """Arguments for ``make_schedule(kind, ...)`` (shared by both sides)."""
    peak = draw(st.floats(1e-3, 0.1))
    if kind == "constant":
        return {"value": peak}
    warmup = draw(st.integers(0, 20))
    total = warmup + draw(st.integers(1, 90))  # often ends before step 100: the tail is tested too
    kw = {"peak_value": peak, "warmup_steps": warmup, "decay_steps": total,
          "end_value": draw(st.sampled_from([0.0, 1e-4])), "init_value": draw(st.sampled_from([0.0, 1e-3]))}
    if kind == "warmup_cosine":
        kw["exponent"] = draw(st.sampled_from([1.0, 2.0]))
    return kw


def _build(draw: Callable[[Any], Any], config: str, params: Tree) -> tuple[ropt.GradientTransformation, optax.GradientTransformation]:
    """(reference optimizer, optax optimizer) for one named configuration.

    The optax side is built from optax's own constructors, not from ``make_optimizer``, so these
    tests pin the reference to optax itself.
    """
    if config == "sgd":
        lr = draw(lrs)
        return ropt.sgd(lr), optax.sgd(lr)
    if config in ("sgd_momentum", "sgd_nesterov"):
        lr, mu, nest = draw(lrs), draw(momenta), config == "sgd_nesterov"
        return ropt.sgd(lr, mu, nest), optax.sgd(lr, mu, nest)
    if config == "adam":
        lr, b1, b2, eps = draw(lrs), draw(betas1), draw(betas2), draw(epss)
        eps_root = draw(st.sampled_from([0.0, 1e-12]))
        return ropt.adam(lr, b1, b2, eps, eps_root), optax.adam(lr, b1, b2, eps, eps_root)
    if config in ("adamw_mask_callable", "adamw_mask_tree"):
        lr, b1, b2, eps, wd = draw(lrs), draw(betas1), draw(betas2), draw(epss), draw(decays)
        mask: Any = ropt.decay_mask if config == "adamw_mask_callable" else ropt.decay_mask(params)
        return (ropt.adamw(lr, b1, b2, eps, weight_decay=wd, mask=mask),
                optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask=mask))
    if config == "clip_adam":
        c, lr, b1, b2 = draw(clip_norms), draw(lrs), draw(betas1), draw(betas2)
        return (ropt.chain(ropt.clip_by_global_norm(c), ropt.adam(lr, b1, b2)),
                optax.chain(optax.clip_by_global_norm(c), optax.adam(lr, b1, b2)))
    if config.startswith("schedule_"):
        # optax's adam reads the schedule at its int32 count; jopt.make_schedule keeps that float64.
        kind = config.removeprefix("schedule_")
        kw, b1 = _schedule_kw(draw, kind), draw(betas1)
        return ropt.adam(rsched.make_schedule(kind, **kw), b1), optax.adam(jopt.make_schedule(kind, **kw), b1)
    if config == "multisteps_k3":
        lr, b1, wd = draw(lrs), draw(betas1), draw(decays)
        ref = ropt.MultiSteps(ropt.adamw(lr, b1, weight_decay=wd, mask=ropt.decay_mask), 3)
        # optax accumulates in float32 by default; float64 here so the comparison can be tight.
        jax_ = optax.MultiSteps(optax.adamw(lr, b1, weight_decay=wd, mask=jopt.decay_mask), 3,
                                accumulator_dtype=jnp.float64)
        return ref.gradient_transformation(), jax_.gradient_transformation()
    raise AssertionError(config)


PARITY_CONFIGS = [
    "sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw_mask_callable", "adamw_mask_tree",
    "clip_adam", "schedule_constant", "schedule_warmup_linear", "schedule_warmup_cosine", "multisteps_k3",
]


@pytest.mark.parametrize("config", PARITY_CONFIGS)
@_examples(5)
@given(shapes=tree_shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_reference_matches_optax_every_step(config: str, shapes: Tree, seed: int, data: st.DataObject) -> None:
    grad_scale = data.draw(grad_scales) if config == "clip_adam" else 1.0
    params, grads = _make_problem(shapes, seed, grad_scale)
    ref_opt, jax_opt = _build(data.draw, config, params)
    _assert_same_trajectory(ref_opt, jax_opt, params, grads, config)


# --- make_optimizer: one config, both sides ----------------------------------------------------


@st.composite
def optimizer_configs(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    name = draw(st.sampled_from(ropt.OPTIMIZERS))
    kw: dict[str, Any] = {}
    if name == "sgd":
        kw["momentum"] = draw(st.none() | momenta)
        kw["nesterov"] = kw["momentum"] is not None and draw(st.booleans())
    else:
        kw.update(b1=draw(betas1), b2=draw(betas2), eps=draw(epss))
    if name == "adamw":
        kw.update(weight_decay=draw(decays), decay_mask=draw(st.booleans()))
    kw["clip_norm"] = draw(st.none() | clip_norms)
    kw["accumulate_steps"] = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from([None, *rsched.SCHEDULES]))
    schedule = None if kind is None else {"kind": kind, **_schedule_kw(draw, kind)}
    kw["learning_rate"] = draw(lrs) if schedule is None else None
    return name, kw, schedule


@_examples(5)
@given(config=optimizer_configs(), shapes=tree_shapes(), seed=st.integers(0, 2**16), grad_scale=grad_scales)
def test_make_optimizer_same_trajectory_both_sides(config: Any, shapes: Tree, seed: int, grad_scale: float) -> None:
    name, kw, schedule = config
    params, grads = _make_problem(shapes, seed, grad_scale)
    ref_kw, jax_kw = dict(kw), dict(kw)
    if schedule is not None:
        ref_kw["learning_rate"] = rsched.make_schedule(**schedule)
        jax_kw["learning_rate"] = jopt.make_schedule(**schedule)
    _assert_same_trajectory(ropt.make_optimizer(name, **ref_kw), jopt.make_optimizer(name, **jax_kw),
                            params, grads, f"make_optimizer({name!r}, {kw}, schedule={schedule})")


# --- schedules ---------------------------------------------------------------------------------


def _optax_schedule(kind: str, kw: dict[str, Any]) -> optax.Schedule:
    """optax's own construction, independent of ``bigmodel_jax.optim.make_schedule``."""
    if kind == "constant":
        return optax.constant_schedule(kw["value"])
    if kind == "warmup_linear":
        w, total = kw["warmup_steps"], kw["decay_steps"]
        return optax.join_schedules([optax.linear_schedule(kw["init_value"], kw["peak_value"], w),
                                     optax.linear_schedule(kw["peak_value"], kw["end_value"], total - w)], [w])
    return optax.warmup_cosine_decay_schedule(**kw)


@pytest.mark.parametrize("kind", sorted(rsched.SCHEDULES))
@given(data=st.data())
def test_schedules_match_optax_at_every_step(kind: str, data: st.DataObject) -> None:
    kw = _schedule_kw(data.draw, kind)
    # One length for every example (past the longest decay_steps, 110): eager JAX ops compile
    # once per shape, so a fixed length keeps this test fast.
    steps = np.arange(128)
    want = np.asarray(_optax_schedule(kind, kw)(jnp.asarray(steps, jnp.float64)))  # float count: float64 math
    got_jax = np.asarray(jopt.make_schedule(kind, **kw)(jnp.asarray(steps, jnp.int32)))  # int32 like optax's state
    ref = rsched.make_schedule(kind, **kw)
    got_ref = np.array([ref(int(t)) for t in steps])
    for label, got in (("reference", got_ref), ("bigmodel_jax.make_schedule", got_jax)):
        max_abs, rel = normwise_error(got, np.broadcast_to(want, got.shape))
        worst = int(np.argmax(np.abs(got - want)))
        assert OPTIMIZER_PARITY.passes(max_abs, rel), (
            f"{label} {kind} {kw}: rel {rel:.3e} worst at step {worst}: {got[worst]!r} vs optax {want[worst]!r}")


def test_schedule_shapes_at_landmarks() -> None:
    lin = rsched.warmup_linear_decay_schedule(peak_value=1.0, warmup_steps=10, decay_steps=30, end_value=0.1)
    assert [lin(0), lin(5), lin(10), lin(20), lin(30), lin(99)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    cos = rsched.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=30, end_value=0.1)
    assert [cos(0), cos(10), cos(20), cos(30), cos(99)] == pytest.approx([0.0, 1.0, 0.55, 0.1, 0.1])
    assert rsched.constant_schedule(0.3)(12345) == 0.3


def test_jax_schedule_is_float64_under_int32_count() -> None:
    # Why make_schedule wraps optax: optax's own schedule at an int32 count computes in float32.
    raw = optax.linear_schedule(1.0, 0.1, 7)(jnp.asarray(3, jnp.int32))
    assert raw.dtype == jnp.float32
    ours = jopt.make_schedule("warmup_linear", peak_value=1.0, warmup_steps=0, decay_steps=7, end_value=0.1)
    assert ours(jnp.asarray(3, jnp.int32)).dtype == jnp.float64


# --- explicit behaviour ------------------------------------------------------------------------


def _params(rng: np.random.Generator, dtype: Any = np.float64) -> Tree:
    return {
        "dense": {"kernel": rng.standard_normal((3, 4)).astype(dtype), "bias": rng.standard_normal(4).astype(dtype)},
        "embed": {"embedding": rng.standard_normal((5, 3)).astype(dtype)},
        "norm": {"scale": rng.standard_normal(3).astype(dtype)},
    }


def test_plain_sgd_is_exactly_theta_minus_lr_grad() -> None:
    rng = np.random.default_rng(0)
    params, lr = _params(rng), 0.037
    opt = ropt.sgd(lr)
    state = opt.init(params)
    for _ in range(5):
        grads = tree_map(lambda p: rng.standard_normal(p.shape), params)
        updates, state = opt.update(grads, state, params)
        new = ropt.apply_updates(params, updates)
        want = tree_map(lambda p, g: p - lr * g, params, grads)
        for (path, a), b in zip(tree_leaves_with_path(new), tree_leaves(want)):
            assert np.array_equal(a, b), f"{path}: max diff {np.max(np.abs(a - b))!r}"
        params = new


@pytest.mark.parametrize("name", ["sgd", "sgd_nesterov", "adam", "adamw_clip_accumulate_schedule"])
def test_float32_params_stay_float32(name: str) -> None:
    rng = np.random.default_rng(1)
    params = _params(rng, np.float32)
    opt = {
        "sgd": ropt.sgd(0.1),
        "sgd_nesterov": ropt.sgd(0.1, momentum=0.9, nesterov=True),
        "adam": ropt.adam(1e-2),
        "adamw_clip_accumulate_schedule": ropt.make_optimizer(
            "adamw", rsched.make_schedule("warmup_cosine", init_value=0.0, peak_value=1e-2, warmup_steps=2,
                                          decay_steps=10),
            weight_decay=0.1, clip_norm=0.5, accumulate_steps=2),
    }[name]
    state = opt.init(params)
    for _ in range(4):
        grads = tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        updates, state = opt.update(grads, state, params)
        params = ropt.apply_updates(params, updates)
        for path, leaf in [*tree_leaves_with_path(updates), *tree_leaves_with_path(params)]:
            assert leaf.dtype == np.float32, f"{name}: {path} is {leaf.dtype}"
    for leaf in jax.tree.leaves(state):  # moments and accumulators too (counts are ints)
        if isinstance(leaf, np.ndarray):
            assert leaf.dtype == np.float32, f"{name}: state leaf {leaf.shape} is {leaf.dtype}"


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clip_by_global_norm_clips_to_max_norm(scale: float) -> None:
    rng = np.random.default_rng(2)
    grads = tree_map(lambda p: scale * p, _params(rng))
    max_norm = 1.5
    clipped, _ = ropt.clip_by_global_norm(max_norm).update(grads, ropt.EmptyState())
    before = ropt.global_norm(grads)
    if before >= max_norm:
        assert math.isclose(ropt.global_norm(clipped), max_norm, rel_tol=1e-12)
        # Direction unchanged: one common factor on every leaf.
        for g, c in zip(tree_leaves(grads), tree_leaves(clipped)):
            np.testing.assert_allclose(c, g * (max_norm / before), rtol=1e-13)
    else:
        for g, c in zip(tree_leaves(grads), tree_leaves(clipped)):
            assert np.array_equal(g, c)


@pytest.mark.parametrize("mask_kind", ["callable", "tree", "make_optimizer"])
def test_adamw_mask_decays_only_kernels_and_embeddings(mask_kind: str) -> None:
    # Zero gradients: Adam's direction is 0/(0+eps) = 0, so the only change is θ ← θ − α λ θ.
    params = _params(np.random.default_rng(3))
    lr, wd = 0.1, 0.5
    mask: Any = ropt.decay_mask if mask_kind == "callable" else ropt.decay_mask(params)
    if mask_kind == "make_optimizer":
        ref = ropt.make_optimizer("adamw", lr, weight_decay=wd)
        jax_ = jopt.make_optimizer("adamw", lr, weight_decay=wd)
    else:
        ref, jax_ = ropt.adamw(lr, weight_decay=wd, mask=mask), optax.adamw(lr, weight_decay=wd, mask=mask)
    zeros = tree_map(np.zeros_like, params)
    new_ref = ropt.apply_updates(params, ref.update(zeros, ref.init(params), params)[0])
    jp = jax.tree.map(jnp.asarray, params)
    new_jax = optax.apply_updates(jp, jax_.update(jax.tree.map(jnp.zeros_like, jp), jax_.init(jp), jp)[0])
    decayed = {"dense/kernel", "embed/embedding"}
    for path, p in tree_leaves_with_path(params):
        want = p * (1 - lr * wd) if path in decayed else p
        np.testing.assert_allclose(tree_get(new_ref, path), want, rtol=1e-15, err_msg=f"reference {path}")
        np.testing.assert_allclose(np.asarray(tree_get(new_jax, path)), want, rtol=1e-15, err_msg=f"optax {path}")
        if path not in decayed:
            assert np.array_equal(tree_get(new_ref, path), p), f"{path} must not be decayed"


def test_decay_mask_rule() -> None:
    params = {
        "embed": {"embedding": np.zeros((7, 4))},
        "attn": {"query": {"kernel": np.zeros((4, 2, 2)), "bias": np.zeros((2, 2))}},  # (H, E) bias
        "layers": {"mlp_norm": {"scale": np.zeros((3, 4))}, "up": {"bias": np.zeros((3, 8))}},  # stacked (L, .)
        "head": {"kernel": np.zeros((4, 7)), "bias": np.zeros(7)},
        "gain": np.zeros(4),
    }
    assert ropt.decay_mask(params) == {
        "embed": {"embedding": True},
        "attn": {"query": {"kernel": True, "bias": False}},
        "layers": {"mlp_norm": {"scale": False}, "up": {"bias": False}},
        "head": {"kernel": True, "bias": False},
        "gain": False,
    }
    assert jopt.decay_mask(jax.tree.map(jnp.asarray, params)) == ropt.decay_mask(params)


def test_multisteps_emits_every_k_the_inner_step_on_the_mean_gradient() -> None:
    rng = np.random.default_rng(4)
    params, k, lr = _params(rng), 3, 0.05
    inner = ropt.adam(lr)
    ms = ropt.MultiSteps(inner, every_k_schedule=k)
    state, inner_state = ms.init(params), inner.init(params)
    expected = params
    for window in range(3):
        micro = [tree_map(lambda p: rng.standard_normal(p.shape), params) for _ in range(k)]
        for i, g in enumerate(micro):
            updates, state = ms.update(g, state, params)
            if i < k - 1:
                assert all(np.all(u == 0) for u in tree_leaves(updates)), f"micro-step {i}: update must be 0"
                assert not ms.has_updated(state)
            params = ropt.apply_updates(params, updates)
        assert ms.has_updated(state) and state.gradient_step == window + 1
        mean = tree_map(lambda *gs: sum(gs) / k, *micro)
        step, inner_state = inner.update(mean, inner_state, expected)
        expected = ropt.apply_updates(expected, step)
        for (path, a), b in zip(tree_leaves_with_path(params), tree_leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-13, err_msg=f"window {window} {path}")


# --- bad arguments -----------------------------------------------------------------------------


BAD_ARGUMENTS: list[tuple[str, Callable[[], Any], str]] = [
    ("negative warmup (linear)", lambda: rsched.warmup_linear_decay_schedule(1.0, -1, 10), "warmup_steps"),
    ("negative warmup (cosine)", lambda: rsched.warmup_cosine_decay_schedule(0.0, 1.0, -5, 10), "warmup_steps"),
    ("decay shorter than warmup", lambda: rsched.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps"),
    ("negative transition_begin", lambda: rsched.linear_schedule(1.0, 0.0, 10, -1), "transition_begin"),
    ("negative transition_steps", lambda: rsched.linear_schedule(1.0, 0.0, -10), "transition_steps"),
    ("negative step", lambda: rsched.constant_schedule(1.0)(-1), "step"),
    ("unknown schedule", lambda: rsched.make_schedule("cyclic", value=1.0), "kind"),
    ("missing schedule arg", lambda: rsched.make_schedule("warmup_cosine", peak_value=1.0), "warmup_cosine"),
    ("every_k = 0", lambda: ropt.MultiSteps(ropt.sgd(0.1), 0), "every_k_schedule"),
    ("every_k = -2", lambda: ropt.MultiSteps(ropt.sgd(0.1), -2), "every_k_schedule"),
    ("max_norm = 0", lambda: ropt.clip_by_global_norm(0.0), "max_norm"),
    ("max_norm < 0", lambda: ropt.clip_by_global_norm(-1.0), "max_norm"),
    ("negative learning rate", lambda: ropt.sgd(-0.1), "learning_rate"),
    ("b1 = 1", lambda: ropt.adam(1e-3, b1=1.0), "b1"),
    ("b2 > 1", lambda: ropt.adam(1e-3, b2=1.5), "b2"),
    ("negative eps", lambda: ropt.adam(1e-3, eps=-1e-8), "eps"),
    ("negative weight decay", lambda: ropt.adamw(1e-3, weight_decay=-0.1), "weight_decay"),
    ("momentum = 1", lambda: ropt.sgd(0.1, momentum=1.0), "momentum"),
    ("nesterov without momentum", lambda: ropt.sgd(0.1, nesterov=True), "momentum"),
    ("non-bool mask", lambda: ropt.adamw(1e-3, mask=lambda p: tree_map(lambda x: 1.0, p)).init(
        {"w": np.zeros((2, 2))}), "mask"),
    ("unknown optimizer", lambda: ropt.make_optimizer("lamb", 1e-3), "name"),
    ("weight decay on adam", lambda: ropt.make_optimizer("adam", 1e-3, weight_decay=0.1), "weight_decay"),
    ("momentum on adam", lambda: ropt.make_optimizer("adam", 1e-3, momentum=0.9), "momentum"),
    ("accumulate_steps = 0", lambda: ropt.make_optimizer("sgd", 1e-3, accumulate_steps=0), "accumulate_steps"),
    ("clip_norm = 0", lambda: ropt.make_optimizer("sgd", 1e-3, clip_norm=0.0), "clip_norm"),
    ("jax: accumulate_steps = 0", lambda: jopt.make_optimizer("sgd", 1e-3, accumulate_steps=0), "accumulate_steps"),
    ("jax: clip_norm < 0", lambda: jopt.make_optimizer("adam", 1e-3, clip_norm=-1.0), "clip_norm"),
    ("jax: negative learning rate", lambda: jopt.make_optimizer("adam", -1e-3), "learning_rate"),
    ("jax: negative warmup", lambda: jopt.make_schedule("warmup_linear", peak_value=1.0, warmup_steps=-1,
                                                        decay_steps=10), "warmup_steps"),
    ("jax: unknown schedule", lambda: jopt.make_schedule("step"), "kind"),
]


@pytest.mark.parametrize("label,build,argument", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_them(label: str, build: Callable[[], Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build()


def test_adamw_update_without_params_says_so() -> None:
    opt = ropt.adamw(1e-3)
    params = {"w": np.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))
