"""HuggingFace-format checkpoints: one module per architecture holds its whole name table.

Every architecture module defines ``MODEL_TYPE``, ``FAMILY``, ``ARCHITECTURES`` (HF class name ->
our task), ``config_from_hf(hf, architecture)``, ``config_to_hf(config, architecture, base)`` and
``mapping(config, architecture)``; ``bigmodel_port.hf.checkpoint`` does the rest generically.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.json model_type -> module in this package
MODEL_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "vit": "vit", "marian": "marian"}


def arch_module(model_type: str) -> ModuleType:
    """The architecture module of an HF ``model_type``, or a clear error naming the supported ones."""
    try:
        name = MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(MODEL_TYPES)}") from None
    return importlib.import_module(f"bigmodel_port.hf.{name}")


def all_architectures() -> dict[str, tuple[str, str]]:
    """HF class name -> (model_type, our task), over every supported architecture."""
    out = {}
    for mt in MODEL_TYPES:
        try:
            mod = arch_module(mt)
        except ImportError:  # an architecture module not written yet
            continue
        out.update({arch: (mt, task) for arch, task in mod.ARCHITECTURES.items()})
    return out
