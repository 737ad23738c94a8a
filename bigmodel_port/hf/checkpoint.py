"""Load and save HF-format model directories (``config.json`` + weights) as our config + tree."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.errors import CheckpointError
from bigmodel_port.hf import all_architectures, arch_module
from bigmodel_port.hf.common import num_labels_from_hf
from bigmodel_port.hf.mapping import LoadReport, export_state_dict, import_state_dict
from bigmodel_port.paths import local_model_dir
from bigmodel_port.weights import load_state_dict, save_state_dict
from reference_numpy.configs import BertConfig, Config, param_shapes as _param_shapes
from reference_numpy.models.bert import param_shapes as _bert_param_shapes
from reference_numpy.models.common import init_params
from reference_numpy.tree import tree_flatten, tree_map


@dataclass
class Pretrained:
    """What ``load_pretrained`` read: our config and NumPy tree, the HF architecture and task, the
    original ``config.json`` (kept so a save writes back the fields we do not model) and the
    load report."""

    config: Config
    params: dict[str, Any]
    architecture: str
    task: str
    hf_config: dict[str, Any]
    report: LoadReport
    generation_config: dict[str, Any] | None = None  # generation_config.json, when the directory has one


def param_shapes(config: Config, task: str) -> dict[str, Any]:
    """Leaf shapes of ``config``'s tree for ``task`` (BERT adds its head's leaves)."""
    if isinstance(config, BertConfig):
        return _bert_param_shapes(config, task)
    return _param_shapes(config)


# HF class -> the fields of our config that the class decides. transformers builds these parts
# from the class (``add_pooling_layer``, which head exists), not from config.json, so a config
# that disagrees describes a tree the class never holds: its checkpoint would miss tensors or
# carry extra ones. field -> (the class's value, whether this class's outputs read the field,
# what to do instead when a value the outputs read is refused).
ARCHITECTURE_FIELDS: dict[str, dict[str, tuple[Any, bool, str]]] = {
    "BertModel": {"pooler": (True, True, "transformers' add_pooling_layer=False is not a class here; "
                                          "load such a checkpoint with strict=False (the pooler is then "
                                          "initialised and listed in load_report)")},
    "BertForMaskedLM": {"pooler": (False, False, "")},
    "BertForSequenceClassification": {"pooler": (True, True, "its classifier reads the pooled output")},
    "BertForTokenClassification": {"pooler": (False, False, "")},
    "BertForQuestionAnswering": {"pooler": (False, False, ""), "num_labels": (2, False, "")},
    "ViTModel": {"classifier": (False, False, ""),
                 "pooler": (True, True, "transformers' add_pooling_layer=False is not a class here; "
                                        "load such a checkpoint with strict=False (the pooler is then "
                                        "initialised and listed in load_report)")},
    "ViTForImageClassification": {"classifier": (True, True, "the logits come from the classifier"),
                                  "pooler": (False, False, "")},
    # a base model has no output head, so nothing can be untied from the embedding
    "GPT2Model": {"tie_embeddings": (True, False, "")},
    "LlamaModel": {"tie_embeddings": (True, False, "")},
}


def fit_config(config: Config, architecture: str) -> Config:
    """``config`` with the fields that the HF class ``architecture`` decides (``ARCHITECTURE_FIELDS``).

    A field this class's outputs never read is set to the class's value: a pooler under a
    masked-LM, token or QA head, a classifier under ``ViTModel``, an untied output head under a
    base GPT model, the two QA labels (their leaves would be dead weight that no checkpoint of
    this class holds). A field the outputs do read is set only from its dataclass default
    (``ViTConfig`` has no pooler by default, ``ViTModel`` has one); any other disagreement
    (``BertForSequenceClassification`` without a pooler) is refused with ``ValueError`` naming
    the field, the class's value and what to do instead.
    """
    model_type_of(architecture)  # a clear error for an unknown class
    changes = {}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for field, (value, read, hint) in ARCHITECTURE_FIELDS.get(architecture, {}).items():
        got = getattr(config, field)
        if got == value:
            continue
        if read and got != defaults[field]:
            raise ValueError(f"{architecture} always has {field}={value!r} (transformers decides it by the "
                             f"class, not by config.json); this config has {field}={got!r}: {hint}")
        changes[field] = value
    return replace(config, **changes) if changes else config


def model_type_of(architecture: str) -> str:
    """The ``config.json`` ``model_type`` of an HF class we support, or a clear error."""
    known = all_architectures()
    if architecture not in known:
        raise ValueError(f"unknown HF architecture {architecture!r}; supported: {sorted(known)}")
    return known[architecture][0]


def hf_config_for(config: Config, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict that ``save_pretrained`` writes for ``config`` as ``architecture``
    (``base``: the original config.json, whose fields we do not model are kept).

    Beyond the architecture module's ``config_to_hf``: the label count is always written
    (``id2label``), as transformers writes it for every model, so a headless model keeps its
    ``num_labels`` too. Raises ``ValueError`` for a config the architecture cannot express.
    """
    hf = arch_module(model_type_of(architecture)).config_to_hf(config, architecture, base)
    labels = getattr(config, "num_labels", None)
    if labels is not None and num_labels_from_hf(hf) != labels:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        if "num_labels" in hf:
            hf["num_labels"] = labels
    return hf


def _resolved(config: Config) -> dict[str, Any]:
    """``config``'s fields with the "None = derived" ones filled in (``n_kv_heads`` None = H,
    ``n_decoder_layers`` None = the encoder's depth, ``head_dim`` None = D / H): two configs
    with equal resolved fields describe the same model."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if out.get("n_kv_heads", 0) is None:
        out["n_kv_heads"] = config.n_heads
    if out.get("n_decoder_layers", 0) is None:
        out["n_decoder_layers"] = config.n_layers
    if out.get("head_dim", 0) is None:
        out["head_dim"] = config.d_model // config.n_heads
    return out


def check_expressible(config: Config, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict for ``config`` (``hf_config_for``), after checking that
    ``load_pretrained`` reads it back as the same model: ``ValueError`` otherwise, naming every
    field config.json cannot carry (e.g. a label-smoothed Marian, a GPT-2 with a RoPE base it
    does not use) or the architecture's own refusal (a pre-norm Marian, a RoPE GPT-2)."""
    hf = hf_config_for(config, architecture, base)
    try:
        back = arch_module(model_type_of(architecture)).config_from_hf(hf, architecture)
    except ValueError as e:
        raise ValueError(f"this config cannot be saved as {architecture}: its config.json would not load "
                         f"({e})") from None
    ours, theirs = _resolved(config), _resolved(back)
    diff = [f"{k}={ours[k]!r} (it reads back as {theirs[k]!r})" for k in ours if ours[k] != theirs[k]]
    if diff:
        raise ValueError(f"this config cannot be saved as {architecture}: config.json cannot carry "
                         + "; ".join(diff))
    return hf


def canonical_config(config: Config, architecture: str, base: dict[str, Any] | None = None) -> Config:
    """``config`` as ``load_pretrained`` would read it back from a save (``n_kv_heads=4`` rather
    than None for Llama, say), when that is the same model; ``config`` itself otherwise (a config
    the class can run but not save: ``save_pretrained`` then says why)."""
    try:
        hf = check_expressible(config, architecture, base)
        return arch_module(model_type_of(architecture)).config_from_hf(hf, architecture)
    except ValueError:
        return config


def check_tree(params: dict[str, Any], shapes: dict[str, Any], what: str) -> None:
    """``params`` has exactly the leaves of ``shapes`` (NumPy or JAX arrays), with those shapes;
    ``ValueError`` listing every missing, extra and wrongly shaped leaf otherwise (an extra leaf
    would be dropped without a word on save)."""
    have = {k: tuple(np.shape(v)) for k, v in tree_flatten(params).items()}
    want = {k: tuple(v) for k, v in tree_flatten(shapes).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"extra {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: {have[k]} vs {want[k]}" for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if problems:
        raise ValueError(f"the parameters do not fit {what}:\n  " + "\n  ".join(problems))


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a local model directory, with clear errors."""
    d = local_model_dir(path)
    f = d / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{d} has no config.json (found: {sorted(p.name for p in d.iterdir())})")
    try:
        hf = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise CheckpointError(f"{f} has no model_type")
    return hf


def resolve_architecture(hf: dict[str, Any], architecture: str | None = None, task: str | None = None) -> str:
    """The HF class to build: ``architecture`` if given, else the one of ``config.json`` — or, when
    ``task`` is given (the Auto classes), the class of that task for this ``model_type``."""
    mod = arch_module(hf["model_type"])
    if architecture is not None:
        if architecture not in mod.ARCHITECTURES:
            raise ValueError(f"{architecture} is not a {hf['model_type']} architecture; "
                             f"known: {sorted(mod.ARCHITECTURES)}")
        return architecture
    if task is not None:
        for arch, t in mod.ARCHITECTURES.items():
            if t == task:
                return arch
        raise ValueError(f"model_type {hf['model_type']!r} has no {task!r} model here; it has "
                         f"{sorted(set(mod.ARCHITECTURES.values()))}")
    for arch in hf.get("architectures") or []:
        if arch in mod.ARCHITECTURES:
            return arch
    raise ValueError(f"config.json architectures {hf.get('architectures')} are not supported; "
                     f"supported for {hf['model_type']}: {sorted(mod.ARCHITECTURES)}")


def load_pretrained(
    path: str | os.PathLike[str],
    architecture: str | None = None,
    *,
    task: str | None = None,
    strict: bool = True,
    dtype: str | None = None,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    allow_int_cast: bool = False,
    fit: bool = False,
) -> Pretrained:
    """Read an HF model directory into our config and NumPy parameter tree.

    ``strict=False`` allows a partial load (e.g. a fresh classification head): leaves without a
    matching tensor are initialised from ``seed`` and listed in ``report.initialised``.
    ``dtype``: "float32" / "float64" for every leaf (default: the config's); float16 / bfloat16
    tensors are cast to it. ``config_overrides``: fields of our config to change after
    translation (e.g. ``num_labels``). An integer or boolean tensor for one of our (float)
    parameters raises ``CheckpointError`` naming it, unless ``allow_int_cast=True``
    (``bigmodel_port.hf.mapping.check_float_source``). ``fit=True`` (the hub classes) applies
    ``fit_config`` after the overrides, so an override the class contradicts is refused before
    any weight is read.
    """
    d = local_model_dir(path)
    hf = read_config(d)
    arch = resolve_architecture(hf, architecture, task)
    mod = arch_module(hf["model_type"])
    config = mod.config_from_hf(hf, arch)
    if config_overrides:
        config = replace(config, **config_overrides)
    if dtype is not None:
        config = replace(config, dtype=dtype)
    if fit:
        config = fit_config(config, arch)
    task_ = mod.ARCHITECTURES[arch]
    shapes = param_shapes(config, task_)
    np_dtype = np.dtype(config.dtype)
    state = load_state_dict(d)

    def init(shapes_: dict[str, Any]) -> dict[str, Any]:
        return init_params(shapes_, config.n_layers, np.random.default_rng(seed), np_dtype)

    params, report = import_state_dict(state, mod.mapping(config, arch), shapes, strict=strict, init=init,
                                       dtype=np_dtype, allow_int_cast=allow_int_cast)
    gen = d / "generation_config.json"
    generation = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else None
    return Pretrained(config, params, arch, task_, hf, report, generation)


def save_pretrained(
    path: str | os.PathLike[str],
    config: Config,
    params: dict[str, Any],
    architecture: str,
    hf_config: dict[str, Any] | None = None,
    *,
    max_shard_size: int | str = "5GB",
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``params`` as an HF model directory (``config.json`` + safetensors) that
    transformers' ``from_pretrained`` loads; every file is written atomically.

    ``load_pretrained`` of the directory gives back ``config`` (up to "None = derived" fields
    such as ``n_kv_heads``) and ``params`` bit for bit. A config that config.json cannot carry,
    or a tree with leaves the config does not have, raises ``ValueError`` before anything is
    written (``check_expressible``, ``check_tree``).
    """
    mod = arch_module(model_type_of(architecture))
    given_type = (hf_config or {}).get("model_type", mod.MODEL_TYPE)
    if given_type != mod.MODEL_TYPE:
        raise ValueError(f"{architecture} is a {mod.MODEL_TYPE!r} model, but hf_config has model_type {given_type!r}")
    task = mod.ARCHITECTURES[architecture]
    hf = check_expressible(config, architecture, hf_config)
    shapes = param_shapes(config, task)
    tree = tree_map(np.asarray, params)
    check_tree(tree, shapes, f"{architecture} with this config")
    state = export_state_dict(tree, mod.mapping(config, architecture), shapes)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_state_dict(d, state, max_shard_size=max_shard_size)
    atomic_write_text(d / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        atomic_write_text(d / "generation_config.json", json.dumps(generation_config, indent=2, sort_keys=True) + "\n")
    return d
