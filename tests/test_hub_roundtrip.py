"""save_pretrained -> from_pretrained round-trips for every model class, head and config option.

Our own round trip only (the comparisons with transformers live in tests/test_hf_*.py): for each
class of both backends (``bigmodel_port.hub.numpy`` and ``.jax``), hypothesis draws a tiny
config over the options that class's HF architecture can express, builds the model from a random
init, saves it, loads it back, and checks that the config is equal and every parameter is
bit-identical (same dtype, same bytes). Configs the architecture cannot express are drawn too:
the save must refuse them by naming the field, before writing anything.

Which leaves each class holds is stated here from transformers' classes (``TOP_LEVEL``), not
taken from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from bigmodel_port.hf.checkpoint import load_pretrained, save_pretrained
from bigmodel_port.hub import jax as bj
from bigmodel_port.hub import numpy as rn
from reference_numpy.configs import BertConfig, GPTConfig, Seq2SeqConfig, ViTConfig, param_shapes, preset
from reference_numpy.models.common import init_params
from reference_numpy.models.bert import param_shapes as bert_param_shapes
from reference_numpy.tree import tree_leaves_with_path

BACKENDS = {"numpy": rn, "jax": bj}
# Our activation names that HF configs spell (ACTIVATIONS_TO_HF's keys, listed independently).
ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu", "tanh"]

# The top-level subtrees of each class's tree, from transformers: BertModel and
# BertForSequenceClassification build a pooler (add_pooling_layer=True), the other BERT heads do
# not; ViTModel has a pooler and no classifier, ViTForImageClassification the reverse; a base
# GPT-2 / Llama has no lm_head. (``lm_head`` of the causal LMs and Marian depends on tying.)
TOP_LEVEL = {
    "BertModel": {"embeddings", "layers", "pooler"},
    "BertForMaskedLM": {"embeddings", "layers", "mlm"},
    "BertForSequenceClassification": {"embeddings", "layers", "pooler", "classifier"},
    "BertForTokenClassification": {"embeddings", "layers", "classifier"},
    "BertForQuestionAnswering": {"embeddings", "layers", "qa"},
    "GPT2Model": {"embed", "position", "layers", "final_norm"},
    "LlamaModel": {"embed", "layers", "final_norm"},
    "ViTModel": {"cls_token", "position", "patch_embed", "layers", "final_norm", "pooler"},
    "ViTForImageClassification": {"cls_token", "position", "patch_embed", "layers", "final_norm", "head"},
}
ARCHITECTURES = sorted(name for name in rn.CLASSES if not name.startswith("Auto"))

SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fresh_dir(tmp_path: Path) -> Path:
    """One directory per hypothesis example (``tmp_path`` is shared by all of a test's examples)."""
    return tmp_path / uuid.uuid4().hex


def _numpy_leaves(model: Any) -> dict[str, np.ndarray]:
    return dict(tree_leaves_with_path(model.backend.to_numpy(model.params)))


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), k


# --------------------------------------------------------------------------------------------
# configs each architecture can express


def _heads(draw: Any, *, even: bool = False) -> tuple[int, int]:
    """(H, E) of a tiny attention: D = H E."""
    h = draw(st.sampled_from([1, 2, 4]))
    e = draw(st.sampled_from([2, 4] if even else [1, 2, 3]))
    return h, e


def _common(draw: Any) -> dict[str, Any]:
    return dict(n_layers=draw(st.integers(1, 2)), d_ff=draw(st.integers(1, 12)),
                dropout=draw(st.sampled_from([0.0, 0.1, 0.25])),
                activation=draw(st.sampled_from(ACTIVATIONS)),
                dtype=draw(st.sampled_from(["float32", "float64"])))


@st.composite
def bert_configs(draw: Any, arch: str) -> BertConfig:
    h, e = _heads(draw)
    # the pooler of a head that does not read it is drawn freely: the class removes it
    pooler = True if arch in ("BertModel", "BertForSequenceClassification") else draw(st.booleans())
    return BertConfig(**_common(draw), d_model=h * e, n_heads=h, vocab_size=draw(st.integers(3, 30)),
                      max_len=draw(st.integers(1, 16)), type_vocab_size=draw(st.integers(1, 3)),
                      norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.5])),
                      num_labels=draw(st.integers(1, 4)), pooler=pooler)


@st.composite
def gpt2_configs(draw: Any, arch: str) -> GPTConfig:
    """GPT-2: learned positions, layer norm, plain MLP with biases, H kv heads; tied or not."""
    h, e = _heads(draw)
    d = h * e
    return GPTConfig(**_common(draw), d_model=d, n_heads=h, n_kv_heads=draw(st.sampled_from([None, h])),
                     vocab_size=draw(st.integers(3, 30)), max_len=draw(st.integers(1, 16)),
                     norm="layer", norm_eps=draw(st.sampled_from([1e-5, 1e-3])), gated_mlp=False,
                     positions="learned", bias=True, tie_embeddings=draw(st.booleans()))


@st.composite
def llama_configs(draw: Any, arch: str) -> GPTConfig:
    """Llama: RoPE ("half" layout), RMS norm, gated MLP; biases, GQA / MQA, head_dim, tying drawn."""
    h, e = _heads(draw, even=True)
    kv = draw(st.sampled_from([None, *[k for k in (1, 2, 4) if h % k == 0]]))
    return GPTConfig(**_common(draw), d_model=h * e, n_heads=h, n_kv_heads=kv,
                     vocab_size=draw(st.integers(3, 30)), max_len=draw(st.integers(1, 16)),
                     norm="rms", norm_eps=draw(st.sampled_from([1e-6, 1e-5])), gated_mlp=True,
                     positions="rope", rope_theta=draw(st.sampled_from([10000.0, 500000.0, 123.5])),
                     rope_layout="half", bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
                     head_dim=draw(st.sampled_from([None, 2, 6])))


@st.composite
def marian_configs(draw: Any, arch: str) -> Seq2SeqConfig:
    """Marian: post-norm, "concat" sinusoids, final_logits_bias, eps 1e-5, no label smoothing;
    shared-and-tied or separate embeddings, scaled or not, decoder depth drawn."""
    h, e = _heads(draw)
    return Seq2SeqConfig(**_common(draw), n_decoder_layers=draw(st.sampled_from([None, 1, 2])),
                         d_model=h * e, n_heads=h, vocab_size=draw(st.integers(3, 30)),
                         max_len=draw(st.integers(1, 16)), label_smoothing=0.0, norm_eps=1e-5,
                         prenorm=False, share_embeddings=draw(st.booleans()),
                         scale_embeddings=draw(st.booleans()), position_layout="concat",
                         final_logits_bias=True)


@st.composite
def vit_configs(draw: Any, arch: str) -> ViTConfig:
    h, e = _heads(draw)
    patch = draw(st.integers(1, 3))
    classifier = draw(st.booleans()) if arch == "ViTModel" else True  # ViTModel drops a classifier
    return ViTConfig(**_common(draw), d_model=h * e, n_heads=h, patch_size=patch,
                     image_size=patch * draw(st.integers(1, 3)), n_channels=draw(st.integers(1, 3)),
                     num_labels=draw(st.integers(1, 5)), norm_eps=draw(st.sampled_from([1e-12, 1e-6])),
                     qkv_bias=draw(st.booleans()), classifier=classifier,
                     pooler=draw(st.booleans()) if arch == "ViTForImageClassification" else False)


CONFIGS = {"bert": bert_configs, "gpt2": gpt2_configs, "llama": llama_configs, "marian": marian_configs,
           "vit": vit_configs}


# --------------------------------------------------------------------------------------------
# the round trip


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_save_then_load_gives_equal_config_and_identical_params(arch, backend, data, seed, tmp_path):
    cls = getattr(BACKENDS[backend], arch)
    config = data.draw(CONFIGS[cls.model_type](arch), label="config")
    model = cls(config, seed=seed)
    params = _numpy_leaves(model)
    if arch in TOP_LEVEL:
        assert {p.split("/")[0] for p in params} == TOP_LEVEL[arch]
    assert all(a.dtype == np.dtype(config.dtype) for a in params.values())
    d = _fresh_dir(tmp_path)
    model.save_pretrained(d)
    back = cls.from_pretrained(d)
    assert back.config == model.config
    assert back.load_report.ok and not back.load_report.initialised
    _assert_bit_identical(params, _numpy_leaves(back))
    # the other backend reads the same directory into the same tree
    other = getattr(BACKENDS["jax" if backend == "numpy" else "numpy"], arch).from_pretrained(d)
    assert other.config == model.config
    _assert_bit_identical(params, _numpy_leaves(other))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertForTokenClassification", "BertForQuestionAnswering"])
def test_bert_heads_from_a_preset_round_trip(arch, backend, tmp_path):
    """The failure of issue #14: bert-tiny's ``pooler=True`` used to stay in a head that has no
    pooler, so the saved checkpoint held pooler tensors the strict reload refused."""
    cls = getattr(BACKENDS[backend], arch)
    model = cls(preset("bert-tiny"))
    assert model.config.pooler is False and "pooler" not in model.params
    model.save_pretrained(tmp_path)
    assert not any("pooler" in name for name in load_file(tmp_path / "model.safetensors"))
    back = cls.from_pretrained(tmp_path)
    assert back.config == model.config
    _assert_bit_identical(_numpy_leaves(model), _numpy_leaves(back))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_class_round_trips_from_its_preset(backend, tmp_path):
    """Each class built from the preset of its family (Marian's preset is the paper's Transformer,
    which Marian cannot express: tested below) saves and loads back unchanged."""
    presets = {"bert": "bert-tiny", "gpt2": "gpt2-tiny", "llama": "llama-tiny", "vit": "vit-tiny"}
    for arch in ARCHITECTURES:
        cls = getattr(BACKENDS[backend], arch)
        if cls.model_type not in presets:
            continue
        model = cls(preset(presets[cls.model_type]))
        model.save_pretrained(tmp_path / arch)
        back = cls.from_pretrained(tmp_path / arch)
        assert back.config == model.config, arch
        _assert_bit_identical(_numpy_leaves(model), _numpy_leaves(back))


# --------------------------------------------------------------------------------------------
# what the class decides, and contradictions it refuses


def test_class_sets_the_fields_its_architecture_decides():
    """A field the class's outputs do not read is set to the class's value; so is a pooler
    left at ViTConfig's default (no pooler) for ViTModel, which always has one in transformers."""
    bert = preset("bert-tiny")  # pooler=True
    assert rn.BertForMaskedLM(bert).config.pooler is False
    assert rn.BertForQuestionAnswering(dataclasses.replace(bert, num_labels=5)).config.num_labels == 2
    vit = preset("vit-tiny")  # classifier=True, pooler=False
    assert (rn.ViTModel(vit).config.classifier, rn.ViTModel(vit).config.pooler) == (False, True)
    llama = preset("llama-tiny")  # untied
    assert rn.LlamaModel(llama).config.tie_embeddings is True
    assert "lm_head" not in rn.LlamaModel(llama).params
    assert "lm_head" in rn.LlamaForCausalLM(llama).params


@pytest.mark.parametrize(("arch", "config"), [
    ("BertModel", BertConfig(n_layers=1, d_model=8, n_heads=2, d_ff=8, vocab_size=11, max_len=8, pooler=False)),
    ("BertForSequenceClassification",
     BertConfig(n_layers=1, d_model=8, n_heads=2, d_ff=8, vocab_size=11, max_len=8, pooler=False)),
    ("ViTForImageClassification", ViTConfig(n_layers=1, d_model=8, n_heads=2, d_ff=8, image_size=4,
                                            patch_size=2, classifier=False)),
])
def test_class_refuses_a_config_that_contradicts_what_it_computes(arch, config):
    field = "classifier" if arch.startswith("ViT") else "pooler"
    for pkg in BACKENDS.values():
        with pytest.raises(ValueError, match=rf"{arch} always has {field}=True.*this config has {field}=False"):
            getattr(pkg, arch)(config)


def test_an_override_the_class_contradicts_is_refused_before_loading(tmp_path):
    model = rn.BertModel(preset("bert-tiny"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertModel always has pooler=True"):
        rn.BertModel.from_pretrained(tmp_path, pooler=False)


def test_params_that_do_not_fit_the_class_are_refused():
    """A tree with a pooler given to a class without one would lose it silently on save."""
    config = preset("bert-tiny")
    with_pooler = init_params(bert_param_shapes(config, "mlm"), config.n_layers, np.random.default_rng(0),
                              np.dtype("float32"))
    assert "pooler" in with_pooler
    for pkg in BACKENDS.values():
        with pytest.raises(ValueError, match=r"extra pooler/bias \(32,\)\n  extra pooler/kernel \(32, 32\)"):
            pkg.BertForMaskedLM(config, with_pooler)
    del with_pooler["mlm"]["bias"]
    with pytest.raises(ValueError, match=r"missing mlm/bias \(97,\)"):
        rn.BertForMaskedLM(dataclasses.replace(config, pooler=False), {k: v for k, v in with_pooler.items()
                                                                      if k != "pooler"})


# --------------------------------------------------------------------------------------------
# configs config.json cannot carry: refused at save, nothing written


def _bad_gpt2(draw: Any) -> tuple[GPTConfig, str]:
    base = draw(gpt2_configs("GPT2LMHeadModel"))
    h = base.n_heads
    changes = [({"positions": "rope", "n_heads": 1, "n_kv_heads": None, "d_model": 2 * base.d_model},
                r"positions='rope'"),
               ({"norm": "rms"}, r"norm='rms'"),
               ({"gated_mlp": True}, r"gated_mlp=True"),
               ({"bias": False}, r"bias=False"),
               ({"rope_theta": 500000.0}, r"rope_theta=500000\.0 \(it reads back as 10000\.0\)")]
    if h > 1:
        changes.append(({"n_kv_heads": 1}, r"K=1"))
    change, message = draw(st.sampled_from(changes))
    return dataclasses.replace(base, **change), message


def _bad_llama(draw: Any) -> tuple[GPTConfig, str]:
    base = draw(llama_configs("LlamaForCausalLM"))
    change, message = draw(st.sampled_from([
        ({"norm": "layer"}, r"norm='layer'"), ({"positions": "learned"}, r"positions='learned'"),
        ({"gated_mlp": False}, r"gated_mlp=False"), ({"rope_layout": "interleaved"}, r"rope_layout='interleaved'"),
    ]))
    return dataclasses.replace(base, **change), message


def _bad_marian(draw: Any) -> tuple[Seq2SeqConfig, str]:
    base = draw(marian_configs("MarianMTModel"))
    changes = [({"prenorm": True}, r"prenorm=True"), ({"final_logits_bias": False}, r"final_logits_bias=False"),
               ({"position_layout": "interleaved"}, r"position_layout='interleaved'"),
               ({"norm_eps": 1e-6}, r"norm_eps=1e-06"),
               ({"label_smoothing": 0.1}, r"label_smoothing=0\.1 \(it reads back as 0\.0\)")]
    if base.n_heads > 1:
        changes.append(({"n_kv_heads": 1}, r"n_kv_heads=1"))
    change, message = draw(st.sampled_from(changes))
    return dataclasses.replace(base, **change), message


BAD = {"GPT2LMHeadModel": _bad_gpt2, "GPT2Model": _bad_gpt2, "LlamaForCausalLM": _bad_llama,
       "LlamaModel": _bad_llama, "MarianMTModel": _bad_marian}


@pytest.mark.parametrize("arch", sorted(BAD))
@SETTINGS
@given(data=st.data())
def test_save_refuses_a_config_the_architecture_cannot_express(arch, data, tmp_path):
    """The class runs any config of its family; saving one HF cannot express names the field."""
    config, message = BAD[arch](data.draw)
    model = getattr(rn, arch)(config)
    d = _fresh_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(d)
    assert not d.exists() or not any(d.iterdir())


@pytest.mark.parametrize(("arch", "config", "message"), [
    # the low-level writer takes any config: one whose pooler the class would not have is refused
    ("BertForMaskedLM", preset("bert-tiny"), r"pooler=True \(it reads back as False\)"),
    ("BertModel", preset("bert-tiny", pooler=False), r"pooler=False \(it reads back as True\)"),
    ("ViTModel", preset("vit-tiny", classifier=False), r"pooler=False \(it reads back as True\)"),
    ("GPT2Model", preset("gpt2-tiny", tie_embeddings=False), r"tie_embeddings=False \(it reads back as True\)"),
])
def test_low_level_save_refuses_what_config_json_cannot_carry(arch, config, message, tmp_path):
    task = rn.CLASSES[arch].task
    shapes = bert_param_shapes(config, task) if isinstance(config, BertConfig) else param_shapes(config)
    params = init_params(shapes, config.n_layers, np.random.default_rng(0), np.dtype("float32"))
    with pytest.raises(ValueError, match=message):
        save_pretrained(tmp_path, config, params, arch)
    assert not any(tmp_path.iterdir())


def test_low_level_round_trip_keeps_a_headless_models_label_count(tmp_path):
    """transformers writes id2label for every model; so do we, so num_labels survives a BertModel."""
    config = preset("bert-tiny", num_labels=5)
    params = init_params(bert_param_shapes(config, "base"), config.n_layers, np.random.default_rng(0),
                         np.dtype("float32"))
    save_pretrained(tmp_path, config, params, "BertModel")
    assert len(json.loads((tmp_path / "config.json").read_text())["id2label"]) == 5
    assert load_pretrained(tmp_path).config == config
