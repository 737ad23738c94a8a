"""Token embeddings (and the tied output head), learned positions, sinusoidal positions.

Dims: B batch, T time, D model width, V vocabulary, M = max_len (rows of a position table).

    token embedding     y[..., :] = E[ids[...]]          E: (V, D)
    tied output head    logits    = x @ E^T              (..., D) -> (..., V)
    learned positions   y[..., :] = P[positions[...]]    P: (M, D)

A lookup's gradient is a scatter-add: every occurrence of id ``v`` adds its ``dy`` row into
``dE[v]`` (``np.add.at``; plain fancy-index assignment would keep only the last occurrence of a
repeated id). A model that ties the output head to the input embedding adds the two gradient
trees (``tree_add``), as llm.c accumulates into one buffer.

Ids and positions carry no gradient: backward returns ``None`` in the ``dx`` slot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import is_tracer, check_array, check_ids, check_same_dtype
from reference_numpy.qweight import dense, take_rows  # table[ids], or a quantised table's rows
from reference_numpy.speed.contract import rows_matmul

Params = dict[str, np.ndarray]

LAYOUTS = ("interleaved", "concat")


def init_embedding(
    rng: np.random.Generator, n: int, d_model: int, *, std: float = 0.02, dtype: Any = np.float32
) -> Params:
    """``{"embedding": (n, D)}`` drawn from Normal(0, std) (GPT-2's 0.02 by default)."""
    return {"embedding": (rng.standard_normal((n, d_model)) * std).astype(dtype)}


def _table(params: Params, name: str) -> np.ndarray:
    if "embedding" not in params:
        raise ValueError(f"{name} params must be {{'embedding': (rows, D)}}, got keys {sorted(params)}")
    table = params["embedding"]
    check_array("embedding", table, ndim=2, kind="float")
    return table


def _scatter_add(table: np.ndarray, index: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dtable (rows, D) with ``dy[..., :]`` added into row ``index[...]``, repeats summed."""
    D = table.shape[1]
    dtable = np.zeros_like(table)
    np.add.at(dtable, index.reshape(-1), dy.reshape(-1, D))
    return dtable


# --- token embedding --------------------------------------------------------------------------


def embedding_forward(params: Params, ids: np.ndarray) -> tuple[np.ndarray, Any]:
    """ids: (...) ints in [0, V) -> y: (..., D); params {embedding: (V, D)}."""
    E = _table(params, "token embedding")
    check_ids("ids", ids, E.shape[0])
    ids = np.asarray(ids)
    return take_rows(E, ids), ids


def embedding_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[None, Params]:
    """dy: (..., D) -> (None, {embedding: (V, D)}); repeated ids accumulate."""
    ids = cache
    E = params["embedding"]
    check_array("dy", dy, (*ids.shape, E.shape[1]))
    return None, {"embedding": _scatter_add(E, ids, dy)}


def embedding_attend(params: Params, x: np.ndarray) -> tuple[np.ndarray, Any]:
    """Tied output head: x (..., D) -> logits (..., V) = x @ E^T; params {embedding: (V, D)}."""
    E = _table(params, "tied output head")
    check_array("x", x, kind="float")
    if x.ndim < 1 or x.shape[-1] != E.shape[1]:
        raise ValueError(f"x must have shape (..., D) = (..., {E.shape[1]}) to match the embedding, got {x.shape}")
    check_same_dtype(x=x, embedding=E)
    return rows_matmul(x, dense(E).T), x


def embedding_attend_backward(params: Params, cache: Any, dlogits: np.ndarray) -> tuple[np.ndarray, Params]:
    """dlogits: (..., V) -> dx: (..., D), grads {embedding: (V, D)}."""
    x = cache
    E = params["embedding"]
    D, V = E.shape[1], E.shape[0]
    dE = dlogits.reshape(-1, V).T @ x.reshape(-1, D)  # (V, N) @ (N, D)
    return rows_matmul(dlogits, E), {"embedding": dE}


# --- learned positions ------------------------------------------------------------------------


def check_positions(positions: Any, max_len: int) -> None:
    """``positions``: (T,) or (B, T) ints in [0, max_len) (shared by both implementations).

    Value checks are skipped for a JAX tracer (no value at trace time; see the JAX module).
    """
    check_array("positions", positions, ndim=(1, 2), kind="int")
    if is_tracer(positions) or np.size(positions) == 0:
        return
    p = np.asarray(positions)
    if p.min() < 0:
        raise ValueError(f"positions must be >= 0, found {int(p.min())}")
    if p.max() >= max_len:
        raise ValueError(
            f"positions must be < max_len = {max_len}, found {int(p.max())}: the sequence is longer "
            f"than the model supports ({max_len} positions)"
        )


def position_embedding_forward(params: Params, positions: np.ndarray) -> tuple[np.ndarray, Any]:
    """positions: (T,) or (B, T) ints in [0, M) -> y: (T, D) or (B, T, D); params {embedding: (M, D)}.

    A (T,) result is usually broadcast-added to (B, T, D) activations; backward accepts that
    broadcast ``dy`` and sums the extra leading axes.
    """
    P = _table(params, "position embedding")
    check_positions(positions, P.shape[0])
    positions = np.asarray(positions)
    return take_rows(P, positions), positions


def position_embedding_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[None, Params]:
    """dy: (..., *positions.shape, D) -> (None, {embedding: (M, D)}); leading extra axes summed."""
    positions = cache
    P = params["embedding"]
    want = (*positions.shape, P.shape[1])
    if dy.shape[dy.ndim - len(want):] != want:
        raise ValueError(f"dy must have shape (..., {', '.join(map(str, want))}), got {dy.shape}")
    dy = dy.reshape(-1, *want).sum(axis=0)  # fold broadcast batch axes
    return None, {"embedding": _scatter_add(P, positions, dy)}


# --- sinusoidal positions ---------------------------------------------------------------------


def check_sinusoidal_args(d_model: int, layout: str, base: float) -> None:
    """Shared by both implementations."""
    if int(d_model) != d_model or d_model < 1:
        raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not base > 0:
        raise ValueError(f"base must be positive, got {base!r}")


def sinusoidal_inverse_frequencies(d_model: int, base: float = 10000.0) -> np.ndarray:
    """``w_i = base^(-2i / D)`` for ``i < ceil(D / 2)``, float64, shape ``(ceil(D/2),)``."""
    return base ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)


def sinusoidal_positions(
    positions: np.ndarray, d_model: int, dtype: Any = np.float32, *, layout: str = "interleaved",
    base: float = 10000.0,
) -> np.ndarray:
    """positions: (...) ints -> table (..., D) of fixed (parameterless) position codes.

    Vaswani et al. 2017, with ``w_i = base^(-2i / D)``::

        "interleaved":  y[..., 2i] = sin(t w_i),  y[..., 2i + 1] = cos(t w_i)   (the paper's equations)
        "concat":       y = [sin(t w_0), sin(t w_1), ... | cos(t w_0), cos(t w_1), ...]   (HF Marian)

    For odd D the sin half gets one more channel. The angles are computed in float64 and the
    table cast to ``dtype`` once (the JAX twin does the same when x64 is on), so float32 tables
    agree to one rounding even at large ``t``. Nothing here is differentiable, hence no
    forward/backward pair: a caller adds the table to its activations.
    """
    check_array("positions", positions, kind="int")
    check_sinusoidal_args(d_model, layout, base)
    w = sinusoidal_inverse_frequencies(d_model, base)  # (ceil(D/2),)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * w  # (..., ceil(D/2))
    n_cos = d_model // 2
    sin, cos = np.sin(angle), np.cos(angle[..., :n_cos])
    if layout == "concat":
        table = np.concatenate([sin, cos], axis=-1)
    else:
        table = np.empty((*angle.shape[:-1], d_model))
        table[..., 0::2] = sin
        table[..., 1::2] = cos
    return table.astype(dtype)
