"""Text preprocessing: cleaning and Unicode normalisation, tokenization with our tokenizers,
training a byte-level BPE vocabulary on a corpus, and a small word-level vocabulary.

Imports only NumPy, the standard library and (lazily) ``bigmodel_port.tokenization``; never jax.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # only for annotations: importing the tokenizer module pulls in `tokenizers`
    from bigmodel_port.tokenization import PreTrainedTokenizerFast

NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")

# Category Cc (C0, DEL, C1) except tab and newline, which carry layout that code and prose need;
# lone surrogates (Cs); U+FFFD. One regex pass, because a per-character Python loop is far slower
# on corpus-sized text (benchmarks/results/README.md).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_WHITESPACE_RUN = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _format_chars() -> re.Pattern[str]:
    """A regex of every category-Cf character of this Python's Unicode database (built once)."""
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    return re.compile("[" + "".join(re.escape(c) for c in chars) + "]")


def clean_text(
    text: str,
    *,
    normalization: str | None = "NFC",
    remove_control: bool = True,
    remove_format: bool = False,
    collapse_whitespace: bool = False,
    strip: bool = False,
    lowercase: bool = False,
) -> str:
    """Clean one text for tokenization.

    Steps, in order:
      1. line endings ``\\r\\n`` and lone ``\\r`` become ``\\n`` (always);
      2. Unicode normalisation ``normalization`` (``"NFC"`` keeps the text as written but with one
         byte form per character; ``"NFKC"`` also folds compatibility forms: full-width letters,
         ligatures such as "ﬁ", superscripts; ``None`` skips it);
      3. ``remove_control``: drop control characters (category Cc, e.g. NUL, ESC, DEL, C1 codes)
         except tab and newline, lone surrogates (Cs) and U+FFFD (the decoder's replacement
         character: it marks bytes that were already lost);
      4. ``remove_format``: also drop format characters (Cf: zero-width space / joiners, BOM, bidi
         marks). Off by default because ZWJ is part of emoji and some scripts' spelling;
      5. ``collapse_whitespace``: every run of whitespace (newlines included) becomes one space;
      6. ``strip`` leading / trailing whitespace; 7. ``lowercase``.

    Args:
        text: the text (a ``str``; bytes must be decoded first so the caller decides the encoding).
    Returns:
        The cleaned text.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_text takes a str, got {type(text).__name__}")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {normalization!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalization is not None:
        text = unicodedata.normalize(normalization, text)
    if remove_control:
        text = _CONTROL.sub("", text)
    if remove_format:
        text = _format_chars().sub("", text)
    if collapse_whitespace:
        text = _WHITESPACE_RUN.sub(" ", text)
    if strip:
        text = text.strip()
    if lowercase:
        text = text.lower()
    return text


def tokenize_documents(
    tokenizer: PreTrainedTokenizerFast,
    documents: Iterable[str],
    *,
    chunk_size: int = 1024,
    dtype: Any = np.int32,
) -> list[np.ndarray]:
    """Token ids of each document, without special tokens (packing adds the EOS separators).

    Args:
        tokenizer: one of ours (``bigmodel_port.tokenization``: ``GPT2Tokenizer``, ``BertTokenizer``,
            the result of ``train_tokenizer``...), or anything called like it.
        documents: texts; consumed ``chunk_size`` at a time, so a lazy stream never sits in memory
            whole (the returned ids do).
        dtype: integer dtype of the returned arrays (int32 holds any real vocabulary).
    Returns:
        One (T_i,) integer array per document, in order.
    """
    if isinstance(documents, str):
        raise TypeError("tokenize_documents takes an iterable of documents, not one string")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out: list[np.ndarray] = []
    chunk: list[str] = []

    def flush() -> None:
        ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        out.extend(np.asarray(seq, dtype=dtype) for seq in ids)
        chunk.clear()

    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"document {i} is a {type(doc).__name__}, expected str")
        chunk.append(doc)
        if len(chunk) == chunk_size:
            flush()
    if chunk:
        flush()
    return out


def train_tokenizer(
    corpus: str | os.PathLike[str] | Sequence[os.PathLike[str]] | Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    eos_token: str = "<|endoftext|>",
    pad_token: str | None = None,
    special_tokens: Sequence[str] = (),
    save_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a new byte-level BPE vocabulary (GPT-2 style) on the user's corpus.

    Wraps ``bigmodel_port.tokenization.train_bpe_tokenizer`` (the Rust ``tokenizers`` trainer):
    byte-level, so every input is encodable and no ``<unk>`` is ever produced. ``eos_token`` is
    also the BOS token, as in GPT-2; it is the separator ``pack_documents`` puts between documents.

    Args:
        corpus: a text file path, a list of ``pathlib.Path`` files, or an iterable of texts (e.g.
            ``stdlib_corpus().train`` or a ``TextLineStream``).
        vocab_size: final size including the 256 byte tokens and the special tokens.
        min_frequency: a pair must occur this often to be merged.
        pad_token: an optional padding token (GPT-2 has none; causal-LM padding is masked out of
            the loss anyway, so padding with EOS is fine).
        save_dir: if given, the tokenizer is saved there (``save_pretrained``) so it can be reloaded
            with ``AutoTokenizer.from_pretrained(save_dir)``.
    Returns:
        The trained tokenizer.
    """
    from bigmodel_port.tokenization import train_bpe_tokenizer  # lazy: `tokenizers` only when training one

    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(c, os.PathLike) for c in corpus):
        empty = [str(p) for p in corpus if Path(p).is_file() and Path(p).stat().st_size == 0]
        if empty:
            raise ValueError(f"tokenizer training files are empty: {empty}")
    tokenizer = train_bpe_tokenizer(
        corpus, vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        bos_token=eos_token, eos_token=eos_token, pad_token=pad_token,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------
# word-level vocabulary (the translation task's tokenizer)

SPECIAL_WORDS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class WordVocab:
    """A whitespace-split word vocabulary with ``<pad>=0, <s>=1, </s>=2, <unk>=3``.

    Words after the specials are ordered by descending count, ties alphabetically, so the ids
    depend only on the sentences it was built from.
    """

    words: list[str]  # id -> word; the four specials first
    index: dict[str, int] = field(init=False, repr=False)

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIAL_WORDS:
            raise ValueError(f"a WordVocab starts with the specials {SPECIAL_WORDS}, got {self.words[:4]}")
        if len(set(self.words)) != len(self.words):
            dup = [w for w, c in collections.Counter(self.words).items() if c > 1]
            raise ValueError(f"WordVocab has duplicate words: {dup[:10]}")
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, sentences: Iterable[str], *, min_count: int = 1, max_size: int | None = None) -> WordVocab:
        """Vocabulary of the words (split on whitespace) occurring at least ``min_count`` times,
        at most ``max_size`` entries in all (specials included)."""
        counts = collections.Counter(w for s in sentences for w in s.split())
        for special in SPECIAL_WORDS:
            counts.pop(special, None)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size < len(SPECIAL_WORDS):
                raise ValueError(f"max_size must be >= {len(SPECIAL_WORDS)} (the specials), got {max_size}")
            ranked = ranked[: max_size - len(SPECIAL_WORDS)]
        return cls(list(SPECIAL_WORDS) + ranked)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of the whitespace-split words; unknown words map to ``<unk>``."""
        ids = [self.index.get(w, self.unk_id) for w in sentence.split()]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Words of ``ids`` joined by spaces: ``<pad>`` and ``<s>`` are dropped, and the text ends at
        the first ``</s>`` (or ``</s>`` is dropped when ``stop_at_eos`` is False)."""
        out = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1).tolist():
            if not 0 <= i < len(self.words):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self.words)})")
            if i == self.eos_id:
                if stop_at_eos:
                    break
                continue
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.words[i])
        return " ".join(out)

    def to_json(self) -> str:
        """JSON text (``{"format": ..., "words": [...]}``) for ``from_json``."""
        return json.dumps({"format": "bigmodel-word-vocab-v1", "words": self.words}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> WordVocab:
        """Inverse of ``to_json``."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != "bigmodel-word-vocab-v1":
            raise ValueError("not a WordVocab JSON (expected format 'bigmodel-word-vocab-v1'); "
                             "write it with WordVocab.to_json")
        return cls(list(data["words"]))
