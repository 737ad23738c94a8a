"""Errors raised when reading or writing checkpoints, tokenizers and configs."""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """A model / tokenizer path is not a local directory (we never download)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked: corrupt file, unknown format version, or keys and
    shapes that do not match the model (the message lists them by name)."""
