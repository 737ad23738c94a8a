"""One cached decoding step: the model's own forward with a cache, nothing restated.

``decode_step`` is ``models.gpt.forward(..., cache=, cache_pos=)`` and ``seq2seq_decode_step``
is ``models.seq2seq.decode_step``: the KV cache is an option of the one forward each family has,
so a prefill followed by single-token steps computes exactly the full forward's logits.
"""

from __future__ import annotations

from typing import Any

import jax

from bigmodel_jax.models import gpt, seq2seq
from reference_numpy.configs import GPTConfig, Seq2SeqConfig

Tree = dict[str, Any]


def decode_step(
    params: Tree, cache: Tree, ids: jax.Array, pos: jax.Array, key_mask: jax.Array, config: GPTConfig,
) -> tuple[jax.Array, Tree]:
    """Run tokens ids (B, N) at slots [pos, pos + N) against the cache -> logits (B, N, V) and
    the cache with their keys/values written in. key_mask: (B, S) bool, False for padded slots.
    ``params`` may be in the decoding layout (``layout.decode_params``); the cache matches the
    weights: ``gpt.init_cache`` for stacked layers, ``gpt.init_layer_caches`` for unrolled ones."""
    return gpt.forward(params, {"input_ids": ids, "attention_mask": key_mask}, config, cache=cache, cache_pos=pos)


def seq2seq_decode_step(params: Tree, cache: Tree, ids: jax.Array, pos: jax.Array,
                        src_mask: jax.Array, config: Seq2SeqConfig) -> tuple[jax.Array, Tree]:
    """Target tokens ids (B, N) at slots [pos, pos + N) -> logits (B, N, V), updated cache
    (``seq2seq.init_cache``); src_mask (B, S) marks the real source tokens."""
    return seq2seq.decode_step(params, cache, {"decoder_input_ids": ids, "attention_mask": src_mask}, pos, config)
