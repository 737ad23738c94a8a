"""Learning-rate schedules: plain callables ``step -> float`` with optax's formulas.

A schedule is evaluated at the optimizer's step count ``t`` (0 on the first update, as in
optax's ``scale_by_schedule``). Values are computed in Python float (float64); the optimizer
casts them to each leaf's dtype when it scales an update.

Step arguments are validated here (a negative step count is a bug, never "hold at the start"),
which is stricter than optax: optax falls back to ``transition_begin = 0`` for a negative
begin. For every valid argument the values equal optax's to float64 rounding.

Legend: ``t`` step, ``I`` init value, ``P`` peak value, ``E`` end value, ``W`` warmup steps,
``T`` transition / decay steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

Schedule = Callable[[int], float]


# --- argument checks ---------------------------------------------------------------------------


def _check_steps(name: str, value: Any, *, positive: bool = False) -> int:
    """An integer step count, ``>= 0`` (or ``> 0`` when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of steps, got {value!r}")
    lo = 1 if positive else 0
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _check_value(name: str, value: Any) -> float:
    """A finite real schedule value (learning rates, end points)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _step(step: Any) -> float:
    """The step count as a float; accepts Python / NumPy integers and 0-d integer arrays."""
    t = step.item() if hasattr(step, "item") else step
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise ValueError(f"step must be an integer step count, got {step!r}")
    if t < 0:
        raise ValueError(f"step must be >= 0, got {t}")
    return float(t)


# --- building blocks ---------------------------------------------------------------------------


def constant_schedule(value: float) -> Schedule:
    """``α(t) = value`` for every step."""
    v = _check_value("value", value)

    def schedule(step: int) -> float:
        _step(step)
        return v

    return schedule


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear ramp from ``init_value`` to ``end_value`` (optax ``linear_schedule``).

    With ``s = clip(t − B, 0, T)``:  ``α(t) = (I − E)(1 − s/T) + E``, i.e. ``I`` for ``t <= B``,
    ``E`` for ``t >= B + T``. ``transition_steps == 0`` holds ``init_value`` forever (as optax).
    """
    i = _check_value("init_value", init_value)
    e = _check_value("end_value", end_value)
    big_t = _check_steps("transition_steps", transition_steps)
    begin = _check_steps("transition_begin", transition_begin)

    def schedule(step: int) -> float:
        t = _step(step)
        if big_t == 0:
            return i
        s = min(max(t - begin, 0.0), float(big_t))
        # Same operation order as optax (power 1 of a polynomial schedule).
        return (i - e) * (1.0 - s / big_t) + e

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` (optax ``cosine_decay_schedule``).

    With ``s = min(t, T)`` and ``c = ½(1 + cos(π s / T))``:  ``α(t) = I((1 − alpha) c^p + alpha)``.
    """
    i = _check_value("init_value", init_value)
    big_t = _check_steps("decay_steps", decay_steps, positive=True)
    a = _check_value("alpha", alpha)
    p = _check_value("exponent", exponent)

    def schedule(step: int) -> float:
        s = min(_step(step), float(big_t))
        c = 0.5 * (1.0 + math.cos(math.pi * s / big_t))
        return i * ((1.0 - a) * c**p + a)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[k]`` from ``boundaries[k-1]`` on, fed the steps since that boundary.

    Same contract as optax ``join_schedules``: ``len(boundaries) == len(schedules) - 1``.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"boundaries must have one entry fewer than schedules, got {len(boundaries)} "
            f"boundaries for {len(schedules)} schedules"
        )
    bounds = [_check_steps(f"boundaries[{k}]", b) for k, b in enumerate(boundaries)]
    scheds = list(schedules)

    def schedule(step: int) -> float:
        t = int(_step(step))
        # The last boundary already passed decides; optax's nested `where` picks the same one.
        k, start = 0, 0
        for j, b in enumerate(bounds):
            if t >= b:
                k, start = j + 1, b
        return scheds[k](t - start)

    return schedule


# --- warmup + decay ----------------------------------------------------------------------------


def warmup_linear_decay_schedule(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> Schedule:
    """Linear warmup ``I → P`` over ``W`` steps, then linear decay ``P → E`` until step ``T``.

    ``decay_steps`` (``T``) is the *total* length including warmup, as in optax's
    ``warmup_cosine_decay_schedule``, so the decay lasts ``T − W`` steps::

        α(t) = I + (P − I) t / W               for t <  W
        α(t) = P + (E − P) (t − W) / (T − W)    for W <= t < T
        α(t) = E                                for t >= T

    The optax twin is ``join_schedules([linear_schedule(I, P, W),
    linear_schedule(P, E, T − W)], [W])``.
    """
    w = _check_steps("warmup_steps", warmup_steps)
    big_t = _check_steps("decay_steps", decay_steps)
    if big_t <= w:
        raise ValueError(
            f"decay_steps ({big_t}) must exceed warmup_steps ({w}): it is the total schedule "
            f"length including warmup"
        )
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, w),
            linear_schedule(peak_value, end_value, big_t - w),
        ],
        [w],
    )


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup ``I → P`` over ``W`` steps, then cosine decay ``P → E`` until step ``T``.

    optax's ``warmup_cosine_decay_schedule`` exactly: ``decay_steps`` (``T``) includes the warmup,
    and with ``alpha = E / P`` (0 when ``P == 0``), ``s = min(t − W, T − W)``::

        α(t) = I + (P − I) t / W                                   for t < W
        α(t) = P((1 − alpha) [½(1 + cos(π s / (T − W)))]^p + alpha)  for t >= W
    """
    w = _check_steps("warmup_steps", warmup_steps)
    big_t = _check_steps("decay_steps", decay_steps)
    if big_t <= w:
        raise ValueError(
            f"decay_steps ({big_t}) must exceed warmup_steps ({w}): it is the total schedule "
            f"length including warmup"
        )
    p = _check_value("peak_value", peak_value)
    e = _check_value("end_value", end_value)
    alpha = 0.0 if p == 0.0 else e / p
    return join_schedules(
        [
            linear_schedule(init_value, p, w),
            cosine_decay_schedule(p, big_t - w, alpha=alpha, exponent=exponent),
        ],
        [w],
    )


# --- config entry point ------------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant_schedule,
    "warmup_linear": warmup_linear_decay_schedule,
    "warmup_cosine": warmup_cosine_decay_schedule,
}


def make_schedule(kind: str, **kw: Any) -> Schedule:
    """Build a schedule from a config: ``kind`` in ``SCHEDULES``, ``kw`` its arguments.

    ``make_schedule("warmup_cosine", init_value=0.0, peak_value=3e-4, warmup_steps=100,
    decay_steps=10_000)``; ``bigmodel_jax.optim.make_schedule`` takes the same arguments.
    """
    try:
        build = SCHEDULES[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(SCHEDULES)}, got {kind!r}") from None
    try:
        return build(**kw)
    except TypeError as err:  # a missing or unknown keyword: say which schedule wanted what
        raise ValueError(f"bad arguments for schedule {kind!r}: {err}") from None
