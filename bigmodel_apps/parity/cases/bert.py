"""BERT, each head: the output and every gradient leaf of the reference vs JAX.

The cotangent is random over the head's whole output, so every path (the head, the pooler when
the head reads it, each post-norm block, the embedding LayerNorm and all three embedding tables,
the tied MLM decoder) is exercised, not just the loss. For the "base" head the output compared is
``concat([last_hidden_state, pooler_output[:, None]], axis=1)`` (B, T + 1, D), so both outputs and
their cotangents take part.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from bigmodel_apps.parity.harness import CaseData, register, register_trajectory
from bigmodel_jax.models import bert as jbert
from bigmodel_jax.tree import to_jax
from reference_numpy import configs
from reference_numpy.models import bert as rbert
from reference_numpy.tolerances import MODEL_PARITY
from reference_numpy.tree import tree_leaves_with_path, tree_set

DEFAULT_OPTIONS = (
    {"head": "mlm", "pad": True},
    {"head": "base", "pad": True},
    {"head": "sequence_classification", "pad": True},
    {"head": "token_classification"},
    {"head": "question_answering", "pad": True},
)


def perturb_bert_params(params: dict, rng: np.random.Generator, d_model: int) -> dict:
    """Move every norm scale and every bias away from their 1 / 0 init, so a mix-up between them
    (or a dropped gradient) cannot hide; and grow the block kernels from N(0, 0.02) to
    ~N(0, 1/fan_in). With the tiny init every softmax row is nearly flat and the attention branch
    carries ~1e-2 of the signal: the q / k gradients are then ~1e-3 of the others (at the
    finite-difference noise floor), and an error in the softmax backward would barely show."""
    for path, leaf in list(tree_leaves_with_path(params)):
        if path.endswith(("/scale", "/bias")):
            tree_set(params, path, (leaf + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
        elif path.startswith("layers/") and path.endswith("/kernel"):
            # fan-in: D for every attention kernel (H E = D for out); the In of an MLP (L, In, Out)
            fan_in = d_model if path.startswith("layers/attn/") else leaf.shape[1]
            grown = leaf + rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
            tree_set(params, path, grown.astype(leaf.dtype))
    return params


def bert_batch(
    rng: np.random.Generator, config: Any, batch: int, length: int, pad: bool,
    attention_mask: Any = None, token_types: bool = True,
) -> dict:
    """input_ids, random token_type_ids and (``pad``: right padding in the first row; or the
    explicit ``attention_mask``) an attention mask, all (B, T)."""
    out = {"input_ids": rng.integers(0, config.vocab_size, size=(batch, length))}
    if token_types:
        out["token_type_ids"] = rng.integers(0, config.type_vocab_size, size=(batch, length))
    if attention_mask is not None:
        out["attention_mask"] = np.asarray(attention_mask, dtype=np.int64).reshape(batch, length)
    elif pad:
        mask = np.ones((batch, length), dtype=np.int64)
        mask[0, length // 2 + 1:] = 0  # right padding (BERT's usual side) in the first row
        out["attention_mask"] = mask
    return out


def bert_labels(rng: np.random.Generator, config: Any, batch: dict, head: str) -> dict:
    """The head's targets for ``batch`` (a copy with labels / positions added)."""
    B, T = batch["input_ids"].shape
    out = dict(batch)
    if head == "question_answering":
        out["start_positions"] = rng.integers(0, T, size=(B,))
        out["end_positions"] = rng.integers(0, T + 1, size=(B,))  # T: ignored (outside the window)
    elif head == "sequence_classification":
        out["labels"] = rng.integers(0, config.num_labels, size=(B,))
    else:
        n = config.vocab_size if head == "mlm" else config.num_labels
        labels = rng.integers(0, n, size=(B, T))
        labels[rng.random((B, T)) < 0.4] = -100  # MLM-style: most positions ignored
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        out["labels"] = labels
    return out


def _config(preset: str, dtype: Any, overrides: dict) -> Any:
    return dataclasses.replace(configs.preset(preset, **overrides), dtype=np.dtype(dtype).name, dropout=0.0)


@register("bert", DEFAULT_OPTIONS)
def bert_case(
    rng: np.random.Generator, dtype: Any, preset: str = "bert-tiny", *, head: str = "mlm", batch: int = 2,
    length: int = 5, pad: bool = False, attention_mask: Any = None, token_types: bool = True,
    **overrides: Any,
) -> CaseData:
    """``attention_mask``: an explicit (batch, length) 0/1 mask (overrides ``pad``)."""
    config = _config(preset, dtype, overrides)
    params = perturb_bert_params(rbert.init(config, rng, head), rng, config.d_model)
    data = bert_batch(rng, config, batch, length, pad, attention_mask, token_types)

    if head == "base":
        def ref_forward(p, i):
            (h, pooled), cache = rbert.forward_with_cache(p, data, config, "base")
            return np.concatenate([h, pooled[:, None]], axis=1), cache

        def ref_backward(p, cache, dy):
            return {}, rbert.backward(p, cache, (dy[:, :-1], dy[:, -1]), config, "base")

        def jax_forward(p, i):
            h, pooled = jbert.forward(p, data, config, "base")
            return jnp.concatenate([h, pooled[:, None]], axis=1)
    else:
        def ref_forward(p, i):
            return rbert.forward_with_cache(p, data, config, head)

        def ref_backward(p, cache, dy):
            return {}, rbert.backward(p, cache, dy, config, head)

        def jax_forward(p, i):
            return jbert.forward(p, data, config, head)

    return CaseData(params=params, inputs={}, ref_forward=ref_forward, ref_backward=ref_backward,
                    jax_forward=jax_forward, tolerances=MODEL_PARITY)


@register_trajectory("bert")
def bert_trajectory(dtype: Any, preset: str = "bert-tiny", head: str = "mlm", **overrides: Any):
    """(params, ref_lg, jax_lg) for ``adamw_trajectory``: a right-padded batch with the head's
    targets (some labels ignored)."""
    config = _config(preset, dtype, overrides)
    rng = np.random.default_rng(3)
    params = rbert.init(config, rng, head)
    batch = bert_labels(rng, config, bert_batch(rng, config, 2, 6, pad=True), head)
    jbatch = to_jax(batch)
    return (params, lambda p: rbert.loss_and_grad(p, batch, config, head),
            lambda p: jbert.loss_and_grad(p, jbatch, config, head))
