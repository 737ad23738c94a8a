"""BERT checkpoints: transformers (PyTorch) -> our two implementations -> transformers.

Each test builds a tiny random-init transformers model (no downloads), saves it to a temp dir and
loads it through the transformers-style classes of both packages.

Tolerance: float32 outputs within ``TORCH_F32_ATOL`` = 1e-5 max abs of PyTorch's. Both sides
compute the same float32 graph but in a different order (fused matmuls, reductions), so they
differ by a few float32 ulps of O(1) activations (~1e-7 each) accumulated over a few layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from bigmodel_jax.tree import to_numpy
from bigmodel_port import CheckpointError, ModelNotFoundError
from bigmodel_port.hub import jax as bj
from bigmodel_port.hub import numpy as rn

pytestmark = pytest.mark.hf

TORCH_F32_ATOL = 1e-5
BACKENDS = [rn, bj]

HF_CONFIG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, num_labels=3)
HEADS = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification",
         "BertForTokenClassification", "BertForQuestionAnswering"]


def _hf_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "BertForQuestionAnswering":
        overrides.setdefault("num_labels", 2)  # HF's QA head is num_labels wide and splits it in 2
    cfg = transformers.BertConfig(**{**HF_CONFIG, **overrides})
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # move every tensor off its init value (biases, norms init to 0 / 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(seed: int = 1, B: int = 3, T: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, HF_CONFIG["vocab_size"], (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 7:] = 0  # right padding in one row
    mask[2, 4:] = 0
    types = np.zeros((B, T), np.int64)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _torch_outputs(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for arch in HEADS:
        model = _hf_model(arch)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        out[arch] = (d, model)
    return out


@pytest.mark.parametrize("pkg", BACKENDS, ids=["numpy", "jax"])
@pytest.mark.parametrize("arch", HEADS)
def test_outputs_match_transformers(checkpoints, arch, pkg):
    d, hf_model = checkpoints[arch]
    inputs = _inputs()
    want = _torch_outputs(hf_model, inputs)
    model = getattr(pkg, arch).from_pretrained(d)
    got = model(**inputs)
    assert set(got) == set(want), (set(got), set(want))
    for k in want:
        err = np.abs(np.asarray(got[k]) - want[k]).max()
        assert err <= TORCH_F32_ATOL, (arch, k, err)


@pytest.mark.parametrize("pkg", BACKENDS, ids=["numpy", "jax"])
def test_auto_classes_dispatch_on_config(checkpoints, pkg):
    for auto, arch in [("AutoModel", "BertModel"), ("AutoModelForMaskedLM", "BertForMaskedLM"),
                       ("AutoModelForSequenceClassification", "BertForSequenceClassification"),
                       ("AutoModelForTokenClassification", "BertForTokenClassification"),
                       ("AutoModelForQuestionAnswering", "BertForQuestionAnswering")]:
        model = getattr(pkg, auto).from_pretrained(checkpoints[arch][0])
        assert type(model).__name__ == arch
    with pytest.raises(ValueError, match="no 'causal_lm' model"):
        pkg.AutoModelForCausalLM.from_pretrained(checkpoints["BertModel"][0])


@pytest.mark.parametrize("arch", HEADS)
def test_export_round_trip_is_bit_exact(checkpoints, arch, tmp_path):
    d, hf_model = checkpoints[arch]
    ours = getattr(bj, arch).from_pretrained(d)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, arch).from_pretrained(tmp_path).eval()
    want, got = hf_model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    inputs = _inputs(seed=5)
    a, b = _torch_outputs(hf_model, inputs), _torch_outputs(back, inputs)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_numpy_to_jax_to_disk_and_back_keeps_every_leaf(checkpoints, tmp_path):
    d, _ = checkpoints["BertForMaskedLM"]
    ref = rn.BertForMaskedLM.from_pretrained(d)
    ref.save_pretrained(tmp_path)
    jx = bj.BertForMaskedLM.from_pretrained(tmp_path)
    from reference_numpy.tree import tree_leaves_with_path
    a = dict(tree_leaves_with_path(ref.params))
    b = dict(tree_leaves_with_path(to_numpy(jx.params)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_float64_load_gives_reference_and_jax_agreement(checkpoints):
    d, _ = checkpoints["BertForSequenceClassification"]
    inputs = _inputs()
    a = rn.BertForSequenceClassification.from_pretrained(d, dtype="float64")(**inputs).logits
    b = bj.BertForSequenceClassification.from_pretrained(d, dtype="float64")(**inputs).logits
    assert np.asarray(a).dtype == np.float64
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# strict loading


def test_base_checkpoint_into_head_model_is_strict_then_partial(checkpoints):
    d, _ = checkpoints["BertModel"]
    with pytest.raises(CheckpointError) as e:
        rn.BertForSequenceClassification.from_pretrained(d)
    msg = str(e.value)
    assert "classifier.weight" in msg and "classifier.bias" in msg and "missing" in msg
    model = rn.BertForSequenceClassification.from_pretrained(d, strict=False)
    assert model.load_report.initialised == ["classifier/bias", "classifier/kernel"]
    assert model.load_report.missing == ["classifier.weight", "classifier.bias"]
    # the encoder came from the checkpoint: same last hidden state as the base model
    base = rn.BertModel.from_pretrained(d)
    inputs = _inputs()
    from reference_numpy.models import bert
    h = bert.forward(model.params, inputs, model.config, head="base")[0]
    np.testing.assert_array_equal(h, base(**inputs).last_hidden_state)


def test_shape_mismatch_and_unexpected_keys_are_listed(checkpoints, tmp_path):
    d, _ = checkpoints["BertForSequenceClassification"]
    with pytest.raises(CheckpointError) as e:
        rn.BertForSequenceClassification.from_pretrained(d, num_labels=5)
    assert "classifier.weight: checkpoint (3, 32) vs model (5, 32)" in str(e.value)
    model = rn.BertForSequenceClassification.from_pretrained(d, num_labels=5, strict=False)
    assert model.params["classifier"]["kernel"].shape == (32, 5)
    assert "classifier/kernel" in model.load_report.initialised
    # a head checkpoint read by the base model: the head's tensors are unexpected
    with pytest.raises(CheckpointError, match="unexpected in the checkpoint:\n  classifier.bias"):
        rn.BertModel.from_pretrained(d)


def test_untied_decoder_in_tied_checkpoint_is_refused(checkpoints, tmp_path):
    from bigmodel_port.weights import load_state_dict, save_state_dict
    d, _ = checkpoints["BertForMaskedLM"]
    state = load_state_dict(d)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
    save_state_dict(tmp_path, state)
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="tied copy"):
        rn.BertForMaskedLM.from_pretrained(tmp_path)


def test_repo_id_is_not_downloaded():
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        bj.BertModel.from_pretrained("bert-base-uncased")


def test_unsupported_config_feature_is_refused(tmp_path):
    model = _hf_model("BertModel")
    model.config.position_embedding_type = "relative_key"
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
        rn.BertModel.from_pretrained(tmp_path)


def test_question_answering_needs_two_labels(tmp_path):
    model = _hf_model("BertForSequenceClassification")  # num_labels=3
    model.config.architectures = ["BertForQuestionAnswering"]
    model.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs num_labels=2"):
        rn.BertForQuestionAnswering.from_pretrained(tmp_path)


def test_bad_inputs_get_clear_errors(checkpoints):
    d, _ = checkpoints["BertModel"]
    for pkg in BACKENDS:
        model = pkg.BertModel.from_pretrained(d)
        with pytest.raises(ValueError, match="input_ids"):
            model(np.array([[1, 2, HF_CONFIG["vocab_size"]]]))
        with pytest.raises(ValueError, match="max_len|longer"):
            model(np.ones((1, HF_CONFIG["max_position_embeddings"] + 1), np.int64))
        with pytest.raises(TypeError, match="does not take"):
            model(np.ones((1, 3), np.int64), decoder_input_ids=np.ones((1, 3), np.int64))
