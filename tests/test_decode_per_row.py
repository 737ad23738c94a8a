"""Per-row cache positions (continuous batching): ``gpt.forward(..., cache=, cache_pos=(B,))``.

Rows that sit at different slots of one batched cache (each prefilled on its own, then decoded
together, as the serving engine does) must get, row by row, the logits of the model's own full
forward over that row's sequence, and of the same row decoded alone with a scalar position.
Float64, so any difference in the math (a wrong slot written, a wrong position embedded or
rotated, a wrong causal mask) shows far above summation-order noise (1e-12 of the largest
logit, as ``test_decode_equals_recompute``). Both cache layouts: the stacked (scanned) one and
the decoding layout's per-layer heads-major caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmodel_jax.generation.layout import DECODE_LAYOUT, decode_params
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.tree import to_jax
from reference_numpy.configs import GPTConfig
from reference_numpy.models import gpt as rgpt

RTOL = 1e-12  # float64, same math in another summation order
S = 16  # cache slots per row
# the model's one forward, compiled whole once per shape (op-by-op dispatch compiled every op of
# every drawn shape, and took minutes)
forward = jax.jit(jgpt.forward, static_argnames=("config",))


@pytest.fixture(autouse=True, scope="module")
def _x64():
    with jax.enable_x64(True):
        yield


def _config(rope: bool, kv_heads: int | None) -> GPTConfig:
    return GPTConfig(n_layers=2, d_model=16, n_heads=4, n_kv_heads=kv_heads, d_ff=24, vocab_size=37, max_len=S,
                     dropout=0.0, dtype="float64", positions="rope" if rope else "learned",
                     norm="rms" if rope else "layer", gated_mlp=rope, tie_embeddings=not rope)


def _row(cache: dict, b: int, unrolled: bool, K: int) -> dict:
    """Row b of a batched cache as a batch-1 cache."""
    if unrolled:
        return {n: [c[b * K:(b + 1) * K] for c in cache[n]] for n in ("k", "v")}
    return {n: cache[n][:, b:b + 1] for n in ("k", "v")}


def _stack(rows: list[dict], unrolled: bool) -> dict:
    """Batch-1 caches stacked into one batched cache (row order kept)."""
    if unrolled:
        return {n: [jnp.concatenate([r[n][i] for r in rows], 0) for i in range(len(rows[0][n]))] for n in ("k", "v")}
    return {n: jnp.concatenate([r[n] for r in rows], 1) for n in ("k", "v")}


@pytest.mark.slow  # every drawn shape compiles the forward anew
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rope=st.booleans(), kv_heads=st.sampled_from([None, 2, 1]), unrolled=st.booleans(),
       prompt_lens=st.lists(st.integers(1, 7), min_size=2, max_size=4), step=st.sampled_from([1, 2]))
def test_per_row_positions_equal_full_forward_and_separate_runs(rope, kv_heads, unrolled, prompt_lens, step):
    config = _config(rope, kv_heads)
    params = to_jax(rgpt.init(config, np.random.default_rng(0)))
    rng = np.random.default_rng(len(prompt_lens))
    steps = 3  # decode calls after the prefills, each of `step` tokens per row
    seqs = [rng.integers(0, config.vocab_size, size=p + steps * step) for p in prompt_lens]
    B = len(seqs)
    run = decode_params(params, config, DECODE_LAYOUT) if unrolled else params
    init = jgpt.init_layer_caches if unrolled else jgpt.init_cache
    K = config.kv_heads

    # each row prefilled on its own (scalar position 0), then stacked: rows at different slots
    rows = []
    for seq, p in zip(seqs, prompt_lens):
        _, c = forward(run, {"input_ids": jnp.asarray(seq[None, :p])}, config, cache=init(config, 1, S, jnp.float64),
                       cache_pos=jnp.asarray(0))
        rows.append(c)
    cache = _stack(rows, unrolled)
    alone = list(rows)  # the same rows decoded one at a time, with scalar positions
    pos = np.asarray(prompt_lens)
    for i in range(steps):
        ids = np.stack([seq[p:p + step] for seq, p in zip(seqs, pos)])  # (B, step)
        logits, cache = forward(run, {"input_ids": jnp.asarray(ids)}, config, cache=cache,
                                cache_pos=jnp.asarray(pos))
        for b in range(B):
            full = forward(params, {"input_ids": jnp.asarray(seqs[b][None, :pos[b] + step])}, config)
            want = np.asarray(full[0, pos[b]:pos[b] + step])
            got = np.asarray(logits[b])
            tol = RTOL * np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"row {b} step {i} vs full forward")
            one, alone[b] = forward(run, {"input_ids": jnp.asarray(ids[b:b + 1])}, config, cache=alone[b],
                                    cache_pos=jnp.asarray(int(pos[b])))
            np.testing.assert_allclose(got, np.asarray(one[0]), rtol=0, atol=tol, err_msg=f"row {b} vs alone")
            # the row's own cache equals the row decoded alone (same slots written, nothing else)
            for n in ("k", "v"):
                mine, theirs = _row(cache, b, unrolled, K)[n], alone[b][n]
                for a, c in zip(mine if unrolled else [mine], theirs if unrolled else [theirs]):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-12)
        pos = pos + step


def test_per_row_cache_pos_shape_is_checked():
    config = _config(False, None)
    params = to_jax(rgpt.init(config, np.random.default_rng(0)))
    cache = jgpt.init_cache(config, 2, S, jnp.float64)
    with pytest.raises(ValueError, match="cache_pos"):
        jgpt.forward(params, {"input_ids": jnp.zeros((2, 1), jnp.int32)}, config, cache=cache,
                     cache_pos=jnp.asarray([1, 2, 3]))
