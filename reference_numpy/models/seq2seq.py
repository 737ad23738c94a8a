"""Encoder-decoder Transformer (Vaswani et al. 2017): forward and the hand-written backward.

Dims: B batch, S source time, T target time, D model width, V vocabulary.

    source   x   = E[input_ids] * sqrt(D) + PE[s]                              (B, S, D)
             x   = enc_block_l(x; keys padded by attention_mask)   l = 1..L_enc
             enc = norm_enc(x) if prenorm else x                               (B, S, D)
    target   y   = E_tgt[decoder_input_ids] * sqrt(D) + PE[t]                  (B, T, D)
             y   = dec_block_l(y, enc; causal, keys padded by decoder_attention_mask,
                                 encoder keys padded by attention_mask)   l = 1..L_dec
             h   = norm_dec(y) if prenorm else y
    logits       = h E_tgt^T (share_embeddings) or h W_lm   [+ b_V]             (B, T, V)
    loss         = CE(logits, labels; label smoothing config.label_smoothing, -100 ignored)

* ``E_tgt`` is ``embed`` itself when ``share_embeddings`` (one matrix for source, target and the
  pre-softmax weights, section 3.4 of the paper), else ``target_embed``, with its own ``lm_head``.
* ``sqrt(D)`` only when ``scale_embeddings``. ``PE`` is the fixed sinusoidal table
  ``sinusoidal_positions(..., layout=config.position_layout)``, ``w_i = 10000^(-2i/D)``:
  "interleaved" is the paper's ``PE[t, 2i] = sin(t w_i)``, ``PE[t, 2i + 1] = cos(t w_i)``;
  "concat" is Marian's (HF ``MarianSinusoidalPositionalEmbedding``): all sines, then all
  cosines. It has no parameters and no gradient.
* ``b_V`` is the learned ``final_logits_bias`` (V,) when ``config.final_logits_bias`` (Marian);
  its gradient is ``dlogits`` summed over B and T.
* Blocks are ``layers.block`` with ``BlockSpec(prenorm=config.prenorm, norm="layer")``: post-norm
  (the paper) or pre-norm, which then needs the ``final_norm`` of each stack.
* ``labels`` are aligned with ``decoder_input_ids``: ``logits[:, t]`` is scored against
  ``labels[:, t]``, with no shift inside (as HF's seq2seq models). The caller builds
  ``decoder_input_ids`` by shifting the labels right behind a start token.
* Training-mode dropout (one rate ``config.dropout``; HF Marian's / the paper's sites plus
  attention dropout) when ``masks`` is given, a tree shaped by ``dropout_mask_shapes``
  (keep-masks, True = keep, kept entries scaled by 1 / (1 - p)); no masks = evaluation:

      x = drop(E[input_ids] * sqrt(D) + PE; masks["encoder"]["embed"] (B, S, D))
      y = drop(E_tgt[decoder_input_ids] * sqrt(D) + PE; masks["decoder"]["embed"] (B, T, D))
      in each block, per layer l of masks[stack]["layers"]:
          attention probs            attn_probs (B, H, T, T) (encoder: (B, H, S, S))
          cross-attention probs      cross_probs (B, H, T, S)                (decoder only)
          each sub-layer's output    attn_out / cross_out / mlp_out (B, T, D) (encoder (B, S, D)),
                                     before the residual add (and the post-norm)

  HF Marian's ``activation_dropout`` (inside the MLP) is not modelled, and its
  ``attention_dropout`` is this same rate. The JAX model draws the same tree from a key
  (``bigmodel_jax.models.seq2seq.dropout_masks``).
* Initialisation: ``models.common.init_rule``, identical rules on both sides: norm scales 1,
  biases 0, other leaves N(0, 0.02), and the residual-writing projections (``attn/out``,
  ``cross_attn/out``, ``mlp/down``) N(0, 0.02 / sqrt(2 L)) with L = ``config.n_layers`` (the
  encoder depth) in both stacks. The paper does not state its init; this is GPT-2's.

Backward: the encoder output feeds the cross-attention of every decoder layer, so its gradient
is the sum of each decoder block's ``d_enc``; it then runs back through the encoder. With shared
embeddings the one matrix collects three gradients: source lookup, target lookup, output head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from reference_numpy.speed.contract import einsum, rows_matmul
from reference_numpy.checks import check_array
from reference_numpy.configs import Seq2SeqConfig, param_shapes
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.dropout import (
    dropout_backward,
    dropout_mask_tree,
    optional_dropout_forward,
    resolve_mask_tree,
)
from reference_numpy.layers.embeddings import (
    embedding_attend,
    embedding_attend_backward,
    embedding_backward,
    embedding_forward,
    sinusoidal_positions,
)
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward
from reference_numpy.losses import check_labels, cross_entropy_backward, cross_entropy_forward
from reference_numpy.layers.attention import project_keys_values
from reference_numpy.models.common import (
    check_cached_token_batch,
    check_token_batch,
    collect_blocks,
    init_params,
    layer,
    require_keys,
    stack,
)
from reference_numpy.tree import Tree, tree_add


# --------------------------------------------------------------------------------------------
# shared with the JAX model: block specs, batch checks


def encoder_spec(config: Seq2SeqConfig) -> BlockSpec:
    """The encoder block: bidirectional self-attention + MLP."""
    return BlockSpec(prenorm=config.prenorm, norm="layer", norm_eps=config.norm_eps,
                     activation=config.activation, causal=False)


def decoder_spec(config: Seq2SeqConfig) -> BlockSpec:
    """The decoder block: causal self-attention, cross-attention to the encoder, MLP."""
    return BlockSpec(prenorm=config.prenorm, norm="layer", norm_eps=config.norm_eps,
                     activation=config.activation, causal=True)


def encoder_mask_shapes(config: Seq2SeqConfig, batch_size: int, source_length: int) -> dict[str, Any]:
    """The encoder's training masks for a (B, S) source: ``{"embed": (B, S, D), "layers":
    {"attn_probs": (L, B, H, S, S), "attn_out": (L, B, S, D), "mlp_out": (L, B, S, D)}}``."""
    B, S, D, H, L = batch_size, source_length, config.d_model, config.n_heads, config.n_layers
    return {"embed": (B, S, D),
            "layers": {"attn_probs": (L, B, H, S, S), "attn_out": (L, B, S, D), "mlp_out": (L, B, S, D)}}


def decoder_mask_shapes(
    config: Seq2SeqConfig, batch_size: int, source_length: int, target_length: int
) -> dict[str, Any]:
    """The decoder's training masks for a (B, T) target over a (B, S) source: ``{"embed":
    (B, T, D), "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D),
    "cross_probs": (L, B, H, T, S), "cross_out": (L, B, T, D), "mlp_out": (L, B, T, D)}}``."""
    B, S, T, D, H = batch_size, source_length, target_length, config.d_model, config.n_heads
    L = config.decoder_layers
    return {"embed": (B, T, D),
            "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D),
                       "cross_probs": (L, B, H, T, S), "cross_out": (L, B, T, D), "mlp_out": (L, B, T, D)}}


def dropout_mask_shapes(
    config: Seq2SeqConfig, batch_size: int, source_length: int, target_length: int
) -> dict[str, Any]:
    """Shapes of all training masks (shared with the JAX model):
    ``{"encoder": encoder_mask_shapes(...), "decoder": decoder_mask_shapes(...)}``."""
    return {"encoder": encoder_mask_shapes(config, batch_size, source_length),
            "decoder": decoder_mask_shapes(config, batch_size, source_length, target_length)}


def embed_scale(config: Seq2SeqConfig) -> float:
    """The factor on token embeddings: sqrt(D) (paper, section 3.4) or 1."""
    return math.sqrt(config.d_model) if config.scale_embeddings else 1.0


def check_source(batch: dict[str, Any], config: Seq2SeqConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """input_ids (B, S) in [0, V), S <= max_len; attention_mask (B, S) optional -> (ids, bool mask)."""
    require_keys(batch, ["input_ids"], "seq2seq")
    return check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)


def check_target(
    batch: dict[str, Any], config: Seq2SeqConfig, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """decoder_input_ids (B, T) in [0, V), T <= max_len; decoder_attention_mask (B, T) optional.

    ``batch_size``: the source's B, which the target must match.
    """
    require_keys(batch, ["decoder_input_ids"], "seq2seq")
    ids, mask = check_token_batch(batch, "decoder_input_ids", config.vocab_size, config.max_len)
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(
            f"decoder_input_ids has batch size {ids.shape[0]} but the source has {batch_size}; "
            "input_ids (B, S) and decoder_input_ids (B, T) must share B"
        )
    return ids, mask


def check_encoder_output(enc: Any, batch: dict[str, Any], config: Seq2SeqConfig, batch_size: int) -> None:
    """enc (B, S, D) float; the source attention_mask, if given, must be (B, S)."""
    check_array("enc", enc, (batch_size, "S", config.d_model), kind="float")
    mask = batch.get("attention_mask")
    if mask is not None:
        check_array("attention_mask", mask, (batch_size, enc.shape[1]))


def check_loss_labels(batch: dict[str, Any], config: Seq2SeqConfig) -> None:
    """The loss's ``labels`` (B, T), shaped like ``decoder_input_ids``, each in [0, V) or -100
    (``losses.check_labels``: values when concrete; under ``jit`` the caller checks on the host)."""
    require_keys(batch, ["decoder_input_ids", "labels"], "seq2seq")
    check_labels(batch["labels"], config.vocab_size, "labels", shape=tuple(np.shape(batch["decoder_input_ids"])))


# --------------------------------------------------------------------------------------------
# model


def dropout_masks(
    config: Seq2SeqConfig, rng: np.random.Generator, batch_size: int, source_length: int, target_length: int
) -> Tree:
    """A fresh tree of keep-masks (``dropout_mask_shapes``) drawn with P(keep) = 1 - config.dropout."""
    shapes = dropout_mask_shapes(config, batch_size, source_length, target_length)
    return dropout_mask_tree(rng, shapes, config.dropout)


def _with_rate(spec: BlockSpec, masks: Tree | None, config: Seq2SeqConfig) -> BlockSpec:
    """The block spec carrying the dropout rate when masks are in use."""
    return spec if masks is None else dataclasses.replace(spec, dropout_rate=config.dropout)


def init(config: Seq2SeqConfig, rng: np.random.Generator) -> Tree:
    """Fresh parameters (same rules as ``bigmodel_jax.models.seq2seq.init``, NumPy random stream)."""
    return init_params(param_shapes(config), config.n_layers, rng, np.dtype(config.dtype))


def _target_table(params: Tree, config: Seq2SeqConfig) -> Tree:
    return params["embed"] if config.share_embeddings else params["target_embed"]


def position_codes(positions: np.ndarray, config: Seq2SeqConfig, dtype: Any) -> np.ndarray:
    """positions (N,) ints -> the fixed sinusoidal codes PE (N, D) in ``config.position_layout``
    (shared by the full forward and the cached decoding step of ``reference_numpy.generation``)."""
    return sinusoidal_positions(positions, config.d_model, dtype, layout=config.position_layout)


def _embed_forward(
    table: Tree, ids: np.ndarray, config: Seq2SeqConfig, mask: np.ndarray | None = None, offset: int = 0
) -> tuple[np.ndarray, Any]:
    """ids (B, N) at positions offset + n -> drop(E[ids] * scale + PE[offset + n]): (B, N, D)
    (``mask`` (B, N, D): the training dropout mask, None = evaluation); cache for
    ``_embed_backward``."""
    x, c = embedding_forward(table, ids)  # (B, N, D)
    scale = x.dtype.type(embed_scale(config))
    pe = position_codes(offset + np.arange(ids.shape[1]), config, x.dtype)  # (N, D)
    y, c_drop = optional_dropout_forward(x * scale + pe[None], mask, config.dropout)
    return y, (c, scale, c_drop)


def _embed_backward(table: Tree, cache: Any, dx: np.ndarray) -> Tree:
    c, scale, c_drop = cache
    _, g = embedding_backward(table, c, dropout_backward(c_drop, dx) * scale)
    return g


def encode_with_cache(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """input_ids (B, S) [, attention_mask (B, S)] -> encoder output (B, S, D) and its cache.
    ``masks``: the encoder's training dropout masks (``encoder_mask_shapes``, i.e.
    ``masks["encoder"]`` of a full tree), None = evaluation. ``collect``: a trace list to append
    the ``encoder.*`` rows to (``reference_numpy.trace``)."""
    ids, mask = check_source(batch, config)
    masks = resolve_mask_tree(masks, encoder_mask_shapes(config, *ids.shape), config.dropout, "masks (encoder)")
    x, c_embed = _embed_forward(params["embed"], ids, config,
                                None if masks is None else masks["embed"])  # (B, S, D)
    if collect is not None:
        collect.append(("encoder.embeddings", x))
    spec = _with_rate(encoder_spec(config), masks, config)
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        m = None if masks is None else layer(masks["layers"], i)
        inter: dict[str, np.ndarray] | None = None if collect is None else {}
        x, c = block_forward(layer(params["encoder"]["layers"], i), x, spec, key_padding_mask=mask, masks=m,
                             intermediates=inter)
        collect_blocks(collect, "encoder.", i, inter)
        c_blocks.append(c)
    c_norm = None
    if config.prenorm:
        x, c_norm = layer_norm_forward(params["encoder"]["final_norm"], x, eps=config.norm_eps)
        if collect is not None:
            collect.append(("encoder.final_norm", x))
    return x, (c_embed, c_blocks, c_norm)


def encode(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig) -> np.ndarray:
    """Encoder output (B, S, D), reusable by ``decode`` for every decoding step."""
    return encode_with_cache(params, batch, config)[0]


def init_cache(params: Tree, enc: np.ndarray, config: Seq2SeqConfig, slots: int) -> Tree:
    """A decoding cache for ``decode_with_cache(..., kv_cache=)``: the self-attention's zeroed
    ``{"k", "v"}`` (L, B, slots, K, E) and the cross-attention's keys/values of the encoder
    output ``enc`` (B, S, D), projected once: ``{"ck", "cv"}`` (L, B, S, K, E)."""
    B = enc.shape[0]
    K, E = config.n_kv_heads or config.n_heads, config.d_model // config.n_heads
    cross = [project_keys_values(layer(params["decoder"]["layers"], i)["cross_attn"], enc)
             for i in range(config.decoder_layers)]
    shape = (config.decoder_layers, B, slots, K, E)
    return {"k": np.zeros(shape, enc.dtype), "v": np.zeros(shape, enc.dtype),
            "ck": np.stack([k for k, _ in cross]), "cv": np.stack([v for _, v in cross])}


def decode_with_cache(
    params: Tree, enc: np.ndarray | None, batch: dict[str, Any], config: Seq2SeqConfig, *,
    masks: Tree | None = None, kv_cache: Tree | None = None, cache_pos: int = 0, collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """enc (B, S, D), decoder_input_ids (B, T) [, attention_mask (B, S) of the source,
    decoder_attention_mask (B, T)] -> logits (B, T, V) and the decoder's cache. ``masks``: the
    decoder's training dropout masks (``decoder_mask_shapes``, i.e. ``masks["decoder"]`` of a
    full tree), None = evaluation.

    ``kv_cache`` (``init_cache``): decode instead. ``decoder_input_ids`` (B, N) are the target
    tokens at slots [cache_pos, cache_pos + N), written into the cache in place; the
    cross-attention reads the cached source keys/values, so ``enc`` may be None;
    ``decoder_attention_mask``, if given, covers all (B, slots). Forward only.
    ``collect``: a trace list to append the ``decoder.*`` rows to."""
    if kv_cache is None:
        ids, dec_mask = check_target(batch, config)
    else:
        require_keys(batch, ["decoder_input_ids"], "seq2seq")
        ids, dec_mask = check_cached_token_batch(batch, "decoder_input_ids", config.vocab_size, config.max_len,
                                                 kv_cache["k"].shape[2], cache_pos)
        if masks is not None:
            raise ValueError("dropout masks are for training; decoding with kv_cache is evaluation")
    B, T = ids.shape
    if enc is not None:
        check_encoder_output(enc, batch, config, B)
    elif kv_cache is None:
        raise ValueError("decode needs the encoder output enc (B, S, D), or a kv_cache holding it")
    S = enc.shape[1] if enc is not None else kv_cache["ck"].shape[2]
    masks = resolve_mask_tree(masks, decoder_mask_shapes(config, B, S, T), config.dropout, "masks (decoder)")
    src_mask = batch.get("attention_mask")
    if src_mask is not None:
        check_array("attention_mask", src_mask, (B, S))
        src_mask = np.asarray(src_mask).astype(bool)
    table = _target_table(params, config)
    y, c_embed = _embed_forward(table, ids, config, None if masks is None else masks["embed"],
                                offset=cache_pos)  # (B, T, D)
    if collect is not None:
        collect.append(("decoder.embeddings", y))
    spec = _with_rate(decoder_spec(config), masks, config)
    c_blocks = []
    for i in range(config.decoder_layers):
        m = None if masks is None else layer(masks["layers"], i)
        lc = None if kv_cache is None else {name: a[i] for name, a in kv_cache.items()}  # views
        inter: dict[str, np.ndarray] | None = None if collect is None else {}
        y, c = block_forward(layer(params["decoder"]["layers"], i), y, spec, enc=enc,
                             key_padding_mask=dec_mask, enc_padding_mask=src_mask, masks=m,
                             intermediates=inter, kv_cache=lc, cache_pos=None if lc is None else cache_pos)
        collect_blocks(collect, "decoder.", i, inter)
        c_blocks.append(c)
    c_norm = None
    if config.prenorm:
        y, c_norm = layer_norm_forward(params["decoder"]["final_norm"], y, eps=config.norm_eps)
        if collect is not None:
            collect.append(("decoder.final_norm", y))
    return decoder_logits(params, y, config), (c_embed, c_blocks, c_norm, y)  # the head's backward needs y


def decoder_logits(params: Tree, y: np.ndarray, config: Seq2SeqConfig) -> np.ndarray:
    """The decoder's LM head: y (..., D) -> logits (..., V), through the shared embedding or
    ``lm_head``, plus ``final_logits_bias`` (V,)."""
    if config.share_embeddings:
        logits = embedding_attend(params["embed"], y)[0]
    else:
        logits = rows_matmul(y, params["lm_head"]["kernel"])
    if config.final_logits_bias:
        logits = logits + params["final_logits_bias"]  # broadcast over the leading axes
    return logits


def decode(params: Tree, enc: np.ndarray, batch: dict[str, Any], config: Seq2SeqConfig) -> np.ndarray:
    """Logits (B, T, V) of the target tokens given the encoder output ``enc`` (B, S, D)."""
    return decode_with_cache(params, enc, batch, config)[0]


def forward_with_cache(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """Logits (B, T, V) and everything backward needs. ``masks``: training dropout masks
    (``dropout_mask_shapes``; e.g. ``np.asarray`` of the JAX ``dropout_masks``), None = evaluation.
    ``collect``: a list this call appends the trace rows to (``reference_numpy.trace``)."""
    src_ids, _ = check_source(batch, config)
    tgt_ids, _ = check_target(batch, config, src_ids.shape[0])
    masks = resolve_mask_tree(masks, dropout_mask_shapes(config, *src_ids.shape, tgt_ids.shape[1]), config.dropout)
    enc, c_enc = encode_with_cache(params, batch, config, masks=None if masks is None else masks["encoder"],
                                   collect=collect)
    logits, c_dec = decode_with_cache(params, enc, batch, config, masks=None if masks is None else masks["decoder"],
                                      collect=collect)
    return logits, (c_enc, c_dec)


def forward(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, masks: Tree | None = None,
            collect: list | None = None) -> np.ndarray:
    """Logits (B, T, V): position t's distribution over the token at ``labels[:, t]``
    (``masks``, ``collect``: see ``forward_with_cache``)."""
    return forward_with_cache(params, batch, config, masks=masks, collect=collect)[0]


# --------------------------------------------------------------------------------------------
# backward


def decode_backward(
    params: Tree, cache: Any, dlogits: np.ndarray, config: Seq2SeqConfig
) -> tuple[np.ndarray, Tree, Tree]:
    """dlogits (B, T, V) -> (d_enc (B, S, D), decoder grads, grads of the target table / head).

    The third tree holds ``embed`` (tied: target lookup + head) or ``target_embed`` and
    ``lm_head`` (untied), and ``final_logits_bias`` when the config has one.
    """
    c_embed, c_blocks, c_norm, c_head = cache
    outer: Tree = {}
    if config.final_logits_bias:
        outer["final_logits_bias"] = dlogits.sum(axis=(0, 1))  # the bias is added at every (b, t)
    if config.share_embeddings:
        dy, g_head = embedding_attend_backward(params["embed"], c_head, dlogits)
    else:
        h = c_head
        dy = rows_matmul(dlogits, params["lm_head"]["kernel"].T)  # (B, T, D)
        outer["lm_head"] = {"kernel": einsum("BTD,BTV->DV", h, dlogits)}
    g_dec: Tree = {}
    if config.prenorm:
        dy, g_dec["final_norm"] = layer_norm_backward(params["decoder"]["final_norm"], c_norm, dy)
    d_enc = None
    layer_grads = []
    for i in reversed(range(config.decoder_layers)):
        (dy, de), g = block_backward(layer(params["decoder"]["layers"], i), c_blocks[i], dy)
        d_enc = de if d_enc is None else d_enc + de  # every layer's cross-attention reads enc
        layer_grads.append(g)
    g_dec["layers"] = stack(layer_grads[::-1])
    g_table = _embed_backward(_target_table(params, config), c_embed, dy)
    if config.share_embeddings:
        outer["embed"] = tree_add(g_table, g_head)
    else:
        outer["target_embed"] = g_table
    return d_enc, g_dec, outer


def encode_backward(params: Tree, cache: Any, d_enc: np.ndarray, config: Seq2SeqConfig) -> tuple[Tree, Tree]:
    """d_enc (B, S, D) -> (encoder grads, source embedding grads {embedding: (V, D)})."""
    c_embed, c_blocks, c_norm = cache
    g_enc: Tree = {}
    dx = d_enc
    if config.prenorm:
        dx, g_enc["final_norm"] = layer_norm_backward(params["encoder"]["final_norm"], c_norm, dx)
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["encoder"]["layers"], i), c_blocks[i], dx)
        layer_grads.append(g)
    g_enc["layers"] = stack(layer_grads[::-1])
    return g_enc, _embed_backward(params["embed"], c_embed, dx)


def backward(params: Tree, cache: Any, dlogits: np.ndarray, config: Seq2SeqConfig) -> Tree:
    """Hand-written backward from dlogits (B, T, V) to a gradient tree shaped like params."""
    c_enc, c_dec = cache
    d_enc, g_dec, outer = decode_backward(params, c_dec, dlogits, config)
    g_enc, g_src = encode_backward(params, c_enc, d_enc, config)
    grads: Tree = {"encoder": g_enc, "decoder": g_dec, **outer}
    grads["embed"] = tree_add(outer["embed"], g_src) if config.share_embeddings else g_src
    return grads


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, masks: Tree | None = None
) -> tuple[np.ndarray, Tree]:
    """Mean label-smoothed cross-entropy of ``logits[:, t]`` against ``labels[:, t]`` (no shift;
    -100 ignored) and its gradient, by the hand-written backward (``masks``: training dropout
    masks, see ``forward_with_cache``; None = evaluation)."""
    logits, cache = forward_with_cache(params, batch, config, masks=masks)
    check_loss_labels(batch, config)
    labels = np.asarray(batch["labels"])
    loss, c_loss = cross_entropy_forward(logits, labels, label_smoothing=config.label_smoothing)
    dlogits = cross_entropy_backward(c_loss, np.ones((), logits.dtype))
    return loss, backward(params, cache, dlogits, config)
