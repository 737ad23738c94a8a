"""The NumPy reference's fast paths compute the same numbers as the plain NumPy they replace.

* ``contract.einsum`` (one BLAS call on transposed views) against ``np.einsum``: every
  contraction the reference uses, random shapes, float64 to ~1e-15 relative (BLAS may sum in
  another order, so not bit-for-bit); specs outside its pattern fall back; errors are NumPy's.
* ``contract.rows_matmul`` against ``@``.
* ``chunks.elementwise`` against the whole-array formula: bit-identical, for sizes on and
  around the chunk boundaries and for 1, 2 and 3 threads.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_numpy.speed import chunks
from reference_numpy.speed.contract import einsum, rows_matmul

# every two-operand contraction in reference_numpy (grep 'einsum("')
SPECS = [
    "BKGNS,BSKE->BNKGE", "BKGTS,BSKE->BTKGE", "BKGTS,BTKGE->BSKE", "BNHE,HED->BND",
    "BNKGE,BSKE->BKGNS", "BSD,BSKE->DKE", "BSD,LDHE->LBSHE", "BSKE,DKE->BSD", "BTD,BTHE->DHE",
    "BTD,BTV->DV", "BTD,HED->BTHE", "BTHE,BTD->HED", "BTHE,DHE->BTD", "BTHE,HED->BTD",
    "BTKGE,BSKE->BKGTS",
]


@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(SPECS), sizes=st.lists(st.integers(1, 5), min_size=11, max_size=11),
       seed=st.integers(0, 2**16))
def test_einsum_matches_numpy(spec, sizes, seed):
    letters = sorted(set(spec) - set(",->"))
    dims = dict(zip(letters, sizes))
    (sa, sb), _ = spec.split("->")[0].split(","), spec.split("->")[1]
    rng = np.random.default_rng(seed)
    a = rng.standard_normal([dims[c] for c in sa])
    b = rng.standard_normal([dims[c] for c in sb])
    want = np.einsum(spec, a, b)
    got = einsum(spec, a, b)
    assert got.shape == want.shape
    # float64: only the summation order may differ (sums of <= 125 terms)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * max(1.0, np.abs(want).max()))


def test_einsum_reads_strided_operands_and_falls_back():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4, 5)).transpose(1, 0, 2)[:, ::2]  # non-contiguous view
    b = rng.standard_normal((5, 3))
    np.testing.assert_allclose(einsum("ijk,kl->ijl", a, b), np.einsum("ijk,kl->ijl", a, b), rtol=1e-13)
    # a trace inside one operand and a letter summed in one operand only: NumPy's own path
    m = rng.standard_normal((3, 3))
    np.testing.assert_allclose(einsum("ii,ij->j", m, b[:3]), np.einsum("ii,ij->j", m, b[:3]), rtol=1e-13)
    np.testing.assert_allclose(einsum("ij,jk->k", m, b[:3]), np.einsum("ij,jk->k", m, b[:3]), rtol=1e-13)


def test_einsum_shape_mismatch_is_numpys_error():
    with pytest.raises(ValueError, match="label 'D'"):
        einsum("BTD,DHE->BTHE", np.ones((2, 3, 4)), np.ones((5, 2, 2)))


def test_rows_matmul_matches_matmul():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 4))
    for shape in [(7,), (3, 7), (2, 3, 7), (2, 2, 3, 7)]:
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(rows_matmul(x, w), x @ w, rtol=1e-14, atol=1e-14)
        assert rows_matmul(x, w).shape == shape[:-1] + (4,)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("size_in_chunks", [0.5, 2, 2.5, 7.25])
def test_elementwise_is_the_whole_array_formula(monkeypatch, threads, size_in_chunks):
    monkeypatch.setenv("BIGMODEL_NUMPY_THREADS", threads)
    monkeypatch.setattr(chunks, "CHUNK", 64)  # small chunks: many boundaries, quickly
    n = int(64 * size_in_chunks)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.standard_normal((n, 3)).astype(np.float32)

    def formula(a, b):
        return np.exp(-0.5 * a * a) * b / (1.0 + np.abs(b))

    got = chunks.elementwise(formula, x, y)
    want = formula(x, y)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_elementwise_broadcasting_takes_one_plain_call(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 4)
    calls = []

    def formula(a, b):
        calls.append(a.shape)
        return a * b

    x, y = np.arange(40.0).reshape(10, 4), np.arange(4.0)
    np.testing.assert_array_equal(chunks.elementwise(formula, x, y), x * y)
    assert calls == [(10, 4)]
