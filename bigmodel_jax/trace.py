"""Layer-by-layer trace of a JAX model's forward pass; twin of ``reference_numpy.trace``.

Dims: B batch, T time, S source time, D model width, V vocabulary, C classes, L layers.

Same row names and definitions as ``reference_numpy.trace`` (see its docstring). The rows come
from each family's own ``forward`` in ``bigmodel_jax.models``, through its ``collect=`` option
(the blocks under the same layer loop, handing each sub-layer's output out as a loop output),
so the trace runs exactly the model's code. Rows come back as NumPy arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.models import bert, gpt, seq2seq, vit
from bigmodel_jax.tree import to_jax
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig

Tree = dict[str, Any]
Trace = list[tuple[str, np.ndarray]]

__all__ = ["Trace", "trace"]


def trace(config: Config, params: Tree, batch: dict[str, Any], task: str) -> Trace:
    """The layer-by-layer trace of the JAX model ``config`` with ``params`` (NumPy or JAX tree)
    on ``batch``; rows and ``task`` as in ``reference_numpy.trace.trace``. float64 needs x64."""
    params = to_jax(params)
    batch = {k: (None if v is None else jnp.asarray(v)) for k, v in batch.items()}
    rows: list = []
    if isinstance(config, BertConfig):
        out = bert.forward(params, batch, config, task, collect=rows)  # "base" collects its outputs
        if task != "base":
            rows.append(("logits", out))
    elif isinstance(config, GPTConfig):
        if task == "base":
            rows.append(("last_hidden_state", gpt.hidden_states(params, batch, config, collect=rows)))
        else:
            rows.append(("logits", gpt.forward(params, batch, config, collect=rows)))
    elif isinstance(config, ViTConfig):
        if task == "base":
            h, pooled = vit.encode(params, batch, config, collect=rows)
            rows.append(("last_hidden_state", h))
            if pooled is not None:
                rows.append(("pooler_output", pooled))
        else:
            rows.append(("logits", vit.forward(params, batch, config, collect=rows)))
    elif isinstance(config, Seq2SeqConfig):
        logits = seq2seq.forward(params, batch, config, collect=rows)
        rows.append(("last_hidden_state", rows[-1][1]) if task == "base" else ("logits", logits))
    else:
        raise TypeError(f"no trace for config type {type(config).__name__}")
    return [(name, np.asarray(jax.device_get(a))) for name, a in rows]
