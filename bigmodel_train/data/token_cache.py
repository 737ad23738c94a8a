"""Causal-LM training data from text files larger than memory: stream, tokenize and pack once
into a memory-mapped block file on disk, then train from it.

One pass over the user's ``.txt`` (blank-line separated documents) or ``.jsonl`` (field
``text``) streams the documents (``stream.TextLineStream`` / ``JsonlStream``), assigns each to
train or validation with a seeded draw, tokenizes them a chunk at a time and feeds them through
``packing.BlockPacker``. Completed blocks are appended to ``<split>.tokens`` (int32, (N, T)
row-major) as they are produced, so memory holds one chunk of documents and one partial block,
never the corpus. The blocks are exactly ``packing.pack_documents`` of the same documents: the
in-memory and the streamed paths train on the same data.

Training then reads only the rows of each batch from the memory map (``BlockFile``), with the
same seeded epoch permutations as any other split, so a resumed run sees the same batches. The
cache is keyed by the source file (path, size, modification time), the tokenizer and the packing
settings (``meta.json``), reused when they match and rebuilt otherwise; every file of it is
written atomically (temporary file + fsync + rename), ``meta.json`` last.

Dims: N blocks, T tokens per block (the run's ``seq_len``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_open, atomic_write_text
from bigmodel_train.data.packing import BlockPacker
from bigmodel_train.data.stream import DataError, JsonlStream, TextLineStream
from reference_numpy.losses import IGNORE_INDEX

FORMAT = "bigmodel-lm-blocks-v1"
SPLITS = ("train", "val")


def stream_documents(path: str | os.PathLike[str], max_chars: int = 0) -> Iterator[str]:
    """The documents of a ``.jsonl`` (one per record, field ``text``) or text file (paragraphs
    separated by blank lines), lazily, stopping once ``max_chars`` characters were read (0 = the
    whole file). Bad records raise ``DataError`` naming the file and line."""
    path = Path(path)
    total = 0
    if path.suffix == ".jsonl":
        stream = JsonlStream(path, field="text")
        for i, text in enumerate(stream):
            if not isinstance(text, str):
                raise DataError(f"record has a non-string 'text' ({type(text).__name__})", path=path, line=i + 1)
            yield text
            total += len(text)
            if max_chars and total >= max_chars:
                return
        return
    current: list[str] = []
    for line in TextLineStream(path):
        if line.strip():
            current.append(line)
            total += len(line) + 1
        elif current:
            yield "\n".join(current)
            current = []
        if max_chars and total >= max_chars:
            break
    if current:
        yield "\n".join(current)


def assign_splits(documents: Iterable[str], val_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    """``(split, document)`` pairs: each document goes to "val" with probability
    ``val_fraction``, by one uniform draw per document from a generator seeded by ``seed``, in
    order (a stream has no length to permute, and the draw is the same on every pass)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 0x5EED])
    for doc in documents:
        yield ("val" if rng.random() < val_fraction else "train"), doc


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying a tokenizer's vocabulary (the cache key): the serialized
    ``tokenizers`` model when there is one, else the class name and vocabulary size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _source_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_block_cache(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    encode: Callable[[list[str]], Sequence[np.ndarray]],
    *,
    block_size: int,
    eos_id: int,
    val_fraction: float,
    seed: int,
    max_chars: int = 0,
    tokenizer_id: str = "",
    chunk_docs: int = 512,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Stream ``path`` into ``out_dir/{train,val}.tokens`` + ``meta.json`` (or reuse them when
    ``meta.json`` matches the same source, tokenizer and settings); returns the metadata.

    ``encode`` maps a list of documents to their token ids (no special tokens); ``block_size``
    is T (each block holds T tokens; consecutive blocks overlap by one, as ``pack_documents``
    with ``block_size - 1``). ``progress`` is called with the characters read so far."""
    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"LM data file not found: {path}")
    key = {"format": FORMAT, "source": _source_key(path), "block_size": int(block_size), "eos_id": int(eos_id),
           "val_fraction": float(val_fraction), "seed": int(seed), "max_chars": int(max_chars),
           "tokenizer": tokenizer_id}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("key") == key and all((out / f"{s}.tokens").is_file() for s in SPLITS):
            return meta
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the old cache is invalid from here on

    counts = {s: {"blocks": 0, "documents": 0, "tokens": 0} for s in SPLITS}
    last_valid = {s: block_size for s in SPLITS}  # tokens of the final block that are not padding
    with atomic_open(out / "train.tokens") as f_train, atomic_open(out / "val.tokens") as f_val:
        files = {"train": f_train, "val": f_val}
        packers = {s: BlockPacker(block_size - 1, eos_id) for s in SPLITS}
        pending: dict[str, list[str]] = {s: [] for s in SPLITS}
        chars = 0

        def flush(split: str) -> None:
            docs, pending[split] = pending[split], []
            for ids in encode(docs):
                c = counts[split]
                blocks, _ = packers[split].add(np.asarray(ids), c["documents"])
                c["documents"] += 1
                c["tokens"] += int(np.size(ids))
                if len(blocks):
                    files[split].write(np.ascontiguousarray(blocks, np.int32).tobytes())
                    c["blocks"] += len(blocks)

        for split, doc in assign_splits(stream_documents(path, max_chars), val_fraction, seed):
            pending[split].append(doc)
            chars += len(doc)
            if len(pending[split]) >= chunk_docs:
                flush(split)
                if progress is not None:
                    progress(chars)
        for split in SPLITS:
            flush(split)
            tokens, owner = packers[split].finish()
            if len(tokens):
                files[split].write(np.ascontiguousarray(tokens, np.int32).tobytes())
                counts[split]["blocks"] += 1
                last_valid[split] = int(np.sum(owner[0] >= 0))
    empty = [s for s in SPLITS if counts[s]["blocks"] == 0]
    if empty:
        raise DataError(f"no {' or '.join(empty)} blocks: {counts['train']['documents']} training and "
                        f"{counts['val']['documents']} validation documents (val_fraction={val_fraction}); "
                        f"the file needs more documents (blank-line separated in a text file, one per "
                        f"JSONL record)", path=path)
    meta = {"key": key, "block_size": int(block_size), "characters": chars,
            "splits": {s: {**counts[s], "last_block_valid": last_valid[s]} for s in SPLITS}}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))  # last: the cache is complete
    return meta


class BlockFile:
    """A split of packed blocks on disk, memory-mapped: ``batch(indices)`` reads only those rows.

    Batches are ``input_ids`` (b, T), ``labels`` (the tokens, -100 on the padding of the final
    block) and ``attention_mask`` (1 on tokens, 0 on that padding), as the in-memory LM split."""

    def __init__(self, directory: str | os.PathLike[str], split: str, meta: dict[str, Any]) -> None:
        info = meta["splits"][split]
        self.block_size = int(meta["block_size"])
        self.path = Path(directory) / f"{split}.tokens"
        n = int(info["blocks"])
        want = n * self.block_size * 4
        if self.path.stat().st_size != want:
            raise DataError(f"block file has {self.path.stat().st_size} bytes, expected {want} "
                            f"({n} blocks x {self.block_size} int32 tokens); delete the cache to rebuild it",
                            path=self.path)
        self.tokens = np.memmap(self.path, dtype=np.int32, mode="r", shape=(n, self.block_size))
        self.last_valid = int(info["last_block_valid"])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: Any) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        ids = np.asarray(self.tokens[idx])  # (b, T): reads only these rows
        valid = np.where(idx == len(self) - 1, self.last_valid, self.block_size)  # (b,)
        mask = np.arange(self.block_size)[None, :] < valid[:, None]  # (b, T)
        return {"input_ids": ids, "labels": np.where(mask, ids, IGNORE_INDEX).astype(np.int32),
                "attention_mask": mask.astype(np.int32)}
