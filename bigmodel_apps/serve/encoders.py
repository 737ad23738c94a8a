"""The non-generative models ``bigmodel serve`` answers with, and their batched functions:

* ``EmbeddingModel`` (``POST /v1/embeddings``): a BERT encoder's sentence embeddings, from an HF
  ``BertModel`` directory such as all-MiniLM-L6-v2 (or any BERT head's directory but
  sequence classification, whose encoder is read);
* ``ClassifierModel`` (``POST /v1/classify``): class probabilities of a ``classification`` run or
  an HF ``BertForSequenceClassification`` directory;
* ``TranslationModel`` (``POST /v1/translate``): greedy translations of a ``translation`` run.

Dims: N inputs of a request, B padded batch, T padded length (S for a source), D model width,
C classes.

Each runs the family's one forward (``bigmodel_jax.models.bert`` / ``seq2seq_generate``) under
``jax.jit``, with nothing of the model restated here. A request's inputs run as one padded batch
(chunks of ``max_batch`` rows when there are more): the batch is padded to a size bucket (powers
of 4 below ``max_batch``, then ``max_batch``) by repeating its first row, and the length to a
length bucket (``engine.prefill_buckets``: powers of two from 16 below ``max_len``, then
``max_len``), so the compiled shapes are a fixed, small set (``warmup`` compiles them all) and
no request compiles anything new. Padding tokens are hidden by the attention mask; padded rows
are dropped. Translation sources are padded to the run's ``seq_len``, as the task's own
``translate`` pads them, so its one length needs no buckets.

Pooling rule of the embeddings, read from the model directory as sentence-transformers does:
``modules.json`` (when present) names the modules; its ``Pooling`` module's ``config.json``
picks mean pooling over the non-padding tokens (``pooling_mode_mean_tokens``) or the [CLS]
token (``pooling_mode_cls_token``; other modes are refused); a ``Normalize`` module means the
embeddings are L2-normalised. Without ``modules.json``: mean pooling, not normalised. The
longest input is ``sentence_bert_config.json``'s ``max_seq_length`` when present (256 for
all-MiniLM-L6-v2), else the position table's ``max_len``; a longer input is refused (400), not
truncated as sentence-transformers would, so no embedding silently drops text.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bigmodel_apps.serve.engine import prefill_buckets
from bigmodel_jax.layers import pooling as jpooling
from bigmodel_jax.models import bert

__all__ = ["MAX_INPUTS", "ClassifierModel", "EmbeddingModel", "InputError", "TranslationModel", "batch_buckets",
           "compiled_shapes", "from_run", "load_hf_encoder"]

MAX_INPUTS = 2048  # inputs per request at most (OpenAI's limit for embeddings)
DEFAULT_MAX_BATCH = 32  # rows per forward at most


class InputError(ValueError):
    """A request's ``input`` the model cannot take (the server answers 400 with this message)."""


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of 4 below ``max_batch``, then ``max_batch``. Coarser than
    the length buckets because each size is a compile of the whole model."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 4
    return tuple(out) + (max_batch,)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


# -- the compiled functions: the family's forward, then what the endpoint reads ------------------


@partial(jax.jit, static_argnames=("config", "mode", "normalize"))
def _embed(params: Any, batch: dict[str, Any], config: Any, mode: str, normalize: bool) -> jax.Array:
    """(B, T) token batch -> sentence embeddings (B, D)."""
    h = bert.hidden_states(params, batch, config)  # (B, T, D)
    e = jpooling.mean_pool(h, batch["attention_mask"]) if mode == "mean" else h[:, 0]
    return jpooling.l2_normalize(e) if normalize else e


@partial(jax.jit, static_argnames=("config",))
def _classify(params: Any, batch: dict[str, Any], config: Any) -> jax.Array:
    """(B, T) token batch -> class probabilities (B, C)."""
    return jax.nn.softmax(bert.forward(params, batch, config, head="sequence_classification"), axis=-1)


def compiled_shapes() -> dict[str, int]:
    """Compilations so far in this process of each endpoint's function (the bucketing test reads them)."""
    from bigmodel_jax.generation.seq2seq import _seq2seq_generate

    return {"embed": _embed._cache_size(), "classify": _classify._cache_size(),
            "translate": _seq2seq_generate._cache_size()}


# -- request inputs ------------------------------------------------------------------------------


def _texts(inputs: Any, *, allow_ids: bool) -> tuple[list[str] | None, list[list[int]] | None]:
    """``input`` as a list of texts, or (``allow_ids``) a list of token-id lists."""
    kinds = "a string or a list of strings" + (", or a list of token ids or of token-id lists" if allow_ids else "")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise InputError(f"input must be {kinds}, not empty")
    if len(inputs) > MAX_INPUTS:
        raise InputError(f"input has {len(inputs)} items; at most {MAX_INPUTS} per request")
    if all(isinstance(x, str) for x in inputs):
        empty = [i for i, x in enumerate(inputs) if not x.strip()]
        if empty:
            raise InputError(f"input[{empty[0]}] is empty (or only whitespace)")
        return inputs, None
    if allow_ids:
        if all(_is_int(x) for x in inputs):
            inputs = [inputs]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in inputs):
            return None, [list(x) for x in inputs]
    raise InputError(f"input must be {kinds} (none of them empty)")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_lengths(ids: list[list[int]], max_len: int, vocab_size: int, why: str) -> None:
    for i, row in enumerate(ids):
        if len(row) > max_len:
            raise InputError(f"input[{i}] is {len(row)} tokens long; this model takes at most {max_len} ({why})")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"input[{i}]: token ids must be in [0, {vocab_size}), got {bad[0]}")


# -- BERT encoders ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _BertServed:
    """What the BERT endpoints share: ``config`` (BertConfig), JAX ``params``, ``tokenize(texts)
    -> id lists`` (special tokens added), the longest input ``max_len`` and why, the pad id."""

    name: str
    config: Any
    params: Any
    tokenize: Callable[[list[str]], list[list[int]]]
    max_len: int
    max_len_source: str
    pad_id: int = 0
    max_batch: int = DEFAULT_MAX_BATCH
    kind = ""
    endpoint = ""

    def __post_init__(self) -> None:
        self.batches = batch_buckets(self.max_batch)
        self.lengths = prefill_buckets(self.max_len)
        self._lock = threading.Lock()  # one forward at a time: each already uses every core

    def ids_of(self, inputs: Any, *, allow_ids: bool = False) -> list[list[int]]:
        """Token ids of a request's ``input`` (checked: InputError names what is wrong)."""
        texts, ids = _texts(inputs, allow_ids=allow_ids)
        if ids is None:
            ids = [[int(t) for t in row] for row in self.tokenize(texts)]
        _check_lengths(ids, self.max_len, self.config.vocab_size, self.max_len_source)
        return ids

    def _run(self, fn: Callable[[dict[str, np.ndarray]], Any], ids: list[list[int]]) -> np.ndarray:
        """``fn`` over ``ids`` in padded chunks -> its rows for the N inputs, as NumPy."""
        out = []
        for start in range(0, len(ids), self.max_batch):
            chunk = ids[start:start + self.max_batch]
            B, T = _bucket(len(chunk), self.batches), _bucket(max(map(len, chunk)), self.lengths)
            rows = chunk + [chunk[0]] * (B - len(chunk))  # padded rows repeat a real one; dropped below
            batch = {"input_ids": np.full((B, T), self.pad_id, np.int32), "attention_mask": np.zeros((B, T), np.int32),
                     "token_type_ids": np.zeros((B, T), np.int32)}
            for b, row in enumerate(rows):
                batch["input_ids"][b, :len(row)] = row
                batch["attention_mask"][b, :len(row)] = 1
            with self._lock:
                out.append(np.asarray(fn(batch))[:len(chunk)])
        return np.concatenate(out)

    def _shapes(self) -> list[tuple[int, int]]:
        return [(B, T) for B in self.batches for T in self.lengths]

    def warmup(self) -> None:
        """Compile every (batch, length) bucket before serving."""
        for B, T in self._shapes():
            self._run(self._fn, [[self.pad_id] * T] * B)

    def _fn(self, batch: dict[str, np.ndarray]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


@dataclasses.dataclass(eq=False)
class EmbeddingModel(_BertServed):
    """Sentence embeddings of a BERT encoder; ``pooling`` "mean" or "cls", ``normalize``: L2 (the
    module docstring's rule)."""

    pooling: str = "mean"
    normalize: bool = False
    kind = "embedding"
    endpoint = "/v1/embeddings"

    def _fn(self, batch: dict[str, np.ndarray]) -> Any:
        return _embed(self.params, batch, self.config, self.pooling, self.normalize)

    def embed(self, ids: list[list[int]]) -> np.ndarray:
        """Embeddings (N, D) float32 of checked token ids (``ids_of``)."""
        return self._run(self._fn, ids)


@dataclasses.dataclass(eq=False)
class ClassifierModel(_BertServed):
    """Sequence classification; ``labels``: the class names, by index."""

    labels: tuple[str, ...] = ()
    kind = "classification"
    endpoint = "/v1/classify"

    def _fn(self, batch: dict[str, np.ndarray]) -> Any:
        return _classify(self.params, batch, self.config)

    def classify(self, ids: list[list[int]]) -> np.ndarray:
        """Class probabilities (N, C) of checked token ids (``ids_of``)."""
        return self._run(self._fn, ids)


# -- seq2seq --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class TranslationModel:
    """Greedy translation with a ``translation`` run's task (its vocabulary, source encoding and
    decoding) and the project's ``seq2seq_generate``: every batch decodes ``max_new_tokens``
    (the task's default) and a request's ``max_tokens`` keeps the first tokens of it (greedy
    decoding is the same prefix whatever the limit), so one compiled decoder per batch size serves
    every request."""

    name: str
    task: Any  # bigmodel_train.tasks.translation.TranslationTask
    params: Any
    max_batch: int = DEFAULT_MAX_BATCH
    kind = "translation"
    endpoint = "/v1/translate"

    def __post_init__(self) -> None:
        self.config = self.task.model_config
        self.max_len = self.task.cfg.seq_len  # the longest source, as the task encodes them
        # as TranslationTask.translate's default
        self.max_new_tokens = min(self.task.cfg.seq_len, self.config.max_len - 1)
        self.batches = batch_buckets(self.max_batch)
        self._lock = threading.Lock()

    def ids_of(self, inputs: Any) -> list[list[int]]:
        """Source ids (with the task's ``</s>``) of a request's ``input`` (checked)."""
        texts, _ = _texts(inputs, allow_ids=False)
        assert texts is not None
        ids = [self.task.vocab.encode(t, add_eos=True) for t in texts]
        _check_lengths(ids, self.max_len, self.config.vocab_size, "the run's seq_len, </s> included")
        return ids

    def check_max_tokens(self, max_tokens: int | None) -> int:
        """``max_tokens`` (None: the default), checked against what the decoder produces."""
        if max_tokens is None:
            return self.max_new_tokens
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise InputError(f"max_tokens must be in [1, {self.max_new_tokens}] for this model, got {max_tokens}")
        return max_tokens

    def translate(self, texts: list[str], max_tokens: int) -> tuple[list[str], int]:
        """Greedy translations of ``texts`` (checked by ``ids_of``) cut at ``max_tokens`` new
        tokens, and the number of tokens generated (EOS excluded)."""
        from bigmodel_jax.generation import seq2seq_generate

        vocab = self.task.vocab
        out, generated = [], 0
        for start in range(0, len(texts), self.max_batch):
            chunk = texts[start:start + self.max_batch]
            rows = chunk + [chunk[0]] * (_bucket(len(chunk), self.batches) - len(chunk))
            with self._lock:
                ids = np.asarray(seq2seq_generate(
                    self.params, self.task.encode_sources(rows), self.config, max_new_tokens=self.max_new_tokens,
                    decoder_start_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id))
            for row in ids[:len(chunk), 1:1 + max_tokens].tolist():  # column 0: the start token
                n = row.index(vocab.eos_id) if vocab.eos_id in row else len(row)
                generated += n
                out.append(vocab.decode(row[:n]))
        return out, generated

    def warmup(self) -> None:
        """Compile the decoder for every batch bucket before serving."""
        for B in self.batches:
            self.translate(["."] * B, 1)


# -- loading --------------------------------------------------------------------------------------


def from_run(path: Path, task: Any, params: Any, name: str, *, max_batch: int = DEFAULT_MAX_BATCH
             ) -> ClassifierModel | TranslationModel:
    """The served model of a ``classification`` or ``translation`` run (``task`` and NumPy
    ``params`` from ``load_run``); ValueError for another task."""
    from bigmodel_jax.tree import to_jax
    from bigmodel_train.tasks.classification import ClassificationTask
    from bigmodel_train.tasks.translation import TranslationTask

    if isinstance(task, ClassificationTask):
        tok = task.tokenizer
        config = task.model_config
        return ClassifierModel(name, config, to_jax(params), lambda texts: tok(texts)["input_ids"], config.max_len,
                               "the position table's max_len", int(tok.pad_token_id or 0), max_batch,
                               labels=tuple(task.label_names))
    if isinstance(task, TranslationTask):
        return TranslationModel(name, task, to_jax(params), max_batch)
    raise ValueError(f"{path} is a {task.cfg.task!r} run; the server serves lm runs (completions, chat), "
                     "classification runs (/v1/classify) and translation runs (/v1/translate)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def sentence_pooling(path: Path) -> tuple[str, bool]:
    """(pooling "mean" | "cls", normalize) of a model directory by the module docstring's rule."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_file}: expected a list of modules")
    types = [str(m.get("type", "")) for m in modules]
    mode = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith(".Pooling"):
            cfg_file = path / str(m.get("path", "")) / "config.json"
            cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
            on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
            if on == ["pooling_mode_cls_token"]:
                mode = "cls"
            elif on not in ([], ["pooling_mode_mean_tokens"]):
                raise ValueError(f"{cfg_file}: pooling {on} is not served; mean tokens or the CLS token are")
    return mode, any(t.endswith(".Normalize") for t in types)


def load_hf_encoder(path: Path, name: str, *, max_batch: int = DEFAULT_MAX_BATCH
                    ) -> EmbeddingModel | ClassifierModel | None:
    """The served model of an HF BERT directory (``BertForSequenceClassification``: a classifier;
    any other BERT architecture: an embedding model of its encoder); None for a causal-LM
    directory (GPT-2, Llama: the generation server's); ValueError for what is not served."""
    from bigmodel_port.hf import all_architectures
    from bigmodel_port.hf.checkpoint import read_config, resolve_architecture

    hf = read_config(path)
    model_type, task = all_architectures()[resolve_architecture(hf)]
    if model_type in ("gpt2", "llama"):
        return None
    if model_type != "bert":
        raise ValueError(f"{path} is a {model_type!r} model; the server serves causal LMs (GPT-2, Llama), BERT "
                         "encoders and classifiers, and translation runs")
    from bigmodel_port.hub import jax as hub
    from bigmodel_port.tokenization import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pad = int(tok.pad_token_id or 0)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tok(texts)["input_ids"]

    if task == "sequence_classification":
        model = hub.BertForSequenceClassification.from_pretrained(path)
        C = model.config.num_labels
        id2label = hf.get("id2label") or {}
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(C))
        return ClassifierModel(name, model.config, model.params, tokenize, model.config.max_len,
                               "the position table's max_len", pad, max_batch, labels=labels)
    # another head's checkpoint (e.g. BertForMaskedLM) holds the encoder but perhaps no pooler,
    # which the embeddings never read; any other leaf left at its init would be a wrong answer
    model = hub.BertModel.from_pretrained(path, strict=task == "base")
    fresh = [k for k in model.load_report.initialised if not k.startswith("pooler/")]
    if fresh:
        raise ValueError(f"{path}: the encoder weights {fresh[:3]} are missing from the checkpoint")
    max_len, why = model.config.max_len, "the position table's max_len"
    st_file = path / "sentence_bert_config.json"
    if st_file.is_file():
        st_max = _read_json(st_file).get("max_seq_length")
        if isinstance(st_max, int) and 0 < st_max < max_len:
            max_len, why = st_max, "sentence_bert_config.json's max_seq_length"
    mode, normalize = sentence_pooling(path)
    return EmbeddingModel(name, model.config, model.params, tokenize, max_len, why, pad, max_batch,
                          pooling=mode, normalize=normalize)
