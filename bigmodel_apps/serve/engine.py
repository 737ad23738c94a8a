"""Continuous batching for the GPT / Llama decoder: a fixed-slot batch that requests join and
leave between decode steps (vLLM's scheduling, without paging).

Dims: B slots (the batch), S cache slots per row (the context), V vocabulary, K kv heads.

The engine owns one batched KV cache, B rows of S slots, in the decoding layout
(``bigmodel_jax.generation.layout.DECODE_LAYOUT``: unrolled weights as rows, per-layer
heads-major caches). A request takes a free row: its prompt is prefilled alone (batch 1, padded
on the right to a length bucket) into that row; from then on every step runs ONE decode of shape
(B, 1) for all rows together, each row at its own position (``gpt.forward``'s per-row
``cache_pos``), so every weight is read once per step for all rows. A row whose request
finished (EOS, ``max_tokens``, cancelled) is free for a waiting request at the next step.

Why right padding is safe: a prompt of P tokens prefilled as a bucket of Tb >= P writes junk
keys into slots [P, Tb) of its row, but the causal mask lets the query at slot p see only slots
<= p, and slot p is written (by the token decoded there) in the same call before it is read.
Stale slots of a previous request in a reused row are hidden the same way.

Shapes are static: one compiled prefill per bucket (powers of two up to S) and one compiled
decode step, whatever the requests (``warmup`` compiles them all before serving).

Greedy rows take the argmax on the device (as ``generation.generate``, so the tokens are
``generate``'s); sampled rows are drawn on the host from the row's logits by its own seeded
``numpy.random.Generator`` (temperature, top-k, top-p as ``generation.sampling.filter_logits``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel_jax.generation.layout import DECODE_LAYOUT, decode_params
from bigmodel_jax.models import gpt
from reference_numpy.configs import GPTConfig
from reference_numpy.generation import check_sampling_options, filter_logits

Tree = dict[str, Any]

__all__ = ["Engine", "EngineStopped", "QueueFull", "Request", "SamplingParams", "compiled_shapes", "prefill_buckets",
           "sample_token"]


class QueueFull(RuntimeError):
    """The waiting queue is full (the server answers 429 with Retry-After)."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests (503)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (checked by ``reference_numpy.generation``'s rules)."""

    max_tokens: int  # new tokens at most, >= 1
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int | None = None  # None = off
    top_p: float | None = None  # None = off; else in (0, 1]
    seed: int | None = None  # sampling seed; None = fresh entropy


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt's journey through the engine. ``on_token(id)`` and ``on_finish(reason)`` are
    called from the engine's thread (reason "stop": EOS; "length": max_tokens or the context;
    "cancelled"; "error: ..." if a step failed)."""

    prompt: list[int]
    sampling: SamplingParams
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    cancelled: bool = False
    generated: int = 0
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    rng: np.random.Generator | None = None


def prefill_buckets(context: int, smallest: int = 16) -> tuple[int, ...]:
    """Prefill lengths: powers of two from ``smallest`` below ``context``, then ``context``."""
    out, b = [], smallest
    while b < context:
        out.append(b)
        b *= 2
    return tuple(out) + (context,)


def sample_token(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """Draw from softmax(logits / temperature) restricted to the top-k tokens and the top-p
    nucleus, as ``generate`` samples (``reference_numpy.generation.filter_logits``, the NumPy
    form of ``bigmodel_jax``'s: on the host, because a per-request top-k would otherwise
    compile a new ``lax.top_k`` for every distinct k). logits: (V,)."""
    z = filter_logits(np.asarray(logits, np.float64)[None] / sampling.temperature, sampling.top_k,
                      sampling.top_p)[0]
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


@partial(jax.jit, static_argnums=(5,), donate_argnums=(1,))
def _prefill(params: Tree, cache: Tree, ids: jax.Array, slot: jax.Array, length: jax.Array, config: GPTConfig
             ) -> tuple[jax.Array, jax.Array, Tree]:
    """ids (1, Tb) into cache row ``slot`` at slots [0, Tb) -> (logits (V,) at token
    ``length - 1``, its argmax, the cache). The row is cut out as a batch-1 cache and put back."""
    K = config.kv_heads
    row = {n: [jax.lax.dynamic_slice_in_dim(c, slot * K, K, 0) for c in cache[n]] for n in ("k", "v")}
    logits, row = gpt.forward(params, {"input_ids": ids}, config, cache=row, cache_pos=0)
    new = {n: [jax.lax.dynamic_update_slice_in_dim(c, r, slot * K, 0) for c, r in zip(cache[n], row[n])]
           for n in ("k", "v")}
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, 0, keepdims=False)
    return last, jnp.argmax(last), new


@partial(jax.jit, static_argnums=(4,), donate_argnums=(1,))
def _decode(params: Tree, cache: Tree, toks: jax.Array, pos: jax.Array, config: GPTConfig
            ) -> tuple[jax.Array, jax.Array, Tree]:
    """One token per row: toks (B,) at per-row slots pos (B,) -> (logits (B, V), argmax (B,),
    the cache)."""
    logits, cache = gpt.forward(params, {"input_ids": toks[:, None]}, config, cache=cache, cache_pos=pos)
    last = logits[:, -1]
    return last, jnp.argmax(last, axis=-1), cache


class Engine:
    """The scheduler and its decode loop, on a background thread (``start`` / ``stop``).

    ``params``: the model's JAX parameters (prepared here once in the decoding layout);
    ``slots``: B, rows decoded together; ``context``: S, cache slots per row (prompt +
    max_tokens must fit; default the model's max_len); ``max_queue``: waiting requests beyond
    the busy slots before ``submit`` raises ``QueueFull``; ``eos_ids``: tokens that end a
    sequence (finish reason "stop")."""

    def __init__(self, params: Tree, config: GPTConfig, *, slots: int = 8, context: int | None = None,
                 max_queue: int = 64, eos_ids: Sequence[int] = ()) -> None:
        if not isinstance(config, GPTConfig):
            raise ValueError(f"the engine serves GPT / Llama decoders (GPTConfig), got {type(config).__name__}")
        context = config.max_len if context is None else context
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if not isinstance(context, int) or not 2 <= context <= config.max_len:
            raise ValueError(f"context must be an int in [2, max_len={config.max_len}], got {context!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self.config, self.slots, self.context, self.max_queue = config, slots, context, max_queue
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.buckets = prefill_buckets(context)
        self.params = decode_params(params, config, DECODE_LAYOUT)
        dtype = self.params["embed"]["embedding"].dtype
        self._cache = gpt.init_layer_caches(config, slots, context, dtype)
        self._rows: list[Request | None] = [None] * slots
        self._pos = np.zeros(slots, np.int32)  # slot of each row's next token
        self._last = np.zeros(slots, np.int32)  # each row's last token, fed to the next step
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self.steps = 0  # decode steps run (for tests and metrics)
        self.step_seconds = 0.0

    # -- the public surface ----------------------------------------------------------------

    def check(self, prompt_len: int, sampling: SamplingParams) -> None:
        """ValueError, naming the field, if this request can never be served."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty: it needs at least one token")
        check_sampling_options(self.config.vocab_size, max_new_tokens=sampling.max_tokens,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if prompt_len + sampling.max_tokens > self.context:
            raise ValueError(f"the prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) = "
                             f"{prompt_len + sampling.max_tokens} is more than the model's context of "
                             f"{self.context} tokens; ask for at most {max(self.context - prompt_len, 0)} tokens")

    def submit(self, request: Request) -> None:
        """Queue ``request``; ``QueueFull`` when ``max_queue`` requests already wait,
        ``EngineStopped`` while draining."""
        self.submit_many([request])

    def submit_many(self, requests: Sequence[Request]) -> None:
        """Queue ``requests`` at once (all or none), so the next step admits them together."""
        for request in requests:
            self.check(len(request.prompt), request.sampling)
            if request.sampling.temperature > 0:
                request.rng = np.random.default_rng(request.sampling.seed)
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.extend(requests)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """Drop ``request`` (a client went away): its row is freed before the next step."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def active(self) -> int:
        return sum(r is not None for r in self._rows)

    def warmup(self) -> None:
        """Compile every prefill bucket and the decode step now (before serving), so no request
        waits on a compilation. Writes only row 0, which is free."""
        with self._cv:
            if self.active():
                raise RuntimeError("warmup runs before serving")
            for tb in self.buckets:
                _, tok, self._cache = _prefill(self.params, self._cache, jnp.zeros((1, tb), jnp.int32),
                                               jnp.asarray(0), jnp.asarray(1), self.config)
            _, tok, self._cache = _decode(self.params, self._cache, jnp.zeros(self.slots, jnp.int32),
                                          jnp.zeros(self.slots, jnp.int32), self.config)
            jax.block_until_ready(tok)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bigmodel-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish the queued and running ones first, else
        cancel them. Joins the thread."""
        with self._cv:
            self._accepting = False
            if not drain:
                for r in list(self._waiting) + [r for r in self._rows if r is not None]:
                    r.cancelled = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------------

    def _finish(self, b: int | None, request: Request, reason: str) -> None:
        if b is not None:
            self._rows[b] = None
        try:
            request.on_finish(reason)
        except Exception:  # a callback's failure must not stop the other rows
            pass

    def _emit(self, b: int, request: Request, token: int) -> None:
        """Hand ``token`` to the request; finish the row on EOS / max_tokens / full context."""
        request.generated += 1
        self._last[b] = token
        try:
            request.on_token(token)
        except Exception:
            request.cancelled = True
        if token in self.eos_ids:
            self._finish(b, request, "stop")
        elif request.generated >= request.sampling.max_tokens or self._pos[b] >= self.context:
            self._finish(b, request, "length")

    def _choose(self, b: int, logits: Any, greedy_token: int) -> int:
        request = self._rows[b]
        if request.sampling.temperature == 0:
            return greedy_token
        return sample_token(np.asarray(logits), request.sampling, request.rng)

    def _admit(self, b: int, request: Request) -> None:
        """Prefill ``request`` into row b and emit its first token."""
        P = len(request.prompt)
        tb = next(t for t in self.buckets if t >= P)
        ids = np.zeros((1, tb), np.int32)
        ids[0, :P] = request.prompt
        self._rows[b] = request
        logits, tok, self._cache = _prefill(self.params, self._cache, jnp.asarray(ids), jnp.asarray(b),
                                            jnp.asarray(P), self.config)
        self._pos[b] = P
        self._emit(b, request, self._choose(b, logits, int(tok)))

    def _loop(self) -> None:
        while True:
            with self._cv:
                for b, r in enumerate(self._rows):  # cancelled rows free their slot now
                    if r is not None and r.cancelled:
                        self._finish(b, r, "cancelled")
                while self._waiting and self._waiting[0].cancelled:
                    self._finish(None, self._waiting.popleft(), "cancelled")
                if not self._waiting and not self.active():
                    if self._stop:
                        return
                    self._cv.wait()
                    continue
                admit = []
                for b in range(self.slots):
                    while self._rows[b] is None and self._waiting:
                        r = self._waiting.popleft()
                        if r.cancelled:
                            self._finish(None, r, "cancelled")
                            continue
                        self._rows[b] = r  # reserved; prefilled below, outside the lock
                        admit.append((b, r))
            try:
                for b, r in admit:
                    self._admit(b, r)
                if self.active():
                    self._step()
            except Exception as err:  # a failed step fails its rows, loudly, and the loop goes on
                for b, r in enumerate(self._rows):
                    if r is not None:
                        self._finish(b, r, f"error: {type(err).__name__}: {err}")

    def _step(self) -> None:
        """One (B, 1) decode for every row; free rows run on token 0 at slot 0 (their output is
        ignored and their row is rewritten by the next prefill)."""
        live = [b for b, r in enumerate(self._rows) if r is not None]
        pos = np.where([r is not None for r in self._rows], self._pos, 0).astype(np.int32)
        t0 = time.perf_counter()
        logits, toks, self._cache = _decode(self.params, self._cache, jnp.asarray(self._last), jnp.asarray(pos),
                                            self.config)
        toks = np.asarray(toks)
        sampled = any(self._rows[b].sampling.temperature > 0 for b in live)
        host = np.asarray(logits) if sampled else None
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        for b in live:
            r = self._rows[b]
            self._pos[b] += 1
            if r.cancelled:
                continue  # freed at the top of the next loop
            self._emit(b, r, self._choose(b, None if host is None else host[b], int(toks[b])))


def compiled_shapes() -> tuple[int, int]:
    """(prefill, decode) compilations so far in this process: the bucketing test reads them."""
    return _prefill._cache_size(), _decode._cache_size()

