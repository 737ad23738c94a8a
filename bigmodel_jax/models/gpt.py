"""GPT-2 / Llama-style causal decoder in JAX; the twin of ``reference_numpy.models.gpt``.

Layers are stacked on a leading L axis and run with ``jax.lax.scan``, so compile time does not
grow with depth.

Training-mode dropout (sites and mask shapes: ``reference_numpy.models.gpt``): pass
``dropout_key`` and the masks are drawn inside (per layer inside the scan, from per-layer keys
split before it), or pass an explicit ``masks`` tree; ``dropout_masks(config, key, B, T)`` gives
exactly the tree ``dropout_key=key`` draws, to hand the same masks to the reference. Neither =
evaluation.

``perf`` (``bigmodel_jax.perf.PerfOptions``, default the plain path) switches the layout: scan
or unrolled layer loop, remat policy, bf16 mixed precision, fused q/k/v, dot_product_attention.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.perf import PerfOptions, cast_input, cast_params, einsum, layer_loop, loss_logits
from reference_numpy.configs import GPTConfig
from reference_numpy.models.common import check_token_batch, require_keys
from reference_numpy.models.gpt import block_spec, dropout_mask_shapes

Tree = dict[str, Any]


def init(config: GPTConfig, seed: int = 0) -> Tree:
    """Fresh parameters for ``config``."""
    return _init(config, seed)


def dropout_masks(config: GPTConfig, key: jax.Array, batch_size: int, length: int) -> Tree:
    """The keep-masks ``forward(..., dropout_key=key)`` draws for a (B, T) batch, as one tree
    (``reference_numpy.models.gpt.dropout_mask_shapes``; layer leaves stacked on L)."""
    return dropout_mask_tree(key, dropout_mask_shapes(config, batch_size, length), config.dropout)


def hidden_states(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """input_ids (B, T) [, attention_mask (B, T)] -> final-norm hidden states (B, T, D).

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks``); neither = evaluation. ``perf``: layout options (module docstring)."""
    params = cast_params(params, perf)
    require_keys(batch, ["input_ids"], "gpt")
    ids, _ = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len) if _concrete(
        batch["input_ids"]) else (batch["input_ids"], None)
    mask = batch.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    B, T = ids.shape
    drop = MaskSource.make(dropout_mask_shapes(config, B, T), config.dropout, dropout_key=dropout_key,
                           masks=masks)
    positions = jnp.arange(T)
    x = embed(params["embed"], ids)  # (B, T, D)
    if config.positions == "learned":
        x = x + position_embedding(params["position"], positions)[None]
    x = drop.apply("embed", cast_input(x, perf))  # fp32 tables (perf.cast_params) -> compute dtype
    spec = drop.spec(block_spec(config))
    rope_pos = positions if config.positions == "rope" else None

    def layer(h: jax.Array, xs: tuple[Tree, Any]) -> tuple[jax.Array, None]:
        p, m = xs  # this layer's parameters and its dropout key / masks (None in evaluation)
        return block(p, h, spec, key_padding_mask=mask, positions=rope_pos, masks=drop.layer_masks(m),
                     perf=perf), None

    x, _ = layer_loop(layer, x, (params["layers"], drop.layer_inputs()), perf)  # lax.scan by default
    norm = layer_norm if config.norm == "layer" else rms_norm
    return norm(params["final_norm"], x, config.norm_eps)


def forward(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """Logits (B, T, V) of the next token at every position (dropout and ``perf``: see
    ``hidden_states``; fp32 logits under mixed precision)."""
    params = cast_params(params, perf)
    h = hidden_states(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf)
    if config.tie_embeddings:
        return attend(params["embed"], h, perf=perf)
    return einsum("BTD,DV->BTV", h, params["lm_head"]["kernel"], perf, keep_fp32=True)


def loss(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """Mean next-token cross-entropy; ``labels`` (default ``input_ids``) shifted inside, as in
    HF: position t's logits predict ``labels[t + 1]``; label -100 is ignored (dropout and
    ``perf``: see ``hidden_states``; the loss reads fp32 logits under mixed precision)."""
    logits = forward(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf)
    labels = batch.get("labels", batch["input_ids"])
    return cross_entropy(loss_logits(logits[:, :-1], perf), labels[:, 1:])


@partial(jax.jit, static_argnames=("config", "perf"))
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: GPTConfig, dropout_key: jax.Array | None, masks: Tree | None,
    perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled (``config`` and ``perf`` static); batch
    checked before tracing (dropout and ``perf``: see ``hidden_states``)."""
    require_keys(batch, ["input_ids"], "gpt")
    ids, _ = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    MaskSource.make(dropout_mask_shapes(config, *ids.shape), config.dropout, dropout_key=dropout_key,
                    masks=masks)  # argument errors before tracing
    return _loss_and_grad(params, batch, config, dropout_key, masks, perf)


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)
