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

from bigmodel_jax.layers.attention import init_heads_major_cache
from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import concrete
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.perf import PerfOptions, cast_input, cast_params, einsum, layer_loop, loss_logits
from reference_numpy.configs import GPTConfig
from reference_numpy.models.common import check_token_batch, collect_blocks, require_keys
from reference_numpy.models.gpt import block_spec, check_loss_labels, dropout_mask_shapes

Tree = dict[str, Any]


def init(config: GPTConfig, seed: int = 0) -> Tree:
    """Fresh parameters for ``config``."""
    return _init(config, seed)


def dropout_masks(config: GPTConfig, key: jax.Array, batch_size: int, length: int) -> Tree:
    """The keep-masks ``forward(..., dropout_key=key)`` draws for a (B, T) batch, as one tree
    (``reference_numpy.models.gpt.dropout_mask_shapes``; layer leaves stacked on L)."""
    return dropout_mask_tree(key, dropout_mask_shapes(config, batch_size, length), config.dropout)


def init_cache(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """A zeroed decoding cache for ``forward(..., cache=)`` with stacked layers: ``{"k", "v"}``,
    each (L, B, S, K, E) with S = ``slots``. The unrolled decoding layout
    (``bigmodel_jax.generation.layout``) takes ``init_layer_caches`` instead."""
    shape = (config.n_layers, batch, slots, config.kv_heads, config.e)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_layer_caches(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """Zeroed per-layer caches for the unrolled decoding layout: ``{"k": L x (B K, S, E),
    "v": L x (B K, E, S)}`` (``layers.attention.init_heads_major_cache``: why this layout)."""
    caches = [init_heads_major_cache(batch, slots, config.kv_heads, config.e, dtype) for _ in range(config.n_layers)]
    return {"k": [c["k"] for c in caches], "v": [c["v"] for c in caches]}


def hidden_states(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None, cache: Tree | None = None,
    cache_pos: Any = None, collect: list | None = None,
) -> jax.Array | tuple[jax.Array, Tree]:
    """input_ids (B, T) [, attention_mask (B, T)] -> final-norm hidden states (B, T, D).

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks``); neither = evaluation. ``perf``: layout options (module docstring).
    ``cache``, ``cache_pos``, ``collect``: see ``forward``; with a cache returns ``(h, cache)``."""
    params = cast_params(params, perf)
    require_keys(batch, ["input_ids"], "gpt")
    ids = batch["input_ids"]
    if cache is None and concrete(ids):
        check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    unrolled = isinstance(params["layers"], list)  # the decoding layout's per-layer weights
    if cache is not None:
        if cache_pos is None:
            raise ValueError("decoding with a cache needs cache_pos, the slot of the first new token")
        if unrolled != isinstance(cache["k"], list):
            raise ValueError("the cache does not match the weights' layout: the decoding layout's unrolled "
                             "weights (PerfOptions(scan_layers=False)) take init_layer_caches' per-layer caches, "
                             "the stacked layers take init_cache's stacked cache")
    mask = batch.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    B, T = ids.shape
    drop = MaskSource.make(dropout_mask_shapes(config, B, T), config.dropout, dropout_key=dropout_key,
                           masks=masks)
    # slot indices: (T,), or (B, T) for a per-row cache_pos (B,) (continuous batching)
    positions = jnp.arange(T) if cache is None else _cache_positions(cache_pos, B, T)
    x = embed(params["embed"], ids)  # (B, T, D)
    if config.positions == "learned":
        x = x + position_embedding(params["position"], positions)  # (T, D) or (B, T, D)
    x = drop.apply("embed", cast_input(x, perf))  # fp32 tables (perf.cast_params) -> compute dtype
    if collect is not None:
        collect.append(("embeddings", x))
    spec = drop.spec(block_spec(config))
    rope_pos = positions if config.positions == "rope" else None

    def layer(h: jax.Array, xs: tuple[Tree, Any, Tree | None]) -> tuple[jax.Array, Any]:
        p, m, c = xs  # this layer's parameters, dropout key / masks (None in evaluation), cache
        inter: dict[str, jax.Array] | None = None if collect is None else {}
        out = block(p, h, spec, key_padding_mask=mask, positions=rope_pos, masks=drop.layer_masks(m),
                    perf=perf, intermediates=inter, cache=c, cache_pos=cache_pos)
        h, c = out if c is not None else (out, None)
        return h, (c, inter)

    if unrolled:  # per-layer weights read in place, each layer's cache updated in place
        new = {"k": [], "v": []} if cache is not None else None
        inters = []
        for i, p in enumerate(params["layers"]):
            c = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            x, (c, inter) = layer(x, (p, None, c))
            inters.append(inter)
            if c is not None:
                new["k"].append(c["k"])
                new["v"].append(c["v"])
        new_cache = new
    else:
        x, (new_cache, stacked) = layer_loop(layer, x, (params["layers"], drop.layer_inputs(), cache), perf)
        inters = [] if collect is None else [jax.tree.map(lambda a, i=i: a[i], stacked)
                                             for i in range(config.n_layers)]
    if collect is not None:
        for i, inter in enumerate(inters):
            collect_blocks(collect, "", i, inter)
    norm = layer_norm if config.norm == "layer" else rms_norm
    h = norm(params["final_norm"], x, config.norm_eps)
    if collect is not None:
        collect.append(("final_norm", h))
    return h if cache is None else (h, new_cache)


def _cache_positions(cache_pos: Any, B: int, T: int) -> jax.Array:
    """The slots of this call's tokens: ``cache_pos + arange(T)``, (T,) for a scalar
    ``cache_pos``, (B, T) for a per-row (B,) vector (each row at its own slot: the serving
    engine's continuous batching, ``bigmodel_apps.serve.engine``)."""
    pos = jnp.asarray(cache_pos)
    if pos.ndim > 1 or (pos.ndim == 1 and pos.shape[0] != B):
        raise ValueError(f"cache_pos must be a scalar or a (B,) = ({B},) vector of per-row slots, "
                         f"got shape {tuple(pos.shape)}")
    return pos[..., None] + jnp.arange(T)


def lm_logits(params: Tree, h: jax.Array, config: GPTConfig, perf: PerfOptions | None = None) -> jax.Array:
    """The LM head: final hidden states h (B, T, D) -> logits (B, T, V), through the tied
    embedding or ``lm_head`` (fp32 under mixed precision)."""
    if config.tie_embeddings:
        return attend(params["embed"], h, perf=perf)
    return einsum("BTD,DV->BTV", h, params["lm_head"]["kernel"], perf, keep_fp32=True)


def forward(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None, cache: Tree | None = None,
    cache_pos: Any = None, collect: list | None = None,
) -> jax.Array | tuple[jax.Array, Tree]:
    """Logits (B, T, V) of the next token at every position (dropout and ``perf``: see
    ``hidden_states``; fp32 logits under mixed precision).

    ``cache`` (``init_cache``; ``init_layer_caches`` for the decoding layout's unrolled weights):
    decode instead, returning ``(logits, new cache)``. ``input_ids`` (B, N) are the tokens at
    slots [cache_pos, cache_pos + N) (their positions; ``cache_pos`` may be traced, and may be a
    (B,) vector: row b's tokens at slots [cache_pos[b], cache_pos[b] + N)), their
    keys/values go into the cache, and attention reads every earlier slot; ``attention_mask``,
    if given, is (B, S) over all slots. A prefill at 0 then one-token steps give the logits of
    the full forward.

    ``collect``: a list the call appends the trace rows to (``bigmodel_jax.trace``; outside
    ``jit``): ``embeddings``, each block's ``layer{i}.attention`` / ``.mlp``, ``final_norm``."""
    params = cast_params(params, perf)
    out = hidden_states(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf, cache=cache,
                        cache_pos=cache_pos, collect=collect)
    if cache is None:
        return lm_logits(params, out, config, perf)
    return lm_logits(params, out[0], config, perf), out[1]


def loss(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """Mean next-token cross-entropy; ``labels`` (default ``input_ids``) shifted inside, as in
    HF: position t's logits predict ``labels[t + 1]``; label -100 is ignored (dropout and
    ``perf``: see ``hidden_states``; the loss reads fp32 logits under mixed precision). Other
    labels, outside [0, V), raise when concrete; under ``jit`` their values are unknown, so a
    caller that jits this checks them on the host first (``reference_numpy.models.gpt.
    check_loss_labels``; ``loss_and_grad`` and the training step do)."""
    check_loss_labels(batch, config)  # before the forward: a bad label fails fast
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
    check_loss_labels(batch, config)  # label values are unknown once traced
    MaskSource.make(dropout_mask_shapes(config, *ids.shape), config.dropout, dropout_key=dropout_key,
                    masks=masks)  # argument errors before tracing
    return _loss_and_grad(params, batch, config, dropout_key, masks, perf)


