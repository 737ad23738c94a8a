"""ViT: HF ``ViTModel`` / ``ViTForImageClassification`` <-> our ViT tree (``ViTConfig``). The one
place ViT's HF names are translated.

Layouts (see ``reference_numpy.models.vit``): the patch convolution weight (D, C, p, p) becomes
our (C p p, D) kernel by ``w.reshape(D, -1).T`` ("conv" kind, the same flattening as
``models.vit.from_conv_kernel``, which matches our patch order); the class token (1, 1, D) and the
positions (1, N + 1, D) lose their leading 1s ("reshape" kind); every ``nn.Linear`` is
transposed, the query / key / value ones split into heads (D, H, E).

HF builds ``ViTModel`` with the tanh pooler (``add_pooling_layer=True``) and no head, and the
classifier's ViT without a pooler; our config says the same with ``pooler`` / ``classifier``. A
checkpoint saved from ``ViTModel(add_pooling_layer=False)`` loads with
``config_overrides={"pooler": False}``. transformers 5 renames the modules in memory
(``q_proj``, ``mlp.fc1``, ...) but reads and writes checkpoints under the names below.
"""

from __future__ import annotations

from typing import Any

from bigmodel_port.hf.common import ACTIVATIONS_TO_HF, activation_from_hf, build_config, dtype_from_hf, merge_hf
from bigmodel_port.hf.common import num_labels_from_hf, require, unsupported
from bigmodel_port.hf.mapping import Mapping, Rule, linear_rules, norm_rules
from reference_numpy.configs import ViTConfig

MODEL_TYPE = "vit"
FAMILY = "vit"

# HF class -> our task: "base" is models.vit.hidden_states / pooler_output (HF's last_hidden_state
# and pooler_output), "image_classification" is models.vit.forward (logits from the class token).
ARCHITECTURES = {
    "ViTModel": "base",
    "ViTForImageClassification": "image_classification",
}

_PREFIX = "vit."  # base-model prefix inside ViTForImageClassification's state dict

# our config field -> the config.json key it is read from (names the key when a value is refused)
HF_KEYS = {
    "n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
    "n_channels": "num_channels", "num_labels": "num_labels", "dropout": "hidden_dropout_prob",
    "norm_eps": "layer_norm_eps", "activation": "hidden_act", "qkv_bias": "qkv_bias",
}


def _square(hf: dict[str, Any], key: str, default: int) -> Any:
    """``image_size`` / ``patch_size``: an int, or an (h, w) pair that must be square (the value
    is returned as written; ``ViTConfig`` checks it is an int > 0)."""
    value = require(hf, key, default, model_type=MODEL_TYPE)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vit config.json {key}={value!r} is not supported (only square sizes)")
        value = value[0]
    return value


def config_from_hf(hf: dict[str, Any], architecture: str) -> ViTConfig:
    """Our config for an HF ViT ``config.json`` dict; features we do not implement are refused.

    ``encoder_stride`` only shapes the masked-image-modeling decoder (not supported here) and
    ``initializer_range`` only the init, so both are ignored; ``attention_probs_dropout_prob``
    is a training setting we do not model (``dropout`` is ``hidden_dropout_prob``).
    """
    mt = MODEL_TYPE
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{architecture} is not a ViT architecture; known: {sorted(ARCHITECTURES)}")
    classifier = ARCHITECTURES[architecture] == "image_classification"
    num_labels = num_labels_from_hf(hf)
    if classifier and num_labels == 0:
        raise ValueError(f"vit config.json num_labels={num_labels}: a classifier needs at least one label "
                         "(HF's num_labels=0 identity head is not supported)")
    if not classifier and not (type(num_labels) is int and num_labels >= 1):
        num_labels = 1  # no head is built, so the field is unused; any valid value will do
    # ViTConfig refuses a patch size that does not tile the image (HF's convolution would drop the
    # border pixels), and a head count that does not divide the width, naming the keys.
    config = build_config(ViTConfig, dict(
        n_layers=require(hf, "num_hidden_layers", model_type=mt),
        d_model=require(hf, "hidden_size", model_type=mt),
        n_heads=require(hf, "num_attention_heads", model_type=mt),
        d_ff=require(hf, "intermediate_size", model_type=mt),
        image_size=_square(hf, "image_size", 224),
        patch_size=_square(hf, "patch_size", 16),
        n_channels=require(hf, "num_channels", 3, model_type=mt),
        num_labels=num_labels,
        dropout=require(hf, "hidden_dropout_prob", 0.0, model_type=mt),
        norm_eps=require(hf, "layer_norm_eps", 1e-12, model_type=mt),
        activation=activation_from_hf(require(hf, "hidden_act", "gelu", model_type=mt), "hidden_act"),
        qkv_bias=require(hf, "qkv_bias", True, model_type=mt),
        classifier=classifier,
        pooler=architecture == "ViTModel",  # transformers: add_pooling_layer=True only for ViTModel
        dtype=dtype_from_hf(hf),
    ), hf, HF_KEYS, mt)
    d = config.d_model
    unsupported(hf, "head_dim", (None, d // config.n_heads), None, mt)
    if config.pooler:  # the pooler's shape and activation only matter where it is built
        unsupported(hf, "pooler_output_size", (None, d), None, mt)
        unsupported(hf, "pooler_act", ("tanh",), "tanh", mt)
    return config


def _check_fits(config: ViTConfig, architecture: str) -> None:
    """Refuse a config whose tree the HF class cannot hold (its leaves would be dropped on save)."""
    if architecture == "ViTModel" and config.classifier:
        raise ValueError("HF ViTModel has no classification head: use ViTForImageClassification, "
                         "or set ViTConfig(classifier=False)")
    if architecture == "ViTForImageClassification":
        if not config.classifier:
            raise ValueError("ViTForImageClassification needs ViTConfig(classifier=True)")
        if config.pooler:
            raise ValueError("HF ViTForImageClassification has no pooler (add_pooling_layer=False): "
                             "set ViTConfig(pooler=False)")


def config_to_hf(config: ViTConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (fields of ``base`` we do not model are kept)."""
    _check_fits(config, architecture)
    c, b = config, base or {}
    out = merge_hf(base, {
        "model_type": MODEL_TYPE, "architectures": [architecture],
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff, "hidden_act": ACTIVATIONS_TO_HF[c.activation],
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": b.get("attention_probs_dropout_prob", c.dropout),
        "layer_norm_eps": c.norm_eps, "image_size": c.image_size, "patch_size": c.patch_size,
        "num_channels": c.n_channels, "qkv_bias": c.qkv_bias, "dtype": c.dtype,
        # transformers writes the pooler's fields for every ViT; ours is (D, D) with tanh
        "pooler_output_size": c.d_model, "pooler_act": "tanh",
    })
    if c.classifier:
        labels = b.get("id2label")
        if not labels or len(labels) != c.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    return out


def mapping(config: ViTConfig, architecture: str) -> Mapping:
    """The name table of ``architecture`` for ``config``."""
    _check_fits(config, architecture)
    c = config
    d, p = c.d_model, c.patch_size
    pre = "" if architecture == "ViTModel" else _PREFIX
    emb = f"{pre}embeddings"
    layer = f"{pre}encoder.layer.{{i}}"
    rules = [
        Rule("cls_token", f"{emb}.cls_token", "reshape", hf_shape=(1, 1, d)),
        Rule("position/embedding", f"{emb}.position_embeddings", "reshape", hf_shape=(1, c.max_len, d)),
        Rule("patch_embed/kernel", f"{emb}.patch_embeddings.projection.weight", "conv",
             hf_shape=(d, c.n_channels, p, p)),
        Rule("patch_embed/bias", f"{emb}.patch_embeddings.projection.bias"),
        *norm_rules("layers/attn_norm", f"{layer}.layernorm_before"),
        *linear_rules("layers/attn/query", f"{layer}.attention.attention.query", c.qkv_bias),
        *linear_rules("layers/attn/key", f"{layer}.attention.attention.key", c.qkv_bias),
        *linear_rules("layers/attn/value", f"{layer}.attention.attention.value", c.qkv_bias),
        *linear_rules("layers/attn/out", f"{layer}.attention.output.dense", kind="linear_out"),
        *norm_rules("layers/mlp_norm", f"{layer}.layernorm_after"),
        *linear_rules("layers/mlp/up", f"{layer}.intermediate.dense"),
        *linear_rules("layers/mlp/down", f"{layer}.output.dense"),
        *norm_rules("final_norm", f"{pre}layernorm"),
    ]
    if c.pooler:
        rules += linear_rules("pooler", f"{pre}pooler.dense")
    if c.classifier:
        rules += linear_rules("head", "classifier")
    # ViTModel(use_mask_token=True) (the masked-image-modeling base) carries an unused mask token.
    return Mapping(rules, ignore=(r"(vit\.)?embeddings\.mask_token",), prefix=_PREFIX)
