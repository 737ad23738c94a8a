"""Cases for the Transformer block: pre/post-norm, layer/RMS norm, plain/gated MLP, causal,
RoPE, cross-attention, explicit dropout masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_jax.layers.block import block
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers.attention import init_attention
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.dropout import dropout_mask
from reference_numpy.layers.mlp import init_mlp


def _norm_params(rng: np.random.Generator, d: int, rms: bool, dtype: Any) -> dict[str, np.ndarray]:
    # away from (1, 0) so a swapped or missing norm parameter shows
    p = {"scale": (1 + 0.2 * rng.standard_normal(d)).astype(dtype)}
    if not rms:
        p["bias"] = (0.2 * rng.standard_normal(d)).astype(dtype)
    return p


def init_block(rng: np.random.Generator, d: int, h: int, k: int, f: int, spec: BlockSpec, *,
               cross: bool, bias: bool, dtype: Any) -> dict[str, Any]:
    """A block's tree with randomised norms and biases (test parameters, not a training init)."""
    rms = spec.norm == "rms"
    p = {
        "attn_norm": _norm_params(rng, d, rms, dtype),
        "attn": init_attention(rng, d, h, k, bias=bias, dtype=dtype),
        "mlp_norm": _norm_params(rng, d, rms, dtype),
        "mlp": init_mlp(rng, d, f, gated=spec.gated_mlp, bias=bias, dtype=dtype),
    }
    if cross:
        p["cross_norm"] = _norm_params(rng, d, rms, dtype)
        p["cross_attn"] = init_attention(rng, d, h, h, bias=bias, dtype=dtype)
    return p


@register("block", (
    {"prenorm": True},
    {"prenorm": False},
    {"prenorm": True, "norm": "rms", "gated_mlp": True, "rope": True, "n_kv_heads": 1, "bias": False},
    {"prenorm": False, "cross": True, "pad": True},
    {"prenorm": True, "cross": True, "causal": True, "dropout": 0.25},
))
def block_case(
    rng: np.random.Generator, dtype: Any, *, prenorm: bool = True, norm: str = "layer",
    gated_mlp: bool = False, causal: bool = True, rope: bool = False, cross: bool = False,
    pad: bool = False, dropout: float = 0.0, bias: bool = True, batch: int = 2, length: int = 3,
    src_length: int = 4, d_model: int = 8, n_heads: int = 2, n_kv_heads: int | None = None, d_ff: int = 12,
) -> CaseData:
    spec = BlockSpec(prenorm=prenorm, norm=norm, norm_eps=1e-5, gated_mlp=gated_mlp,
                     activation="silu" if gated_mlp else "gelu", causal=causal,
                     rope_theta=10000.0 if rope else None, dropout_rate=dropout)
    k = n_heads if n_kv_heads is None else n_kv_heads
    params = init_block(rng, d_model, n_heads, k, d_ff, spec, cross=cross, bias=bias, dtype=dtype)
    x = rng.standard_normal((batch, length, d_model)).astype(dtype)
    inputs = {"x": x}
    kw: dict[str, Any] = {}
    if cross:
        inputs["enc"] = rng.standard_normal((batch, src_length, d_model)).astype(dtype)
    if pad:
        m = np.ones((batch, src_length if cross else length), bool)
        m[0, -1] = False
        kw["enc_padding_mask" if cross else "key_padding_mask"] = m
    masks = {}
    if dropout:
        masks["attn_probs"] = dropout_mask(rng, (batch, n_heads, length, length), dropout)
        masks["attn_out"] = dropout_mask(rng, (batch, length, d_model), dropout)
        masks["mlp_out"] = dropout_mask(rng, (batch, length, d_model), dropout)
        if cross:
            masks["cross_probs"] = dropout_mask(rng, (batch, n_heads, length, src_length), dropout)
            masks["cross_out"] = dropout_mask(rng, (batch, length, d_model), dropout)
    kw["masks"] = masks

    def ref_bwd(p, c, dy):
        d, g = block_backward(p, c, dy)
        return ({"x": d[0], "enc": d[1]} if cross else {"x": d}), g

    return CaseData(
        params=params,
        inputs=inputs,
        ref_forward=lambda p, i: block_forward(p, i["x"], spec, enc=i.get("enc"), **kw),
        ref_backward=ref_bwd,
        jax_forward=lambda p, i: block(p, i["x"], spec, enc=i.get("enc"), **kw),
    )
