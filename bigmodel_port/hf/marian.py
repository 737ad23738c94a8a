"""Marian: HF ``MarianMTModel`` <-> our encoder-decoder (``reference_numpy.models.seq2seq``).
The one place Marian's HF names are translated.

What a Marian translation model is, in our config's words: post-norm blocks (no embedding layer
norm, no final layer norms), LayerNorm eps 1e-5 (``nn.LayerNorm``'s default), sinusoidal
positions in the "concat" layout (``MarianSinusoidalPositionalEmbedding``: all sines, then all
cosines), token embeddings times sqrt(D) when ``scale_embedding``, biases on every projection, a
learned ``final_logits_bias`` (V,) on the logits, and one embedding matrix for the source, the
target and the output head (``share_encoder_decoder_embeddings`` and ``tie_word_embeddings``).

Embeddings, two supported layouts:

* shared and tied (every released opus-mt model): ``model.shared.weight`` is our
  ``embed/embedding``; ``model.encoder.embed_tokens``, ``model.decoder.embed_tokens`` and
  ``lm_head`` are tied copies of it (absent from transformers' own saves);
* neither shared nor tied: ``model.encoder.embed_tokens`` -> ``embed``, ``model.decoder.
  embed_tokens`` -> ``target_embed``, ``lm_head`` -> ``lm_head`` (our ``share_embeddings=False``).

The two mixed layouts are refused by name: one HF tensor would have to fill two of our leaves
(decoder embedding == LM head with a separate source embedding), or transformers versions
disagree on which tensors are tied (shared embeddings with an untied head).

``model.{encoder,decoder}.embed_positions.weight`` is the fixed sinusoidal table (derived, not
learned): it is ignored on load and left out on save, as transformers does
(``_keys_to_ignore_on_save``); transformers regenerates it when it loads our export.

Generation: transformers (v5) builds Marian's generation config from ``config.json`` /
``generation_config.json``; beyond the token ids it carries ``forced_eos_token_id`` (MarianConfig
defaults it to EOS: the last of ``max_new_tokens`` tokens is forced to EOS) and, in released
opus-mt checkpoints, ``bad_words_ids=[[pad]]`` (pad is never generated). Current MarianMTModel
has no other rule (the old ``adjust_logits_during_generation`` is gone). ``generation_options``
turns these fields into the keyword arguments of our ``seq2seq_generate``.

Export: ``as_marian`` rewrites an encoder-decoder with the paper's interleaved sinusoids and no
final logits bias (the ``seq2seq-tiny`` default) into the exact Marian equivalent (a permutation of
the model width, a zero bias); ``bigmodel export --format hf|onnx`` calls it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from bigmodel_port.hf.common import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, activation_from_hf, build_config
from bigmodel_port.hf.common import dtype_from_hf, merge_hf, require, unsupported
from bigmodel_port.hf.mapping import Mapping, Rule, linear_rules, norm_rules
from reference_numpy.configs import Seq2SeqConfig, param_axes
from reference_numpy.tree import Tree, tree_flatten, tree_unflatten

MODEL_TYPE = "marian"
FAMILY = "seq2seq"

# HF class -> our task
ARCHITECTURES = {"MarianMTModel": "seq2seq_lm"}

NORM_EPS = 1e-5  # HF Marian's layer norms are nn.LayerNorm(D) with the default eps

# our config field -> the config.json key it is read from (names the key when a value is refused)
HF_KEYS = {
    "n_layers": "encoder_layers", "n_decoder_layers": "decoder_layers", "d_model": "d_model",
    "n_heads": "encoder_attention_heads", "d_ff": "encoder_ffn_dim", "vocab_size": "vocab_size",
    "max_len": "max_position_embeddings", "dropout": "dropout", "activation": "activation_function",
    "scale_embeddings": "scale_embedding",
}


def config_from_hf(hf: dict[str, Any], architecture: str) -> Seq2SeqConfig:
    """Our config for an HF Marian ``config.json`` dict; features we do not implement are refused.

    Flags of older (BART-era) Marian configs that current transformers no longer reads are still
    checked: a true ``normalize_before`` / ``normalize_embedding`` / ``add_final_layer_norm`` /
    ``add_bias_logits`` or a false ``static_position_embeddings`` says the weights come from a
    model with layers Marian does not have, so loading them would compute another model.
    """
    mt = MODEL_TYPE
    unsupported(hf, "is_decoder", (False,), False, mt)
    unsupported(hf, "normalize_before", (False,), False, mt)  # Marian is post-norm
    unsupported(hf, "normalize_embedding", (False,), False, mt)  # no layernorm_embedding
    unsupported(hf, "add_final_layer_norm", (False,), False, mt)  # no final layer norms
    unsupported(hf, "add_bias_logits", (False,), False, mt)
    unsupported(hf, "static_position_embeddings", (True,), True, mt)  # sinusoidal, not learned
    for enc_key, dec_key in (("encoder_attention_heads", "decoder_attention_heads"),
                             ("encoder_ffn_dim", "decoder_ffn_dim")):
        enc, dec = require(hf, enc_key, model_type=mt), require(hf, dec_key, model_type=mt)
        if enc != dec:
            raise ValueError(f"{mt} config.json {enc_key}={enc} differs from {dec_key}={dec}; our "
                             "encoder-decoder uses one value for both stacks")
    vocab = require(hf, "vocab_size", model_type=mt)
    dec_vocab = hf.get("decoder_vocab_size") or vocab
    if dec_vocab != vocab:
        raise ValueError(f"{mt} config.json decoder_vocab_size={dec_vocab} differs from vocab_size={vocab}; "
                         "separate source and target vocabularies are not supported")
    return build_config(Seq2SeqConfig, dict(
        n_layers=require(hf, "encoder_layers", model_type=mt),
        n_decoder_layers=require(hf, "decoder_layers", model_type=mt),
        d_model=require(hf, "d_model", model_type=mt),
        n_heads=require(hf, "encoder_attention_heads", model_type=mt),
        d_ff=require(hf, "encoder_ffn_dim", model_type=mt),
        vocab_size=vocab,
        max_len=require(hf, "max_position_embeddings", 1024, model_type=mt),
        dropout=require(hf, "dropout", 0.1, model_type=mt),
        label_smoothing=0.0,  # MarianMTModel's loss is plain cross-entropy
        norm_eps=NORM_EPS,
        prenorm=False,
        activation=activation_from_hf(require(hf, "activation_function", "gelu", model_type=mt),
                                      "activation_function"),
        share_embeddings=_share_embeddings(hf),
        scale_embeddings=require(hf, "scale_embedding", False, model_type=mt),
        position_layout="concat",
        final_logits_bias=True,
        dtype=dtype_from_hf(hf),
    ), hf, HF_KEYS, mt)


def _share_embeddings(hf: dict[str, Any]) -> bool:
    """Our ``share_embeddings`` for the two supported embedding layouts (see the module docstring)."""
    share = bool(hf.get("share_encoder_decoder_embeddings", True))
    tie = bool(hf.get("tie_word_embeddings", True))
    if share != tie:
        which = ("share_encoder_decoder_embeddings=True with tie_word_embeddings=False (an LM head "
                 "separate from shared embeddings)" if share else
                 "share_encoder_decoder_embeddings=False with tie_word_embeddings=True (the LM head "
                 "tied to a decoder embedding separate from the encoder's)")
        raise ValueError(f"{MODEL_TYPE} config.json {which} is not supported; supported: both True "
                         "(one matrix everywhere) or both False (three separate matrices)")
    return share


def _check_expressible(config: Seq2SeqConfig) -> None:
    """Refuse to export a config that a MarianMTModel cannot compute."""
    problems = []
    if config.prenorm:
        problems.append("prenorm=True (Marian is post-norm)")
    if config.n_kv_heads not in (None, config.n_heads):
        problems.append(f"n_kv_heads={config.n_kv_heads} (Marian attention has H kv heads)")
    if config.position_layout != "concat":
        problems.append(f"position_layout={config.position_layout!r} (Marian uses 'concat')")
    if not config.final_logits_bias:
        problems.append("final_logits_bias=False (Marian always has one)")
    if config.norm_eps != NORM_EPS:
        problems.append(f"norm_eps={config.norm_eps} (Marian's LayerNorm eps is {NORM_EPS})")
    if config.activation not in ACTIVATIONS_TO_HF:
        problems.append(f"activation={config.activation!r}")
    if problems:
        raise ValueError("this config cannot be saved as a MarianMTModel: " + "; ".join(problems))


def concat_permutation(d_model: int) -> np.ndarray:
    """(D,) channel order that turns the "interleaved" sinusoid table into the "concat" one:
    ``interleaved[..., perm] == concat``. New channel j < ceil(D/2) is old channel 2j (the sine
    of w_j), new channel ceil(D/2) + j is old 2j + 1 (its cosine); odd D included (both layouts
    give the sine half the extra channel, ``sinusoidal_positions``)."""
    return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def as_marian(params: Tree, config: Seq2SeqConfig) -> tuple[Tree, Seq2SeqConfig]:
    """An equivalent (params, config) pair that a MarianMTModel can carry, for an encoder-decoder
    whose only differences from Marian have exact equivalents; the inputs are not modified.

    * ``position_layout="interleaved"`` -> "concat": every residual-stream (``"embed"``, D) axis of
      every leaf is permuted by ``concat_permutation`` (token embedding columns, LayerNorm scales
      and biases, the D side of the q/k/v, attention-out, MLP and LM-head kernels, the biases
      written to the residual). The network then computes the same function with the stream's
      channels reordered, and the reordered sinusoid table is exactly the concat one. This holds
      because nothing mixes stream channels except through those weights: LayerNorm's mean and
      variance do not depend on channel order, and the attention head dims are untouched.
    * ``final_logits_bias=False`` -> True with a zero (V,) bias.

    Which axes are D is read from ``param_axes`` (the one logical-axis table), not restated.
    Anything else Marian cannot compute (``prenorm=True``, grouped kv heads, another eps) raises
    the ``ValueError`` that ``config_to_hf`` raises; a tree whose leaves are not ``config``'s
    raises ``ValueError`` naming them."""
    if not isinstance(config, Seq2SeqConfig):
        raise ValueError(f"a MarianMTModel is an encoder-decoder: as_marian takes a Seq2SeqConfig, "
                         f"not {type(config).__name__}")
    target = replace(config, position_layout="concat", final_logits_bias=True)
    _check_expressible(target)
    axes = tree_flatten(param_axes(config))
    flat = tree_flatten(params)
    missing, extra = sorted(set(axes) - set(flat)), sorted(set(flat) - set(axes))
    if missing or extra:
        raise ValueError(f"params do not match the config's tree: missing {missing[:5]}, extra {extra[:5]}")
    out = {}
    perm = concat_permutation(config.d_model) if config.position_layout == "interleaved" else None
    for path, leaf in flat.items():
        leaf = np.asarray(leaf)
        if leaf.ndim != len(axes[path]):
            raise ValueError(f"params[{path!r}] has shape {leaf.shape}; its axes are {axes[path]}")
        for dim, name in enumerate(axes[path]):
            if perm is not None and name == "embed":
                leaf = np.take(leaf, perm, axis=dim)
        out[path] = leaf
    if not config.final_logits_bias:  # Marian always adds one: zero keeps the logits
        out["final_logits_bias"] = np.zeros((config.vocab_size,), np.asarray(flat["embed/embedding"]).dtype)
    return tree_unflatten(out), target


def config_to_hf(config: Seq2SeqConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (fields of ``base`` we do not model, such as the
    token ids and generation settings, are kept)."""
    _check_expressible(config)
    c = config
    act = (base or {}).get("activation_function")
    if ACTIVATIONS_FROM_HF.get(act) != c.activation:  # keep "swish" rather than rewrite it "silu"
        act = ACTIVATIONS_TO_HF[c.activation]
    out = merge_hf(base, {
        "model_type": MODEL_TYPE, "architectures": [architecture],
        "d_model": c.d_model, "encoder_layers": c.n_layers, "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.n_heads, "decoder_attention_heads": c.n_heads,
        "encoder_ffn_dim": c.d_ff, "decoder_ffn_dim": c.d_ff,
        "vocab_size": c.vocab_size, "decoder_vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_len, "activation_function": act,
        "scale_embedding": c.scale_embeddings, "dropout": c.dropout,
        "share_encoder_decoder_embeddings": c.share_embeddings, "tie_word_embeddings": c.share_embeddings,
        "is_encoder_decoder": True, "dtype": c.dtype,
    })
    # A fresh model (no original config.json): Marian's conventions, pad = the last token and the
    # decoder start, EOS = 0 (transformers' MarianConfig defaults are ids of a 58101-token vocab).
    for key, value in (("pad_token_id", c.vocab_size - 1), ("decoder_start_token_id", c.vocab_size - 1),
                       ("eos_token_id", 0), ("forced_eos_token_id", 0)):
        out.setdefault(key, value)
    return out


def generation_options(hf: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``seq2seq_generate`` (both packages) that reproduce transformers'
    greedy ``generate`` of a Marian model from its (generation) config dict ``hf``:
    ``decoder_start_token_id``, ``eos_token_id``, ``pad_token_id``, ``forced_eos_token_id`` and
    ``suppress_tokens`` (single-token ``bad_words_ids`` plus ``suppress_tokens``; HF never bans an
    EOS id through ``bad_words_ids``). Multi-token ``bad_words_ids`` are refused."""
    pad = hf.get("pad_token_id")
    eos = hf.get("eos_token_id")
    eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    banned = []
    for seq in hf.get("bad_words_ids") or []:
        if len(seq) != 1:
            raise ValueError(f"{MODEL_TYPE} bad_words_ids entry {seq} bans a multi-token sequence; only "
                             "single tokens are supported (suppress_tokens)")
        if seq[0] not in eos_list:
            banned.append(seq[0])
    banned += list(hf.get("suppress_tokens") or [])
    forced = hf.get("forced_eos_token_id")
    if isinstance(forced, list):
        if len(forced) != 1:
            raise ValueError(f"{MODEL_TYPE} forced_eos_token_id={forced}: only one forced EOS id is supported")
        forced = forced[0]
    return {
        "decoder_start_token_id": hf.get("decoder_start_token_id", pad),
        "eos_token_id": eos,
        "pad_token_id": pad,
        "forced_eos_token_id": forced,
        "suppress_tokens": tuple(sorted(set(banned))),
    }


def _attention(ours: str, hf: str) -> list[Rule]:
    # Our key bias is kept (bit-exact round trip) although, without RoPE, softmax cancels it.
    return [*linear_rules(f"{ours}/query", f"{hf}.q_proj"), *linear_rules(f"{ours}/key", f"{hf}.k_proj"),
            *linear_rules(f"{ours}/value", f"{hf}.v_proj"),
            *linear_rules(f"{ours}/out", f"{hf}.out_proj", kind="linear_out")]


def mapping(config: Seq2SeqConfig, architecture: str) -> Mapping:
    """The name table of ``architecture`` for ``config``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{architecture} is not a {MODEL_TYPE} architecture; known: {sorted(ARCHITECTURES)}")
    _check_expressible(config)
    enc, dec = "model.encoder.layers.{i}", "model.decoder.layers.{i}"
    if config.share_embeddings:
        src = "model.shared.weight"
        rules = [Rule("embed/embedding", src)]
        rules += [Rule("embed/embedding", name, tied_to=src) for name in (
            "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")]
    else:
        rules = [Rule("embed/embedding", "model.encoder.embed_tokens.weight"),
                 Rule("target_embed/embedding", "model.decoder.embed_tokens.weight"),
                 Rule("lm_head/kernel", "lm_head.weight", "linear")]  # (V, D) -> our (D, V)
    rules += [
        Rule("final_logits_bias", "final_logits_bias", "reshape", hf_shape=(1, config.vocab_size)),
        *_attention("encoder/layers/attn", f"{enc}.self_attn"),
        *norm_rules("encoder/layers/attn_norm", f"{enc}.self_attn_layer_norm"),
        *linear_rules("encoder/layers/mlp/up", f"{enc}.fc1"),
        *linear_rules("encoder/layers/mlp/down", f"{enc}.fc2"),
        *norm_rules("encoder/layers/mlp_norm", f"{enc}.final_layer_norm"),
        *_attention("decoder/layers/attn", f"{dec}.self_attn"),
        *norm_rules("decoder/layers/attn_norm", f"{dec}.self_attn_layer_norm"),
        *_attention("decoder/layers/cross_attn", f"{dec}.encoder_attn"),
        *norm_rules("decoder/layers/cross_norm", f"{dec}.encoder_attn_layer_norm"),
        *linear_rules("decoder/layers/mlp/up", f"{dec}.fc1"),
        *linear_rules("decoder/layers/mlp/down", f"{dec}.fc2"),
        *norm_rules("decoder/layers/mlp_norm", f"{dec}.final_layer_norm"),
    ]
    # the sinusoidal tables are derived from the config, never learned
    return Mapping(rules, ignore=(r"model\.(encoder|decoder)\.embed_positions\.weight",), prefix="model.")
