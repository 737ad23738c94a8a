"""Masked-language-model corruption (BERT, Devlin et al. 2019, section 3.1).

Dims: B batch, T time (any shape works; the functions are element-wise).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from reference_numpy.losses import IGNORE_INDEX


def special_tokens_mask(ids: Any, special_ids: Iterable[int]) -> np.ndarray:
    """Boolean mask (same shape as ``ids``), True where the id is one of ``special_ids``
    (e.g. ``tokenizer.all_special_ids``: [CLS], [SEP], [PAD], ...)."""
    return np.isin(np.asarray(ids), np.fromiter(special_ids, dtype=np.int64))


def mask_tokens(
    ids: Any,
    special_mask: Any,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    prob: float = 0.15,
    *,
    attention_mask: Any = None,
    pad_id: int | None = None,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: pick positions, corrupt them, and label only them.

    Each position that is not special (``special_mask``), not padding (``attention_mask == 0`` or
    ``ids == pad_id``, when given) is selected independently with probability ``prob``. A selected
    position becomes ``mask_id`` with probability ``mask_fraction`` (0.8), a token drawn uniformly
    from ``[0, vocab_size)`` with probability ``random_fraction`` (0.1; uniform over the whole
    vocabulary, as HF's ``DataCollatorForLanguageModeling``), and keeps its token otherwise (0.1).
    Padding should also be marked in ``special_mask``; ``attention_mask`` / ``pad_id`` are a
    second guard so a pad can never be selected.

    Args:
        ids: (B, T) int token ids in [0, vocab_size).
        special_mask: (B, T) bool, True at positions that must never be selected.
        rng: the source of randomness (``np.random.default_rng(seed)``).
        mask_id: the [MASK] token id.
        vocab_size: V, the range of random replacement tokens.
        prob: selection probability.
        attention_mask: optional (B, T), 0 at padding.
        pad_id: optional pad id; positions holding it are never selected.
    Returns:
        ``(input_ids, labels)``, both (B, T) with the dtype of ``ids``: the corrupted inputs, and the
        original ids at selected positions with ``-100`` everywhere else.
    """
    ids = np.asarray(ids)
    special = np.asarray(special_mask)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
    if special.shape != ids.shape or special.dtype != np.bool_:
        raise ValueError(f"special_mask must be a bool array shaped like ids {ids.shape}, "
                         f"got {special.dtype} {special.shape}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must lie in [0, 1], got {prob}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1 + 1e-12:
        raise ValueError(f"mask_fraction={mask_fraction} and random_fraction={random_fraction} must be "
                         "non-negative and sum to at most 1")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size={vocab_size}), found {int(ids.min())}..{int(ids.max())}")
    allowed = ~special
    if attention_mask is not None:
        am = np.asarray(attention_mask)
        if am.shape != ids.shape:
            raise ValueError(f"attention_mask must be shaped like ids {ids.shape}, got {am.shape}")
        allowed &= am.astype(bool)
    if pad_id is not None:
        allowed &= ids != pad_id

    selected = (rng.random(ids.shape) < prob) & allowed
    # One uniform draw splits the selected positions into mask / random / keep.
    action = rng.random(ids.shape)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_tokens = rng.integers(0, vocab_size, size=ids.shape, dtype=np.int64).astype(ids.dtype)

    inputs = np.where(to_mask, np.asarray(mask_id, dtype=ids.dtype), ids)
    inputs = np.where(to_random, random_tokens, inputs)
    labels = np.where(selected, ids, np.asarray(IGNORE_INDEX, dtype=np.int64)).astype(
        ids.dtype if ids.dtype.kind == "i" else np.int64)
    return inputs, labels
