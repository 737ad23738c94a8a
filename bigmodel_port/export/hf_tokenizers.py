"""HF ``tokenizers`` equivalents of the training tasks' own tokenizers, with the same ids.

A run's byte tokenizer (``bigmodel_train.tasks.lm.ByteTokenizer``) and its translation word
vocabulary (``bigmodel_train.data.text.WordVocab``) have no file format transformers reads, so an
``hf`` export writes the closest faithful ``tokenizer.json``:

* bytes: a byte-level BPE with no merges whose vocabulary is the 256 bytes at ids 0..255 (in
  GPT-2's byte -> unicode alphabet) and ``<|endoftext|>`` = 256, with the ByteLevel
  pre-tokenizer's regex split turned off: ``encode(text)`` is ``list(text.encode("utf-8"))``
  exactly, and decoding maps invalid UTF-8 to U+FFFD as ``ByteTokenizer.decode`` does.
* words: a WordLevel model over the vocabulary (``<pad>=0, <s>=1, </s>=2, <unk>=3``, then the
  words), split on whitespace, ``</s>`` appended to every sequence as the translation task
  appends it to sources; decoding joins words with spaces and drops the specials.

Both are returned as our ``PreTrainedTokenizerFast`` (whose ``save_pretrained`` writes what
transformers' ``AutoTokenizer`` loads); this module takes plain data (no ``bigmodel_train``
import): the word list, not a ``WordVocab``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from bigmodel_port.tokenization import PreTrainedTokenizerFast

__all__ = ["BYTE_EOS", "byte_tokenizer", "word_tokenizer"]

BYTE_EOS = "<|endoftext|>"
WORD_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel maps bytes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """UTF-8 bytes as ids 0..255 and ``<|endoftext|>`` = 256 (vocabulary 257), as a
    ``tokenizers`` byte-level BPE without merges (module docstring)."""
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # no regex split: every byte is its own token whatever the surrounding text
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tok, bos_token=BYTE_EOS, eos_token=BYTE_EOS, unk_token=None, pad_token=None,
                                   model_max_length=model_max_length)


def word_tokenizer(words: Sequence[str], *, add_eos: bool = True,
                   model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with ``words[i]`` at id i; ``words`` starts with the
    four specials ``<pad>, <s>, </s>, <unk>``. ``add_eos``: append ``</s>`` to each sequence."""
    if tuple(words[:4]) != WORD_SPECIALS:
        raise ValueError(f"a word vocabulary starts with {WORD_SPECIALS}, got {tuple(words[:4])}")
    if len(set(words)) != len(words):
        raise ValueError("the word vocabulary has duplicate words")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: tokenizers then joins the words with single spaces, as WordVocab.decode does
    if add_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
