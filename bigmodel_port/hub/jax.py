"""The transformers-style classes (``BertModel.from_pretrained`` ...) on the JAX implementation.

The classes come from ``bigmodel_port.hub`` (shared with ``bigmodel_port.hub.numpy``); this
module is the JAX *backend*: inputs are checked on the host (so a bad id raises a clear error,
not an XLA crash), then one jit-compiled function per (task, config, shapes) runs the model::

    from bigmodel_port.hub.jax import BertModel
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import numpy as np

from bigmodel_jax import generation
from bigmodel_jax.models import bert, gpt, seq2seq, vit
from bigmodel_jax.tree import to_jax, to_numpy
from bigmodel_port.hub import bert_outputs, make_classes, prepare_inputs
from reference_numpy.configs import Config
from reference_numpy.models.bert import check_batch as check_bert_batch
from reference_numpy.models.common import check_token_batch
from reference_numpy.models.seq2seq import check_source, check_target
from reference_numpy.models.vit import check_pixels


@partial(jax.jit, static_argnames=("task", "config"))
def _run(params: Any, batch: dict[str, Any], task: str, config: Config) -> dict[str, Any]:
    if config.family == "bert":
        return bert_outputs(task, bert.forward(params, batch, config, head=task))
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


def check_inputs(task: str, config: Config, params: Any, batch: dict[str, Any]) -> None:
    """Host-side checks of concrete inputs (ids in range, shapes, lengths) before tracing."""
    if config.family == "bert":
        check_bert_batch(batch, config, task)
    elif config.family == "gpt":
        check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    elif config.family == "vit":
        check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    else:
        ids, _ = check_source(batch, config)
        check_target(batch, config, ids.shape[0])


class JaxBackend:
    """Runs HF tasks with ``bigmodel_jax.models.*``, jit-compiled."""

    name = "jax"

    def from_numpy(self, tree: dict[str, Any], dtype: str) -> Any:
        return to_jax(tree)

    def to_numpy(self, tree: Any) -> dict[str, Any]:
        return to_numpy(tree)

    def run(self, task: str, config: Config, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        batch = prepare_inputs(config, params, inputs)
        check_inputs(task, config, params, batch)
        out = _run(params, batch, task, config)
        return {k: v for k, v in out.items() if v is not None}

    def generate(self, task: str, config: Config, params: Any, inputs: dict[str, Any], **options: Any) -> np.ndarray:
        return np.asarray(generation.hf_generate(params, inputs, config, **options))


BACKEND = JaxBackend()
CLASSES = make_classes(BACKEND)
globals().update(CLASSES)
__all__ = ["BACKEND", "CLASSES", *CLASSES]
