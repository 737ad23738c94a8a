"""GPT-2 / Llama-style causal decoder: forward and the hand-written backward of the whole model.

    x = E[ids] (+ P[t] when positions are learned)        (B, T, D)
    x = block_l(x)  for l = 1..L   (pre-norm, causal; RoPE inside attention for Llama)
    h = norm_f(x)
    logits = h E^T (tied) or h W_lm                         (B, T, V)
    loss = CE(logits[:, :-1], labels[:, 1:])   (labels default to input_ids; -100 ignored)

Training-mode dropout (HF GPT-2's three sites, one rate ``config.dropout``) when ``masks`` is
given, a tree shaped by ``dropout_mask_shapes`` (keep-masks, True = keep, scale 1 / (1 - p)):

    x = drop(x; masks["embed"] (B, T, D))                      after embeddings (+ positions)
    in block l: attention probs  masks["layers"]["attn_probs"][l]  (B, H, T, T)
                attention output masks["layers"]["attn_out"][l]    (B, T, D)   before the residual add
                MLP output       masks["layers"]["mlp_out"][l]     (B, T, D)   before the residual add

No masks = evaluation. The JAX model draws the same tree from a key
(``bigmodel_jax.models.gpt.dropout_masks``), so one tree can be fed to both sides. HF Llama
drops only the attention probabilities; these configs use GPT-2's sites whatever the switches
(published Llama checkpoints have ``attention_dropout = 0``, i.e. ``dropout = 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from reference_numpy.speed.contract import einsum, rows_matmul
from reference_numpy.configs import GPTConfig, param_shapes
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
    position_embedding_backward,
    position_embedding_forward,
)
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward
from reference_numpy.losses import check_labels, cross_entropy_backward, cross_entropy_forward
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


def block_spec(config: GPTConfig) -> BlockSpec:
    """The decoder block of this config (shared with the JAX model)."""
    return BlockSpec(
        prenorm=True, norm=config.norm, norm_eps=config.norm_eps, activation=config.activation,
        gated_mlp=config.gated_mlp, causal=True,
        rope_theta=config.rope_theta if config.positions == "rope" else None,
        rope_layout=config.rope_layout,
    )


def dropout_mask_shapes(config: GPTConfig, batch_size: int, length: int) -> dict[str, Any]:
    """Shapes of the training masks for a (B, T) batch (shared with the JAX model):
    ``{"embed": (B, T, D), "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D),
    "mlp_out": (L, B, T, D)}}``."""
    B, T, D, H, L = batch_size, length, config.d_model, config.n_heads, config.n_layers
    return {"embed": (B, T, D),
            "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D), "mlp_out": (L, B, T, D)}}


def dropout_masks(config: GPTConfig, rng: np.random.Generator, batch_size: int, length: int) -> Tree:
    """A fresh tree of keep-masks (``dropout_mask_shapes``) drawn with P(keep) = 1 - config.dropout."""
    return dropout_mask_tree(rng, dropout_mask_shapes(config, batch_size, length), config.dropout)


def init(config: GPTConfig, rng: np.random.Generator) -> Tree:
    """Fresh parameters (same rules as ``bigmodel_jax.models.gpt.init``, NumPy random stream)."""
    return init_params(param_shapes(config), config.n_layers, rng, np.dtype(config.dtype))


def _norm(config: GPTConfig):
    if config.norm == "layer":
        return layer_norm_forward, layer_norm_backward
    return rms_norm_forward, rms_norm_backward


def init_cache(config: GPTConfig, batch: int, slots: int, dtype: Any) -> Tree:
    """A zeroed decoding cache for ``forward(..., kv_cache=)``: ``{"k", "v"}``, each
    (L, B, S, K, E) with S = ``slots``."""
    shape = (config.n_layers, batch, slots, config.kv_heads, config.e)
    return {"k": np.zeros(shape, dtype), "v": np.zeros(shape, dtype)}


def _trunk_with_cache(
    params: Tree, batch: dict[str, Any], config: GPTConfig, masks: Tree | None = None, *,
    kv_cache: Tree | None = None, cache_pos: int = 0, collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """Final-norm hidden states (B, T, D) and the trunk's caches (everything but the head).
    ``kv_cache`` / ``cache_pos`` / ``collect``: see ``forward_with_cache``."""
    require_keys(batch, ["input_ids"], "gpt")
    if kv_cache is None:
        ids, mask = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    else:
        ids, mask = check_cached_token_batch(batch, "input_ids", config.vocab_size, config.max_len,
                                             kv_cache["k"].shape[2], cache_pos)
        if masks is not None:
            raise ValueError("dropout masks are for training; decoding with kv_cache is evaluation")
    B, T = ids.shape
    masks = resolve_mask_tree(masks, dropout_mask_shapes(config, B, T), config.dropout)
    positions = cache_pos + np.arange(T)  # slot indices: decoding equals the full recompute
    x, c_embed = embedding_forward(params["embed"], ids)
    c_pos = None
    if config.positions == "learned":
        p, c_pos = position_embedding_forward(params["position"], positions)
        x = x + p
    x, c_drop = optional_dropout_forward(x, None if masks is None else masks["embed"], config.dropout)
    if collect is not None:
        collect.append(("embeddings", x))
    spec = block_spec(config)
    if masks is not None:
        spec = dataclasses.replace(spec, dropout_rate=config.dropout)
    rope_pos = positions if config.positions == "rope" else None
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        m = None if masks is None else layer(masks["layers"], i)
        lc = None if kv_cache is None else {"k": kv_cache["k"][i], "v": kv_cache["v"][i]}  # views
        inter: dict[str, np.ndarray] | None = None if collect is None else {}
        x, c = block_forward(layer(params["layers"], i), x, spec, key_padding_mask=mask, positions=rope_pos,
                             masks=m, intermediates=inter, kv_cache=lc,
                             cache_pos=None if kv_cache is None else cache_pos)
        collect_blocks(collect, "", i, inter)
        c_blocks.append(c)
    norm_fwd, _ = _norm(config)
    h, c_norm = norm_fwd(params["final_norm"], x, eps=config.norm_eps)
    if collect is not None:
        collect.append(("final_norm", h))
    return h, (c_embed, c_pos, c_drop, c_blocks, c_norm)


def hidden_states(params: Tree, batch: dict[str, Any], config: GPTConfig, *, masks: Tree | None = None,
                  kv_cache: Tree | None = None, cache_pos: int = 0, collect: list | None = None) -> np.ndarray:
    """input_ids (B, T) [, attention_mask (B, T)] -> final-norm hidden states (B, T, D)
    (HF's base-model ``last_hidden_state``); the twin of ``bigmodel_jax.models.gpt.hidden_states``.
    ``masks``: training dropout masks (``dropout_mask_shapes``), None = evaluation; ``kv_cache``,
    ``cache_pos``, ``collect``: see ``forward_with_cache``."""
    return _trunk_with_cache(params, batch, config, masks, kv_cache=kv_cache, cache_pos=cache_pos,
                             collect=collect)[0]


def lm_logits(params: Tree, h: np.ndarray, config: GPTConfig) -> np.ndarray:
    """The LM head: final hidden states h (..., D) -> logits (..., V), through the tied embedding
    or ``lm_head``."""
    if config.tie_embeddings:
        return embedding_attend(params["embed"], h)[0]
    return rows_matmul(h, params["lm_head"]["kernel"])


def forward_with_cache(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, masks: Tree | None = None,
    kv_cache: Tree | None = None, cache_pos: int = 0, collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """Logits (B, T, V) and everything backward needs. ``masks``: training dropout masks
    (``dropout_mask_shapes``; e.g. ``np.asarray`` of the JAX ``dropout_masks``), None = evaluation.

    ``kv_cache`` (``init_cache``): decode instead. ``input_ids`` (B, N) are the tokens at slots
    [cache_pos, cache_pos + N) (their positions), their keys/values are written into the cache
    in place, and attention reads every earlier slot; ``attention_mask``, if given, is (B, S)
    over all slots (False = padding). A prefill at ``cache_pos=0`` followed by one-token steps
    gives the logits of the full forward. Forward only.

    ``collect``: a list this call appends the trace rows to (``reference_numpy.trace``):
    ``embeddings``, each block's ``layer{i}.attention`` / ``.mlp``, ``final_norm``."""
    h, trunk = _trunk_with_cache(params, batch, config, masks, kv_cache=kv_cache, cache_pos=cache_pos,
                                 collect=collect)
    return lm_logits(params, h, config), (*trunk, h)  # both heads' backward needs only h


def forward(params: Tree, batch: dict[str, Any], config: GPTConfig, *, masks: Tree | None = None,
            kv_cache: Tree | None = None, cache_pos: int = 0, collect: list | None = None) -> np.ndarray:
    """Logits (B, T, V) of the next token at every position (``masks``, ``kv_cache``,
    ``cache_pos``, ``collect``: see ``forward_with_cache``)."""
    return forward_with_cache(params, batch, config, masks=masks, kv_cache=kv_cache, cache_pos=cache_pos,
                              collect=collect)[0]


def backward(params: Tree, cache: Any, dlogits: np.ndarray, config: GPTConfig) -> Tree:
    """Hand-written backward from dlogits (B, T, V) to a gradient tree shaped like params."""
    c_embed, c_pos, c_drop, c_blocks, c_norm, c_head = cache
    grads: Tree = {}
    if config.tie_embeddings:
        dh, g_head = embedding_attend_backward(params["embed"], c_head, dlogits)
    else:
        h = c_head
        dh = rows_matmul(dlogits, params["lm_head"]["kernel"].T)
        grads["lm_head"] = {"kernel": einsum("BTD,BTV->DV", h, dlogits)}
    _, norm_bwd = _norm(config)
    dx, grads["final_norm"] = norm_bwd(params["final_norm"], c_norm, dh)
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["layers"], i), c_blocks[i], dx)
        layer_grads.append(g)
    grads["layers"] = stack(layer_grads[::-1])
    dx = dropout_backward(c_drop, dx)  # the embedding dropout (identity in evaluation)
    if c_pos is not None:
        _, grads["position"] = position_embedding_backward(params["position"], c_pos, dx)
    _, g_embed = embedding_backward(params["embed"], c_embed, dx)
    grads["embed"] = tree_add(g_embed, g_head) if config.tie_embeddings else g_embed
    return grads


def check_loss_labels(batch: dict[str, Any], config: GPTConfig) -> None:
    """The loss's ``labels`` (B, T), shaped like ``input_ids``, each in [0, V) or -100
    (``losses.check_labels``: values when concrete; under ``jit`` the caller checks on the host).
    Absent labels default to ``input_ids``, which the forward checks as token ids."""
    require_keys(batch, ["input_ids"], "gpt")
    if batch.get("labels") is not None:
        check_labels(batch["labels"], config.vocab_size, "labels", shape=tuple(np.shape(batch["input_ids"])))


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: GPTConfig, *, masks: Tree | None = None
) -> tuple[float, Tree]:
    """Mean next-token cross-entropy and its gradient, by the hand-written backward
    (``masks``: training dropout masks, see ``forward_with_cache``; None = evaluation)."""
    logits, cache = forward_with_cache(params, batch, config, masks=masks)
    check_loss_labels(batch, config)
    labels = np.asarray(batch.get("labels", batch["input_ids"]))
    loss, c_loss = cross_entropy_forward(logits[:, :-1], labels[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = cross_entropy_backward(c_loss, np.ones((), logits.dtype))
    return loss, backward(params, cache, dlogits, config)
