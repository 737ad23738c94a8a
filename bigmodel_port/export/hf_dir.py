"""``bigmodel export --format hf``: an :class:`ExportModel` as a HuggingFace model directory.

The weights and ``config.json`` are written by ``bigmodel_port.hf.checkpoint.save_pretrained``
(the one HF name table per architecture); this module adds what a run knows besides them:

* label names as ``id2label`` / ``label2id`` (classification and image runs' ``labels.json``);
* the token ids (``bos`` / ``eos`` / ``pad`` / ``decoder_start``) in ``config.json`` and
  ``generation_config.json``, so ``generate`` stops where our decoding stops;
* the tokenizer files (``ExportModel.tokenizer.save_pretrained``);
* ``preprocessor_config.json`` for ViT (what ``AutoImageProcessor`` reads: the run's pixel
  scaling, no resize, no normalisation).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.export import ExportModel, expressible
from bigmodel_port.hf import marian
from bigmodel_port.hf.checkpoint import save_pretrained

__all__ = ["hf_config_base", "write_hf_dir"]

_HF_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id",
               "decoder_start": "decoder_start_token_id"}


def hf_config_base(model: ExportModel) -> dict[str, Any]:
    """The ``config.json`` fields we add to what the architecture writes: labels and token ids."""
    base = dict(model.hf_config or {})
    if model.labels is not None:
        base["id2label"] = {str(i): name for i, name in enumerate(model.labels)}
        base["label2id"] = {name: i for i, name in enumerate(model.labels)}
    for ours, key in _HF_ID_KEYS.items():
        if ours in model.special_ids:
            base[key] = int(model.special_ids[ours])
    if model.family == "seq2seq" and "eos" in model.special_ids:
        base["forced_eos_token_id"] = int(model.special_ids["eos"])
    return base


def _generation_config(model: ExportModel, hf: dict[str, Any]) -> dict[str, Any] | None:
    if model.generation_config is not None:
        return model.generation_config
    if model.task not in ("causal_lm", "seq2seq_lm") and model.family not in ("gpt", "seq2seq"):
        return None
    ids = {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                     "forced_eos_token_id") if hf.get(key) is not None}
    return ids or None


def write_hf_dir(model: ExportModel, out: Path, *, max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Write ``model`` to the (empty) directory ``out``; returns a summary dict. ``ValueError``
    (before anything is written) for a config the architecture cannot carry.

    An encoder-decoder with interleaved sinusoids or no final logits bias is first rewritten to
    its exact Marian equivalent (``marian.as_marian``), so a default ``seq2seq-tiny`` run exports."""
    if model.architecture in marian.ARCHITECTURES:
        params, config = marian.as_marian(model.params, model.config)
        model = replace(model, config=config, params=params)
    config = expressible(model)
    base = hf_config_base(model)
    if model.labels is not None and getattr(config, "num_labels", len(model.labels)) != len(model.labels):
        raise ValueError(f"{len(model.labels)} label names for a model with num_labels={config.num_labels}")
    d = save_pretrained(out, config, model.params, model.architecture, base, max_shard_size=max_shard_size)
    hf = json.loads((d / "config.json").read_text(encoding="utf-8"))
    gen = _generation_config(model, hf)
    if gen is not None:
        atomic_write_text(d / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(d)
    if model.preprocessor is not None:
        atomic_write_text(d / "preprocessor_config.json", json.dumps(model.preprocessor, indent=2, sort_keys=True) + "\n")
    return {"format": "hf", "architecture": model.architecture, "tokenizer": model.tokenizer is not None}


def vit_preprocessor(image_size: int, scale: float = 1.0) -> dict[str, Any]:
    """``preprocessor_config.json`` of a ViT run: pixels times ``scale``, no resize, no
    normalisation (the images are already the model's size: the run's NCHW inputs)."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": scale != 1.0,
            "rescale_factor": scale, "do_normalize": False, "size": {"height": image_size, "width": image_size}}
