"""Layer-by-layer trace of a JAX model's forward pass; twin of ``reference_numpy.trace``.

Dims: B batch, T time, S source time, D model width, V vocabulary, C classes, L layers.

Same row names and definitions as ``reference_numpy.trace`` (see its docstring). The trace runs
the same code as each family's ``forward`` in ``bigmodel_jax.models``: the same eager ops for
embeddings and heads, and the blocks under the same ``jax.lax.scan`` over the stacked layers,
with ``block(..., intermediates=...)`` handing each sub-layer's output out as a scan output.
Rows come back as NumPy arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.layers.block import BlockSpec, block
from bigmodel_jax.layers.embeddings import attend, embed, position_embedding
from bigmodel_jax.layers.linear import linear
from bigmodel_jax.layers.norms import layer_norm, rms_norm
from bigmodel_jax.models.common import as_bool_mask
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig

Tree = dict[str, Any]
Trace = list[tuple[str, np.ndarray]]

__all__ = ["Trace", "trace"]


def _blocks(rows: list[tuple[str, jax.Array]], prefix: str, stacked: Tree, x: jax.Array, spec: BlockSpec,
            n_layers: int, **block_kw: Any) -> jax.Array:
    """Scan the blocks over x (B, T, D) as the models do; append every sub-layer's output."""

    def step(h: jax.Array, p: Tree) -> tuple[jax.Array, dict[str, jax.Array]]:
        inter: dict[str, jax.Array] = {}
        y = block(p, h, spec, intermediates=inter, **block_kw)
        return y, inter

    x, inter = jax.lax.scan(step, x, stacked)  # inter[name]: (L, B, T, D)
    for i in range(n_layers):
        rows.append((f"{prefix}layer{i}.attention", inter["attn"][i]))
        if "cross" in inter:
            rows.append((f"{prefix}layer{i}.cross_attention", inter["cross"][i]))
        rows.append((f"{prefix}layer{i}.mlp", inter["mlp"][i]))
    return x


def _bert(params: Tree, batch: dict[str, Any], config: BertConfig, task: str) -> list:
    from reference_numpy.models.bert import block_spec, check_batch, check_params

    check_params(params, task, config)
    check_batch(batch, config, "base")
    ids = batch["input_ids"]
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    emb = params["embeddings"]
    x = (embed(emb["word"], ids)  # (B, T, D), as bigmodel_jax.models.bert.hidden_states
         + position_embedding(emb["position"], jnp.arange(ids.shape[1]))[None]
         + embed(emb["token_type"], types))
    x = layer_norm(emb["norm"], x, config.norm_eps)
    rows: list = [("embeddings", x)]
    h = _blocks(rows, "", params["layers"], x, block_spec(config), config.n_layers,
                key_padding_mask=as_bool_mask(batch.get("attention_mask")))
    # the heads, as bigmodel_jax.models.bert.forward computes them
    if task == "mlm":
        q = params["mlm"]
        t = linear(q["transform"], h, config.activation)  # (B, T, D)
        n = layer_norm(q["norm"], t, config.norm_eps)
        rows.append(("logits", attend(params["embeddings"]["word"], n) + q["bias"]))  # (B, T, V)
    elif task in ("token_classification", "question_answering"):
        rows.append(("logits", linear(params["classifier" if task == "token_classification" else "qa"], h)))
    else:  # "base" and "sequence_classification"
        if task == "base":
            rows.append(("last_hidden_state", h))
        if config.pooler:
            pooled = linear(params["pooler"], h[:, 0], "tanh")  # (B, D)
            rows.append(("pooler_output", pooled))
            if task == "sequence_classification":
                rows.append(("logits", linear(params["classifier"], pooled)))  # (B, C)
    return rows


def _gpt(params: Tree, batch: dict[str, Any], config: GPTConfig, task: str) -> list:
    from reference_numpy.models.common import check_token_batch, require_keys
    from reference_numpy.models.gpt import block_spec

    require_keys(batch, ["input_ids"], "gpt")
    check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    positions = jnp.arange(ids.shape[1])
    x = embed(params["embed"], ids)  # (B, T, D)
    if config.positions == "learned":
        x = x + position_embedding(params["position"], positions)[None]
    rows: list = [("embeddings", x)]
    x = _blocks(rows, "", params["layers"], x, block_spec(config), config.n_layers, key_padding_mask=mask,
                positions=positions if config.positions == "rope" else None)
    norm = layer_norm if config.norm == "layer" else rms_norm
    h = norm(params["final_norm"], x, config.norm_eps)
    rows.append(("final_norm", h))
    if task == "base":
        rows.append(("last_hidden_state", h))
    elif config.tie_embeddings:
        rows.append(("logits", attend(params["embed"], h)))  # (B, T, V)
    else:
        rows.append(("logits", jnp.einsum("BTD,DV->BTV", h, params["lm_head"]["kernel"])))
    return rows


def _vit(params: Tree, batch: dict[str, Any], config: ViTConfig, task: str) -> list:
    from bigmodel_jax.models.vit import patch_embed
    from reference_numpy.models.vit import block_spec, check_pixels

    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    B = px.shape[0]
    tokens = patch_embed(params["patch_embed"], px, config.patch_size)  # (B, N, D)
    cls = jnp.broadcast_to(params["cls_token"], (B, 1, config.d_model))
    x = jnp.concatenate([cls, tokens], axis=1)  # (B, N + 1, D)
    x = x + position_embedding(params["position"], jnp.arange(config.max_len))[None]
    rows: list = [("embeddings", x)]
    x = _blocks(rows, "", params["layers"], x, block_spec(config), config.n_layers)
    h = layer_norm(params["final_norm"], x, config.norm_eps)  # (B, N + 1, D)
    rows.append(("final_norm", h))
    if task == "base":
        rows.append(("last_hidden_state", h))
        if config.pooler:
            rows.append(("pooler_output", linear(params["pooler"], h[:, 0], "tanh")))
    else:
        rows.append(("logits", linear(params["head"], h[:, 0])))  # (B, C)
    return rows


def _seq2seq(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, task: str) -> list:
    from bigmodel_jax.models import seq2seq as s2s
    from reference_numpy.models.seq2seq import check_source, check_target, decoder_spec, encoder_spec

    ids, _ = check_source(batch, config)
    check_target(batch, config, ids.shape[0])
    mask = as_bool_mask(batch.get("attention_mask"))
    x = s2s._embed(params["embed"], batch["input_ids"], config)  # (B, S, D)
    rows: list = [("encoder.embeddings", x)]
    enc = _blocks(rows, "encoder.", params["encoder"]["layers"], x, encoder_spec(config), config.n_layers,
                  key_padding_mask=mask)
    if config.prenorm:
        enc = layer_norm(params["encoder"]["final_norm"], enc, config.norm_eps)
        rows.append(("encoder.final_norm", enc))
    table = params["embed"] if config.share_embeddings else params["target_embed"]
    y = s2s._embed(table, batch["decoder_input_ids"], config)  # (B, T, D)
    rows.append(("decoder.embeddings", y))
    y = _blocks(rows, "decoder.", params["decoder"]["layers"], y, decoder_spec(config), config.decoder_layers,
                enc=enc, key_padding_mask=as_bool_mask(batch.get("decoder_attention_mask")),
                enc_padding_mask=mask)
    if config.prenorm:
        y = layer_norm(params["decoder"]["final_norm"], y, config.norm_eps)
        rows.append(("decoder.final_norm", y))
    if task == "base":
        rows.append(("last_hidden_state", y))
    else:
        rows.append(("logits", s2s.output_logits(params, y, config)))  # (B, T, V)
    return rows


def trace(config: Config, params: Tree, batch: dict[str, Any], task: str) -> Trace:
    """The layer-by-layer trace of the JAX model ``config`` with ``params`` (NumPy or JAX tree)
    on ``batch``; rows and ``task`` as in ``reference_numpy.trace.trace``. float64 needs x64."""
    from bigmodel_jax.tree import to_jax

    params = to_jax(params)
    batch = {k: (None if v is None else jnp.asarray(v)) for k, v in batch.items()}
    if isinstance(config, BertConfig):
        rows = _bert(params, batch, config, task)
    elif isinstance(config, GPTConfig):
        rows = _gpt(params, batch, config, task)
    elif isinstance(config, ViTConfig):
        rows = _vit(params, batch, config, task)
    elif isinstance(config, Seq2SeqConfig):
        rows = _seq2seq(params, batch, config, task)
    else:
        raise TypeError(f"no trace for config type {type(config).__name__}")
    return [(name, np.asarray(jax.device_get(a))) for name, a in rows]
