"""Layer-by-layer trace of a reference model's forward pass (read by ``bigmodel diff``).

Dims: B batch, T time, S source time, D model width, V vocabulary, C classes, L layers.

A *trace* is an ordered list of ``(name, array)``. The names are the same on every side
(this module, ``bigmodel_jax.trace``, ``bigmodel_port.trace_torch``), so two traces compare
row by row. Definitions (each a tensor every side can produce exactly):

* ``embeddings``: the input of block 0, (B, T, D): BERT ``LN(word + pos + type)`` (HF
  ``BertEmbeddings``), GPT-2 ``wte + wpe``, Llama ``embed_tokens``, ViT ``[cls; patches] + pos``
  (B, N + 1, D), Marian ``E[ids] sqrt(D) + PE``.
* ``layer{i}.attention``: the residual stream after block i's attention sub-layer, (B, T, D).
  Post-norm (BERT, Marian): ``LN(x + attn(x))``, HF's ``BertAttention`` output. Pre-norm (GPT-2,
  Llama, ViT): ``x + attn(norm(x))``, the input of HF's MLP norm (``ln_2`` /
  ``post_attention_layernorm`` / ``layernorm_after``).
* ``layer{i}.cross_attention``: decoder blocks only, the stream after the cross-attention.
* ``layer{i}.mlp``: the block's output, (B, T, D).
* ``final_norm``: the final norm's output, for models that have one (GPT-2, Llama, ViT).
* ``last_hidden_state``: base models ("base" task) only, the model's output hidden states.
* ``pooler_output``: the tanh pooler on token 0, (B, D), for models that have one.
* ``logits``: every head. (B, T, V) LM heads, (B, C) sequence / image classification,
  (B, T, C) token classification, (B, T, 2) question answering (start = ``[..., 0]``,
  end = ``[..., 1]``).

Encoder-decoder models prefix the rows ``encoder.`` / ``decoder.`` (``encoder.embeddings``,
``decoder.layer0.cross_attention``, ...).

The trace *is* the model: each family's own ``forward`` appends its rows to the list passed as
``collect=`` (the blocks through ``block_forward(..., intermediates=)``), and the last row is the
forward's output, so no second copy of the model math exists. Imports NumPy and the standard
library only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig
from reference_numpy.models import bert, gpt, seq2seq, vit
from reference_numpy.tree import Tree

Trace = list[tuple[str, np.ndarray]]

__all__ = ["Trace", "trace"]


def trace(config: Config, params: Tree, batch: dict[str, Any], task: str) -> Trace:
    """The layer-by-layer trace (module docstring) of the reference model ``config`` with
    ``params`` on ``batch`` (the family's batch keys: ``input_ids`` [, ``attention_mask``,
    ``token_type_ids``, ``decoder_input_ids``] or ``pixel_values``), evaluation mode.

    ``task``: the HF task of the checkpoint (``Pretrained.task``): "base" ends the trace with
    ``last_hidden_state`` [and ``pooler_output``]; any other task with the head's ``logits``
    (BERT: the head of that name).
    """
    rows: Trace = []
    if isinstance(config, BertConfig):
        out = bert.forward(params, batch, config, task, collect=rows)  # "base" collects its outputs
        if task != "base":
            rows.append(("logits", out))
    elif isinstance(config, GPTConfig):
        if task == "base":
            rows.append(("last_hidden_state", gpt.hidden_states(params, batch, config, collect=rows)))
        else:
            rows.append(("logits", gpt.forward(params, batch, config, collect=rows)))
    elif isinstance(config, ViTConfig):
        if task == "base":
            (h, pooled), _ = vit.encode_with_cache(params, batch, config, collect=rows)
            rows.append(("last_hidden_state", h))
            if pooled is not None:
                rows.append(("pooler_output", pooled))
        else:
            rows.append(("logits", vit.forward_with_cache(params, batch, config, collect=rows)[0]))
    elif isinstance(config, Seq2SeqConfig):
        logits = seq2seq.forward(params, batch, config, collect=rows)
        # "base": the decoder's output before the head is the last collected row
        rows.append(("last_hidden_state", rows[-1][1]) if task == "base" else ("logits", logits))
    else:
        raise TypeError(f"no trace for config type {type(config).__name__}")
    return rows
