"""Generation refuses empty prompts and NaN / inf / out-of-range settings, on both sides (issue #14).

One set of rules (``reference_numpy.generation.check_sampling_options``, ``check_prompt``,
``check_request_length``) serves every public entry point: the NumPy reference's ``greedy``,
``beam_search``, ``seq2seq_generate`` and ``hf_generate`` and their ``bigmodel_jax.generation``
twins plus the JAX sampler ``generate``. Before this, ``temperature=nan`` was accepted and the JAX
sampler emitted token 0 forever. Every refusal happens before anything is compiled.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import bigmodel_jax.generation as jgen
from bigmodel_jax.tree import to_jax
from reference_numpy import generation as rgen
from reference_numpy.configs import preset
from reference_numpy.generation import check_sampling_options
from reference_numpy.models import gpt as rgpt
from reference_numpy.models import seq2seq as rseq2seq

NAN, INF = float("nan"), float("inf")
LM = preset("gpt2-tiny", n_layers=1)  # V = 101, max_len = 64
S2S = dataclasses.replace(preset("seq2seq-tiny"), n_layers=1, n_decoder_layers=1)  # V = 89, max_len = 64
LM_PARAMS = rgpt.init(LM, np.random.default_rng(0))
S2S_PARAMS = rseq2seq.init(S2S, np.random.default_rng(0))
PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


def _decoders(**kw):
    """name -> call(input_ids, attention_mask) for every decoder-only entry point, both sides."""
    jp, key = to_jax(LM_PARAMS), jax.random.key(0)
    beam = {k: v for k, v in kw.items() if k in ("max_new_tokens", "length_penalty")}
    greedy = {k: v for k, v in kw.items() if k == "max_new_tokens"}
    sample = {k: v for k, v in kw.items() if k in ("max_new_tokens", "temperature", "top_k", "top_p")}
    hf = {k: v for k, v in kw.items() if k != "num_beams"}
    return {
        "numpy greedy": lambda ids, m: rgen.greedy(LM_PARAMS, ids, LM, attention_mask=m, **greedy),
        "numpy beam_search": lambda ids, m: rgen.beam_search(LM_PARAMS, ids, LM, attention_mask=m, num_beams=2, **beam),
        "numpy hf_generate": lambda ids, m: rgen.hf_generate(LM_PARAMS, {"input_ids": ids, "attention_mask": m}, LM,
                                                             num_beams=2, **hf),
        "jax generate": lambda ids, m: jgen.generate(jp, ids, LM, attention_mask=m, key=key,
                                                     **{"temperature": 0.7, **sample}),
        "jax beam_search": lambda ids, m: jgen.beam_search(jp, ids, LM, attention_mask=m, num_beams=2, **beam),
        "jax hf_generate (sampling)": lambda ids, m: jgen.hf_generate(
            jp, {"input_ids": ids, "attention_mask": m}, LM, do_sample=True, **hf),
        "jax hf_generate (beams)": lambda ids, m: jgen.hf_generate(
            jp, {"input_ids": ids, "attention_mask": m}, LM, num_beams=2, **hf),
    }


def _translators(**kw):
    """name -> call(input_ids, attention_mask) for every encoder-decoder entry point, both sides."""
    jp = to_jax(S2S_PARAMS)
    beam = {k: v for k, v in kw.items() if k in ("max_new_tokens", "length_penalty")}
    hf = {k: v for k, v in kw.items() if k != "num_beams"}
    batch = lambda ids, m: {"input_ids": ids} if m is None else {"input_ids": ids, "attention_mask": m}  # noqa: E731
    return {
        "numpy seq2seq_generate": lambda ids, m: rgen.seq2seq_generate(S2S_PARAMS, batch(ids, m), S2S, num_beams=2,
                                                                       **beam),
        "numpy hf_generate": lambda ids, m: rgen.hf_generate(S2S_PARAMS, batch(ids, m), S2S, num_beams=2,
                                                             decoder_start_token_id=0, **hf),
        "jax seq2seq_generate (greedy)": lambda ids, m: jgen.seq2seq_generate(jp, batch(ids, m), S2S, **beam),
        "jax seq2seq_generate (beams)": lambda ids, m: jgen.seq2seq_generate(jp, batch(ids, m), S2S, num_beams=2,
                                                                            **beam),
        "jax hf_generate": lambda ids, m: jgen.hf_generate(jp, batch(ids, m), S2S, decoder_start_token_id=0, **hf),
    }


def _all_refuse(calls, ids, mask, pattern):
    for name, call in calls.items():
        with pytest.raises(ValueError, match=pattern):
            call(ids, mask)
            pytest.fail(f"{name} accepted it")


# --------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("setting,value,pattern", [
    ("temperature", NAN, r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    ("temperature", INF, r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    ("temperature", -INF, "temperature must be a finite number"),
    ("temperature", -0.5, r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    ("temperature", "1", "temperature must be a finite number"),
    ("top_p", 0.0, r"top_p must be None \(off\) or a number in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must be None \(off\) or a number in \(0, 1\], got 1.5"),
    ("top_p", NAN, r"top_p must be None \(off\) or a number in \(0, 1\], got nan"),
    ("top_k", -1, r"top_k must be None \(off\) or an int in \[1, 101\], got -1"),
    ("top_k", 0, r"top_k must be None \(off\) or an int in \[1, 101\], got 0"),
    ("top_k", 2.5, r"top_k must be None \(off\) or an int in \[1, 101\], got 2.5"),
    ("top_k", True, r"top_k must be None \(off\) or an int in \[1, 101\], got True"),
])
def test_nan_inf_and_out_of_range_sampling_settings_are_refused(setting, value, pattern):
    calls = {name: call for name, call in _decoders(max_new_tokens=2, **{setting: value}).items()
             if "beam_search" not in name and "greedy" not in name}  # the entry points that take the setting
    _all_refuse(calls, PROMPT, None, pattern)
    # the NumPy reference has no sampler but checks the settings its hf_generate takes, and the
    # rules themselves live there
    with pytest.raises(ValueError, match=pattern):
        check_sampling_options(LM.vocab_size, max_new_tokens=2, **{setting: value})


@pytest.mark.parametrize("value", [0, -1, 2.5, True, None])
def test_max_new_tokens_below_one_or_not_an_int_is_refused(value):
    pattern = rf"max_new_tokens must be an int >= 1, got {value!r}"
    _all_refuse(_decoders(max_new_tokens=value), PROMPT, None, pattern)
    _all_refuse(_translators(max_new_tokens=value), PROMPT, None, pattern)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_non_finite_length_penalty_is_refused(value):
    pattern = rf"length_penalty must be a finite number, got {value!r}"
    calls = {n: c for n, c in _decoders(max_new_tokens=2, length_penalty=value).items()
             if n not in ("numpy greedy", "jax generate")}  # the entry points that take it
    _all_refuse(calls, PROMPT, None, pattern)
    _all_refuse(_translators(max_new_tokens=2, length_penalty=value), PROMPT, None, pattern)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_num_beams_below_one_or_not_an_int_is_refused(value):
    pattern = rf"num_beams must be in \[1, 101\], got {value!r}"
    jp = to_jax(LM_PARAMS)
    for name, call in {"numpy": lambda: rgen.beam_search(LM_PARAMS, PROMPT, LM, max_new_tokens=2, num_beams=value),
                       "jax": lambda: jgen.beam_search(jp, PROMPT, LM, max_new_tokens=2, num_beams=value)}.items():
        with pytest.raises(ValueError, match=pattern):
            call()
            pytest.fail(f"{name} accepted num_beams={value!r}")


def test_good_settings_at_the_edges_pass_the_shared_check():
    for kw in [dict(temperature=0), dict(temperature=np.float32(0.5)), dict(temperature=1e-3, top_k=101, top_p=1),
               dict(top_k=1, top_p=np.float64(1e-6)), dict(length_penalty=-2.0), dict(max_new_tokens=np.int64(3))]:
        check_sampling_options(101, **{"max_new_tokens": 1, **kw})


# --------------------------------------------------------------------------------------------
# prompts and lengths


@pytest.mark.parametrize("shape", [(1, 0), (0, 3), (0, 0)])
def test_an_empty_prompt_is_refused(shape):
    ids = np.zeros(shape, np.int64)
    pattern = rf"input_ids is empty \(shape \({shape[0]}, {shape[1]}\)\)"
    _all_refuse(_decoders(max_new_tokens=2), ids, None, pattern)
    _all_refuse(_translators(max_new_tokens=2), ids, None, pattern)


def test_a_prompt_whose_mask_marks_no_token_is_refused():
    mask = np.array([[1, 1, 1], [0, 0, 0]])
    pattern = r"attention_mask marks no token in row 1 of input_ids"
    _all_refuse(_decoders(max_new_tokens=2), PROMPT, mask, pattern)
    _all_refuse(_translators(max_new_tokens=2), PROMPT, mask, pattern)


def test_a_request_beyond_the_models_length_names_both_numbers():
    # prompt 3 + 62 new = 65 > max_len 64; 61 would fit
    pattern = (r"the prompt length \(3\) \+ max_new_tokens \(62\) = 65 is longer than the model supports "
               r"\(max_len=64\); .* at most 61")
    _all_refuse(_decoders(max_new_tokens=62), PROMPT, None, pattern)
    # the decoder start token takes one of the target's max_len slots
    pattern = (r"the decoder start token \(1\) \+ max_new_tokens \(64\) = 65 is longer than the model supports "
               r"\(max_len=64\)")
    _all_refuse(_translators(max_new_tokens=64), PROMPT, None, pattern)


def test_nan_temperature_no_longer_reaches_the_sampler():
    """The trial run's case: ``generate(temperature=nan)`` used to return token 0 forever."""
    with pytest.raises(ValueError, match="temperature"):
        jgen.generate(to_jax(LM_PARAMS), PROMPT, LM, max_new_tokens=4, temperature=NAN)
