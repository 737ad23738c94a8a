"""Flax linen modules for the GPT, BERT and encoder-decoder families (ViT's is in ``vit.py``).

Each module's ``variables["params"]`` is exactly the family's reference tree (no renaming):
every top-level entry is one ``self.param`` holding its whole subtree, initialised by the shared
``init_rule``; ``__call__`` runs the family's pure ``forward``. ``model.init(key,
method=Module.params)`` builds parameters without running a forward pass.

Training-mode dropout, the linen way: ``apply(..., deterministic=False, rngs={"dropout": key})``
draws the masks from the module's ``"dropout"`` RNG stream; or pass ``dropout_key=key`` directly
(the same masks as the pure ``forward(..., dropout_key=key)``). Neither = evaluation. ``perf``
(a module field, ``bigmodel_jax.perf.PerfOptions``) picks the computation layout of GPT and BERT.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax.core import unfreeze

from bigmodel_jax.models import bert as _bert
from bigmodel_jax.models import gpt as _gpt
from bigmodel_jax.models import seq2seq as _seq2seq
from bigmodel_jax.models.common import subtree_init
from bigmodel_jax.perf import PerfOptions
from reference_numpy.configs import BertConfig, GPTConfig, Seq2SeqConfig, param_shapes
from reference_numpy.models import bert as _rbert

Tree = dict[str, Any]


def _drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


class _TreeModule(nn.Module):
    """Declares the family's parameter tree, one ``self.param`` per top-level entry."""

    def shapes(self) -> dict[str, Any]:
        return param_shapes(self.config)

    def setup(self) -> None:
        self._tree = {name: self.param(name, subtree_init(self.config, name, s))
                      for name, s in self.shapes().items()}

    def params(self) -> Tree:
        """The parameter tree as plain dicts (``init(..., method=Module.params)``)."""
        return unfreeze(self._tree)

    def _dropout_key(self, dropout_key: jax.Array | None, deterministic: bool) -> jax.Array | None:
        """The explicit key, else the ``"dropout"`` RNG stream when not deterministic, else None."""
        if dropout_key is not None or deterministic:
            return dropout_key
        return self.make_rng("dropout")


class GPT(_TreeModule):
    """GPT-2 / Llama-style decoder; ``__call__(input_ids, attention_mask=None) -> logits``
    (B, T, V); dropout: module docstring."""

    config: GPTConfig
    perf: PerfOptions | None = None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 deterministic: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        batch = _drop_none(input_ids=input_ids, attention_mask=attention_mask)
        return _gpt.forward(self.params(), batch, self.config, perf=self.perf,
                            dropout_key=self._dropout_key(dropout_key, deterministic))


class Bert(_TreeModule):
    """BERT with one head (``"mlm"`` default, ``"base"``, ``"sequence_classification"``,
    ``"token_classification"``, ``"question_answering"``); outputs as ``models.bert.forward``;
    dropout: module docstring."""

    config: BertConfig
    head: str = "mlm"
    perf: PerfOptions | None = None

    def shapes(self) -> dict[str, Any]:
        return _rbert.param_shapes(self.config, self.head)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
                 dropout_key: jax.Array | None = None) -> Any:
        batch = _drop_none(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return _bert.forward(self.params(), batch, self.config, self.head, perf=self.perf,
                             dropout_key=self._dropout_key(dropout_key, deterministic))


class Seq2Seq(_TreeModule):
    """Encoder-decoder Transformer; ``__call__(input_ids, decoder_input_ids, ...) -> logits``
    (B, T, V); dropout: module docstring."""

    config: Seq2SeqConfig

    def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array,
                 attention_mask: jax.Array | None = None,
                 decoder_attention_mask: jax.Array | None = None, *, deterministic: bool = True,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        batch = _drop_none(input_ids=input_ids, decoder_input_ids=decoder_input_ids,
                           attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask)
        return _seq2seq.forward(self.params(), batch, self.config,
                                dropout_key=self._dropout_key(dropout_key, deterministic))
