"""Resolving a user's model path to a local directory; models are never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from bigmodel_port.errors import ModelNotFoundError


def local_model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a local directory, or a clear error.

    A HuggingFace repo id such as ``bert-base-uncased`` is not resolved: bigmodel reads only
    local directories in HuggingFace layout (``config.json`` plus weights / tokenizer files).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelNotFoundError(f"{str(path)!r} is a file, not a model directory; pass the directory "
                                 "that holds config.json and the weight / tokenizer files")
    raise ModelNotFoundError(
        f"{str(path)!r} is not a local directory. bigmodel never downloads models or data: copy the "
        "model to this machine first (for example `huggingface-cli download "
        f"{path} --local-dir ./{Path(str(path)).name}` on a machine with network, or "
        "`save_pretrained(dir)` from transformers) and pass that directory's path."
    )
