"""Incremental decoding with a KV cache: greedy, sampling and beam search, for the GPT / Llama
decoder and the encoder-decoder, token for token transformers' ``generate``.

Every step is the model's own forward with a cache option (``step``); this package holds only
the decoding algorithms around it:

* ``layout``: the decoding layout of the weights (``decode_params``, ``DECODE_LAYOUT``);
* ``step``: one cached step, ``decode_step`` / ``seq2seq_decode_step``;
* ``sampling``: greedy and sampled decoding (``generate``, ``token_loop``, ``filter_logits``);
* ``beam``: beam search (``beam_search``, ``beam_loop``);
* ``seq2seq``: encoder-decoder generation (``seq2seq_generate``, ``constrain_logits``);
* ``hf``: transformers' ``generate`` arguments (``hf_generate``).

Caches: ``models.gpt.init_cache`` (stacked, ``{"k", "v"}`` (L, B, S, K, E)),
``models.gpt.init_layer_caches`` (the unrolled layout's per-layer heads-major caches) and
``models.seq2seq.init_cache`` (plus the cross-attention's projected source).
"""

from bigmodel_jax.generation.beam import IMPOSSIBLE, beam_loop, beam_search
from bigmodel_jax.generation.hf import hf_generate
from bigmodel_jax.generation.layout import DECODE_LAYOUT, decode_params
from bigmodel_jax.generation.sampling import check_prompt, filter_logits, generate, token_loop
from bigmodel_jax.generation.seq2seq import constrain_logits, seq2seq_generate
from bigmodel_jax.generation.step import decode_step, seq2seq_decode_step
from bigmodel_jax.models.gpt import init_cache, init_layer_caches

__all__ = ["DECODE_LAYOUT", "IMPOSSIBLE", "beam_loop", "beam_search", "check_prompt", "constrain_logits",
           "decode_params", "decode_step", "filter_logits", "generate", "hf_generate", "init_cache",
           "init_layer_caches", "seq2seq_decode_step", "seq2seq_generate", "token_loop"]
