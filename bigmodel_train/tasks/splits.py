"""Data splits: ``len`` examples and ``batch(indices)`` of model-ready NumPy arrays (HF key names),
and the in-order, padded evaluation batching every task's ``evaluate`` uses.

Dims: N examples, B batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["Split", "ArraySplit", "eval_batches"]


class Split:
    """A data split: ``len`` examples and ``batch(indices) -> dict`` of (B, ...) arrays."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batch(self, indices: Any) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class ArraySplit(Split):
    """A split held in memory as equal-length arrays (N, ...)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"split arrays differ in length: {sizes}")
        self.arrays = arrays

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def batch(self, indices: Any) -> dict[str, np.ndarray]:
        idx = np.asarray(indices)
        return {k: v[idx] for k, v in self.arrays.items()}

    def subset(self, indices: Any) -> ArraySplit:
        idx = np.asarray(indices)
        return ArraySplit({k: v[idx] for k, v in self.arrays.items()})


def eval_batches(split: Split, batch_size: int, max_examples: int = 0) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``(batch, n_valid)`` over the first ``max_examples`` (0: all) examples in order; the last
    batch is padded to ``batch_size`` by repeating its first row (so one compiled shape serves
    every batch); only its first ``n_valid`` rows count."""
    n = len(split) if not max_examples else min(len(split), max_examples)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        valid = idx.size
        if valid < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - valid, idx[0])])
        yield split.batch(idx), valid
