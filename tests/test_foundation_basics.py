"""Activations, softmax, linear, trees and boundary checks: edge cases and bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax.layers import activations as jact
from bigmodel_jax.layers.linear import Linear, linear
from bigmodel_apps.parity.cases.basic import activation_case, linear_case, softmax_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.checks import check_array, check_ids
from reference_numpy.layers import activations as ract
from reference_numpy.layers.linear import init_linear, linear_forward
from reference_numpy.tree import tree_leaves_with_path

DTYPES = st.sampled_from([np.float64, np.float32])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def _assert_parity(data, dtype, label):
    rows = compare(data, dtype)
    assert all(r.passed for r in rows), format_rows(label, rows)


@given(name=st.sampled_from(sorted(ract.ACTIVATIONS)), shape=shapes, dtype=DTYPES, seed=st.integers(0, 99))
def test_activation_parity_and_gradcheck(name, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    _assert_parity(activation_case(rng, dtype, name=name, shape=shape), dtype, name)
    report = gradcheck_case(activation_case(np.random.default_rng(seed), np.float64, name=name, shape=shape))
    assert report.ok, str(report)


@given(log=st.booleans(), shape=shapes, scale=st.sampled_from([0.1, 3.0, 30.0]), dtype=DTYPES, seed=st.integers(0, 99))
def test_softmax_parity_and_gradcheck(log, shape, scale, dtype, seed):
    _assert_parity(softmax_case(np.random.default_rng(seed), dtype, log=log, shape=shape, scale=scale), dtype, "softmax")
    report = gradcheck_case(softmax_case(np.random.default_rng(seed), np.float64, log=log, shape=shape, scale=scale))
    assert report.ok, str(report)


@given(
    bias=st.booleans(), act=st.sampled_from(sorted(ract.ACTIVATIONS)), batch=shapes,
    d_in=st.integers(1, 6), d_out=st.integers(1, 6), dtype=DTYPES, seed=st.integers(0, 99),
)
def test_linear_parity_and_gradcheck(bias, act, batch, d_in, d_out, dtype, seed):
    kw = dict(bias=bias, activation=act, batch_shape=batch, d_in=d_in, d_out=d_out)
    _assert_parity(linear_case(np.random.default_rng(seed), dtype, **kw), dtype, f"linear {kw}")
    report = gradcheck_case(linear_case(np.random.default_rng(seed), np.float64, **kw))
    assert report.ok, str(report)


def test_erf_matches_math_erf_to_a_few_ulps():
    xs = np.linspace(-7, 7, 20001)
    want = np.array([math.erf(v) for v in xs])
    assert np.max(np.abs(ract.erf(xs) - want)) < 5e-15
    xs32 = xs.astype(np.float32)
    got32 = ract.erf(xs32)
    assert got32.dtype == np.float32
    assert np.max(np.abs(got32 - want)) < 2e-7


def test_gelu_variants_differ_measurably():
    x = np.linspace(-4, 4, 101)
    exact, _ = ract.gelu_forward(x)
    approx, _ = ract.gelu_forward(x, approximate=True)
    assert 1e-4 < np.max(np.abs(exact - approx)) < 1e-2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_log_softmax_stable_at_1e4(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype)
    y, _ = ract.softmax_forward(x)
    ly, _ = ract.log_softmax_forward(x)
    assert np.all(np.isfinite(y)) and np.allclose(y.sum(-1), 1)
    assert np.all(np.isfinite(ly))
    np.testing.assert_allclose(y[0], [1, 0, 0])
    np.testing.assert_allclose(np.asarray(jact.softmax(jnp.asarray(x))), y, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jact.log_softmax(jnp.asarray(x))), ly, rtol=1e-6)


def test_softmax_fully_masked_row_is_zero_not_nan():
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    y, cache = ract.softmax_forward(x)
    np.testing.assert_array_equal(y, [[0.0, 0.0], [1.0, 0.0]])
    dx = ract.softmax_backward(cache, np.ones_like(x))
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(np.asarray(jact.softmax(jnp.asarray(x))), y)


def test_linear_bad_input_names_the_argument():
    p = init_linear(np.random.default_rng(0), 4, 3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        linear_forward(p, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="x must be a floating-point array"):
        linear_forward(p, np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="share one dtype"):
        linear_forward(p, np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        linear(to_jax(p), jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="unknown activation 'gleu'"):
        linear_forward(p, np.zeros((2, 4), np.float32), activation="gleu")


def test_check_ids_and_check_array_messages():
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 10\), found id 10"):
        check_ids("input_ids", np.array([[1, 10]]), 10)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 10\), found id -1"):
        check_ids("input_ids", np.array([-1, 2]), 10)
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        check_ids("input_ids", np.array([1.0, 2.0]), 10)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 3\), got \(2, 4\)"):
        check_array("mask", np.zeros((2, 4), bool), ("B", 3))
    # ids are checked on concrete JAX arrays too, and skipped (not crashed) under tracing
    with pytest.raises(ValueError, match="found id 12"):
        check_ids("ids", jnp.array([12]), 10)
    jax.jit(lambda i: (check_ids("ids", i, 10), i)[1])(jnp.array([3]))


def test_linen_linear_tree_matches_reference_and_pure_function():
    mod = Linear(features=3, dtype=jnp.float32)
    x = jnp.ones((2, 5), jnp.float32)
    variables = mod.init(jax.random.key(0), x)
    ref = init_linear(np.random.default_rng(0), 5, 3, dtype=np.float32)
    got = {p: (a.shape, a.dtype) for p, a in tree_leaves_with_path(to_numpy(variables["params"]))}
    want = {p: (a.shape, a.dtype) for p, a in tree_leaves_with_path(ref)}
    assert got == want
    np.testing.assert_array_equal(mod.apply(variables, x), linear(variables["params"], x))


def test_tree_roundtrip_preserves_dtypes_and_names():
    tree = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.arange(3, dtype=np.int32),
            "c": np.zeros(2, np.float64)}
    back = to_numpy(to_jax(tree))
    for (p1, a1), (p2, a2) in zip(tree_leaves_with_path(tree), tree_leaves_with_path(back)):
        assert p1 == p2 and a1.dtype == a2.dtype
        np.testing.assert_array_equal(a1, a2)


def test_float64_without_x64_is_refused():
    with jax.enable_x64(False), pytest.raises(ValueError, match="x64"):
        to_jax({"w": np.zeros(2)})
