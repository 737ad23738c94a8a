"""One optimizer update on each backend: the JAX step (jit-compiled, donated buffers) and the
NumPy-reference step, written to do exactly the same arithmetic so the two can be compared step
for step (``train --verify-steps``).

One update on ``k = accumulate_steps`` micro-batches b_1..b_k (each B/k examples)::

    g   = (1/k) sum_i grad L(theta; b_i, dropout masks_i)     mean of micro-batch gradients
    L   = (1/k) sum_i L(theta; b_i)
    u, s = optimizer.update(g, s, theta)                      clip_by_global_norm -> adamw/adam/sgd
    theta = theta + u                                         (schedule read at the update count)

With equal-sized micro-batches whose losses are means over the same number of items, ``g`` is the
gradient of the whole batch (up to float rounding): the accumulation test checks this.

Dropout randomness: micro-batch i of update t uses ``fold_in(fold_in(key(seed), t), i)``, so a
resumed run draws the same masks as an uninterrupted one. For verification the reference is fed
the masks the JAX step drew (the models' ``dropout_masks(config, key, ...)`` materialises exactly
the tree a forward draws from ``key``); ``step(..., masks=)`` also takes explicit mask trees.

Mixed precision (JAX only): the float32 master parameters are cast to bfloat16 inside the loss,
so the forward and backward run in bf16 while the gradients (d loss / d float32 params) come back
float32 and the optimizer updates float32 weights.

Non-finite values stop training: every step reports whether the loss, each gradient leaf and each
updated parameter leaf are finite; on failure the update is *not* applied (the state stays the
last good one) and ``StepOutput.problem`` names the first bad tensor in sorted-path order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from bigmodel_train.config import DEFAULT_ADAMW_DECAY
from reference_numpy import optim as ref_optim
from reference_numpy import schedules as ref_schedules
from reference_numpy.speed import allocator
from reference_numpy.tree import Tree, tree_flatten, tree_leaves_with_path, tree_map, tree_unflatten

__all__ = [
    "StepOutput", "NonFiniteError", "make_schedule_args", "leaf_paths", "first_nonfinite",
    "flatten_state", "unflatten_state", "JaxStepper", "ReferenceStepper", "batch_size_of",
    "split_micro_batches", "find_nonfinite_input", "task_label_check", "check_micro_batch_labels",
]


class NonFiniteError(RuntimeError):
    """Training hit a NaN / inf: the message names the step and the first non-finite tensor."""

    def __init__(self, step: int, tensor: str, detail: str = "") -> None:
        self.step = step
        self.tensor = tensor
        super().__init__(f"non-finite value at step {step}: first non-finite tensor is {tensor}"
                         + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class StepOutput:
    """What one update reports back to the loop."""

    loss: float  # mean loss over the update's micro-batches (before the update)
    grad_norm: float  # global norm of the mean gradient, before clipping
    problem: str | None = None  # first non-finite tensor ("loss", "grads/<path>", "params/<path>")


# --------------------------------------------------------------------------------------------
# shared helpers (no jax)


def make_schedule_args(cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(kind, kwargs)`` of the learning-rate schedule for a ``RunConfig``: the same arguments
    go to ``reference_numpy.schedules.make_schedule`` and ``bigmodel_jax.optim.make_schedule``."""
    if cfg.schedule == "constant":
        return "constant", {"value": cfg.lr}
    if cfg.schedule == "warmup_linear":
        return "warmup_linear", {"peak_value": cfg.lr, "warmup_steps": cfg.warmup_steps,
                                 "decay_steps": cfg.steps, "end_value": cfg.min_lr, "init_value": 0.0}
    return "warmup_cosine", {"init_value": 0.0, "peak_value": cfg.lr, "warmup_steps": cfg.warmup_steps,
                             "decay_steps": cfg.steps, "end_value": cfg.min_lr}


def optimizer_args(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``make_optimizer`` (both sides) for a ``RunConfig``; accumulation is
    done by the step itself (mean of micro-batch gradients), so the optimizer sees one gradient."""
    kw: dict[str, Any] = {"clip_norm": cfg.clip_norm}
    if cfg.optimizer == "adamw":
        kw["weight_decay"] = DEFAULT_ADAMW_DECAY if cfg.weight_decay is None else cfg.weight_decay
    elif cfg.weight_decay:  # RunConfig refuses this; a hand-built config may not have been checked
        raise ValueError(f"weight_decay={cfg.weight_decay} is only applied by optimizer=adamw; set "
                         f"weight_decay=none with optimizer={cfg.optimizer}")
    return kw


def leaf_paths(tree: Tree) -> list[str]:
    """"/"-joined leaf paths in sorted-key order (the order jax flattens a dict in, too)."""
    return [p for p, _ in tree_leaves_with_path(tree)]


def first_nonfinite(loss: float, grad_ok: Sequence[bool], param_ok: Sequence[bool], paths: Sequence[str]
                    ) -> str | None:
    """The first non-finite tensor: ``"loss"``, then ``"grads/<path>"``, then ``"params/<path>"``
    (an update that overflowed), or None when everything is finite."""
    bad_grad = next((p for p, ok in zip(paths, grad_ok) if not ok), None)
    if not math.isfinite(loss):
        return "loss" + (f" (first non-finite gradient: grads/{bad_grad})" if bad_grad else "")
    if bad_grad is not None:
        return f"grads/{bad_grad}"
    bad_param = next((p for p, ok in zip(paths, param_ok) if not ok), None)
    return None if bad_param is None else f"params/{bad_param}"


def find_nonfinite_input(batches: Sequence[dict[str, Any]]) -> str | None:
    """``"batch/<key>"`` (with the example index) of the first float input holding NaN / inf, so
    a bad record is blamed on the data rather than on a gradient."""
    for micro, batch in enumerate(batches):
        for key in sorted(batch):
            x = np.asarray(batch[key])
            if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
                row = int(np.argwhere(~np.isfinite(x))[0][0])
                return f"batch/{key} (micro-batch {micro}, example {row})"
    return None


def batch_size_of(batch: dict[str, Any]) -> int:
    """Leading (B) size of a batch dict."""
    return int(np.shape(next(iter(batch.values())))[0])


def split_micro_batches(batch: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """A batch of B examples -> k micro-batches of B/k, in order (example j in micro-batch j // (B/k))."""
    b = batch_size_of(batch)
    if b % k:
        raise ValueError(f"batch of {b} examples cannot be split into {k} equal micro-batches")
    m = b // k
    return [{key: np.asarray(v)[i * m:(i + 1) * m] for key, v in batch.items()} for i in range(k)]


# --- optimizer state <-> a flat tree of arrays (for checkpoints) -----------------------------


def flatten_state(state: Any) -> dict[str, Any]:
    """An optimizer state (nested tuples / NamedTuples / dicts of arrays and ints: optax's and
    the reference's alike) -> ``{"0/mu/embed/embedding": array, ...}`` of NumPy arrays."""
    return {path: np.asarray(leaf) for path, leaf in tree_flatten(state, sequences=True).items()}


def unflatten_state(flat: dict[str, Any], template: Any, convert: Callable[[Any, Any], Any]) -> Any:
    """Inverse of ``flatten_state`` onto ``template``'s structure; ``convert(saved, like)``
    turns each saved array into the template leaf's type. Missing or extra entries raise."""
    values: dict[str, Any] = {}
    for key, like in tree_flatten(template, sequences=True).items():
        if key not in flat:
            raise KeyError(f"optimizer state in the checkpoint has no entry {key!r} (different optimizer?)")
        saved = flat[key]  # left where it is (a restored sharded array is not copied to the host)
        if np.shape(saved) != np.shape(like):
            raise ValueError(f"optimizer state {key!r}: checkpoint shape {np.shape(saved)} != {np.shape(like)}")
        values[key] = convert(saved, like)
    extra = sorted(set(flat) - set(values))
    if extra:
        raise KeyError(f"checkpoint optimizer state has entries this optimizer lacks: {extra[:5]}")
    return tree_unflatten(values, like=template)


def task_label_check(loss_fn: Callable[..., Any]) -> Callable[[dict[str, Any]], None] | None:
    """The host-side label check for ``loss_fn`` when it is a task's ``jax_loss`` (a bound
    method of an object with ``model_config``, ``ref_module()`` and ``head``, as ``Task``): the
    family's ``reference_numpy.models.<family>.check_loss_labels(batch, config[, head])``.
    None for any other callable (nothing to check against)."""
    owner = getattr(loss_fn, "__self__", None)
    config = getattr(owner, "model_config", None)
    if config is None or not callable(getattr(owner, "ref_module", None)):
        return None
    check = owner.ref_module().check_loss_labels
    head = getattr(owner, "head", None)
    extra = () if head is None else (head,)
    return lambda batch: check(batch, config, *extra)


def check_micro_batch_labels(check: Callable[[dict[str, Any]], None] | None, step: int,
                             micro_batches: Sequence[dict[str, Any]]) -> None:
    """Run ``check`` (e.g. ``task_label_check(loss_fn)``) on each micro-batch on the host.

    The compiled step traces the labels, so the loss cannot see their values: a label >= V
    would give NaN and a stray negative one a finite wrong loss. This is one min / max per label
    array, and raises ``ValueError`` naming the update, the micro-batch, the key and the value."""
    if check is None:
        return
    for i, batch in enumerate(micro_batches):
        try:
            check(batch)
        except ValueError as err:
            raise ValueError(f"training batch of update {step} (micro-batch {i}): {err}") from None


# --------------------------------------------------------------------------------------------
# the NumPy reference step


class ReferenceStepper:
    """The update above with the NumPy reference: hand-written ``loss_and_grad`` per micro-batch
    and ``reference_numpy.optim.make_optimizer`` (no jax anywhere)."""

    def __init__(self, loss_and_grad: Callable[..., tuple[Any, Tree]], cfg: Any, params: Tree) -> None:
        """``loss_and_grad(params, batch, masks=None) -> (loss, grads)`` (the task's reference
        function); ``params`` a NumPy tree (copied)."""
        if allocator.requested():  # opt-in, process-wide: BIGMODEL_NUMPY_KEEP_FREED_MEMORY=1
            allocator.keep_freed_memory()  # reuse freed activation memory across steps
        kind, kw = make_schedule_args(cfg)
        self.schedule = ref_schedules.make_schedule(kind, **kw)
        self.optimizer = ref_optim.make_optimizer(cfg.optimizer, self.schedule, **optimizer_args(cfg))
        self.loss_and_grad = loss_and_grad
        self.params = tree_map(lambda a: np.array(a, copy=True), params)
        self.opt_state = self.optimizer.init(self.params)
        self.paths = leaf_paths(self.params)

    def step(self, step: int, micro_batches: Sequence[dict[str, Any]],
             masks: Sequence[Tree | None] | None = None) -> StepOutput:
        """One update on ``micro_batches`` (optionally with explicit dropout masks, one tree per
        micro-batch); the state advances only when everything is finite."""
        k = len(micro_batches)
        masks = list(masks) if masks is not None else [None] * k
        gsum, lsum = None, 0.0
        for batch, m in zip(micro_batches, masks):
            loss, grads = self.loss_and_grad(self.params, batch, masks=m)
            lsum = lsum + np.asarray(loss)
            gsum = grads if gsum is None else tree_map(lambda a, b: a + b, gsum, grads)
        grads = tree_map(lambda g: (g / k).astype(g.dtype), gsum)
        loss = float(lsum / k)
        grad_ok = [bool(np.all(np.isfinite(g))) for _, g in tree_leaves_with_path(grads)]
        norm = ref_optim.global_norm(grads) if all(grad_ok) else float("nan")
        if not math.isfinite(loss) or not all(grad_ok):
            return StepOutput(loss, norm, first_nonfinite(loss, grad_ok, [], self.paths))
        updates, new_state = self.optimizer.update(grads, self.opt_state, self.params)
        new_params = ref_optim.apply_updates(self.params, updates)
        param_ok = [bool(np.all(np.isfinite(p))) for _, p in tree_leaves_with_path(new_params)]
        problem = first_nonfinite(loss, grad_ok, param_ok, self.paths)
        if problem is None:
            self.params, self.opt_state = new_params, new_state
        return StepOutput(loss, norm, problem)

    def lr(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based)."""
        return float(self.schedule(step))

    def params_numpy(self) -> Tree:
        return self.params

    def opt_state_flat(self) -> dict[str, np.ndarray]:
        return flatten_state(self.opt_state)

    def state_arrays(self) -> dict[str, Any]:
        """Parameters and flat optimizer state, as NumPy (an Orbax checkpoint's arrays)."""
        return {"params": self.params, "opt_state": self.opt_state_flat()}

    def state_targets(self) -> dict[str, Any]:
        """Templates a checkpoint is restored onto: NumPy arrays of the current state's shapes."""
        return self.state_arrays()

    def set_state(self, arrays: dict[str, Any]) -> None:
        """Take restored ``state_targets()``-shaped arrays as the current state."""
        self.load(arrays["params"], arrays["opt_state"])

    def load(self, params: Tree, opt_flat: dict[str, Any]) -> None:
        """Restore parameters and optimizer state (from a checkpoint)."""
        self.params = tree_map(lambda a: np.array(a, copy=True), params)

        def convert(saved: np.ndarray, like: Any) -> Any:
            if isinstance(like, (int, np.integer)) and not isinstance(like, bool):
                return int(saved)
            return np.array(saved, dtype=np.asarray(like).dtype, copy=True)

        self.opt_state = unflatten_state(opt_flat, self.optimizer.init(self.params), convert)


# --------------------------------------------------------------------------------------------
# the JAX step: jax, optax and bigmodel_jax are imported inside it, so the NumPy backend never
# loads jax (bigmodel_jax sits below this package: these imports dodge no cycle)


class _JaxOut(NamedTuple):
    loss: Any
    grad_norm: Any
    grad_ok: Any  # (n_leaves,) bool
    param_ok: Any  # (n_leaves,) bool


# Compiled train steps of this process, by (loss_key, optimizer settings, precision, donation):
# a second run of the same model (a resumed run, another seed, another learning-rate schedule)
# reuses the executable instead of compiling again.
_STEP_CACHE: dict[Any, Any] = {}


class JaxStepper:
    """The update above in JAX: one jit-compiled function per (shapes, masks given or not), with
    the parameter and optimizer-state buffers donated (updated in place, no second copy).

    The learning rate of update t is computed on the host (the reference schedule's float, the
    same values as optax's) and passed in as a traced scalar: the compiled step then does not
    depend on the schedule, so runs that differ only in lr / warmup / steps / seed share it.
    """

    def __init__(self, loss_fn: Callable[..., Any], cfg: Any, params: Tree, *, donate: bool = True,
                 loss_key: Any = None, check_labels: Callable[[dict[str, Any]], None] | None = None,
                 model_config: Any = None) -> None:
        """``loss_fn(params, batch, *, dropout_key=None, masks=None) -> scalar`` (the task's JAX
        loss; traced inside the step); ``params`` a NumPy or JAX tree (float32 master weights).
        ``loss_key``: a hashable that identifies ``loss_fn``'s computation (e.g. the model config);
        steps with equal keys and optimizer settings share one compiled function.
        ``check_labels(micro_batch)``: raises ``ValueError`` on a bad label, run on the host before
        each step (traced labels cannot be checked); None = ``task_label_check(loss_fn)``.
        ``cfg.mesh`` (e.g. ``"data:2,fsdp:2,tensor:2"``; needs ``model_config``): parameters and
        optimizer state are placed on that device mesh by the logical-axis rules of
        ``bigmodel_jax.sharding`` and each micro-batch is split over ``(data, fsdp)``; the same
        compiled step then runs SPMD (XLA inserts the collectives)."""
        import jax
        import jax.numpy as jnp

        from bigmodel_jax.tree import to_jax
        kind, kw = make_schedule_args(cfg)
        self.schedule = ref_schedules.make_schedule(kind, **kw)  # host-side floats
        opt_kw = optimizer_args(cfg)
        self.optimizer = _optimizer_with_lr(cfg.optimizer, opt_kw, None)
        self.mixed_precision = bool(cfg.mixed_precision)
        self.base_key = jax.random.key(cfg.seed)
        self.placement = _Placement.build(getattr(cfg, "mesh", ""), model_config, params)
        self.params = self.placement.put_params(to_jax(tree_map(np.asarray, params)))
        self.opt_state = self.placement.init_state(self.optimizer, self.params)
        self.paths = leaf_paths(self.params)
        self.check_labels = task_label_check(loss_fn) if check_labels is None else check_labels
        floats = [x.dtype for x in jax.tree.leaves(self.params) if jnp.issubdtype(x.dtype, jnp.floating)]
        self.lr_dtype = jnp.result_type(*floats)
        cache_key = None if loss_key is None else (
            loss_key, cfg.optimizer, tuple(sorted(opt_kw.items())), self.mixed_precision, donate,
            self.placement.key)
        if cache_key is not None and cache_key in _STEP_CACHE:
            self._step = _STEP_CACHE[cache_key]
        else:
            self._step = _compile_step(loss_fn, cfg.optimizer, opt_kw, self.mixed_precision, self.lr_dtype, donate,
                                       self.placement.out_shardings(self.opt_state))
            if cache_key is not None:
                _STEP_CACHE[cache_key] = self._step

    def step(self, step: int, micro_batches: Sequence[dict[str, Any]],
             masks: Sequence[Tree | None] | None = None) -> StepOutput:
        """One update; micro-batches are stacked on a leading k axis for the compiled step.
        Their labels are checked on the host first (``check_micro_batch_labels``)."""
        import jax.numpy as jnp

        check_micro_batch_labels(self.check_labels, step, micro_batches)
        # on several processes, micro_batches hold this process's rows only (local_rows)
        batches = {key: self.placement.put_batch(np.stack([np.asarray(b[key]) for b in micro_batches]))
                   for key in micro_batches[0]}
        stacked = None
        if masks is not None and any(m is not None for m in masks):
            stacked = tree_map(lambda *ms: jnp.asarray(np.stack([np.asarray(m) for m in ms])), *masks)
        lr = jnp.asarray(self.schedule(step), self.lr_dtype)
        with self.placement.context():  # the activation constraints' rules, while tracing
            self.params, self.opt_state, out = self._step(self.params, self.opt_state, batches,
                                                          jnp.asarray(step, jnp.int32), lr, self.base_key, stacked)
        loss = float(_host(out.loss))
        grad_ok, param_ok = _host(out.grad_ok).tolist(), _host(out.param_ok).tolist()
        return StepOutput(loss, float(_host(out.grad_norm)), first_nonfinite(loss, grad_ok, param_ok, self.paths))

    def local_rows(self, micro_size: int) -> np.ndarray | None:
        """The rows of each micro-batch of ``micro_size`` examples that this process feeds, or None
        when it feeds all of them (one process). ``step`` then takes micro-batches of these rows."""
        return self.placement.local_rows(micro_size)

    def dropout_key(self, step: int, micro: int) -> Any:
        """The key micro-batch ``micro`` of update ``step`` draws its dropout masks from."""
        import jax

        return jax.random.fold_in(jax.random.fold_in(self.base_key, step), micro)

    def lr(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based)."""
        return float(self.schedule(step))

    def rng_state(self) -> np.ndarray:
        """The base dropout key's raw data (uint32), for checkpoints."""
        import jax

        return np.asarray(jax.random.key_data(self.base_key))

    def set_rng_state(self, data: Any) -> None:
        """Restore the base dropout key from ``rng_state()``'s data."""
        import jax
        import jax.numpy as jnp

        self.base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(data, np.uint32)))

    def params_numpy(self) -> Tree:
        """The parameters as NumPy (on several processes: gathered from all of them, a collective
        every process must call)."""
        from bigmodel_jax.tree import to_numpy

        return to_numpy(self.placement.gather(self.params))

    def opt_state_flat(self) -> dict[str, np.ndarray]:
        return flatten_state(self.placement.gather(self.opt_state))

    def state_arrays(self) -> dict[str, Any]:
        """Parameters and optimizer state where they are (JAX arrays, sharded on a mesh), for an
        Orbax checkpoint: nothing is gathered, each process saves its own shards."""
        return {"params": self.params, "opt_state": dict(tree_flatten(self.opt_state, sequences=True))}

    def state_targets(self) -> dict[str, Any]:
        """``state_arrays()``'s shapes, dtypes and shardings: a checkpoint of any mesh is restored
        straight onto this stepper's placement."""
        import jax

        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self.state_arrays())

    def set_state(self, arrays: dict[str, Any]) -> None:
        """Take restored ``state_targets()``-shaped arrays as the current state."""
        self.params = arrays["params"]
        self.opt_state = unflatten_state(arrays["opt_state"], self.opt_state, lambda saved, like: saved)

    def load(self, params: Tree, opt_flat: dict[str, Any]) -> None:
        """Restore parameters and optimizer state (from a checkpoint), bit for bit."""
        import jax.numpy as jnp

        from bigmodel_jax.tree import to_jax

        self.params = self.placement.put_params(to_jax(tree_map(np.asarray, params)))
        template = self.placement.init_state(self.optimizer, self.params)

        def convert(saved: np.ndarray, like: Any) -> Any:
            if not hasattr(like, "dtype"):
                return type(like)(saved)
            value = jnp.asarray(saved, dtype=like.dtype)
            return self.placement.put_like(value, like)

        self.opt_state = unflatten_state(opt_flat, template, convert)


class _Placement:
    """Where the step's arrays live: the default device, or a mesh (``RunConfig.mesh``) with the
    logical-axis rules of ``bigmodel_jax.sharding``. One object, so the stepper's code is the same
    either way."""

    def __init__(self, mesh: Any = None, param_shardings: Any = None, sizes: tuple[tuple[str, int], ...] = ()) -> None:
        self.mesh, self.param_shardings, self.key = mesh, param_shardings, sizes
        self.rows: np.ndarray | None = None  # this process's rows of each micro-batch (several processes)
        self.micro_size = 0

    def multi_process(self) -> bool:
        import jax

        return self.mesh is not None and jax.process_count() > 1

    def local_rows(self, micro_size: int) -> np.ndarray | None:
        """Rows of a micro-batch (of ``micro_size``) held by this process's devices; None on one process."""
        if not self.multi_process():
            return None
        from bigmodel_jax import sharding

        shard = sharding.batch_sharding(self.mesh, 2, batch_axis=1)
        rows: set[int] = set()
        for index in shard.addressable_devices_indices_map((1, micro_size)).values():
            rows.update(range(*index[1].indices(micro_size)))
        self.rows, self.micro_size = np.asarray(sorted(rows)), micro_size
        return self.rows

    def gather(self, tree: Any) -> Any:
        """``tree`` as host arrays; on several processes every process gets the whole arrays."""
        import jax

        if not self.multi_process():
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    @classmethod
    def build(cls, mesh_text: str, model_config: Any, params: Tree) -> _Placement:
        if not mesh_text:
            return cls()
        if model_config is None:
            raise ValueError("a mesh needs the model config (its parameters' logical axes)")
        from bigmodel_jax import sharding

        sizes = sharding.parse_mesh(mesh_text)
        mesh = sharding.make_mesh(sizes)
        return cls(mesh, sharding.param_shardings(model_config, mesh, params=params), tuple(sorted(sizes.items())))

    def put_params(self, params: Tree) -> Tree:
        import jax

        return params if self.mesh is None else jax.device_put(params, self.param_shardings)

    def init_state(self, optimizer: Any, params: Tree) -> Any:
        if self.mesh is None:
            return optimizer.init(params)
        from bigmodel_jax import sharding

        # every moment is created in its parameter's sharding: the optimizer state is sharded like
        # the parameters (ZeRO-3 / FSDP on the fsdp axis); counters are replicated
        return sharding.init_opt_state(optimizer, params)

    def put_batch(self, x: np.ndarray) -> Any:
        """A stacked micro-batch leaf (k, B, ...): B split over (data, fsdp) on a mesh."""
        import jax
        import jax.numpy as jnp

        if self.mesh is None or x.ndim < 2:
            return jnp.asarray(x)
        from bigmodel_jax import sharding

        shard = sharding.batch_sharding(self.mesh, x.ndim, batch_axis=1)
        if self.rows is None:
            return jax.device_put(x, shard)
        # several processes: x holds this process's rows (self.rows) of the global micro-batch;
        # each local device gets its slice of them
        if x.shape[1] != len(self.rows):
            raise ValueError(f"this process feeds {len(self.rows)} rows of each micro-batch, got {x.shape[1]}")
        rows = self.rows
        shape = (x.shape[0], self.micro_size, *x.shape[2:])

        def local(index: tuple[slice, ...]) -> np.ndarray:
            wanted = np.arange(self.micro_size)[index[1]]
            return x[(index[0], np.searchsorted(rows, wanted), *index[2:])]

        return jax.make_array_from_callback(shape, shard, local)

    def put_like(self, value: Any, like: Any) -> Any:
        import jax

        return value if self.mesh is None else jax.device_put(value, like.sharding)

    def out_shardings(self, opt_state: Any) -> Any:
        import jax

        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        # the step's scalars (loss, norms, checks) replicated: every process reads them
        return (self.param_shardings, jax.tree.map(lambda x: x.sharding, opt_state),
                NamedSharding(self.mesh, PartitionSpec()))

    def context(self) -> Any:
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        from bigmodel_jax import sharding

        return sharding.use_mesh(self.mesh)


def _host(x: Any) -> np.ndarray:
    """A (replicated) step output on the host; on several processes, this process's copy."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _optimizer_with_lr(name: str, opt_kw: dict[str, Any], lr: Any) -> Any:
    """``bigmodel_jax.optim.make_optimizer`` whose learning rate is the value ``lr`` (a traced
    scalar inside the step; None only to build the state, whose structure does not depend on it)."""
    from bigmodel_jax import optim as jax_optim

    return jax_optim.make_optimizer(name, lambda count: lr, **opt_kw)


def _compile_step(loss_fn: Callable[..., Any], name: str, opt_kw: dict[str, Any], mixed: bool, lr_dtype: Any,
                  donate: bool, out_shardings: Any = None) -> Any:
    """The jit-compiled update (module docstring) for one loss and optimizer configuration."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_of(p: Tree, batch: dict[str, Any], key: Any, masks: Any) -> jax.Array:
        if mixed:  # bf16 compute; the cast is inside the differentiated function, so the
            #       gradient w.r.t. the float32 master weights comes back float32
            p = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
        out = loss_fn(p, batch, dropout_key=key, masks=masks)
        return out.astype(jnp.float32) if mixed else out

    def train_step(params: Tree, opt_state: Any, batches: dict[str, Any], step: jax.Array, lr: jax.Array,
                   base_key: jax.Array, masks: Any) -> tuple[Tree, Any, _JaxOut]:
        # batches: every leaf (k, B/k, ...); masks: None or a tree with leaves (k, ...)
        k = jax.tree.leaves(batches)[0].shape[0]
        step_key = jax.random.fold_in(base_key, step)
        grad_fn = jax.value_and_grad(loss_of)

        def micro(i: Any, batch: dict[str, Any], m: Any) -> tuple[jax.Array, Tree]:
            key = None if m is not None else jax.random.fold_in(step_key, i)
            return grad_fn(params, batch, key, m)

        if k == 1:
            first = jax.tree.map(lambda x: x[0], batches)
            loss, grads = micro(0, first, None if masks is None else jax.tree.map(lambda x: x[0], masks))
        else:
            def body(carry: tuple[Any, Tree], xs: Any) -> tuple[tuple[Any, Tree], None]:
                lsum, gsum = carry
                i, batch, m = xs
                loss_i, g = micro(i, batch, m)
                return (lsum + loss_i, jax.tree.map(jnp.add, gsum, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            loss_dtype = jnp.float32 if mixed else lr_dtype
            (lsum, gsum), _ = jax.lax.scan(body, (jnp.zeros((), loss_dtype), zeros), (jnp.arange(k), batches, masks))
            loss = lsum / k
            grads = jax.tree.map(lambda g: (g / k).astype(g.dtype), gsum)
        grad_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        updates, new_opt = _optimizer_with_lr(name, opt_kw, lr).update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        param_ok = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)])
        ok = jnp.isfinite(loss) & jnp.all(grad_ok) & jnp.all(param_ok)
        # A bad step leaves the state as it was (the last good one), so nothing is lost.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        out = _JaxOut(loss, optax.tree.norm(grads), grad_ok, param_ok)
        return keep(new_params, params), keep(new_opt, opt_state), out

    if out_shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    # on a mesh the updated state keeps the input's placement, so every step reuses one executable
    return jax.jit(train_step, donate_argnums=(0, 1) if donate else (), out_shardings=out_shardings)
