"""Task ``lm``: causal language modelling (GPT / Llama, ``GPTConfig``) on packed blocks of the
stdlib's source (built in) or a user's text file (streamed into a memory-mapped block cache).
Metrics: loss, perplexity, next-token top-1 / top-5 accuracy, and a sample.

Dims: B batch, T time (tokens), V vocabulary.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.tokenization import AutoTokenizer
from bigmodel_train import metrics as M
from bigmodel_train.config import ConfigError, RunConfig
from bigmodel_train.data.builtin import stdlib_corpus
from bigmodel_train.data.packing import pack_documents
from bigmodel_train.data.text import tokenize_documents, train_tokenizer
from bigmodel_train.data.token_cache import (
    BlockFile,
    assign_splits,
    build_block_cache,
    stream_documents,
    tokenizer_fingerprint,
)
from bigmodel_train.tasks.splits import ArraySplit, Split, eval_batches
from bigmodel_train.tasks.task import Task, fit_max_len, model_base, with_model_overrides
from reference_numpy import generation as ref_generation
from reference_numpy.configs import GPTConfig
from reference_numpy.losses import IGNORE_INDEX
from reference_numpy.tree import Tree

__all__ = ["ByteTokenizer", "LMTask"]


# --------------------------------------------------------------------------------------------
# byte-level tokenizer (no training; vocabulary 256 bytes + EOS)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, ``<|endoftext|>`` = 256 (vocabulary 257)."""

    eos_token_id = 256
    vocab_size = 257

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t) for t in texts]}

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path) / "byte_tokenizer.json", json.dumps({"format": "bigmodel-bytes-v1"}))


def _load_tokenizer(path: Path) -> Any:
    if (path / "byte_tokenizer.json").exists():
        return ByteTokenizer()
    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------
# the task


class LMTask(Task):
    """Causal LM on packed blocks: each example is ``seq_len`` tokens of the document stream
    (documents separated by EOS); labels are the tokens themselves (the model shifts them),
    -100 on the padding of the last block."""

    unit = "tokens"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None, *, tokenizer: Any = None) -> None:
        super().__init__(cfg, run_dir)
        self._docs: tuple[list[str], list[str]] | None = None
        # a user's file is streamed into a memory-mapped block cache (data.token_cache); the
        # built-in stdlib corpus (capped by max_chars) is packed in memory
        self.streamed = cfg.data != "stdlib"
        if self.streamed and not Path(cfg.data).is_file():
            raise ConfigError(f"data={cfg.data!r}: not a built-in LM data set ('stdlib') nor an existing file")
        self._cache_tmp: Any = None
        self.tokenizer = tokenizer if tokenizer is not None else self._tokenizer()
        self.eos_id = int(self.tokenizer.eos_token_id)
        base = model_base(cfg, GPTConfig)
        self.model_config = with_model_overrides(base, cfg, vocab_size=len(self.tokenizer),
                                                  max_len=fit_max_len(base, cfg))

    def documents(self) -> tuple[list[str], list[str]]:
        """(train documents, validation documents)."""
        if self._docs is None:
            self._docs = _lm_documents(self.cfg)
        return self._docs

    def _tokenizer(self) -> Any:
        cfg = self.cfg
        saved = None if self.run_dir is None else self.run_dir / "tokenizer"
        if saved is not None and saved.is_dir():
            return _load_tokenizer(saved)
        if cfg.tokenizer == "byte":
            return ByteTokenizer()
        if cfg.tokenizer != "bpe":
            return _load_tokenizer(Path(cfg.tokenizer))
        if self.streamed:  # a second pass over the file feeds the BPE trainer, never all in memory
            docs = (d for split, d in assign_splits(stream_documents(cfg.data, cfg.max_chars), cfg.val_fraction,
                                                    cfg.seed) if split == "train")
            return train_tokenizer(docs, cfg.vocab_size)
        train_docs, _ = self.documents()
        return train_tokenizer(train_docs, cfg.vocab_size)

    def save_artifacts(self) -> None:
        if self.run_dir is not None and not (self.run_dir / "tokenizer").is_dir():
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")

    def build_splits(self) -> dict[str, Split]:
        if self.streamed:
            return self._streamed_splits()
        train_docs, val_docs = self.documents()
        out = {}
        for name, docs in (("train", train_docs), ("val", val_docs)):
            ids = self._encode(docs)
            blocks = pack_documents(ids, self.cfg.seq_len - 1, self.eos_id)
            tokens, owner = blocks.tokens.astype(np.int32), blocks.document_ids
            out[name] = ArraySplit({
                "input_ids": tokens,  # (N, T)
                "labels": np.where(owner < 0, IGNORE_INDEX, tokens).astype(np.int32),
                "attention_mask": (owner >= 0).astype(np.int32),
            })
        return out

    def _encode(self, docs: list[str]) -> list[np.ndarray]:
        """Token ids of each document, without special tokens (packing adds the EOS)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return [np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) for d in docs]
        return tokenize_documents(self.tokenizer, docs)

    def _streamed_splits(self) -> dict[str, Split]:
        """The user's file streamed into ``<run dir>/data`` (a temporary directory without a
        run dir) as memory-mapped blocks; an existing cache of the same file, tokenizer and
        settings is reused (resume, eval)."""
        cfg = self.cfg
        if self.run_dir is not None:
            cache = self.run_dir / "data"
        else:
            self._cache_tmp = tempfile.TemporaryDirectory(prefix="bigmodel-lm-blocks-")
            cache = Path(self._cache_tmp.name)
        meta = build_block_cache(cfg.data, cache, self._encode, block_size=cfg.seq_len, eos_id=self.eos_id,
                                 val_fraction=cfg.val_fraction, seed=cfg.seed, max_chars=cfg.max_chars,
                                 tokenizer_id=tokenizer_fingerprint(self.tokenizer))
        return {s: BlockFile(cache, s, meta) for s in ("train", "val")}

    def units(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.sum(batch["attention_mask"]))

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        """Token-level loss (mean NLL), perplexity, next-token top-1 / top-5 accuracy."""
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        nll, count, top1, top5 = 0.0, 0, 0.0, 0.0
        for batch, valid in eval_batches(self.splits[split], self.cfg.eval_batch_size, cap):
            logits = self.forward(params, batch, backend)[:valid, :-1]  # (b, T-1, V) predicts t+1
            labels = batch["labels"][:valid, 1:]
            s, c = M.nll_sum_and_count(logits, labels, ignore_index=IGNORE_INDEX)
            nll, count = nll + s, count + c
            top1 += M.top_k_accuracy(labels, logits, 1, ignore_index=IGNORE_INDEX) * c
            top5 += M.top_k_accuracy(labels, logits, 5, ignore_index=IGNORE_INDEX) * c
        return {"loss": nll / count, "perplexity": M.perplexity_from_nll(nll, count),
                "accuracy": top1 / count, "top5_accuracy": top5 / count, "tokens": count}

    def encode_prompt(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer.encode(prompt) if isinstance(self.tokenizer, ByteTokenizer) else \
            self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = [self.eos_id] + list(ids)  # documents follow an EOS in training
        return np.asarray([ids], np.int32)

    def sample(self, params: Tree, backend: str = "jax", *, prompt: str | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = 40,
               seed: int | None = None, num_beams: int = 1) -> str | None:
        """Continue ``prompt`` (default the run's) and return prompt + continuation as text.

        ``max_new_tokens`` given: prompt + continuation must fit the model's ``max_len``, else
        ValueError. Not given (the end-of-run sample): up to ``sample_tokens``, fewer where the
        prompt leaves less room. ``num_beams > 1``: beam search (both backends; no sampling).
        ``temperature > 0`` samples (JAX only: the NumPy reference has no sampler); 0 is greedy;
        None is 0.8 on JAX and greedy on the NumPy reference and with beams.
        """
        if temperature is None:
            temperature = 0.8 if backend == "jax" and num_beams == 1 else 0.0
        prompt = self.cfg.prompt if prompt is None else prompt
        ids = self.encode_prompt(prompt)
        room = self.model_config.max_len - ids.shape[1]
        if max_new_tokens is None:
            n = min(self.cfg.sample_tokens, room)
            if self.cfg.sample_tokens <= 0:
                return None
        else:
            n = max_new_tokens
            if n > room:
                raise ValueError(f"the prompt is {ids.shape[1]} tokens (with the leading EOS) and max_new_tokens="
                                 f"{n} would reach {ids.shape[1] + n} > the model's max_len "
                                 f"{self.model_config.max_len}; ask for at most {max(room, 0)} tokens")
        if n <= 0:
            raise ValueError(f"the prompt is {ids.shape[1]} tokens; the model's max_len is {self.model_config.max_len}")
        if num_beams > 1 and temperature > 0:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
        if backend == "numpy" and temperature > 0:
            raise ValueError("the NumPy reference decodes greedily or with beam search; use temperature=0 "
                             "or the jax backend to sample")
        if backend == "numpy":
            if num_beams > 1:
                out = ref_generation.beam_search(params, ids, self.model_config, max_new_tokens=n,
                                                 num_beams=num_beams, eos_token_id=self.eos_id)
            else:
                out = ref_generation.greedy(params, ids, self.model_config, max_new_tokens=n,
                                            eos_token_id=self.eos_id)
        else:  # imported on first use, like Task.jax_module: the NumPy backend needs no jax
            import jax

            from bigmodel_jax.generation import beam_search, generate

            if num_beams > 1:
                out = beam_search(params, ids, self.model_config, max_new_tokens=n, num_beams=num_beams,
                                  eos_token_id=self.eos_id)
            else:
                key = jax.random.key(self.cfg.seed if seed is None else seed)
                out = generate(params, ids, self.model_config, max_new_tokens=n, temperature=temperature,
                               top_k=top_k, key=key, eos_token_id=self.eos_id)
        return self.tokenizer.decode(np.asarray(out)[0, 1:].tolist(), skip_special_tokens=True)


@functools.lru_cache(maxsize=4)
def _stdlib_documents(max_chars: int, val_fraction: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The stdlib corpus split (memoised: scanning the library's ~10k files takes seconds, and a
    process that trains, evaluates and resumes reads the same corpus several times)."""
    corpus = stdlib_corpus(max_files=1_000_000, max_bytes=max_chars or 1 << 40, val_fraction=val_fraction,
                           seed=seed)
    return tuple(corpus.train), tuple(corpus.val)


def _lm_documents(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(train, val) documents of the built-in stdlib corpus, in memory (a user's file is streamed
    instead: ``LMTask._streamed_splits``)."""
    train, val = _stdlib_documents(cfg.max_chars, cfg.val_fraction, cfg.seed)
    return list(train), list(val)
