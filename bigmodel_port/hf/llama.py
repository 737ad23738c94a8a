"""Llama: HF ``LlamaModel`` / ``LlamaForCausalLM`` <-> our GPT tree (``GPTConfig`` with RoPE, RMS
norm, gated MLP). The one place Llama's HF names are translated.

RoPE layout: HF Llama rotates with ``rotate_half`` (feature pairs (i, i + E/2)), our
``rope_layout="half"``. HF's conversion script already permuted Meta's q/k weights into that
layout, so the q/k projections map like any other ``nn.Linear`` ("linear" kind, no permutation).
"""

from __future__ import annotations

from typing import Any

from bigmodel_port.hf.common import ACTIVATIONS_TO_HF, activation_from_hf, build_config, dtype_from_hf, merge_hf
from bigmodel_port.hf.common import require, unsupported
from bigmodel_port.hf.mapping import Mapping, Rule, linear_rules, norm_rules
from reference_numpy.configs import GPTConfig

MODEL_TYPE = "llama"
FAMILY = "gpt"

# HF class -> our task. "causal_lm": logits from reference_numpy.models.gpt.forward; "base": the
# final-norm hidden states (LlamaModel's last_hidden_state is after model.norm).
ARCHITECTURES = {
    "LlamaForCausalLM": "causal_lm",
    "LlamaModel": "base",
}

_PREFIX = "model."  # base-model prefix inside LlamaForCausalLM's state dict
_DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta

# our config field -> the config.json key it is read from (names the key when a value is refused)
HF_KEYS = {
    "n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "vocab_size": "vocab_size",
    "max_len": "max_position_embeddings", "dropout": "attention_dropout", "norm_eps": "rms_norm_eps",
    "activation": "hidden_act", "rope_theta": "rope_theta", "head_dim": "head_dim",
}


def rope_theta_from_hf(hf: dict[str, Any]) -> Any:
    """The RoPE base of a Llama ``config.json``; any RoPE scaling is refused by name.

    transformers v5 writes ``rope_parameters: {"rope_type": ..., "rope_theta": ...}``; v4 files
    have a top-level ``rope_theta`` and ``rope_scaling`` (``{"type" or "rope_type": ...}`` or
    null). As in transformers, ``rope_scaling`` wins over ``rope_parameters`` when both are set.
    The value is returned as written; ``GPTConfig`` refuses one that is not a number > 0.
    """
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"llama config.json rope parameters {params!r} are not supported "
                         "(expected one flat dict)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        # linear / dynamic / yarn / longrope / llama3 rescale the frequencies or the angles:
        # a different model than plain RoPE.
        raise ValueError(f"llama config.json rope_type={rope_type!r} (RoPE scaling) is not supported "
                         "(supported: 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return _DEFAULT_THETA if theta is None else theta  # GPTConfig checks it is a number > 0


def config_from_hf(hf: dict[str, Any], architecture: str) -> GPTConfig:
    """Our config for an HF Llama ``config.json`` dict; features we do not implement are refused.

    A base model (``LlamaModel``) has no output head, so its config always reads as tied (no
    ``lm_head`` leaf in our tree); ``config_to_hf`` writes back the file's own tie flag.
    """
    mt = MODEL_TYPE
    unsupported(hf, "pretraining_tp", (1, None), 1, mt)
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        # our GPTConfig has one `bias` flag for both the attention and the MLP projections
        raise ValueError(f"llama config.json attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                         "supported (both must be equal)")
    d = require(hf, "hidden_size", model_type=mt)
    h = require(hf, "num_attention_heads", model_type=mt)
    # An explicit head_dim equal to D / H is the default; any other one is kept (and checked by
    # GPTConfig), so no division happens here before the sizes are validated.
    head_dim = hf.get("head_dim")
    if type(head_dim) is int and type(h) is int and head_dim * h == d:
        head_dim = None
    tie = bool(hf.get("tie_word_embeddings", False)) or ARCHITECTURES[architecture] == "base"
    return build_config(GPTConfig, dict(
        n_layers=require(hf, "num_hidden_layers", model_type=mt),
        d_model=d,
        n_heads=h,
        n_kv_heads=require(hf, "num_key_value_heads", h, model_type=mt),
        d_ff=require(hf, "intermediate_size", model_type=mt),
        vocab_size=require(hf, "vocab_size", model_type=mt),
        max_len=require(hf, "max_position_embeddings", 2048, model_type=mt),
        # Llama's only dropout is on the attention probabilities; a training setting either way.
        dropout=require(hf, "attention_dropout", 0.0, model_type=mt),
        norm="rms",
        norm_eps=require(hf, "rms_norm_eps", 1e-6, model_type=mt),
        activation=activation_from_hf(require(hf, "hidden_act", "silu", model_type=mt), "hidden_act"),
        gated_mlp=True,
        positions="rope",
        rope_theta=rope_theta_from_hf(hf),
        rope_layout="half",
        bias=attention_bias,
        tie_embeddings=tie,
        head_dim=head_dim,
        dtype=dtype_from_hf(hf),
    ), hf, {**HF_KEYS, "rope_theta": _rope_theta_key(hf)}, mt)


def _rope_theta_key(hf: dict[str, Any]) -> str:
    """The config.json key ``rope_theta_from_hf`` read the RoPE base from."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key)
    return key if isinstance(params, dict) and "rope_theta" in params else "rope_theta"


def config_to_hf(config: GPTConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (fields of ``base`` we do not model are kept)."""
    c = config
    if (c.norm, c.positions, c.gated_mlp, c.rope_layout) != ("rms", "rope", True, "half"):
        raise ValueError("a Llama checkpoint needs norm='rms', positions='rope', gated_mlp=True, "
                         f"rope_layout='half'; this config has norm={c.norm!r}, positions={c.positions!r}, "
                         f"gated_mlp={c.gated_mlp}, rope_layout={c.rope_layout!r}")
    b = base or {}
    tie = c.tie_embeddings if ARCHITECTURES[architecture] != "base" else b.get("tie_word_embeddings", False)
    out = merge_hf(base, {
        "model_type": MODEL_TYPE, "architectures": [architecture],
        "num_hidden_layers": c.n_layers, "hidden_size": c.d_model, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.e, "intermediate_size": c.d_ff,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_len,
        "attention_dropout": c.dropout, "rms_norm_eps": c.norm_eps,
        "hidden_act": ACTIVATIONS_TO_HF[c.activation],
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias, "mlp_bias": c.bias, "pretraining_tp": 1,
        "tie_word_embeddings": tie, "dtype": c.dtype,
    })
    # v4 spellings of the RoPE settings would override rope_parameters when read back
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
    return out


def mapping(config: GPTConfig, architecture: str) -> Mapping:
    """The name table of ``architecture`` for ``config``."""
    p = "" if ARCHITECTURES[architecture] == "base" else _PREFIX
    layer = f"{p}layers.{{i}}"
    b = config.bias
    rules = [
        Rule("embed/embedding", f"{p}embed_tokens.weight"),
        *norm_rules("layers/attn_norm", f"{layer}.input_layernorm", bias=False),
        # (H E, D) -> (D, H, E); (K E, D) -> (D, K, E): already in rotate_half order (see above)
        *linear_rules("layers/attn/query", f"{layer}.self_attn.q_proj", b),
        *linear_rules("layers/attn/key", f"{layer}.self_attn.k_proj", b),
        *linear_rules("layers/attn/value", f"{layer}.self_attn.v_proj", b),
        *linear_rules("layers/attn/out", f"{layer}.self_attn.o_proj", b, kind="linear_out"),  # -> (H, E, D)
        *norm_rules("layers/mlp_norm", f"{layer}.post_attention_layernorm", bias=False),
        *linear_rules("layers/mlp/gate", f"{layer}.mlp.gate_proj", b),
        *linear_rules("layers/mlp/up", f"{layer}.mlp.up_proj", b),
        *linear_rules("layers/mlp/down", f"{layer}.mlp.down_proj", b),
        *norm_rules("final_norm", f"{p}norm", bias=False),
    ]
    if ARCHITECTURES[architecture] == "causal_lm":
        if config.tie_embeddings:  # lm_head is the token embedding
            rules.append(Rule("embed/embedding", "lm_head.weight", tied_to=f"{p}embed_tokens.weight"))
        else:  # nn.Linear(D, V, bias=False): (V, D) -> our (D, V)
            rules.append(Rule("lm_head/kernel", "lm_head.weight", "linear"))
    # Older checkpoints saved the RoPE inverse frequencies as buffers: derived, not weights.
    return Mapping(rules, ignore=(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",), prefix=_PREFIX)
