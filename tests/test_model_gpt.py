"""GPT / Llama decoder: reference (hand-written backward) vs JAX, finite differences, bad input."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax.models import gpt as jgpt
from bigmodel_apps.parity.cases.models import gpt_case, gpt_trajectory
from bigmodel_apps.parity.harness import adamw_trajectory, compare, format_rows, gradcheck_case

from reference_numpy.configs import param_count, preset
from reference_numpy.models import gpt as rgpt
from reference_numpy.tree import tree_size

variants = st.fixed_dictionaries({
    "preset": st.sampled_from(["gpt2-tiny", "llama-tiny"]),
    "n_layers": st.integers(1, 2),
    "n_heads": st.sampled_from([2, 4]),
    "norm": st.sampled_from(["layer", "rms"]),
    "gated_mlp": st.booleans(),
    "positions": st.sampled_from(["learned", "rope"]),
    "tie_embeddings": st.booleans(),
    "bias": st.booleans(),
})


def _overrides(v: dict) -> dict:
    v = dict(v)
    kv = 1 if v["n_heads"] == 2 else 2
    v["n_kv_heads"] = kv
    v["activation"] = "silu" if v["gated_mlp"] else "gelu_tanh"
    return v


@pytest.mark.slow
@settings(max_examples=max(6, settings.default.max_examples // 2))  # each example compiles a new model variant
@given(v=variants, dtype=st.sampled_from([np.float64, np.float32]), pad=st.booleans(),
       length=st.integers(1, 6), batch=st.integers(1, 2), seed=st.integers(0, 50))
def test_reference_matches_jax_logits_and_every_gradient(v, dtype, pad, length, batch, seed):
    data = gpt_case(np.random.default_rng(seed), dtype, pad=pad, length=length, batch=batch, **_overrides(v))
    rows = compare(data, dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"gpt {v} {np.dtype(dtype).name}", rows)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_whole_model_backward_matches_finite_differences(name):
    data = gpt_case(np.random.default_rng(0), np.float64, name, n_layers=1, length=4, pad=True)
    report = gradcheck_case(data, seed=1)
    assert report.ok, str(report)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loss_and_grad_agree_and_five_adamw_steps_stay_together(name, dtype):
    params, ref_lg, jax_lg = gpt_trajectory(dtype, name)
    rows = adamw_trajectory(params, ref_lg, jax_lg, dtype, steps=5)
    assert all(r.passed for r in rows), format_rows(f"{name} {np.dtype(dtype).name}", rows)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_param_count_equals_built_tree(name):
    config = preset(name)
    assert tree_size(jgpt.init(config, 0)) == param_count(config)
    assert tree_size(rgpt.init(config, np.random.default_rng(0))) == param_count(config)


def test_causal_logits_ignore_future_tokens():
    config = preset("llama-tiny")
    params = rgpt.init(config, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 6))
    ids2 = ids.copy()
    ids2[0, 4:] = (ids2[0, 4:] + 1) % config.vocab_size
    a = rgpt.forward(params, {"input_ids": ids}, config)
    b = rgpt.forward(params, {"input_ids": ids2}, config)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("impl", ["reference", "jax"])
def test_bad_batches_raise_clear_errors(impl):
    config = preset("gpt2-tiny")
    if impl == "reference":
        params = rgpt.init(config, np.random.default_rng(0))
        run = lambda b: rgpt.forward(params, b, config)  # noqa: E731
    else:
        params = jgpt.init(config, 0)
        run = lambda b: jgpt.forward(params, b, config)  # noqa: E731
    with pytest.raises(ValueError, match="longer than the model supports"):
        run({"input_ids": np.zeros((1, config.max_len + 1), np.int64)})
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 101\)"):
        run({"input_ids": np.array([[1, 101]])})
    with pytest.raises(ValueError, match=r"missing \['input_ids'\]"):
        run({"ids": np.array([[1, 2]])})
    with pytest.raises(ValueError, match="integer"):
        run({"input_ids": np.array([[1.0, 2.0]])})
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        run({"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 3), np.int64)})
