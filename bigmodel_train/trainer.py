"""The training loop, shared by the JAX trainer and the NumPy-reference trainer.

    for update t = start .. steps - 1:
        batch  = train[order(t)]                    data order: epoch e = t // per_epoch shuffled by
                                                    (seed, e), batch j = t mod per_epoch
        micro  = batch split into accumulate_steps micro-batches
        masks  = dropout masks of (seed, t, micro)  (drawn inside the JAX step from a key)
        out    = stepper.step(t, micro)             JaxStepper or ReferenceStepper (steps.py)
        [t < verify_steps: the reference steps on the same micro-batches and masks; every
         parameter leaf is compared; divergence past TRAJECTORY_PARITY stops the run]
        non-finite loss / gradient / update -> NonFiniteError naming t + 1 and the tensor
        log every log_every; evaluate every eval_every; checkpoint every checkpoint_every

Everything that decides update t -- parameters, optimizer state, the data position t and the
dropout key -- is in the checkpoint, so ``resume`` continues bit-identically (on CPU). Steps are
counted from 1 in messages and logs: "step 7" is the 7th update; a checkpoint at step 7 holds the
state after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_train import distributed
from bigmodel_train.checkpoint import CHECKPOINT_DIR, CheckpointError, latest_checkpoint, list_checkpoints
from bigmodel_train.checkpoint import load_checkpoint
from bigmodel_train.config import RunConfig, load_run_config, save_config
from bigmodel_train.orbax_checkpoint import RunCheckpoints, read_meta, read_state, step_dir
from bigmodel_train.interrupt import Interrupted, StopSignals
from bigmodel_train.run_identity import RUN_FILE, artifact_fingerprint, check_checkpoint, ensure_run_id
from bigmodel_train.runlock import RunLock, RunLockedError
from bigmodel_train.data.packing import epoch_permutation
from bigmodel_train.logging import RunLogger, jsonable, plot_metrics
from bigmodel_train.steps import (
    JaxStepper,
    NonFiniteError,
    ReferenceStepper,
    find_nonfinite_input,
    split_micro_batches,
)
from bigmodel_train.tasks import Task, build_task
from reference_numpy.tolerances import TRAJECTORY_PARITY, normwise_error, tolerance_for
from reference_numpy.tree import Tree, tree_leaves_with_path

__all__ = ["TrainResult", "VerifyError", "BatchOrder", "train", "compare_params", "evaluate_run",
           "load_run", "RunCorruptError", "SaveError", "Interrupted"]


class VerifyError(RuntimeError):
    """``--verify-steps``: the JAX and NumPy-reference trajectories diverged."""

    def __init__(self, step: int, tensor: str, max_abs: float, rel: float, tol: Any) -> None:
        self.step, self.tensor, self.max_abs, self.rel = step, tensor, max_abs, rel
        super().__init__(
            f"verify-steps: JAX and the NumPy reference diverge at step {step}: {tensor} has "
            f"max|jax - ref| = {max_abs:.3e}, relative {rel:.3e} > tolerance rel={tol.rel:g} "
            f"(abs={tol.abs:g}, reference_numpy.tolerances.TRAJECTORY_PARITY)")


class RunCorruptError(RuntimeError):
    """A run directory / checkpoint that cannot be resumed (different data or config)."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions...); earlier ones are intact."""

    def __init__(self, path: Path, err: OSError, last_good: str | None) -> None:
        self.path, self.last_good = path, last_good
        reason = err.strerror or str(err)
        super().__init__(f"could not write checkpoint {path}: {reason}; the last good checkpoint is "
                         f"{last_good or 'none'} (earlier checkpoints are intact)")


@dataclass
class TrainResult:
    """What ``train`` returns (and writes to ``run_dir/summary.json``)."""

    run_dir: Path
    step: int  # updates done
    val: dict[str, Any] = field(default_factory=dict)  # final validation metrics
    test: dict[str, Any] | None = None  # final test metrics (when the data has a test split)
    sample: str | None = None  # generated example (LM, translation)
    throughput: float = 0.0  # task units (tokens / images / examples) per second, compile excluded
    unit: str = "examples"
    wall_s: float = 0.0
    checkpoint: str | None = None
    verified_steps: int = 0
    stopped_early: bool = False  # stop_after reached (an interruption, for resume tests)


class BatchOrder:
    """Which training examples update t uses: epoch ``e = t // P`` (P = N // B batches per epoch,
    the remainder dropped) is ``epoch_permutation(N, seed, e)``, and update t takes its batch
    ``t mod P``. Stateless: the data position is just t."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise ValueError(f"the training split has {n} examples, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def position(self, t: int) -> dict[str, int]:
        """The data position before update t (what a checkpoint stores)."""
        epoch, j = divmod(t, self.per_epoch)
        return {"batches_done": t, "epoch": epoch, "batch_in_epoch": j, "examples": self.n,
                "batch_size": self.batch_size, "seed": self.seed}

    def indices(self, t: int) -> np.ndarray:
        epoch, j = divmod(t, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._perm[1][j * self.batch_size:(j + 1) * self.batch_size]


def compare_params(jax_params: Tree, ref_params: Tree, loss_jax: float, loss_ref: float, step: int,
                   dtype: str) -> None:
    """Raise ``VerifyError`` at the first tensor (loss, then parameter leaves in sorted-path
    order) whose normwise error exceeds ``TRAJECTORY_PARITY[dtype]``."""
    tol = tolerance_for(TRAJECTORY_PARITY, dtype)
    a, r = np.asarray([loss_jax]), np.asarray([loss_ref])
    max_abs, rel = normwise_error(a, r)
    if not tol.passes(max_abs, rel):
        raise VerifyError(step, "loss", max_abs, rel, tol)
    ref = dict(tree_leaves_with_path(ref_params))
    for path, leaf in tree_leaves_with_path(jax_params):
        max_abs, rel = normwise_error(np.asarray(leaf), ref[path])
        if not tol.passes(max_abs, rel):
            raise VerifyError(step, f"params/{path}", max_abs, rel, tol)


def _make_stepper(task: Task, cfg: RunConfig, params: Tree) -> Any:
    if cfg.backend == "numpy":
        return ReferenceStepper(task.ref_loss_and_grad, cfg, params)
    if cfg.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    return JaxStepper(task.jax_loss, cfg, params, loss_key=task.loss_key(), model_config=task.model_config)


def _ref_masks(task: Task, cfg: RunConfig, step: int, micro: list[dict[str, Any]]) -> list[Any] | None:
    """NumPy-backend dropout masks of update ``step``: a generator seeded by (seed, step, i)."""
    if not getattr(task.model_config, "dropout", 0.0):
        return None
    out = []
    for i, mb in enumerate(micro):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xD207, step, i]))
        out.append(task.ref_dropout_masks(rng, mb))
    return out


def _checkpoint_state(stepper: Any, cfg: RunConfig, task: Task, order: BatchOrder, step: int,
                      identity: dict[str, str]) -> dict[str, Any]:
    rng = stepper.rng_state() if hasattr(stepper, "rng_state") else np.asarray([cfg.seed], np.int64)
    return {
        **identity,  # run_id and the artifacts' fingerprint (run_identity.check_checkpoint)
        **stepper.state_arrays(),  # params, opt_state: where they are (sharded; nothing gathered)
        "step": step,
        "data_position": order.position(step),
        "rng": {"seed": cfg.seed, "key_data": np.asarray(rng)},
        "config": cfg.to_dict(),
        "model_config": dataclasses.asdict(task.model_config),
    }


class _Saver:
    """The run's Orbax checkpoints while training: async saves, and the last one known to be
    complete (named by every error). A failed write (a full disk...) becomes ``SaveError``
    naming the step directory and the last good checkpoint; Orbax's temporary-then-rename
    leaves every earlier step intact."""

    def __init__(self, run_dir: Path, keep_last: int, last_good: str | None) -> None:
        self.run_dir, self.last_good = run_dir, last_good
        self.pending: Path | None = None
        self.store = RunCheckpoints(run_dir / CHECKPOINT_DIR, keep_last)

    def _failed(self, path: Path, err: BaseException) -> SaveError:
        cause = _os_error(err)
        if cause is None:
            raise err
        return SaveError(path, cause, self.last_good or _latest(self.run_dir))

    def save(self, state: dict[str, Any], step: int) -> str:
        self.wait()  # the previous save's errors surface here, naming its step
        path = step_dir(self.run_dir / CHECKPOINT_DIR, step)
        try:
            self.pending = self.store.save(step, state)
        except Exception as err:  # noqa: BLE001 (converted or re-raised by _failed)
            raise self._failed(path, err) from err
        return str(path)

    def wait(self) -> None:
        if self.pending is None:
            return
        path, self.pending = self.pending, None
        try:
            self.store.wait()
        except Exception as err:  # noqa: BLE001
            raise self._failed(path, err) from err
        self.last_good = str(path)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.store.close()


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (Orbax re-raises a background write's error wrapped)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    stop_after: int | None = None,
    task: Task | None = None,
    out: Callable[[str], None] = print,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (config.json, run.json, tokenizer / vocabulary, checkpoints/
    (Orbax steps, ``orbax_checkpoint``), metrics.jsonl, TensorBoard events, loss.png / metrics.png,
    summary.json).

    ``resume``: continue from the latest checkpoint in ``run_dir`` (its config.json is used; the
    given ``cfg`` may only change ``steps`` and logging / evaluation settings; the checkpoint must
    belong to this run and fit its model, data and tokenizer). ``overwrite``: start over,
    deleting the run's checkpoints. ``stop_after``: stop (with a checkpoint) once this many
    updates are done, as if interrupted.

    The run directory is locked for the whole call (``RunLockedError`` if another process holds
    it). SIGINT / SIGTERM stop the run after the current update with a checkpoint and raise
    ``Interrupted`` (exit code 130 / 143). Raises ``NonFiniteError`` / ``VerifyError`` /
    ``SaveError`` with the last good checkpoint left in place.

    Several processes (``cfg.coordinator`` / JAX's environment; ``bigmodel_train.distributed``):
    every process calls ``train`` with the same config (but its own ``process_id``); process 0
    locks, writes and reports, each process feeds its own rows, and all save checkpoints together.
    """
    run_dir = Path(run_dir)
    distributed.initialize(cfg)  # before anything touches a device (a no-op for one process)
    saved_cfg = load_run_config(run_dir) if resume else None  # ConfigError before anything is created
    main = distributed.is_main()
    with _run_lock(run_dir, main), StopSignals() as stop:
        if overwrite and not resume and main:
            if (run_dir / CHECKPOINT_DIR).exists():
                shutil.rmtree(run_dir / CHECKPOINT_DIR)
            (run_dir / RUN_FILE).unlink(missing_ok=True)  # starting over is a new run
        return _train_locked(cfg, run_dir, saved_cfg, stop, stop_after=stop_after, task=task,
                             out=out if main else _quiet)


@contextlib.contextmanager
def _run_lock(run_dir: Path, main: bool) -> Any:
    """The run directory's lock, taken by process 0 for all of a multi-process run (every process
    learns whether it got it, so none is left waiting for the others)."""
    lock = RunLock(run_dir) if main else None
    failure: RunLockedError | None = None
    if lock is not None:
        try:
            lock.__enter__()
        except RunLockedError as err:
            failure = err
    if distributed.agree(failure is not None):
        raise failure or RunLockedError(f"{run_dir}: process 0 could not lock the run directory")
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _quiet(*_: Any) -> None:
    pass


class _NoLogger:
    """What processes other than 0 log to: nothing."""

    def log(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _train_locked(cfg: RunConfig, run_dir: Path, saved_cfg: RunConfig | None, stop: StopSignals, *,
                  stop_after: int | None, task: Task | None, out: Callable[[str], None]) -> TrainResult:
    t_start = time.time()
    resume = saved_cfg is not None
    main = distributed.is_main()
    candidates: list[Path] = []
    if saved_cfg is not None:
        _check_resume_config(saved_cfg, cfg)
        candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
        if not candidates:
            raise RunCorruptError(f"{run_dir}: no checkpoint to resume from (train without --resume)")
    # Process 0 checks the checkpoint against the run, then writes config.json and the artifacts;
    # the others build their task from what it wrote.
    if main:
        task = task or build_task(cfg, run_dir)
        if candidates:
            path, meta = _newest_readable(candidates)
            check_checkpoint(meta, path, run_dir, cfg, task.model_config)
        identity = {"run_id": ensure_run_id(run_dir)}
        save_config(cfg, run_dir / "config.json")
        task.save_artifacts()
        splits = task.splits
    distributed.sync("bigmodel:artifacts")
    if not main:
        task = task or build_task(cfg, run_dir)
        identity = {"run_id": ensure_run_id(run_dir)}
        splits = task.splits
    identity["artifacts"] = artifact_fingerprint(run_dir)
    order = BatchOrder(len(splits["train"]), cfg.batch_size, cfg.seed)
    start, state, ckpt = 0, None, None
    if candidates:
        ckpt, state, stepper = _restore(run_dir, cfg, task, candidates)
        start = int(state["step"])
        out(f"resuming {run_dir} from {ckpt} (step {start})")
        pos = state["data_position"]
        if pos["examples"] != order.n or pos["batch_size"] != order.batch_size:
            raise RunCorruptError(f"{run_dir}: the checkpoint was taken with {pos['examples']} training examples "
                                  f"and batch_size {pos['batch_size']}; the data now gives {order.n} and "
                                  f"{order.batch_size}: the same data and config are needed to resume")
        if hasattr(stepper, "set_rng_state"):
            stepper.set_rng_state(state["rng"]["key_data"])
    else:
        stepper = _make_stepper(task, cfg, task.init_params())
    verifier = None
    if cfg.verify_steps and start < cfg.verify_steps and cfg.backend == "jax":
        verifier = ReferenceStepper(task.ref_loss_and_grad, cfg, stepper.params_numpy())
        if state is not None:
            verifier.load(stepper.params_numpy(), state["opt_state_ref"] if "opt_state_ref" in state else
                          _no_ref_state(run_dir))
    out(f"{task.describe()}; {cfg.steps} steps of {cfg.batch_size} "
        f"({cfg.accumulate_steps} micro-batch{'es' if cfg.accumulate_steps > 1 else ''}); backend {cfg.backend}"
        + (f"; verifying the first {cfg.verify_steps} steps against the NumPy reference" if verifier else "")
        + (f"; {distributed.process_count()} processes" if distributed.process_count() > 1 else ""))

    logger: Any = RunLogger(run_dir, tensorboard=cfg.tensorboard, resume_step=start if resume else None) \
        if main else _NoLogger()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    pbar = _progress(cfg, start, task.unit) if main else None
    saver = _Saver(run_dir, cfg.keep_last, ckpt)
    window_loss, window_n = 0.0, 0
    units_done, timed_s = 0, 0.0
    result = TrainResult(run_dir=run_dir, step=start, unit=task.unit)
    # each process feeds only its own rows of every micro-batch (None: all of them)
    rows = stepper.local_rows(cfg.micro_batch_size) if hasattr(stepper, "local_rows") else None
    if rows is not None:  # every process says which slice it reads (one line each)
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        print(f"process {distributed.process_index()} of {distributed.process_count()}: reads rows "
              + (f"{rows[0]}..{rows[-1]}" if contiguous else ",".join(map(str, rows)))
              + f" of every micro-batch of {cfg.micro_batch_size}", flush=True)
    halted = [False]

    def stopping() -> bool:
        """A stop signal has arrived (on any process: they all stop after the same update)."""
        if not halted[0]:
            halted[0] = distributed.agree(stop.requested)
        return halted[0]

    def checkpoint() -> str:
        return saver.save(_with_ref(_checkpoint_state(stepper, cfg, task, order, result.step, identity), verifier),
                          result.step)

    def stop_if_signalled(last: str) -> None:
        # the checkpoint of result.step is on disk when this is called
        if stopping():
            raise Interrupted(stop.signum or signal.SIGTERM, result.step, last)

    def eval_params() -> Tree:
        if distributed.process_count() == 1:
            return stepper.params
        from bigmodel_jax.tree import to_jax

        return to_jax(stepper.params_numpy())  # gathered: every process evaluates on its own devices

    failed = True
    try:
        for t in range(start, end):
            if stopping():  # a signal during data preparation or the last update's bookkeeping
                break
            indices = order.indices(t)
            if rows is not None:
                m = cfg.micro_batch_size
                indices = np.concatenate([indices[i * m + rows] for i in range(cfg.accumulate_steps)])
            batch = task.model_batch(splits["train"].batch(indices))
            micro = split_micro_batches(batch, cfg.accumulate_steps)
            # JAX draws its dropout masks inside the compiled step from (seed, t, micro-batch);
            # the NumPy backend draws its own from the same triple.
            masks = _ref_masks(task, cfg, t, micro) if cfg.backend == "numpy" else None
            t0 = time.perf_counter()
            res = stepper.step(t, micro, masks)
            if res.problem is not None:
                bad_input = find_nonfinite_input(micro) if res.problem.startswith("loss") else None
                saver.wait()
                raise NonFiniteError(t + 1, bad_input or res.problem,
                                     f"loss={res.loss:.6g}; the state was not updated; last good checkpoint: "
                                     f"{saver.last_good or _latest(run_dir) or 'none'}")
            if verifier is not None:
                # the reference gets the masks the JAX step drew (dropout_masks(key) is documented to
                # be exactly what the forward draws from key), so the real training step is checked
                ref_masks = None
                if getattr(task.model_config, "dropout", 0.0):
                    ref_masks = [task.dropout_masks(stepper.dropout_key(t, i), mb) for i, mb in enumerate(micro)]
                ref = verifier.step(t, micro, ref_masks)
                if ref.problem is not None:
                    raise NonFiniteError(t + 1, f"reference {ref.problem}")
                compare_params(stepper.params_numpy(), verifier.params_numpy(), res.loss, ref.loss, t + 1, cfg.dtype)
                result.verified_steps = t + 1
                if t + 1 >= cfg.verify_steps:
                    out(f"verify-steps: {t + 1} steps agree with the NumPy reference "
                        f"(loss {res.loss:.6f} vs {ref.loss:.6f}; every parameter within TRAJECTORY_PARITY)")
                    verifier = None
            dt = time.perf_counter() - t0
            units = task.units(batch) * distributed.process_count()  # (every process feeds as many rows)
            if t > start:  # the first step of a process includes the compile
                units_done += units
                timed_s += dt
            window_loss += res.loss
            window_n += 1
            rate = units_done / timed_s if timed_s > 0 else float("nan")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix_str(f"loss={res.loss:.4f} {task.unit}/s={rate:,.0f}", refresh=False)
            step = t + 1
            result.step = step
            if step % max(cfg.log_every, 1) == 0 or step == end:
                logger.log(step, "train", {"loss": window_loss / window_n, "lr": stepper.lr(t),
                                           "grad_norm": res.grad_norm, f"{task.unit}_per_s": rate,
                                           "elapsed_s": time.time() - t_start})
                window_loss, window_n = 0.0, 0
            if stopping():
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                m = task.evaluate(eval_params(), "val", cfg.backend)
                logger.log(step, "val", m)
                _write(pbar, out, f"step {step}: val {task.summary(m)}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != end:
                checkpoint()
        if pbar is not None:
            pbar.close()
            pbar = None
        result.throughput = units_done / timed_s if timed_s > 0 else float("nan")
        last = checkpoint()
        saver.wait()  # the final checkpoint is complete before anything is reported
        result.checkpoint = last
        stop_if_signalled(last)
        if result.step < cfg.steps:
            result.stopped_early = True
            out(f"stopped after step {result.step} (checkpoint {last}); continue with --resume")
            failed = False
            return result
        result.val = task.evaluate(eval_params(), "val", cfg.backend)
        logger.log(result.step, "val", result.val)
        out(f"final validation ({_count(result.val)}): {task.summary(result.val)}")
        stop_if_signalled(last)
        if "test" in task.splits:
            result.test = task.evaluate(eval_params(), "test", cfg.backend, max_examples=0)
            logger.log(result.step, "test", result.test)
            out(f"test ({_count(result.test)}): {task.summary(result.test)}")
            stop_if_signalled(last)
        result.sample = task.sample(eval_params(), cfg.backend) if main else ""
        if result.sample:
            out("sample:\n" + result.sample)
        out(f"throughput: {result.throughput:,.0f} {task.unit}/s (training steps, compile excluded)")
        failed = False
    finally:
        if pbar is not None:
            pbar.close()
        try:
            saver.close()  # a pending save completes (or names its error) before the process moves on
        except SaveError:
            if not failed:
                raise
        logger.close()
        result.wall_s = time.time() - t_start
        if cfg.plots and not stop.requested and main:
            try:
                written = plot_metrics(run_dir)
            except Exception as err:  # a plot must never hide the real outcome of a run
                written = []
                out(f"(plots not written: {err})")
            if written and not result.stopped_early and result.val:
                out("plots: " + ", ".join(str(p) for p in written))
    if main:
        _write_summary(result)
    return result


def _newest_readable(candidates: list[Path]) -> tuple[Path, dict[str, Any]]:
    """``(path, metadata)`` of the newest checkpoint whose metadata reads (an Orbax step's JSON; a
    file of the earlier format is read whole); unreadable ones are skipped with a warning."""
    for path in candidates:
        try:
            return path, (read_meta(path) if path.is_dir() else load_checkpoint(path, as_numpy=True))
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint {path} ({err}); trying an earlier one", RuntimeWarning,
                          stacklevel=3)
    raise RunCorruptError(f"{candidates[0].parent}: no usable checkpoint to resume from")


def _restore(run_dir: Path, cfg: RunConfig, task: Task, candidates: list[Path]) -> tuple[str, dict[str, Any], Any]:
    """``(path, state, stepper)``: the newest checkpoint that restores intact, placed on this run's
    devices (an Orbax step is read straight onto the stepper's shardings: any mesh, any number of
    processes); corrupt ones are skipped with a warning. A file of the earlier format (one
    safetensors file per step) is read on the host and placed the same way."""
    stepper = None
    for path in candidates:
        try:
            if path.is_dir():
                meta = read_meta(path)
                check_checkpoint(meta, path, run_dir, cfg, task.model_config)
                if stepper is None:
                    stepper = _make_stepper(task, cfg, task.init_params())
                state = read_state(path, stepper.state_targets())
                stepper.set_state(state)
            else:
                state = load_checkpoint(path, as_numpy=True)
                check_checkpoint(state, path, run_dir, cfg, task.model_config)
                if stepper is None:
                    stepper = _make_stepper(task, cfg, state["params"])
                stepper.load(state["params"], state["opt_state"])
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint {path} ({err}); trying an earlier one", RuntimeWarning,
                          stacklevel=3)
            continue
        return str(path), state, stepper
    raise RunCorruptError(f"{run_dir}: no usable checkpoint to resume from (all of {[str(p) for p in candidates]} "
                          "are corrupt)")


def _count(m: dict[str, Any]) -> str:
    """What an evaluation scored: "512 examples" / "30,720 tokens"."""
    return f"{m['tokens']:,} tokens" if "tokens" in m else f"{m.get('n', '?')} examples"


def _no_ref_state(run_dir: Path) -> dict[str, Any]:
    raise RunCorruptError(f"{run_dir}: resuming inside --verify-steps needs the reference optimizer state, which "
                          f"this checkpoint lacks; rerun from scratch")


def _with_ref(state: dict[str, Any], verifier: ReferenceStepper | None) -> dict[str, Any]:
    """While verification is running, the reference's optimizer state rides along (a resumed run
    continues verifying from identical states)."""
    if verifier is not None:
        state["opt_state_ref"] = verifier.opt_state_flat()
    return state


def _latest(run_dir: Path) -> str | None:
    try:
        p = latest_checkpoint(run_dir)
        return None if p is None else str(p)
    except Exception:  # noqa: BLE001 (only for a message)
        return None


# Config fields a resumed run may change (they do not affect the parameters' trajectory).
_RESUMABLE_CHANGES = {"steps", "eval_every", "log_every", "checkpoint_every", "keep_last", "progress", "plots",
                      "tensorboard", "sample_tokens", "prompt", "max_eval_examples", "eval_batch_size",
                      "verify_steps", "mesh",  # mesh: a checkpoint is restored onto any mesh
                      "coordinator", "num_processes", "process_id"}  # where it runs, not what it computes


def _check_resume_config(saved: RunConfig, given: RunConfig) -> None:
    diff = [f.name for f in dataclasses.fields(RunConfig)
            if getattr(saved, f.name) != getattr(given, f.name) and f.name not in _RESUMABLE_CHANGES]
    if diff:
        raise RunCorruptError(
            "resume: the run was trained with different settings for " + ", ".join(
                f"{k} (saved {getattr(saved, k)!r}, now {getattr(given, k)!r})" for k in diff)
            + "; resume with the run's own config (bigmodel train --resume RUN_DIR)")
    if given.steps != saved.steps and saved.schedule != "constant":
        # the schedule's length is part of the trajectory
        raise RunCorruptError(f"resume: steps changed from {saved.steps} to {given.steps}, which changes the "
                              f"{saved.schedule} learning-rate schedule; keep steps={saved.steps}")


def _progress(cfg: RunConfig, start: int, unit: str) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, desc="train")


def _write(pbar: Any, out: Callable[[str], None], msg: str) -> None:
    if pbar is not None:
        pbar.write(msg)
    else:
        out(msg)


def _write_summary(result: TrainResult) -> None:
    data = jsonable({k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()})
    data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
    atomic_write_text(result.run_dir / "summary.json", json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# loading a finished run (eval / generate)


def load_run(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None,
             **overrides: Any) -> tuple[RunConfig, Task, Tree, dict[str, Any]]:
    """``(cfg, task, params, state)`` of a run directory's latest (or the given) checkpoint;
    ``overrides`` change run-config fields that do not touch the model (e.g. max_eval_examples).
    A checkpoint of another run, or one that no longer fits the run's config.json, model or
    tokenizer, raises ``RunMismatchError`` naming what differs."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if checkpoint:
        path, state = Path(checkpoint), load_checkpoint(checkpoint, as_numpy=True)
    else:
        path, state = _newest_loadable(run_dir)
    task = build_task(cfg, run_dir)
    check_checkpoint(state, path, run_dir, cfg, task.model_config)
    return cfg, task, state["params"], state


def _newest_loadable(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that loads intact (as NumPy), skipping corrupt ones
    with a warning."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RunCorruptError(f"{run_dir}: no checkpoint found")
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, as_numpy=True)
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint {path} ({err}); trying an earlier one", RuntimeWarning,
                          stacklevel=3)
    raise RunCorruptError(f"{run_dir}: every checkpoint is corrupt")


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "val", *, checkpoint: str | None = None,
                 backend: str = "jax", max_examples: int = 0) -> tuple[Task, dict[str, Any]]:
    """Metrics of a run's checkpoint on ``split`` (also appended to its metrics.jsonl, so the run
    directory is locked meanwhile: ``RunLockedError`` while a trainer writes it)."""
    if not (Path(run_dir) / "config.json").is_file():
        load_run_config(run_dir)  # the ConfigError naming a directory that is not a run
    with RunLock(run_dir):
        cfg, task, params, state = load_run(run_dir, checkpoint, max_eval_examples=max_examples)
        if split not in task.splits:
            raise ValueError(f"split {split!r} not in this run's data; it has {sorted(task.splits)}")
        if backend == "jax":  # imported on first use, like Task.jax_module: the NumPy backend needs no jax
            from bigmodel_jax.tree import to_jax

            params = to_jax(params)
        m = task.evaluate(params, split, backend, max_examples=max_examples)
        with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(state["step"]), "split": f"eval_{split}",
                                "time": round(time.time(), 3), **jsonable(m)}) + "\n")
    return task, m
