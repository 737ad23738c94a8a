"""transformers-style classes (``BertModel.from_pretrained`` ...) on the NumPy reference.

The classes come from ``bigmodel_port.modeling`` (shared with ``bigmodel_jax.hub``); this module
is the reference *backend*: it runs each task with the reference's own ``forward``. File IO and
tokenizers come from ``bigmodel_port`` (safetensors, tokenizers); the math stays NumPy. This
module is imported on first use of one of those names, so ``import reference_numpy`` itself
still loads nothing but NumPy and the standard library.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_port.modeling import make_classes
from reference_numpy import generation
from reference_numpy.configs import Config
from reference_numpy.models import bert, gpt, seq2seq, vit


class ReferenceBackend:
    """Runs HF tasks with ``reference_numpy.models.*`` (float32 or float64, eval mode)."""

    name = "numpy"

    def from_numpy(self, tree: dict[str, Any], dtype: str) -> dict[str, Any]:
        return tree

    def to_numpy(self, tree: dict[str, Any]) -> dict[str, Any]:
        return tree

    def run(self, task: str, config: Config, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_inputs(config, params, inputs)
        if config.family == "bert":
            out = bert.forward(params, batch, config, head=task)
            return bert_outputs(task, out)
        if config.family == "gpt":
            if task == "base":
                return {"last_hidden_state": gpt.hidden_states(params, batch, config)}
            return {"logits": gpt.forward(params, batch, config)}
        if config.family == "vit":
            h = vit.hidden_states(params, batch, config)
            if task == "base":
                return {"last_hidden_state": h,
                        "pooler_output": vit.pooler_output(params, h) if config.pooler else None}
            return {"logits": vit.forward(params, batch, config)}
        return {"logits": seq2seq.forward(params, batch, config)}

    def generate(self, task: str, config: Config, params: Any, inputs: dict[str, Any], **options: Any) -> np.ndarray:
        return generation.hf_generate(params, inputs, config, **options)


def prepare_inputs(config: Config, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """HF-style inputs as the batch our ``forward`` reads: arrays (lists and torch tensors are
    converted), and ``pixel_values`` cast to the parameters' dtype as HF's ViT does."""
    batch = {k: np.asarray(v) for k, v in inputs.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].astype(params["patch_embed"]["kernel"].dtype)
    return batch


def bert_outputs(task: str, out: Any) -> dict[str, Any]:
    """A BERT head's ``forward`` result by HF field name (shared with the JAX backend)."""
    if task == "base":
        h, pooled = out
        return {"last_hidden_state": h, "pooler_output": pooled}
    if task == "question_answering":
        return {"start_logits": out[..., 0], "end_logits": out[..., 1]}
    return {"logits": out}


BACKEND = ReferenceBackend()
CLASSES = make_classes(BACKEND)
globals().update(CLASSES)
__all__ = ["BACKEND", "CLASSES", *CLASSES]
