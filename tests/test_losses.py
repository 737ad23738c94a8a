"""Cross-entropy, MSE and BCE-with-logits: reference backward vs finite differences, reference vs
JAX, independent float64 spellings of each loss, the edge cases (saturated logits, every label
ignored), and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_jax import losses as jlosses
from bigmodel_apps.parity.cases.losses import IGNORE_INDEX, bce_with_logits_case, cross_entropy_case, mse_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from reference_numpy import losses as rlosses

BATCH_SHAPES = [(1,), (3,), (1, 1), (2, 4)]

# Jitted once here: eager value_and_grad dispatches (and compiles) every op separately, which
# costs seconds per new shape; jit also proves the losses trace with labels as tracers.
_ce_value_and_grad = jax.jit(
    jax.value_and_grad(jlosses.cross_entropy), static_argnames=("ignore_index", "label_smoothing")
)
_bce_value_and_grad = jax.jit(jax.value_and_grad(jlosses.bce_with_logits))


@st.composite
def case_and_options(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["cross_entropy", "cross_entropy", "mse", "bce"]))
    shape = draw(st.sampled_from(BATCH_SHAPES))
    if kind == "mse":
        return mse_case, {"shape": shape}
    if kind == "bce":
        return bce_with_logits_case, {"shape": shape, "soft": draw(st.booleans()),
                                      "scale": draw(st.sampled_from([0.1, 2.0, 30.0]))}
    return cross_entropy_case, {
        "batch_shape": shape,
        "vocab_size": draw(st.integers(1, 8)),
        "ignored_fraction": draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "scale": draw(st.sampled_from([0.1, 2.0, 30.0])),
    }


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


# --- cross-entropy against an independent spelling --------------------------------------------


def _naive_cross_entropy(logits, labels, eps):
    """log of an explicit softmax (fine at small logits), dense smoothed targets, float64."""
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    V = logits.shape[-1]
    valid = labels != IGNORE_INDEX
    t = (1 - eps) * np.eye(V)[np.where(valid, labels, 0)] + eps / V
    per_row = -(t * np.log(p)).sum(-1)
    n = valid.sum()
    return per_row[valid].sum() / n, (p - t) * (valid / n)[..., None]


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_the_explicit_softmax(eps):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 4, 6))
    labels = rng.integers(0, 6, size=(3, 4))
    labels[0, :2] = IGNORE_INDEX
    want_loss, want_grad = _naive_cross_entropy(logits, labels, eps)
    loss, cache = rlosses.cross_entropy_forward(logits, labels, label_smoothing=eps)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-13)
    np.testing.assert_allclose(rlosses.cross_entropy_backward(cache, 1.0), want_grad, rtol=1e-12, atol=1e-16)
    jloss, jgrad = _ce_value_and_grad(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
    np.testing.assert_allclose(float(jloss), want_loss, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(jgrad), want_grad, rtol=1e-12, atol=1e-16)


def test_label_smoothing_moves_mass_as_pytorch_does():
    """V = 2, eps = 0.2: target (0.9, 0.1); at equal logits the loss is log 2 for any eps."""
    logits = np.zeros((1, 2))
    labels = np.array([0])
    loss, cache = rlosses.cross_entropy_forward(logits, labels, label_smoothing=0.2)
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-15)
    np.testing.assert_allclose(rlosses.cross_entropy_backward(cache, 1.0), [[0.5 - 0.9, 0.5 - 0.1]], rtol=1e-15)


# --- edge cases -------------------------------------------------------------------------------


def _both_sides(logits, labels, eps):
    """[(loss, dlogits) of the reference, (loss, dlogits) of JAX under jit]."""
    loss, cache = rlosses.cross_entropy_forward(logits, labels, label_smoothing=eps)
    grad = rlosses.cross_entropy_backward(cache, np.ones((), logits.dtype))
    with jax.numpy_dtype_promotion("strict"):
        jloss, jgrad = _ce_value_and_grad(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
    return [(loss, grad), (np.asarray(jloss), np.asarray(jgrad))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_logits_of_1e4_give_finite_loss_and_gradient(dtype, eps):
    rng = np.random.default_rng(1)
    # Each row a permutation of (-1e4, -5e3, 0, 5e3, 1e4): the softmax is one-hot at the max, so
    # without smoothing the loss is mean(max - logit[label]) and the gradient
    # (onehot(argmax) - onehot(label)) / N, both exactly.
    logits = ((np.argsort(rng.random((4, 5)), axis=-1) - 2) * 5e3).astype(dtype)
    labels = rng.integers(0, 5, size=4)
    want = np.mean(logits.max(-1).astype(np.float64) - logits[np.arange(4), labels])
    for loss, grad in _both_sides(logits, labels, eps):
        assert loss.dtype == grad.dtype == dtype
        assert np.isfinite(loss) and np.isfinite(grad).all()
        if eps == 0:
            assert loss == want
            onehot = np.eye(5)
            np.testing.assert_array_equal(grad, (onehot[logits.argmax(-1)] - onehot[labels]) / 4)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_every_label_ignored_gives_zero_loss_and_zero_gradient(eps):
    logits = np.random.default_rng(2).standard_normal((2, 3, 4)) * 1e4
    labels = np.full((2, 3), IGNORE_INDEX)
    for loss, grad in _both_sides(logits, labels, eps):
        assert loss == 0.0 and not np.isnan(loss)
        np.testing.assert_array_equal(grad, 0)


def test_a_custom_ignore_index_is_honoured_on_both_sides():
    logits = np.random.default_rng(3).standard_normal((4, 3))
    labels = np.array([0, 7, 2, 7])
    loss, _ = rlosses.cross_entropy_forward(logits, labels, ignore_index=7)
    want, _ = rlosses.cross_entropy_forward(logits[[0, 2]], labels[[0, 2]])
    np.testing.assert_allclose(loss, want, rtol=1e-15)
    jloss, _ = _ce_value_and_grad(jnp.asarray(logits), jnp.asarray(labels), ignore_index=7)
    np.testing.assert_allclose(float(jloss), want, rtol=1e-14)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_float32_keeps_its_digits_under_a_large_common_offset(offset):
    """Parity only (finite differences cannot resolve a 1e-6 step on a logit of 1e4)."""
    for eps in (0.0, 0.1):
        data = cross_entropy_case(np.random.default_rng(4), np.float32, offset=offset, label_smoothing=eps)
        rows = compare(data, np.float32)
        assert all(r.passed for r in rows), format_rows(f"offset {offset} eps {eps}", rows)


# --- MSE and BCE ------------------------------------------------------------------------------


def test_mse_and_bce_match_their_definitions():
    rng = np.random.default_rng(5)
    pred, target = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss, cache = rlosses.mse_forward(pred, target)
    np.testing.assert_allclose(loss, np.mean((pred - target) ** 2), rtol=1e-15)
    np.testing.assert_allclose(rlosses.mse_backward(cache, 1.0), 2 * (pred - target) / 12, rtol=1e-15)
    np.testing.assert_allclose(float(jlosses.mse(jnp.asarray(pred), jnp.asarray(target))), loss, rtol=1e-15)

    x, t = rng.standard_normal((3, 4)), rng.random((3, 4))
    s = 1 / (1 + np.exp(-x))
    want = np.mean(-t * np.log(s) - (1 - t) * np.log(1 - s))
    loss, cache = rlosses.bce_with_logits_forward(x, t)
    np.testing.assert_allclose(loss, want, rtol=1e-14)
    np.testing.assert_allclose(rlosses.bce_with_logits_backward(cache, 1.0), (s - t) / 12, rtol=1e-13)
    np.testing.assert_allclose(float(jlosses.bce_with_logits(jnp.asarray(x), jnp.asarray(t))), want, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_with_logits_of_1e4_is_finite_and_exact(dtype):
    x = np.array([1e4, -1e4, 1e4, -1e4], dtype)
    t = np.array([1, 0, 0, 1], dtype)  # two right with certainty (loss 0), two wrong (loss 1e4)
    loss, cache = rlosses.bce_with_logits_forward(x, t)
    assert loss.dtype == dtype and loss == 5e3
    np.testing.assert_array_equal(rlosses.bce_with_logits_backward(cache, 1.0), np.array([0, 0, 1, -1], dtype) / 4)
    jloss, jgrad = _bce_value_and_grad(jnp.asarray(x), jnp.asarray(t))
    assert float(jloss) == 5e3
    np.testing.assert_array_equal(np.asarray(jgrad), np.array([0, 0, 1, -1], dtype) / 4)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["reference", "jax"])
def test_bad_input_names_the_argument(side):
    if side == "reference":
        ce = lambda lg, lb, **k: rlosses.cross_entropy_forward(lg, np.asarray(lb), **k)  # noqa: E731
        mse, bce = rlosses.mse_forward, rlosses.bce_with_logits_forward
        conv = np.asarray
    else:
        ce = lambda lg, lb, **k: jlosses.cross_entropy(jnp.asarray(lg), jnp.asarray(lb), **k)  # noqa: E731
        mse = lambda a, b: jlosses.mse(jnp.asarray(a), jnp.asarray(b))  # noqa: E731
        bce = lambda a, b: jlosses.bce_with_logits(jnp.asarray(a), jnp.asarray(b))  # noqa: E731
        conv = jnp.asarray
    logits = conv(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or equal ignore_index \(-100\), found label 3"):
        ce(logits, [0, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*found label -1"):
        ce(logits, [-1, 0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*found label -100"):
        ce(logits, [-100, 0], ignore_index=-1)
    with pytest.raises(ValueError, match="labels must be an integer array"):
        ce(logits, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"labels must have logits' leading shape \(2,\), got \(3,\)"):
        ce(logits, [0, 1, 2])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        ce(logits, [0, 1], label_smoothing=1.5)
    with pytest.raises(ValueError, match="logits must be a floating-point array"):
        ce(conv(np.zeros((2, 3), int)), [0, 1])
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\)"):
        mse(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        bce(np.zeros((2,)), np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        bce(np.zeros((2,)), np.zeros((3,)))
