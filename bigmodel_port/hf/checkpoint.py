"""Load and save HF-format model directories (``config.json`` + weights) as our config + tree."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.errors import CheckpointError
from bigmodel_port.hf import all_architectures, arch_module
from bigmodel_port.hf.mapping import LoadReport, export_state_dict, import_state_dict
from bigmodel_port.paths import local_model_dir
from bigmodel_port.weights import load_state_dict, save_state_dict
from reference_numpy.configs import BertConfig, Config, param_shapes as _param_shapes
from reference_numpy.models.bert import param_shapes as _bert_param_shapes
from reference_numpy.models.common import init_params
from reference_numpy.tree import tree_map


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
) -> Pretrained:
    """Read an HF model directory into our config and NumPy parameter tree.

    ``strict=False`` allows a partial load (e.g. a fresh classification head): leaves without a
    matching tensor are initialised from ``seed`` and listed in ``report.initialised``.
    ``dtype``: "float32" / "float64" for every leaf (default: the config's).
    ``config_overrides``: fields of our config to change after translation (e.g. ``num_labels``).
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
    task_ = mod.ARCHITECTURES[arch]
    shapes = param_shapes(config, task_)
    np_dtype = np.dtype(config.dtype)
    state = load_state_dict(d)

    def init(shapes_: dict[str, Any]) -> dict[str, Any]:
        return init_params(shapes_, config.n_layers, np.random.default_rng(seed), np_dtype)

    params, report = import_state_dict(state, mod.mapping(config, arch), shapes, strict=strict, init=init,
                                       dtype=np_dtype)
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
    transformers' ``from_pretrained`` loads; every file is written atomically."""
    model_type = (hf_config or {}).get("model_type") or next(
        mt for arch, (mt, _) in all_architectures().items() if arch == architecture)
    mod = arch_module(model_type)
    task = mod.ARCHITECTURES[architecture]
    shapes = param_shapes(config, task)
    tree = tree_map(np.asarray, params)
    state = export_state_dict(tree, mod.mapping(config, architecture), shapes)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_state_dict(d, state, max_shard_size=max_shard_size)
    hf = mod.config_to_hf(config, architecture, hf_config)
    atomic_write_text(d / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        atomic_write_text(d / "generation_config.json", json.dumps(generation_config, indent=2, sort_keys=True) + "\n")
    return d
