"""BERT in JAX; the twin of ``reference_numpy.models.bert`` (see its docstring for the equations,
the five heads, their outputs and losses).

Dims: B batch, T time, D model width, V vocabulary, C = num_labels, L layers.

Layers are stacked on a leading L axis and run with ``jax.lax.scan``, so compile time does not
grow with depth. ``loss_and_grad`` is jit-compiled with ``config`` and ``head`` static and checks
the concrete batch (ids, type ids, labels) before tracing, so a bad value raises instead of
silently producing NaN.

Training-mode dropout (sites and mask shapes: ``reference_numpy.models.bert``): pass
``dropout_key`` and the masks are drawn inside (per layer inside the scan, from per-layer keys
split before it), or pass an explicit ``masks`` tree; ``dropout_masks(config, key, B, T, head)``
gives exactly the tree ``dropout_key=key`` draws, to hand the same masks to the reference.
Neither = evaluation.

``perf`` (``bigmodel_jax.perf.PerfOptions``, default the plain path) switches the layout: scan
or unrolled layer loop, remat policy, bf16 mixed precision, fused q/k/v, dot_product_attention,
and for the masked-LM loss ``mlm_capacity`` (the vocabulary projection only at the labelled
positions, as Google's BERT pre-training computes it; same loss and gradients).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.linear import linear
from bigmodel_jax.layers.norms import layer_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import as_bool_mask, collect_layers
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.models.common import init_from_shapes
from bigmodel_jax.perf import PerfOptions, cast_input, cast_params, layer_loop, loss_logits, mlm_rows, resolve
from reference_numpy.configs import BertConfig
from reference_numpy.models.bert import (
    BATCH_KEYS,
    HEADS,
    IGNORE_INDEX,
    block_spec,
    check_batch,
    check_head,
    check_params,
    dropout_mask_shapes,
    head_shapes,
)
from reference_numpy.tree import tree_map

Tree = dict[str, Any]

__all__ = ["HEADS", "init", "dropout_masks", "hidden_states", "pooler", "forward", "loss", "loss_and_grad"]

# Head leaves draw from fold_in(key(seed), _HEAD_STREAM), apart from the encoder's per-leaf keys.
_HEAD_STREAM = 0x48454144  # "HEAD"


def init(config: BertConfig, seed: int = 0, head: str = "mlm") -> Tree:
    """Fresh parameters for ``config`` and ``head``, every leaf in ``config.dtype``.

    The encoder is exactly ``models.common.init(config, seed)`` (so one seed gives the same
    encoder for every head); the head's leaves use ``fold_in(fold_in(key(seed), HEAD), i)``.
    """
    check_head(head)
    dtype = jnp.dtype(config.dtype)
    params = _init(config, seed)
    head_key = jax.random.fold_in(jax.random.key(seed), _HEAD_STREAM)
    extra = init_from_shapes(head_shapes(config, head), head_key, config.n_layers, dtype)
    params.update(extra)
    # Every leaf in config.dtype even if a NumPy float64 std promoted one under x64 (ViT's note).
    return tree_map(lambda a: a.astype(dtype), params)


def dropout_masks(config: BertConfig, key: jax.Array, batch_size: int, length: int, head: str = "mlm") -> Tree:
    """The keep-masks ``forward(..., head, dropout_key=key)`` draws for a (B, T) batch, as one
    tree (``reference_numpy.models.bert.dropout_mask_shapes``; layer leaves stacked on L)."""
    return dropout_mask_tree(key, dropout_mask_shapes(config, batch_size, length, head), config.dropout)


def _mask_source(batch: dict[str, Any], config: BertConfig, head: str, dropout_key: Any, masks: Any) -> MaskSource:
    B, T = batch["input_ids"].shape
    return MaskSource.make(dropout_mask_shapes(config, B, T, head), config.dropout, dropout_key=dropout_key,
                           masks=masks)


def hidden_states(
    params: Tree, batch: dict[str, Any], config: BertConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, head: str = "base", perf: PerfOptions | None = None,
) -> jax.Array:
    """input_ids (B, T) [, attention_mask, token_type_ids (B, T)] -> last_hidden_state (B, T, D).

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks(..., head)``; only the encoder's entries are read here); neither = evaluation.
    ``perf``: layout options (module docstring)."""
    check_batch(batch, config, "base")
    return _encoder(cast_params(params, perf), batch, config, _mask_source(batch, config, head, dropout_key, masks),
                    perf)


def _encoder(params: Tree, batch: dict[str, Any], config: BertConfig, drop: MaskSource,
             perf: PerfOptions | None = None, collect: list | None = None) -> jax.Array:
    """The embeddings and the L blocks, with dropout from ``drop`` -> (B, T, D); ``collect``: a
    trace list for their rows."""
    ids = batch["input_ids"]
    mask = as_bool_mask(batch.get("attention_mask"))
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    T = ids.shape[1]
    emb = params["embeddings"]
    x = (embed(emb["word"], ids)  # (B, T, D)
         + position_embedding(emb["position"], jnp.arange(T))[None]  # (1, T, D)
         + embed(emb["token_type"], types))  # (B, T, D)
    x = cast_input(x, perf)  # fp32 tables (perf.cast_params) -> the compute dtype
    x = drop.apply("embed", layer_norm(emb["norm"], x, config.norm_eps))
    if collect is not None:
        collect.append(("embeddings", x))
    spec = drop.spec(block_spec(config))

    def layer(h: jax.Array, xs: tuple[Tree, Any]) -> tuple[jax.Array, Any]:
        p, m = xs  # this layer's parameters and its dropout key / masks (None in evaluation)
        inter: dict[str, jax.Array] | None = None if collect is None else {}
        return block(p, h, spec, key_padding_mask=mask, masks=drop.layer_masks(m), perf=perf,
                     intermediates=inter), inter

    x, inter = layer_loop(layer, x, (params["layers"], drop.layer_inputs()), perf)  # lax.scan by default
    collect_layers(collect, "", inter, config.n_layers)
    return x


def pooler(params: Tree, h: jax.Array) -> jax.Array:
    """last_hidden_state (B, T, D) -> pooler_output (B, D) = tanh(h[:, 0] W_pool + b_pool)."""
    return linear(params["pooler"], h[:, 0], "tanh")


def _mlm_logits(params: Tree, h: jax.Array, config: BertConfig, perf: PerfOptions | None) -> jax.Array:
    """The masked-LM head: hidden states (..., D) -> logits (..., V) (fp32 under mixed precision)."""
    p = params["mlm"]
    t = linear(p["transform"], h, config.activation, perf=perf)  # (..., D)
    n = layer_norm(p["norm"], t, config.norm_eps)
    return attend(params["embeddings"]["word"], n, perf=perf) + p["bias"]  # tied decoder, (..., V)


def forward(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None, perf: PerfOptions | None = None,
    collect: list | None = None,
) -> Any:
    """Logits of ``head``: "mlm" (B, T, V), "sequence_classification" (B, C),
    "token_classification" (B, T, C), "question_answering" (B, T, 2) (start = [..., 0],
    end = [..., 1]); "base" gives ``(last_hidden_state (B, T, D), pooler_output (B, D))``.

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks(..., head)``); neither = evaluation. ``perf``: layout options (module
    docstring). ``collect``: a list the call appends the trace rows to (``bigmodel_jax.trace``;
    outside ``jit``): ``embeddings``, each block's, "base"'s ``last_hidden_state``, ``pooler_output``
    of the heads that pool."""
    check_params(params, head, config)
    check_batch(batch, config, "base")
    params = cast_params(params, perf)
    drop = _mask_source(batch, config, head, dropout_key, masks)
    h = _encoder(params, batch, config, drop, perf, collect)
    if head == "mlm":
        return _mlm_logits(params, h, config, perf)  # (B, T, V)
    if head == "token_classification":
        return linear(params["classifier"], drop.apply("classifier", h))
    if head == "question_answering":
        return linear(params["qa"], h)
    if head == "base" and collect is not None:
        collect.append(("last_hidden_state", h))
    if head == "base" and not config.pooler:
        return h, None
    pooled = pooler(params, h)
    if collect is not None:
        collect.append(("pooler_output", pooled))
    if head == "base":
        return h, pooled
    return linear(params["classifier"], drop.apply("classifier", pooled))  # sequence_classification


def _sparse_mlm_loss(params: Tree, batch: dict[str, Any], config: BertConfig, drop: MaskSource,
                     perf: PerfOptions) -> jax.Array:
    """Masked-LM loss with the head (transform, norm, D x V decoder) run only at the labelled
    positions, gathered into ``P = mlm_rows(perf, B, T)`` rows (unused rows carry label -100):
    the same mean cross-entropy and gradients as the dense head, ~P / (B T) of its cost. A batch
    with more than P labelled positions gives NaN (loud, not silently truncated);
    ``loss_and_grad`` checks that before tracing."""
    h = _encoder(params, batch, config, drop, perf)  # (B, T, D)
    labels = batch["labels"]
    B, T = labels.shape
    P = mlm_rows(perf, B, T)
    flat = labels.reshape(B * T)
    valid = flat != IGNORE_INDEX
    (rows,) = jnp.nonzero(valid, size=P, fill_value=0)  # the first P labelled positions, (P,)
    picked = jnp.where(jnp.arange(P) < jnp.sum(valid), flat[rows], IGNORE_INDEX)  # (P,)
    logits = _mlm_logits(params, h.reshape(B * T, -1)[rows], config, perf)  # (P, V)
    value = cross_entropy(loss_logits(logits, perf), picked, ignore_index=IGNORE_INDEX)
    return jnp.where(jnp.sum(valid) <= P, value, jnp.nan)


def loss(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """The head's mean loss (see ``reference_numpy.models.bert``); -100 labels are ignored, and
    a question-answering position equal to T (answer outside the window) is ignored (dropout
    and ``perf``: see ``forward``; the loss reads fp32 logits under mixed precision). Other
    targets raise when concrete; under ``jit`` their values are unknown, so a caller that jits
    this checks them on the host first (``reference_numpy.models.bert.check_loss_labels``;
    ``loss_and_grad`` and the training step do)."""
    check_batch(batch, config, head, with_labels=True)
    if head == "mlm" and resolve(perf).mlm_capacity is not None:
        check_params(params, head, config)
        drop = _mask_source(batch, config, head, dropout_key, masks)
        return _sparse_mlm_loss(cast_params(params, perf), batch, config, drop, resolve(perf))
    logits = loss_logits(forward(params, batch, config, head, dropout_key=dropout_key, masks=masks, perf=perf),
                         perf)
    if head == "question_answering":
        T = logits.shape[1]
        start = cross_entropy(logits[..., 0], batch["start_positions"], ignore_index=T)
        end = cross_entropy(logits[..., 1], batch["end_positions"], ignore_index=T)
        return 0.5 * (start + end)
    return cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)


@partial(jax.jit, static_argnames=("config", "head", "perf"))
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str, dropout_key: jax.Array | None,
    masks: Tree | None, perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, head, dropout_key=dropout_key, masks=masks, perf=perf)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None, perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled with ``config``, ``head`` and ``perf`` static;
    the batch is checked (values included) before tracing. Batch keys other than ``BATCH_KEYS``
    are dropped. Dropout and ``perf``: see ``forward``."""
    check_params(params, head, config)
    check_batch(batch, config, head, with_labels=True)
    _mask_source(batch, config, head, dropout_key, masks)  # argument errors before tracing
    if head == "mlm" and resolve(perf).mlm_capacity is not None:
        B, T = batch["labels"].shape
        n, P = int((np.asarray(batch["labels"]) != IGNORE_INDEX).sum()), mlm_rows(resolve(perf), B, T)
        if n > P:
            raise ValueError(f"batch has {n} labelled positions, more than PerfOptions.mlm_capacity="
                             f"{resolve(perf).mlm_capacity} of B x T = {B} x {T} allows ({P}); raise mlm_capacity")
    batch = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
    return _loss_and_grad(params, batch, config, head, dropout_key, masks, perf)
