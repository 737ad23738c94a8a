"""transformers-style model classes over our functional models, for either implementation.

``BertModel.from_pretrained(dir)`` etc. read an HF-format directory (``bigmodel_port.hf``), hold
our config and parameter tree, and run the family's ``forward`` of one *backend*: the NumPy
reference (``bigmodel_port.hub.numpy``) or JAX (``bigmodel_port.hub.jax``). The classes are
generated here once per backend from the architecture tables (``bigmodel_port.hf.<arch>.ARCHITECTURES``
and ``AUTO_TASKS`` below: the one list of HF class names), so both backends expose the same names,
signatures and output fields (HF's: ``last_hidden_state``, ``pooler_output``, ``logits``,
``start_logits`` / ``end_logits``), and a model saved by one loads in the other or in
transformers::

    from bigmodel_port.hub.jax import BertModel        # or bigmodel_port.hub.numpy
    from bigmodel_port.tokenization import BertTokenizer
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Protocol

import numpy as np

from bigmodel_port.hf import all_architectures, arch_module
from bigmodel_port.hf.checkpoint import canonical_config, check_tree, fit_config, load_pretrained, param_shapes
from bigmodel_port.hf.checkpoint import read_config, resolve_architecture
from bigmodel_port.hf.checkpoint import save_pretrained as _save_pretrained
from bigmodel_port.hf.mapping import LoadReport
from reference_numpy.configs import Config
from reference_numpy.models.common import init_params


class ModelOutput(dict):
    """Outputs by HF's field names; ``out.logits`` and ``out["logits"]`` both work, and
    ``out[0]`` is the first field (as transformers' ``ModelOutput``). ``None`` fields are dropped."""

    def __init__(self, **fields: Any) -> None:
        super().__init__({k: v for k, v in fields.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


class Backend(Protocol):
    """What an implementation provides to the model classes."""

    name: str

    def from_numpy(self, tree: dict[str, Any], dtype: str) -> Any:
        """Our NumPy tree -> the backend's tree."""

    def to_numpy(self, tree: Any) -> dict[str, Any]:
        """The backend's tree -> a NumPy tree."""

    def run(self, task: str, config: Config, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The task's outputs, by HF field name, for checked ``inputs``."""

    def generate(self, task: str, config: Config, params: Any, inputs: dict[str, Any],
                 **options: Any) -> np.ndarray:
        """Token ids (B, T + new) for a causal LM, (B, new + 1) for a seq2seq LM (HF layout)."""


# task -> the inputs the task reads (anything else given to __call__ is refused)
TASK_INPUTS = {
    "base": ("input_ids", "attention_mask", "token_type_ids", "pixel_values"),
    "mlm": ("input_ids", "attention_mask", "token_type_ids"),
    "sequence_classification": ("input_ids", "attention_mask", "token_type_ids"),
    "token_classification": ("input_ids", "attention_mask", "token_type_ids"),
    "question_answering": ("input_ids", "attention_mask", "token_type_ids"),
    "causal_lm": ("input_ids", "attention_mask"),
    "image_classification": ("pixel_values",),
    "seq2seq_lm": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
}


def prepare_inputs(config: Config, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """HF-style inputs as the batch our ``forward`` reads: arrays (lists and torch tensors are
    converted), and ``pixel_values`` cast to the parameters' dtype as HF's ViT does."""
    batch = {k: np.asarray(v) for k, v in inputs.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].astype(params["patch_embed"]["kernel"].dtype)
    return batch


def bert_outputs(task: str, out: Any) -> dict[str, Any]:
    """A BERT head's ``forward`` result by HF field name (both backends)."""
    if task == "base":
        h, pooled = out
        return {"last_hidden_state": h, "pooler_output": pooled}
    if task == "question_answering":
        return {"start_logits": out[..., 0], "end_logits": out[..., 1]}
    return {"logits": out}


class PreTrainedModel:
    """One HF architecture on one backend: ``config`` (ours), ``params`` (the backend's tree),
    ``hf_config`` (the ``config.json`` it came from, kept for saving) and ``load_report``.

    The class decides the config fields its transformers class decides (which pooler and head
    exist, whether a base model's head is tied: ``bigmodel_port.hf.checkpoint.fit_config``), so
    ``BertForMaskedLM(preset("bert-tiny"))`` has no pooler, as HF's. ``save_pretrained`` then
    ``from_pretrained`` gives back an equal config and bit-identical parameters, or the save
    refuses the config by naming what config.json cannot carry.
    """

    architecture: ClassVar[str] = ""
    model_type: ClassVar[str] = ""
    task: ClassVar[str] = ""
    backend: ClassVar[Backend]

    def __init__(self, config: Config, params: Any = None, *, hf_config: dict[str, Any] | None = None,
                 seed: int = 0, load_report: LoadReport | None = None,
                 generation_config: dict[str, Any] | None = None) -> None:
        """A model of ``config``; ``params`` (a NumPy or backend tree) or a fresh init from ``seed``.

        ``config`` is first fitted to this class (``fit_config``: ``ValueError`` for a field the
        class contradicts) and put in the form a reload of it reads (``canonical_config``);
        given ``params`` must then hold exactly this class's leaves (``ValueError`` listing the
        missing, extra and misshapen ones).
        """
        config = canonical_config(fit_config(config, self.architecture), self.architecture, hf_config)
        shapes = param_shapes(config, self.task)
        if params is None:
            params = init_params(shapes, config.n_layers, np.random.default_rng(seed), np.dtype(config.dtype))
        else:
            check_tree(params, shapes, f"{type(self).__name__} with this config")
        if isinstance(_first_leaf(params), np.ndarray):
            params = self.backend.from_numpy(params, config.dtype)
        self.config = config
        self.params = params
        self.hf_config = dict(hf_config or {})
        self.load_report = load_report or LoadReport()
        self.generation_config = generation_config

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, strict: bool = True, dtype: str | None = None,
                        seed: int = 0, allow_int_cast: bool = False, **config_overrides: Any) -> PreTrainedModel:
        """Load a local HF-format directory (``config.json`` + ``model.safetensors``, sharded
        safetensors, or ``pytorch_model.bin``). Models are never downloaded: a hub id that is not a
        local directory raises ``ModelNotFoundError`` saying how to point at a local copy.

        ``strict=False`` is the opt-in to a partial load (e.g. a new classification head): the
        leaves that did not load are initialised from ``seed`` and listed in ``load_report``.
        ``config_overrides`` change fields of our config (e.g. ``num_labels=3``); one that this
        class decides (``pooler=False`` for ``BertModel``) is refused as in the constructor.
        An integer or boolean tensor for a (float) parameter raises ``CheckpointError`` naming
        it, unless ``allow_int_cast=True`` casts it.
        """
        got = load_pretrained(path, cls.architecture, strict=strict, dtype=dtype, seed=seed,
                              config_overrides=config_overrides or None, allow_int_cast=allow_int_cast,
                              fit=True)
        return cls(got.config, got.params, hf_config=got.hf_config, load_report=got.report,
                   generation_config=got.generation_config)

    def save_pretrained(self, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB") -> None:
        """Write an HF-format directory that transformers' ``from_pretrained`` loads (atomic files)."""
        _save_pretrained(path, self.config, self.backend.to_numpy(self.params), self.architecture,
                         self.hf_config or None, max_shard_size=max_shard_size,
                         generation_config=self.generation_config)

    def num_parameters(self) -> int:
        """Scalars in the parameter tree."""
        return sum(int(np.prod(np.shape(a))) for a in _leaves(self.params))

    # ---------------------------------------------------------------------------------------
    def __call__(self, input_ids: Any = None, attention_mask: Any = None, **inputs: Any) -> ModelOutput:
        """Run the model; arguments and output fields as transformers' class of the same name."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        given = {k: v for k, v in given.items() if v is not None}
        allowed = TASK_INPUTS[self.task]
        extra = sorted(set(given) - set(allowed))
        if extra:
            raise TypeError(f"{type(self).__name__} does not take {extra}; it takes {list(allowed)}")
        return ModelOutput(**self.backend.run(self.task, self.config, self.params, given))

    def generate(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> np.ndarray:
        """Token ids as transformers' ``generate`` (greedy, or beam search with ``num_beams``)."""
        if self.task not in ("causal_lm", "seq2seq_lm"):
            raise TypeError(f"{type(self).__name__} does not generate text")
        for key, value in self.generation_defaults().items():
            if key not in options:
                options[key] = value
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.backend.generate(self.task, self.config, self.params, inputs, **options)

    def generation_defaults(self) -> dict[str, Any]:
        """What transformers' ``generate`` takes from the model when not given: the EOS, pad and
        decoder-start ids, and for Marian its logits rules (``forced_eos_token_id``, single-token
        ``bad_words_ids``) -- from ``generation_config.json`` when the directory has one, as
        transformers does, else from ``config.json``."""
        source = self.generation_config if self.generation_config is not None else self.hf_config
        mod = arch_module(self.model_type)
        if hasattr(mod, "generation_options"):
            return mod.generation_options(source)
        keys = ("eos_token_id", "pad_token_id")
        return {k: source[k] for k in keys if source.get(k) is not None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, backend={self.backend.name})"


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def _first_leaf(tree: Any) -> Any:
    return _leaves(tree)[0]


# --------------------------------------------------------------------------------------------
# Auto classes: dispatch on config.json

AUTO_TASKS = {
    "AutoModel": "base",
    "AutoModelForCausalLM": "causal_lm",
    "AutoModelForMaskedLM": "mlm",
    "AutoModelForSeq2SeqLM": "seq2seq_lm",
    "AutoModelForSequenceClassification": "sequence_classification",
    "AutoModelForTokenClassification": "token_classification",
    "AutoModelForQuestionAnswering": "question_answering",
    "AutoModelForImageClassification": "image_classification",
}


class AutoModelBase:
    """Picks the class for ``config.json``'s ``model_type`` and this Auto class's task."""

    task: ClassVar[str] = ""
    classes: ClassVar[dict[str, type[PreTrainedModel]]] = {}

    def __init__(self) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedModel:
        """The model of ``path`` for this Auto class's task (see ``PreTrainedModel.from_pretrained``)."""
        hf = read_config(path)
        arch = resolve_architecture(hf, task=cls.task)
        return cls.classes[arch].from_pretrained(path, **kwargs)


def make_classes(backend: Backend) -> dict[str, type]:
    """Every supported HF architecture class and Auto class, bound to ``backend``."""
    classes: dict[str, type] = {}
    for arch, (model_type, task) in all_architectures().items():
        classes[arch] = type(arch, (PreTrainedModel,), {
            "architecture": arch, "model_type": model_type, "task": task, "backend": backend,
            "__doc__": f"transformers' ``{arch}`` on our {backend.name} implementation "
                       f"(task {task!r}); see ``bigmodel_port.hub.PreTrainedModel``.",
        })
    for name, task in AUTO_TASKS.items():
        classes[name] = type(name, (AutoModelBase,), {
            "task": task, "classes": classes,
            "__doc__": f"transformers' ``{name}``: dispatches on config.json to a {task!r} model.",
        })
    return classes

