"""Fuzzing the checkpoint readers: random byte mutations of real files never crash or hang them.

Three kinds of file, each written by our own writer and then damaged at random:

* a plain safetensors file (``bigmodel_port.weights.write_safetensors``), read back with
  ``read_safetensors``;
* bigmodel's native model files (``save_native`` ``.safetensors`` and ``save_npz`` ``.npz``),
  read back with ``load_native`` / ``load_npz``;
* a training checkpoint (``bigmodel_train.checkpoint.save_checkpoint``) holding a parameter tree,
  a NamedTuple optimizer state, ints and a ``np.random.Generator``, read back with
  ``load_checkpoint`` (with and without a ``like`` template) and ``verify_checkpoint``.

Mutations: bytes flipped or replaced, the file truncated, bytes inserted, a huge length
spliced in (at the safetensors header length field or anywhere). Positions are drawn from the
header more often than its share of the file, since that is where parsing happens.

The property: every read either raises ``CheckpointError`` or returns arrays identical, bit for
bit, to the original ones (native and training files carry CRC-32s, and ``.npz`` members zip's,
so damaged data cannot load). A plain safetensors file has no checksum: the format cannot tell a
flipped data bit (or ``F32`` turned into ``I32``) from real content, so there the property is
"CheckpointError, or exactly what the safetensors library itself reads from the same bytes". A
per-example deadline catches hangs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmodel_port.errors import CheckpointError
from bigmodel_port.native import load_native, load_npz, save_native, save_npz
from bigmodel_port.weights import read_safetensors, read_safetensors_metadata, write_safetensors
from bigmodel_train import checkpoint as ck
from reference_numpy import optim as ref_optim
from reference_numpy.configs import param_shapes, preset
from reference_numpy.models.common import init_params

# Each example reads a file of a few KB to ~20 KB; 2 s is far beyond any honest read, so the
# deadline catches a hang. 60 examples per test (~180 in all, a few seconds); fuzz harder with
# e.g. BIGMODEL_FUZZ_EXAMPLES=5000 BIGMODEL_HYPOTHESIS_PROFILE=thorough (not derandomized).
FUZZ = settings(max_examples=int(os.environ.get("BIGMODEL_FUZZ_EXAMPLES", "60")), deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# mutations


def _header_end(data: bytes) -> int:
    """End of the safetensors header (or of the whole file if the length field is nonsense)."""
    n = int.from_bytes(data[:8], "little")
    return min(len(data), 8 + n)


@st.composite
def mutations(draw: Any, data: bytes) -> tuple[str, bytes]:
    """``(description, mutated bytes)`` of ``data``."""
    size = len(data)
    head = _header_end(data)
    # half the positions in the header, where the parsing is
    pos = st.one_of(st.integers(0, max(head - 1, 0)), st.integers(0, size - 1))
    kind = draw(st.sampled_from(["flip", "replace", "truncate", "insert", "huge_length"]))
    out = bytearray(data)
    if kind == "flip":
        flips = draw(st.lists(st.tuples(pos, st.integers(1, 255)), min_size=1, max_size=4))
        for p, x in flips:
            out[p] ^= x
        return f"flip {flips}", bytes(out)
    if kind == "replace":
        p = draw(pos)
        new = draw(st.binary(min_size=1, max_size=16))
        out[p:p + len(new)] = new
        return f"replace at {p} with {new!r}", bytes(out[:size])
    if kind == "truncate":
        n = draw(st.integers(0, size - 1))
        return f"truncate to {n}", data[:n]
    if kind == "insert":
        p = draw(pos)
        new = draw(st.binary(min_size=1, max_size=16))
        return f"insert {new!r} at {p}", data[:p] + new + data[p:]
    p = draw(st.one_of(st.just(0), st.integers(0, size - 8)))
    value = draw(st.one_of(st.sampled_from([2**64 - 1, 2**63, 2**32, 10**8 + 1, size, size - 7]),
                           st.integers(0, 2**64 - 1)))
    out[p:p + 8] = value.to_bytes(8, "little")
    return f"length {value} at {p}", bytes(out)


# --------------------------------------------------------------------------------------------
# comparing what was read


def _arrays(x: Any, path: str = "") -> dict[str, np.ndarray]:
    """Every array (and NumPy scalar) in a nested state, by path."""
    out: dict[str, np.ndarray] = {}
    if isinstance(x, (np.ndarray, np.generic)):
        out[path] = np.asarray(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            out.update(_arrays(v, f"{path}/{k}"))
    elif isinstance(x, tuple) and hasattr(type(x), "_fields"):
        for k, v in zip(type(x)._fields, x):
            out.update(_arrays(v, f"{path}/{k}"))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_arrays(v, f"{path}/{i}"))
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            out.update(_arrays(getattr(x, f.name), f"{path}/{f.name}"))
    elif isinstance(x, np.random.Generator):
        out.update(_arrays(x.bit_generator.state, f"{path}/bit_generator"))
    return out


def assert_identical_arrays(got: Any, want: Any, how: str) -> None:
    """The same array paths, dtypes, shapes and bytes (NaNs included)."""
    a, b = _arrays(got), _arrays(want)
    assert sorted(a) == sorted(b), f"{how}: array paths {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), f"{how}: {k}"
        assert a[k].tobytes() == b[k].tobytes(), f"{how}: {k} differs"


def _read_or_refuse(read: Any, path: Path, how: str) -> Any:
    """``read(path)``, or None if it raised CheckpointError; any other exception fails."""
    try:
        return read(path)
    except CheckpointError as e:
        assert str(path) in str(e), f"{how}: the error does not name the file: {e}"
        return None


# --------------------------------------------------------------------------------------------
# the three kinds of file


@functools.cache
def _plain_file() -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    tensors = {"embed.weight": rng.standard_normal((6, 4)).astype(np.float32),
               "layer.0.w": rng.standard_normal((3, 2)), "ids": np.arange(5, dtype=np.int64),
               "mask": rng.random(4) > 0.5, "half": rng.standard_normal(3).astype(np.float16),
               "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    return _bytes_of(lambda p: write_safetensors(p, tensors, {"format": "pt"})), tensors


def _tiny_config() -> Any:
    return dataclasses.replace(preset("gpt2-tiny"), n_layers=1, vocab_size=13, max_len=8)


@functools.cache
def _native_files() -> tuple[bytes, bytes, dict[str, Any]]:
    config = _tiny_config()
    tree = init_params(param_shapes(config), config.n_layers, np.random.default_rng(0),
                       np.dtype("float32"))
    tree["extra"] = {"step": np.array(7, np.int64)}
    native = _bytes_of(lambda p: save_native(p, tree, config, extra_metadata={"head": "lm"}))
    npz = _bytes_of(lambda p: save_npz(p, tree, config))
    return native, npz, tree


@functools.cache
def _training_file() -> tuple[bytes, dict[str, Any]]:
    config = _tiny_config()
    rng = np.random.default_rng(1)
    params = {"embed": {"embedding": rng.standard_normal((5, 4)).astype(np.float32)},
              "head": {"kernel": rng.standard_normal((4, 3)), "bias": np.zeros(3, np.float32)}}
    opt = ref_optim.make_optimizer("adamw", 1e-3, clip_norm=1.0)
    opt_state = opt.init(params)
    grads = {"embed": {"embedding": np.ones((5, 4), np.float32)},
             "head": {"kernel": np.full((4, 3), 0.5), "bias": np.ones(3, np.float32)}}
    _, opt_state = opt.update(grads, opt_state, params)
    np_rng = np.random.default_rng(2)
    np_rng.standard_normal(3)
    state = {"step": 5, "params": params, "opt_state": opt_state, "np_rng": np_rng,
             "data": {"epoch": 1, "offset": 2**40}, "loss": np.float32(1.25), "config": config}
    data = _bytes_of(lambda p: ck.save_checkpoint(p, state, step=5))
    return data, state


def _bytes_of(write: Any) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "f")
        return Path(path).read_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------------
# the properties


def test_unmutated_files_read_back_identically(workdir):
    """The oracle's baseline: each original file loads to exactly what was written."""
    data, tensors = _plain_file()
    (workdir / "plain.safetensors").write_bytes(data)
    assert_identical_arrays(read_safetensors(workdir / "plain.safetensors"), tensors, "plain")
    native, npz, tree = _native_files()
    (workdir / "m.safetensors").write_bytes(native)
    (workdir / "m.npz").write_bytes(npz)
    assert_identical_arrays(load_native(workdir / "m.safetensors")[0], tree, "native")
    assert_identical_arrays(load_npz(workdir / "m.npz")[0], tree, "npz")
    ckpt, state = _training_file()
    (workdir / "c.safetensors").write_bytes(ckpt)
    assert_identical_arrays(ck.load_checkpoint(workdir / "c.safetensors", as_numpy=True), state,
                            "checkpoint")


@FUZZ
@given(data=st.data())
def test_fuzzed_plain_safetensors(workdir, data):
    import safetensors.numpy

    original, _ = _plain_file()
    how, mutated = data.draw(mutations(original), label="mutation")
    path = workdir / "plain.safetensors"
    path.write_bytes(mutated)
    _read_or_refuse(read_safetensors_metadata, path, how)
    got = _read_or_refuse(read_safetensors, path, how)
    if got is not None:  # no checksum in this format: the library is the oracle
        try:
            want = safetensors.numpy.load(mutated)
        except Exception as e:  # noqa: BLE001 -- any library refusal
            pytest.fail(f"{how}: we read a file the safetensors library refuses ({e})")
        assert_identical_arrays(got, want, how)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["native", "npz"]))
def test_fuzzed_native_files(workdir, data, kind):
    native, npz, tree = _native_files()
    original = native if kind == "native" else npz
    how, mutated = data.draw(mutations(original), label="mutation")
    path = workdir / ("m.safetensors" if kind == "native" else "m.npz")
    path.write_bytes(mutated)
    got = _read_or_refuse(load_native if kind == "native" else load_npz, path, how)
    if got is not None:
        assert_identical_arrays(got[0], tree, how)


@FUZZ
@given(data=st.data())
def test_fuzzed_training_checkpoints(workdir, data):
    original, state = _training_file()
    how, mutated = data.draw(mutations(original), label="mutation")
    path = workdir / "step_00000005.safetensors"
    path.write_bytes(mutated)
    _read_or_refuse(ck.verify_checkpoint, path, how)
    _read_or_refuse(ck.checkpoint_step, path, how)
    got = _read_or_refuse(lambda p: ck.load_checkpoint(p, as_numpy=True), path, how)
    if got is not None:
        assert_identical_arrays(got, state, how)
    got = _read_or_refuse(lambda p: ck.load_checkpoint(p, like=state), path, how)
    if got is not None:
        assert_identical_arrays(got, state, how)
