"""BERT in JAX; the twin of ``reference_numpy.models.bert`` (see its docstring for the equations,
the five heads, their outputs and losses).

Dims: B batch, T time, D model width, V vocabulary, C = num_labels, L layers.

Layers are stacked on a leading L axis and run with ``jax.lax.scan``, so compile time does not
grow with depth. ``loss_and_grad`` is jit-compiled with ``config`` and ``head`` static and checks
the concrete batch (ids, type ids, labels) before tracing, so a bad value raises instead of
silently producing NaN.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.block import block
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
    head_shapes,
)
from reference_numpy.tree import tree_map

Tree = dict[str, Any]

__all__ = ["HEADS", "init", "hidden_states", "pooler", "forward", "loss", "loss_and_grad"]

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


def hidden_states(params: Tree, batch: dict[str, Any], config: BertConfig) -> jax.Array:
    """input_ids (B, T) [, attention_mask, token_type_ids (B, T)] -> last_hidden_state (B, T, D)."""
    check_batch(batch, config, "base")
    ids = batch["input_ids"]
    mask = as_bool_mask(batch.get("attention_mask"))
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    T = ids.shape[1]
    emb = params["embeddings"]
    x = (embed(emb["word"], ids)  # (B, T, D)
         + position_embedding(emb["position"], jnp.arange(T))[None]  # (1, T, D)
         + embed(emb["token_type"], types))  # (B, T, D)
    x = layer_norm(emb["norm"], x, config.norm_eps)
    spec = block_spec(config)

    def layer(h: jax.Array, p: Tree) -> tuple[jax.Array, None]:
        return block(p, h, spec, key_padding_mask=mask), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x


def pooler(params: Tree, h: jax.Array) -> jax.Array:
    """last_hidden_state (B, T, D) -> pooler_output (B, D) = tanh(h[:, 0] W_pool + b_pool)."""
    return linear(params["pooler"], h[:, 0], "tanh")


def forward(params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm") -> Any:
    """Logits of ``head``: "mlm" (B, T, V), "sequence_classification" (B, C),
    "token_classification" (B, T, C), "question_answering" (B, T, 2) (start = [..., 0],
    end = [..., 1]); "base" gives ``(last_hidden_state (B, T, D), pooler_output (B, D))``."""
    check_params(params, head, config)
    h = hidden_states(params, batch, config)
    if head == "mlm":
        p = params["mlm"]
        t = linear(p["transform"], h, config.activation)  # (B, T, D)
        n = layer_norm(p["norm"], t, config.norm_eps)
        return attend(params["embeddings"]["word"], n) + p["bias"]  # tied decoder, (B, T, V)
    if head == "token_classification":
        return linear(params["classifier"], h)
    if head == "question_answering":
        return linear(params["qa"], h)
    if head == "base" and not config.pooler:
        return h, None
    pooled = pooler(params, h)
    if head == "base":
        return h, pooled
    return linear(params["classifier"], pooled)  # sequence_classification


def loss(params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm") -> jax.Array:
    """The head's mean loss (see ``reference_numpy.models.bert``); -100 labels are ignored, and
    a question-answering position equal to T (answer outside the window) is ignored."""
    check_batch(batch, config, head, with_labels=True)
    logits = forward(params, batch, config, head)
    if head == "question_answering":
        T = logits.shape[1]
        start = cross_entropy(logits[..., 0], batch["start_positions"], ignore_index=T)
        end = cross_entropy(logits[..., 1], batch["end_positions"], ignore_index=T)
        return 0.5 * (start + end)
    return cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)


@partial(jax.jit, static_argnames=("config", "head"))
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, head)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm"
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled with ``config`` and ``head`` static; the batch
    is checked (values included) before tracing. Batch keys other than ``BATCH_KEYS`` are dropped."""
    check_params(params, head, config)
    check_batch(batch, config, head, with_labels=True)
    batch = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
    return _loss_and_grad(params, batch, config, head)
