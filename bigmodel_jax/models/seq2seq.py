"""Encoder-decoder Transformer (Vaswani et al. 2017) in JAX; the twin of
``reference_numpy.models.seq2seq`` (see there for the equations and conventions: sinusoidal
positions in ``config.position_layout`` (the paper's "interleaved" or Marian's "concat"),
sqrt(D) embedding scale, the optional ``final_logits_bias``, labels aligned with
``decoder_input_ids`` with no shift inside).

Dims: B batch, S source time, T target time, D model width, V vocabulary.

Both layer stacks are stacked on a leading L axis and run with ``jax.lax.scan``, so compile
time does not grow with depth. ``loss_and_grad`` is jit-compiled with the config static; the
batch is checked (ids in range, lengths, mask shapes) before tracing, since a traced id has no
value to check.

Training-mode dropout (sites and mask shapes: ``reference_numpy.models.seq2seq``): pass
``dropout_key`` and the masks are drawn inside (per layer inside each scan, from per-layer keys
split before it), or pass an explicit ``masks`` tree; ``dropout_masks(config, key, B, S, T)``
gives exactly the tree ``forward(..., dropout_key=key)`` draws, to hand the same masks to the
reference. ``encode`` / ``decode`` take the ``"encoder"`` / ``"decoder"`` subtree (or their own
key). Neither = evaluation.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.attention import project_keys_values
from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import attend, embed, sinusoidal_positions
from bigmodel_jax.layers.norms import layer_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import as_bool_mask, collect_layers, concrete
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.quant import dense
from reference_numpy.checks import check_array
from reference_numpy.configs import Seq2SeqConfig
from reference_numpy.models.common import require_keys
from reference_numpy.models.seq2seq import (
    check_encoder_output,
    check_loss_labels,
    check_source,
    check_target,
    decoder_mask_shapes,
    decoder_spec,
    dropout_mask_shapes,
    embed_scale,
    encoder_mask_shapes,
    encoder_spec,
)

Tree = dict[str, Any]


def init(config: Seq2SeqConfig, seed: int = 0) -> Tree:
    """Fresh parameters for ``config`` (the reference's tree and init rules, JAX random stream)."""
    return _init(config, seed)


def dropout_masks(
    config: Seq2SeqConfig, key: jax.Array, batch_size: int, source_length: int, target_length: int
) -> Tree:
    """The keep-masks ``forward(..., dropout_key=key)`` draws for a (B, S) source and (B, T)
    target, as one tree (``reference_numpy.models.seq2seq.dropout_mask_shapes``; layer leaves
    stacked on L)."""
    shapes = dropout_mask_shapes(config, batch_size, source_length, target_length)
    return dropout_mask_tree(key, shapes, config.dropout)


def _embed(table: Tree, ids: jax.Array, config: Seq2SeqConfig) -> jax.Array:
    """ids (B, N) -> E[ids] * scale + PE[n]: (B, N, D)."""
    return _embed_at(table, ids, jnp.arange(ids.shape[1]), config)


def _embed_at(table: Tree, ids: jax.Array, positions: jax.Array, config: Seq2SeqConfig) -> jax.Array:
    """ids (B, N) at positions (N,) -> E[ids] * scale + PE[positions] (incremental decoding)."""
    x = embed(table, ids) * embed_scale(config)  # (B, N, D)
    pe = sinusoidal_positions(positions, config.d_model, x.dtype, layout=config.position_layout)  # (N, D)
    return x + pe[None]


def encode(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None,
) -> jax.Array:
    """input_ids (B, S) [, attention_mask (B, S)] -> encoder output (B, S, D).

    ``dropout_key``: draw the encoder's training dropout masks from it; ``masks``: explicit ones
    (``encoder_mask_shapes``, the ``"encoder"`` subtree of ``dropout_masks``); neither = evaluation."""
    require_keys(batch, ["input_ids"], "seq2seq")
    ids = batch["input_ids"]
    if concrete(ids):
        check_source(batch, config)
    check_array("input_ids", ids, ("B", "S"), kind="int")
    drop = MaskSource.make(encoder_mask_shapes(config, *ids.shape), config.dropout, dropout_key=dropout_key,
                           masks=masks)
    return _encode(params, batch, config, drop)


def _encode(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, drop: MaskSource,
            collect: list | None = None) -> jax.Array:
    """``encode`` with its dropout masks from ``drop`` (the batch is checked by the caller);
    ``collect``: a trace list for the ``encoder.*`` rows."""
    ids = batch["input_ids"]
    mask = as_bool_mask(batch.get("attention_mask"))
    x = drop.apply("embed", _embed(params["embed"], ids, config))
    if collect is not None:
        collect.append(("encoder.embeddings", x))
    spec = drop.spec(encoder_spec(config))

    def layer(h: jax.Array, xs: tuple[Tree, Any]) -> tuple[jax.Array, Any]:
        p, m = xs  # this layer's parameters and its dropout key / masks (None in evaluation)
        inter: dict[str, jax.Array] | None = None if collect is None else {}
        return block(p, h, spec, key_padding_mask=mask, masks=drop.layer_masks(m), intermediates=inter), inter

    x, inter = jax.lax.scan(layer, x, (params["encoder"]["layers"], drop.layer_inputs()))
    collect_layers(collect, "encoder.", inter, config.n_layers)
    if config.prenorm:
        x = layer_norm(params["encoder"]["final_norm"], x, config.norm_eps)
        if collect is not None:
            collect.append(("encoder.final_norm", x))
    return x


def decode(
    params: Tree, enc: jax.Array, batch: dict[str, Any], config: Seq2SeqConfig, *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None,
) -> jax.Array:
    """enc (B, S, D), decoder_input_ids (B, T) [, attention_mask (B, S) of the source,
    decoder_attention_mask (B, T)] -> logits (B, T, V).

    ``dropout_key``: draw the decoder's training dropout masks from it; ``masks``: explicit ones
    (``decoder_mask_shapes``, the ``"decoder"`` subtree of ``dropout_masks``); neither = evaluation."""
    require_keys(batch, ["decoder_input_ids"], "seq2seq")
    ids = batch["decoder_input_ids"]
    if concrete(ids):
        check_target(batch, config)
    check_array("decoder_input_ids", ids, ("B", "T"), kind="int")
    check_encoder_output(enc, batch, config, ids.shape[0])
    shapes = decoder_mask_shapes(config, ids.shape[0], enc.shape[1], ids.shape[1])
    drop = MaskSource.make(shapes, config.dropout, dropout_key=dropout_key, masks=masks)
    return _decode(params, enc, batch, config, drop)


def init_cache(params: Tree, enc: jax.Array, config: Seq2SeqConfig, slots: int) -> Tree:
    """A decoding cache for ``decode_step``: the decoder self-attention's zeroed ``{"k", "v"}``
    (L, B, slots, K, E) and the cross-attention's keys/values of the encoder output ``enc``
    (B, S, D), projected once: ``{"ck", "cv"}`` (L, B, S, K, E)."""
    K, E = config.n_kv_heads or config.n_heads, config.d_model // config.n_heads
    ck, cv = jax.vmap(lambda p: project_keys_values(p, enc))(params["decoder"]["layers"]["cross_attn"])
    zeros = jnp.zeros((config.decoder_layers, enc.shape[0], slots, K, E), enc.dtype)
    return {"k": zeros, "v": zeros, "ck": ck, "cv": cv}


def decode_step(params: Tree, cache: Tree, batch: dict[str, Any], cache_pos: Any,
                config: Seq2SeqConfig) -> tuple[jax.Array, Tree]:
    """The decoder on ``decoder_input_ids`` (B, N), the target tokens at slots
    [cache_pos, cache_pos + N) of ``cache`` (``init_cache``; the source's ``attention_mask``
    (B, S) in ``batch``) -> logits (B, N, V) and the updated cache. The same ``_decode`` as the
    full forward; traceable (ids unchecked)."""
    return _decode(params, None, batch, config, MaskSource.make({}, 0.0), cache=cache, cache_pos=cache_pos)


def _decode(params: Tree, enc: jax.Array | None, batch: dict[str, Any], config: Seq2SeqConfig, drop: MaskSource,
            *, cache: Tree | None = None, cache_pos: Any = None, collect: list | None = None) -> Any:
    """``decode`` with its dropout masks from ``drop`` (the ids are checked by the caller).
    ``cache``: decode at slots [cache_pos, ...) (``decode_step``), returning ``(logits, cache)``;
    ``collect``: a trace list for the ``decoder.*`` rows."""
    ids = batch["decoder_input_ids"]
    if enc is not None:
        check_encoder_output(enc, batch, config, ids.shape[0])
    src_mask = as_bool_mask(batch.get("attention_mask"))
    dec_mask = as_bool_mask(batch.get("decoder_attention_mask"))
    table = params["embed"] if config.share_embeddings else params["target_embed"]
    positions = jnp.arange(ids.shape[1]) + (0 if cache is None else cache_pos)
    y = drop.apply("embed", _embed_at(table, ids, positions, config))  # (B, T, D)
    if collect is not None:
        collect.append(("decoder.embeddings", y))
    spec = drop.spec(decoder_spec(config))

    def layer(h: jax.Array, xs: tuple[Tree, Any, Any]) -> tuple[jax.Array, Any]:
        p, m, c = xs  # this layer's parameters, dropout key / masks (None in evaluation), cache
        inter: dict[str, jax.Array] | None = None if collect is None else {}
        out = block(p, h, spec, enc=enc, key_padding_mask=dec_mask, enc_padding_mask=src_mask,
                    masks=drop.layer_masks(m), intermediates=inter, cache=c, cache_pos=cache_pos)
        h, c = out if c is not None else (out, None)
        return h, (c, inter)

    y, (new_cache, inter) = jax.lax.scan(layer, y, (params["decoder"]["layers"], drop.layer_inputs(), cache))
    collect_layers(collect, "decoder.", inter, config.decoder_layers)
    if config.prenorm:
        y = layer_norm(params["decoder"]["final_norm"], y, config.norm_eps)
        if collect is not None:
            collect.append(("decoder.final_norm", y))
    logits = output_logits(params, y, config)
    return logits if cache is None else (logits, {**cache, **new_cache})


def output_logits(params: Tree, y: jax.Array, config: Seq2SeqConfig) -> jax.Array:
    """Decoder output y (B, T, D) -> logits (B, T, V): the tied or untied head, plus
    ``final_logits_bias`` (V,) when the config has one (shared with cached decoding)."""
    if config.share_embeddings:
        logits = attend(params["embed"], y)
    else:
        logits = jnp.einsum("BTD,DV->BTV", y, dense(params["lm_head"]["kernel"]))
    if config.final_logits_bias:
        logits = logits + params["final_logits_bias"]
    return logits


def _check_batch(batch: dict[str, Any], config: Seq2SeqConfig) -> None:
    """Source and target present, consistent, and (when concrete) in range."""
    require_keys(batch, ["input_ids", "decoder_input_ids"], "seq2seq")
    src, tgt = batch["input_ids"], batch["decoder_input_ids"]
    if concrete(src) and concrete(tgt):
        ids, _ = check_source(batch, config)
        check_target(batch, config, ids.shape[0])


def _mask_source(batch: dict[str, Any], config: Seq2SeqConfig, dropout_key: Any, masks: Any) -> MaskSource:
    (B, S), T = batch["input_ids"].shape, batch["decoder_input_ids"].shape[1]
    return MaskSource.make(dropout_mask_shapes(config, B, S, T), config.dropout, dropout_key=dropout_key,
                           masks=masks)


def forward(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, collect: list | None = None,
) -> jax.Array:
    """Logits (B, T, V): position t's distribution over the token at ``labels[:, t]``.

    ``dropout_key``: draw training dropout masks from it (the encoder's from
    ``fold_in(key, stream("encoder"))``, the decoder's likewise); ``masks``: explicit masks
    (``dropout_masks``); neither = evaluation. ``collect``: a list the call appends the trace
    rows to (``bigmodel_jax.trace``; outside ``jit``)."""
    _check_batch(batch, config)
    check_array("input_ids", batch["input_ids"], ("B", "S"), kind="int")
    check_array("decoder_input_ids", batch["decoder_input_ids"], ("B", "T"), kind="int")
    drop = _mask_source(batch, config, dropout_key, masks)
    enc = _encode(params, batch, config, drop.sub("encoder"), collect)
    return _decode(params, enc, batch, config, drop.sub("decoder"), collect=collect)


def loss(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None,
) -> jax.Array:
    """Mean label-smoothed cross-entropy of ``logits[:, t]`` against ``labels[:, t]`` (no shift,
    as HF's seq2seq models); label -100 is ignored (dropout: see ``forward``). Labels outside
    [0, V) raise when concrete; under ``jit`` their values are unknown, so a caller that jits
    this checks them on the host first (``loss_and_grad`` and the training step do)."""
    check_loss_labels(batch, config)  # before the forward: a bad label fails fast
    logits = forward(params, batch, config, dropout_key=dropout_key, masks=masks)
    return cross_entropy(logits, batch["labels"], label_smoothing=config.label_smoothing)


@partial(jax.jit, static_argnames="config")
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, dropout_key: jax.Array | None, masks: Tree | None
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, dropout_key=dropout_key, masks=masks)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None,
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled; batch checked before tracing (dropout: see
    ``forward``)."""
    _check_batch(batch, config)
    check_loss_labels(batch, config)
    _mask_source(batch, config, dropout_key, masks)  # argument errors before tracing
    return _loss_and_grad(params, batch, config, dropout_key, masks)
