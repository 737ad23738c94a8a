"""Rotary position embeddings (RoPE, Su et al. 2021) as a forward/backward pair.

Dims: B batch, T time, H heads, E head dim (even), P = E / 2 rotated pairs.

Each pair of features ``(a_i, b_i)`` of a head vector at position ``t`` is rotated by the angle
``t * w_i`` with ``w_i = theta^(-2i / E)``:

    a'_i = a_i cos(t w_i) - b_i sin(t w_i)
    b'_i = b_i cos(t w_i) + a_i sin(t w_i)

so ``<rope(q, t), rope(k, s)>`` depends on ``t - s`` only. Which features form a pair is the
*layout*, and checkpoints differ:

* ``"half"``: pairs ``(i, i + E/2)`` -- HF/Llama's ``rotate_half``. Meta's original Llama
  weights use the other layout; HF's conversion script permutes q/k kernels to get this one.
* ``"interleaved"``: pairs ``(2i, 2i + 1)`` -- GPT-J and Meta's original Llama code (a complex
  multiplication on adjacent features).

A rotation is orthogonal, so backward is the rotation by the negative angle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import check_array

LAYOUTS = ("half", "interleaved")


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """``w_i = theta^(-2i / E)`` for ``i < E/2``, float64, shape ``(P,)``.

    Computed on the host in float64 on both sides (the JAX twin calls this too) and cast to the
    working dtype afterwards, so float32 runs differ only by that one rounding.
    """
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def check_rope_args(head_dim: int, theta: float, layout: str = "half") -> None:
    """Shared by both implementations: E even, theta positive, a known layout."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim (E = {head_dim}) must be even for rotary embeddings")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_positions(positions: Any, batch: int, time: int) -> None:
    """``positions``: integer array of shape ``(T,)`` or ``(B, T)``."""
    check_array("positions", positions, kind="int")
    if tuple(positions.shape) not in ((time,), (batch, time)):
        raise ValueError(
            f"positions must have shape (T,) = ({time},) or (B, T) = ({batch}, {time}), "
            f"got {tuple(positions.shape)}"
        )


def rope_angles(
    positions: np.ndarray, head_dim: int, theta: float = 10000.0, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """positions: (...) ints -> ``(cos, sin)``, each (..., P) in ``dtype``.

    The angle ``t * w_i`` is formed in ``dtype``, from ``t`` and ``w_i`` each rounded to it.
    """
    check_array("positions", positions, kind="int")
    check_rope_args(head_dim, theta)
    w = rope_inverse_frequencies(head_dim, theta).astype(dtype)  # (P,)
    angle = positions.astype(dtype)[..., None] * w  # (..., P)
    return np.cos(angle), np.sin(angle)


def _pairs(x: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """x: (..., E) -> views ``(a, b)``, each (..., P), the two members of every pair."""
    p = x.shape[-1] // 2
    if layout == "half":
        return x[..., :p], x[..., p:]
    return x[..., 0::2], x[..., 1::2]


def _unpairs(a: np.ndarray, b: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of ``_pairs``: (..., P) twice -> (..., E)."""
    if layout == "half":
        return np.concatenate([a, b], axis=-1)
    return np.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    a, b = _pairs(x, layout)
    return _unpairs(a * cos - b * sin, b * cos + a * sin, layout)


def _angles_for(x: np.ndarray, positions: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) broadcastable against the pairs of x: (B or 1, T, 1, P)."""
    cos, sin = rope_angles(positions, x.shape[-1], theta, x.dtype)  # (T, P) or (B, T, P)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    return cos[:, :, None, :], sin[:, :, None, :]


def rope_forward(
    x: np.ndarray, positions: np.ndarray, *, theta: float = 10000.0, layout: str = "half"
) -> tuple[np.ndarray, Any]:
    """x: (B, T, H, E), positions: (T,) or (B, T) ints -> y: (B, T, H, E), same dtype."""
    check_array("x", x, ("B", "T", "H", "E"), kind="float")
    check_rope_args(x.shape[-1], theta, layout)
    check_positions(positions, x.shape[0], x.shape[1])
    cos, sin = _angles_for(x, positions, theta)
    return _rotate(x, cos, sin, layout), (cos, sin, layout)


def rope_backward(cache: Any, dy: np.ndarray) -> np.ndarray:
    """dy: (B, T, H, E) -> dx: (B, T, H, E); ``R(-angle) = R(angle)^T``."""
    cos, sin, layout = cache
    return _rotate(dy, cos, -sin, layout)
