"""Model configs validate themselves; nothing is adjusted silently (issue #14, "Configs").

* every config dataclass refuses bad sizes, divisibility, probabilities, epsilons, names and
  non-bool flags with a ValueError naming the field (tables below, written by hand per family);
* valid tiny configs (hypothesis) and every preset construct unchanged;
* HF ``config.json`` conversion names the JSON key of a refused value;
* ``build_config`` (the CLI's first step) refuses bad ``model.X`` overrides before any data;
* ``model.max_len`` is refused when explicitly too short, and raised with a printed note otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_port.hf import bert as hf_bert
from bigmodel_port.hf import gpt2 as hf_gpt2
from bigmodel_port.hf import llama as hf_llama
from bigmodel_port.hf import marian as hf_marian
from bigmodel_port.hf import vit as hf_vit
from bigmodel_port.hf.checkpoint import load_pretrained
from bigmodel_train.config import ConfigError, RunConfig, build_config
from bigmodel_train.tasks.lm import ByteTokenizer, LMTask
from bigmodel_train.tasks.task import fit_max_len, with_model_overrides
from reference_numpy.configs import PRESETS, BertConfig, GPTConfig, Seq2SeqConfig, ViTConfig, param_count, preset

NAN, INF = float("nan"), float("inf")

# --------------------------------------------------------------------------------------------
# the config dataclasses refuse bad values, naming the field

# preset -> fields of each kind (written out per family, not read from the classes)
SIZES = {
    "bert-tiny": ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_len", "type_vocab_size",
                  "num_labels"],
    "gpt2-tiny": ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_len"],
    "llama-tiny": ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_len"],
    "seq2seq-tiny": ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_len"],
    "vit-tiny": ["n_layers", "d_model", "n_heads", "d_ff", "image_size", "patch_size", "n_channels", "num_labels"],
}
OPTIONAL_SIZES = {  # None is valid (the default), anything else must be an int > 0
    "gpt2-tiny": ["n_kv_heads", "head_dim"],
    "llama-tiny": ["n_kv_heads", "head_dim"],
    "seq2seq-tiny": ["n_decoder_layers", "n_kv_heads"],
}
PROBABILITIES = {"bert-tiny": ["dropout"], "gpt2-tiny": ["dropout"], "llama-tiny": ["dropout"],
                 "seq2seq-tiny": ["dropout", "label_smoothing"], "vit-tiny": ["dropout"]}
POSITIVE_FLOATS = {"bert-tiny": ["norm_eps"], "gpt2-tiny": ["norm_eps", "rope_theta"],
                   "llama-tiny": ["norm_eps", "rope_theta"], "seq2seq-tiny": ["norm_eps"], "vit-tiny": ["norm_eps"]}
NAMES = {"bert-tiny": ["activation", "dtype"], "gpt2-tiny": ["activation", "norm", "positions", "rope_layout", "dtype"],
         "llama-tiny": ["activation", "norm", "positions", "rope_layout", "dtype"],
         "seq2seq-tiny": ["activation", "position_layout", "dtype"], "vit-tiny": ["activation", "dtype"]}
BOOLS = {"bert-tiny": ["pooler"], "gpt2-tiny": ["gated_mlp", "bias", "tie_embeddings"],
         "llama-tiny": ["gated_mlp", "bias", "tie_embeddings"],
         "seq2seq-tiny": ["prenorm", "share_embeddings", "scale_embeddings", "final_logits_bias"],
         "vit-tiny": ["qkv_bias", "classifier", "pooler"]}

BAD_SIZES = [0, -4, True, 4.0, "4", None]
BAD_PROBABILITIES = [1.0, 1.5, -0.1, NAN, INF, True, "0.1", None]
BAD_POSITIVE_FLOATS = [0.0, -1e-6, NAN, INF, True, "1e-5", None]
BAD_NAMES = ["foo", "", None, 3]
BAD_BOOLS = [1, 0, "true", None]


def _cases() -> list[tuple[str, str, object]]:
    out = []
    for name in SIZES:
        out += [(name, f, v) for f in SIZES[name] for v in BAD_SIZES]
        out += [(name, f, v) for f in OPTIONAL_SIZES.get(name, []) for v in BAD_SIZES if v is not None]
        out += [(name, f, v) for f in PROBABILITIES[name] for v in BAD_PROBABILITIES]
        out += [(name, f, v) for f in POSITIVE_FLOATS[name] for v in BAD_POSITIVE_FLOATS]
        out += [(name, f, v) for f in NAMES[name] for v in BAD_NAMES]
        out += [(name, f, v) for f in BOOLS[name] for v in BAD_BOOLS]
    return out


@pytest.mark.parametrize(("name", "field", "value"), _cases())
def test_a_bad_value_is_refused_naming_the_field(name, field, value):
    cls = type(PRESETS[name])
    with pytest.raises(ValueError) as info:
        preset(name, **{field: value})
    msg = str(info.value)
    assert f"{cls.__name__}.{field}={value!r}" in msg, msg  # the field and the value
    assert "must" in msg  # ... and what is allowed


@pytest.mark.parametrize(("name", "overrides", "fields"), [
    ("bert-tiny", {"n_heads": 5}, ("n_heads", "d_model=32")),
    ("gpt2-tiny", {"n_heads": 5}, ("n_heads", "d_model=32")),
    ("gpt2-tiny", {"d_model": 30}, ("n_heads", "d_model=30")),
    ("gpt2-tiny", {"n_kv_heads": 3}, ("n_kv_heads", "n_heads=4")),
    ("llama-tiny", {"n_kv_heads": 3}, ("n_kv_heads", "n_heads=4")),
    ("llama-tiny", {"head_dim": 5}, ("head_dim", "even")),  # RoPE rotates channel pairs
    ("llama-tiny", {"n_heads": 2, "d_model": 30, "n_kv_heads": 1}, ("n_heads", "even")),  # E = 15
    ("seq2seq-tiny", {"n_heads": 3}, ("n_heads", "d_model=32")),
    ("seq2seq-tiny", {"n_kv_heads": 3}, ("n_kv_heads", "n_heads=4")),
    ("vit-tiny", {"n_heads": 3}, ("n_heads", "d_model=32")),
    ("vit-tiny", {"patch_size": 3}, ("patch_size", "image_size=8")),
])
def test_sizes_that_do_not_divide_are_refused(name, overrides, fields):
    with pytest.raises(ValueError) as info:
        preset(name, **overrides)
    for text in fields:
        assert text in str(info.value), str(info.value)


def test_head_dim_lifts_the_divisibility_rule_but_zero_is_not_the_default():
    config = preset("gpt2-tiny", n_heads=5, head_dim=8)  # E given: D need not be H E
    assert config.e == 8 and config.n_heads * config.e != config.d_model
    # head_dim=0 used to mean "D / H" silently (``head_dim or ...``); it is refused now
    with pytest.raises(ValueError, match=r"GPTConfig.head_dim=0: must be an int > 0 or None"):
        preset("gpt2-tiny", head_dim=0)
    # and zero heads is a ValueError, not a ZeroDivisionError
    with pytest.raises(ValueError, match=r"n_heads=0"):
        GPTConfig(n_heads=0)


def test_numbers_of_other_types_are_stored_as_plain_ints_and_floats():
    c = preset("gpt2-tiny", n_layers=np.int64(3), dropout=0, rope_theta=500000)
    assert type(c.n_layers) is int and c.n_layers == 3
    assert type(c.dropout) is float and c.dropout == 0.0
    assert type(c.rope_theta) is float and c.rope_theta == 500000.0


# --------------------------------------------------------------------------------------------
# valid configs construct unchanged

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu", "tanh"]
probabilities = st.floats(0.0, 1.0, exclude_max=True)
epsilons = st.floats(1e-12, 1.0)


@st.composite
def tiny_configs(draw) -> tuple[type, dict]:
    """(class, fields) of a small valid config of any family."""
    family = draw(st.sampled_from(["bert", "gpt", "seq2seq", "vit"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    width = draw(st.sampled_from([2, 4, 8]))  # head width E (even: RoPE may be drawn)
    common = dict(n_layers=draw(st.integers(1, 3)), d_model=heads * width, n_heads=heads,
                  d_ff=draw(st.integers(1, 64)), dropout=draw(probabilities), norm_eps=draw(epsilons),
                  activation=draw(st.sampled_from(ACTIVATIONS)), dtype=draw(st.sampled_from(["float32", "float64"])))
    kv = st.sampled_from([None] + [k for k in (1, 2, 4) if heads % k == 0])
    if family == "bert":
        return BertConfig, dict(common, vocab_size=draw(st.integers(1, 200)), max_len=draw(st.integers(1, 128)),
                                type_vocab_size=draw(st.integers(1, 3)), num_labels=draw(st.integers(1, 5)),
                                pooler=draw(st.booleans()))
    if family == "gpt":
        fields = dict(common, vocab_size=draw(st.integers(1, 200)), max_len=draw(st.integers(1, 128)),
                      n_kv_heads=draw(kv), norm=draw(st.sampled_from(["layer", "rms"])),
                      gated_mlp=draw(st.booleans()), positions=draw(st.sampled_from(["learned", "rope"])),
                      rope_theta=draw(st.floats(1.0, 1e6)), rope_layout=draw(st.sampled_from(["half", "interleaved"])),
                      bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
                      head_dim=draw(st.sampled_from([None, 2, 6])))
        return GPTConfig, fields
    if family == "seq2seq":
        return Seq2SeqConfig, dict(common, n_decoder_layers=draw(st.sampled_from([None, 1, 2])), n_kv_heads=draw(kv),
                                   vocab_size=draw(st.integers(1, 200)), max_len=draw(st.integers(1, 128)),
                                   label_smoothing=draw(probabilities), prenorm=draw(st.booleans()),
                                   share_embeddings=draw(st.booleans()), scale_embeddings=draw(st.booleans()),
                                   position_layout=draw(st.sampled_from(["interleaved", "concat"])),
                                   final_logits_bias=draw(st.booleans()))
    patch = draw(st.integers(1, 4))
    return ViTConfig, dict(common, image_size=patch * draw(st.integers(1, 4)), patch_size=patch,
                           n_channels=draw(st.integers(1, 3)), num_labels=draw(st.integers(1, 10)),
                           qkv_bias=draw(st.booleans()), classifier=draw(st.booleans()), pooler=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(drawn=tiny_configs())
def test_every_valid_tiny_config_constructs_unchanged(drawn):
    cls, fields = drawn
    config = cls(**fields)
    assert {k: getattr(config, k) for k in fields} == fields  # nothing adjusted
    assert param_count(config) > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    config = PRESETS[name]
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert type(config)(**fields) == config  # constructing it afresh runs the checks again


# --------------------------------------------------------------------------------------------
# HF config.json: the refused value is named by its JSON key

HF = {  # minimal valid config.json of each family, and the architecture to read it as
    "bert": (hf_bert, "BertForSequenceClassification", dict(
        model_type="bert", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=99, num_labels=3)),
    "gpt2": (hf_gpt2, "GPT2LMHeadModel", dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=99)),
    "llama": (hf_llama, "LlamaForCausalLM", dict(
        model_type="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=99)),
    "marian": (hf_marian, "MarianMTModel", dict(
        model_type="marian", encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=99)),
    "vit": (hf_vit, "ViTForImageClassification", dict(
        model_type="vit", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        image_size=8, patch_size=4, num_channels=1, num_labels=10)),
}
# Marian keeps one value for both stacks: its decoder twin changes along
TWINS = {"encoder_attention_heads": "decoder_attention_heads", "encoder_ffn_dim": "decoder_ffn_dim"}


def _bad_json_value(key: str):
    """A value the config must refuse for this config.json key."""
    if key in ("hidden_act", "activation_function"):
        return "foo"
    if key in ("hidden_dropout_prob", "resid_pdrop", "attention_dropout", "dropout"):
        return 1.5
    if key in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta"):
        return -1.0
    if key in ("qkv_bias", "scale_embedding"):
        return "yes"
    return -3  # every size


def _json_cases():
    return [(family, key) for family, (mod, _, _) in HF.items() for key in mod.HF_KEYS.values()]


@pytest.mark.parametrize(("family", "key"), _json_cases())
def test_config_json_errors_name_the_json_key(family, key):
    """Every key of a family's table: a bad value there is refused naming that key."""
    mod, arch, hf = HF[family]
    assert mod.config_from_hf(hf, arch)  # the base file is valid
    bad = _bad_json_value(key)
    changed = {**hf, key: bad, **({TWINS[key]: bad} if key in TWINS else {})}
    with pytest.raises(ValueError) as info:
        mod.config_from_hf(changed, arch)
    assert f"{key}={bad!r}" in str(info.value) and "config.json" in str(info.value), str(info.value)


@pytest.mark.parametrize(("family", "changes", "message"), [
    ("bert", {"num_attention_heads": 0}, "bert config.json: num_attention_heads=0: BertConfig.n_heads=0"),
    ("bert", {"hidden_act": "foo"}, "config.json hidden_act='foo' is not supported"),
    ("gpt2", {"n_head": 5}, "gpt2 config.json: n_head=5, n_embd=32: GPTConfig.n_heads=5: must divide d_model=32"),
    ("llama", {"num_key_value_heads": 3}, "llama config.json: num_key_value_heads=3, num_attention_heads=4"),
    ("llama", {"head_dim": 0}, "llama config.json: head_dim=0: GPTConfig.head_dim=0"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "llama config.json: rope_parameters="),
    ("marian", {"d_model": 30}, "marian config.json: encoder_attention_heads=4, d_model=30"),
    ("vit", {"patch_size": 3}, "vit config.json: patch_size=3, image_size=8"),
    ("vit", {"hidden_size": 32.0}, "vit config.json: hidden_size=32.0: ViTConfig.d_model=32.0: must be an int > 0"),
])
def test_config_json_errors_say_key_value_and_rule(family, changes, message):
    mod, arch, hf = HF[family]
    with pytest.raises(ValueError, match=re.escape(message)):
        mod.config_from_hf({**hf, **changes}, arch)


def test_load_pretrained_refuses_a_bad_config_json_before_reading_weights(tmp_path):
    """The public loader reports the key (no weights file needed: the config is read first)."""
    _, _, hf = HF["gpt2"]
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_head": 5, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config\.json: n_head=5, n_embd=32"):
        load_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# the CLI's config step refuses bad model.X overrides (before any data)

@pytest.mark.parametrize(("overrides", "named"), [
    (["model.n_heads=5"], "model.n_heads=5"),  # gpt2-tiny: d_model 32
    (["model.d_model=30"], "model.d_model=30"),
    (["model.dropout=1.5"], "model.dropout=1.5"),
    (["model.head_dim=0"], "model.head_dim=0"),
    (["model.n_layers=0"], "model.n_layers=0"),
    (["model.activation=foo"], "model.activation='foo'"),
    (["model.norm_eps=0"], "model.norm_eps=0"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3"),
    (["task=classification", "model=bert-tiny", "model.n_heads=3"], "model.n_heads=3"),
    (["task=translation", "model=seq2seq-tiny", "model.label_smoothing=1"], "model.label_smoothing=1"),
    (["task=image", "model=vit-tiny", "model.n_heads=3"], "model.n_heads=3"),
])
def test_build_config_refuses_bad_model_overrides(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_config(None, None, overrides)


def test_a_run_preset_with_a_bad_override_is_refused():
    with pytest.raises(ConfigError, match=r"model\.n_heads=5, model\.d_model=96 \(preset 'gpt2-tiny'\): .*must divide d_model=96"):
        build_config("demo", None, ["model.n_heads=5"])


def test_valid_overrides_pass_and_are_stored_typed():
    cfg = build_config(None, None, ["model.n_heads=2", "model.dropout=0", "model.bias=false"])
    assert cfg.model_overrides == {"n_heads": 2, "dropout": 0.0, "bias": False}
    assert type(cfg.model_overrides["dropout"]) is float


def test_cli_train_refuses_the_override_before_preparing_data(monkeypatch, tmp_path, capsys):
    from bigmodel_apps.cli import main
    from bigmodel_apps.cli import train as cli_train

    def no_data(*args, **kwargs):
        raise AssertionError("training (and its data) started despite a bad model override")

    monkeypatch.setattr(cli_train, "train", no_data)
    monkeypatch.setattr("bigmodel_train.tasks.lm._lm_documents", no_data)
    rc = main(["train", "task=lm", "model.n_heads=5", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.n_heads=5" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------
# max_len: refused when explicitly too short, raised with a printed note otherwise

def test_an_explicit_max_len_shorter_than_seq_len_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"model\.max_len=32 is shorter than seq_len=64"):
        build_config(None, None, ["model.max_len=32", "seq_len=64"])
    # a run preset's max_len counts as set: demo has max_len=64
    with pytest.raises(ConfigError, match=r"model\.max_len=64 is shorter than seq_len=128"):
        build_config("demo", None, ["seq_len=128"])


def _lm_task(capsys, **fields) -> tuple[LMTask, str]:
    cfg = RunConfig(task="lm", model="gpt2-tiny", tokenizer="byte", **fields)  # not validated: the task checks too
    capsys.readouterr()
    task = LMTask(cfg, None, tokenizer=ByteTokenizer())
    return task, capsys.readouterr().out


def test_the_task_raises_the_preset_max_len_and_says_so(capsys):
    task, out = _lm_task(capsys, seq_len=128)  # gpt2-tiny's max_len is 64
    assert task.model_config.max_len == 128
    assert out.count("note: model.max_len raised from 64") == 1 and "seq_len=128" in out, out


def test_the_task_keeps_a_long_enough_max_len_quietly(capsys):
    task, out = _lm_task(capsys, seq_len=32)
    assert task.model_config.max_len == 64 and "note" not in out
    task, out = _lm_task(capsys, seq_len=32, model_overrides={"max_len": 256})
    assert task.model_config.max_len == 256 and "note" not in out


def test_the_task_refuses_an_explicit_short_max_len(capsys):
    with pytest.raises(ConfigError, match=r"model\.max_len=32 is shorter than seq_len=64"):
        _lm_task(capsys, seq_len=64, model_overrides={"max_len": 32})


@pytest.mark.parametrize("name", ["seq2seq-tiny", "bert-tiny"])
def test_fit_max_len_is_the_same_rule_for_every_sequence_task(name, capsys):
    base = preset(name)  # max_len 64
    task = "translation" if name.startswith("seq2seq") else "classification"
    assert fit_max_len(base, RunConfig(task=task, model=name, seq_len=16)) == 64
    assert fit_max_len(base, RunConfig(task=task, model=name, seq_len=100)) == 100
    assert f"raised from 64 (preset {name!r}) to 100 to fit seq_len=100" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="model.max_len=50 is shorter than seq_len=100"):
        fit_max_len(base, RunConfig(task=task, model=name, seq_len=100, model_overrides={"max_len": 50}))


def test_the_task_names_where_a_refused_value_came_from():
    """A value the task derives from the data is named as such (the run config itself was valid)."""
    cfg = RunConfig(task="lm", model="gpt2-tiny")
    with pytest.raises(ConfigError, match=r"vocab_size=0 \(from the data\): GPTConfig\.vocab_size=0: must be"):
        with_model_overrides(preset("gpt2-tiny"), cfg, vocab_size=0)
    with pytest.raises(ConfigError, match=r"model\.n_layers=2 contradicts the data, which needs n_layers=3"):
        with_model_overrides(preset("gpt2-tiny"), RunConfig(model_overrides={"n_layers": 2}), n_layers=3)
