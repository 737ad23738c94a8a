"""The Transformer block, pre-norm and post-norm, with optional cross-attention.

Pre-norm (GPT-2, Llama, ViT):            Post-norm (BERT, the 2017 Transformer):
    h = x + drop(attn(norm_a(x)))            h = norm_a(x + drop(attn(x)))
    h = h + drop(cross(norm_c(h), enc))      h = norm_c(h + drop(cross(h, enc)))
    y = h + drop(mlp(norm_m(h)))             y = norm_m(h + drop(mlp(h)))

The cross-attention line exists only for decoder blocks (``enc`` given). Dropout masks are
explicit (``masks`` dict; keys ``attn_probs``, ``attn_out``, ``cross_probs``, ``cross_out``,
``mlp_out``), so the reference and JAX can be fed the same ones.

The same block decodes with a KV cache (``kv_cache``, see ``attention_forward``): the full
sequence, a cached prefill and single-token steps are one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from reference_numpy.layers.attention import attention_backward, attention_forward
from reference_numpy.layers.dropout import dropout_backward, dropout_forward
from reference_numpy.layers.mlp import gated_mlp_backward, gated_mlp_forward, mlp_backward, mlp_forward
from reference_numpy.layers.norms import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

Params = dict[str, Any]


@dataclass(frozen=True)
class BlockSpec:
    """Static choices of a block, shared by the reference and JAX blocks."""

    prenorm: bool = True  # norm before each sub-layer (True) or after the residual add (False)
    norm: str = "layer"  # "layer" or "rms"
    norm_eps: float = 1e-5  # epsilon of the three norms
    activation: str = "gelu"  # MLP activation (for a gated MLP: the gate's activation)
    gated_mlp: bool = False  # SwiGLU-style MLP
    causal: bool = False  # causal self-attention (decoders)
    rope_theta: float | None = None  # RoPE on q/k in self-attention when set
    rope_layout: str = "half"  # "half" (HF/Llama) or "interleaved" (GPT-J)
    dropout_rate: float = 0.0  # rate the dropout masks were drawn with

    def __post_init__(self) -> None:
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")


def _norm_fwd(spec: BlockSpec, params: Params, x: np.ndarray) -> tuple[np.ndarray, Any]:
    fwd = layer_norm_forward if spec.norm == "layer" else rms_norm_forward
    return fwd(params, x, eps=spec.norm_eps)


def _norm_bwd(spec: BlockSpec, params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    bwd = layer_norm_backward if spec.norm == "layer" else rms_norm_backward
    return bwd(params, cache, dy)


def _drop_fwd(spec: BlockSpec, masks: dict[str, np.ndarray], name: str, x: np.ndarray) -> tuple[np.ndarray, Any]:
    if name not in masks:
        return x, None
    return dropout_forward(x, masks[name], spec.dropout_rate)


def _drop_bwd(cache: Any, dy: np.ndarray) -> np.ndarray:
    return dy if cache is None else dropout_backward(cache, dy)


def block_forward(
    params: Params,
    x: np.ndarray,
    spec: BlockSpec,
    *,
    enc: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
    enc_padding_mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    masks: dict[str, np.ndarray] | None = None,
    intermediates: dict[str, np.ndarray] | None = None,
    kv_cache: dict[str, np.ndarray] | None = None,
    cache_pos: int | None = None,
) -> tuple[np.ndarray, Any]:
    """x: (B, T, D) [, enc: (B, S, D)] -> y: (B, T, D).

    ``kv_cache``: this layer's decoding cache, ``{"k", "v"}`` (B, S, K, E) of the
    self-attention, written in place at slots [cache_pos, cache_pos + T) (``key_padding_mask``
    then covers the S slots), plus ``{"ck", "cv"}``, the cross-attention's projected source,
    which stands in for ``enc``. Forward only.

    ``intermediates``: an optional dict this call fills with each sub-layer's output, i.e. the
    residual stream after it (pre-norm: ``h + o``; post-norm: the norm of it), under ``"attn"``,
    [``"cross"``,] ``"mlp"`` (``"mlp"`` is ``y``), each (B, T, D). Read by the divergence report.
    """
    masks = masks or {}
    cross = enc is not None or (kv_cache is not None and "ck" in kv_cache)
    if cross and "cross_attn" not in params:
        raise ValueError("enc was given but the block has no cross_attn parameters")
    self_cache = cross_cache = None
    if kv_cache is not None:
        if cache_pos is None:
            raise ValueError("a kv_cache needs cache_pos, the slot of the first new token")
        self_cache = {"k": kv_cache["k"], "v": kv_cache["v"]}
        cross_cache = {"k": kv_cache["ck"], "v": kv_cache["cv"]} if "ck" in kv_cache else None
    attn_kw = dict(key_padding_mask=key_padding_mask, causal=spec.causal, rope_theta=spec.rope_theta,
                   rope_layout=spec.rope_layout, positions=positions,
                   dropout_mask=masks.get("attn_probs"), dropout_rate=spec.dropout_rate,
                   kv_cache=self_cache, cache_pos=cache_pos)
    cross_kw = dict(key_padding_mask=enc_padding_mask, dropout_mask=masks.get("cross_probs"),
                    dropout_rate=spec.dropout_rate, kv_cache=cross_cache)
    mlp_fwd = gated_mlp_forward if spec.gated_mlp else mlp_forward
    c: dict[str, Any] = {"enc": cross}

    def sublayer(name, h, fn):
        """One residual sub-layer in the spec's norm placement; caches under ``name``."""
        if spec.prenorm:
            n, c[name + "_norm"] = _norm_fwd(spec, params[name + "_norm"], h)
            o, c[name] = fn(n)
            o, c[name + "_drop"] = _drop_fwd(spec, masks, name + "_out", o)
            out = h + o
        else:
            o, c[name] = fn(h)
            o, c[name + "_drop"] = _drop_fwd(spec, masks, name + "_out", o)
            out, c[name + "_norm"] = _norm_fwd(spec, params[name + "_norm"], h + o)
        if intermediates is not None:
            intermediates[name] = out
        return out

    h = sublayer("attn", x, lambda n: attention_forward(params["attn"], n, **attn_kw))
    if cross:
        h = sublayer("cross", h, lambda n: attention_forward(params["cross_attn"], n, enc, **cross_kw))
    y = sublayer("mlp", h, lambda n: mlp_fwd(params["mlp"], n, activation=spec.activation))
    return y, (spec, c)


def block_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[Any, Params]:
    """dy: (B, T, D) -> (dx, grads), or ((dx, d_enc), grads) for a block with ``enc``."""
    spec, c = cache
    grads: Params = {}
    d_enc = None
    mlp_bwd = gated_mlp_backward if spec.gated_mlp else mlp_backward

    def sublayer_back(name, param_name, dy, bwd):
        """Backward of ``sublayer``; ``bwd(cache, do) -> (d_in, grads)``."""
        if spec.prenorm:
            do = _drop_bwd(c[name + "_drop"], dy)
            dn, grads[param_name] = bwd(c[name], do)
            dh, grads[name + "_norm"] = _norm_bwd(spec, params[name + "_norm"], c[name + "_norm"], dn)
            return dy + dh
        ds, grads[name + "_norm"] = _norm_bwd(spec, params[name + "_norm"], c[name + "_norm"], dy)
        do = _drop_bwd(c[name + "_drop"], ds)
        dh, grads[param_name] = bwd(c[name], do)
        return ds + dh

    dh = sublayer_back("mlp", "mlp", dy, lambda cc, do: mlp_bwd(params["mlp"], cc, do))
    if c["enc"]:
        def cross_bwd(cc, do):
            nonlocal d_enc
            (dq, d_enc), g = attention_backward(params["cross_attn"], cc, do)
            return dq, g

        dh = sublayer_back("cross", "cross_attn", dh, cross_bwd)
    dx = sublayer_back("attn", "attn", dh, lambda cc, do: attention_backward(params["attn"], cc, do))
    return ((dx, d_enc) if c["enc"] else dx), grads
