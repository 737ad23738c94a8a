"""GPT-2 / Llama-style causal decoder in JAX; the twin of ``reference_numpy.models.gpt``.

Layers are stacked on a leading L axis and run with ``jax.lax.scan``, so compile time does not
grow with depth.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import init as _init
from reference_numpy.configs import GPTConfig
from reference_numpy.models.common import check_token_batch, require_keys
from reference_numpy.models.gpt import block_spec

Tree = dict[str, Any]


def init(config: GPTConfig, seed: int = 0) -> Tree:
    """Fresh parameters for ``config``."""
    return _init(config, seed)


def hidden_states(params: Tree, batch: dict[str, Any], config: GPTConfig) -> jax.Array:
    """input_ids (B, T) [, attention_mask (B, T)] -> final-norm hidden states (B, T, D)."""
    require_keys(batch, ["input_ids"], "gpt")
    ids, _ = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len) if _concrete(
        batch["input_ids"]) else (batch["input_ids"], None)
    mask = batch.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    B, T = ids.shape
    positions = jnp.arange(T)
    x = embed(params["embed"], ids)  # (B, T, D)
    if config.positions == "learned":
        x = x + position_embedding(params["position"], positions)[None]
    spec = block_spec(config)
    rope_pos = positions if config.positions == "rope" else None

    def layer(h: jax.Array, p: Tree) -> tuple[jax.Array, None]:
        return block(p, h, spec, key_padding_mask=mask, positions=rope_pos), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    norm = layer_norm if config.norm == "layer" else rms_norm
    return norm(params["final_norm"], x, config.norm_eps)


def forward(params: Tree, batch: dict[str, Any], config: GPTConfig) -> jax.Array:
    """Logits (B, T, V) of the next token at every position."""
    h = hidden_states(params, batch, config)
    if config.tie_embeddings:
        return attend(params["embed"], h)
    return jnp.einsum("BTD,DV->BTV", h, params["lm_head"]["kernel"])


def loss(params: Tree, batch: dict[str, Any], config: GPTConfig) -> jax.Array:
    """Mean next-token cross-entropy; ``labels`` (default ``input_ids``) shifted inside, as in
    HF: position t's logits predict ``labels[t + 1]``; label -100 is ignored."""
    logits = forward(params, batch, config)
    labels = batch.get("labels", batch["input_ids"])
    return cross_entropy(logits[:, :-1], labels[:, 1:])


@partial(jax.jit, static_argnames="config")
def _loss_and_grad(params: Tree, batch: dict[str, Any], config: GPTConfig) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config)


def loss_and_grad(params: Tree, batch: dict[str, Any], config: GPTConfig) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled; batch checked before tracing."""
    require_keys(batch, ["input_ids"], "gpt")
    check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    return _loss_and_grad(params, batch, config)


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)
