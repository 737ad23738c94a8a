"""Batches: causal-LM packing with document boundaries, padding with attention masks,
deterministic shuffling by (seed, epoch), and deterministic train / validation splits.

Dims: N blocks (or items), B batch, T block length (model context), L padded length.

Packing layout. Documents are joined into one stream ``d0 EOS d1 EOS d2 EOS ...`` (each document
is followed by ``eos_id``; empty documents are skipped). Block ``k`` is the window
``stream[k T : k T + T + 1]`` of T + 1 tokens: the model reads ``block[:-1]`` and predicts
``block[1:]``. Consecutive blocks overlap by one token (block k's last token is block k+1's
first), so every token of the stream except the very first is a prediction target exactly once
and no next-token pair is lost at a block edge. The final partial window is padded with
``pad_id`` (document id -1) unless ``drop_last``.

``document_ids`` (N, T + 1) gives each token's document (the index in the input list); the EOS
after document i belongs to document i (predicting it is how the model learns to stop). With it a
model can avoid cross-document attention (``document_attention_mask``). ``causal_lm_batch`` labels
padding -100; with ``mask_cross_document=True`` it also labels -100 the position whose target is
the first token of the next document (predicting a new document from the previous one's context
is noise); by default that label is kept, as in GPT-2 training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference_numpy.losses import IGNORE_INDEX


def _check_int(value: Any, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _as_token_array(doc: Any, what: str) -> np.ndarray:
    arr = np.asarray(doc)
    if arr.size == 0:
        return arr.reshape(0).astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D integer sequence of token ids, got {arr.dtype} {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------
# causal-LM packing


@dataclass(frozen=True)
class PackedBlocks:
    """Documents packed into overlapping windows of T + 1 tokens (see the module docstring)."""

    tokens: np.ndarray  # (N, T + 1) int, padded with pad_id
    document_ids: np.ndarray  # (N, T + 1) int32, index of each token's document; -1 on padding

    @property
    def block_size(self) -> int:
        """T, the model's input length (each block holds T + 1 tokens)."""
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: Any, *, mask_cross_document: bool = False) -> dict[str, np.ndarray]:
        """``causal_lm_batch`` of the blocks at ``indices`` (B,)."""
        idx = np.asarray(indices)
        return causal_lm_batch(self.tokens[idx], self.document_ids[idx], mask_cross_document=mask_cross_document)


def pack_documents(
    documents: Sequence[Any],
    block_size: int,
    eos_id: int,
    *,
    pad_id: int | None = None,
    drop_last: bool = False,
    dtype: Any = np.int32,
) -> PackedBlocks:
    """Concatenate token-id documents separated by ``eos_id`` into blocks of T + 1 = block_size + 1.

    Args:
        documents: token-id sequences (lists or 1-D int arrays), e.g. from ``tokenize_documents``.
        block_size: T, the model's context length.
        eos_id: the separator appended after every document.
        pad_id: fills the final partial block (default ``eos_id``; its labels are -100 anyway).
        drop_last: drop the final partial block instead of padding it.
    Returns:
        ``PackedBlocks`` with tokens and document_ids (N, T + 1).
    """
    t = _check_int(block_size, "block_size", 1)
    eos = _check_int(eos_id, "eos_id")
    pad = eos if pad_id is None else _check_int(pad_id, "pad_id")
    pieces: list[np.ndarray] = []
    owners: list[int] = []
    lengths: list[int] = []
    for i, doc in enumerate(documents):
        arr = _as_token_array(doc, f"document {i}")
        if arr.size == 0:
            continue  # an empty document would only add an EOS-after-EOS pair
        pieces += [arr.astype(dtype, copy=False), np.array([eos], dtype=dtype)]
        owners.append(i)
        lengths.append(arr.size + 1)
    empty = PackedBlocks(np.zeros((0, t + 1), dtype), np.zeros((0, t + 1), np.int32))
    if not pieces:
        return empty
    stream = np.concatenate(pieces)  # (M,)
    doc_of = np.repeat(np.asarray(owners, np.int32), lengths)  # (M,)
    m = stream.size
    if m < 2:
        return empty
    n_full = (m - 1) // t
    window = np.arange(n_full)[:, None] * t + np.arange(t + 1)[None, :]  # (n_full, T + 1)
    tokens, docs = stream[window], doc_of[window]
    tail = stream[n_full * t:]  # the tokens left after the last full window, its first shared with it
    if tail.size >= 2 and not drop_last:
        tail_tokens = np.full((1, t + 1), pad, dtype)
        tail_docs = np.full((1, t + 1), -1, np.int32)
        tail_tokens[0, : tail.size] = tail
        tail_docs[0, : tail.size] = doc_of[n_full * t:]
        tokens = np.concatenate([tokens, tail_tokens])
        docs = np.concatenate([docs, tail_docs])
    return PackedBlocks(tokens, docs)


def unpack_blocks(blocks: PackedBlocks) -> np.ndarray:
    """The token stream back from blocks (the inverse of ``pack_documents``, padding removed):
    the first block whole, then every later block without its first (shared) token."""
    if len(blocks) == 0:
        return np.zeros(0, blocks.tokens.dtype)
    parts = [blocks.tokens[0], blocks.tokens[1:, 1:].reshape(-1)]
    valid = np.concatenate([blocks.document_ids[0], blocks.document_ids[1:, 1:].reshape(-1)]) >= 0
    return np.concatenate(parts)[valid]


class BlockPacker:
    """Streaming twin of ``pack_documents`` for corpora that do not fit in memory.

    Feed documents one at a time with ``add``; it returns the blocks completed so far. Its state
    (fewer than T + 1 carried tokens) is ``state_dict()``, so a checkpoint that stores it together
    with the text stream's position resumes the block sequence exactly.
    """

    def __init__(self, block_size: int, eos_id: int, *, dtype: Any = np.int32) -> None:
        self.block_size = _check_int(block_size, "block_size", 1)
        self.eos_id = _check_int(eos_id, "eos_id")
        self.dtype = np.dtype(dtype)
        self._tokens = np.zeros(0, self.dtype)  # carried tokens, < T + 1 of them
        self._docs = np.zeros(0, np.int32)

    def add(self, document: Any, document_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Append one document (and its EOS); return the completed blocks' tokens and
        document_ids, each (n, T + 1) with n >= 0."""
        t = self.block_size
        arr = _as_token_array(document, f"document {document_id}")
        if arr.size:
            self._tokens = np.concatenate([self._tokens, arr.astype(self.dtype), [self.eos_id]]).astype(self.dtype)
            self._docs = np.concatenate([self._docs, np.full(arr.size + 1, document_id, np.int32)])
        n = max(self._tokens.size - 1, 0) // t
        window = np.arange(n)[:, None] * t + np.arange(t + 1)[None, :]
        out = self._tokens[window], self._docs[window]
        self._tokens, self._docs = self._tokens[n * t:], self._docs[n * t:]
        return out

    def finish(self, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The final partial block padded with ``pad_id`` (default EOS), (0 or 1, T + 1) each."""
        t = self.block_size
        pad = self.eos_id if pad_id is None else _check_int(pad_id, "pad_id")
        if self._tokens.size < 2:
            return np.zeros((0, t + 1), self.dtype), np.zeros((0, t + 1), np.int32)
        tokens = np.full((1, t + 1), pad, self.dtype)
        docs = np.full((1, t + 1), -1, np.int32)
        tokens[0, : self._tokens.size] = self._tokens
        docs[0, : self._docs.size] = self._docs
        self._tokens, self._docs = self._tokens[:0], self._docs[:0]
        return tokens, docs

    def state_dict(self) -> dict[str, list[int]]:
        """The carried tokens and their document ids (JSON-serialisable)."""
        return {"tokens": self._tokens.tolist(), "document_ids": self._docs.tolist()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        """Restore the state saved by ``state_dict``."""
        tokens, docs = np.asarray(state["tokens"], self.dtype), np.asarray(state["document_ids"], np.int32)
        if tokens.shape != docs.shape or tokens.size > self.block_size:
            raise ValueError(f"BlockPacker state has {tokens.size} tokens and {docs.size} document ids; "
                             f"expected equal counts of at most block_size={self.block_size}")
        self._tokens, self._docs = tokens, docs


def causal_lm_batch(tokens: Any, document_ids: Any, *, mask_cross_document: bool = False) -> dict[str, np.ndarray]:
    """Model inputs from blocks (B, T + 1).

    Returns:
        ``input_ids`` (B, T) = tokens[:, :-1]; ``labels`` (B, T) = tokens[:, 1:] with -100 where the
        target is padding (and, with ``mask_cross_document``, where the target starts another
        document); ``attention_mask`` (B, T) int32, 0 on padding; ``document_ids`` (B, T).
    """
    tokens, docs = np.asarray(tokens), np.asarray(document_ids)
    if tokens.ndim != 2 or tokens.shape != docs.shape or tokens.shape[1] < 2:
        raise ValueError(f"tokens and document_ids must both be (B, T + 1) with T >= 1, got "
                         f"{tokens.shape} and {docs.shape}")
    ignore = docs[:, 1:] < 0
    if mask_cross_document:
        ignore |= docs[:, 1:] != docs[:, :-1]
    labels = np.where(ignore, IGNORE_INDEX, tokens[:, 1:]).astype(np.int32 if tokens.dtype.itemsize <= 4 else np.int64)
    return {
        "input_ids": tokens[:, :-1],
        "labels": labels,
        "attention_mask": (docs[:, :-1] >= 0).astype(np.int32),
        "document_ids": docs[:, :-1],
    }


def document_attention_mask(document_ids: Any) -> np.ndarray:
    """(B, T) document ids (-1 = padding) -> (B, T, T) bool, True where query t may attend to key s:
    causal (s <= t), same document, and the key is not padding."""
    docs = np.asarray(document_ids)
    if docs.ndim != 2:
        raise ValueError(f"document_ids must be (B, T), got shape {docs.shape}")
    t = docs.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    same = docs[:, :, None] == docs[:, None, :]  # (B, T, T)
    return causal[None] & same & (docs[:, None, :] >= 0)


# --------------------------------------------------------------------------------------------
# padding


def pad_batch(
    seqs: Sequence[Any],
    pad_id: int,
    max_len: int | None = None,
    side: str = "right",
    *,
    truncate: bool = False,
    dtype: Any = np.int32,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad variable-length id sequences into one array.

    Args:
        seqs: B sequences of token ids.
        pad_id: the fill value.
        max_len: L; default the longest sequence. A longer sequence is an error unless
            ``truncate`` (then its first ``max_len`` tokens are kept).
        side: "right" (BERT, seq2seq) or "left" (batched generation with a causal model).
    Returns:
        ``(ids, attention_mask)``, both (B, L): ``ids`` of ``dtype``, mask int32 with 1 on real tokens.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        seqs = list(seqs)
    arrays = [_as_token_array(s, f"seqs[{i}]") for i, s in enumerate(seqs)]
    if not arrays:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = np.array([a.size for a in arrays])
    length = int(lengths.max()) if max_len is None else _check_int(max_len, "max_len", 1)
    too_long = np.flatnonzero(lengths > length)
    if too_long.size:
        if not truncate:
            i = int(too_long[0])
            raise ValueError(f"seqs[{i}] has {lengths[i]} tokens, more than max_len={length}; "
                             "pass truncate=True to cut it")
        arrays = [a[:length] for a in arrays]
        lengths = np.minimum(lengths, length)
    positions = np.arange(length)[None, :]
    if side == "right":
        mask = positions < lengths[:, None]
    else:
        mask = positions >= length - lengths[:, None]
    ids = np.full((len(arrays), length), pad_id, dtype)
    # Row-major order of the True cells is each row's tokens in order, for both sides.
    ids[mask] = np.concatenate(arrays) if lengths.sum() else np.zeros(0, dtype)
    return ids, mask.astype(np.int32)


# --------------------------------------------------------------------------------------------
# deterministic order and splits


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch): the data order of one epoch.

    A resumed run recomputes the same order from its checkpointed (seed, epoch) and skips the
    batches it already did; no shuffle state needs saving. (N,) int64.
    """
    n = _check_int(n, "n")
    # The constant keeps these streams apart from the splits' (which use (seed, 0x5EED)).
    return _rng(_check_int(seed, "seed"), 0xE90C, _check_int(epoch, "epoch")).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = True) -> list[np.ndarray]:
    """The epoch's shuffled indices cut into batches of ``batch_size`` (the last one shorter
    unless ``drop_last``)."""
    b = _check_int(batch_size, "batch_size", 1)
    perm = epoch_permutation(n, seed, epoch)
    stop = (perm.size // b) * b if drop_last else perm.size
    return [perm[i: i + b] for i in range(0, stop, b)]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size < 1 or (f < 0).any() or abs(f.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    return f


def _cut(n: int, fractions: np.ndarray) -> np.ndarray:
    """Boundaries splitting n items by fractions (cumulative rounding, so counts sum to n)."""
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    return np.concatenate([[0], bounds])


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, ...]:
    """Split range(n) at random into parts of the given fractions, deterministic in ``seed``.

    Returns one sorted (n_i,) int64 index array per fraction; together they partition range(n).
    A split with a positive fraction that would come out empty is an error (too few items).
    """
    n = _check_int(n, "n")
    f = _check_fractions(fractions)
    perm = _rng(_check_int(seed, "seed"), 0x5EED).permutation(n)
    bounds = _cut(n, f)
    parts = tuple(np.sort(perm[bounds[i]: bounds[i + 1]]) for i in range(f.size))
    empty = [i for i, p in enumerate(parts) if p.size == 0 and f[i] > 0]
    if empty:
        raise ValueError(f"split {empty[0]} (fraction {f[empty[0]]}) would be empty with only n={n} items")
    return parts


def split_items(items: Sequence[Any], fractions: Sequence[float], seed: int) -> tuple[list[Any], ...]:
    """``split_indices`` applied to a sequence (e.g. documents: a split by document, so no document
    is cut between train and validation). Items keep their original order inside each part."""
    return tuple([items[i] for i in part] for part in split_indices(len(items), fractions, seed))


def stratified_split(labels: Any, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, ...]:
    """Split indices so that every class is divided by ``fractions`` (within rounding).

    Args:
        labels: (N,) class labels.
    Returns:
        One sorted index array per fraction, partitioning range(N).
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    f = _check_fractions(fractions)
    seed = _check_int(seed, "seed")
    parts: list[list[np.ndarray]] = [[] for _ in f]
    for k, cls in enumerate(np.unique(y)):
        members = np.flatnonzero(y == cls)
        members = members[_rng(seed, 0x57A7, k).permutation(members.size)]
        bounds = _cut(members.size, f)
        for i in range(f.size):
            parts[i].append(members[bounds[i]: bounds[i + 1]])
    return tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
