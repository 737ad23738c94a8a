"""ViT checkpoints: transformers (PyTorch) ``ViTModel`` / ``ViTForImageClassification`` -> our
config + tree (``bigmodel_port.hf.checkpoint``) -> both implementations -> back to transformers.

Each test builds a tiny random-init transformers model (no downloads), saves it to a temp dir and
loads it at the functional level (``models.vit.hidden_states`` / ``pooler_output`` /
``forward`` on each side).

Tolerance: float32 outputs within ``TORCH_F32_ATOL`` = 1e-5 max abs of PyTorch's. Both sides
compute the same float32 graph in a different order (a convolution vs a matmul over patches,
fused attention, reductions), so they differ by a few float32 ulps of O(1) activations (~1e-7
each) accumulated over two layers; measured ~1e-6. Reference vs JAX in float64: the model
parity tolerance (``MODEL_PARITY``, 1e-9 relative).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from bigmodel_jax.models import vit as jvit
from bigmodel_jax.tree import to_jax
from bigmodel_port import CheckpointError
from bigmodel_port.hf import vit as hf_vit
from bigmodel_port.hf.checkpoint import load_pretrained, save_pretrained
from bigmodel_port.hf.mapping import KINDS
from reference_numpy.configs import ViTConfig, param_shapes
from reference_numpy.models import vit as rvit
from reference_numpy.tolerances import MODEL_PARITY, normwise_error, tolerance_for
from reference_numpy.tree import tree_leaves_with_path

pytestmark = pytest.mark.hf

TORCH_F32_ATOL = 1e-5

HF_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 image_size=16, patch_size=4, num_channels=3, num_labels=5)
ARCHS = ["ViTModel", "ViTForImageClassification"]
# (name, HF config overrides): a 4x4 patch grid with q/k/v biases, a 2x2 grid without them
VARIANTS = {"bias": {}, "no_qkv_bias": {"qkv_bias": False, "image_size": 8}}


def _hf_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(**{**HF_CONFIG, **overrides})
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # move every tensor off its init value (biases, norms, cls token init to 0 / 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _pixels(config: ViTConfig, seed: int = 1, B: int = 3, dtype=np.float32) -> np.ndarray:
    """Random pixel_values (B, C, H, W), NCHW as HF."""
    shape = (B, config.n_channels, config.image_size, config.image_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _torch_outputs(model: torch.nn.Module, px: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(px))
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _ours(params, config: ViTConfig, px: np.ndarray, impl: str) -> dict[str, np.ndarray]:
    """Our outputs under HF's output names, from the reference or the (jit-compiled) JAX model."""
    batch = {"pixel_values": px}
    if config.classifier:
        logits = (rvit.forward(params, batch, config) if impl == "numpy"
                  else jvit.jit_forward(to_jax(params), batch, config))
        return {"logits": np.asarray(logits)}
    if impl == "numpy":
        h = rvit.hidden_states(params, batch, config)
        pooled = rvit.pooler_output(params, h) if config.pooler else None
    else:
        h, pooled = jvit.jit_encode(to_jax(params), batch, config)
    out = {"last_hidden_state": np.asarray(h)}
    if pooled is not None:
        out["pooler_output"] = np.asarray(pooled)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], tuple]:
    out = {}
    for arch in ARCHS:
        for name, overrides in VARIANTS.items():
            model = _hf_model(arch, **overrides)
            d = tmp_path_factory.mktemp(f"{arch}-{name}")
            model.save_pretrained(d)
            out[arch, name] = (d, model)
    return out


# --------------------------------------------------------------------------------------------
# loading: outputs equal transformers'


@pytest.mark.parametrize("impl", ["numpy", "jax"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_match_transformers(checkpoints, arch, variant, impl):
    d, hf_model = checkpoints[arch, variant]
    loaded = load_pretrained(d)
    config = loaded.config
    assert loaded.architecture == arch and loaded.report.ok, loaded.report.describe()
    assert (config.pooler, config.classifier) == ((True, False) if arch == "ViTModel" else (False, True))
    assert config.qkv_bias == VARIANTS[variant].get("qkv_bias", True)
    assert ("bias" in loaded.params["layers"]["attn"]["query"]) == config.qkv_bias
    px = _pixels(config)
    want = _torch_outputs(hf_model, px)
    got = _ours(loaded.params, config, px, impl)
    assert set(got) == set(want), (set(got), set(want))
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        err = np.abs(got[k] - want[k]).max()
        assert err <= TORCH_F32_ATOL, f"{arch} {variant} {impl} {k}: max abs {err:.2e}"


def test_patch_convolution_order_matches_transformers(checkpoints):
    """The "conv" rule kind is ``models.vit.from_conv_kernel`` (and its inverse), and our patchify
    + matmul equals HF's stride-p Conv2d + flatten(2).transpose(1, 2) on real pixels."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 4, 4))  # (D, C, p, p): distinct sizes catch a transposed order
    _, to_ours, to_hf = KINDS["conv"]
    np.testing.assert_array_equal(to_ours(w, (48, 5)), rvit.from_conv_kernel(w))
    np.testing.assert_array_equal(to_hf(rvit.from_conv_kernel(w), (48, 5), w.shape), w)
    np.testing.assert_array_equal(rvit.to_conv_kernel(rvit.from_conv_kernel(w), 3, 4), w)

    d, hf_model = checkpoints["ViTModel", "bias"]
    loaded = load_pretrained(d)
    px = _pixels(loaded.config)
    with torch.no_grad():
        want = hf_model.embeddings.patch_embeddings(torch.tensor(px)).numpy()  # (B, N, D)
    got, _ = rvit.patch_embed_forward(loaded.params["patch_embed"], px, loaded.config.patch_size)
    assert got.shape == want.shape == (3, 16, 32)
    assert np.abs(got - want).max() <= TORCH_F32_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_float64_load_gives_reference_and_jax_agreement(checkpoints, arch):
    d, _ = checkpoints[arch, "no_qkv_bias"]
    loaded = load_pretrained(d, dtype="float64")
    assert all(leaf.dtype == np.float64 for _, leaf in tree_leaves_with_path(loaded.params))
    px = _pixels(loaded.config, dtype=np.float64)
    ref, jx = _ours(loaded.params, loaded.config, px, "numpy"), _ours(loaded.params, loaded.config, px, "jax")
    tol = tolerance_for(MODEL_PARITY, np.float64)
    for k in ref:
        max_abs, rel = normwise_error(jx[k], ref[k])
        assert tol.passes(max_abs, rel), f"{arch} {k}: rel {rel:.2e} max abs {max_abs:.2e}"


# --------------------------------------------------------------------------------------------
# export: our directory is a transformers checkpoint


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_is_bit_exact(checkpoints, arch, variant, tmp_path):
    d, hf_model = checkpoints[arch, variant]
    loaded = load_pretrained(d)
    out = save_pretrained(tmp_path / "ours", loaded.config, loaded.params, arch, loaded.hf_config)
    back, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want, got = hf_model.state_dict(), back.eval().state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    px = torch.tensor(_pixels(loaded.config))
    with torch.no_grad():
        a, b = hf_model(pixel_values=px), back(pixel_values=px)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # our own re-load of the export is the same tree, bit for bit
    again = load_pretrained(out)
    assert again.config == loaded.config
    for (pa, a_), (pb, b_) in zip(tree_leaves_with_path(again.params), tree_leaves_with_path(loaded.params)):
        assert pa == pb
        np.testing.assert_array_equal(a_, b_)


def test_fresh_config_exports_for_transformers(tmp_path):
    """A tree we initialised ourselves (no original config.json) saves as a ViTModel that
    transformers loads and that computes our outputs."""
    config = ViTConfig(n_layers=1, d_model=16, n_heads=2, d_ff=24, image_size=8, patch_size=4,
                       n_channels=3, qkv_bias=False, classifier=False, pooler=True)
    params = rvit.init(config, np.random.default_rng(0))
    out = save_pretrained(tmp_path, config, params, "ViTModel")
    hf = json.loads((out / "config.json").read_text())
    assert (hf["model_type"], hf["qkv_bias"], hf["image_size"], hf["pooler_act"]) == ("vit", False, 8, "tanh")
    model, info = transformers.ViTModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    px = _pixels(config)
    want = _torch_outputs(model.eval(), px)
    got = _ours(params, config, px, "numpy")
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= TORCH_F32_ATOL, k


def test_config_the_hf_class_cannot_hold_is_refused(tmp_path):
    config = ViTConfig(n_layers=1, d_model=16, n_heads=2, d_ff=24, image_size=8, patch_size=4)
    params = rvit.init(config, np.random.default_rng(0))  # a classifier, no pooler
    with pytest.raises(ValueError, match="HF ViTModel has no classification head"):
        save_pretrained(tmp_path, config, params, "ViTModel")
    pooled = dataclasses.replace(config, pooler=True)
    with pytest.raises(ValueError, match="ViTForImageClassification has no pooler"):
        save_pretrained(tmp_path, pooled, rvit.init(pooled, np.random.default_rng(0)), "ViTForImageClassification")


# --------------------------------------------------------------------------------------------
# strict and partial loads


def test_wrong_num_labels_lists_the_classifier_then_reinitialises_it(checkpoints):
    d, _ = checkpoints["ViTForImageClassification", "bias"]
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, config_overrides={"num_labels": 3})
    msg = str(e.value)
    assert "classifier.weight: checkpoint (5, 32) vs model (3, 32)" in msg
    assert "classifier.bias: checkpoint (5,) vs model (3,)" in msg
    assert "strict=False" in msg
    full = load_pretrained(d)
    part = load_pretrained(d, strict=False, config_overrides={"num_labels": 3})
    assert part.config.num_labels == 3
    assert sorted(part.report.initialised) == ["head/bias", "head/kernel"]
    assert len(part.report.mismatched) == 2 and not part.report.missing and not part.report.unexpected
    assert part.params["head"]["kernel"].shape == (32, 3)
    np.testing.assert_array_equal(part.params["head"]["bias"], 0.0)  # fresh: init_rule's zero bias
    assert 0.005 < part.params["head"]["kernel"].std() < 0.05  # fresh: N(0, 0.02)
    want = dict(tree_leaves_with_path(full.params))
    for path, leaf in tree_leaves_with_path(part.params):
        if not path.startswith("head/"):
            np.testing.assert_array_equal(leaf, want[path], err_msg=path)
    px = _pixels(part.config)
    assert rvit.forward(part.params, {"pixel_values": px}, part.config).shape == (3, 3)


def test_base_checkpoint_into_classifier_is_strict_then_partial(checkpoints):
    """A ViTModel checkpoint (unprefixed names, a pooler, no head) read as a classifier: the
    prefix is aligned, the missing head and unused pooler are listed, then loaded partially."""
    d, _ = checkpoints["ViTModel", "bias"]
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, "ViTForImageClassification")
    msg = str(e.value)
    assert "classifier.weight" in msg and "classifier.bias" in msg and "pooler.dense.weight" in msg
    assert "vit.encoder" not in msg  # the trunk matched after the prefix was added
    part = load_pretrained(d, "ViTForImageClassification", strict=False)
    assert sorted(part.report.initialised) == ["head/bias", "head/kernel"]
    assert sorted(part.report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    base = load_pretrained(d)
    np.testing.assert_array_equal(part.params["layers"]["mlp"]["up"]["kernel"],
                                  base.params["layers"]["mlp"]["up"]["kernel"])


def test_classifier_checkpoint_into_base_model(checkpoints):
    """The reverse: ViTModel from a classifier checkpoint lacks the pooler (HF initialises it too)."""
    d, hf_model = checkpoints["ViTForImageClassification", "bias"]
    with pytest.raises(CheckpointError, match=r"(?s)pooler\.dense\.weight.*classifier\.weight"):
        load_pretrained(d, "ViTModel")
    part = load_pretrained(d, "ViTModel", strict=False)
    assert sorted(part.report.initialised) == ["pooler/bias", "pooler/kernel"]
    # without the pooler it is an exact load, and last_hidden_state is the classifier's trunk
    exact = load_pretrained(d, "ViTModel", strict=False, config_overrides={"pooler": False})
    assert not exact.report.missing and not exact.report.initialised
    assert sorted(exact.report.unexpected) == ["classifier.bias", "classifier.weight"]
    px = _pixels(exact.config)
    with torch.no_grad():
        want = hf_model.vit(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
    got = rvit.hidden_states(exact.params, {"pixel_values": px}, exact.config)
    assert np.abs(got - want).max() <= TORCH_F32_ATOL


def test_mask_token_and_poolerless_base_checkpoints(tmp_path):
    """ViTModel(use_mask_token=True) carries an unused mask token (ignored); a
    ViTModel(add_pooling_layer=False) checkpoint loads with ``config_overrides={"pooler": False}``."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**{**HF_CONFIG, "image_size": 8})
    masked = transformers.ViTModel(cfg, use_mask_token=True).eval()
    masked.save_pretrained(tmp_path / "masked")
    loaded = load_pretrained(tmp_path / "masked")
    assert loaded.report.ok and not loaded.report.unexpected
    bare = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight"):
        load_pretrained(tmp_path / "bare")
    loaded = load_pretrained(tmp_path / "bare", config_overrides={"pooler": False})
    assert "pooler" not in loaded.params
    px = _pixels(loaded.config)
    got = _ours(loaded.params, loaded.config, px, "numpy")
    want = _torch_outputs(bare, px)
    assert set(got) == set(want) == {"last_hidden_state"}
    assert np.abs(got["last_hidden_state"] - want["last_hidden_state"]).max() <= TORCH_F32_ATOL


# --------------------------------------------------------------------------------------------
# config translation


def test_config_translation_reads_every_field():
    hf = {"model_type": "vit", "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 6,
          "intermediate_size": 96, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6,
          "image_size": [12, 12], "patch_size": 3, "num_channels": 1, "qkv_bias": False,
          "hidden_dropout_prob": 0.1, "encoder_stride": 3, "id2label": {"0": "cat", "1": "dog", "2": "x"}}
    c = hf_vit.config_from_hf(hf, "ViTForImageClassification")
    assert c == ViTConfig(n_layers=3, d_model=48, n_heads=6, d_ff=96, image_size=12, patch_size=3,
                          n_channels=1, num_labels=3, dropout=0.1, norm_eps=1e-6, activation="gelu_tanh",
                          qkv_bias=False, classifier=True, pooler=False, dtype="float32")
    base = hf_vit.config_from_hf(hf, "ViTModel")
    assert (base.pooler, base.classifier) == (True, False)
    back = hf_vit.config_to_hf(c, "ViTForImageClassification", hf)
    assert back["id2label"] == hf["id2label"] and back["encoder_stride"] == 3  # kept from the original
    assert hf_vit.config_from_hf(back, "ViTForImageClassification") == c
    # every mapped name has the shape the config implies (the table covers the whole tree)
    n_leaves = len(list(tree_leaves_with_path(param_shapes(c))))
    assert len(hf_vit.mapping(c, "ViTForImageClassification").rules) == n_leaves


@pytest.mark.parametrize(("field", "value", "match"), [
    ("pooler_act", "relu", "pooler_act='relu' is not supported"),
    ("pooler_output_size", 16, "pooler_output_size=16 is not supported"),
    ("image_size", [8, 16], r"image_size=\[8, 16\] is not supported \(only square sizes\)"),
    ("patch_size", 3, r"patch_size=3, image_size=8: .*must divide image_size=8"),
    ("hidden_act", "quick_gelu", "hidden_act='quick_gelu' is not supported"),
    ("num_attention_heads", 5, r"num_attention_heads=5, hidden_size=32: .*must divide d_model=32"),
])
def test_unsupported_config_features_are_refused(field, value, match):
    hf = {**HF_CONFIG, "image_size": 8, "model_type": "vit", field: value}
    with pytest.raises(ValueError, match=match):
        hf_vit.config_from_hf(hf, "ViTModel")


def test_pooler_fields_do_not_matter_without_a_pooler():
    """The classifier has no pooler (add_pooling_layer=False), so its pooler fields change nothing."""
    hf = {**HF_CONFIG, "model_type": "vit", "pooler_act": "relu", "pooler_output_size": 16}
    assert hf_vit.config_from_hf(hf, "ViTForImageClassification").pooler is False


def test_jax_and_numpy_trees_load_identically(checkpoints):
    """The loaded NumPy tree drives the JAX model unchanged (same names and shapes)."""
    d, _ = checkpoints["ViTModel", "no_qkv_bias"]
    loaded = load_pretrained(d)
    shapes = dict(tree_leaves_with_path(param_shapes(loaded.config)))
    got = {p: tuple(a.shape) for p, a in tree_leaves_with_path(loaded.params)}
    assert got == shapes
    abstract = jax.eval_shape(lambda: jvit.init(loaded.config, 0))
    assert {p: tuple(a.shape) for p, a in tree_leaves_with_path(abstract)} == shapes
