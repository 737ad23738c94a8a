"""Optimizers in NumPy with optax's interface, so one test or training loop drives both.

A ``GradientTransformation`` is a pair of pure functions, exactly as in optax::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params needed by adamw only
    params = apply_updates(params, updates)              # θ ← θ + u

Updates already carry the sign and the learning rate (``u = −α ...``). Optimizers are chains of
small transforms, as in optax: ``adam = chain(scale_by_adam, scale_by_learning_rate)``, so each
update rule below reads like its equation and composes with ``clip_by_global_norm`` and
``MultiSteps`` the same way.

Conventions:

* ``t`` is the step count held in the state (0 before the first update). Schedules are
  evaluated at ``t``; Adam's bias correction uses ``t + 1`` (the number of updates including
  this one), both as in optax.
* Every leaf keeps its dtype: float32 params and grads give float32 updates and state; scalar
  hyper-parameters are cast to the leaf's dtype before they touch it (NumPy would otherwise
  promote on a float64 scalar).
* Trees are nested dicts (``reference_numpy.tree``); all math is vectorised per leaf.
* Arguments are checked when a transform is built; a bad one raises ``ValueError`` naming it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import numpy as np

from reference_numpy.speed.chunks import leafwise
from reference_numpy.schedules import Schedule, make_schedule
from reference_numpy.tree import (
    Tree,
    tree_leaves,
    tree_leaves_with_path,
    tree_map,
    tree_set,
    tree_zeros_like,
)

__all__ = [
    "OPTIMIZERS",
    "AddDecayedWeightsState",
    "EmptyState",
    "GradientTransformation",
    "MultiSteps",
    "MultiStepsState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "check_optimizer_args",
    "clip_by_global_norm",
    "decay_mask",
    "global_norm",
    "identity",
    "make_optimizer",
    "make_schedule",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "trace",
]

ScalarOrSchedule = Union[float, Schedule]
MaskOrFn = Union[Tree, Callable[[Tree], Tree], None]


# --- the interface -----------------------------------------------------------------------------


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params=None) -> (updates, state)``."""

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class ScaleByScheduleState(NamedTuple):
    count: int  # t: updates applied so far; the schedule is read at t


class TraceState(NamedTuple):
    trace: Tree  # momentum buffer, shaped like params


class ScaleByAdamState(NamedTuple):
    count: int  # t: updates applied so far
    mu: Tree  # m, first moment, shaped like params
    nu: Tree  # v, second moment, shaped like params


class AddDecayedWeightsState(NamedTuple):
    count: int  # t, read by a weight-decay schedule


class MultiStepsState(NamedTuple):
    mini_step: int  # micro-batches accumulated in the current window, in [0, k)
    gradient_step: int  # real (emitted) updates so far
    inner_opt_state: Any  # the wrapped optimizer's state; advances only on emitted steps
    acc_grads: Tree  # running mean of this window's micro-batch gradients


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``θ ← θ + u`` per leaf, in the parameter's dtype."""
    return tree_map(leafwise(lambda p, u: np.asarray(p + u).astype(p.dtype, copy=False)), params, updates)


def identity() -> GradientTransformation:
    """``u ← g`` (no state)."""
    return GradientTransformation(lambda params: EmptyState(), lambda g, state, params=None: (g, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: Tree) -> tuple[Any, ...]:
        return tuple(tx.init(params) for tx in transforms)

    def update(grads: Tree, state: tuple[Any, ...], params: Tree | None = None
               ) -> tuple[Tree, tuple[Any, ...]]:
        if len(state) != len(transforms):
            raise ValueError(
                f"state must hold {len(transforms)} entries (one per transform), got {len(state)}"
            )
        new_state = []
        for tx, s in zip(transforms, state):
            grads, s = tx.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


# --- helpers -----------------------------------------------------------------------------------


def _like(value: float, x: np.ndarray) -> np.ndarray:
    """A scalar hyper-parameter in ``x``'s dtype, so ``value * x`` never promotes."""
    return np.asarray(value, dtype=np.asarray(x).dtype)


def _check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = True) -> float:
    """A finite real in ``[lo, hi)`` (open/closed ends as asked); else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _check_scalar_or_schedule(name: str, value: Any) -> ScalarOrSchedule:
    """A non-negative float, or a schedule ``step -> float``."""
    if callable(value):
        return value
    return _check_real(name, value, 0.0)


def _resolve_mask(mask: MaskOrFn, tree: Tree) -> Tree | None:
    """The bool tree a mask argument stands for (a callable is applied to ``tree``)."""
    if mask is None:
        return None
    mask_tree = mask(tree) if callable(mask) else mask
    for path, m in tree_leaves_with_path(mask_tree):
        if not isinstance(m, (bool, np.bool_)):
            raise ValueError(f"mask leaves must be bools, got {type(m).__name__} at {path!r}")
    return mask_tree


def global_norm(tree: Tree) -> float:
    """``‖g‖ = sqrt(Σ_leaves Σ g²)``, accumulated in float64 whatever the leaf dtypes."""
    squares = (float(np.sum(np.square(np.asarray(x, dtype=np.float64)))) for x in tree_leaves(tree))
    return math.sqrt(sum(squares))


# --- transforms --------------------------------------------------------------------------------


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """``u ← −α(t) u``: the descent sign and step size. ``α`` is a float or a schedule of ``t``."""
    lr = _check_scalar_or_schedule("learning_rate", learning_rate)
    if not callable(lr):
        step = -lr

        def update_const(u: Tree, state: EmptyState, params: Tree | None = None
                         ) -> tuple[Tree, EmptyState]:
            return tree_map(leafwise(lambda x: _like(step, x) * x), u), state

        return GradientTransformation(lambda params: EmptyState(), update_const)

    def init(params: Tree) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=0)

    def update(u: Tree, state: ScaleByScheduleState, params: Tree | None = None
               ) -> tuple[Tree, ScaleByScheduleState]:
        step = -float(lr(state.count))
        return tree_map(leafwise(lambda x: _like(step, x) * x), u), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum (optax ``trace``), ``μ = decay``::

        b ← g + μ b
        u ← b              (heavy ball)
        u ← g + μ b        (Nesterov, using the new b)
    """
    mu = _check_real("momentum", decay, 0.0, 1.0)

    def init(params: Tree) -> TraceState:
        return TraceState(trace=tree_zeros_like(params))

    def update(g: Tree, state: TraceState, params: Tree | None = None) -> tuple[Tree, TraceState]:
        b = tree_map(lambda gi, bi: gi + _like(mu, bi) * bi, g, state.trace)
        u = tree_map(lambda gi, bi: gi + _like(mu, bi) * bi, g, b) if nesterov else b
        return u, TraceState(trace=b)

    return GradientTransformation(init, update)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's direction (optax ``scale_by_adam``), with ``n = t + 1`` the update number::

        m ← b1 m + (1 − b1) g
        v ← b2 v + (1 − b2) g²
        m̂ = m / (1 − b1ⁿ),   v̂ = v / (1 − b2ⁿ)
        u = m̂ / (√(v̂ + eps_root) + eps)
    """
    b1 = _check_real("b1", b1, 0.0, 1.0)
    b2 = _check_real("b2", b2, 0.0, 1.0)
    eps = _check_real("eps", eps, 0.0)
    eps_root = _check_real("eps_root", eps_root, 0.0)

    def init(params: Tree) -> ScaleByAdamState:
        return ScaleByAdamState(count=0, mu=tree_zeros_like(params), nu=tree_zeros_like(params))

    def update(g: Tree, state: ScaleByAdamState, params: Tree | None = None
               ) -> tuple[Tree, ScaleByAdamState]:
        n = state.count + 1
        m = tree_map(leafwise(lambda gi, mi: _like(1.0 - b1, gi) * gi + _like(b1, mi) * mi), g, state.mu)
        v = tree_map(leafwise(lambda gi, vi: _like(1.0 - b2, gi) * (gi * gi) + _like(b2, vi) * vi),
                     g, state.nu)
        # Bias corrections in float64, then cast: 1 − b2ⁿ computed in float32 loses digits.
        c1, c2 = 1.0 - b1**n, 1.0 - b2**n

        def direction(mi: np.ndarray, vi: np.ndarray) -> np.ndarray:
            m_hat = mi / _like(c1, mi)
            v_hat = vi / _like(c2, vi)
            return m_hat / (np.sqrt(v_hat + _like(eps_root, vi)) + _like(eps, vi))

        return tree_map(leafwise(direction), m, v), ScaleByAdamState(count=n, mu=m, nu=v)

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: MaskOrFn = None
) -> GradientTransformation:
    """Decoupled weight decay (optax ``add_decayed_weights``): ``u ← u + λ θ`` where mask is True.

    ``mask`` is None (every leaf), a bool tree shaped like params, or a callable
    ``tree -> bool tree`` (applied to the updates, as optax does). Needs ``params``.
    """
    wd = _check_scalar_or_schedule("weight_decay", weight_decay)

    def init(params: Tree) -> AddDecayedWeightsState | EmptyState:
        _resolve_mask(mask, params)  # a malformed mask fails at init, not mid-training
        return AddDecayedWeightsState(count=0) if callable(wd) else EmptyState()

    def update(u: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        if params is None:
            raise ValueError("params must be passed to update() for weight decay (u ← u + λ θ)")
        if callable(wd):
            lam, new_state = float(wd(state.count)), AddDecayedWeightsState(count=state.count + 1)
        else:
            lam, new_state = wd, state
        if not callable(wd) and lam == 0.0:
            return u, new_state
        mask_tree = _resolve_mask(mask, u)
        decay = leafwise(lambda ui, p: ui + _like(lam, p) * p)
        if mask_tree is None:
            return tree_map(decay, u, params), new_state
        decayed = tree_map(lambda ui, p, m: decay(ui, p) if m else ui, u, params, mask_tree)
        return decayed, new_state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale the whole tree so its global norm is at most ``max_norm`` (optax semantics)::

        ‖g‖ = sqrt(Σ g²) over every leaf
        u = g                    if ‖g‖ < max_norm
        u = (g / ‖g‖) max_norm   otherwise
    """
    c = _check_real("max_norm", max_norm, 0.0, lo_open=True)

    def update(g: Tree, state: EmptyState, params: Tree | None = None) -> tuple[Tree, EmptyState]:
        norm = global_norm(g)
        if norm < c:
            return g, state
        return tree_map(lambda x: (x / _like(norm, x)) * _like(c, x), g), state

    return GradientTransformation(lambda params: EmptyState(), update)


# --- optimizers --------------------------------------------------------------------------------


def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False
) -> GradientTransformation:
    """Stochastic gradient descent (optax ``sgd``).

    Plain: ``θ ← θ − α g`` exactly. With ``momentum`` μ: ``b ← g + μ b``, ``θ ← θ − α b``;
    Nesterov: ``θ ← θ − α (g + μ b)`` with the new ``b``.
    """
    if nesterov and momentum is None:
        raise ValueError("nesterov=True needs a momentum value (got momentum=None)")
    first = identity() if momentum is None else trace(momentum, nesterov)
    return chain(first, scale_by_learning_rate(learning_rate))


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Adam (optax ``adam``): ``θ ← θ − α m̂ / (√(v̂ + eps_root) + eps)``; see ``scale_by_adam``."""
    return chain(scale_by_adam(b1, b2, eps, eps_root), scale_by_learning_rate(learning_rate))


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """AdamW (optax ``adamw``), decay decoupled from the adaptive scaling::

        θ ← θ − α (m̂ / (√(v̂ + eps_root) + eps) + λ θ)      on leaves where mask is True
        θ ← θ − α  m̂ / (√(v̂ + eps_root) + eps)             elsewhere

    Note the decay is scaled by ``α`` (optax's and PyTorch's convention). ``mask`` is a bool tree
    or a callable ``params -> bool tree`` such as ``decay_mask``.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def decay_mask(params: Tree) -> Tree:
    """Which leaves get weight decay: kernels and embeddings yes, biases and norm scales no.

    A leaf is decayed when it has 2+ dimensions *and* is not named ``bias`` or ``scale``. The
    name test matters: attention biases are ``(H, E)`` and a stacked-layer tree adds a leading
    ``L`` axis to every bias and norm scale, so a rank rule alone would decay them. Works on
    NumPy and JAX leaves alike (it only reads ``ndim``).
    """
    mask = tree_map(lambda x: False, params)
    for path, leaf in tree_leaves_with_path(params):
        name = path.rsplit("/", 1)[-1]
        tree_set(mask, path, bool(np.ndim(leaf) >= 2 and name not in ("bias", "scale")))
    return mask


# --- gradient accumulation ---------------------------------------------------------------------


def _accumulator_dtype(params: Tree) -> np.dtype:
    """The widest float among the leaves, at least float32 (shared with the JAX factory)."""
    return np.result_type(np.float32, *(np.asarray(x).dtype for x in tree_leaves(params)))


class MultiSteps:
    """Gradient accumulation over ``k`` micro-batches (optax ``MultiSteps``, grad-mean mode).

    On micro-step ``i = 0..k−1`` of a window the running mean of its gradients is updated::

        a ← a + (g − a) / (i + 1)          (so a = mean of the window's g after step i)

    and the update is zero, except on the last micro-step (``i = k − 1``), which feeds ``a`` to
    the wrapped optimizer, returns its update, advances its state and resets ``a ← 0``. So params
    change once every ``k`` calls, by one step of the inner optimizer on the mean gradient.

    ``every_k_schedule`` is an int ``k >= 1`` or a callable ``gradient_step -> k``.
    ``accumulator_dtype=None`` keeps ``a`` in the widest parameter float dtype (at least float32);
    ``bigmodel_jax.optim.make_optimizer`` applies the same rule to optax's MultiSteps.
    """

    def __init__(self, opt: GradientTransformation, every_k_schedule: int | Callable[[int], int],
                 accumulator_dtype: Any = None) -> None:
        if callable(every_k_schedule):
            self._every_k = every_k_schedule
        else:
            k = self._check_k(every_k_schedule)
            self._every_k = lambda step: k
        self._opt = opt
        self._acc_dtype = None if accumulator_dtype is None else np.dtype(accumulator_dtype)

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"every_k_schedule must be an integer >= 1, got {k!r}")
        return int(k)

    @property
    def inner_opt(self) -> GradientTransformation:
        return self._opt

    def init(self, params: Tree) -> MultiStepsState:
        """Zero accumulator, inner optimizer's initial state."""
        dt = self._acc_dtype or _accumulator_dtype(params)
        return MultiStepsState(
            mini_step=0,
            gradient_step=0,
            inner_opt_state=self._opt.init(params),
            acc_grads=tree_map(lambda p: np.zeros(np.shape(p), dt), params),
        )

    def update(self, grads: Tree, state: MultiStepsState, params: Tree | None = None
               ) -> tuple[Tree, MultiStepsState]:
        """Accumulate ``grads``; emit the inner optimizer's update on every ``k``-th call."""
        k = self._check_k(self._every_k(state.gradient_step))
        i = state.mini_step
        acc = tree_map(lambda g, a: np.asarray(a + (g - a) / (i + 1)).astype(a.dtype, copy=False),
                       grads, state.acc_grads)
        if i < k - 1:
            return tree_zeros_like(grads), state._replace(mini_step=i + 1, acc_grads=acc)
        # Final micro-step: the inner optimizer sees the mean gradient in the grads' own dtype.
        mean_grads = tree_map(lambda a, g: a.astype(np.asarray(g).dtype, copy=False), acc, grads)
        updates, inner = self._opt.update(mean_grads, state.inner_opt_state, params)
        return updates, MultiStepsState(
            mini_step=0,
            gradient_step=state.gradient_step + 1,
            inner_opt_state=inner,
            acc_grads=tree_zeros_like(acc),
        )

    def has_updated(self, state: MultiStepsState) -> bool:
        """True right after a call that changed the params."""
        return state.mini_step == 0 and state.gradient_step > 0

    def gradient_transformation(self) -> GradientTransformation:
        """The plain ``(init, update)`` pair."""
        return GradientTransformation(self.init, self.update)


# --- config entry point ------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_WEIGHT_DECAY = 1e-4  # optax adamw's default, used when weight_decay is None


def check_optimizer_args(
    name: str,
    learning_rate: Any,
    *,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    weight_decay: Any,
    momentum: float | None,
    nesterov: bool,
    clip_norm: float | None,
    accumulate_steps: int,
) -> None:
    """Validate a ``make_optimizer`` config (both sides call this, so they fail alike).

    Besides ranges, refuses settings that the named optimizer would silently ignore:
    ``weight_decay`` for sgd/adam, ``momentum`` / ``nesterov`` for adam/adamw.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {list(OPTIMIZERS)}, got {name!r}")
    _check_scalar_or_schedule("learning_rate", learning_rate)
    _check_real("b1", b1, 0.0, 1.0)
    _check_real("b2", b2, 0.0, 1.0)
    _check_real("eps", eps, 0.0)
    _check_real("eps_root", eps_root, 0.0)
    if weight_decay is not None:
        _check_scalar_or_schedule("weight_decay", weight_decay)
        if name != "adamw" and (callable(weight_decay) or weight_decay != 0.0):
            raise ValueError(f"weight_decay is only applied by 'adamw'; {name!r} would ignore it")
    if momentum is not None:
        _check_real("momentum", momentum, 0.0, 1.0)
        if name != "sgd":
            raise ValueError(f"momentum applies to 'sgd' only (adam's is b1), got name={name!r}")
    if nesterov and (name != "sgd" or momentum is None):
        raise ValueError("nesterov=True needs name='sgd' and a momentum value")
    if clip_norm is not None:
        _check_real("clip_norm", clip_norm, 0.0, lo_open=True)
    k = accumulate_steps
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"accumulate_steps must be an integer >= 1, got {accumulate_steps!r}")


def resolve_decay_mask(mask: bool | MaskOrFn) -> MaskOrFn:
    """``make_optimizer``'s ``decay_mask`` argument as an optax-style mask.

    True: the ``decay_mask`` rule (no decay on biases and norm scales); False: decay every leaf;
    a bool tree or a callable is passed through.
    """
    if mask is True:
        return decay_mask
    if mask is False:
        return None
    return mask


def make_optimizer(
    name: str,
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule | None = None,
    momentum: float | None = None,
    nesterov: bool = False,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    decay_mask: bool | MaskOrFn = True,
) -> GradientTransformation:
    """Build an optimizer from one config; ``bigmodel_jax.optim.make_optimizer`` is the optax twin.

    The chain is ``MultiSteps(chain(clip_by_global_norm(clip_norm), <name>), accumulate_steps)``:
    clipping sees the accumulated mean gradient, i.e. the gradient of the whole effective batch.
    ``name`` is ``"sgd"`` (uses ``momentum``, ``nesterov``), ``"adam"`` (``b1, b2, eps,
    eps_root``) or ``"adamw"`` (those plus ``weight_decay``, default 1e-4, and ``decay_mask``).
    Optimizer-specific arguments left at their defaults are ignored by the other optimizers.
    """
    check_optimizer_args(
        name, learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
        momentum=momentum, nesterov=nesterov, clip_norm=clip_norm, accumulate_steps=accumulate_steps,
    )
    if name == "sgd":
        core = sgd(learning_rate, momentum, nesterov)
    elif name == "adam":
        core = adam(learning_rate, b1, b2, eps, eps_root)
    else:
        wd = DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
        mask = resolve_decay_mask(decay_mask)
        core = adamw(learning_rate, b1, b2, eps, eps_root, weight_decay=wd, mask=mask)
    if clip_norm is not None:
        core = chain(clip_by_global_norm(clip_norm), core)
    if accumulate_steps > 1:
        core = MultiSteps(core, accumulate_steps).gradient_transformation()
    return core
