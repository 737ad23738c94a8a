"""GPT-2 / Llama-style causal decoder: forward and the hand-written backward of the whole model.

    x = E[ids] (+ P[t] when positions are learned)        (B, T, D)
    x = block_l(x)  for l = 1..L   (pre-norm, causal; RoPE inside attention for Llama)
    h = norm_f(x)
    logits = h E^T (tied) or h W_lm                         (B, T, V)
    loss = CE(logits[:, :-1], labels[:, 1:])   (labels default to input_ids; -100 ignored)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.configs import GPTConfig, param_shapes
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.embeddings import (
    embedding_attend,
    embedding_attend_backward,
    embedding_backward,
    embedding_forward,
    position_embedding_backward,
    position_embedding_forward,
)
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward
from reference_numpy.losses import cross_entropy_backward, cross_entropy_forward
from reference_numpy.models.common import check_token_batch, init_params, layer, require_keys, stack
from reference_numpy.tree import Tree, tree_add


def block_spec(config: GPTConfig) -> BlockSpec:
    """The decoder block of this config (shared with the JAX model)."""
    return BlockSpec(
        prenorm=True, norm=config.norm, norm_eps=config.norm_eps, activation=config.activation,
        gated_mlp=config.gated_mlp, causal=True,
        rope_theta=config.rope_theta if config.positions == "rope" else None,
        rope_layout=config.rope_layout,
    )


def init(config: GPTConfig, rng: np.random.Generator) -> Tree:
    """Fresh parameters (same rules as ``bigmodel_jax.models.gpt.init``, NumPy random stream)."""
    return init_params(param_shapes(config), config.n_layers, rng, np.dtype(config.dtype))


def _norm(config: GPTConfig):
    if config.norm == "layer":
        return layer_norm_forward, layer_norm_backward
    return rms_norm_forward, rms_norm_backward


def _trunk_with_cache(params: Tree, batch: dict[str, Any], config: GPTConfig) -> tuple[np.ndarray, Any]:
    """Final-norm hidden states (B, T, D) and the trunk's caches (everything but the head)."""
    require_keys(batch, ["input_ids"], "gpt")
    ids, mask = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    B, T = ids.shape
    positions = np.arange(T)
    x, c_embed = embedding_forward(params["embed"], ids)
    c_pos = None
    if config.positions == "learned":
        p, c_pos = position_embedding_forward(params["position"], positions)
        x = x + p
    spec = block_spec(config)
    rope_pos = positions if config.positions == "rope" else None
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        x, c = block_forward(layer(params["layers"], i), x, spec, key_padding_mask=mask, positions=rope_pos)
        c_blocks.append(c)
    norm_fwd, _ = _norm(config)
    h, c_norm = norm_fwd(params["final_norm"], x, eps=config.norm_eps)
    return h, (c_embed, c_pos, c_blocks, c_norm)


def hidden_states(params: Tree, batch: dict[str, Any], config: GPTConfig) -> np.ndarray:
    """input_ids (B, T) [, attention_mask (B, T)] -> final-norm hidden states (B, T, D)
    (HF's base-model ``last_hidden_state``); the twin of ``bigmodel_jax.models.gpt.hidden_states``."""
    return _trunk_with_cache(params, batch, config)[0]


def forward_with_cache(params: Tree, batch: dict[str, Any], config: GPTConfig) -> tuple[np.ndarray, Any]:
    """Logits (B, T, V) and everything backward needs."""
    h, (c_embed, c_pos, c_blocks, c_norm) = _trunk_with_cache(params, batch, config)
    if config.tie_embeddings:
        logits, c_head = embedding_attend(params["embed"], h)
    else:
        logits, c_head = h @ params["lm_head"]["kernel"], h
    return logits, (c_embed, c_pos, c_blocks, c_norm, c_head)


def forward(params: Tree, batch: dict[str, Any], config: GPTConfig) -> np.ndarray:
    """Logits (B, T, V) of the next token at every position."""
    return forward_with_cache(params, batch, config)[0]


def backward(params: Tree, cache: Any, dlogits: np.ndarray, config: GPTConfig) -> Tree:
    """Hand-written backward from dlogits (B, T, V) to a gradient tree shaped like params."""
    c_embed, c_pos, c_blocks, c_norm, c_head = cache
    grads: Tree = {}
    if config.tie_embeddings:
        dh, g_head = embedding_attend_backward(params["embed"], c_head, dlogits)
    else:
        h = c_head
        dh = dlogits @ params["lm_head"]["kernel"].T
        grads["lm_head"] = {"kernel": np.einsum("BTD,BTV->DV", h, dlogits)}
    _, norm_bwd = _norm(config)
    dx, grads["final_norm"] = norm_bwd(params["final_norm"], c_norm, dh)
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["layers"], i), c_blocks[i], dx)
        layer_grads.append(g)
    grads["layers"] = stack(layer_grads[::-1])
    if c_pos is not None:
        _, grads["position"] = position_embedding_backward(params["position"], c_pos, dx)
    _, g_embed = embedding_backward(params["embed"], c_embed, dx)
    grads["embed"] = tree_add(g_embed, g_head) if config.tie_embeddings else g_embed
    return grads


def loss_and_grad(params: Tree, batch: dict[str, Any], config: GPTConfig) -> tuple[float, Tree]:
    """Mean next-token cross-entropy and its gradient, by the hand-written backward."""
    logits, cache = forward_with_cache(params, batch, config)
    labels = np.asarray(batch.get("labels", batch["input_ids"]))
    loss, c_loss = cross_entropy_forward(logits[:, :-1], labels[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = cross_entropy_backward(c_loss, np.ones((), logits.dtype))
    return loss, backward(params, cache, dlogits, config)
