"""MLP, gated MLP and explicit-mask dropout: reference backward vs finite differences,
reference vs JAX, the Flax modules' trees, the equations, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax.layers import dropout as jdrop
from bigmodel_jax.layers.mlp import MLP, GatedMLP, gated_mlp, mlp
from bigmodel_apps.parity.cases.dropout import dropout_case
from bigmodel_apps.parity.cases.mlp import gated_mlp_case, mlp_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.layers import dropout as rdrop
from reference_numpy.layers.activations import ACTIVATIONS, sigmoid
from reference_numpy.layers.mlp import gated_mlp_backward, gated_mlp_forward, init_mlp, mlp_backward, mlp_forward
from reference_numpy.tree import tree_leaves_with_path

BATCH_SHAPES = [(1,), (3,), (1, 1), (2, 3)]


@st.composite
def case_and_options(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["mlp", "gated_mlp", "dropout"]))
    if kind == "dropout":
        shape = draw(st.sampled_from([(1, 1, 1), (2, 1, 3), (2, 3, 4)]))
        return dropout_case, {"rate": draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9])),
                              "broadcast": draw(st.booleans()), "shape": shape}
    opts = {
        "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
        "bias": draw(st.booleans()),
        "batch_shape": draw(st.sampled_from(BATCH_SHAPES)),
        "d_model": draw(st.integers(1, 5)),
        "d_ff": draw(st.integers(1, 7)),
    }
    return (gated_mlp_case if kind == "gated_mlp" else mlp_case), opts


@given(case=case_and_options(), seed=st.integers(0, 2**16))
def test_backward_matches_finite_differences(case, seed):
    make, opts = case
    report = gradcheck_case(make(np.random.default_rng(seed), np.float64, **opts), seed=seed)
    assert report.ok, f"{make.__name__} {opts}\n{report}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(case=case_and_options(), seed=st.integers(0, 2**16))
def test_reference_matches_jax(case, seed, dtype):
    make, opts = case
    rows = compare(make(np.random.default_rng(seed), dtype, **opts), dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"{make.__name__} {opts} {np.dtype(dtype).name}", rows)


# --- MLP --------------------------------------------------------------------------------------


def test_swiglu_is_down_of_silu_gate_times_up():
    rng = np.random.default_rng(0)
    params = init_mlp(rng, 4, 6, gated=True, bias=False, dtype=np.float64)
    x = rng.standard_normal((1, 1, 4))  # batch 1, a length-1 sequence
    g, u = x @ params["gate"]["kernel"], x @ params["up"]["kernel"]
    want = (g * sigmoid(g) * u) @ params["down"]["kernel"]
    y, _ = gated_mlp_forward(params, x)  # silu by default
    np.testing.assert_allclose(y, want, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(gated_mlp(to_jax(params), jnp.asarray(x))), want, rtol=1e-13)


@pytest.mark.parametrize(("gated", "bias"), [(False, True), (False, False), (True, True), (True, False)])
def test_init_mlp_tree(gated, bias):
    params = init_mlp(np.random.default_rng(1), 4, 6, gated=gated, bias=bias, dtype=np.float32)
    want = {"up/kernel": (4, 6), "down/kernel": (6, 4)}
    if gated:
        want["gate/kernel"] = (4, 6)
    if bias:
        want.update({k.replace("kernel", "bias"): (s[1],) for k, s in list(want.items())})
    got = {path: leaf.shape for path, leaf in tree_leaves_with_path(params)}
    assert got == want
    assert all(leaf.dtype == np.float32 for _, leaf in tree_leaves_with_path(params))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gated", [False, True])
def test_mlp_dtype_in_is_dtype_out(gated, dtype):
    rng = np.random.default_rng(2)
    params = init_mlp(rng, 3, 5, gated=gated, dtype=dtype)
    x = rng.standard_normal((2, 3)).astype(dtype)
    fwd, bwd = (gated_mlp_forward, gated_mlp_backward) if gated else (mlp_forward, mlp_backward)
    y, cache = fwd(params, x)
    dx, grads = bwd(params, cache, np.ones_like(y))
    assert y.dtype == dx.dtype == dtype
    assert all(g.dtype == dtype for _, g in tree_leaves_with_path(grads))


@pytest.mark.parametrize(
    ("module", "fwd", "gated"),
    [(MLP(d_ff=5, activation="gelu_tanh", dtype=jnp.float64), mlp_forward, False),
     (MLP(d_ff=5, use_bias=False, dtype=jnp.float64), mlp_forward, False),
     (GatedMLP(d_ff=5, dtype=jnp.float64), gated_mlp_forward, True),
     (GatedMLP(d_ff=5, use_bias=False, activation="gelu", dtype=jnp.float64), gated_mlp_forward, True)],
)
def test_flax_module_tree_matches_init_mlp_and_applies_the_pure_function(module, fwd, gated):
    x = np.random.default_rng(3).standard_normal((2, 3))
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    params = to_numpy(variables["params"])
    ref = init_mlp(np.random.default_rng(0), 3, 5, gated=gated, bias=module.use_bias, dtype=np.float64)
    shapes = lambda t: {p: (a.shape, a.dtype) for p, a in tree_leaves_with_path(t)}  # noqa: E731
    assert shapes(params) == shapes(ref)
    y = module.apply({"params": to_jax(ref)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), fwd(ref, x, module.activation)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("side", ["reference", "jax"])
def test_mlp_bad_input_names_the_argument(side):
    params = init_mlp(np.random.default_rng(4), 4, 6, dtype=np.float64)
    if side == "reference":
        run, grun, conv, arr = mlp_forward, gated_mlp_forward, (lambda t: t), np.asarray
    else:
        run, grun, conv, arr = mlp, gated_mlp, to_jax, jnp.asarray
    xj = arr(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        run(conv(params), arr(np.zeros((2, 5))))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        run(conv(params), xj, activation="swish")
    bad = {**params, "down": init_mlp(np.random.default_rng(5), 4, 7, dtype=np.float64)["down"]}
    with pytest.raises(ValueError, match=r"down/kernel must have shape \(6, 4\)"):
        run(conv(bad), xj)
    with pytest.raises(ValueError, match=r"gated MLP params must have keys \['gate', 'up', 'down'\]"):
        grun(conv(params), xj)


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_rate_zero_is_the_identity_on_both_sides():
    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    mask = np.zeros((2, 3), bool)  # ignored at rate 0
    y, cache = rdrop.dropout_forward(x, mask, 0.0)
    assert y is x and rdrop.dropout_backward(cache, x) is x
    xj = jnp.asarray(x)
    assert jdrop.dropout(xj, jnp.asarray(mask), 0.0) is xj


def test_dropout_scales_kept_entries_and_zeros_dropped_ones():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    mask = rdrop.dropout_mask(rng, (3, 5), 0.4)
    y, cache = rdrop.dropout_forward(x, mask, 0.4)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[~mask], 0)
    np.testing.assert_allclose(y[mask], x[mask] / np.float32(0.6), rtol=3e-7)  # 1 ulp: x * (1/0.6)
    dx = rdrop.dropout_backward(cache, np.ones_like(x))
    np.testing.assert_array_equal(dx, np.where(mask, np.float32(1 / 0.6), np.float32(0)))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masks_keep_a_one_minus_rate_fraction(rate):
    n = 200_000
    np_mask = rdrop.dropout_mask(np.random.default_rng(8), (n,), rate)
    jax_mask = jdrop.dropout_mask(jax.random.key(8), (n,), rate)
    assert np_mask.dtype == bool and jax_mask.dtype == jnp.bool_ and jax_mask.shape == (n,)
    for m in (np_mask, np.asarray(jax_mask)):
        assert abs(m.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)  # 5 sigma


@pytest.mark.parametrize("side", ["reference", "jax"])
def test_dropout_bad_input_names_the_argument(side):
    if side == "reference":
        fwd = rdrop.dropout_forward
        make_mask = lambda shape, rate: rdrop.dropout_mask(np.random.default_rng(0), shape, rate)  # noqa: E731
    else:
        fwd = lambda x, m, r: jdrop.dropout(jnp.asarray(x), jnp.asarray(m), r)  # noqa: E731
        make_mask = lambda shape, rate: jdrop.dropout_mask(jax.random.key(0), shape, rate)  # noqa: E731
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"mask must have x's shape \(2, 3, 4\).*got \(2, 4\)"):
        fwd(x, np.ones((2, 4), bool), 0.1)
    with pytest.raises(ValueError, match=r"mask must have x's shape"):
        fwd(x, np.ones((2, 3, 4, 1), bool), 0.1)  # broadcasting must not enlarge x
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        fwd(x, np.ones((2, 3, 4)), 0.1)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
            fwd(x, np.ones((2, 3, 4), bool), rate)
        with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
            make_mask((2,), rate)
    with pytest.raises(ValueError, match="x must be a floating-point array"):
        fwd(np.ones((2, 3), int), np.ones((2, 3), bool), 0.1)
