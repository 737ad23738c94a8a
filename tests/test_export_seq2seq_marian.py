"""A default ``seq2seq-tiny`` model (the paper's interleaved sinusoids, no final logits bias)
exports as a MarianMTModel through its exact equivalent, ``bigmodel_port.hf.marian.as_marian``:
the model width permuted so the interleaved table becomes Marian's "concat" one, and a zero
final logits bias.

The property test runs the NumPy reference (the same parameter tree as the JAX model, and no
compile per drawn shape); the JAX forward is checked on the default preset. Tolerances: float64
1e-10 relative (the same math, only the summation order may differ after the permutation);
float32 1e-6 relative (our forward against itself); HF / ONNX 1e-5 abs (the issue's target, as
in ``tests/test_export.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax.models import seq2seq
from bigmodel_jax.tree import to_jax
from bigmodel_port.export import ExportModel, export
from bigmodel_port.hf.marian import as_marian, concat_permutation
from reference_numpy.configs import Seq2SeqConfig, preset
from reference_numpy.layers.embeddings import sinusoidal_positions
from reference_numpy.models import seq2seq as rs2s
from reference_numpy.tree import tree_flatten, tree_map

F64_RTOL, F32_RTOL, HF_TOL = 1e-10, 1e-6, 1e-5


def random_params(config: Seq2SeqConfig, seed: int) -> dict:
    """Every leaf random (norm scales around 1, biases non-zero), so a leaf left unpermuted, or
    permuted along the wrong axis, changes the logits (init's constant scales / zero biases would
    hide it)."""
    rng = np.random.default_rng(seed)
    params = rs2s.init(config, rng)
    dtype = np.dtype(config.dtype)
    return tree_map(lambda a: (a + rng.normal(scale=0.3, size=a.shape)).astype(dtype), params)


def batch_for(config: Seq2SeqConfig, b: int, s: int, t: int, seed: int) -> dict[str, np.ndarray]:
    """Source and target ids; row 0's last source token is padding when it can be."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    if s > 1:
        mask[0, -1] = 0
    return {"input_ids": rng.integers(0, config.vocab_size, (b, s)).astype(np.int32), "attention_mask": mask,
            "decoder_input_ids": rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)}


def logits(params: dict, batch: dict[str, np.ndarray], config: Seq2SeqConfig) -> np.ndarray:
    """Our JAX forward."""
    x = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    return np.asarray(seq2seq.forward(to_jax(params), x, config))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


# --------------------------------------------------------------------------------------------
# the conversion itself


@pytest.mark.parametrize("d_model", [1, 2, 7, 8, 32, 33])
def test_permuted_interleaved_table_is_the_concat_table(d_model: int) -> None:
    """The channel order maps one layout onto the other exactly (odd D: the extra sine channel);
    ``test_hf_marian`` holds "concat" to transformers' MarianSinusoidalPositionalEmbedding."""
    t = np.arange(300)
    inter = sinusoidal_positions(t, d_model, np.float64, layout="interleaved")
    concat = sinusoidal_positions(t, d_model, np.float64, layout="concat")
    perm = concat_permutation(d_model)
    assert sorted(perm.tolist()) == list(range(d_model))
    np.testing.assert_array_equal(inter[:, perm], concat)
    # and from the definitions, not from our table code: sin(t w_j) then cos(t w_j), w_j = 1e4^(-2j/D)
    w = 10000.0 ** (-2.0 * np.arange((d_model + 1) // 2) / d_model)
    want = np.concatenate([np.sin(t[:, None] * w), np.cos(t[:, None] * w[: d_model // 2])], axis=1)
    np.testing.assert_allclose(inter[:, perm], want, rtol=0, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(heads_e=st.sampled_from([(1, 7), (2, 4), (4, 8), (3, 5)]), share=st.booleans(), scale=st.booleans(),
       layout=st.sampled_from(["interleaved", "concat"]), bias=st.booleans(),
       activation=st.sampled_from(["relu", "gelu"]), seed=st.integers(0, 2**16))
def test_as_marian_computes_the_same_logits_in_the_reference_float64(heads_e, share, scale, layout, bias, activation, seed) -> None:
    h, e = heads_e
    config = Seq2SeqConfig(n_layers=2, n_decoder_layers=1, d_model=h * e, n_heads=h, d_ff=12, vocab_size=23,
                           max_len=16, dropout=0.0, label_smoothing=0.0, share_embeddings=share,
                           scale_embeddings=scale, position_layout=layout, final_logits_bias=bias,
                           activation=activation, dtype="float64")
    params = random_params(config, seed)
    before = {k: np.array(v) for k, v in tree_flatten(params).items()}
    new_params, new_config = as_marian(params, config)
    assert (new_config.position_layout, new_config.final_logits_bias) == ("concat", True)
    assert replace(new_config, position_layout=layout, final_logits_bias=bias) == config  # nothing else changed
    for k, v in tree_flatten(params).items():  # the input tree is left as it was
        np.testing.assert_array_equal(v, before[k])
    flat = tree_flatten(new_params)
    assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in tree_flatten(rs2s.init(
        new_config, np.random.default_rng(0))).items()}
    if not bias:
        np.testing.assert_array_equal(flat["final_logits_bias"], 0.0)
    batch = batch_for(config, 2, 6, 5, seed)
    want = rs2s.forward(params, batch, config)
    assert rel_err(want, rs2s.forward(new_params, batch, new_config)) <= F64_RTOL
    if layout == "concat":  # already Marian's layout: the weights are untouched
        for k, v in tree_flatten(params).items():
            np.testing.assert_array_equal(flat[k], v)
    else:  # control: the concat layout without the permutation is another function (the check can fail)
        unpermuted = {**params, "final_logits_bias": flat["final_logits_bias"]}
        assert rel_err(want, rs2s.forward(unpermuted, batch, new_config)) > 1e-3


def test_as_marian_keeps_the_jax_logits_of_default_seq2seq_tiny_float32() -> None:
    config = replace(preset("seq2seq-tiny"), dropout=0.0)
    assert (config.position_layout, config.final_logits_bias, config.dtype) == ("interleaved", False, "float32")
    params = random_params(config, 1)
    new_params, new_config = as_marian(params, config)
    batch = batch_for(config, 3, 9, 7, 2)
    want = logits(params, batch, config)
    assert rel_err(want, logits(new_params, batch, new_config)) <= F32_RTOL


def test_what_marian_cannot_compute_is_still_refused_by_name(tmp_path: Path) -> None:
    config = replace(preset("seq2seq-tiny"), prenorm=True)
    params = random_params(config, 0)
    msg = r"cannot be saved as a MarianMTModel: prenorm=True \(Marian is post-norm\)"
    with pytest.raises(ValueError, match=msg):
        as_marian(params, config)
    for fmt in ("hf", "onnx"):
        with pytest.raises(ValueError, match=msg):
            export(ExportModel(config, params, "MarianMTModel"), tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()  # nothing written
    with pytest.raises(ValueError, match=r"n_kv_heads=2"):
        as_marian(params, replace(config, prenorm=False, n_kv_heads=2))
    post = replace(config, prenorm=False)
    with pytest.raises(ValueError, match=r"missing \['decoder/layers/attn/key/bias'"):
        bad = random_params(post, 0)
        del bad["decoder"]["layers"]["attn"]["key"]["bias"]
        as_marian(bad, post)
    with pytest.raises(ValueError, match=r"takes a Seq2SeqConfig, not GPTConfig"):
        as_marian(params, preset("gpt2-tiny"))


# --------------------------------------------------------------------------------------------
# a default translation run through the CLI, into transformers and onnxruntime


@pytest.mark.slow
def test_a_default_translation_run_exports_to_hf_and_onnx_with_our_logits(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch
    import transformers

    from bigmodel_apps.cli import main
    from bigmodel_apps.cli.export import load_source
    from bigmodel_train.trainer import load_run

    run = tmp_path / "run"
    args = ["task=translation", "model=seq2seq-tiny", "data=numbers", "steps=2", "warmup_steps=0", "eval_every=0",
            "batch_size=4", "seq_len=12", "max_eval_examples=4", "progress=false"]
    assert main(["train", *args, "--run-dir", str(run)]) == 0
    model = load_source(run)
    assert (model.config.position_layout, model.config.final_logits_bias, model.config.prenorm) == (
        "interleaved", False, False)  # the preset's defaults: what used to be refused
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["export", str(run), str(tmp_path / "onnx"), "--format", "onnx"]) == 0

    _, task, _, _ = load_run(run)
    val = task.build_splits()["val"]
    # the run's own tokenised validation pairs, source padding included
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    batch = {k: np.asarray(v) for k, v in val.batch(np.arange(8)).items() if k in keys}
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    mine = logits(model.params, {k: batch[k] for k in keys[:3]}, model.config)
    real = batch["decoder_attention_mask"].astype(bool)  # compare the positions that are tokens

    hf = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(**{k: torch.tensor(batch[k], dtype=torch.long) for k in keys[:3]}).logits.numpy()
    assert float(np.max(np.abs(mine - theirs)[real])) <= HF_TOL

    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = sess.run(None, {k: batch[k].astype(np.int64) for k in keys[:3]})
    assert float(np.max(np.abs(mine - onnx_logits)[real])) <= HF_TOL
