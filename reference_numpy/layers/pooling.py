"""Sentence embeddings from token states: masked mean pooling and L2 normalisation.

    e = sum_t m_t h_t / max(sum_t m_t, 1e-9)          (B, D)   (sentence-transformers' mean pooling)
    u = e / max(||e||_2, 1e-12)                         (B, D)   (torch.nn.functional.normalize)
"""

from __future__ import annotations

import numpy as np

from reference_numpy.checks import check_array


def mean_pool(h: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """last_hidden_state (B, T, D), attention_mask (B, T) with 1 = token -> mean over tokens (B, D)."""
    check_array("last_hidden_state", h, (None, None, None), kind="float")
    B, T, _ = h.shape
    m = np.asarray(attention_mask)
    check_array("attention_mask", m, (B, T))
    m = m.astype(h.dtype)[..., None]  # (B, T, 1)
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x (..., D) scaled to unit Euclidean norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
