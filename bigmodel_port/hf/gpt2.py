"""GPT-2: HF ``GPT2Model`` / ``GPT2LMHeadModel`` <-> our GPT tree (``GPTConfig`` with learned
positions, layer norm, plain MLP). The one place GPT-2's HF names are translated.

GPT-2 stores its projections as ``Conv1D`` weights, (In, Out) — our kernel layout already — with
the query, key and value projections fused in one ``attn.c_attn`` tensor, (D, 3 H E) and bias
(3 H E,), split here along the output axis into our (D, H, E) kernels and (H, E) biases.
"""

from __future__ import annotations

from typing import Any

from bigmodel_port.hf.common import ACTIVATIONS_TO_HF, activation_from_hf, build_config, dtype_from_hf, merge_hf
from bigmodel_port.hf.common import require, unsupported
from bigmodel_port.hf.mapping import Mapping, Rule, norm_rules
from reference_numpy.configs import GPTConfig

MODEL_TYPE = "gpt2"
FAMILY = "gpt"

# HF class -> our task. "causal_lm": logits from reference_numpy.models.gpt.forward; "base": the
# final-norm hidden states (HF GPT2Model's last_hidden_state is after ln_f), models.gpt.hidden_states.
ARCHITECTURES = {
    "GPT2LMHeadModel": "causal_lm",
    "GPT2Model": "base",
}

_PREFIX = "transformer."  # base-model prefix inside GPT2LMHeadModel's state dict

# our config field -> the config.json key it is read from (names the key when a value is refused)
HF_KEYS = {
    "n_layers": "n_layer", "d_model": "n_embd", "n_heads": "n_head", "d_ff": "n_inner",
    "vocab_size": "vocab_size", "max_len": "n_positions", "dropout": "resid_pdrop",
    "norm_eps": "layer_norm_epsilon", "activation": "activation_function",
}


def config_from_hf(hf: dict[str, Any], architecture: str) -> GPTConfig:
    """Our config for an HF GPT-2 ``config.json`` dict; features we do not implement are refused.

    A base model (``GPT2Model``) has no output head, so its config always reads as tied (no
    ``lm_head`` leaf in our tree); ``config_to_hf`` writes back the file's own tie flag.
    """
    mt = MODEL_TYPE
    # Attention variants of GPT2Attention that compute a different function than ours.
    unsupported(hf, "scale_attn_weights", (True,), True, mt)
    unsupported(hf, "scale_attn_by_inverse_layer_idx", (False,), False, mt)
    unsupported(hf, "reorder_and_upcast_attn", (False,), False, mt)
    unsupported(hf, "add_cross_attention", (False,), False, mt)
    d = require(hf, "n_embd", model_type=mt)
    tie = bool(hf.get("tie_word_embeddings", True)) or ARCHITECTURES[architecture] == "base"
    return build_config(GPTConfig, dict(
        n_layers=require(hf, "n_layer", model_type=mt),
        d_model=d,
        n_heads=require(hf, "n_head", model_type=mt),
        n_kv_heads=None,
        # n_inner None means 4 D (a bad n_embd is refused by name before d_ff is checked)
        d_ff=require(hf, "n_inner", 4 * d if isinstance(d, int) else d, model_type=mt),
        vocab_size=require(hf, "vocab_size", model_type=mt),
        max_len=require(hf, "n_positions", 1024, model_type=mt),
        dropout=require(hf, "resid_pdrop", 0.1, model_type=mt),
        norm="layer",
        norm_eps=require(hf, "layer_norm_epsilon", 1e-5, model_type=mt),
        activation=activation_from_hf(require(hf, "activation_function", "gelu_new", model_type=mt),
                                      "activation_function"),
        gated_mlp=False,
        positions="learned",
        bias=True,
        tie_embeddings=tie,
        head_dim=None,
        dtype=dtype_from_hf(hf),
    ), hf, HF_KEYS, mt)


def config_to_hf(config: GPTConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (fields of ``base`` we do not model are kept)."""
    c = config
    if (c.norm, c.positions, c.gated_mlp, c.bias) != ("layer", "learned", False, True):
        raise ValueError("a GPT-2 checkpoint needs norm='layer', positions='learned', gated_mlp=False, "
                         f"bias=True; this config has norm={c.norm!r}, positions={c.positions!r}, "
                         f"gated_mlp={c.gated_mlp}, bias={c.bias}")
    if c.kv_heads != c.n_heads or c.e * c.n_heads != c.d_model:
        raise ValueError("GPT-2 has H key/value heads of width D / H; this config has "
                         f"K={c.kv_heads}, E={c.e} for H={c.n_heads}, D={c.d_model}")
    b = base or {}
    n_inner = None if c.d_ff == 4 * c.d_model and b.get("n_inner") is None else c.d_ff
    tie = c.tie_embeddings if ARCHITECTURES[architecture] != "base" else b.get("tie_word_embeddings", True)
    return merge_hf(base, {
        "model_type": MODEL_TYPE, "architectures": [architecture],
        "n_layer": c.n_layers, "n_embd": c.d_model, "n_head": c.n_heads, "n_inner": n_inner,
        "vocab_size": c.vocab_size, "n_positions": c.max_len,
        "resid_pdrop": c.dropout, "embd_pdrop": b.get("embd_pdrop", c.dropout),
        "attn_pdrop": b.get("attn_pdrop", c.dropout),
        "layer_norm_epsilon": c.norm_eps, "activation_function": ACTIVATIONS_TO_HF[c.activation],
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": tie, "dtype": c.dtype,
    })


def mapping(config: GPTConfig, architecture: str) -> Mapping:
    """The name table of ``architecture`` for ``config``."""
    p = "" if ARCHITECTURES[architecture] == "base" else _PREFIX
    h = f"{p}h.{{i}}"
    qkv = ("layers/attn/query", "layers/attn/key", "layers/attn/value")
    rules = [
        Rule("embed/embedding", f"{p}wte.weight"),
        Rule("position/embedding", f"{p}wpe.weight"),
        *norm_rules("layers/attn_norm", f"{h}.ln_1"),
        # c_attn: (D, 3 H E) = [query | key | value] along the output axis -> 3 x (D, H, E)
        Rule(tuple(f"{q}/kernel" for q in qkv), f"{h}.attn.c_attn.weight", "conv1d", fused_axis=1),
        Rule(tuple(f"{q}/bias" for q in qkv), f"{h}.attn.c_attn.bias", "reshape", fused_axis=0),
        # c_proj: (H E, D) -> our out kernel (H, E, D)
        Rule("layers/attn/out/kernel", f"{h}.attn.c_proj.weight", "conv1d_out"),
        Rule("layers/attn/out/bias", f"{h}.attn.c_proj.bias"),
        *norm_rules("layers/mlp_norm", f"{h}.ln_2"),
        Rule("layers/mlp/up/kernel", f"{h}.mlp.c_fc.weight", "conv1d"),
        Rule("layers/mlp/up/bias", f"{h}.mlp.c_fc.bias"),
        Rule("layers/mlp/down/kernel", f"{h}.mlp.c_proj.weight", "conv1d"),
        Rule("layers/mlp/down/bias", f"{h}.mlp.c_proj.bias"),
        *norm_rules("final_norm", f"{p}ln_f"),
    ]
    if ARCHITECTURES[architecture] == "causal_lm":
        if config.tie_embeddings:  # lm_head is the token embedding
            rules.append(Rule("embed/embedding", "lm_head.weight", tied_to=f"{p}wte.weight"))
        else:  # nn.Linear(D, V, bias=False): (V, D) -> our (D, V)
            rules.append(Rule("lm_head/kernel", "lm_head.weight", "linear"))
    # Older checkpoints carry the causal-mask buffers h.{i}.attn.bias / masked_bias: not weights.
    return Mapping(rules, ignore=(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",), prefix=_PREFIX)
