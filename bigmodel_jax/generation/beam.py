"""Beam search, token for token transformers' ``generate(num_beams=W)`` (HF ``_beam_search``):
running beams plus a separate set of finished hypotheses, its length penalty and
``early_stopping`` rule, as one ``lax.while_loop``. The length penalty, the early-stopping rule
and the EOS / pad ids are traced arguments, so one compilation serves every setting of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.generation.sampling import _check_generate_args, generate
from bigmodel_jax.generation.step import decode_step
from bigmodel_jax.models.gpt import init_cache
from reference_numpy.configs import GPTConfig
from reference_numpy.generation import BeamRules, beam_fill, beam_rules, check_decoding

Tree = dict[str, Any]


def beam_search(
    params: Tree,
    input_ids: Any,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    attention_mask: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Beam search, token for token transformers' ``generate(do_sample=False, num_beams=W, ...)``.

    Returns (B * num_return_sequences, T0 + n) ids, each prompt's best hypotheses first, n <=
    max_new_tokens (cropped after the compiled loop). The algorithm (W running beams, a separate
    set of W finished hypotheses scored ``sum log p / length ** length_penalty``, HF's
    ``early_stopping`` rule) is described at ``beam_loop``. ``num_beams=1`` is greedy decoding
    (``generate``), as HF's ``generate`` dispatches it. Same algorithm as
    ``reference_numpy.generation.beam_search``.
    """
    input_ids = jnp.asarray(input_ids)
    _check_generate_args(config, input_ids, attention_mask, max_new_tokens, 0.0, None, None, length_penalty)
    eos = check_decoding(config.vocab_size, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if num_beams == 1:
        return generate(params, input_ids, config, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                        eos_token_id=eos, pad_token_id=pad_token_id)
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    # the length penalty, early-stopping rule and EOS / fill ids are traced arguments: one
    # compilation per shape, W, R and number of EOS ids serves every setting
    rules = beam_rules(max_new_tokens, float(length_penalty), early_stopping)
    out, length = _beam_search(params, input_ids, mask, rules, jnp.asarray(eos, jnp.int32),
                               jnp.asarray(beam_fill(pad_token_id, eos), jnp.int32), config, max_new_tokens,
                               num_beams, num_return_sequences)
    return out[:, :int(length)]


@partial(jax.jit, static_argnums=(6, 7, 8, 9))
def _beam_search(params, input_ids, mask, rules, eos, fill, config, max_new_tokens, W, R):
    B, T0 = input_ids.shape
    S = T0 + max_new_tokens
    ids = jnp.repeat(input_ids, W, axis=0)  # (B*W, T0), beam-major within each prompt
    key_mask = jnp.repeat(jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1), W, axis=0)
    cache = init_cache(config, B * W, S, params["embed"]["embedding"].dtype)
    logits, cache = decode_step(params, cache, ids, jnp.asarray(0), key_mask, config)

    def step(cache: Tree, tok: jax.Array, i: jax.Array) -> tuple[jax.Array, Tree]:
        logits, cache = decode_step(params, cache, tok[:, None].astype(ids.dtype), T0 + i, key_mask, config)
        return logits[:, -1], cache

    out, n = beam_loop(step, logits[:, -1], cache, B, W, max_new_tokens, rules=rules, eos=eos, fill=fill,
                       num_return_sequences=R, dtype=input_ids.dtype)
    return jnp.concatenate([jnp.repeat(input_ids, R, axis=0), out], axis=1), T0 + n


# HF marks impossible candidates with this large finite score, not -inf, and adds it in float32
# (see reference_numpy.generation.IMPOSSIBLE): the same arithmetic, the same comparisons.
IMPOSSIBLE = -1.0e9


def beam_loop(step, last_logits: jax.Array, cache: Tree, B: int, W: int, max_new_tokens: int, *,
              rules: BeamRules, eos: Sequence[int] | jax.Array, fill: int | jax.Array,
              num_return_sequences: int = 1, dtype: Any = jnp.int32, process=None) -> tuple[jax.Array, jax.Array]:
    """The beam search shared by the decoder-only and encoder-decoder models: HF ``_beam_search``.

    ``step(cache, tok (B*W,), i) -> (logits (B*W, V), cache)`` runs one token per running beam;
    ``last_logits`` (B*W, V) are the prompt's; every cache leaf has the B*W rows (beam-major per
    prompt) on axis 1; ``rules``: ``beam_rules(N, length_penalty, early_stopping)`` (NumPy or
    traced arrays); ``eos``: the EOS ids, (n_eos,), may be traced; ``fill``: ``beam_fill``, may be
    traced; ``process(logp (B*W, V), i)``: HF's logits processors on the log-probabilities of new
    token i (after the log-softmax, as HF's beam search). Per prompt and step, with N = max_new_tokens:

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
       The ``lax.while_loop`` ends when no prompt adds any more (or after step N).

    Returns each prompt's best ``num_return_sequences`` hypotheses, best first, as tokens
    (B * num_return_sequences, N) filled after their ends (``beam_fill``), and ``n``, the length
    of the longest of them: HF returns the first ``n`` columns.
    """
    N, V, R = max_new_tokens, last_logits.shape[-1], num_return_sequences
    eos = jnp.asarray(eos, jnp.int32).reshape(-1)
    K = max(2, 1 + eos.shape[0]) * W
    f32 = jnp.float32
    penalty, judge_len, stop_when_full = (jnp.asarray(r) for r in rules)
    top_w = jnp.arange(K) < W  # only the best W candidates may finish (HF's top_num_beam_mask)

    def gather(a: jax.Array, idx: jax.Array) -> jax.Array:  # a (B, M, ...) by idx (B, k) -> (B, k, ...)
        return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    def body(c: Tree) -> Tree:
        i = c["i"]
        # 1. the best K continuations
        logp = jax.nn.log_softmax(c["last"].astype(f32), axis=-1)
        logp = (logp if process is None else process(logp, i)).reshape(B, W, V)
        cand = (logp + c["run_score"][..., None]).reshape(B, W * V)
        top_score, idx = jax.lax.top_k(cand, K)  # best first, ties to the lower index
        src, tok = idx // V, idx % V
        top_seq = gather(c["run_seq"], src).at[:, :, i].set(tok)
        done = (i + 1 == N) | jnp.isin(tok, eos)  # (B, K)
        # 2. the next running beams
        run_lp = top_score + done.astype(f32) * IMPOSSIBLE
        nxt = jax.lax.top_k(run_lp, W)[1]
        run_seq, run_score, run_src = gather(top_seq, nxt), gather(run_lp, nxt), gather(src, nxt)
        # 3. the finished set (HF adds the penalties one after another, in float32)
        just = done & top_w
        s = top_score / penalty[i + 1]
        s = s + (jnp.all(c["is_fin"], axis=1, keepdims=True) & stop_when_full).astype(f32) * IMPOSSIBLE
        s = s + (~c["adding"]).astype(f32) * IMPOSSIBLE
        s = s + (~just).astype(f32) * IMPOSSIBLE
        fin_score, keep = jax.lax.top_k(jnp.concatenate([c["fin_score"], s], axis=1), W)
        fin_seq = gather(jnp.concatenate([c["fin_seq"], top_seq], axis=1), keep)
        fin_len = gather(jnp.concatenate([c["fin_len"], jnp.broadcast_to(i + 1, (B, K))], axis=1), keep)
        is_fin = gather(jnp.concatenate([c["is_fin"], just], axis=1), keep)
        # 4. stop?
        best = run_score[:, :1] / penalty[jnp.where(judge_len > 0, judge_len, i + 1)]
        worst = jnp.where(is_fin, jnp.min(fin_score, axis=1, keepdims=True), IMPOSSIBLE)
        adding = c["adding"] & jnp.any(best > worst, axis=1, keepdims=True)
        go = jnp.any(adding) & ~(jnp.all(is_fin) & stop_when_full) & ~jnp.all(done)
        rows = (jnp.arange(B)[:, None] * W + run_src).reshape(-1)  # source row of each new beam
        cache = jax.tree_util.tree_map(lambda a: a[:, rows], c["cache"])
        last, cache = step(cache, run_seq[:, :, i].reshape(B * W), i)
        return dict(i=i + 1, go=go, last=last, cache=cache, run_seq=run_seq, run_score=run_score,
                    fin_seq=fin_seq, fin_score=fin_score, fin_len=fin_len, is_fin=is_fin, adding=adding)

    seq = jnp.full((B, W, N), fill, jnp.int32)
    init = dict(
        i=jnp.asarray(0), go=jnp.asarray(True), last=last_logits, cache=cache,
        run_seq=seq, run_score=jnp.broadcast_to(jnp.where(jnp.arange(W) == 0, 0.0, IMPOSSIBLE).astype(f32), (B, W)),
        fin_seq=seq, fin_score=jnp.full((B, W), IMPOSSIBLE, f32), fin_len=jnp.zeros((B, W), jnp.int32),
        is_fin=jnp.zeros((B, W), bool),
        adding=jnp.ones((B, 1), bool),  # HF's is_early_stop_heuristic_unsatisfied
    )
    c = jax.lax.while_loop(lambda c: c["go"] & (c["i"] < N), body, init)
    return c["fin_seq"][:, :R].reshape(B * R, N).astype(dtype), jnp.max(c["fin_len"][:, :R])
