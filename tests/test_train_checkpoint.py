"""Training checkpoints (bigmodel_train.checkpoint): bit-exact round trips of real optimizer
states, pruning, corruption handling, template (``like``) checks, and crash safety under a real
SIGKILL in the middle of a save."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bigmodel_train
from bigmodel_train import checkpoint as ck
from bigmodel_train.checkpoint import CheckpointError
from reference_numpy import optim as ref_optim
from reference_numpy.configs import preset

REPO_ROOT = Path(bigmodel_train.__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers


def assert_identical(a: Any, b: Any, where: str = "<root>") -> None:
    """Same container types, keys and leaf types; arrays equal bit for bit (NaNs included)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        labels = getattr(type(a), "_fields", range(len(a)))
        for lab, x, y in zip(labels, a, b):
            assert_identical(x, y, f"{where}/{lab}")
    elif isinstance(a, np.random.Generator):
        assert_identical(a.bit_generator.state, b.bit_generator.state, f"{where}/bit_generator")
    elif isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert jax.random.key_impl(a) == jax.random.key_impl(b), where
        assert_identical(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)),
                         where)
    elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
        if isinstance(a, jax.Array):  # placement too: jit recompiles on a committed-ness change
            assert a.committed == b.committed and a.sharding == b.sharding, where
        x, y = np.asarray(a), np.asarray(b)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), f"{where}: {x.dtype}{x.shape} vs " \
                                                         f"{y.dtype}{y.shape}"
        assert x.tobytes() == y.tobytes(), f"{where}: values differ"
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# The optax optimizers whose states are checkpointed, and their jitted updates (shared by all
# tests so each compiles once; eager optax would re-trace MultiSteps' lax.cond on every call).
OPTAX = {"adamw": optax.adamw(1e-3),
         "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1)),
         "multi_steps": optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=3)}
OPTAX_UPDATE = {name: jax.jit(opt.update) for name, opt in OPTAX.items()}


def run_steps(opt, params, n: int, seed: int, update=None):
    """``n`` updates on random gradients, so moments and counts are non-trivial."""
    rng = np.random.default_rng(seed)
    state = opt.init(params)
    on_jax = isinstance(jax.tree.leaves(params)[0], jax.Array)
    update = update or opt.update
    for _ in range(n):
        grads = jax.tree.map(lambda p: np.asarray(rng.standard_normal(np.shape(p)),
                                                  np.asarray(p).dtype), params)
        if on_jax:
            grads = jax.tree.map(jnp.asarray, grads)
        _, state = update(grads, state, params)
    return state


def make_state(seed: int = 0) -> dict[str, Any]:
    """A trainer's full state: JAX params and three optax states, NumPy params and reference
    optimizer states, RNGs of both kinds, step, data position, config and metadata. A fresh
    copy each call (tests advance its generators); built once per seed (optax compiles)."""
    return copy.deepcopy(_build_state(seed))


@functools.cache
def _build_state(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((11, 4)), jnp.float32)},
              "layers": {"attn": {"kernel": jnp.asarray(rng.standard_normal((2, 4, 4)),
                                                        jnp.float32)},
                         "norm": {"scale": jnp.ones((2, 4), jnp.bfloat16)}},
              "head": {"bias": jnp.asarray(rng.standard_normal(3))}}  # float64 (x64 tests)
    np_params = jax.tree.map(np.asarray, params)
    np_params["layers"]["norm"]["scale"] = np.ones((2, 4), np.float32)
    ref_adamw = ref_optim.make_optimizer("adamw", 1e-3, clip_norm=1.0, accumulate_steps=2)
    ref_sgd = ref_optim.sgd(0.1, momentum=0.9)
    np_rng = np.random.default_rng(seed)
    np_rng.standard_normal(5)  # advance it: has_uint32 / state differ from a fresh one
    mt = np.random.Generator(np.random.MT19937(seed))
    mt.integers(0, 10, 3)
    return {
        "step": 123,
        "params": params,
        "opt_state": {name: run_steps(opt, params, n, seed + i, OPTAX_UPDATE[name])
                      for i, ((name, opt), n) in enumerate(zip(OPTAX.items(), (2, 2, 4)))},
        "ref_params": np_params,
        "ref_opt_state": {"adamw_clip_accum": run_steps(ref_adamw, np_params, 3, seed + 3),
                          "sgd_momentum": run_steps(ref_sgd, np_params, 1, seed + 4)},
        "rng": jax.random.fold_in(jax.random.key(seed), 7),
        "rng_rbg": jax.random.key(seed, impl="rbg"),
        "legacy_rng": jax.random.PRNGKey(seed),  # raw uint32[2]
        "np_rng": np_rng,
        "np_rng_mt": mt,
        "data": {"epoch": 2, "shard": "train-00003", "offset": 98_304, "order_seed": 2**63 + 5},
        "config": preset("llama-tiny"),
        "metadata": {"lr": 3e-4, "best": float("nan"), "tags": ["a", "b"], "loss": np.float32(1.5),
                     "none": None, "done": False, "pair": (1, "x")},
    }


# --------------------------------------------------------------------------------------------
# round trips


def test_round_trip_with_like_is_bit_identical(tmp_path):
    state = make_state()
    path = ck.save_checkpoint(tmp_path, state, step=123)
    assert path == tmp_path / "checkpoints" / "step_00000123.safetensors"
    assert ck.checkpoint_step(path) == 123
    loaded = ck.load_checkpoint(path, like=make_state(seed=1))  # same shapes, other values
    assert_identical(loaded, state)
    # the exact optax / reference classes, not look-alikes
    assert type(loaded["opt_state"]["multi_steps"]) is optax.MultiStepsState
    assert type(loaded["opt_state"]["adamw"][0]) is optax.ScaleByAdamState
    assert type(loaded["ref_opt_state"]["adamw_clip_accum"]) is ref_optim.MultiStepsState


def test_round_trip_without_like(tmp_path):
    state = make_state()
    loaded = ck.load_checkpoint(ck.save_checkpoint(tmp_path, state, step=123))
    # optax's and our own classes are found by name; jax arrays come back as jax arrays
    assert_identical(loaded, state)
    numpy_only = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), as_numpy=True)
    assert isinstance(numpy_only["params"]["embed"]["embedding"], np.ndarray)
    np.testing.assert_array_equal(numpy_only["rng"], jax.random.key_data(state["rng"]))
    assert numpy_only["opt_state"]["adamw"][0].mu["head"]["bias"].dtype == np.float64


def test_resumed_optimizers_and_rngs_continue_identically(tmp_path):
    """Resuming from the checkpoint gives the same next update and the same random draws."""
    state = make_state()
    loaded = ck.load_checkpoint(ck.save_checkpoint(tmp_path, state, step=123), like=state)
    params = state["params"]
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    for name, update in OPTAX_UPDATE.items():
        u0, s0 = update(grads, state["opt_state"][name], params)
        u1, s1 = update(grads, loaded["opt_state"][name], params)
        assert_identical(u1, u0, f"{name} updates")
        assert_identical(s1, s0, f"{name} next state")
    ref = ref_optim.make_optimizer("adamw", 1e-3, clip_norm=1.0, accumulate_steps=2)
    np_grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, p.dtype), state["ref_params"])
    u0, _ = ref.update(np_grads, state["ref_opt_state"]["adamw_clip_accum"], state["ref_params"])
    u1, _ = ref.update(np_grads, loaded["ref_opt_state"]["adamw_clip_accum"], loaded["ref_params"])
    assert_identical(u1, u0, "reference updates")
    assert_identical(jax.random.normal(loaded["rng"], (4,)), jax.random.normal(state["rng"], (4,)))
    assert_identical(jax.random.normal(loaded["rng_rbg"], (4,)),
                     jax.random.normal(state["rng_rbg"], (4,)))
    assert_identical(loaded["np_rng"].random(5), state["np_rng"].random(5))
    assert_identical(loaded["np_rng_mt"].integers(0, 2**40, 5),
                     state["np_rng_mt"].integers(0, 2**40, 5))


# random nested states: containers of every kind around arrays of every stored dtype
_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    dtype = draw(st.sampled_from(_DTYPES))
    raw = np.frombuffer(draw(st.binary(min_size=64, max_size=64)) * 8, np.uint8)
    if dtype.startswith(("bfloat", "float8")):
        import ml_dtypes
        dt = np.dtype(getattr(ml_dtypes, dtype))
    else:
        dt = np.dtype(dtype)
    n = int(np.prod(shape))
    a = raw[: n * dt.itemsize].view(dt).reshape(shape) if dtype != "bool" else \
        (raw[:n] % 2).astype(bool).reshape(shape)
    return a.copy()  # arbitrary bit patterns: NaN payloads, -0.0, subnormals


_names = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=6)
leaves = st.one_of(arrays(), st.none(), st.booleans(), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=True), st.text(max_size=5),
                   arrays().map(lambda a: a[()] if a.ndim == 0 else a))
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
                           st.dictionaries(_names, kids, max_size=3)),
    max_leaves=12)


@given(st.dictionaries(_names.filter(lambda k: k != "step"), trees, min_size=1, max_size=4))  # "step" is the checkpoint's own
def test_random_states_round_trip_through_a_file(state):
    with tempfile.TemporaryDirectory() as d:
        path = ck.save_checkpoint(d, state, step=5)
        assert_identical(ck.load_checkpoint(path), state)
        assert_identical(ck.load_checkpoint(path, like=state), state)


@pytest.mark.hf
def test_files_are_standard_safetensors(tmp_path):
    """Our streaming writer's files read back with the safetensors library itself."""
    import safetensors.numpy
    import safetensors.torch
    import torch

    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(3, dtype=">i8"),
              "s": np.asarray(2.5), "e": np.zeros((0, 2), np.int8), "m": np.array([True, False])}
    path = ck.save_checkpoint(tmp_path, {"params": arrays}, step=1)
    loaded = safetensors.numpy.load_file(path)
    assert sorted(loaded) == sorted(f"params/{k}" for k in arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(loaded[f"params/{k}"].reshape(a.shape), a)
    bf16 = jnp.asarray([1.5, -2.0, 3.25], jnp.bfloat16)
    path = ck.save_checkpoint(tmp_path, {"bf16": bf16}, step=2)
    t = safetensors.torch.load_file(path)["bf16"]
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [1.5, -2.0, 3.25]


def test_as_saved_and_dataclass_configs(tmp_path):
    state = make_state()
    path = ck.save_checkpoint(tmp_path, state, step=123)
    like = make_state(seed=1)
    like["metadata"] = ck.AS_SAVED  # free-form: take whatever was saved
    like["data"] = ck.AS_SAVED
    loaded = ck.load_checkpoint(path, like=like)
    assert_identical(loaded["metadata"], state["metadata"])
    assert loaded["config"] == state["config"] and type(loaded["config"]) is type(state["config"])
    assert dataclasses.is_dataclass(loaded["config"])


# --------------------------------------------------------------------------------------------
# like mismatches, bad input


def test_like_mismatches_are_all_listed_by_name(tmp_path):
    state = make_state()
    path = ck.save_checkpoint(tmp_path, state, step=123)
    like = make_state()
    like["params"]["embed"]["embedding"] = jnp.zeros((12, 4), jnp.float32)  # shape
    like["params"]["head"]["bias"] = jnp.zeros(3, jnp.float32)  # dtype
    del like["data"]  # missing key
    like["extra"] = 1
    like["opt_state"]["adamw"] = optax.sgd(0.1).init(like["params"])  # other optimizer
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path, like=like)
    msg = str(e.value)
    assert str(path) in msg
    for needle in ("params/embed/embedding: float32[11, 4] in the checkpoint, float32[12, 4]",
                   "params/head/bias: float64[3] in the checkpoint, float32[3] expected",
                   "keys missing from the checkpoint: ['extra']",
                   "keys in the checkpoint but not expected: ['data']",
                   "opt_state/adamw"):
        assert needle in msg, msg


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="params/f"):
        ck.save_checkpoint(tmp_path, {"params": {"f": lambda x: x}}, step=1)
    with pytest.raises(TypeError, match="key 3"):
        ck.save_checkpoint(tmp_path, {"params": {3: np.zeros(2)}}, step=1)
    with pytest.raises(TypeError, match="complex"):
        ck.save_checkpoint(tmp_path, {"z": np.zeros(2, np.complex64)}, step=1)
    with pytest.raises(ValueError, match="state\\['step'\\]"):
        ck.save_checkpoint(tmp_path, {"step": 4}, step=5)
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, {"step": 5}, step=5, keep_last=0)
    with pytest.raises(ValueError, match="step must be"):
        ck.save_checkpoint(tmp_path, {}, step=-1)
    assert ck.list_checkpoints(tmp_path) == []
    assert ck.save_checkpoint(tmp_path, {"step": jnp.asarray(5)}, step=5).exists()  # 0-d jax ok


# --------------------------------------------------------------------------------------------
# pruning and discovery


@pytest.mark.filterwarnings("ignore:ignored. not a checkpoint:RuntimeWarning")
def test_keep_last_pruning_and_temporaries_ignored(tmp_path):
    for step in range(1, 7):
        ck.save_checkpoint(tmp_path, {"step": step, "w": np.full(3, step)}, step=step, keep_last=3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 5, 6]
    # leftovers of an interrupted save and unrelated files are not checkpoints
    ckdir = tmp_path / "checkpoints"
    (ckdir / ".step_00000099.safetensors.0123456789ab.tmp").write_bytes(b"partial")
    (ckdir / "step_00000098.safetensors.tmp").write_bytes(b"x")
    (ckdir / "notes.txt").write_text("hi")
    with pytest.warns(RuntimeWarning, match="ignored: not a checkpoint") as record:
        assert ck.latest_checkpoint(tmp_path) == ckdir / "step_00000006.safetensors"
    # foreign names are named; our own temporary is not
    message = str(record[0].message)
    assert "notes.txt" in message and "step_00000098.safetensors.tmp" in message
    assert ".step_00000099" not in message
    # saving an earlier step (a restart from step 4): kept, warned about, later ones untouched
    with pytest.warns(RuntimeWarning, match="later steps"):
        ck.save_checkpoint(tmp_path, {"step": 2}, step=2, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 5, 6]
    assert not (ckdir / ".step_00000099.safetensors.0123456789ab.tmp").exists()  # cleaned up
    for step in (7, 8):
        ck.save_checkpoint(tmp_path, {"step": step}, step=step, keep_last=None)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 5, 6, 7, 8]
    assert ck.latest_checkpoint(tmp_path / "nowhere") is None


def test_corrupt_latest_falls_back_with_a_warning(tmp_path):
    big = np.arange(1000, dtype=np.float32)
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, {"step": step, "w": big + step}, step=step)
    p1, p2, p3 = (p for _, p in ck.list_checkpoints(tmp_path))
    # truncated newest, bit-flipped middle one
    p3.write_bytes(p3.read_bytes()[:-100])
    raw = bytearray(p2.read_bytes())
    raw[-10] ^= 0xFF
    p2.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{p3}.*truncated"):
        ck.load_checkpoint(p3)
    with pytest.raises(CheckpointError, match=f"{p2}.*CRC-32"):
        ck.load_checkpoint(p2)
    assert ck.latest_checkpoint(tmp_path) == p3  # no reading without valid_only
    with pytest.warns(RuntimeWarning) as record:
        assert ck.latest_checkpoint(tmp_path, valid_only=True) == p1
    assert [str(p3) in str(w.message) for w in record] == [True, False]
    assert str(p2) in str(record[1].message)
    np.testing.assert_array_equal(ck.load_checkpoint(p1)["w"], big + 1)
    for p in (p1, p2, p3):
        p.write_bytes(b"")
    with pytest.warns(RuntimeWarning):
        assert ck.latest_checkpoint(tmp_path, valid_only=True) is None


def test_foreign_files_are_refused_by_name(tmp_path):
    from bigmodel_port.native import save_native

    model = tmp_path / "model.safetensors"
    save_native(model, {"w": np.zeros(2, np.float32)}, preset("gpt2-tiny"))
    with pytest.raises(CheckpointError, match="not a training checkpoint.*load_native"):
        ck.load_checkpoint(model)
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.safetensors")


def test_modules_do_not_import_jax_and_read_jax_checkpoints(tmp_path):
    """The NumPy trainer's view: no jax import, yet a JAX run's checkpoint verifies and loads."""
    path = ck.save_checkpoint(tmp_path, make_state(), step=123)
    code = textwrap.dedent(f"""
        import sys
        import bigmodel_train.checkpoint as ck, bigmodel_train.metrics
        ck.verify_checkpoint({str(path)!r})
        s = ck.load_checkpoint({str(path)!r}, as_numpy=True)
        assert type(s["ref_opt_state"]["sgd_momentum"][0]).__module__ == "reference_numpy.optim"
        assert s["opt_state"]["adamw"][0].count.shape == ()
        assert "jax" not in sys.modules and "optax" not in sys.modules, "jax was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env(), cwd=REPO_ROOT,
                   timeout=60)


# --------------------------------------------------------------------------------------------
# crash safety: SIGKILL in the middle of a save


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import bigmodel_train.checkpoint as ck

    run, mode, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def state(step):  # every value derives from the step, so a loaded file can be checked
        return {"step": step, "data": {"offset": 10 * step},
                "params": {"a": np.full(n, step, np.float32),
                           "b": np.full(n // 2, -step, np.float64)}}

    ck.save_checkpoint(run, state(1), 1, keep_last=2)
    if mode == "hold":  # stop for good after the first array of the next save reached the file
        import bigmodel_port.weights as weights  # the safetensors writer checkpoints stream through
        write = weights._write_array
        def write_then_hang(f, a):
            write(f, a)
            f.flush()
            (run / "midwrite").write_text("")
            time.sleep(600)
        weights._write_array = write_then_hang
    (run / "ready").write_text("")
    step = 2
    while True:
        ck.save_checkpoint(run, state(step), step, keep_last=2)
        step += 1
""")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait_for(done, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for the child to {what}")
        time.sleep(0.002)


def _kill_during_saves(run: Path, mode: str, after_step: int, delay: float, n: int) -> list[str]:
    """Start the saving child; once checkpoint ``after_step`` is complete (mode "loop") or the
    hanging save is under way (mode "hold"), wait ``delay`` s and SIGKILL it. Returns the
    temporaries it left."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), mode, str(n)],
                            env=_child_env(), cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        if mode == "hold":
            _wait_for((run / "midwrite").exists, proc, "start writing step 2")
        else:
            _wait_for(lambda: any(s >= after_step for s, _ in ck.list_checkpoints(run)), proc,
                      f"finish step {after_step}")
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def _check_resumable(run: Path, n: int) -> int:
    """latest_checkpoint gives a complete checkpoint whose every value matches its step."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the newest file must be valid: no fallback warning
        latest = ck.latest_checkpoint(run, valid_only=True)
    assert latest is not None and latest == ck.latest_checkpoint(run)
    assert not latest.name.startswith(".") and latest.suffix == ".safetensors"
    for _, p in ck.list_checkpoints(run):
        ck.verify_checkpoint(p)  # no half-written file under a final name, ever
    state = ck.load_checkpoint(latest)
    step = state["step"]
    assert step == ck.checkpoint_step(latest) >= 1
    assert state["data"] == {"offset": 10 * step}
    a, b = state["params"]["a"], state["params"]["b"]
    assert a.shape == (n,) and b.shape == (n // 2,)
    assert (a == step).all() and (b == -step).all()
    return step


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    n = 8 * 2**20  # 32 MiB of float32 + 32 MiB of float64 per checkpoint
    # 1) deterministic: killed after the first array of step 2 is on disk, before the rename
    run = tmp_path / "hold"
    leftovers = _kill_during_saves(run, "hold", 0, 0.0, n)
    assert leftovers and all(t.startswith(".step_00000002.safetensors.") for t in leftovers)
    assert [s for s, _ in ck.list_checkpoints(run)] == [1]
    assert _check_resumable(run, n) == 1
    # the next save clears the killed writer's temporary
    ck.save_checkpoint(run, {"step": 2}, step=2)
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())

    # 2) a loop of back-to-back saves (each ~0.1 s here: build the arrays, checksum, write,
    # fsync, rename, prune) killed at several offsets after a known step was completed
    for i, (after, delay) in enumerate(((1, 0.0), (2, 0.02), (3, 0.05), (3, 0.09), (4, 0.15))):
        run = tmp_path / f"loop{i}"
        _kill_during_saves(run, "loop", after, delay, n)
        assert _check_resumable(run, n) >= after


# --------------------------------------------------------------------------------------------
# classes come from an allow-list; nesting is bounded; odd directory entries are named


def _write_raw(path: Path, arrays: dict[str, np.ndarray], structure: Any, step: int = 1) -> Path:
    """A checkpoint file with the given (possibly crafted) structure, as save_checkpoint lays it
    out."""
    from bigmodel_port.weights import write_safetensors

    meta = {"format": ck.FORMAT_NAME, "format_version": str(ck.FORMAT_VERSION), "step": str(step),
            "structure": json.dumps(structure)}
    return write_safetensors(path, arrays, meta)


_CRAFTED = textwrap.dedent("""
    import collections, json, sys, tempfile
    from pathlib import Path
    import reference_numpy
    # a module under one of our own packages that records being imported: a prefix-based
    # allow-list would import it
    plugin = Path(tempfile.mkdtemp())
    (plugin / "recorder.py").write_text("import sys; sys.stdout.write('IMPORTED recorder\\\\n')\\n"
                                        "from typing import NamedTuple\\n"
                                        "class State(NamedTuple):\\n    a: int\\n")
    reference_numpy.__path__.append(str(plugin))
    import bigmodel_train.checkpoint as ck

    before = set(sys.modules)
    state = ck.load_checkpoint(sys.argv[1], as_numpy=sys.argv[2] == "numpy")
    imported = sorted(m for m in set(sys.modules) - before
                      if m.split(".")[0] not in ("reference_numpy", "bigmodel_train", "bigmodel_port"))
    named = ["reference_numpy.recorder", "bigmodel_jax.__main__", "bigmodel_apps.__main__",
             "bigmodel_jax", "bigmodel_apps", "jax", "optax"]
    assert not any(m in sys.modules for m in named), [m for m in named if m in sys.modules]
    out = {k: [type(v).__module__, type(v).__name__] for k, v in state.items()}
    out["imported"] = imported
    print(json.dumps(out))
""")


@pytest.mark.parametrize("as_numpy", [True, False])
def test_a_file_cannot_choose_what_gets_imported(tmp_path, as_numpy):
    nt = collections.namedtuple("State", ["a"])
    arrays, structure = ck.serialize_state({"n1": nt(1), "n2": nt(2), "n3": nt(3), "d1": nt(4),
                                            "d2": nt(5), "ok": ref_optim.TraceState(trace=6)})
    items = dict(zip(structure["keys"], structure["items"]))
    for key, module, cls in (("n1", "reference_numpy.recorder", "State"),
                             ("n2", "bigmodel_jax.__main__", "State"),
                             ("n3", "bigmodel_apps.__main__", "main")):
        items[key].update(module=module, **{"class": cls})
    for key, module, cls in (("d1", "os", "system"), ("d2", "bigmodel_jax.__main__", "Config")):
        structure["items"][structure["keys"].index(key)] = {
            "t": "dataclass", "module": module, "class": cls,
            "fields": {"a": items[key]["items"][0]}}
    path = _write_raw(tmp_path / "crafted.safetensors", arrays, structure)
    proc = subprocess.run([sys.executable, "-c", _CRAFTED, str(path),
                           "numpy" if as_numpy else "jax"], capture_output=True, text=True,
                          env=_child_env(), cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED" not in proc.stdout
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # stand-ins: a look-alike namedtuple of the saved name (collections.namedtuple, made in the
    # checkpoint module), a dict of a dataclass's fields
    standin = "bigmodel_train.checkpoint"
    assert got["n1"] == [standin, "State"] and got["n2"] == [standin, "State"]
    assert got["n3"] == [standin, "main"]
    assert got["d1"] == ["builtins", "dict"] and got["d2"] == ["builtins", "dict"]
    assert got["ok"] == ["reference_numpy.optim", "TraceState"]  # allow-listed
    if as_numpy:  # verifying / NumPy loading imports no jax at all
        assert not [m for m in got["imported"] if m.split(".")[0] in ("jax", "optax")]


class _UserState(typing.NamedTuple):
    count: int
    buf: np.ndarray


@dataclasses.dataclass(frozen=True)
class _UserConfig:
    width: int = 3


def test_register_checkpoint_class(tmp_path):
    state = {"user": _UserState(3, np.arange(2.0)), "cfg": _UserConfig(5)}
    path = ck.save_checkpoint(tmp_path, state, step=1)
    before = ck.load_checkpoint(path)
    assert type(before["user"]) is not _UserState and before["user"]._fields == ("count", "buf")
    assert before["cfg"] == {"width": 5}
    assert ck.register_checkpoint_class(_UserState) is _UserState
    ck.register_checkpoint_class(_UserConfig)
    ck.register_checkpoint_class(_UserConfig)  # again: a no-op
    after = ck.load_checkpoint(path)
    assert type(after["user"]) is _UserState and after["user"].count == 3
    assert after["cfg"] == _UserConfig(5)

    impostor = typing.NamedTuple("_UserState", [("count", int)])
    impostor.__module__, impostor.__qualname__ = _UserState.__module__, _UserState.__qualname__
    with pytest.raises(ValueError, match="already registered"):
        ck.register_checkpoint_class(impostor)
    for bad in (dict, _UserConfig(1), "os.system"):
        with pytest.raises(TypeError, match="NamedTuple or dataclass"):
            ck.register_checkpoint_class(bad)


def _nested(depth: int) -> Any:
    x: Any = np.zeros(1)
    for _ in range(depth):
        x = {"a": x}
    return x


def test_nesting_is_bounded_on_save_and_load(tmp_path):
    ck.load_checkpoint(ck.save_checkpoint(tmp_path, {"x": _nested(ck.MAX_DEPTH - 1)}, step=1))
    with pytest.raises(ValueError, match=f"deeper than {ck.MAX_DEPTH}"):
        ck.save_checkpoint(tmp_path, {"x": _nested(ck.MAX_DEPTH + 1)}, step=2)
    # crafted: 100 levels (json parses it; our decoder refuses), 100000 levels (json's guard)
    node: Any = {"t": "none"}
    for _ in range(100):
        node = {"t": "list", "items": [node]}
    deep = _write_raw(tmp_path / "deep.safetensors", {}, {"t": "dict", "keys": ["x"], "items": [node]})
    with pytest.raises(CheckpointError, match=re.escape(str(deep)) + ".*nests deeper than 64"):
        ck.load_checkpoint(deep)
    with pytest.raises(CheckpointError, match="nests deeper"):
        ck.verify_checkpoint(deep)
    with pytest.raises(CheckpointError, match="nests deeper"):
        ck.load_checkpoint(deep, like={"x": ck.AS_SAVED})
    from bigmodel_port.weights import write_safetensors

    deeper = tmp_path / "deeper.safetensors"
    write_safetensors(deeper, {}, {"format": ck.FORMAT_NAME, "format_version": "1", "step": "1",
                                   "structure": '{"t": "dict", "keys": ["x"], "items": ['
                                                + "[" * 100_000 + "]" * 100_000 + "]}"})
    with pytest.raises(CheckpointError, match=re.escape(str(deeper)) + ".*nests too deeply"):
        ck.load_checkpoint(deeper)


@pytest.mark.parametrize("what,value", [
    ("float beyond range", {"t": "float", "v": 10**400}),
    ("namedtuple field not an identifier", {"t": "namedtuple", "module": "m", "class": "C",
                                            "fields": ["not valid"], "items": [{"t": "none"}]}),
    ("namedtuple class a keyword", {"t": "namedtuple", "module": "m", "class": "class",
                                    "fields": ["a", "a"], "items": [{"t": "none"}] * 2}),
    ("duplicate dict keys", {"t": "dict", "keys": ["a", "a"], "items": [{"t": "none"}] * 2}),
    ("generator state overflow", {"t": "np_generator", "state": {
        "t": "dict", "keys": ["bit_generator", "state", "has_uint32", "uinteger"],
        "items": [{"t": "str", "v": "PCG64"},
                  {"t": "dict", "keys": ["state", "inc"],
                   "items": [{"t": "int", "v": 10**400}, {"t": "int", "v": 1}]},
                  {"t": "int", "v": 0}, {"t": "int", "v": 0}]}}),
])
def test_malformed_structures_are_checkpoint_errors(tmp_path, what, value):
    path = _write_raw(tmp_path / "bad.safetensors", {}, {"t": "dict", "keys": ["x"],
                                                         "items": [value]})
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        ck.load_checkpoint(path)


def test_symlinks_and_foreign_entries_in_the_checkpoint_directory(tmp_path):
    real = ck.save_checkpoint(tmp_path / "elsewhere", {"w": np.arange(3)}, step=7)
    ckdir = tmp_path / "run" / "checkpoints"
    ck.save_checkpoint(tmp_path / "run", {"w": np.arange(2)}, step=1)
    link = ckdir / "step_00000007.safetensors"
    link.symlink_to(real)
    # followed: it counts, and loads
    assert ck.list_checkpoints(tmp_path / "run") == [(1, ckdir / "step_00000001.safetensors"),
                                                     (7, link)]
    assert ck.latest_checkpoint(tmp_path / "run", valid_only=True) == link
    np.testing.assert_array_equal(ck.load_checkpoint(link)["w"], np.arange(3))
    # pruning removes the link, never its target
    ck.save_checkpoint(tmp_path / "run", {"w": np.arange(2)}, step=9, keep_last=1)
    assert not link.is_symlink() and real.is_file()

    # dangling, or to a directory: refused by name
    dangling = ckdir / "step_00000010.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(dangling)) + ".*dangling"):
        ck.list_checkpoints(tmp_path / "run")
    with pytest.raises(CheckpointError, match=re.escape(str(dangling))):
        ck.latest_checkpoint(tmp_path / "run")
    # a save still succeeds (it has written its file before pruning), warning about the link
    with pytest.warns(RuntimeWarning, match=re.escape(str(dangling)) + ".*not pruned"):
        ck.save_checkpoint(tmp_path / "run", {"w": np.arange(2)}, step=11, keep_last=1)
    assert dangling.is_symlink()
    dangling.unlink()
    to_dir = ckdir / "step_00000012.safetensors"
    to_dir.symlink_to(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(to_dir)) + ".*a directory"):
        ck.list_checkpoints(tmp_path / "run")
    to_dir.unlink()
    (ckdir / "step_00000013.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="step_00000013.safetensors is a directory"):
        ck.list_checkpoints(tmp_path / "run")
    (ckdir / "step_00000013.safetensors").rmdir()

    # anything else: one warning naming it; our own temporaries: silence
    (ckdir / ".step_00000099.safetensors.0123456789ab.tmp").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s for s, _ in ck.list_checkpoints(tmp_path / "run")] == [11]
    (ckdir / "README").write_text("notes")
    (ckdir / "step_5.safetensors").write_bytes(b"")  # too few digits: not one of ours
    with pytest.warns(RuntimeWarning, match="ignored: not a checkpoint") as record:
        assert [s for s, _ in ck.list_checkpoints(tmp_path / "run")] == [11]
    assert len(record) == 1
    assert "README" in str(record[0].message) and "step_5.safetensors" in str(record[0].message)

    # a checkpoints "directory" that is a file
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "checkpoints").write_text("")
    with pytest.raises(CheckpointError, match="not a directory"):
        ck.list_checkpoints(tmp_path / "run2")


def test_an_array_moved_to_another_key_is_refused(tmp_path):
    """Arrays are named by their path; a structure whose keys were edited (one flipped byte in
    the header) would otherwise load the array at another place without any error."""
    arrays, structure = ck.serialize_state({"params": {"kernel": np.ones(3), "bias": np.zeros(2)}})
    params = structure["items"][0]
    params["keys"] = ["kernel", "biat"]
    path = _write_raw(tmp_path / "moved.safetensors", arrays, structure)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*'params/bias' is stored "
                                              "for 'params/biat'"):
        ck.load_checkpoint(path)
