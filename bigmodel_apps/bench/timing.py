"""Timing a step: warm-up, then repeat until a time budget, report the median and the minimum.

The median is the headline (a shared machine adds outliers in both directions: a neighbour's
burst slows one call, and a call can be lucky); the minimum is kept for reference. Every timed
function must block until its result is ready (``block_until_ready`` for JAX, plain return for
torch / NumPy on CPU, ``torch.cuda.synchronize`` on GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` and ``min`` over ``reps`` timed calls (after ``warmup``)."""

    median: float
    min: float
    reps: int
    warmup: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    """A measurement ready to time: ``call`` runs one step and blocks; ``info`` holds what was
    recorded while preparing (compile time, the first call's peak memory, XLA's analyses)."""

    name: str
    call: Callable[[], Any]
    info: dict[str, Any]


def time_interleaved(items: list[Prepared], *, min_time: float = 2.0, min_reps: int = 3,
                     max_reps: int = 50) -> dict[str, Timing]:
    """Time several steps **in alternation**, round after round (A B C, B C A, C A B, ...), until
    every step has at least ``min_reps`` calls and ``min_time`` seconds of calls (at most
    ``max_reps``). On a shared machine the load drifts over minutes; interleaving exposes every
    step to the same drift, so their ratios stay meaningful even when the absolute times do not.
    Each item's first (warm-up) call must already have run (``Prepared``)."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    times: dict[str, list[float]] = {it.name: [] for it in items}
    if len(times) != len(items):
        raise ValueError(f"item names must be unique, got {[it.name for it in items]}")

    def done(name: str) -> bool:
        t = times[name]
        return len(t) >= max_reps or (len(t) >= min_reps and sum(t) >= min_time)

    r = 0
    while not all(done(it.name) for it in items):
        order = items[r % len(items):] + items[:r % len(items)]
        for it in order:
            if done(it.name):
                continue
            t0 = time.perf_counter()
            it.call()
            times[it.name].append(time.perf_counter() - t0)
        r += 1
    return {n: Timing(statistics.median(t), min(t), len(t), 1) for n, t in times.items()}


def timed(prepared: Prepared, *, min_time: float, max_reps: int = 50) -> dict[str, Any]:
    """Time one prepared step on its own; the record is ``prepared.info`` plus ``timing``."""
    timing = time_interleaved([prepared], min_time=min_time, max_reps=max_reps)[prepared.name]
    return {"timing": timing.as_dict(), **prepared.info}


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
