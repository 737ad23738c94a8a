"""Token embeddings, the tied output head, learned and sinusoidal positions: JAX twins of
``reference_numpy.layers.embeddings`` (same trees, same equations; see the reference docstring).

Dims: B batch, T time, D model width, V vocabulary, M = max_len.

Ids and positions are checked against the table size when their values are known; under
``jax.jit`` they are tracers, the check is skipped, and an out-of-range index gathers a row of
NaNs (``mode="fill"``) rather than raising: loud, but only after the step has run, so validate
batches before the jitted step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigmodel_jax.perf import PerfOptions, einsum
from bigmodel_jax.quant import take_rows  # jnp.take(mode="fill"), or a quantised table's rows
from reference_numpy.checks import check_array, check_ids
from reference_numpy.layers.embeddings import (
    check_positions,
    check_sinusoidal_args,
    sinusoidal_inverse_frequencies,
)


def embed(params: dict[str, jax.Array], ids: jax.Array) -> jax.Array:
    """ids: (...) ints in [0, V) -> (..., D); params {embedding: (V, D)}."""
    E = params["embedding"]
    check_array("embedding", E, ndim=2, kind="float")
    check_ids("ids", ids, E.shape[0])
    return take_rows(E, ids)


def attend(params: dict[str, jax.Array], x: jax.Array, *, perf: PerfOptions | None = None) -> jax.Array:
    """Tied output head: x (..., D) -> logits (..., V) = x @ E^T (fp32 logits under ``perf``'s
    mixed precision)."""
    E = params["embedding"]
    check_array("x", x, kind="float")
    if x.ndim < 1 or x.shape[-1] != E.shape[1]:
        raise ValueError(
            f"x must have shape (..., D) = (..., {E.shape[1]}) to match the embedding, got {tuple(x.shape)}"
        )
    return einsum("...D,VD->...V", x, E, perf, keep_fp32=True)


def position_embedding(params: dict[str, jax.Array], positions: jax.Array) -> jax.Array:
    """positions: (T,) or (B, T) ints in [0, M) -> (T, D) or (B, T, D); params {embedding: (M, D)}."""
    P = params["embedding"]
    check_array("embedding", P, ndim=2, kind="float")
    check_positions(positions, P.shape[0])
    return take_rows(P, positions)


def sinusoidal_positions(
    positions: jax.Array, d_model: int, dtype: Any = jnp.float32, *, layout: str = "interleaved",
    base: float = 10000.0,
) -> jax.Array:
    """positions: (...) ints -> (..., D) fixed sin/cos codes; ``layout`` "interleaved" | "concat".

    Angles are computed in float64 when x64 is enabled (as the reference always does), else in
    float32, and the table is cast to ``dtype`` once.
    """
    check_array("positions", positions, kind="int")
    check_sinusoidal_args(d_model, layout, base)
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on
    w = jnp.asarray(sinusoidal_inverse_frequencies(d_model, base), dtype=wide)  # (ceil(D/2),)
    t = jnp.asarray(positions).astype(wide)[..., None]  # (..., 1)
    if layout == "concat":
        table = jnp.concatenate([jnp.sin(t * w), jnp.cos(t * w[: d_model // 2])], axis=-1)
    else:
        angle = t * jnp.repeat(w, 2)[:d_model]  # channel j has frequency w[j // 2]
        table = jnp.where(jnp.arange(d_model) % 2 == 0, jnp.sin(angle), jnp.cos(angle))
    return table.astype(dtype)


class Embed(nn.Module):
    """Flax twin of the token embedding; params ``{embedding: (V, D)}``.

    ``__call__(ids)`` looks ids up; ``attend(x)`` is the tied output head sharing the table.
    """

    num_embeddings: int  # V
    features: int  # D
    dtype: Any = jnp.float32  # parameter dtype
    std: float = 0.02  # Normal(0, std) init, as GPT-2

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.initializers.normal(self.std), (self.num_embeddings, self.features), self.dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embed({"embedding": self.embedding}, ids)

    def attend(self, x: jax.Array) -> jax.Array:
        return attend({"embedding": self.embedding}, x)


class PositionEmbedding(nn.Module):
    """Flax twin of learned positions; params ``{embedding: (max_len, D)}``."""

    max_len: int  # M
    features: int  # D
    dtype: Any = jnp.float32  # parameter dtype
    std: float = 0.02

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(self.std), (self.max_len, self.features), self.dtype)
        return position_embedding({"embedding": table}, positions)
