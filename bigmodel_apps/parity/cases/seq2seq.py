"""Encoder-decoder Transformer: logits and every gradient leaf of the reference vs JAX.

The cotangent is a random ``dlogits`` (B, T, V), so every path is exercised: both embeddings
(or the one shared matrix), every encoder block, the cross-attention of every decoder block
(which is how the encoder gets its gradient), the final norms of a pre-norm model and the head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bigmodel_apps.parity.harness import CaseData, register, register_trajectory
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.tree import to_jax
from reference_numpy import configs
from reference_numpy.models import seq2seq as rs2s
from reference_numpy.tolerances import MODEL_PARITY
from reference_numpy.tree import tree_leaves_with_path, tree_set


def seq2seq_batch(
    rng: np.random.Generator, config: Any, batch: int, source_len: int, target_len: int, *,
    pad: bool = False, decoder_pad: bool = False,
) -> dict[str, np.ndarray]:
    """Random ids; ``pad``: right-pad the source of row 0 (and mask it); ``decoder_pad``:
    right-pad the target of the last row (masked keys in the decoder's self-attention, labels
    -100 there)."""
    out = {
        "input_ids": rng.integers(0, config.vocab_size, size=(batch, source_len)),
        "decoder_input_ids": rng.integers(0, config.vocab_size, size=(batch, target_len)),
    }
    out["labels"] = rng.integers(0, config.vocab_size, size=(batch, target_len))
    if pad:
        mask = np.ones((batch, source_len), dtype=np.int64)
        mask[0, (source_len + 1) // 2:] = 0  # keeps at least one real source token
        out["attention_mask"] = mask
    if decoder_pad:
        mask = np.ones((batch, target_len), dtype=np.int64)
        mask[-1, (target_len + 1) // 2:] = 0
        out["decoder_attention_mask"] = mask
        out["labels"] = np.where(mask.astype(bool), out["labels"], -100)
    return out


def perturb_params(params: dict, rng: np.random.Generator) -> dict:
    """Make every path of the model carry a measurable signal (in place; returns ``params``).

    * Norm scales / biases, projection biases and the ``final_logits_bias`` get N(0, 0.1) noise,
      so a mix-up between them (or a dropped bias gradient) cannot hide.
    * Kernels x8 and embeddings x10 (std 0.16 / 0.2 instead of 0.02): at the 0.02 init every
      attention logit is ~0, the maps are uniform, and the encoder's query/key gradients are
      ~1e-6 of the others, below what finite differences resolve (their noise floor is ~1e-9
      absolute). With these sizes the maps are far from uniform and FD agrees to ~1e-7.
    """
    for path, leaf in list(tree_leaves_with_path(params)):
        if path.endswith(("/scale", "/bias")) or path == "final_logits_bias":
            new = leaf + 0.1 * rng.standard_normal(leaf.shape)
        elif path.endswith("/kernel"):
            new = leaf * 8.0
        else:  # the token embedding tables
            new = leaf * 10.0
        tree_set(params, path, new.astype(leaf.dtype))
    return params


@register("seq2seq", (
    {"preset": "seq2seq-tiny"},  # post-norm (the paper), shared embeddings
    {"preset": "seq2seq-tiny", "prenorm": True, "n_decoder_layers": 1},
    {"preset": "seq2seq-tiny", "share_embeddings": False, "n_layers": 1},
    {"preset": "seq2seq-tiny", "pad": True, "decoder_pad": True, "n_kv_heads": 2, "prenorm": True},
    # Marian's options: concat sinusoid layout, a learned logits bias, swish
    {"preset": "seq2seq-tiny", "pad": True, "position_layout": "concat", "final_logits_bias": True,
     "activation": "silu", "n_decoder_layers": 1},
))
def seq2seq_case(
    rng: np.random.Generator, dtype: Any, preset: str = "seq2seq-tiny", *, batch: int = 2,
    source_len: int = 5, target_len: int = 4, pad: bool = False, decoder_pad: bool = False,
    **overrides: Any,
) -> CaseData:
    config = dataclasses.replace(configs.preset(preset, **overrides), dtype=np.dtype(dtype).name, dropout=0.0)
    params = perturb_params(rs2s.init(config, rng), rng)
    data = seq2seq_batch(rng, config, batch, source_len, target_len, pad=pad, decoder_pad=decoder_pad)
    return CaseData(
        params=params,
        inputs={},
        ref_forward=lambda p, i: rs2s.forward_with_cache(p, data, config),
        ref_backward=lambda p, c, dy: ({}, rs2s.backward(p, c, dy, config)),
        jax_forward=lambda p, i: js2s.forward(p, data, config),
        tolerances=MODEL_PARITY,
    )


@register_trajectory("seq2seq")
def seq2seq_trajectory(dtype: Any, preset: str = "seq2seq-tiny"):
    """(params, ref_lg, jax_lg) for ``adamw_trajectory``: padded source and target, smoothed loss."""
    config = dataclasses.replace(configs.preset(preset), dtype=np.dtype(dtype).name, n_layers=1)
    rng = np.random.default_rng(3)
    params = rs2s.init(config, rng)
    batch = seq2seq_batch(rng, config, 2, 5, 4, pad=True, decoder_pad=True)
    jbatch = to_jax(batch)
    return (params, lambda p: rs2s.loss_and_grad(p, batch, config),
            lambda p: js2s.loss_and_grad(p, jbatch, config))
