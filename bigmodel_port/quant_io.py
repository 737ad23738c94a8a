"""Quantised parameter trees (``reference_numpy.quant``) in the native ``.safetensors`` format.

A ``QuantizedWeight`` at path ``P`` is stored as two tensors, ``P/q`` (int8, or uint8 packed
int4) and ``P/scale`` (float), through ``bigmodel_port.native.save_native`` (so the file has the
native header: format, version, config, CRC-32 of every tensor). Its static fields go in one
extra metadata entry, ``quantization``: JSON ``{"version": 1, "leaves": {P: {"bits",
"group_size", "axes", "dtype"}}}``. ``load_quantized`` reads the file with ``load_native`` and
rebuilds the leaves; a file without the entry loads as a plain tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.errors import CheckpointError
from bigmodel_port.native import load_native, save_native
from reference_numpy.configs import Config
from reference_numpy.quant import QuantizedWeight, is_quantized

QUANT_KEY = "quantization"
QUANT_VERSION = 1


def _split(tree: Any, path: str, leaves: dict[str, dict[str, Any]]) -> Any:
    if isinstance(tree, dict):
        return {k: _split(v, f"{path}/{k}" if path else k, leaves) for k, v in tree.items()}
    if is_quantized(tree):
        leaves[path] = {"bits": tree.bits, "group_size": tree.group_size, "axes": list(tree.axes),
                        "dtype": tree.dtype}
        return {"q": np.asarray(tree.q), "scale": np.asarray(tree.scale)}
    return np.asarray(tree)


def save_quantized(path: str | os.PathLike[str], tree: Any, config: Config, *,
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """Write a (partly) quantised tree (NumPy or JAX leaves) and its config to ``path``."""
    leaves: dict[str, dict[str, Any]] = {}
    flat_tree = _split(tree, "", leaves)
    extra = dict(extra_metadata or {})
    if QUANT_KEY in extra:
        raise ValueError(f"extra_metadata may not set the reserved key {QUANT_KEY!r}")
    extra[QUANT_KEY] = json.dumps({"version": QUANT_VERSION, "leaves": leaves}, sort_keys=True)
    return save_native(path, flat_tree, config, extra_metadata=extra)


def load_quantized(path: str | os.PathLike[str]) -> tuple[Any, Config, dict[str, str]]:
    """``(tree, config, metadata)``: the tree with its ``QuantizedWeight`` leaves rebuilt."""
    tree, config, metadata = load_native(path, allow_quantized=True)
    if QUANT_KEY not in metadata:
        return tree, config, metadata
    try:
        info = json.loads(metadata[QUANT_KEY])
        version, leaves = info["version"], info["leaves"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: corrupt file: its {QUANT_KEY!r} metadata is not the JSON this "
                              "module writes") from None
    if version != QUANT_VERSION:
        raise CheckpointError(f"{path}: quantization format version {version!r}, this code reads "
                              f"{QUANT_VERSION}; upgrade bigmodel to read it")
    for leaf_path, meta in leaves.items():
        *parents, name = leaf_path.split("/")
        node = tree
        try:
            for p in parents:
                node = node[p]
            parts = node[name]
            node[name] = QuantizedWeight(parts["q"], parts["scale"], int(meta["bits"]), int(meta["group_size"]),
                                         tuple(int(a) for a in meta["axes"]), str(meta["dtype"]))
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: quantised leaf {leaf_path!r} is named in the metadata but its "
                                  "q / scale tensors are missing") from None
    return tree, config, metadata


__all__ = ["QUANT_KEY", "QUANT_VERSION", "load_quantized", "save_quantized"]
