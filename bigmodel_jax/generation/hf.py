"""transformers' ``generate`` arguments mapped onto our decoders (the model classes' ``generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from bigmodel_jax.generation.beam import beam_search
from bigmodel_jax.generation.sampling import generate
from bigmodel_jax.generation.seq2seq import seq2seq_generate
from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.generation import check_sampling_options

Tree = dict[str, Any]


def hf_generate(params: Tree, inputs: dict[str, Any], config: GPTConfig | Seq2SeqConfig, *,
                max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0, num_beams: int = 1,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                decoder_start_token_id: int | None = None, suppress_tokens: Sequence[int] = (),
                forced_eos_token_id: int | None = None) -> jax.Array:
    """transformers' ``generate`` arguments -> greedy, sampling or beam decoding (the model
    classes' ``generate``); the twin of ``reference_numpy.generation.hf_generate``.

    ``do_sample=True`` samples (decoders) from softmax(logits / temperature) within ``top_k`` /
    ``top_p`` with ``jax.random.key(seed)``; the draws are JAX's, not PyTorch's, so sampled
    tokens differ from HF's while greedy and beam tokens are the same. Every setting is checked
    (``check_sampling_options``) whichever mode reads it: a NaN temperature is refused even
    without sampling.
    """
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, length_penalty=length_penalty)
    beam = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if isinstance(config, Seq2SeqConfig):
        if do_sample:
            raise ValueError("encoder-decoder generation is greedy or beam search (do_sample=False)")
        if decoder_start_token_id is None:
            raise ValueError("an encoder-decoder needs decoder_start_token_id (HF: the config's, often pad)")
        batch = {k: v for k, v in inputs.items() if v is not None}
        return seq2seq_generate(params, batch, config, decoder_start_token_id=decoder_start_token_id,
                                suppress_tokens=tuple(suppress_tokens), forced_eos_token_id=forced_eos_token_id,
                                **beam)
    if suppress_tokens or forced_eos_token_id is not None:
        raise ValueError("suppress_tokens / forced_eos_token_id are implemented for encoder-decoders only")
    mask = inputs.get("attention_mask")
    if do_sample:
        if num_beams != 1 or num_return_sequences != 1:
            raise ValueError("sampling is implemented with num_beams=1, num_return_sequences=1")
        return generate(params, inputs["input_ids"], config, max_new_tokens=max_new_tokens, attention_mask=mask,
                        temperature=temperature, top_k=top_k, top_p=top_p, key=jax.random.key(seed),
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return beam_search(params, inputs["input_ids"], config, attention_mask=mask, **beam)
