"""Rotary embeddings and multi-head / grouped-query attention: reference backward vs finite
differences, reference vs JAX, and the properties the layers promise (masks, GQA, RoPE)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax.layers.attention import Attention, attention
from bigmodel_jax.layers.rope import rope
from bigmodel_apps.parity.cases.attention import PADDINGS, attention_case, rope_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.layers.attention import attention_backward, attention_forward, init_attention
from reference_numpy.layers.rope import rope_angles, rope_backward, rope_forward
from reference_numpy.tree import tree_leaves_with_path, tree_map


@st.composite
def attention_options(draw: st.DrawFn) -> dict:
    """Every option of the attention case; sizes tiny (finite differences are per element)."""
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    cross = draw(st.booleans())
    T = draw(st.integers(1, 4))
    opts = {
        "batch": draw(st.integers(1, 2)),
        "T": T,
        "S": draw(st.integers(1, 5)) if cross else None,
        "d_model": draw(st.sampled_from([5, 8])),
        "n_heads": K * G,
        "n_kv_heads": K,
        "head_dim": draw(st.sampled_from([2, 4])),
        "bias": draw(st.booleans()),
        "causal": draw(st.booleans()),
        "padding": draw(st.sampled_from(PADDINGS)),
        "cross": cross,
        "dropout": draw(st.booleans()),
    }
    if not cross and draw(st.booleans()):
        opts.update(rope=True, rope_layout=draw(st.sampled_from(["half", "interleaved"])),
                    positions=draw(st.sampled_from(["default", "batched"])))
    return opts


def _random_params(rng: np.random.Generator, *args, bias: bool = True, dtype=np.float64, **kw) -> dict:
    """init_attention, with non-zero biases so they matter."""
    p = init_attention(rng, *args, bias=bias, dtype=dtype, **kw)
    if bias:
        p = {n: {**q, "bias": rng.standard_normal(q["bias"].shape).astype(dtype)} for n, q in p.items()}
    return p


def _jax_attention(params, x, kv=None, **kw):
    with jax.numpy_dtype_promotion("strict"), jax.default_matmul_precision("highest"):
        kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        return np.asarray(attention(to_jax(params), jnp.asarray(x), None if kv is None else jnp.asarray(kv), **kw))


# --- hypothesis: finite differences and parity over all options ------------------------------


@given(opts=attention_options(), seed=st.integers(0, 2**16))
def test_attention_backward_matches_finite_differences(opts, seed):
    data = attention_case(np.random.default_rng(seed), np.float64, **opts)
    report = gradcheck_case(data, seed=seed)
    assert report.ok, f"{opts}\n{report}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(opts=attention_options(), seed=st.integers(0, 2**16))
def test_attention_reference_matches_jax(opts, seed, dtype):
    data = attention_case(np.random.default_rng(seed), dtype, **opts)
    y, _ = data.ref_forward(data.params, data.inputs)
    assert y.dtype == np.dtype(dtype)
    rows = compare(data, dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"attention {opts} {np.dtype(dtype).name}", rows)


@st.composite
def rope_options(draw: st.DrawFn) -> dict:
    return {
        "layout": draw(st.sampled_from(["half", "interleaved"])),
        "batch": draw(st.integers(1, 2)),
        "T": draw(st.integers(1, 5)),
        "n_heads": draw(st.integers(1, 3)),
        "head_dim": draw(st.sampled_from([2, 4, 6])),
        "theta": draw(st.sampled_from([100.0, 10000.0])),
        "positions": draw(st.sampled_from(["default", "batched"])),
    }


@given(opts=rope_options(), seed=st.integers(0, 2**16))
def test_rope_backward_and_parity(opts, seed):
    data = rope_case(np.random.default_rng(seed), np.float64, **opts)
    report = gradcheck_case(data, seed=seed)
    assert report.ok, f"{opts}\n{report}"
    for dtype in (np.float64, np.float32):
        data = rope_case(np.random.default_rng(seed), dtype, **opts)
        rows = compare(data, dtype, seed=seed)
        assert all(r.passed for r in rows), format_rows(f"rope {opts} {np.dtype(dtype).name}", rows)


# --- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True])
def test_fully_masked_row_gives_zero_weights_and_finite_grads(cross):
    rng = np.random.default_rng(0)
    B, T, D = 2, 3, 8
    S = 4 if cross else T
    p = _random_params(rng, D, 2)
    x = rng.standard_normal((B, T, D))
    kv = rng.standard_normal((B, S, D)) if cross else None
    mask = np.ones((B, S), bool)
    mask[0, 0] = False  # with causal: query 0 of batch 0 sees nothing (end-aligned: S-T keys more)
    if cross:
        mask[0, : S - T + 1] = False
    mask[1] = False  # batch 1 sees nothing at all
    kw = {"key_padding_mask": mask, "causal": True}

    y, cache = attention_forward(p, x, kv, **kw)
    dy = rng.standard_normal(y.shape)
    dx, grads = attention_backward(p, cache, dy)
    y_jax = _jax_attention(p, x, kv, **kw)

    # Zero weights: the output is exactly the out bias, whatever v is.
    for out in (y, y_jax):
        np.testing.assert_array_equal(out[0, 0], p["out"]["bias"])
        np.testing.assert_array_equal(out[1], np.broadcast_to(p["out"]["bias"], (T, D)))
        assert np.isfinite(out).all()
    dx_q = dx[0] if cross else dx
    assert all(np.isfinite(g).all() for _, g in tree_leaves_with_path({"dx": dx_q, "g": grads}))
    if cross:  # a query that attends nothing passes no gradient back
        np.testing.assert_array_equal(dx_q[0, 0], 0.0)
        np.testing.assert_array_equal(dx_q[1], 0.0)
        np.testing.assert_array_equal(dx[1][1], 0.0)

    def loss(params, x, kv):
        return jnp.sum(attention(params, x, kv, **{**kw, "key_padding_mask": jnp.asarray(mask)}) * dy)

    with jax.numpy_dtype_promotion("strict"):
        g_p, g_x, g_kv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
            to_jax(p), jnp.asarray(x), None if kv is None else jnp.asarray(kv))
    for _, g in tree_leaves_with_path({"p": to_numpy(g_p), "x": {"x": np.asarray(g_x)}}):
        assert np.isfinite(g).all()
    np.testing.assert_allclose(np.asarray(g_x), dx_q, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("opts", [
    {"batch": 1, "T": 1},
    {"batch": 1, "T": 1, "causal": True, "rope": True},
    {"batch": 1, "T": 1, "S": 1, "cross": True, "padding": "random"},
    {"batch": 1, "T": 1, "causal": True, "padding": "empty"},
])
def test_length_one_and_batch_one(opts):
    data = attention_case(np.random.default_rng(3), np.float64, **opts)
    assert gradcheck_case(data).ok
    for dtype in (np.float64, np.float32):
        data = attention_case(np.random.default_rng(3), dtype, **opts)
        rows = compare(data, dtype)
        assert all(r.passed for r in rows), format_rows(f"{opts}", rows)


@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_causal_output_ignores_later_tokens(rope_theta):
    rng = np.random.default_rng(1)
    B, T, D = 2, 5, 8
    p = _random_params(rng, D, 4, 2)
    x = rng.standard_normal((B, T, D))
    for t in range(T - 1):
        x2 = x.copy()
        x2[:, t + 1:] = rng.standard_normal((B, T - t - 1, D)) * 10
        for run in (lambda z: attention_forward(p, z, causal=True, rope_theta=rope_theta)[0],
                    lambda z: _jax_attention(p, z, causal=True, rope_theta=rope_theta)):
            y1, y2 = run(x), run(x2)
            np.testing.assert_allclose(y2[:, : t + 1], y1[:, : t + 1], rtol=0, atol=1e-13)
            assert not np.allclose(y2[:, t + 1:], y1[:, t + 1:])


def test_causal_mask_is_aligned_at_the_end():
    """With S > T (earlier tokens cached) the last query sees every key: decoding one token at a
    time over a cache equals the last rows of full causal attention."""
    rng = np.random.default_rng(2)
    B, S, D = 2, 5, 8
    p = _random_params(rng, D, 2)
    x = rng.standard_normal((B, S, D))
    full, _ = attention_forward(p, x, causal=True)
    last2, _ = attention_forward(p, x[:, -2:], x, causal=True)
    np.testing.assert_allclose(last2, full[:, -2:], rtol=1e-12)
    np.testing.assert_allclose(_jax_attention(p, x[:, -2:], x, causal=True), full[:, -2:], rtol=1e-12)


# --- grouped-query attention -----------------------------------------------------------------


def _naive_mha(p: dict, x: np.ndarray) -> np.ndarray:
    """Textbook softmax(Q K^T / sqrt(E)) V per head, via explicit per-head matrices."""
    q = np.einsum("btd,dhe->bhte", x, p["query"]["kernel"]) + p["query"]["bias"][None, :, None, :]
    k = np.einsum("btd,dhe->bhte", x, p["key"]["kernel"]) + p["key"]["bias"][None, :, None, :]
    v = np.einsum("btd,dhe->bhte", x, p["value"]["kernel"]) + p["value"]["bias"][None, :, None, :]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = a @ v  # (b, h, t, e)
    return np.einsum("bhte,hed->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _repeat_kv(p: dict, G: int) -> dict:
    """HF's repeat_kv: kv head k serves query heads k*G .. k*G + G-1."""
    r = {n: dict(q) for n, q in p.items()}
    for n in ("key", "value"):
        r[n]["kernel"] = np.repeat(p[n]["kernel"], G, axis=1)
        r[n]["bias"] = np.repeat(p[n]["bias"], G, axis=0)
    return r


def test_mha_matches_textbook_formula():
    rng = np.random.default_rng(4)
    p = _random_params(rng, 8, 4)
    x = rng.standard_normal((2, 5, 8))
    want = _naive_mha(p, x)
    np.testing.assert_allclose(attention_forward(p, x)[0], want, rtol=1e-12)
    np.testing.assert_allclose(_jax_attention(p, x), want, rtol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])  # MQA, GQA, and K == H (MHA)
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
    rng = np.random.default_rng(5)
    H, D = 4, 8
    G = H // n_kv_heads
    p = _random_params(rng, D, H, n_kv_heads, head_dim=4)
    mha = _repeat_kv(p, G)
    x = rng.standard_normal((2, 5, D))
    kw = {"causal": True, "rope_theta": 500.0}
    y, cache = attention_forward(p, x, **kw)
    y_mha, cache_mha = attention_forward(mha, x, **kw)
    np.testing.assert_allclose(y, y_mha, rtol=1e-12)
    np.testing.assert_allclose(_jax_attention(p, x, **kw), y_mha, rtol=1e-12)
    np.testing.assert_allclose(_naive_mha(mha, x), attention_forward(mha, x)[0], rtol=1e-12)

    # A shared kv head's gradient is the sum over the query heads it serves.
    dy = rng.standard_normal(y.shape)
    dx, g = attention_backward(p, cache, dy)
    dx_mha, g_mha = attention_backward(mha, cache_mha, dy)
    np.testing.assert_allclose(dx, dx_mha, rtol=1e-12)
    for n in ("key", "value"):
        k = g_mha[n]["kernel"]
        np.testing.assert_allclose(g[n]["kernel"], k.reshape(D, n_kv_heads, G, -1).sum(2), rtol=1e-12)


# --- rotary embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_preserves_norms_and_depends_on_relative_position(layout):
    rng = np.random.default_rng(6)
    B, T, H, E = 2, 6, 2, 8
    q = np.broadcast_to(rng.standard_normal((B, 1, H, E)), (B, T, H, E)).copy()
    k = np.broadcast_to(rng.standard_normal((B, 1, H, E)), (B, T, H, E)).copy()
    pos = np.arange(T)
    for rotate in (
        lambda z, p: rope_forward(z, p, layout=layout)[0],
        lambda z, p: np.asarray(rope(jnp.asarray(z), jnp.asarray(p), layout=layout)),
    ):
        rq = rotate(q, pos)
        np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-13)
        # <R_t q, R_s k> for all t, s is a function of t - s: shifting both positions changes nothing
        dots = np.einsum("bthe,bshe->bhts", rq, rotate(k, pos))
        dots_shifted = np.einsum("bthe,bshe->bhts", rotate(q, pos + 37), rotate(k, pos + 37))
        np.testing.assert_allclose(dots_shifted, dots, rtol=1e-10, atol=1e-12)
        # and constant along each diagonal t - s = c
        for c in range(-T + 1, T):
            diag = np.diagonal(dots, offset=-c, axis1=-2, axis2=-1)
            np.testing.assert_allclose(diag, diag[..., :1] * np.ones_like(diag), rtol=1e-10, atol=1e-12)


def test_rope_layouts_match_their_conventions_and_differ():
    rng = np.random.default_rng(7)
    B, T, H, E = 1, 4, 2, 8
    x = rng.standard_normal((B, T, H, E))
    pos = np.arange(3, 3 + T)
    cos, sin = rope_angles(pos, E, 10000.0, np.float64)  # (T, E/2)
    cos, sin = cos[None, :, None], sin[None, :, None]

    # HF/Llama: x * cos + rotate_half(x) * sin, with cos/sin repeated over both halves.
    x1, x2 = x[..., : E // 2], x[..., E // 2:]
    rotate_half = np.concatenate([-x2, x1], axis=-1)
    hf = x * np.concatenate([cos, cos], -1) + rotate_half * np.concatenate([sin, sin], -1)
    # Meta/GPT-J: adjacent pairs as complex numbers times e^{i angle}.
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    zc = xc * (cos + 1j * sin)
    meta = np.stack([zc.real, zc.imag], axis=-1).reshape(x.shape)

    half, _ = rope_forward(x, pos, layout="half")
    inter, _ = rope_forward(x, pos, layout="interleaved")
    np.testing.assert_allclose(half, hf, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(inter, meta, rtol=1e-13, atol=1e-15)
    assert not np.allclose(half, inter)  # a layout mix-up is detectable
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), layout="half")), hf, rtol=1e-13)
    np.testing.assert_allclose(
        np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), layout="interleaved")), meta, rtol=1e-13
    )


def test_rope_backward_inverts_forward_and_keeps_dtype():
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 2, 4)).astype(dtype)
        y, cache = rope_forward(x, np.arange(3), layout="interleaved")
        assert y.dtype == dtype
        np.testing.assert_allclose(rope_backward(cache, y), x, rtol=1e-5 if dtype == np.float32 else 1e-13)


# --- boundary checks -------------------------------------------------------------------------


def _bad_calls():
    rng = np.random.default_rng(9)
    p = _random_params(rng, 8, 4, 2, head_dim=2)
    x = rng.standard_normal((2, 3, 8))
    odd = _random_params(rng, 8, 2, head_dim=3)
    gqa_bad = _random_params(rng, 8, 3, head_dim=2)
    gqa_bad["key"]["kernel"] = gqa_bad["key"]["kernel"][:, :2]
    gqa_bad["value"]["kernel"] = gqa_bad["value"]["kernel"][:, :2]
    gqa_bad["key"]["bias"] = gqa_bad["key"]["bias"][:2]
    gqa_bad["value"]["bias"] = gqa_bad["value"]["bias"][:2]
    no_value_bias = {n: dict(q) for n, q in p.items()}  # q/k/v biases come together (out is separate)
    del no_value_bias["value"]["bias"]
    return [
        ("key_padding_mask", p, x, {"key_padding_mask": np.ones((2, 4), bool)}),
        ("key_padding_mask", p, x, {"key_padding_mask": np.ones((2, 3), np.int32)}),
        ("positions", p, x, {"rope_theta": 1e4, "positions": np.arange(3.0)}),
        ("positions", p, x, {"rope_theta": 1e4, "positions": np.arange(4)}),
        ("n_kv_heads", gqa_bad, x, {}),
        ("x", p, rng.standard_normal((2, 3, 7)), {}),
        ("x", p, rng.standard_normal((3, 8)), {}),
        ("kv", p, x, {"kv": rng.standard_normal((2, 4, 6))}),
        ("dropout_mask", p, x, {"dropout_mask": np.ones((2, 2, 3, 3), bool), "dropout_rate": 0.1}),
        ("n_heads", p, x, {"n_heads": 2}),
        ("head_dim", odd, x, {"rope_theta": 1e4}),
        ("rope_theta", p, x, {"rope_theta": 1e4, "kv": x}),
        ("bias", no_value_bias, x, {}),
        ("dtype", p, x.astype(np.float32), {}),
    ]


@pytest.mark.parametrize("side", ["numpy", "jax"])
def test_bad_inputs_raise_naming_the_argument(side):
    for name, p, x, kw in _bad_calls():
        kv = kw.pop("kv", None)
        with pytest.raises(ValueError, match=name):
            if side == "numpy":
                attention_forward(p, x, kv, **kw)
            else:
                attention(to_jax(p), jnp.asarray(x), None if kv is None else jnp.asarray(kv),
                          **{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})


def test_rope_bad_inputs():
    x = np.zeros((1, 2, 1, 3))
    with pytest.raises(ValueError, match="head_dim"):
        rope_forward(x, np.arange(2))
    with pytest.raises(ValueError, match="layout"):
        rope_forward(np.zeros((1, 2, 1, 4)), np.arange(2), layout="rotate")
    with pytest.raises(ValueError, match="positions"):
        rope_forward(np.zeros((1, 2, 1, 4)), np.arange(2.0))
    with pytest.raises(ValueError, match="head_dim"):
        rope(jnp.zeros((1, 2, 1, 3)), jnp.arange(2))


def test_init_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        init_attention(np.random.default_rng(0), 8, 4, 3)


# --- Flax module -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"n_heads": 4},
    {"n_heads": 4, "n_kv_heads": 2, "head_dim": 6, "causal": True, "rope_theta": 1e4,
     "rope_layout": "interleaved"},
    {"n_heads": 2, "n_kv_heads": 1, "use_bias": False},
])
def test_linen_module_tree_and_apply(kw):
    B, T, D = 2, 5, 8
    module = Attention(**kw, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, D)))
    # rbg keys: threefry's random bits take seconds to compile on CPU, for no benefit here
    variables = jax.jit(module.init)(jax.random.key(1, impl="rbg"), x)
    tree = to_numpy(variables["params"])
    ref = init_attention(np.random.default_rng(0), D, kw["n_heads"], kw.get("n_kv_heads"),
                         kw.get("head_dim"), bias=kw.get("use_bias", True), dtype=np.float64)
    shapes = dict(tree_leaves_with_path(tree_map(np.shape, tree)))
    assert shapes == dict(tree_leaves_with_path(tree_map(np.shape, ref)))
    assert all(a.dtype == np.float64 for _, a in tree_leaves_with_path(tree))

    mask = jnp.asarray(np.random.default_rng(2).random((B, T)) < 0.8)
    y = jax.jit(module.apply)(variables, x, key_padding_mask=mask)
    want = jax.jit(lambda p, x, m: attention(p, x, key_padding_mask=m, causal=module.causal,
                   rope_theta=module.rope_theta, rope_layout=module.rope_layout))(variables["params"], x, mask)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    # and it is the reference layer too
    y_ref, _ = attention_forward(tree, np.asarray(x), key_padding_mask=np.asarray(mask), causal=module.causal,
                                 rope_theta=module.rope_theta, rope_layout=module.rope_layout)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-10)
