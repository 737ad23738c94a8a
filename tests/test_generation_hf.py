"""Greedy decoding and beam search token for token as transformers' ``generate`` (v5).

Tiny random-init transformers models (``GPT2LMHeadModel``, ``LlamaForCausalLM`` with grouped
KV heads, ``MarianMTModel``; ``torch.manual_seed``, no downloads) are saved to a temp dir and
loaded with ``bigmodel_port.hf.checkpoint.load_pretrained``; both our packages must return
exactly the ids ``model.generate(..., do_sample=False)`` returns -- same tokens, same fill after
EOS, same (cropped) length, same order of the returned hypotheses.

The EOS id is chosen among the tokens the model actually emits early (the second token greedy
gives row 0), so rows finish mid-sequence, finished hypotheses compete with running beams and
the ``early_stopping`` rules decide; the sweeps assert that these paths were taken.

Exact token equality needs well-separated scores: both sides compute float32 logits in a
different order (~1e-6 apart, see tests/test_hf_gpt2_llama.py), so a near-tie could flip. The
weights use ``INIT_STD`` = 0.3 (HF's default is 0.02): the next-token distributions are peaked,
so candidate scores are far apart compared with 1e-6 and the EOS id is likely enough to end
sequences early. (Measured: the sweeps below also match at 0.02, but then no beam search ends
early, so the stopping rules go untested.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import transformers

from bigmodel_jax import generation as jgen
from bigmodel_jax.tree import to_jax
from bigmodel_port.hf.checkpoint import load_pretrained
from reference_numpy import generation as rgen

pytestmark = pytest.mark.hf

INIT_STD = 0.3  # see the module docstring
V, T0, N = 64, 4, 8  # vocabulary, prompt length, max_new_tokens
SEEDS = (0, 1, 2)


def _causal_lm(kind: str, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         initializer_range=INIT_STD)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=INIT_STD)
    return transformers.LlamaForCausalLM(config).eval()


def _without_default_ids(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """HF's generate falls back on the generation config's ids (LlamaConfig has eos 2, bos 1): we
    clear them, so every id a test uses is one it passes to both sides."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, None)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: torch's thread pool only adds overhead, and on a busy machine
    oversubscription made each ``generate`` call ~100x slower (3 s instead of 0.02 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, int], tuple]:
    """(kind, seed) -> (HF model, our Pretrained, our params as a JAX tree)."""
    out = {}
    for kind, seed in itertools.product(("gpt2", "llama"), SEEDS):
        model = _causal_lm(kind, seed)
        d = tmp_path_factory.mktemp(f"{kind}{seed}")
        model.save_pretrained(d)
        pre = load_pretrained(d)
        out[kind, seed] = (_without_default_ids(model), pre, to_jax(pre.params))
    return out


def _prompts(seed: int, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, V, (batch, T0))


def _hf_generate(model, input_ids: np.ndarray, **kw) -> np.ndarray:
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                              **kw).numpy()


def _assert_same(want: np.ndarray, got: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, transformers {want.shape}\n{got}\n{want}"
    np.testing.assert_array_equal(got, want, err_msg=what)


def _early_eos(pre, ids: np.ndarray) -> int:
    """An EOS id the model emits early: the second token greedy gives row 0."""
    return int(rgen.greedy(pre.params, ids, pre.config, max_new_tokens=2)[0, T0 + 1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_matches_transformers(models, kind):
    """num_beams=1: argmax, pad after EOS (``pad_token_id``, or the EOS id when None, as HF),
    stop once every row has finished (the output is then shorter than T0 + N)."""
    cropped = 0
    for seed in SEEDS:
        model, pre, jp = models[kind, seed]
        ids = _prompts(seed)
        eos = _early_eos(pre, ids)
        # one row stops at its EOS, which ends the decoding early
        cases = [(dict(), ids), (dict(eos_token_id=eos, pad_token_id=0), ids), (dict(eos_token_id=eos), ids[:1]),
                 (dict(eos_token_id=[eos, (eos + 1) % V], pad_token_id=5), ids[:1])]
        for kw, rows in cases:
            want = _hf_generate(model, rows, **kw)
            what = f"{kind} seed={seed} {kw} B={len(rows)}"
            _assert_same(want, rgen.greedy(pre.params, rows, pre.config, max_new_tokens=N, **kw), "numpy " + what)
            _assert_same(want, np.asarray(jgen.generate(jp, rows, pre.config, max_new_tokens=N, **kw)), "jax " + what)
            # num_beams=1 is greedy in beam_search too, as HF's generate dispatches it
            _assert_same(want, rgen.beam_search(pre.params, rows, pre.config, max_new_tokens=N, num_beams=1, **kw),
                         "numpy beam_search(num_beams=1) " + what)
            cropped += want.shape[1] < T0 + N
    assert cropped, "no greedy run stopped early: the test needs an EOS that ends every row"


def _hypotheses(out: np.ndarray, eos) -> np.ndarray:
    """The generated tokens up to and including each row's first EOS, -1 after (whatever the
    fill id), at width N: outputs compared as hypotheses."""
    gen = np.full((out.shape[0], N), -1)
    gen[:, :out.shape[1] - T0] = out[:, T0:]
    ended = np.cumsum(np.isin(gen, eos), axis=1) - np.isin(gen, eos) > 0  # after the first EOS
    return np.where(ended, -1, gen)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_beam_search_matches_transformers(models, kind):
    """num_beams in {2, 4} x length_penalty in {1, 0.5, 2} x early_stopping in {False, True,
    "never"}, with every hypothesis returned (``num_return_sequences=num_beams``: the whole
    finished set, best first) for False and "never" on two prompts, the best one for True on
    one prompt; pad ids 0 (HF then fills with the EOS id), None and 5; two EOS ids (HF keeps
    (1 + 2) * W candidates then) for the last seed with W=2."""
    seen = dict(cropped=0, eos_returned=0, early_stopping_matters=0)
    compiles = jgen.beam._beam_search._cache_size()
    for seed, W in itertools.product(SEEDS, (2, 4)):
        model, pre, jp = models[kind, seed]
        ids = _prompts(seed, batch=2)
        eos = _early_eos(pre, ids)
        eos_arg = [eos, (eos + 7) % V] if (seed, W) == (SEEDS[-1], 2) else eos
        for lp in (1.0, 0.5, 2.0):
            by_rule = set()
            # early_stopping=True on prompt 0 alone: the search ends early only when every
            # prompt's does, which one prompt reaches more often
            for es, pad, R, rows in ((False, 0, W, ids), (True, None, 1, ids[:1]), ("never", 5, W, ids)):
                kw = dict(num_beams=W, length_penalty=lp, early_stopping=es, num_return_sequences=R,
                          eos_token_id=eos_arg, pad_token_id=pad)
                want = _hf_generate(model, rows, **kw)
                what = f"{kind} seed={seed} B={len(rows)} {kw}"
                _assert_same(want, rgen.beam_search(pre.params, rows, pre.config, max_new_tokens=N, **kw),
                             "numpy " + what)
                _assert_same(want, np.asarray(jgen.beam_search(jp, rows, pre.config, max_new_tokens=N, **kw)),
                             "jax " + what)
                seen["cropped"] += want.shape[1] < T0 + N
                seen["eos_returned"] += np.isin(want[:, T0:], eos_arg).any()
                by_rule.add(_hypotheses(want[:1], eos_arg).tobytes())  # prompt 0's best
            seen["early_stopping_matters"] += len(by_rule) > 1
    assert all(seen.values()), f"a beam-search path was not exercised: {seen}"
    # the length penalty, early-stopping rule and EOS / pad ids are traced: one compilation per
    # (W, number of EOS ids) in {(2, 1), (4, 1), (2, 2)} and (batch, num_return_sequences) in
    # {(2, W), (1, 1)}
    assert jgen.beam._beam_search._cache_size() - compiles <= 3 * 2


def test_beam_search_returns_the_best_hypothesis_first(models):
    """num_return_sequences=1 is the first of the num_return_sequences=W hypotheses."""
    model, pre, jp = models["llama", 0]
    ids = _prompts(0)
    kw = dict(num_beams=4, eos_token_id=_early_eos(pre, ids), pad_token_id=0)
    want = _hf_generate(model, ids, **kw)
    all_four = rgen.beam_search(pre.params, ids, pre.config, max_new_tokens=N, num_return_sequences=4, **kw)
    best = rgen.beam_search(pre.params, ids, pre.config, max_new_tokens=N, **kw)
    _assert_same(want, best, "numpy best")
    _assert_same(want, np.asarray(jgen.beam_search(jp, ids, pre.config, max_new_tokens=N, **kw)), "jax best")
    np.testing.assert_array_equal(best, all_four[::4, :best.shape[1]])


def test_beam_search_without_eos_matches_transformers(models):
    """No EOS id: every hypothesis runs to max_new_tokens and the finished set is the best W of
    the last step (a negative length penalty and "never" for good measure)."""
    model, pre, jp = models["gpt2", 1]
    ids = _prompts(1)
    kw = dict(num_beams=3, length_penalty=-1.0, early_stopping="never", num_return_sequences=2)
    want = _hf_generate(model, ids, **kw)
    _assert_same(want, rgen.beam_search(pre.params, ids, pre.config, max_new_tokens=N, **kw), "numpy")
    _assert_same(want, np.asarray(jgen.beam_search(jp, ids, pre.config, max_new_tokens=N, **kw)), "jax")


# --------------------------------------------------------------------------------------------
# encoder-decoder: Marian

MARIAN_PAD, MARIAN_EOS, MARIAN_V = 58, 0, 60  # Marian's convention: pad is also the decoder start


def _marian(seed: int) -> transformers.MarianMTModel:
    torch.manual_seed(seed)
    config = transformers.MarianConfig(
        vocab_size=MARIAN_V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        pad_token_id=MARIAN_PAD, decoder_start_token_id=MARIAN_PAD, eos_token_id=MARIAN_EOS,
        forced_eos_token_id=None, init_std=INIT_STD, activation_function="swish", scale_embedding=True)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # a nonzero output bias, so that leaf is exercised too
        model.final_logits_bias.copy_(0.5 * torch.randn_like(model.final_logits_bias))
    return model


def _source(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(200 + seed)
    ids = rng.integers(1, MARIAN_PAD, (3, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded source row, pad ids there as a tokenizer writes them
    ids[mask == 0] = MARIAN_PAD
    ids[np.arange(3), mask.sum(1) - 1] = MARIAN_EOS
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_marian_beam_search_matches_transformers(seed, tmp_path):
    """Encoder-decoder beam search (the same ``beam_loop``): lengths count the generated tokens
    after the decoder start token. HF's Marian logits rules (``forced_eos_token_id``,
    ``bad_words_ids``) are off here; tests/test_hf_generate_classes.py covers them with beams."""
    model = _marian(seed)
    model.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path)
    jp = to_jax(pre.params)
    src = _source(seed)
    free = rgen.seq2seq_generate(pre.params, src, pre.config, max_new_tokens=N, decoder_start_token_id=MARIAN_PAD)
    eos = int(free[0, 2])  # the second token row 0 emits
    seen = dict(cropped=0, eos_returned=0)
    for W, lp, (es, R, rows) in itertools.product((2, 4), (1.0, 2.0), ((False, None, 3), (True, 1, 1),
                                                                      ("never", None, 3))):
        R = R or W  # every hypothesis for False / "never", on three sentences; the best for True, on one
        kw = dict(num_beams=W, length_penalty=lp, early_stopping=es, num_return_sequences=R, eos_token_id=eos,
                  pad_token_id=MARIAN_PAD)
        batch = {k: v[:rows] for k, v in src.items()}
        with torch.no_grad():
            want = model.generate(torch.tensor(batch["input_ids"]),
                                  attention_mask=torch.tensor(batch["attention_mask"]), do_sample=False,
                                  max_new_tokens=N, **kw).numpy()
        ours = dict(max_new_tokens=N, decoder_start_token_id=MARIAN_PAD, **kw)
        what = f"marian seed={seed} B={rows} {kw}"
        _assert_same(want, rgen.seq2seq_generate(pre.params, batch, pre.config, **ours), "numpy " + what)
        _assert_same(want, np.asarray(jgen.seq2seq_generate(jp, batch, pre.config, **ours)), "jax " + what)
        seen["cropped"] += want.shape[1] < 1 + N
        seen["eos_returned"] += (want[:, 1:] == eos).any()
    assert all(seen.values()), f"a beam-search path was not exercised: {seen}"


# --------------------------------------------------------------------------------------------
# argument checks


def test_bad_decoding_arguments_are_refused(models):
    _, pre, jp = models["gpt2", 0]
    ids = _prompts(0)
    for beam_search in (rgen.beam_search, jgen.beam_search):
        params = pre.params if beam_search is rgen.beam_search else jp
        with pytest.raises(ValueError, match=r"num_return_sequences must be in \[1, num_beams=2\]"):
            beam_search(params, ids, pre.config, max_new_tokens=2, num_beams=2, num_return_sequences=3)
        with pytest.raises(ValueError, match="early_stopping must be one of"):
            beam_search(params, ids, pre.config, max_new_tokens=2, num_beams=2, early_stopping="sometimes")
        with pytest.raises(ValueError, match=r"eos_token_id must lie in \[0, 64\)"):
            beam_search(params, ids, pre.config, max_new_tokens=2, num_beams=2, eos_token_id=64)
        with pytest.raises(ValueError, match=r"pad_token_id must lie in \[0, 64\)"):
            beam_search(params, ids, pre.config, max_new_tokens=2, num_beams=2, eos_token_id=3, pad_token_id=-1)
        with pytest.raises(ValueError, match=r"num_beams must be in \[1, 64\]"):
            beam_search(params, ids, pre.config, max_new_tokens=2, num_beams=0)
