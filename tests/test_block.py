"""The Transformer block: reference backward vs finite differences and vs jax.vjp, linen twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax.layers.block import Block, block
from bigmodel_apps.parity.cases.block import block_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_numpy
from reference_numpy.layers.block import BlockSpec
from reference_numpy.tree import tree_leaves_with_path

options = st.fixed_dictionaries({
    "prenorm": st.booleans(),
    "norm": st.sampled_from(["layer", "rms"]),
    "gated_mlp": st.booleans(),
    "causal": st.booleans(),
    "rope": st.booleans(),
    "cross": st.booleans(),
    "pad": st.booleans(),
    "dropout": st.sampled_from([0.0, 0.3]),
    "bias": st.booleans(),
    "length": st.integers(1, 4),
    "src_length": st.integers(1, 4),
    "n_heads": st.sampled_from([1, 2, 4]),
})


def _fix(o: dict) -> dict:
    o = dict(o)
    o["n_kv_heads"] = 1 if o["n_heads"] == 4 else o["n_heads"]
    return o


@pytest.mark.slow
@settings(max_examples=max(6, settings.default.max_examples // 2))  # a JAX compile per example
@given(o=options, dtype=st.sampled_from([np.float64, np.float32]), seed=st.integers(0, 99))
def test_block_reference_matches_jax(o, dtype, seed):
    o = _fix(o)
    rows = compare(block_case(np.random.default_rng(seed), dtype, **o), dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"block {o}", rows)


@settings(max_examples=max(6, settings.default.max_examples // 2))  # a JAX compile per example
@given(o=options, seed=st.integers(0, 99))
def test_block_backward_matches_finite_differences(o, seed):
    o = _fix(o)
    report = gradcheck_case(block_case(np.random.default_rng(seed), np.float64, **o), seed=seed)
    assert report.ok, f"{o}\n{report}"


def test_linen_block_tree_and_output_match_the_pure_function():
    spec = BlockSpec(prenorm=False, norm="layer", causal=True)
    mod = Block(spec, n_heads=2, d_ff=12, cross=True)
    x = jnp.ones((2, 3, 8), jnp.float32) * jnp.arange(8, dtype=jnp.float32) / 8
    enc = jnp.ones((2, 4, 8), jnp.float32)
    variables = mod.init(jax.random.key(0), x, enc)
    params = to_numpy(variables["params"])
    want = to_numpy(block_case(np.random.default_rng(0), np.float32, prenorm=False, cross=True,
                               n_heads=2, d_model=8, d_ff=12).params)
    got_shapes = {p: a.shape for p, a in tree_leaves_with_path(params)}
    want_shapes = {p: a.shape for p, a in tree_leaves_with_path(want)}
    assert got_shapes == want_shapes
    np.testing.assert_allclose(mod.apply(variables, x, enc), block(variables["params"], x, spec, enc=enc),
                               rtol=1e-6)
