"""Weight-only quantisation: the NumPy reference math, the JAX twin, whole trees through every
family's one forward, save / load."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

from bigmodel_apps.parity import cases as _cases  # registers the model cases in REGISTRY
from bigmodel_apps.parity.harness import REGISTRY
from bigmodel_jax import quant as jq
from reference_numpy import quant as rq
from reference_numpy.configs import preset
from reference_numpy.models import gpt as rgpt
from reference_numpy.tolerances import MODEL_PARITY

DTYPES = [np.float32, np.float64]
assert _cases  # imported for its registrations


@st.composite
def weights(draw, max_rank: int = 3):
    """A float weight, its contraction axes (negative) and a dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(2, max_rank))
    shape = tuple(draw(st.sampled_from([2, 4, 6, 8, 12, 16])) for _ in range(rank))
    n_axes = draw(st.integers(1, rank - 1))
    first = draw(st.integers(0, rank - n_axes))
    axes = tuple(range(first - rank, first - rank + n_axes))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * draw(st.sampled_from([0.02, 1.0, 50.0]))).astype(dtype)
    if draw(st.booleans()):  # an all-zero output channel: scale 0, codes 0
        idx = [slice(None)] * rank
        free = [a for a in range(rank) if a - rank not in axes][0]
        idx[free] = 0
        w[tuple(idx)] = 0
    return w, axes


def _grouped_abs_max(w: np.ndarray, ax: int, g: int) -> np.ndarray:
    """max |w| over groups of g along ax, repeated back to w's shape (an independent spelling)."""
    moved = np.moveaxis(np.abs(w), ax, -1)
    m = moved.reshape(*moved.shape[:-1], -1, g).max(-1)
    return np.moveaxis(np.repeat(m, g, axis=-1), -1, ax)


# --------------------------------------------------------------------------------------------
# reference math, checked against properties (not against itself)


@settings(max_examples=30, deadline=None)
@given(case=weights())
def test_int8_codes_range_and_half_step_error(case):
    w, axes = case
    qw = rq.quantize_int8(w, axes)
    assert qw.q.dtype == np.int8 and qw.shape == w.shape and qw.dtype == w.dtype.name
    assert np.abs(qw.q.astype(int)).max() <= 127
    amax = np.abs(w).max(axis=axes, keepdims=True)
    step = amax / 127
    np.testing.assert_allclose(qw.scale, step, rtol=1e-6 if w.dtype == np.float32 else 1e-15)
    err = np.abs(rq.dequantize(qw) - w)
    assert np.all(err <= step * (0.5 + 1e-5) + np.finfo(w.dtype).tiny)
    # the largest entry of every non-zero channel hits +-127 exactly
    top = np.abs(qw.q.astype(int)).max(axis=axes, keepdims=True)
    assert np.all(top[amax > 0] == 127) and np.all(top[amax == 0] == 0)
    np.testing.assert_array_equal(rq.quantize_int8(-w, axes).q, -qw.q)  # symmetric


@settings(max_examples=30, deadline=None)
@given(case=weights(), use_default=st.booleans())
def test_int4_codes_groups_and_packing(case, use_default):
    w, axes = case
    ax = axes[-1]
    k = w.shape[ax]
    g = None if use_default else k // 2
    qw = rq.quantize_int4(w, axes, g)
    g = k if use_default else k // 2  # our shapes are <= 128, so the default group is all of K
    assert qw.group_size == g and qw.q.dtype == np.uint8 and qw.shape == w.shape
    assert qw.q.shape[ax] == k // 2
    codes = rq.unpack_int4(qw.q, ax).astype(int)
    assert np.abs(codes).max() <= 7
    step = _grouped_abs_max(w, ax, g) / 7
    assert np.all(np.abs(rq.dequantize(qw) - w) <= step * (0.5 + 1e-5) + np.finfo(w.dtype).tiny)


def test_int4_packing_by_hand():
    codes = np.array([[-7, 3, 0, 7]], dtype=np.int8)  # pairs (-7, 3), (0, 7) along axis 1
    packed = rq.pack_int4(codes, -1)
    # low nibble = code + 8 of the even index, high nibble = code + 8 of the odd one
    assert packed.tolist() == [[(-7 + 8) | ((3 + 8) << 4), (0 + 8) | ((7 + 8) << 4)]]
    np.testing.assert_array_equal(rq.unpack_int4(packed, -1), codes)


@pytest.mark.parametrize("k, g", [(768, 128), (3072, 128), (64, 64), (96, 96), (100, 100), (300, 100), (2, 2)])
def test_default_group_size(k, g):
    assert rq.default_group_size(k) == g


def test_bad_arguments_say_what_is_allowed():
    w = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="group_size must divide the contraction length 6"):
        rq.quantize_int4(w, (0,), 4)
    with pytest.raises(ValueError, match="even contraction length"):
        rq.quantize_int4(np.ones((5, 4), np.float32), (0,))
    with pytest.raises(ValueError, match="bits must be one of"):
        rq.quantize(w, 3)
    with pytest.raises(ValueError, match="floating-point"):
        rq.quantize_int8(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="finite"):
        rq.quantize_int8(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="axes must be ints"):
        rq.quantize_int8(w, (2,))
    with pytest.raises(ValueError, match="bad exclude"):
        rq.quantize_plan({"a": {"kernel": w}}, 8, exclude=("(",))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_and_its_backward(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 6))
    x = rng.standard_normal((3, 16))
    qw = rq.quantize(w, bits, (0,))
    w_hat = rq.dequantize(qw)
    np.testing.assert_allclose(rq.quantized_matmul(x, qw), x @ w_hat, rtol=1e-13)
    # backward: <dy, f(x + e d)> - <dy, f(x)> = e <dx, d> for the linear map f
    dy, d = rng.standard_normal((3, 6)), rng.standard_normal((3, 16))
    dx = rq.quantized_matmul_backward(qw, dy)
    lhs = np.sum(dy * (rq.quantized_matmul(x + 1e-3 * d, qw) - rq.quantized_matmul(x, qw))) / 1e-3
    assert abs(lhs - np.sum(dx * d)) < 1e-8
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\)"):
        rq.quantized_matmul(x[:, :5], qw)


# --------------------------------------------------------------------------------------------
# JAX twin


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@settings(max_examples=25, deadline=None)
@given(case=weights(), bits=st.sampled_from([8, 4]))
def test_jax_quantize_matches_reference(case, bits):
    w, axes = case
    ref = rq.quantize(w, bits, axes)
    got = jax.jit(lambda a: jq.quantize(a, bits, axes))(jnp.asarray(w))
    assert (got.bits, got.group_size, got.axes, got.dtype) == (ref.bits, ref.group_size, ref.axes, ref.dtype)
    np.testing.assert_array_equal(np.asarray(got.q), ref.q)
    np.testing.assert_array_equal(np.asarray(got.scale), ref.scale)
    np.testing.assert_array_equal(np.asarray(jax.jit(jq.dequantize)(got)), rq.dequantize(ref))


@pytest.mark.parametrize("mode", jq.QDOT_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qdot_modes(mode, dtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 24)) * 0.1).astype(dtype)
    x = rng.standard_normal((2, 64)).astype(dtype)
    qw = rq.quantize_int8(w, (0,))
    want = x @ rq.dequantize(qw)
    got = np.asarray(jax.jit(lambda a, q: jq.qdot(a, q, mode))(jnp.asarray(x), jax.tree.map(jnp.asarray, qw)))
    if mode == "w8a8":  # activations rounded to 1/254 of their row max: ~0.5% of |y|
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_take_rows_gathers_dequantised_rows():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    ids = np.array([[3, 0, 9], [3, 3, 1]])
    for bits in (8, 4):
        qt = rq.quantize(table, bits, (-1,))
        want = rq.dequantize(qt)[ids]
        np.testing.assert_array_equal(rq.take_rows(qt, ids), want)
        np.testing.assert_array_equal(np.asarray(jq.take_rows(jax.tree.map(jnp.asarray, qt), jnp.asarray(ids))), want)


# --------------------------------------------------------------------------------------------
# whole trees


def test_plan_for_gpt2_tiny():
    config = preset("gpt2-tiny", tie_embeddings=True)
    params = rgpt.init(config, np.random.default_rng(0))
    plan8, plan4 = rq.quantize_plan(params, 8), rq.quantize_plan(params, 4)
    assert plan8["layers/attn/query/kernel"] == (8, (-3,))
    assert plan8["layers/attn/out/kernel"] == (8, (-3, -2))
    assert plan8["layers/mlp/down/kernel"] == (8, (-2,))
    assert plan8["embed/embedding"] == (8, (-1,))
    for path in ("layers/attn_norm/scale", "final_norm/bias", "layers/attn/query/bias", "layers/mlp/up/bias"):
        assert plan8[path][0] is None, path
    assert plan4["layers/mlp/up/kernel"][0] == 4
    assert plan4["embed/embedding"][0] == 8  # tied head stays int8 under int4
    assert rq.quantize_plan(params, 8, exclude=("norm", "mlp"))["layers/mlp/up/kernel"][0] is None
    q4 = rq.quantize_tree(params, 4)
    assert rq.tree_nbytes(q4) < rq.tree_nbytes(rq.quantize_tree(params, 8)) < rq.tree_nbytes(params)


def _family_cases():
    for name in ("gpt", "bert", "seq2seq", "vit"):
        for opts in REGISTRY[name].default_options[:2]:
            yield pytest.param(name, opts, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items())}")


@pytest.mark.slow
@pytest.mark.parametrize("name, opts", list(_family_cases()))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_family_runs_a_quantised_tree(name, opts, bits, dtype):
    """The one forward of each family, reference and JAX (jitted, scanned layers), on a quantised
    tree: it equals the same forward on the dequantised tree, the JAX side matches the reference,
    and the output stays near the unquantised one."""
    data = REGISTRY[name].make(np.random.default_rng(0), dtype, **opts)
    qt = rq.quantize_tree(data.params, bits)
    assert rq.quantized_bits(qt)
    y_q = data.ref_forward(qt, data.inputs)[0]
    y_deq = data.ref_forward(rq.dequantize_tree(qt), data.inputs)[0]
    y_fp = data.ref_forward(data.params, data.inputs)[0]
    np.testing.assert_array_equal(y_q, y_deq)
    jt = jax.tree.map(jnp.asarray, qt)
    y_jax = np.asarray(jax.jit(lambda p: data.jax_forward(p, data.inputs))(jt))
    tol = MODEL_PARITY[np.dtype(dtype).name]
    err = np.abs(y_jax - y_q).max()
    assert tol.passes(err, err / max(np.abs(y_q).max(), 1e-30)), (name, err)
    rel = np.abs(y_q - y_fp).max() / np.abs(y_fp).max()
    assert rel < (0.05 if bits == 8 else 0.5), (name, bits, rel)


def test_save_load_round_trip(tmp_path):
    from bigmodel_port.quant_io import load_quantized, save_quantized

    config = preset("gpt2-tiny")
    params = rgpt.init(config, np.random.default_rng(0))
    for bits in (8, 4):
        qt = rq.quantize_tree(params, bits)
        path = save_quantized(tmp_path / f"q{bits}.safetensors", jax.tree.map(jnp.asarray, qt), config)
        back, config2, _ = load_quantized(path)
        assert config2 == config
        assert rq.quantized_bits(back) == rq.quantized_bits(qt)
        flat_a = jax.tree_util.tree_leaves_with_path(qt)
        flat_b = jax.tree_util.tree_leaves_with_path(back)
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        for (p, a), (_, b) in zip(flat_a, flat_b):
            assert a.dtype == b.dtype, p
            np.testing.assert_array_equal(a, b)
        # the plain reader refuses it: int codes and scales are not the parameter tree
        from bigmodel_port.errors import CheckpointError
        from bigmodel_port.native import load_native

        with pytest.raises(CheckpointError, match="quantised model: load it with .*load_quantized"):
            load_native(path)


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_on_a_quantised_tree_in_the_default_decoding_layout(bits):
    """``generate``'s default (fast) decoding layout rearranges the kernels; on a quantised tree it
    gives the greedy tokens of the dequantised tree."""
    from bigmodel_jax.generation.sampling import generate

    config = preset("llama-tiny")
    params = rq.quantize_tree(rgpt.init(config, np.random.default_rng(1)), bits)
    ids = jnp.asarray([[3, 7, 11, 2]])
    q_tokens = generate(jax.tree.map(jnp.asarray, params), ids, config, max_new_tokens=4, temperature=0.0)
    d_tokens = generate(jax.tree.map(jnp.asarray, rq.dequantize_tree(params)), ids, config, max_new_tokens=4,
                        temperature=0.0)
    np.testing.assert_array_equal(np.asarray(q_tokens), np.asarray(d_tokens))


@pytest.mark.parametrize("bits", [8, 4])
def test_concatenate_and_transpose_commute_with_dequantise(bits):
    """The decoding layout's two rearrangements of a quantised kernel give the rearranged weight."""
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((2, 8, h, 4)) for h in (4, 2, 2)]  # (L, D, heads, E), contracted over D
    qs = [jq.quantize(jnp.asarray(w), bits, (-3,)) for w in ws]
    cat = jq.concatenate(qs, axis=2)
    want = np.concatenate([np.asarray(jq.dequantize(q)) for q in qs], axis=2)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(cat)), want)
    rows = jq.transpose(cat, (0, 2, 3, 1))  # (L, M, E, D)
    assert rows.axes == (-1,)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(rows)), want.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="contraction axis"):
        jq.concatenate(qs[:1] * 2, axis=1)
    with pytest.raises(ValueError, match="quantised alike"):
        jq.concatenate([qs[0], jnp.asarray(ws[1])], axis=2)
