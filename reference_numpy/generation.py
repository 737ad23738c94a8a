"""Greedy and beam decoding with a KV cache for the GPT / Llama decoder, in NumPy.

The same algorithm as ``bigmodel_jax.generation``, written plainly. Every step is the model's
own forward (``gpt.forward`` / ``seq2seq.decode_with_cache`` with ``kv_cache=``): one call on the
prompt fills the cache, then one call per new token attends over the cached keys and values.
Forward only: decoding needs no backward.

Both decoders reproduce transformers' ``generate`` (v5) token for token:

* greedy (``num_beams=1``, HF ``_sample`` without sampling): argmax; once a row emits an EOS id
  it emits ``pad_token_id``; decoding stops as soon as every row has finished, so the output has
  ``T0 + n`` columns with ``n <= max_new_tokens`` the number of steps run.
* beam search (HF ``_beam_search``, see ``beam_loop``): ``W`` running beams plus a separate set
  of ``W`` finished hypotheses per prompt, scored ``sum log p / length ** length_penalty``
  (``length`` = generated tokens including the EOS, the prompt not counted), stopped by HF's
  ``early_stopping`` rule; the best ``num_return_sequences`` hypotheses come back, cropped to the
  longest of them and filled after their end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from reference_numpy.checks import check_array, is_tracer, shape_str
from reference_numpy.configs import GPTConfig, Seq2SeqConfig
from reference_numpy.layers.activations import log_softmax_forward
from reference_numpy.models import gpt, seq2seq
from reference_numpy.models.common import check_token_batch
from reference_numpy.models.gpt import init_cache

Tree = dict[str, Any]


def decode_step(params: Tree, cache: Tree, ids: np.ndarray, pos: int, key_mask: np.ndarray,
                config: GPTConfig) -> np.ndarray:
    """Tokens ids (B, N) at slots [pos, pos + N) -> logits (B, N, V): the model's own
    ``gpt.forward`` with ``kv_cache=cache`` (written in place); key_mask (B, S) is False on
    padded slots."""
    return gpt.forward(params, {"input_ids": ids, "attention_mask": key_mask}, config, kv_cache=cache,
                       cache_pos=pos)


# --------------------------------------------------------------------------------------------
# argument checks, shared by both packages (bigmodel_jax.generation imports them)


def _is_int(x: Any) -> bool:
    """A real integer: Python or NumPy int, not a bool (``True`` is an int to Python)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    """A real number: int or float (Python or NumPy), not a bool, not a string."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_max_new_tokens(max_new_tokens: Any) -> None:
    """An int >= 1: generating nothing is not a request (``generate`` refuses 0 and below)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def check_sampling_options(vocab_size: int, *, max_new_tokens: Any, temperature: Any = 0.0, top_k: Any = None,
                           top_p: Any = None, length_penalty: Any = 1.0) -> None:
    """The decoding settings both packages share; a bad one raises ``ValueError`` naming it.

    ``max_new_tokens``: an int >= 1. ``temperature``: a finite real >= 0, 0 = greedy (argmax).
    ``top_k``: None (off) or an int in [1, V]. ``top_p``: None (off) or a real in (0, 1].
    ``length_penalty`` (beam search): a finite real. NaN or inf is never accepted: a NaN
    temperature would turn every logit into NaN and the sampler would emit token 0 forever.
    """
    check_max_new_tokens(max_new_tokens)
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None (off) or an int in [1, {vocab_size}], got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):  # NaN fails 0 < top_p
        raise ValueError(f"top_p must be None (off) or a number in (0, 1], got {top_p!r}")
    if not _is_real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


def filter_logits(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """logits (B, V) with every token outside the top-k and outside the top-p nucleus set to
    -inf. Top-k keeps ties with the k-th value. Top-p keeps a token while the probability mass
    strictly before it, in descending order (ties in index order), is < p, so the most likely
    token always stays. ``bigmodel_jax.generation.filter_logits`` is the same function."""
    z = np.array(logits, dtype=np.float64 if np.asarray(logits).dtype == np.float64 else np.float32)
    if top_k is not None and top_k < z.shape[-1]:
        kth = -np.sort(-z, axis=-1)[:, top_k - 1:top_k]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None:
        order = np.argsort(-z, axis=-1, kind="stable")
        ranked = np.take_along_axis(z, order, axis=-1)
        p = np.exp(ranked - ranked[:, :1])
        p /= p.sum(axis=-1, keepdims=True)
        keep_ranked = (np.cumsum(p, axis=-1) - p) < top_p
        keep = np.zeros_like(keep_ranked)
        np.put_along_axis(keep, order, keep_ranked, axis=-1)
        z = np.where(keep, z, -np.inf)
    return z


def check_prompt(name: str, ids: Any, attention_mask: Any = None) -> tuple[int, int]:
    """Prompts: a (B, T0) integer array with B >= 1 rows and T0 >= 1 tokens, and, when an
    attention mask is given (and concrete), at least one real token in every row: decoding has
    nothing to condition on otherwise. Returns (B, T0). Token values: ``check_token_batch``."""
    check_array(name, ids, ("B", "T"), kind="int")
    B, T0 = ids.shape
    if B == 0 or T0 == 0:
        raise ValueError(f"{name} is empty (shape {shape_str((B, T0))}): generation needs at least one "
                         f"prompt of at least one token (e.g. the BOS id)")
    if attention_mask is not None and not is_tracer(attention_mask):
        check_array("attention_mask", attention_mask, (B, T0))
        empty = np.flatnonzero(~np.asarray(attention_mask).astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask marks no token in row {int(empty[0])} of {name}: every prompt "
                             f"needs at least one real token")
    return B, T0


def check_request_length(prompt_len: int, max_new_tokens: int, max_len: int, prompt: str = "the prompt length"
                         ) -> None:
    """``prompt_len + max_new_tokens`` cache slots must fit the model's ``max_len`` (its longest
    sequence: the learned position table, or the RoPE / sinusoidal table it was built for)."""
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"{prompt} ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                         f"is longer than the model supports (max_len={max_len}); shorten the prompt or "
                         f"lower max_new_tokens to at most {max(max_len - prompt_len, 0)}")


def check_lm_request(config: GPTConfig, input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> None:
    """A decoder's generation request: non-empty prompts of ids in [0, V) (``check_prompt``,
    ``check_token_batch``), ``max_new_tokens`` >= 1, and prompt + new tokens within max_len."""
    check_prompt("input_ids", input_ids, attention_mask)
    check_token_batch({"input_ids": input_ids, "attention_mask": attention_mask}, "input_ids",
                      config.vocab_size, config.max_len)
    check_max_new_tokens(max_new_tokens)
    check_request_length(input_ids.shape[1], max_new_tokens, config.max_len)


def check_seq2seq_request(config: Seq2SeqConfig, batch: dict[str, Any], max_new_tokens: Any) -> tuple[Any, Any]:
    """An encoder-decoder's generation request: non-empty sources of ids in [0, V)
    (``seq2seq.check_source``), ``max_new_tokens`` >= 1, and the decoder start token + new
    tokens within max_len. Returns ``check_source``'s (ids, mask)."""
    ids, mask = seq2seq.check_source(batch, config)
    check_prompt("input_ids", ids, mask)
    check_max_new_tokens(max_new_tokens)
    check_request_length(1, max_new_tokens, config.max_len, prompt="the decoder start token")
    return ids, mask


# HF marks impossible candidates with this large finite score, not -inf, and adds it (in float32)
# rather than masking; the same constant and the same arithmetic make every comparison come out
# as in transformers.
IMPOSSIBLE = np.float32(-1.0e9)
EARLY_STOPPING = (False, True, "never")  # HF's ``early_stopping`` values


def eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """EOS ids as a tuple: HF takes one id or a list of them; () when there is none."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def check_decoding(vocab_size: int, *, num_beams: int = 1, num_return_sequences: int = 1,
                   early_stopping: bool | str = False, eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None) -> tuple[int, ...]:
    """Check the decoding options both packages share; returns the EOS ids as a tuple."""
    if not _is_int(num_beams) or not 1 <= num_beams <= vocab_size:
        raise ValueError(f"num_beams must be in [1, {vocab_size}], got {num_beams}")
    if not _is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}] (greedy returns one "
                         f"sequence per prompt), got {num_return_sequences}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
    eos = eos_ids(eos_token_id)
    for name, ids in (("eos_token_id", eos), ("pad_token_id", () if pad_token_id is None else (pad_token_id,))):
        if any(not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got {ids if len(ids) > 1 else ids[0]}")
    if max(2, 1 + len(eos)) > vocab_size:
        raise ValueError(f"beam search keeps max(2, 1 + {len(eos)} EOS ids) candidates per beam; "
                         f"the vocabulary has only {vocab_size} tokens")
    return eos


def greedy_fill(pad_token_id: int | None, eos: tuple[int, ...]) -> int:
    """The id greedy writes after a row's EOS: ``pad_token_id``, or (HF) the first EOS id when None."""
    if pad_token_id is not None:
        return pad_token_id
    return eos[0] if eos else 0  # without EOS no row ever finishes, so the value is never written


def beam_fill(pad_token_id: int | None, eos: tuple[int, ...]) -> int:
    """The id after a finished hypothesis' end. HF's beam search fills with
    ``pad_token_id or eos_token_id[0]``, so a pad id of 0 fills with the EOS id; we do the same."""
    if pad_token_id:
        return pad_token_id
    return eos[0] if eos else 0  # without EOS every hypothesis has the full length: no fill shows


class BeamRules(NamedTuple):
    """HF's length penalty and ``early_stopping`` rule as arrays (``beam_rules``), so one
    compiled beam search serves every setting."""

    penalty: np.ndarray  # (N + 1,) float32: entry n = n ** length_penalty as HF rounds it; entry 0 unused
    judge_len: np.ndarray  # () int32: the length a running beam is judged at; 0 = its current length
    stop_when_full: np.ndarray  # () bool: early_stopping=True, stop adding once W hypotheses are finished


def beam_rules(max_new_tokens: int, length_penalty: float, early_stopping: bool | str) -> BeamRules:
    """The ``BeamRules`` of HF's options. HF computes ``n ** length_penalty`` as a Python float
    power and rounds it to float32 when it divides the float32 scores: the table does the same.
    A running beam is judged at ``max_new_tokens`` when ``early_stopping="never"`` and
    ``length_penalty > 0`` (it may still grow), else at its current length."""
    N = max_new_tokens
    penalty = np.array([1.0] + [n ** length_penalty for n in range(1, N + 1)], np.float32)
    judge = N if early_stopping == "never" and length_penalty > 0 else 0
    return BeamRules(penalty, np.asarray(judge, np.int32), np.asarray(early_stopping is True))


def greedy(params: Tree, input_ids: np.ndarray, config: GPTConfig, *, max_new_tokens: int,
           attention_mask: Any = None, eos_token_id: int | Sequence[int] | None = None,
           pad_token_id: int | None = None) -> np.ndarray:
    """Greedy continuation, as transformers' ``generate(do_sample=False, num_beams=1)``.

    Returns (B, T0 + n) ids. After an EOS id a row emits ``pad_token_id`` (None: the first EOS
    id, as HF); decoding stops once every row has finished, so ``n <= max_new_tokens``.
    """
    input_ids = np.asarray(input_ids)
    check_lm_request(config, input_ids, attention_mask, max_new_tokens)
    eos = check_decoding(config.vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    B, T0 = input_ids.shape
    mask = np.ones((B, T0), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    key_mask = np.concatenate([mask, np.ones((B, max_new_tokens), bool)], axis=1)
    cache = init_cache(config, B, T0 + max_new_tokens, params["embed"]["embedding"].dtype)
    last = decode_step(params, cache, input_ids, 0, key_mask, config)[:, -1]

    def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:
        return decode_step(params, cache, tok[:, None], T0 + i, key_mask, config)[:, -1]

    out = greedy_loop(step, last, cache, max_new_tokens, eos, greedy_fill(pad_token_id, eos), input_ids.dtype)
    return np.concatenate([input_ids, out], axis=1)


def greedy_loop(step, last: np.ndarray, cache: Tree, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None, pad_token_id: int, dtype: Any) -> np.ndarray:
    """Shared greedy decoding (HF ``_sample`` without sampling).

    ``step(cache, tok (B,), i) -> logits (B, V)`` updates ``cache`` in place; ``last`` (B, V) are
    the prompt's logits. Argmax each step; after an EOS id a row emits ``pad_token_id``; stops
    when every row has finished. Returns (B, n) with ``n <= max_new_tokens`` the steps run.
    """
    eos = eos_ids(eos_token_id)
    done = np.zeros(last.shape[0], bool)
    out = []
    for i in range(max_new_tokens):
        tok = np.where(done, pad_token_id, np.argmax(last, axis=-1))
        done |= np.isin(tok, eos)
        out.append(tok)
        if done.all() or i + 1 == max_new_tokens:
            break
        last = step(cache, tok, i)
    return np.stack(out, axis=1).astype(dtype)


def beam_search(params: Tree, input_ids: np.ndarray, config: GPTConfig, *, max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, attention_mask: Any = None,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Beam search, as transformers' ``generate(do_sample=False, num_beams=W, ...)``; see ``beam_loop``.

    Returns (B * num_return_sequences, T0 + n) ids, each prompt's best hypotheses first.
    ``num_beams=1`` is greedy decoding, as HF's ``generate`` dispatches it.
    """
    input_ids = np.asarray(input_ids)
    check_lm_request(config, input_ids, attention_mask, max_new_tokens)
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    eos = check_decoding(config.vocab_size, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if num_beams == 1:
        return greedy(params, input_ids, config, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                      eos_token_id=eos, pad_token_id=pad_token_id)
    B, T0 = input_ids.shape
    W = num_beams
    mask = np.ones((B, T0), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    key_mask = np.repeat(np.concatenate([mask, np.ones((B, max_new_tokens), bool)], axis=1), W, axis=0)
    cache = init_cache(config, B * W, T0 + max_new_tokens, params["embed"]["embedding"].dtype)
    last = decode_step(params, cache, np.repeat(input_ids, W, axis=0), 0, key_mask, config)[:, -1]

    def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:
        return decode_step(params, cache, tok[:, None], T0 + i, key_mask, config)[:, -1]

    out = beam_loop(step, last, cache, B, W, max_new_tokens, rules=beam_rules(max_new_tokens, length_penalty,
                    early_stopping), eos=eos, fill=beam_fill(pad_token_id, eos),
                    num_return_sequences=num_return_sequences, dtype=input_ids.dtype)
    return np.concatenate([np.repeat(input_ids, num_return_sequences, axis=0), out], axis=1)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (B, k) of each row's k largest entries, best first; ties go to the lower index."""
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def _gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a (B, M, ...) gathered along axis 1 by idx (B, k) -> (B, k, ...)."""
    return np.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def beam_loop(step, last: np.ndarray, cache: Tree, B: int, W: int, max_new_tokens: int, *, rules: BeamRules,
              eos: Sequence[int], fill: int, num_return_sequences: int = 1, dtype: Any = np.int64,
              process=None) -> np.ndarray:
    """Beam search shared by the decoder-only and encoder-decoder models: HF ``_beam_search``.

    ``step(cache, tok (B*W,), i) -> logits (B*W, V)`` runs one token per running beam and updates
    ``cache`` in place; every cache leaf holds the B*W rows (beam-major per prompt) on axis 1;
    ``last`` (B*W, V) are the prompt's logits; ``rules``: ``beam_rules(N, length_penalty,
    early_stopping)``; ``eos``: the EOS ids; ``fill``: ``beam_fill``; ``process(logp (B*W, V), i)``:
    HF's logits processors, applied to the log-probabilities of new token i as HF's beam search
    does (after the log-softmax, so a suppressed token does not renormalise the others). Per
    prompt and step, with N = max_new_tokens:

    1. score the W*V continuations of the W running beams (float32 log-softmax + beam score;
       at the start only beam 0 is live, the others score -1e9) and keep the best
       ``K = max(2, 1 + n_eos) * W``, so at least W of them do not end in EOS;
    2. a candidate ending in EOS (or every candidate, at step N) is *done*; the best W not-done
       candidates are the new running beams;
    3. the done candidates among the best W of step 1 enter the finished set (size W) with
       score ``sum log p / length ** length_penalty``, length = generated tokens incl. the EOS,
       if they beat its worst -- unless the prompt has stopped adding (below);
    4. a prompt stops adding once its finished set is full and its best running beam cannot win:
       best running score / ``n ** length_penalty`` <= worst finished score, n = the current
       length (``early_stopping=False`` or True), or N when ``early_stopping="never"`` and
       ``length_penalty > 0``; with ``early_stopping=True`` also as soon as the set is full.
       The search ends when no prompt adds any more (or after step N).

    Returns (B * num_return_sequences, n): each prompt's best hypotheses, best first, cropped to
    the longest returned one and filled after their ends (``beam_fill``).
    """
    N, V, R = max_new_tokens, last.shape[-1], num_return_sequences
    eos = np.asarray(eos, np.int64).reshape(-1)
    K = max(2, 1 + eos.size) * W
    f32 = np.float32
    penalty, judge_len, stop_when_full = rules
    run_seq = np.full((B, W, N), fill, dtype)  # running beams' generated tokens
    run_score = np.where(np.arange(W) == 0, f32(0), IMPOSSIBLE).astype(f32)[None].repeat(B, 0)  # (B, W)
    fin_seq = run_seq.copy()  # the finished set, best first
    fin_score = np.full((B, W), IMPOSSIBLE, f32)
    fin_len = np.zeros((B, W), np.int64)
    is_fin = np.zeros((B, W), bool)  # slot holds a real finished hypothesis
    adding = np.ones((B, 1), bool)  # HF's is_early_stop_heuristic_unsatisfied
    top_w = np.arange(K) < W  # only the best W candidates may finish (HF's top_num_beam_mask)
    for i in range(N):
        # 1. the best K continuations
        logp = log_softmax_forward(last.astype(f32), axis=-1)[0]
        logp = (logp if process is None else process(logp, i)).reshape(B, W, V)
        cand = (logp + run_score[..., None]).reshape(B, W * V)
        idx = _top_k(cand, K)
        top_score = np.take_along_axis(cand, idx, axis=1)  # (B, K)
        src, tok = idx // V, idx % V
        top_seq = _gather(run_seq, src)
        top_seq[:, :, i] = tok
        done = np.isin(tok, eos) | (i + 1 == N)  # (B, K)
        # 2. the next running beams
        run_lp = top_score + done.astype(f32) * IMPOSSIBLE
        nxt = _top_k(run_lp, W)
        run_seq, run_score, run_src = _gather(top_seq, nxt), _gather(run_lp, nxt), _gather(src, nxt)
        # 3. the finished set (HF adds the penalties one after another, in float32)
        just = done & top_w
        s = top_score / penalty[i + 1]
        s = s + (is_fin.all(axis=1, keepdims=True) & stop_when_full).astype(f32) * IMPOSSIBLE
        s = s + (~adding).astype(f32) * IMPOSSIBLE
        s = s + (~just).astype(f32) * IMPOSSIBLE
        merged = np.concatenate([fin_score, s], axis=1)
        keep = _top_k(merged, W)
        fin_score = np.take_along_axis(merged, keep, axis=1)
        fin_seq = _gather(np.concatenate([fin_seq, top_seq], axis=1), keep)
        fin_len = _gather(np.concatenate([fin_len, np.full((B, K), i + 1)], axis=1), keep)
        is_fin = _gather(np.concatenate([is_fin, just], axis=1), keep)
        # 4. stop?
        best = run_score[:, :1] / penalty[judge_len or i + 1]
        worst = np.where(is_fin, fin_score.min(axis=1, keepdims=True), IMPOSSIBLE)
        adding &= np.any(best > worst, axis=1, keepdims=True)
        if not adding.any() or (is_fin.all() and stop_when_full) or done.all():
            break
        rows = (np.arange(B)[:, None] * W + run_src).reshape(-1)  # source row of each new beam
        for name in cache:
            cache[name] = cache[name][:, rows]
        last = step(cache, run_seq[:, :, i].reshape(B * W), i)
    n = int(fin_len[:, :R].max())
    return fin_seq[:, :R, :n].reshape(B * R, n)


# --------------------------------------------------------------------------------------------
# encoder-decoder


def seq2seq_decode_step(params: Tree, cache: Tree, ids: np.ndarray, pos: int, src_mask: np.ndarray,
                        config: Seq2SeqConfig) -> np.ndarray:
    """Target tokens ids (B, N) at slots [pos, pos + N) -> logits (B, N, V): the model's own
    ``seq2seq.decode_with_cache`` with ``kv_cache=cache`` (``seq2seq.init_cache``, written in place)."""
    batch = {"decoder_input_ids": ids, "attention_mask": src_mask}
    return seq2seq.decode_with_cache(params, None, batch, config, kv_cache=cache, cache_pos=pos)[0]


def check_logits_rules(vocab_size: int, num_beams: int, suppress_tokens: Sequence[int],
                       forced_eos_token_id: int | None) -> tuple[int, ...]:
    """Check the options of ``constrain_logits`` (shared by both packages); returns the
    suppressed ids as a sorted tuple."""
    suppress = tuple(sorted({int(t) for t in suppress_tokens}))
    forced = () if forced_eos_token_id is None else (int(forced_eos_token_id),)
    for name, ids in (("suppress_tokens", suppress), ("forced_eos_token_id", forced)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got {bad[0]}")
    if set(forced) & set(suppress):
        raise ValueError(f"forced_eos_token_id={forced[0]} is also in suppress_tokens")
    return suppress


def constrain_logits(logits: np.ndarray, i: int, max_new_tokens: int, suppress_tokens: tuple[int, ...],
                     forced_eos_token_id: int | None) -> np.ndarray:
    """HF's logits rules on the logits (B, V) of new token ``i`` (0-based), in HF's order:

    * ``suppress_tokens`` -> -inf (HF ``NoBadWordsLogitsProcessor`` with single-token
      ``bad_words_ids``, or ``SuppressTokensLogitsProcessor``; Marian checkpoints ban the pad id);
    * ``forced_eos_token_id``: the last new token (``i == max_new_tokens - 1``, HF's
      ``cur_len == max_length - 1``) can only be that id (HF ``ForcedEOSTokenLogitsProcessor``:
      every other logit -inf, the EOS logit 0).

    Returns new logits; no rule -> ``logits`` itself.
    """
    neg = logits.dtype.type(-np.inf)
    if suppress_tokens:
        logits = logits.copy()
        logits[:, list(suppress_tokens)] = neg
    if forced_eos_token_id is not None and i == max_new_tokens - 1:
        logits = np.full_like(logits, neg)
        logits[:, forced_eos_token_id] = 0
    return logits


def seq2seq_generate(params: Tree, batch: dict[str, Any], config: Seq2SeqConfig, *, max_new_tokens: int,
                     decoder_start_token_id: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: bool | str = False, num_return_sequences: int = 1,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                     suppress_tokens: Sequence[int] = (), forced_eos_token_id: int | None = None) -> np.ndarray:
    """Greedy (``num_beams=1``) or beam decoding with the cache, as transformers' ``generate``
    -> (B * num_return_sequences, 1 + n) ids starting with ``decoder_start_token_id``, n <=
    max_new_tokens (see ``greedy_loop`` / ``beam_loop``); the rules of
    ``bigmodel_jax.generation.seq2seq_generate``.

    ``suppress_tokens`` / ``forced_eos_token_id``: HF's logits rules, see ``constrain_logits``;
    Marian checkpoints use them (never pad, EOS forced at the last step). Greedy applies them to
    the logits, beam search to the log-probabilities (as HF)."""
    ids, mask = check_seq2seq_request(config, batch, max_new_tokens)
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    B, W = ids.shape[0], num_beams
    eos = check_decoding(config.vocab_size, num_beams=W, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    suppress = check_logits_rules(config.vocab_size, W, suppress_tokens, forced_eos_token_id)
    mask = np.ones(ids.shape, bool) if mask is None else mask
    enc = seq2seq.encode(params, batch, config)
    enc, mask = np.repeat(enc, W, axis=0), np.repeat(mask, W, axis=0)
    cache = seq2seq.init_cache(params, enc, config, 1 + max_new_tokens)
    start = np.full((B * W, 1), decoder_start_token_id, ids.dtype)
    last = seq2seq_decode_step(params, cache, start, 0, mask, config)[:, -1]

    def rules(x: np.ndarray, i: int) -> np.ndarray:  # logits / log-probs of new token i
        return constrain_logits(x, i, max_new_tokens, suppress, forced_eos_token_id)

    if W > 1:
        def beam_step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:  # logits of new token i + 1
            return seq2seq_decode_step(params, cache, tok[:, None], 1 + i, mask, config)[:, -1]

        out = beam_loop(beam_step, last, cache, B, W, max_new_tokens, rules=beam_rules(
                        max_new_tokens, length_penalty, early_stopping), eos=eos, fill=beam_fill(pad_token_id, eos),
                        num_return_sequences=num_return_sequences, dtype=ids.dtype,
                        process=rules if suppress or forced_eos_token_id is not None else None)
    else:
        last = rules(last, 0)  # new token 0

        def step(cache: Tree, tok: np.ndarray, i: int) -> np.ndarray:  # logits of new token i + 1
            return rules(seq2seq_decode_step(params, cache, tok[:, None], 1 + i, mask, config)[:, -1], i + 1)

        out = greedy_loop(step, last, cache, max_new_tokens, eos, greedy_fill(pad_token_id, eos), ids.dtype)
    return np.concatenate([np.full((out.shape[0], 1), decoder_start_token_id, ids.dtype), out], axis=1)


def hf_generate(params: Tree, inputs: dict[str, Any], config: GPTConfig | Seq2SeqConfig, *,
                max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                decoder_start_token_id: int | None = None, suppress_tokens: Sequence[int] = (),
                forced_eos_token_id: int | None = None) -> np.ndarray:
    """transformers' ``generate`` arguments -> greedy or beam decoding (the model classes' ``generate``).

    ``inputs``: ``input_ids`` (B, T0) and optional ``attention_mask``. Returns (B * R, T0 + n) ids
    for a decoder, (B * R, 1 + n) starting with ``decoder_start_token_id`` for an encoder-decoder.
    The reference has no sampling (``do_sample=True`` is refused: use ``bigmodel_jax``);
    ``temperature`` / ``top_k`` / ``top_p`` are taken for the same signature as
    ``bigmodel_jax.generation.hf_generate`` and checked by the same rules
    (``check_sampling_options``), and, as in HF, read only when sampling.
    """
    check_sampling_options(config.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, length_penalty=length_penalty)
    if do_sample:
        raise ValueError("the NumPy reference decodes greedily or by beam search; sample with bigmodel_jax")
    beam = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if isinstance(config, Seq2SeqConfig):
        if decoder_start_token_id is None:
            raise ValueError("an encoder-decoder needs decoder_start_token_id (HF: the config's, often pad)")
        batch = {k: v for k, v in inputs.items() if v is not None}
        return seq2seq_generate(params, batch, config, decoder_start_token_id=decoder_start_token_id,
                                suppress_tokens=suppress_tokens, forced_eos_token_id=forced_eos_token_id, **beam)
    if suppress_tokens or forced_eos_token_id is not None:
        raise ValueError("suppress_tokens / forced_eos_token_id are implemented for encoder-decoders only")
    return beam_search(params, inputs["input_ids"], config, attention_mask=inputs.get("attention_mask"), **beam)
