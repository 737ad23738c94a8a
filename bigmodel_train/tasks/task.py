"""The ``Task`` interface, what every task shares, and the one table that dispatches on the
model family.

A ``Task`` ties a ``RunConfig`` to

* data: splits ``train`` / ``val`` (/ ``test``) whose ``batch(indices)`` gives model-ready NumPy
  batches (HF key names), built from a built-in data set or the user's files;
* the model: its config (``reference_numpy.configs``) and initial parameters (one NumPy tree for
  both backends);
* the loss on each backend: ``jax_loss(params, batch, dropout_key=, masks=)`` (traced inside the
  compiled step) and ``ref_loss_and_grad(params, batch, masks=)`` (the hand-written backward);
  ``dropout_masks(key, batch)`` draws the explicit masks both sides can share;
* evaluation: ``evaluate(params, split, backend)`` -> metrics dict, and ``summary(metrics)``.

Every call into a model family (init, loss, forward, dropout masks, on either side) goes through
``FAMILIES``, keyed by ``model_config.family``: the family modules share one signature, with
BERT's head passed after the config, so a task only says which data it feeds them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_train.config import ConfigError, RunConfig
from bigmodel_train.tasks.splits import Split
from reference_numpy.configs import ConfigFieldError, preset
from reference_numpy.tree import Tree, tree_map

__all__ = ["FAMILIES", "Family", "Task", "fit_max_len", "model_base", "with_model_overrides"]


@dataclass(frozen=True)
class Family:
    """How a task reaches one model family."""

    module: str  # the module in reference_numpy.models and in bigmodel_jax.models
    mask_dims: Callable[[dict[str, Any]], tuple[int, ...]]  # batch -> the sizes dropout_masks takes


# config.family -> Family: the one place a task dispatches on the model family.
FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", lambda b: tuple(np.shape(b["input_ids"]))),  # (B, T)
    "bert": Family("bert", lambda b: tuple(np.shape(b["input_ids"]))),  # (B, T)
    "seq2seq": Family("seq2seq", lambda b: (*np.shape(b["input_ids"]),  # (B, S, T)
                                            np.shape(b["decoder_input_ids"])[1])),
    "vit": Family("vit", lambda b: tuple(np.shape(b["pixel_values"])[:1])),  # (B,)
}

# Compiled evaluation functions of this process, by (name, Task.loss_key()).
_JIT_CACHE: dict[Any, Callable[..., Any]] = {}


def with_model_overrides(config: Any, cfg: RunConfig, **forced: Any) -> Any:
    """``config`` with the run's ``model.X`` overrides, its ``dropout`` override and ``forced``
    fields (derived from the data: vocabulary size, classes...) applied. An override that
    contradicts a forced field, or a combination the config refuses, is a ``ConfigError`` naming
    where each offending value came from."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = dict(cfg.model_overrides)
    if cfg.dropout is not None:
        changes["dropout"] = cfg.dropout
    changes["dtype"] = cfg.dtype
    for k, v in forced.items():
        if k in changes and changes[k] != v:
            raise ConfigError(f"model.{k}={changes[k]} contradicts the data, which needs {k}={v}")
        changes[k] = v
    try:
        return dataclasses.replace(config, **{k: v for k, v in changes.items() if k in fields})
    except ConfigFieldError as err:
        def source(f: str) -> str:
            if f in forced:
                return f"{f}={forced[f]!r} (from the data)"
            if f in cfg.model_overrides:
                return f"model.{f}={cfg.model_overrides[f]!r}"
            return f"{f}={getattr(config, f)!r} (model={cfg.model!r})"

        raise ConfigError(f"{', '.join(map(source, err.fields))}: {err}") from None


def fit_max_len(base: Any, cfg: RunConfig) -> int:
    """The model's ``max_len`` for data whose sequences are ``cfg.seq_len`` positions long.

    An explicit ``model.max_len`` is kept, and refused when shorter than that. Without one, the
    preset's own is raised to ``seq_len`` when shorter, and the change is printed: a value is
    either refused or its change is said, never adjusted silently.
    """
    if "max_len" in cfg.model_overrides:
        max_len = cfg.model_overrides["max_len"]
        if max_len < cfg.seq_len:
            raise ConfigError(f"model.max_len={max_len} is shorter than seq_len={cfg.seq_len}, the length of every "
                              f"{cfg.task} sequence: set model.max_len >= {cfg.seq_len} or lower seq_len")
        return max_len
    if base.max_len < cfg.seq_len:
        print(f"note: model.max_len raised from {base.max_len} (preset {cfg.model!r}) to {cfg.seq_len} "
              f"to fit seq_len={cfg.seq_len}")
        return cfg.seq_len
    return base.max_len


def model_base(cfg: RunConfig, cls: type) -> Any:
    """The model preset named by ``cfg.model``, checked to be of this task's family."""
    try:
        base = preset(cfg.model)
    except ValueError as err:
        raise ConfigError(f"model={cfg.model!r}: {err}") from None
    if not isinstance(base, cls):
        raise ConfigError(f"model={cfg.model!r} is a {type(base).__name__}, but task={cfg.task!r} needs a "
                          f"{cls.__name__} preset")
    return base


def _dropout_kwargs(dropout_key: Any, masks: Any) -> dict[str, Any]:
    """Dropout keyword arguments, passed only when set (evaluation-mode calls stay plain)."""
    kw = {}
    if dropout_key is not None:
        kw["dropout_key"] = dropout_key
    if masks is not None:
        kw["masks"] = masks
    return kw


class Task:
    """Base class; see the module docstring. Subclasses set ``unit`` and implement the hooks."""

    unit = "examples"  # what throughput counts: "tokens", "images" or "examples"
    head: str | None = None  # BERT's head, passed after the config to every family function

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

    # --- model: every family function is reached through FAMILIES ----------------------------
    model_config: Any = None  # set by the subclass; its ``family`` picks the row of FAMILIES

    def _head(self) -> tuple[str, ...]:
        return () if self.head is None else (self.head,)

    def jax_module(self) -> Any:
        """``bigmodel_jax.models.<family>`` (imported on first use: the NumPy backend needs no jax)."""
        return importlib.import_module(f"bigmodel_jax.models.{FAMILIES[self.model_config.family].module}")

    def ref_module(self) -> Any:
        """``reference_numpy.models.<family>``."""
        return importlib.import_module(f"reference_numpy.models.{FAMILIES[self.model_config.family].module}")

    def init_params(self) -> Tree:
        """Fresh parameters from ``cfg.seed`` (one NumPy tree for both backends)."""
        rng = np.random.default_rng(self.cfg.seed)
        return self.ref_module().init(self.model_config, rng, *self._head())

    def jax_loss(self, params: Tree, batch: dict[str, Any], *, dropout_key: Any = None, masks: Any = None) -> Any:
        """Mean loss of ``batch`` (traced inside the compiled step)."""
        return self.jax_module().loss(params, batch, self.model_config, *self._head(),
                                      **_dropout_kwargs(dropout_key, masks))

    def ref_loss_and_grad(self, params: Tree, batch: dict[str, Any], *, masks: Any = None) -> tuple[Any, Tree]:
        """(loss, grads) by the reference's hand-written backward."""
        return self.ref_module().loss_and_grad(params, batch, self.model_config, *self._head(),
                                               **_dropout_kwargs(None, masks))

    def dropout_masks(self, key: Any, batch: dict[str, Any]) -> Tree | None:
        """The masks ``jax_loss(..., dropout_key=key)`` draws for ``batch``, as a NumPy tree
        (None when the model has no dropout)."""
        if not getattr(self.model_config, "dropout", 0.0):
            return None
        dims = FAMILIES[self.model_config.family].mask_dims(batch)
        masks = self.jax_module().dropout_masks(self.model_config, key, *dims, *self._head())
        return tree_map(np.asarray, masks)

    def ref_dropout_masks(self, rng: np.random.Generator, batch: dict[str, Any]) -> Tree | None:
        """Masks for the NumPy backend, drawn with ``rng`` (None when the model has no dropout)."""
        if not getattr(self.model_config, "dropout", 0.0):
            return None
        dims = FAMILIES[self.model_config.family].mask_dims(batch)
        return self.ref_module().dropout_masks(self.model_config, rng, *dims, *self._head())

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a batch ``forward`` reads (all of it by default)."""
        return batch

    def forward(self, params: Tree, batch: dict[str, Any], backend: str) -> Any:
        """Evaluation-mode outputs (logits) as NumPy, on either backend (JAX: compiled once)."""
        batch, head = self.forward_inputs(batch), self._head()
        if backend == "numpy":
            return np.asarray(self.ref_module().forward(params, batch, self.model_config, *head))
        module = self.jax_module()
        fn = self._jit("forward", lambda: lambda p, b, c: module.forward(p, b, c, *head))
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
