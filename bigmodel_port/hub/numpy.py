"""The transformers-style classes (``BertModel.from_pretrained`` ...) on the NumPy reference.

The classes come from ``bigmodel_port.hub`` (shared with ``bigmodel_port.hub.jax``); this module
is the reference *backend*: it runs each task with the reference's own ``forward`` (float32 or
float64, eval mode). File IO and tokenizers are ``bigmodel_port``'s; the math stays NumPy::

    from bigmodel_port.hub.numpy import BertModel
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_port.hub import bert_outputs, make_classes, prepare_inputs
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


BACKEND = ReferenceBackend()
CLASSES = make_classes(BACKEND)
globals().update(CLASSES)
__all__ = ["BACKEND", "CLASSES", *CLASSES]
