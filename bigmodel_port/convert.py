"""Conversion between HF model directories, our native ``.safetensors`` files and ``.npz``.

The format of each side is read from the path: a directory is an HF model directory
(``config.json`` + weights), ``*.safetensors`` is our native file (tree + config + format
version in its metadata), ``*.npz`` is the same tree as NumPy arrays. Native and ``.npz`` files
remember the HF architecture and ``config.json`` they came from, so HF -> ours -> HF needs no
options and writes back the same tensors bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.errors import CheckpointError
from bigmodel_port.hf.checkpoint import load_pretrained, save_pretrained
from bigmodel_port.native import load_native, load_npz, save_native, save_npz
from reference_numpy.configs import Config
from reference_numpy.tree import tree_leaves, tree_map

FORMATS = ("hf", "native", "npz")


def format_of(path: str | os.PathLike[str]) -> str:
    """"hf" for a directory (or a path without a suffix), "native" for .safetensors, "npz"."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return "native"
    if p.suffix == ".npz":
        return "npz"
    if p.is_dir() or not p.suffix:
        return "hf"
    raise ValueError(f"cannot tell the format of {str(path)!r}: use a directory (HF), "
                     ".safetensors (native) or .npz")


def read_any(path: str | os.PathLike[str], *, strict: bool = True,
             architecture: str | None = None) -> tuple[Config, dict[str, Any], dict[str, str]]:
    """(config, NumPy tree, metadata) of a checkpoint in any of the three formats. The metadata
    carries ``architecture`` and ``hf_config`` (JSON) when known."""
    fmt = format_of(path)
    if fmt == "hf":
        got = load_pretrained(path, architecture, strict=strict)
        return got.config, got.params, {"architecture": got.architecture,
                                        "hf_config": json.dumps(got.hf_config, sort_keys=True)}
    if fmt == "native":
        tree, config, meta = load_native(path)
    else:
        tree, config, meta = load_npz(path)
        if config is None:
            raise CheckpointError(f"{path} holds no config; it cannot be converted")
    return config, tree, {k: v for k, v in meta.items() if k in ("architecture", "hf_config")}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, architecture: str | None = None,
            dtype: str | None = None, strict: bool = True, max_shard_size: int | str = "5GB") -> str:
    """Convert ``src`` to ``dst`` (formats from the paths); returns a one-line summary.

    ``architecture``: the HF class to write when converting to an HF directory from a file that
    does not remember one (or to choose another, e.g. a base model from a head model's file).
    ``dtype``: "float32" / "float64" for every leaf of the output.
    """
    config, tree, meta = read_any(src, strict=strict, architecture=architecture if format_of(src) == "hf" else None)
    if dtype is not None:
        tree = tree_map(lambda a: np.asarray(a).astype(dtype), tree)
        config = replace(config, dtype=dtype)
    out = format_of(dst)
    if out == "hf":
        arch = architecture or meta.get("architecture")
        if arch is None:
            raise ValueError(f"{src} does not say which HF architecture it is; pass architecture= "
                             "(e.g. BertForMaskedLM)")
        hf_config = json.loads(meta["hf_config"]) if "hf_config" in meta else None
        if hf_config is not None and arch not in (hf_config.get("architectures") or [arch]):
            hf_config = {k: v for k, v in hf_config.items() if k != "architectures"}
        save_pretrained(dst, config, tree, arch, hf_config, max_shard_size=max_shard_size)
    elif out == "native":
        save_native(dst, tree, config, extra_metadata=meta)
    else:
        save_npz(dst, tree, config, extra_metadata=meta)
    n = sum(int(np.size(a)) for a in tree_leaves(tree))
    return f"{src} ({format_of(src)}) -> {dst} ({out}): {type(config).__name__}, {n:,} parameters"
