"""The Transformer block (pre/post-norm, optional cross-attention); twin of the reference block.

See ``reference_numpy.layers.block`` for the equations; ``BlockSpec`` is shared.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel_jax.layers.attention import Attention, attention
from bigmodel_jax.layers.dropout import dropout
from bigmodel_jax.layers.mlp import MLP, GatedMLP, gated_mlp, mlp
from bigmodel_jax.layers.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from bigmodel_jax.perf import PerfOptions
from bigmodel_jax.sharding import ACTIVATION_NAMES
from reference_numpy.layers.block import BlockSpec

__all__ = ["Block", "BlockSpec", "block"]


def block(
    params: dict[str, Any],
    x: jax.Array,
    spec: BlockSpec,
    *,
    enc: jax.Array | None = None,
    key_padding_mask: jax.Array | None = None,
    enc_padding_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    masks: dict[str, jax.Array] | None = None,
    intermediates: dict[str, jax.Array] | None = None,
    perf: PerfOptions | None = None,
    cache: dict[str, jax.Array] | None = None,
    cache_pos: Any = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """x: (B, T, D) [, enc: (B, S, D)] -> (B, T, D). ``perf``: layout options of the attention
    and MLP matmuls (``bigmodel_jax.perf``; default: the plain path).

    ``intermediates``: an optional dict filled with each sub-layer's output (the residual stream
    after it) under ``"attn"``, [``"cross"``,] ``"mlp"``, as in the reference ``block_forward``.

    ``cache``: decoding; returns ``(y, new cache)``. This layer's ``{"k", "v"}`` self-attention
    cache, written at slots [cache_pos, cache_pos + T) (``layers.attention.attention``), plus
    ``{"ck", "cv"}``, the cross-attention's projected source, which stands in for ``enc`` (read
    only: the returned cache holds just the new ``{"k", "v"}``).
    """
    masks = masks or {}
    cross = enc is not None or (cache is not None and "ck" in cache)
    new_cache: dict[str, jax.Array] = {}
    if cache is not None and cache_pos is None:
        raise ValueError("a cache needs cache_pos, the slot of the first new token")
    norm = layer_norm if spec.norm == "layer" else rms_norm
    # the residual stream at the block's boundaries is (B, T, D) split over the batch axes only
    # (bigmodel_jax.sharding.use_mesh maps these names), so XLA does not guess a layout for it
    # from the weights'; without that context the constraint is a no-op
    x = nn.with_logical_constraint(x, ACTIVATION_NAMES)

    def drop(name: str, o: jax.Array) -> jax.Array:
        return dropout(o, masks[name], spec.dropout_rate) if name in masks else o

    def sublayer(name: str, h: jax.Array, fn) -> jax.Array:
        if spec.prenorm:
            out = h + drop(name + "_out", fn(norm(params[name + "_norm"], h, spec.norm_eps)))
        else:
            out = norm(params[name + "_norm"], h + drop(name + "_out", fn(h)), spec.norm_eps)
        if intermediates is not None:
            intermediates[name] = out
        return out

    def self_attn(n: jax.Array) -> jax.Array:
        out = attention(
            params["attn"], n, key_padding_mask=key_padding_mask, causal=spec.causal,
            rope_theta=spec.rope_theta, rope_layout=spec.rope_layout, positions=positions,
            dropout_mask=masks.get("attn_probs"), dropout_rate=spec.dropout_rate, perf=perf,
            cache=None if cache is None else {"k": cache["k"], "v": cache["v"]}, cache_pos=cache_pos)
        if cache is None:
            return out
        new_cache.update(out[1])
        return out[0]

    def cross_attn(n: jax.Array) -> jax.Array:
        if cache is None or "ck" not in cache:
            return attention(params["cross_attn"], n, enc, key_padding_mask=enc_padding_mask,
                             dropout_mask=masks.get("cross_probs"), dropout_rate=spec.dropout_rate, perf=perf)
        return attention(params["cross_attn"], n, enc, key_padding_mask=enc_padding_mask, perf=perf,
                         cache={"k": cache["ck"], "v": cache["cv"]})[0]

    h = sublayer("attn", x, self_attn)
    if cross:
        h = sublayer("cross", h, cross_attn)
    mlp_fn = gated_mlp if spec.gated_mlp else mlp
    y = sublayer("mlp", h, lambda n: mlp_fn(params["mlp"], n, activation=spec.activation, perf=perf))
    y = nn.with_logical_constraint(y, ACTIVATION_NAMES)
    return y if cache is None else (y, new_cache)


class Block(nn.Module):
    """Flax linen twin of the block: declares the same tree (``attn_norm``, ``attn``,
    [``cross_norm``, ``cross_attn``], ``mlp_norm``, ``mlp``) and applies ``block`` to it."""

    spec: BlockSpec
    n_heads: int  # H
    d_ff: int  # F
    n_kv_heads: int | None = None  # K (None = H)
    cross: bool = False  # decoder block with cross-attention
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, enc: jax.Array | None = None, *, key_padding_mask=None,
                 enc_padding_mask=None, positions=None) -> jax.Array:
        s = self.spec

        def norm(name: str):
            if s.norm == "layer":
                return LayerNorm(s.norm_eps, dtype=self.dtype, name=name)
            return RMSNorm(s.norm_eps, dtype=self.dtype, name=name)

        def bind(module: nn.Module, *args) -> dict[str, Any]:
            """Create the submodule's parameters and return them as a plain tree. The call only
            needs shapes, so it runs on one token of one sequence (cost negligible)."""
            module(*(a[:1, :1] for a in args))
            return module.variables["params"]

        params = {
            "attn_norm": bind(norm("attn_norm"), x),
            "attn": bind(Attention(self.n_heads, self.n_kv_heads, use_bias=self.use_bias,
                                   dtype=self.dtype, name="attn"), x),
            "mlp_norm": bind(norm("mlp_norm"), x),
        }
        mlp_mod = (GatedMLP(self.d_ff, s.activation, self.use_bias, self.dtype, name="mlp") if s.gated_mlp
                   else MLP(self.d_ff, s.activation, self.use_bias, self.dtype, name="mlp"))
        params["mlp"] = bind(mlp_mod, x)
        if self.cross:
            if enc is None:
                raise ValueError("a cross-attention Block needs enc: (B, S, D)")
            params["cross_norm"] = bind(norm("cross_norm"), x)
            params["cross_attn"] = bind(Attention(self.n_heads, use_bias=self.use_bias, dtype=self.dtype,
                                                  name="cross_attn"), x, enc)
        return block(params, x, s, enc=enc, key_padding_mask=key_padding_mask,
                     enc_padding_mask=enc_padding_mask, positions=positions)
