"""Whole-model cases: logits and every gradient leaf of the reference vs JAX.

The cotangent is a random ``dlogits``, so every path through the model (embeddings, each block,
the final norm, the head) is exercised, not just the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bigmodel_apps.parity.harness import CaseData, register, register_trajectory
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.tree import to_jax
from reference_numpy import configs
from reference_numpy.models import gpt as rgpt
from reference_numpy.tolerances import MODEL_PARITY


def _token_batch(rng: np.random.Generator, config: Any, batch: int, length: int, pad: bool) -> dict:
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    out = {"input_ids": ids}
    if pad:
        mask = np.ones((batch, length), dtype=np.int64)
        mask[0, : length // 2] = 0  # left padding in the first row
        out["attention_mask"] = mask
    return out


@register("gpt", ({"preset": "gpt2-tiny"}, {"preset": "llama-tiny", "pad": True}))
def gpt_case(
    rng: np.random.Generator, dtype: Any, preset: str = "gpt2-tiny", *, batch: int = 2,
    length: int = 5, pad: bool = False, **overrides: Any,
) -> CaseData:
    config = dataclasses.replace(configs.preset(preset, **overrides), dtype=np.dtype(dtype).name, dropout=0.0)
    params = rgpt.init(config, rng)
    # Random (not 1/0) norm scales and biases, so a mix-up between them cannot hide.
    for path in ("final_norm",):
        params[path] = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params[path].items()}
    data = _token_batch(rng, config, batch, length, pad)
    return CaseData(
        params=params,
        inputs={},
        ref_forward=lambda p, i: rgpt.forward_with_cache(p, data, config),
        ref_backward=lambda p, c, dy: ({}, rgpt.backward(p, c, dy, config)),
        jax_forward=lambda p, i: jgpt.forward(p, data, config),
        tolerances=MODEL_PARITY,
    )


@register_trajectory("gpt")
def gpt_trajectory(dtype: Any, preset: str = "llama-tiny"):
    """(params, ref_lg, jax_lg) for ``adamw_trajectory``; labels with some ignored positions."""
    config = dataclasses.replace(configs.preset(preset), dtype=np.dtype(dtype).name, dropout=0.0)
    rng = np.random.default_rng(3)
    params = rgpt.init(config, rng)
    batch = _token_batch(rng, config, 2, 6, pad=False)
    batch["labels"] = batch["input_ids"].copy()
    batch["labels"][1, :2] = -100
    jbatch = to_jax(batch)
    return (params, lambda p: rgpt.loss_and_grad(p, batch, config),
            lambda p: jgpt.loss_and_grad(p, jbatch, config))
