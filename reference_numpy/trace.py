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

The trace *is* the model: it runs the same layer functions in the same order as each family's
``forward`` (the blocks via ``block_forward(..., intermediates=...)``), so its last row equals the
model's output bit for bit (tested). Imports NumPy and the standard library only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig
from reference_numpy.layers.block import BlockSpec, block_forward
from reference_numpy.layers.embeddings import embedding_attend, embedding_forward, position_embedding_forward
from reference_numpy.layers.linear import linear_forward
from reference_numpy.layers.norms import layer_norm_forward, rms_norm_forward
from reference_numpy.models.common import layer
from reference_numpy.tree import Tree

Trace = list[tuple[str, np.ndarray]]

__all__ = ["Trace", "trace"]


def _blocks(rows: Trace, prefix: str, stacked: Tree, x: np.ndarray, spec: BlockSpec, n_layers: int,
            **block_kw: Any) -> np.ndarray:
    """Run ``n_layers`` blocks on x (B, T, D), appending each sub-layer's output to ``rows``."""
    for i in range(n_layers):  # a loop over layers, as the models do
        inter: dict[str, np.ndarray] = {}
        x, _ = block_forward(layer(stacked, i), x, spec, intermediates=inter, **block_kw)
        rows.append((f"{prefix}layer{i}.attention", inter["attn"]))
        if "cross" in inter:
            rows.append((f"{prefix}layer{i}.cross_attention", inter["cross"]))
        rows.append((f"{prefix}layer{i}.mlp", inter["mlp"]))
    return x


def _mask(batch: dict[str, Any], key: str = "attention_mask") -> np.ndarray | None:
    m = batch.get(key)
    return None if m is None else np.asarray(m).astype(bool)  # (B, T), True = attend


def _bert(params: Tree, batch: dict[str, Any], config: BertConfig, task: str) -> Trace:
    from reference_numpy.models import bert

    bert.check_params(params, task, config)
    bert.check_batch(batch, config, task)
    ids = np.asarray(batch["input_ids"])  # (B, T)
    types = batch.get("token_type_ids")
    types = np.zeros_like(ids) if types is None else np.asarray(types)
    emb = params["embeddings"]
    w, _ = embedding_forward(emb["word"], ids)  # (B, T, D)
    p, _ = position_embedding_forward(emb["position"], np.arange(ids.shape[1]))  # (T, D)
    s, _ = embedding_forward(emb["token_type"], types)  # (B, T, D)
    x, _ = layer_norm_forward(emb["norm"], w + p + s, eps=config.norm_eps)
    rows: Trace = [("embeddings", x)]
    h = _blocks(rows, "", params["layers"], x, bert.block_spec(config), config.n_layers,
                key_padding_mask=_mask(batch))  # (B, T, D)
    # the heads, as reference_numpy.models.bert._head_forward computes them
    if task == "mlm":
        q = params["mlm"]
        t, _ = linear_forward(q["transform"], h, config.activation)  # (B, T, D)
        n, _ = layer_norm_forward(q["norm"], t, eps=config.norm_eps)
        logits, _ = embedding_attend(params["embeddings"]["word"], n)  # (B, T, V), tied decoder
        rows.append(("logits", logits + q["bias"]))
    elif task in ("token_classification", "question_answering"):
        rows.append(("logits", linear_forward(params["classifier" if task == "token_classification" else "qa"],
                                              h)[0]))
    else:  # "base" and "sequence_classification"
        if task == "base":
            rows.append(("last_hidden_state", h))
        if config.pooler:
            pooled, _ = linear_forward(params["pooler"], h[:, 0], "tanh")  # (B, D)
            rows.append(("pooler_output", pooled))
            if task == "sequence_classification":
                rows.append(("logits", linear_forward(params["classifier"], pooled)[0]))  # (B, C)
    return rows


def _gpt(params: Tree, batch: dict[str, Any], config: GPTConfig, task: str) -> Trace:
    from reference_numpy.models import gpt
    from reference_numpy.models.common import check_token_batch, require_keys

    require_keys(batch, ["input_ids"], "gpt")
    ids, mask = check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    positions = np.arange(ids.shape[1])
    x, _ = embedding_forward(params["embed"], ids)  # (B, T, D)
    if config.positions == "learned":
        p, _ = position_embedding_forward(params["position"], positions)
        x = x + p
    rows: Trace = [("embeddings", x)]
    x = _blocks(rows, "", params["layers"], x, gpt.block_spec(config), config.n_layers,
                key_padding_mask=mask, positions=positions if config.positions == "rope" else None)
    norm = layer_norm_forward if config.norm == "layer" else rms_norm_forward
    h, _ = norm(params["final_norm"], x, eps=config.norm_eps)
    rows.append(("final_norm", h))
    if task == "base":
        rows.append(("last_hidden_state", h))
    else:
        rows.append(("logits", gpt.lm_logits(params, h, config)))  # (B, T, V)
    return rows


def _vit(params: Tree, batch: dict[str, Any], config: ViTConfig, task: str) -> Trace:
    from reference_numpy.models import vit

    px = vit.check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    B = px.shape[0]
    tokens, _ = vit.patch_embed_forward(params["patch_embed"], px, config.patch_size)  # (B, N, D)
    cls = np.broadcast_to(params["cls_token"], (B, 1, config.d_model))
    x = np.concatenate([cls, tokens], axis=1)  # (B, N + 1, D)
    pos, _ = position_embedding_forward(params["position"], np.arange(config.max_len))
    x = x + pos
    rows: Trace = [("embeddings", x)]
    x = _blocks(rows, "", params["layers"], x, vit.block_spec(config), config.n_layers)
    h, _ = layer_norm_forward(params["final_norm"], x, eps=config.norm_eps)  # (B, N + 1, D)
    rows.append(("final_norm", h))
    if task == "base":
        rows.append(("last_hidden_state", h))
        if config.pooler:
            rows.append(("pooler_output", linear_forward(params["pooler"], h[:, 0], "tanh")[0]))
    else:
        rows.append(("logits", linear_forward(params["head"], h[:, 0])[0]))  # (B, C)
    return rows


def _seq2seq(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, task: str) -> Trace:
    from reference_numpy.models import seq2seq as s2s

    ids, mask = s2s.check_source(batch, config)
    x, _ = s2s._embed_forward(params["embed"], ids, config)  # (B, S, D)
    rows: Trace = [("encoder.embeddings", x)]
    enc = _blocks(rows, "encoder.", params["encoder"]["layers"], x, s2s.encoder_spec(config), config.n_layers,
                  key_padding_mask=mask)
    if config.prenorm:
        enc, _ = layer_norm_forward(params["encoder"]["final_norm"], enc, eps=config.norm_eps)
        rows.append(("encoder.final_norm", enc))
    dec_ids, dec_mask = s2s.check_target(batch, config, ids.shape[0])
    table = params["embed"] if config.share_embeddings else params["target_embed"]
    y, _ = s2s._embed_forward(table, dec_ids, config)  # (B, T, D)
    rows.append(("decoder.embeddings", y))
    y = _blocks(rows, "decoder.", params["decoder"]["layers"], y, s2s.decoder_spec(config),
                config.decoder_layers, enc=enc, key_padding_mask=dec_mask, enc_padding_mask=mask)
    if config.prenorm:
        y, _ = layer_norm_forward(params["decoder"]["final_norm"], y, eps=config.norm_eps)
        rows.append(("decoder.final_norm", y))
    if task == "base":
        rows.append(("last_hidden_state", y))
        return rows
    rows.append(("logits", s2s.decoder_logits(params, y, config)))  # (B, T, V)
    return rows


def trace(config: Config, params: Tree, batch: dict[str, Any], task: str) -> Trace:
    """The layer-by-layer trace (module docstring) of the reference model ``config`` with
    ``params`` on ``batch`` (the family's batch keys: ``input_ids`` [, ``attention_mask``,
    ``token_type_ids``, ``decoder_input_ids``] or ``pixel_values``), evaluation mode.

    ``task``: the HF task of the checkpoint (``Pretrained.task``): "base" ends the trace with
    ``last_hidden_state`` [and ``pooler_output``]; any other task with the head's ``logits``
    (BERT: the head of that name).
    """
    if isinstance(config, BertConfig):
        return _bert(params, batch, config, task)
    if isinstance(config, GPTConfig):
        return _gpt(params, batch, config, task)
    if isinstance(config, ViTConfig):
        return _vit(params, batch, config, task)
    if isinstance(config, Seq2SeqConfig):
        return _seq2seq(params, batch, config, task)
    raise TypeError(f"no trace for config type {type(config).__name__}")
