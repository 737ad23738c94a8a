"""Cases for token embeddings, the tied output head, learned and sinusoidal positions.

Ids are drawn from a vocabulary smaller than the number of tokens, so repeats (whose gradients
must accumulate) are certain. Lookups have no differentiable input: ``inputs`` is ``{}`` and
only the table is differentiated, unless a case adds a float ``x``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bigmodel_jax.layers import embeddings as jemb
from bigmodel_apps.parity.harness import CaseData, register
from reference_numpy.layers import embeddings as remb
from reference_numpy.tree import tree_add

_embed_jit = jax.jit(jemb.embed)
_attend_jit = jax.jit(jemb.attend)
_position_jit = jax.jit(jemb.position_embedding)
_sinusoidal_jit = jax.jit(jemb.sinusoidal_positions, static_argnames=("d_model", "dtype", "layout", "base"))


def _table(rng: np.random.Generator, n: int, d_model: int, dtype: Any) -> dict[str, np.ndarray]:
    return {"embedding": rng.standard_normal((n, d_model)).astype(dtype)}


@register("embedding", ({}, {"vocab_size": 2, "batch": 1, "T": 1}, {"vocab_size": 3, "T": 6}))
def embedding_case(
    rng: np.random.Generator, dtype: Any, vocab_size: int = 5, d_model: int = 4, batch: int = 2, T: int = 5,
) -> CaseData:
    params = _table(rng, vocab_size, d_model, dtype)
    ids = rng.integers(0, vocab_size, size=(batch, T))
    return CaseData(
        params=params,
        inputs={},
        ref_forward=lambda p, i: remb.embedding_forward(p, ids),
        ref_backward=lambda p, c, dy: ({}, remb.embedding_backward(p, c, dy)[1]),
        jax_forward=lambda p, i: _embed_jit(p, ids),
    )


@register("embedding_attend", ({"tied": False}, {"tied": True}, {"tied": True, "batch": 1, "T": 1}))
def embedding_attend_case(
    rng: np.random.Generator, dtype: Any, tied: bool = False, vocab_size: int = 6, d_model: int = 4,
    batch: int = 2, T: int = 3,
) -> CaseData:
    """logits = x @ E^T; ``tied``: logits = (E[ids] + x) @ E^T, so both uses of E add up."""
    params = _table(rng, vocab_size, d_model, dtype)
    x = rng.standard_normal((batch, T, d_model)).astype(dtype)
    ids = rng.integers(0, vocab_size, size=(batch, T))

    def ref_forward(p, i):
        h, c_embed = i["x"], None
        if tied:
            e, c_embed = remb.embedding_forward(p, ids)
            h = e + h
        logits, c_head = remb.embedding_attend(p, h)
        return logits, (c_embed, c_head)

    def ref_backward(p, cache, dlogits):
        c_embed, c_head = cache
        dx, grads = remb.embedding_attend_backward(p, c_head, dlogits)
        if tied:
            grads = tree_add(grads, remb.embedding_backward(p, c_embed, dx)[1])
        return {"x": dx}, grads

    def jax_forward(p, i):
        h = _embed_jit(p, ids) + i["x"] if tied else i["x"]
        return _attend_jit(p, h)

    return CaseData(params=params, inputs={"x": x}, ref_forward=ref_forward, ref_backward=ref_backward,
                    jax_forward=jax_forward)


@register("position_embedding", ({"batched": False}, {"batched": True}, {"batched": False, "T": 1, "batch": 1}))
def position_embedding_case(
    rng: np.random.Generator, dtype: Any, batched: bool = False, max_len: int = 8, d_model: int = 4,
    batch: int = 2, T: int = 5,
) -> CaseData:
    """y = x + P[positions]; (T,) positions broadcast over the batch, (B, T) ones may repeat."""
    params = _table(rng, max_len, d_model, dtype)
    x = rng.standard_normal((batch, T, d_model)).astype(dtype)
    positions = rng.integers(0, max_len, size=(batch, T)) if batched else np.arange(T)

    def ref_forward(p, i):
        pe, c = remb.position_embedding_forward(p, positions)
        return i["x"] + pe, c

    return CaseData(
        params=params,
        inputs={"x": x},
        ref_forward=ref_forward,
        ref_backward=lambda p, c, dy: ({"x": dy}, remb.position_embedding_backward(p, c, dy)[1]),
        jax_forward=lambda p, i: i["x"] + _position_jit(p, positions),
    )


@register(
    "sinusoidal_positions",
    ({"layout": "interleaved"}, {"layout": "concat"}, {"layout": "interleaved", "d_model": 7, "start": 1000},
     {"layout": "concat", "d_model": 5, "start": 3}),
)
def sinusoidal_positions_case(
    rng: np.random.Generator, dtype: Any, layout: str = "interleaved", d_model: int = 8, batch: int = 2,
    T: int = 5, start: int = 0,
) -> CaseData:
    """y = x + PE(start + arange(T)): parameterless, so only the table's values are compared."""
    x = rng.standard_normal((batch, T, d_model)).astype(dtype)
    positions = start + np.arange(T)
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: (i["x"] + remb.sinusoidal_positions(positions, d_model, dtype, layout=layout), None),
        ref_backward=lambda p, c, dy: ({"x": dy}, {}),
        jax_forward=lambda p, i: i["x"] + _sinusoidal_jit(positions, d_model=d_model, dtype=dtype, layout=layout),
    )
