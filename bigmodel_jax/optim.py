"""Optimizers for the JAX side: optax, built from the same config as the NumPy reference.

``make_optimizer`` / ``make_schedule`` take exactly the arguments of
``reference_numpy.optim.make_optimizer`` / ``reference_numpy.schedules.make_schedule`` and
build the optax chain that the reference mirrors; arguments are validated by the reference's
checks, so a bad config fails the same way on both sides. No optimizer math is written here.

Two wrappers keep float64 parity possible (they change dtypes only, never formulas):

* schedules: optax keeps the step count as int32, and ``int32 / int`` is float32 in JAX, so an
  optax schedule inside an optimizer computes the learning rate in float32 (a 1e-7 relative
  error, 1000x the float64 parity tolerance). ``make_schedule`` hands optax's schedule a float
  count in the default float dtype (float64 under x64).
* accumulation: ``optax.MultiSteps`` accumulates in float32 unless told otherwise; we pick the
  accumulator dtype from the params at ``init`` (widest leaf float, at least float32), the same
  rule the reference uses.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reference_numpy import optim as ref_optim
from reference_numpy import schedules as ref_schedules

__all__ = ["decay_mask", "make_optimizer", "make_schedule"]

# The same rule on both sides: kernels and embeddings decay, biases and norm scales do not.
decay_mask = ref_optim.decay_mask


def _float_count(schedule: optax.Schedule) -> optax.Schedule:
    """Evaluate ``schedule`` at a float count (float64 under x64) instead of optax's int32."""

    def wrapped(count: Any) -> jax.Array:
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        return schedule(jnp.asarray(count, dtype=dtype))

    return wrapped


def make_schedule(kind: str, **kw: Any) -> optax.Schedule:
    """optax twin of ``reference_numpy.schedules.make_schedule`` (same ``kind`` and arguments).

    ``"constant"`` → ``optax.constant_schedule``; ``"warmup_linear"`` →
    ``optax.join_schedules([linear_schedule(I, P, W), linear_schedule(P, E, T − W)], [W])``;
    ``"warmup_cosine"`` → ``optax.warmup_cosine_decay_schedule``.
    """
    ref_schedules.make_schedule(kind, **kw)  # validates kind and arguments: same errors both sides
    args = inspect.signature(ref_schedules.SCHEDULES[kind]).bind(**kw)
    args.apply_defaults()
    a = args.arguments
    if kind == "constant":
        sched = optax.constant_schedule(a["value"])
    elif kind == "warmup_linear":
        w, total = a["warmup_steps"], a["decay_steps"]
        sched = optax.join_schedules(
            [
                optax.linear_schedule(a["init_value"], a["peak_value"], w),
                optax.linear_schedule(a["peak_value"], a["end_value"], total - w),
            ],
            [w],
        )
    else:  # "warmup_cosine"
        sched = optax.warmup_cosine_decay_schedule(**a)
    return _float_count(sched)


def _multi_steps(opt: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
    """``optax.MultiSteps(opt, k)`` with the accumulator dtype chosen from the params at init."""

    def acc_dtype(tree: Any) -> Any:
        return jnp.result_type(np.float32, *(x.dtype for x in jax.tree.leaves(tree)))

    def init(params: Any) -> optax.MultiStepsState:
        return optax.MultiSteps(opt, k, accumulator_dtype=acc_dtype(params)).init(params)

    def update(updates: Any, state: optax.MultiStepsState, params: Any = None) -> tuple[Any, Any]:
        ms = optax.MultiSteps(opt, k, accumulator_dtype=acc_dtype(state.acc_grads))
        return ms.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float | optax.Schedule | None = None,
    momentum: float | None = None,
    nesterov: bool = False,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    decay_mask: Any = True,
) -> optax.GradientTransformation:
    """optax twin of ``reference_numpy.optim.make_optimizer`` (same arguments, same chain).

    ``MultiSteps(chain(clip_by_global_norm(clip_norm), sgd | adam | adamw), accumulate_steps)``.
    A schedule ``learning_rate`` must be a JAX-traceable one (``make_schedule`` here), not the
    reference's Python-float schedule.
    """
    ref_optim.check_optimizer_args(
        name, learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
        momentum=momentum, nesterov=nesterov, clip_norm=clip_norm, accumulate_steps=accumulate_steps,
    )
    if name == "sgd":
        core = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    elif name == "adam":
        core = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    else:
        wd = ref_optim.DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
        core = optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=wd,
            mask=ref_optim.resolve_decay_mask(decay_mask),
        )
    if clip_norm is not None:
        core = optax.chain(optax.clip_by_global_norm(clip_norm), core)
    if accumulate_steps > 1:
        core = _multi_steps(core, accumulate_steps)
    return core
