"""Layer norm and RMS norm: reference backward vs finite differences, reference vs JAX, the
Flax modules' trees, the properties the norms promise, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax.layers.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from bigmodel_apps.parity.cases.norms import layer_norm_case, rms_norm_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.layers.norms import (
    init_layer_norm,
    init_rms_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

BATCH_SHAPES = [(), (1,), (3,), (1, 1), (2, 3)]


@st.composite
def norm_options(draw: st.DrawFn, layer: bool, dtype=np.float64) -> dict:
    """Options of the norm cases, drawn within float32's reach where dtype is float32.

    D = 2 (layer norm) and D = 1 (RMS norm) are left out: there the normalisation fixes the
    output up to sign, the true dx is O(eps), and each side returns only its own rounding noise
    (~ rstd * 1e-7 in float32), which no relative tolerance can compare. Layer norm's D = 1 is
    kept: its dx is exactly zero on both sides.

    A row offset makes layer norm's dx ill-conditioned: the mean is rounded to ulp(offset), an
    error of ulp(offset) / spread in xhat. Both sides round differently, so in float32 an offset of
    50 spreads gives ~1e-4 relative differences (a scan of D = 3: 3 of 54 draws above 2e-5) while
    5 spreads stays below 6e-6. float64 (and finite differences) take the 50.
    """
    ratios = [0.0, 5.0] if dtype == np.float32 else [0.0, 5.0, 50.0]
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    opts = {
        "eps": draw(st.sampled_from([1e-12, 1e-6, 1e-5, 0.1, 1.0])),
        "batch_shape": draw(st.sampled_from(BATCH_SHAPES)),
        "d_model": draw(st.sampled_from([1, 3, 4, 8] if layer else [2, 3, 4, 8])),
        "offset": draw(st.sampled_from(ratios)) * scale,
        "scale": scale,
    }
    if layer:
        opts["bias"] = draw(st.booleans())
    return opts


CASES = {"layer": (layer_norm_case, True), "rms": (rms_norm_case, False)}


@pytest.mark.parametrize("kind", sorted(CASES))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_backward_matches_finite_differences(kind, data, seed):
    make, layer = CASES[kind]
    opts = data.draw(norm_options(layer))
    report = gradcheck_case(make(np.random.default_rng(seed), np.float64, **opts), seed=seed)
    assert report.ok, f"{kind} {opts}\n{report}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", sorted(CASES))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_reference_matches_jax(kind, dtype, data, seed):
    make, layer = CASES[kind]
    opts = data.draw(norm_options(layer, dtype))
    rows = compare(make(np.random.default_rng(seed), dtype, **opts), dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"{kind} {opts} {np.dtype(dtype).name}", rows)


# --- properties -------------------------------------------------------------------------------


def test_layer_norm_rows_have_zero_mean_and_unit_variance():
    x = np.random.default_rng(0).standard_normal((4, 16)) * 3 + 7
    y, (xhat, rstd) = layer_norm_forward(init_layer_norm(16, dtype=np.float64), x, eps=0.0)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-13)
    np.testing.assert_array_equal(y, xhat)
    assert rstd.shape == (4, 1)


def test_rms_norm_matches_its_equation_and_ignores_positive_rescaling():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8))
    scale = rng.standard_normal(8)
    y, _ = rms_norm_forward({"scale": scale}, x, eps=0.0)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) * scale, rtol=1e-14)
    y5, _ = rms_norm_forward({"scale": scale}, 5 * x, eps=0.0)
    np.testing.assert_allclose(y5, y, rtol=1e-13)


def test_layer_norm_float32_survives_a_large_offset():
    """Two-pass variance: a one-pass mean(x^2) - mean(x)^2 at offset 1e4 loses every digit."""
    x = (1e4 + np.random.default_rng(2).standard_normal((4, 64))).astype(np.float32)
    params = init_layer_norm(64, dtype=np.float32)
    y32, _ = layer_norm_forward(params, x)
    y64, _ = layer_norm_forward(init_layer_norm(64, dtype=np.float64), x.astype(np.float64))
    assert np.max(np.abs(y32 - y64)) < 1e-2
    with jax.numpy_dtype_promotion("strict"):
        yj = np.asarray(layer_norm(to_jax(params), jnp.asarray(x)))
    assert np.max(np.abs(yj - y64)) < 1e-2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out_on_both_sides(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5)).astype(dtype)
    for fwd, bwd, jfn, params in [
        (layer_norm_forward, layer_norm_backward, layer_norm, init_layer_norm(5, dtype=dtype)),
        (rms_norm_forward, rms_norm_backward, rms_norm, init_rms_norm(5, dtype=dtype)),
    ]:
        y, cache = fwd(params, x)
        dx, grads = bwd(params, cache, np.ones_like(y))
        assert y.dtype == dx.dtype == dtype
        assert all(g.dtype == dtype for g in grads.values())
        with jax.numpy_dtype_promotion("strict"):
            assert jfn(to_jax(params), jnp.asarray(x)).dtype == dtype


def test_jax_bfloat16_statistics_run_in_float32():
    x = jnp.asarray(3 + np.random.default_rng(6).standard_normal((2, 256))).astype(jnp.bfloat16)
    params = {"scale": jnp.ones((256,), jnp.bfloat16), "bias": jnp.zeros((256,), jnp.bfloat16)}
    y = layer_norm(params, x)
    assert y.dtype == jnp.bfloat16
    want, _ = layer_norm_forward(init_layer_norm(256, dtype=np.float64), np.asarray(x, np.float64))
    assert np.max(np.abs(np.asarray(y, np.float64) - want)) < 0.05  # bfloat16 output rounding only


# --- Flax modules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "fwd", "keys"),
    [(LayerNorm(eps=1e-6, dtype=jnp.float64), layer_norm_forward, ["bias", "scale"]),
     (LayerNorm(use_bias=False, dtype=jnp.float64), layer_norm_forward, ["scale"]),
     (RMSNorm(eps=1e-6, dtype=jnp.float64), rms_norm_forward, ["scale"])],
)
def test_flax_module_tree_matches_reference_and_applies_the_pure_function(module, fwd, keys):
    x = np.random.default_rng(4).standard_normal((2, 3, 6))
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    params = to_numpy(variables["params"])
    assert sorted(params) == keys
    assert all(params[k].shape == (6,) and params[k].dtype == np.float64 for k in keys)
    params = {k: v + np.random.default_rng(5).standard_normal(6) for k, v in params.items()}
    y = module.apply({"params": to_jax(params)}, jnp.asarray(x))
    want, _ = fwd(params, x, eps=module.eps)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-12, atol=1e-12)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["reference", "jax"])
def test_bad_input_names_the_argument(side):
    ln = (lambda p, x, **kw: layer_norm_forward(p, x, **kw)) if side == "reference" else layer_norm
    rn = (lambda p, x, **kw: rms_norm_forward(p, x, **kw)) if side == "reference" else rms_norm
    conv = (lambda a: a) if side == "reference" else jnp.asarray
    lp = {k: conv(v) for k, v in init_layer_norm(4, dtype=np.float64).items()}
    rp = {k: conv(v) for k, v in init_rms_norm(4, dtype=np.float64).items()}
    x = conv(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\) = \(\.\.\., 4\)"):
        ln(lp, conv(np.zeros((2, 5))))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\) = \(\.\.\., 4\)"):
        rn(rp, conv(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="x must be a floating-point array"):
        ln(lp, conv(np.zeros((2, 4), np.int32)))
    with pytest.raises(ValueError, match="arrays must share one dtype"):
        rn(rp, conv(np.zeros((2, 4), np.float32)))
    with pytest.raises(ValueError, match="eps must be"):
        ln(lp, x, eps=-1.0)
    with pytest.raises(ValueError, match="bias"):
        rn({**rp, "bias": rp["scale"]}, x)
    with pytest.raises(ValueError, match="missing"):
        ln({"bias": lp["bias"]}, x)
