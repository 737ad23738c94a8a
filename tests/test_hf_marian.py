"""Marian checkpoints: transformers' ``MarianMTModel`` (PyTorch) -> our encoder-decoder
(``reference_numpy.models.seq2seq`` and ``bigmodel_jax.models.seq2seq``) -> transformers.

Each test builds a tiny random-init ``MarianMTModel`` (no downloads), saves it to a temp dir and
loads it with ``bigmodel_port.hf.checkpoint.load_pretrained``.

Tolerance: float32 logits within ``TORCH_F32_ATOL`` = 1e-5 max abs of PyTorch's. Both sides
compute the same float32 graph in a different order (fused matmuls, reductions), so they differ
by a few float32 ulps of O(1) activations (~1e-7 each), accumulated over 2 + 2 layers and a
V-wide head; the logits here are O(3), measured error ~1e-6.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bigmodel_jax import generation as jgen
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.tree import to_jax
from bigmodel_port import CheckpointError
from bigmodel_port.hf import marian
from bigmodel_port.hf.checkpoint import load_pretrained, save_pretrained
from reference_numpy import generation as rgen
from reference_numpy.layers.embeddings import sinusoidal_positions
from reference_numpy.models import seq2seq as rs2s
from reference_numpy.tree import tree_leaves_with_path

pytestmark = pytest.mark.hf

TORCH_F32_ATOL = 1e-5
PAD = 58  # Marian's convention: pad is also the decoder start token
EOS = 0

HF_CONFIG = dict(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                 pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS)

VARIANTS = {
    "swish-scaled": dict(activation_function="swish", scale_embedding=True),
    "gelu-unscaled": dict(activation_function="gelu", scale_embedding=False),
    # three separate matrices: source and target embeddings and the LM head
    "untied": dict(activation_function="swish", scale_embedding=True, share_encoder_decoder_embeddings=False,
                   tie_word_embeddings=False),
}


def _hf_model(seed: int = 0, **overrides) -> transformers.MarianMTModel:
    """A random MarianMTModel whose every tensor carries signal: weights std 0.15 (at the 0.02
    init every attention map is uniform), norms and biases moved off 1 / 0, a nonzero
    ``final_logits_bias``."""
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(transformers.MarianConfig(**{**HF_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # the fixed sinusoidal table (a frozen parameter)
                continue
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        model.final_logits_bias.copy_(0.5 * torch.randn_like(model.final_logits_bias))
    return model


def _inputs(seed: int = 1, B: int = 3, S: int = 9, T: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, PAD, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0  # right-padded source rows, pad ids there as a tokenizer writes them
    mask[2, 3:] = 0
    ids[mask == 0] = PAD
    ids[np.arange(B), mask.sum(1) - 1] = EOS  # each sentence ends with EOS
    tgt = rng.integers(0, HF_CONFIG["vocab_size"], (B, T))
    tgt[:, 0] = PAD  # decoder_start_token_id
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": tgt,
            "decoder_attention_mask": np.ones((B, T), np.int64)}


def _torch_logits(model: transformers.MarianMTModel, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for name, overrides in VARIANTS.items():
        model = _hf_model(**overrides)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_on_both_sides(checkpoints, variant):
    d, hf_model = checkpoints[variant]
    pre = load_pretrained(d)
    c = pre.config
    assert (pre.architecture, pre.task) == ("MarianMTModel", "seq2seq_lm")
    assert (c.position_layout, c.final_logits_bias, c.prenorm, c.norm_eps) == ("concat", True, False, 1e-5)
    assert c.share_embeddings == (variant != "untied")
    assert c.activation == {"swish": "silu", "gelu": "gelu"}[VARIANTS[variant]["activation_function"]]
    assert c.scale_embeddings == VARIANTS[variant]["scale_embedding"]
    assert c.label_smoothing == 0.0  # MarianMTModel's loss is plain cross-entropy
    batch = _inputs()
    want = _torch_logits(hf_model, batch)
    ref = rs2s.forward(pre.params, batch, c)
    jx = np.asarray(js2s.forward(to_jax(pre.params), batch, c))
    assert ref.dtype == jx.dtype == np.float32
    for name, got in (("reference", ref), ("jax", jx)):
        err = np.max(np.abs(got - want))
        assert err <= TORCH_F32_ATOL, f"{variant} {name}: max abs {err:.2e} (logits up to {np.abs(want).max():.1f})"


@pytest.mark.parametrize("variant", ["swish-scaled", "untied"])
def test_export_round_trip_is_bit_exact(checkpoints, variant, tmp_path):
    d, hf_model = checkpoints[variant]
    pre = load_pretrained(d)
    out = save_pretrained(tmp_path / "ours", pre.config, pre.params, "MarianMTModel", pre.hf_config)
    # the files: the same tensor names as transformers' own save (tied copies and the derived
    # sinusoidal tables left out), every tensor bit-identical
    theirs, ours = load_file(d / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert not any("embed_positions" in k for k in ours)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
    # transformers loads it, regenerating embed_positions: every tensor of its state_dict equal
    back = transformers.MarianMTModel.from_pretrained(out).eval()
    want, got = hf_model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["activation_function"] == pre.hf_config["activation_function"]  # "swish" kept
    assert (hf_cfg["pad_token_id"], hf_cfg["decoder_start_token_id"]) == (PAD, PAD)
    # and our own load of the export gives the same tree
    again = load_pretrained(out)
    assert again.config == pre.config
    want_leaves = dict(tree_leaves_with_path(pre.params))
    for path, leaf in tree_leaves_with_path(again.params):
        assert np.array_equal(leaf, want_leaves[path]), path


def test_fresh_config_exports_with_in_vocabulary_token_ids(tmp_path):
    """No original config.json: pad / decoder start default to the last id, EOS to 0."""
    pre_cfg = marian.config_from_hf({**HF_CONFIG, "model_type": "marian", "activation_function": "relu"},
                                    "MarianMTModel")
    params = rs2s.init(pre_cfg, np.random.default_rng(0))
    out = save_pretrained(tmp_path, pre_cfg, params, "MarianMTModel")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["pad_token_id"], hf_cfg["decoder_start_token_id"], hf_cfg["eos_token_id"]) == (59, 59, 0)
    back = transformers.MarianMTModel.from_pretrained(out).eval()
    batch = _inputs()
    err = np.max(np.abs(_torch_logits(back, batch) - rs2s.forward(params, batch, pre_cfg)))
    assert err <= TORCH_F32_ATOL


def test_strict_load_names_a_missing_tensor(checkpoints, tmp_path):
    d, _ = checkpoints["swish-scaled"]
    state = load_file(d / "model.safetensors")
    del state["model.decoder.layers.1.encoder_attn.k_proj.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint:\n  "
                                              r"model\.decoder\.layers\.1\.encoder_attn\.k_proj\.bias"):
        load_pretrained(tmp_path)
    partial = load_pretrained(tmp_path, strict=False)
    assert partial.report.initialised == ["decoder/layers/cross_attn/key/bias"]


@pytest.mark.parametrize(("change", "message"), [
    ({"decoder_attention_heads": 2}, "encoder_attention_heads=4 differs from decoder_attention_heads=2"),
    ({"decoder_ffn_dim": 64}, "encoder_ffn_dim=48 differs from decoder_ffn_dim=64"),
    ({"decoder_vocab_size": 70}, "decoder_vocab_size=70 differs from vocab_size=60"),
    ({"normalize_before": True}, "normalize_before=True is not supported"),
    ({"normalize_embedding": True}, "normalize_embedding=True is not supported"),
    ({"add_final_layer_norm": True}, "add_final_layer_norm=True is not supported"),
    ({"share_encoder_decoder_embeddings": False}, "share_encoder_decoder_embeddings=False with tie_word_embeddings"),
    ({"tie_word_embeddings": False}, "share_encoder_decoder_embeddings=True with tie_word_embeddings=False"),
    ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu' is not supported"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        marian.config_from_hf({**HF_CONFIG, "model_type": "marian", **change}, "MarianMTModel")


def test_configs_marian_cannot_express_are_not_exported(tmp_path):
    base = marian.config_from_hf({**HF_CONFIG, "model_type": "marian"}, "MarianMTModel")
    for change, message in (({"prenorm": True}, "prenorm=True"),
                            ({"position_layout": "interleaved"}, "position_layout='interleaved'"),
                            ({"final_logits_bias": False}, "final_logits_bias=False")):
        config = dataclasses.replace(base, **change)
        with pytest.raises(ValueError, match=f"cannot be saved as a MarianMTModel: {message}"):
            save_pretrained(tmp_path, config, rs2s.init(config, np.random.default_rng(0)), "MarianMTModel")


@pytest.mark.parametrize("d_model", [31, 32, 33, 512])
def test_concat_sinusoids_equal_transformers_table(d_model):
    """Our "concat" layout is MarianSinusoidalPositionalEmbedding's table, bit for bit in float32
    (odd D: the sine half has one channel more)."""
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    want = MarianSinusoidalPositionalEmbedding(512, d_model).create_weight().numpy()
    got = sinusoidal_positions(np.arange(512), d_model, np.float32, layout="concat")
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# cached greedy generation vs transformers' generate


def _pad_to(ids: np.ndarray, width: int) -> np.ndarray:
    """HF stops once every row has finished; ours may run on, writing pad: compare at one width."""
    return np.concatenate([ids, np.full((ids.shape[0], width - ids.shape[1]), PAD, ids.dtype)], axis=1)


def _generate_all(hf_model, pre, batch, n: int, hf_kwargs: dict, our_kwargs: dict) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                               num_beams=1, do_sample=False, max_new_tokens=n, **hf_kwargs).numpy()
    kw = dict(max_new_tokens=n, decoder_start_token_id=PAD, pad_token_id=PAD, **our_kwargs)
    src = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = rgen.seq2seq_generate(pre.params, src, pre.config, **kw)
    jx = np.asarray(jgen.seq2seq_generate(to_jax(pre.params), src, pre.config, **kw))
    return tuple(_pad_to(a, 1 + n) for a in (hf, ref, jx))


@pytest.mark.parametrize("variant", ["swish-scaled", "untied"])
def test_cached_greedy_generation_equals_transformers(checkpoints, variant):
    """HF greedy with its Marian logits rules turned off (the generation config transformers
    builds for Marian has ``forced_eos_token_id`` from MarianConfig; we pass None), with an EOS
    id that one row emits mid-sequence so the pad filling after EOS is exercised."""
    d, hf_model = checkpoints[variant]
    pre = load_pretrained(d)
    batch, n = _inputs(seed=5), 8
    # pick as EOS the token row 0 emits third, so that row finishes early and the others do not
    free = rgen.seq2seq_generate(pre.params, batch, pre.config, max_new_tokens=n, decoder_start_token_id=PAD)
    eos = int(free[0, 3])
    hf, ref, jx = _generate_all(hf_model, pre, batch, n, dict(eos_token_id=eos, forced_eos_token_id=None),
                                dict(eos_token_id=eos))
    assert np.any(hf[:, 1:] == eos), "the test needs an EOS in the output"
    np.testing.assert_array_equal(ref, hf)
    np.testing.assert_array_equal(jx, hf)


def test_marian_logits_rules_match_transformers(tmp_path):
    """Released Marian checkpoints generate with ``bad_words_ids=[[pad]]`` (pad is never
    generated) and ``forced_eos_token_id`` (the last of ``max_new_tokens`` tokens is EOS): HF
    applies them as logits processors; we mirror them with ``suppress_tokens=(pad,)`` and
    ``forced_eos_token_id`` (``marian.generation_options`` reads them from the config). The pad
    logit is raised so that, unsuppressed, greedy would pick it."""
    hf_model = _hf_model(activation_function="swish", scale_embedding=True)
    with torch.no_grad():
        hf_model.final_logits_bias[0, PAD] += 4.0
    hf_model.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path)
    batch, n = _inputs(seed=6), 5
    options = marian.generation_options({**pre.hf_config, "bad_words_ids": [[PAD], [EOS]]})
    assert options == dict(decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD,
                           forced_eos_token_id=EOS, suppress_tokens=(PAD,))  # HF never bans EOS
    hf, ref, jx = _generate_all(hf_model, pre, batch, n, dict(bad_words_ids=[[PAD], [EOS]]),
                                {k: v for k, v in options.items() if k not in ("decoder_start_token_id",
                                                                              "pad_token_id")})
    first_eos = np.argmax(hf[:, 1:] == EOS, axis=1)
    assert np.all((hf[:, 1:] == EOS).any(axis=1)), "forced EOS ends every row"
    assert all(PAD not in row[1:1 + e] for row, e in zip(hf, first_eos)), "pad generated before EOS"
    np.testing.assert_array_equal(ref, hf)
    np.testing.assert_array_equal(jx, hf)
    # without the rules the raised pad logit wins somewhere, so the rules were exercised
    free = rgen.seq2seq_generate(pre.params, batch, pre.config, max_new_tokens=n, decoder_start_token_id=PAD)
    assert np.any(free[:, 1:] == PAD)


def test_logits_rules_are_checked():
    config = marian.config_from_hf({**HF_CONFIG, "model_type": "marian"}, "MarianMTModel")
    params = rs2s.init(config, np.random.default_rng(0))
    batch = {"input_ids": np.array([[1, 2, 0]])}
    for gen, p in ((rgen, params), (jgen, to_jax(params))):
        with pytest.raises(ValueError, match=r"suppress_tokens must lie in \[0, 60\), got 60"):
            gen.seq2seq_generate(p, batch, config, max_new_tokens=2, suppress_tokens=(60,))
        with pytest.raises(ValueError, match="forced_eos_token_id=0 is also in suppress_tokens"):
            gen.seq2seq_generate(p, batch, config, max_new_tokens=2, suppress_tokens=(0,), forced_eos_token_id=0)
    with pytest.raises(ValueError, match="multi-token sequence"):
        marian.generation_options({"bad_words_ids": [[PAD, EOS]]})
