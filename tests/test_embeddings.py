"""Token embeddings, the tied head, learned and sinusoidal positions: reference backward vs
finite differences, reference vs JAX, the Flax modules, the conventions, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax.layers import embeddings as jemb
from bigmodel_apps.parity.cases.embeddings import (
    embedding_attend_case,
    embedding_case,
    position_embedding_case,
    sinusoidal_positions_case,
)
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.layers import embeddings as remb


@st.composite
def case_and_options(draw: st.DrawFn) -> tuple:
    """One of the four cases with tiny sizes (T and batch down to 1, vocabularies of 1..6)."""
    kind = draw(st.sampled_from(["embedding", "attend", "position", "sinusoidal"]))
    batch, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    d_model = draw(st.integers(1, 6))
    if kind == "embedding":
        return embedding_case, {"vocab_size": draw(st.integers(1, 6)), "d_model": d_model, "batch": batch, "T": T}
    if kind == "attend":
        return embedding_attend_case, {"tied": draw(st.booleans()), "vocab_size": draw(st.integers(1, 6)),
                                       "d_model": d_model, "batch": batch, "T": T}
    if kind == "position":
        return position_embedding_case, {"batched": draw(st.booleans()), "max_len": draw(st.integers(T, 8)),
                                         "d_model": d_model, "batch": batch, "T": T}
    return sinusoidal_positions_case, {"layout": draw(st.sampled_from(remb.LAYOUTS)), "d_model": d_model,
                                       "batch": batch, "T": T, "start": draw(st.sampled_from([0, 7, 5000]))}


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


# --- token embedding --------------------------------------------------------------------------


def test_repeated_ids_accumulate_on_both_sides():
    rng = np.random.default_rng(0)
    params = {"embedding": rng.standard_normal((4, 3))}
    ids = np.array([[2, 2, 0], [2, 1, 2]])
    dy = rng.standard_normal((2, 3, 3))
    y, cache = remb.embedding_forward(params, ids)
    np.testing.assert_array_equal(y, params["embedding"][ids])
    dx, grads = remb.embedding_backward(params, cache, dy)
    assert dx is None
    want = np.zeros((4, 3))
    want[2] = dy[0, 0] + dy[0, 1] + dy[1, 0] + dy[1, 2]  # four occurrences of id 2
    want[0], want[1] = dy[0, 2], dy[1, 1]
    np.testing.assert_allclose(grads["embedding"], want, rtol=1e-15)
    _, vjp = jax.vjp(lambda p: jemb.embed(p, jnp.asarray(ids)), to_jax(params))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]["embedding"]), want, rtol=1e-15)


def test_tied_head_is_x_times_embedding_transpose():
    rng = np.random.default_rng(1)
    params = {"embedding": rng.standard_normal((5, 3)).astype(np.float32)}
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)  # a length-1 sequence
    logits, _ = remb.embedding_attend(params, x)
    assert logits.shape == (2, 1, 5) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, np.einsum("BTD,VD->BTV", x, params["embedding"]), rtol=1e-6)


# --- positions --------------------------------------------------------------------------------


def test_positions_broadcast_over_the_batch_and_backward_sums_it():
    rng = np.random.default_rng(2)
    params = {"embedding": rng.standard_normal((6, 2))}
    y, cache = remb.position_embedding_forward(params, np.arange(4))  # (T, D)
    assert y.shape == (4, 2)
    dy = rng.standard_normal((3, 4, 2))  # the gradient of (B, T, D) activations
    _, grads = remb.position_embedding_backward(params, cache, dy)
    np.testing.assert_allclose(grads["embedding"][:4], dy.sum(axis=0), rtol=1e-15)
    np.testing.assert_array_equal(grads["embedding"][4:], 0)
    with pytest.raises(ValueError, match="dy must have shape"):
        remb.position_embedding_backward(params, cache, dy[:, :3])


def _vaswani(positions, d_model):
    """The paper's equations, one channel at a time (an independent spelling, test-only)."""
    return np.array([[np.sin(t / 10000 ** (j / d_model)) if j % 2 == 0 else np.cos(t / 10000 ** ((j - 1) / d_model))
                      for j in range(d_model)] for t in positions])


@pytest.mark.parametrize("d_model", [1, 6, 7])
def test_sinusoidal_layouts_follow_the_paper_and_marian(d_model):
    positions = np.array([0, 1, 5, 300])
    want = _vaswani(positions, d_model)
    inter = remb.sinusoidal_positions(positions, d_model, np.float64, layout="interleaved")
    np.testing.assert_allclose(inter, want, rtol=1e-13, atol=1e-13)
    # Marian: every sin channel first, then every cos channel (same frequencies).
    concat = remb.sinusoidal_positions(positions, d_model, np.float64, layout="concat")
    np.testing.assert_array_equal(concat, np.concatenate([inter[:, 0::2], inter[:, 1::2]], axis=-1))
    np.testing.assert_array_equal(inter[0, 0::2], 0)
    np.testing.assert_array_equal(inter[0, 1::2], 1)
    for layout, ref in [("interleaved", inter), ("concat", concat)]:
        got = jemb.sinusoidal_positions(jnp.asarray(positions), d_model, jnp.float64, layout=layout)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-13, atol=1e-13)


def test_sinusoidal_table_keeps_the_requested_dtype_and_batched_positions():
    pos = np.arange(6).reshape(2, 3)
    table = remb.sinusoidal_positions(pos, 4, np.float32)
    assert table.shape == (2, 3, 4) and table.dtype == np.float32
    jtable = jemb.sinusoidal_positions(jnp.asarray(pos), 4, jnp.float32)
    assert jtable.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(jtable), table)  # both round one float64 table


# --- Flax modules -----------------------------------------------------------------------------


def test_flax_embed_tree_lookup_and_attend_match_the_reference():
    module = jemb.Embed(num_embeddings=7, features=3, dtype=jnp.float64)
    ids = np.array([[0, 6, 6]])
    variables = module.init(jax.random.key(0), jnp.asarray(ids))
    params = to_numpy(variables["params"])
    assert list(params) == ["embedding"] and params["embedding"].shape == (7, 3)
    assert params["embedding"].dtype == np.float64
    y = module.apply(variables, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(y), remb.embedding_forward(params, ids)[0])
    x = np.random.default_rng(3).standard_normal((2, 3))
    logits = module.apply(variables, jnp.asarray(x), method=jemb.Embed.attend)
    np.testing.assert_allclose(np.asarray(logits), remb.embedding_attend(params, x)[0], rtol=1e-13)


def test_flax_position_embedding_tree_matches_the_reference():
    module = jemb.PositionEmbedding(max_len=5, features=2, dtype=jnp.float64)
    variables = module.init(jax.random.key(0), jnp.arange(3))
    params = to_numpy(variables["params"])
    assert list(params) == ["embedding"] and params["embedding"].shape == (5, 2)
    y = module.apply(variables, jnp.arange(3))
    np.testing.assert_array_equal(np.asarray(y), remb.position_embedding_forward(params, np.arange(3))[0])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["reference", "jax"])
def test_bad_ids_and_positions_name_the_argument(side):
    E = {"embedding": np.zeros((4, 2))}
    P = {"embedding": np.zeros((3, 2))}
    if side == "reference":
        embed = lambda p, i: remb.embedding_forward(p, np.asarray(i))  # noqa: E731
        pos = lambda p, i: remb.position_embedding_forward(p, np.asarray(i))  # noqa: E731
        attend = remb.embedding_attend
        sinus = remb.sinusoidal_positions
    else:
        embed = lambda p, i: jemb.embed(to_jax(p), jnp.asarray(i))  # noqa: E731
        pos = lambda p, i: jemb.position_embedding(to_jax(p), jnp.asarray(i))  # noqa: E731
        attend = lambda p, x: jemb.attend(to_jax(p), jnp.asarray(x))  # noqa: E731
        sinus = lambda i, *a, **k: jemb.sinusoidal_positions(jnp.asarray(i), *a, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\), found id 4"):
        embed(E, [[0, 4]])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\), found id -1"):
        embed(E, [[-1, 0]])
    with pytest.raises(ValueError, match="ids must be an integer array"):
        embed(E, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="positions must be < max_len = 3.*longer than the model supports"):
        pos(P, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="positions must be >= 0"):
        pos(P, [-1, 0])
    with pytest.raises(ValueError, match="positions must be an integer array"):
        pos(P, [0.0, 1.0])
    with pytest.raises(ValueError, match="positions must have 1 or 2 dimensions"):
        pos(P, np.zeros((1, 1, 2), int))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\) = \(\.\.\., 2\)"):
        attend(E, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="layout must be one of"):
        sinus(np.arange(3), 4, layout="half")
    with pytest.raises(ValueError, match="positions must be an integer array"):
        sinus(np.arange(3.0), 4)


def test_jitted_lookup_skips_value_checks_but_keeps_shape_checks():
    """Under jit ids are tracers: values cannot be checked, dtypes still are."""
    E = to_jax({"embedding": np.ones((4, 2))})
    fn = jax.jit(jemb.embed)
    assert np.isnan(np.asarray(fn(E, jnp.asarray([5])))).all()  # fill mode: NaN, not a wrong row
    with pytest.raises(ValueError, match="ids must be an integer array"):
        fn(E, jnp.asarray([1.0]))
