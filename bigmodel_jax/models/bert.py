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
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.linear import linear
from bigmodel_jax.layers.norms import layer_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import as_bool_mask
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.models.common import init_from_shapes
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
    masks: Tree | None = None, head: str = "base",
) -> jax.Array:
    """input_ids (B, T) [, attention_mask, token_type_ids (B, T)] -> last_hidden_state (B, T, D).

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks(..., head)``; only the encoder's entries are read here); neither = evaluation."""
    check_batch(batch, config, "base")
    return _encoder(params, batch, config, _mask_source(batch, config, head, dropout_key, masks))


def _encoder(params: Tree, batch: dict[str, Any], config: BertConfig, drop: MaskSource) -> jax.Array:
    """The embeddings and the L blocks, with dropout from ``drop`` -> (B, T, D)."""
    ids = batch["input_ids"]
    mask = as_bool_mask(batch.get("attention_mask"))
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    T = ids.shape[1]
    emb = params["embeddings"]
    x = (embed(emb["word"], ids)  # (B, T, D)
         + position_embedding(emb["position"], jnp.arange(T))[None]  # (1, T, D)
         + embed(emb["token_type"], types))  # (B, T, D)
    x = drop.apply("embed", layer_norm(emb["norm"], x, config.norm_eps))
    spec = drop.spec(block_spec(config))

    def layer(h: jax.Array, xs: tuple[Tree, Any]) -> tuple[jax.Array, None]:
        p, m = xs  # this layer's parameters and its dropout key / masks (None in evaluation)
        return block(p, h, spec, key_padding_mask=mask, masks=drop.layer_masks(m)), None

    x, _ = jax.lax.scan(layer, x, (params["layers"], drop.layer_inputs()))
    return x


def pooler(params: Tree, h: jax.Array) -> jax.Array:
    """last_hidden_state (B, T, D) -> pooler_output (B, D) = tanh(h[:, 0] W_pool + b_pool)."""
    return linear(params["pooler"], h[:, 0], "tanh")


def forward(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None,
) -> Any:
    """Logits of ``head``: "mlm" (B, T, V), "sequence_classification" (B, C),
    "token_classification" (B, T, C), "question_answering" (B, T, 2) (start = [..., 0],
    end = [..., 1]); "base" gives ``(last_hidden_state (B, T, D), pooler_output (B, D))``.

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks(..., head)``); neither = evaluation."""
    check_params(params, head, config)
    check_batch(batch, config, "base")
    drop = _mask_source(batch, config, head, dropout_key, masks)
    h = _encoder(params, batch, config, drop)
    if head == "mlm":
        p = params["mlm"]
        t = linear(p["transform"], h, config.activation)  # (B, T, D)
        n = layer_norm(p["norm"], t, config.norm_eps)
        return attend(params["embeddings"]["word"], n) + p["bias"]  # tied decoder, (B, T, V)
    if head == "token_classification":
        return linear(params["classifier"], drop.apply("classifier", h))
    if head == "question_answering":
        return linear(params["qa"], h)
    if head == "base" and not config.pooler:
        return h, None
    pooled = pooler(params, h)
    if head == "base":
        return h, pooled
    return linear(params["classifier"], drop.apply("classifier", pooled))  # sequence_classification


def loss(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None,
) -> jax.Array:
    """The head's mean loss (see ``reference_numpy.models.bert``); -100 labels are ignored, and
    a question-answering position equal to T (answer outside the window) is ignored (dropout:
    see ``forward``)."""
    check_batch(batch, config, head, with_labels=True)
    logits = forward(params, batch, config, head, dropout_key=dropout_key, masks=masks)
    if head == "question_answering":
        T = logits.shape[1]
        start = cross_entropy(logits[..., 0], batch["start_positions"], ignore_index=T)
        end = cross_entropy(logits[..., 1], batch["end_positions"], ignore_index=T)
        return 0.5 * (start + end)
    return cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)


@partial(jax.jit, static_argnames=("config", "head"))
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str, dropout_key: jax.Array | None,
    masks: Tree | None,
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, head, dropout_key=dropout_key, masks=masks)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *,
    dropout_key: jax.Array | None = None, masks: Tree | None = None,
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled with ``config`` and ``head`` static; the batch
    is checked (values included) before tracing. Batch keys other than ``BATCH_KEYS`` are dropped.
    Dropout: see ``forward``."""
    check_params(params, head, config)
    check_batch(batch, config, head, with_labels=True)
    _mask_source(batch, config, head, dropout_key, masks)  # argument errors before tracing
    batch = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
    return _loss_and_grad(params, batch, config, head, dropout_key, masks)
