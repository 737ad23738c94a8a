"""Checkpoint file IO of the porting layer: atomic writes, HF state dicts (safetensors, sharded,
PyTorch pickles) and bigmodel's native format. No model knowledge: trees come from
``param_shapes`` only so their paths look like real ones."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest

from bigmodel_port.atomic import atomic_open, atomic_write, atomic_write_bytes, atomic_write_text
from bigmodel_port.errors import CheckpointError, ModelNotFoundError
from bigmodel_port.native import (
    CONFIG_CLASSES,
    FORMAT_VERSION,
    flatten_tree,
    load_native,
    load_npz,
    save_native,
    save_npz,
    unflatten_tree,
)
from bigmodel_port.weights import (
    find_shared_tensors,
    load_state_dict,
    parse_size,
    read_safetensors,
    read_safetensors_metadata,
    save_state_dict,
    write_safetensors,
)
from reference_numpy.configs import BertConfig, Config, GPTConfig, ViTConfig, param_shapes, preset

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.hf


def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((7, 4)).astype(np.float32),
        "layer.0.w": rng.standard_normal((4, 5)),  # float64
        "layer.0.b": rng.standard_normal(5).astype(np.float16),
        "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
        "mask": rng.random(6) > 0.5,
        "scalar": np.array(2.5, dtype=np.float32),  # 0-d must stay 0-d
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------------------------------
# parse_size


def test_parse_size_hf_semantics():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size("10KB") == 10_000
    assert parse_size("10kb") == 10_000 // 8  # lowercase final b: bits, as in transformers
    assert parse_size("8Gb") == 10**9
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("123") == 123 and parse_size(4096) == 4096
    for bad in ("five GB", "5 XB", "", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


# --------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old contents \x00\x01")
    before = target.read_bytes()

    def writer(f):
        f.write(b"new partial data" * 1000)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, writer)
    assert target.read_bytes() == before
    assert _files(tmp_path) == ["weights.bin"]

    with pytest.raises(KeyboardInterrupt):  # also for interrupts, not only Exceptions
        with atomic_open(target, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert _files(tmp_path) == ["weights.bin"]

    # a failed first write creates nothing at all
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.bin", lambda f: (f.write(b"x"), int("not a number")))
    assert _files(tmp_path) == ["weights.bin"]


def test_atomic_write_success_and_permissions(tmp_path):
    target = tmp_path / "a.txt"
    assert atomic_write_text(target, "héllo\nworld\n") == target
    assert target.read_bytes() == "héllo\nworld\n".encode()
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600
    target.chmod(0o640)
    atomic_write_bytes(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert (target.stat().st_mode & 0o777) == 0o640  # replaced file's mode is kept
    with atomic_open(target, "w") as f:
        f.write("streamed")
    assert target.read_text() == "streamed"
    assert _files(tmp_path) == ["a.txt"]


# --------------------------------------------------------------------------------------------
# safetensors state dicts


def test_save_load_round_trip_exact(tmp_path):
    sd = _state_dict()
    sd["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    sd["big_endian"] = np.arange(3, dtype=">f8")
    written = save_state_dict(tmp_path, sd)
    assert written == [tmp_path / "model.safetensors"]
    assert _files(tmp_path) == ["model.safetensors"]
    assert read_safetensors_metadata(tmp_path / "model.safetensors") == {"format": "pt"}
    loaded = load_state_dict(tmp_path)
    expected = {**sd, "transposed": np.ascontiguousarray(sd["transposed"]),
                "big_endian": sd["big_endian"].astype("<f8")}
    _assert_same(loaded, expected)
    assert loaded["scalar"].shape == ()
    # and torch's reader agrees (shapes included: 0-d stays 0-d)
    t = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert t["scalar"].shape == () and t["transposed"].tolist() == expected["transposed"].tolist()


def test_bf16_from_torch_safetensors_is_exact_float32(tmp_path):
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, float("inf"), -float("inf"),
                            float("nan")], dtype=torch.float32)
    bf = torch.cat([torch.randn(64), special]).to(torch.bfloat16).reshape(73, 1)
    f8 = torch.randn(10).to(torch.float8_e4m3fn)
    safetensors_torch.save_file({"w": bf, "f8": f8, "i": torch.arange(3)},
                                tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_state_dict(tmp_path)
    assert loaded["w"].dtype == np.float32 and loaded["w"].shape == (73, 1)
    expected = bf.to(torch.float32).numpy()
    np.testing.assert_array_equal(loaded["w"], expected)
    # bit-exact, including -0.0, infinities and the NaN payload
    np.testing.assert_array_equal(loaded["w"].view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(loaded["f8"], f8.to(torch.float32).numpy())
    assert loaded["i"].dtype == np.int64


def test_jax_leaves_including_bf16_are_saved(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.linspace(-3, 3, 12, dtype=jnp.bfloat16).reshape(3, 4)
    save_state_dict(tmp_path, {"x": x, "y": jnp.arange(4)})
    t = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert t["x"].dtype == torch.bfloat16  # stored as bf16, half the bytes
    loaded = load_state_dict(tmp_path)
    np.testing.assert_array_equal(loaded["x"], np.asarray(x).astype(np.float32))
    np.testing.assert_array_equal(loaded["y"], np.arange(4))


def _every_dtype(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One array per dtype safetensors holds, distinct random values each (so a tensor read at
    another's offsets does not pass), plus 0-d and empty arrays; bf16 with NaN, inf and -0."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtypes = ["f8", "f4", "f2", "i8", "u8", "i4", "u4", "i2", "u2", "i1", "u1"]
    out = {f"{dt}_{i}": (rng.standard_normal((3, 5)) * 100).astype(dt) for i, dt in enumerate(dtypes)}
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3e38])
    return {
        **out,
        "bool": rng.random(7) > 0.5,
        "bf16": np.concatenate([rng.standard_normal(9), special]).astype(ml_dtypes.bfloat16),
        "scalar_f4": np.array(rng.standard_normal(), np.float32),
        "scalar_i8": np.array(-7, np.int64),
        "empty_f4": np.zeros((0, 3), np.float32),
        "empty_u1": np.zeros((2, 0), np.uint8),
    }


def _assert_same_bits(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for k, a in expected.items():
        assert (got[k].dtype, got[k].shape) == (a.dtype, a.shape), k
        assert got[k].tobytes() == a.tobytes(), k  # bit for bit: NaN payloads and -0.0 too


def test_our_files_load_with_the_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    arrays = _every_dtype(np.random.default_rng(0))
    path = write_safetensors(tmp_path / "ours.safetensors", arrays, {"format": "pt", "k": "v"})
    _assert_same_bits(safetensors_numpy.load_file(path), arrays)
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_library_files_load_with_ours(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    ml_dtypes = pytest.importorskip("ml_dtypes")

    arrays = _every_dtype(np.random.default_rng(1))
    arrays["f8_e4m3"] = np.array([0.5, -1.75, 448.0, np.nan], ml_dtypes.float8_e4m3fn)
    arrays["f8_e5m2"] = np.array([0.5, -1.75, np.inf, np.nan], ml_dtypes.float8_e5m2)
    path = tmp_path / "library.safetensors"
    safetensors_numpy.save_file(arrays, path, metadata={"k": "v"})
    assert read_safetensors_metadata(path) == {"k": "v"}
    _assert_same_bits(read_safetensors(path, widen=False), arrays)
    # widened: bf16 / fp8 become float32 of exactly the same values, the rest is unchanged
    narrow = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    widened = {k: a.astype(np.float32) if a.dtype.name in narrow else a for k, a in arrays.items()}
    _assert_same_bits(read_safetensors(path), widened)


def test_sharding_matches_hf_layout(tmp_path):
    hub_base = pytest.importorskip("huggingface_hub.serialization._base")
    rng = np.random.default_rng(1)
    sd = {f"layers.{i}.weight": rng.standard_normal(n).astype(np.float32)
          for i, n in enumerate([10, 20, 5, 30, 8, 2])}
    sd["huge"] = np.zeros(100, np.float32)  # larger than a shard: own shard, as in HF
    sd["tail"] = np.ones(3, np.int64)
    written = save_state_dict(tmp_path, sd, max_shard_size=100)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    total = sum(a.nbytes for a in sd.values())
    assert index["metadata"]["total_size"] == total
    wm = index["weight_map"]
    assert set(wm) == set(sd)
    shard_names = sorted(set(wm.values()))
    n = len(shard_names)
    assert n > 2
    assert shard_names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert _files(tmp_path) == sorted([*shard_names, "model.safetensors.index.json"])
    assert sorted(p.name for p in written) == _files(tmp_path)

    # the same split as huggingface_hub's (what save_pretrained uses)
    split = hub_base.split_state_dict_into_shards_factory(
        sd, get_storage_size=lambda a: a.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=100)
    assert split.tensor_to_filename == wm
    assert split.metadata["total_size"] == total

    # transformers-style: each shard is a valid safetensors file for torch, with format pt
    seen = {}
    for shard in shard_names:
        seen.update(safetensors_torch.load_file(tmp_path / shard))
        assert read_safetensors_metadata(tmp_path / shard) == {"format": "pt"}
        assert all(wm[k] == shard for k in safetensors_torch.load_file(tmp_path / shard))
    assert set(seen) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(seen[k].numpy(), v)
    _assert_same(load_state_dict(tmp_path), sd)


def test_stale_files_are_replaced(tmp_path):
    sd = {f"w{i}": np.full(10, i, np.float32) for i in range(6)}  # 40 bytes each
    save_state_dict(tmp_path, sd, max_shard_size=40)
    assert len([f for f in _files(tmp_path) if f.endswith("-of-00006.safetensors")]) == 6
    (tmp_path / "config.json").write_text("{}")  # not ours: must survive

    save_state_dict(tmp_path, sd, max_shard_size=80)  # 6 shards -> 3 shards
    assert _files(tmp_path) == sorted(["config.json", "model.safetensors.index.json",
                                       *(f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3))])
    _assert_same(load_state_dict(tmp_path), sd)

    save_state_dict(tmp_path, sd)  # sharded -> single file
    assert _files(tmp_path) == ["config.json", "model.safetensors"]

    sd2 = {k: v + 1 for k, v in sd.items()}
    save_state_dict(tmp_path, sd2, max_shard_size=80)  # single -> sharded: old single must go,
    assert "model.safetensors" not in _files(tmp_path)  # or it would win over the new index
    _assert_same(load_state_dict(tmp_path), sd2)


def test_shared_tensors_are_found():
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    sd = {"wte.weight": emb, "lm_head.weight": emb, "other": emb.copy(), "view": emb[:, :1]}
    assert find_shared_tensors(sd) == [["wte.weight", "lm_head.weight"]]


def test_single_file_wins_over_index(tmp_path):
    single = {"a": np.ones(3, np.float32)}
    sharded = {"a": np.zeros(3, np.float32), "b": np.zeros(30, np.float32)}
    save_state_dict(tmp_path / "s", sharded, max_shard_size=20)
    for p in (tmp_path / "s").iterdir():
        p.rename(tmp_path / p.name)
    write_safetensors(tmp_path / "model.safetensors", single)
    _assert_same(load_state_dict(tmp_path), single)


# --------------------------------------------------------------------------------------------
# HF interop


def test_reads_hf_safetensors_and_torch_bin(tmp_path):
    tensors = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(3).double(),
               "ids": torch.arange(5), "bf": torch.randn(2, 2).to(torch.bfloat16)}
    st_dir, bin_dir = tmp_path / "st", tmp_path / "bin"
    st_dir.mkdir()
    bin_dir.mkdir()
    safetensors_torch.save_file(tensors, st_dir / "model.safetensors", metadata={"format": "pt"})
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}
    _assert_same(load_state_dict(st_dir), expected)
    _assert_same(load_state_dict(bin_dir), expected)


def test_reads_sharded_torch_bin(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"x": torch.ones(2)},
              "pytorch_model-00002-of-00002.bin": {"y": torch.arange(3)}}
    for name, sd in shards.items():
        torch.save(sd, tmp_path / name)
    weight_map = {k: name for name, sd in shards.items() for k in sd}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_state_dict(tmp_path)
    np.testing.assert_array_equal(loaded["x"], np.ones(2, np.float32))
    np.testing.assert_array_equal(loaded["y"], np.arange(3))


def test_transformers_save_pretrained_and_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    # HF writes (sharded) -> we read
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_state_dict(tmp_path / "hf")
    for k, v in ours.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    assert "transformer.wte.weight" in ours

    # we write (sharded, tied duplicate dropped as save_pretrained does) -> HF reads
    sd = dict(ref)
    for group in find_shared_tensors(sd):
        for name in group[1:]:
            sd.pop(name)
    out = tmp_path / "ours"
    save_state_dict(out, sd, max_shard_size="20KB")
    cfg.save_pretrained(out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(sd)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    for k, v in reloaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref[k], err_msg=k)


# --------------------------------------------------------------------------------------------
# broken directories and files


def test_missing_shard_and_wrong_index_name_the_shard(tmp_path):
    sd = {f"w{i}": np.full(10, i, np.float32) for i in range(4)}
    save_state_dict(tmp_path, sd, max_shard_size=80)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_state_dict(tmp_path)

    save_state_dict(tmp_path, sd, max_shard_size=80)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["w0"] = "model-00002-of-00002.safetensors"  # w0 lives in shard 1
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-0000[12]-of-00002\.safetensors") as e:
        load_state_dict(tmp_path)
    assert "w0" in str(e.value) or "ghost" in str(e.value)

    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json"):
        load_state_dict(tmp_path)
    index_path.write_text(json.dumps({"weight_map": {"w0": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        load_state_dict(tmp_path)


def test_no_weights_lists_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tf_model.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"config\.json.*tf_model\.h5"):
        load_state_dict(tmp_path)
    with pytest.raises(ModelNotFoundError):
        load_state_dict(tmp_path / "nope")


def _good_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": np.arange(100, dtype=np.float32), "b": np.ones(3)})
    return path, path.read_bytes()


def test_truncated_safetensors(tmp_path):
    path, data = _good_file(tmp_path)
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*beyond"):
        load_state_dict(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*shorter"):
        read_safetensors(path)


def test_garbage_header(tmp_path):
    path, data = _good_file(tmp_path)
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"\xff{garbage" + b" " * (n - 9) + data[8 + n:])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not valid JSON"):
        load_state_dict(tmp_path)
    path.write_bytes(data[:8] + b"[1, 2]".ljust(n) + data[8 + n:])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_safetensors(path)


def test_header_length_beyond_file(tmp_path):
    path, data = _good_file(tmp_path)
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*header length.*beyond"):
        load_state_dict(tmp_path)


def test_offsets_inconsistent_with_shape(tmp_path):
    path, data = _good_file(tmp_path)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [101]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*'a'"):
        read_safetensors(path)


def _with_header(data: bytes, header: bytes, length: int | None = None) -> bytes:
    """``data`` (a safetensors file) with its JSON header replaced by ``header`` (and its length
    field by ``length``, default the new header's length)."""
    n = int.from_bytes(data[:8], "little")
    length = len(header) if length is None else length
    return length.to_bytes(8, "little", signed=length < 0) + header + data[8 + n:]


def _edit_header(data: bytes, edit) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    return _with_header(data, json.dumps(header).encode())


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _malformed(what: str, data: bytes) -> bytes:
    """The good file's bytes ``data`` broken as ``what`` says."""
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    a_end = json.loads(header)["a"]["data_offsets"][1]
    deep = b"[" * 100_000 + b"]" * 100_000
    return {
        "huge header length": lambda: (2**63 + 5).to_bytes(8, "little") + data[8:],
        "negative header length": lambda: _with_header(data, header, -8),
        "header length past EOF": lambda: _with_header(data, b"{}", len(data)),
        "header a JSON list": lambda: _with_header(data, b"[1, 2, 3]"),
        "header a JSON string": lambda: _with_header(data, b'"a"'),
        "100000-deep JSON": lambda: _with_header(data, deep),
        "100000-deep metadata": lambda: _with_header(data, b'{"__metadata__": ' + deep + b"}"),
        "a 5000-digit integer": lambda: _with_header(
            data, header.replace(b"[0,", b"[" + b"1" * 5000 + b",", 1)),
        # b (float64, 24 bytes) comes first, a (400 bytes) after it: start a inside b
        "offsets overlapping": lambda: _edit_header(
            data, _set(["a", "data_offsets"], [a_end - 408, a_end - 8])),
        "offsets out of bounds": lambda: _edit_header(
            data, _set(["b", "data_offsets"], [a_end, a_end + 10**6])),
        "offsets reversed": lambda: _edit_header(
            data, _set(["b", "data_offsets"], [a_end + 24, a_end])),
        "unknown dtype": lambda: _edit_header(data, _set(["b", "dtype"], "C64")),
        "negative shape": lambda: _edit_header(data, _set(["b", "shape"], [-3])),
        "metadata value not a string": lambda: _edit_header(data, _set(["__metadata__", "k"], 5)),
        "metadata a list": lambda: _edit_header(data, _set(["__metadata__"], ["k"])),
    }[what]()


# (how the header is broken, what the error message must say after the file's name)
_MALFORMED = [
    ("huge header length", "header length"), ("negative header length", "header length"),
    ("header length past EOF", "beyond the file size"), ("header a JSON list", "not an object"),
    ("header a JSON string", "not an object"), ("100000-deep JSON", "nests too deeply"),
    ("100000-deep metadata", "nests too deeply"), ("a 5000-digit integer", "not valid JSON"),
    ("offsets overlapping", "overlap"), ("offsets out of bounds", "beyond"),
    ("offsets reversed", "data_offsets"), ("unknown dtype", "dtype 'C64'"),
    ("negative shape", "shape"), ("metadata value not a string", "__metadata__"),
    ("metadata a list", "__metadata__"),
]


@pytest.mark.parametrize("what,match", _MALFORMED, ids=[w for w, _ in _MALFORMED])
def test_malformed_headers_raise_checkpoint_error_naming_the_file(tmp_path, what, match):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": np.arange(100, dtype=np.float32), "b": np.ones(3)}, {"k": "v"})
    path.write_bytes(_malformed(what, path.read_bytes()))
    for read in (read_safetensors, read_safetensors_metadata, lambda p: load_state_dict(p.parent),
                 load_native):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + match):
            read(path)


# --------------------------------------------------------------------------------------------
# PyTorch pickles


class _Pwn:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "zip", tmp_path / "legacy"
    zipped.mkdir()
    legacy.mkdir()
    torch.save({"w": torch.ones(2), "x": _Pwn(marker)}, zipped / "pytorch_model.bin")
    with open(legacy / "pytorch_model.bin", "wb") as f:  # a plain (non-zip) pickle
        pickle.dump({"w": _Pwn(marker)}, f, protocol=2)
    for d in (zipped, legacy):
        with pytest.raises(CheckpointError, match="execute code") as e:
            load_state_dict(d)
        assert str(d / "pytorch_model.bin") in str(e.value)
        assert "refused" in str(e.value)
    assert not marker.exists()
    # control: the payload is live, so the assertion above would catch a loader that runs it
    with open(legacy / "pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_torch_bin_non_tensor_entries_and_corruption(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3, "note": "hi", "nested": {"a": torch.ones(1)}},
               tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_state_dict(tmp_path)
    assert list(loaded) == ["w"]
    assert any("non-tensor" in str(w.message) and "'step'" in str(w.message) for w in caught)

    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(tmp_path)
    torch.save({"w": torch.ones(200)}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_state_dict(tmp_path)


# --------------------------------------------------------------------------------------------
# native format


def _random_tree(shapes: dict, rng: np.random.Generator) -> dict:
    return {k: _random_tree(v, rng) if isinstance(v, dict)
            else rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def _assert_tree_equal(a: dict, b: dict) -> None:
    _assert_same(flatten_tree(a), flatten_tree(b))


CONFIGS = [
    dataclasses.replace(preset("bert-tiny"), norm_eps=1e-6, activation="gelu_tanh", num_labels=5),
    dataclasses.replace(preset("llama-tiny"), n_kv_heads=1, rope_theta=500000.0, head_dim=16),
    dataclasses.replace(preset("seq2seq-tiny"), n_decoder_layers=3, prenorm=True, label_smoothing=0.0),
    dataclasses.replace(preset("vit-tiny"), dropout=0.25, image_size=12),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_native_round_trip(tmp_path, config):
    tree = _random_tree(param_shapes(config), np.random.default_rng(0))
    tree["extra"] = {"step": np.array(7, np.int64), "f64": np.linspace(0, 1, 5)}
    path = save_native(tmp_path / "sub" / "ckpt.safetensors", tree, config,
                       extra_metadata={"head": "mlm"})
    loaded, cfg, meta = load_native(path)
    assert cfg == config and type(cfg) is type(config)
    _assert_tree_equal(loaded, tree)
    assert loaded["extra"]["step"].shape == ()
    assert meta["format"] == "bigmodel" and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["family"] == config.family and meta["config_class"] == type(config).__name__
    assert meta["head"] == "mlm"
    assert json.loads(meta["config"]) == dataclasses.asdict(config)
    # the file is plain safetensors: other tools read it under the "/"-joined paths
    assert set(safetensors_torch.load_file(path)) == set(flatten_tree(tree))


def test_native_jax_leaves(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    tree = {"a": {"kernel": jnp.ones((2, 3), jnp.bfloat16)}, "b": jnp.arange(3.0)}
    path = save_native(tmp_path / "j.safetensors", tree, GPTConfig())
    loaded, cfg, _ = load_native(path)
    assert loaded["a"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(loaded["a"]["kernel"], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(loaded["b"], np.arange(3.0))
    assert cfg == GPTConfig()


def _rewrite_meta(path: Path, **changes: str | None) -> None:
    tensors = read_safetensors(path)
    meta = read_safetensors_metadata(path)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    write_safetensors(path, tensors, meta)


def test_native_version_checks(tmp_path):
    path = save_native(tmp_path / "m.safetensors", {"w": np.ones(2)}, BertConfig())
    _rewrite_meta(path, format_version="2")
    newer = r"newer bigmodel \(format version 2; this one reads ≤ 1\)"
    with pytest.raises(CheckpointError, match=newer):
        load_native(path)
    for bad in ("1.0", "one", "", "-1", "0"):
        _rewrite_meta(path, format_version=bad)
        with pytest.raises(CheckpointError, match="format_version"):
            load_native(path)
    _rewrite_meta(path, format_version=None)
    with pytest.raises(CheckpointError, match="format_version"):
        load_native(path)


def test_native_rejects_foreign_and_bad_configs(tmp_path):
    hf = tmp_path / "hf.safetensors"
    safetensors_torch.save_file({"w": torch.ones(2)}, hf, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a bigmodel checkpoint"):
        load_native(hf)
    bare = tmp_path / "bare.safetensors"
    safetensors_torch.save_file({"w": torch.ones(2)}, bare)
    with pytest.raises(CheckpointError, match="not a bigmodel checkpoint"):
        load_native(bare)

    path = save_native(tmp_path / "m.safetensors", {"w": np.ones(2)}, ViTConfig())
    cfg = json.loads(read_safetensors_metadata(path)["config"])
    _rewrite_meta(path, config=json.dumps({**cfg, "warp_factor": 9, "colour": "red"}))
    with pytest.raises(CheckpointError, match="colour, warp_factor"):
        load_native(path)
    _rewrite_meta(path, config=json.dumps(cfg), config_class="MambaConfig")
    with pytest.raises(CheckpointError, match="MambaConfig"):
        load_native(path)
    _rewrite_meta(path, config_class="ViTConfig", family="gpt")
    with pytest.raises(CheckpointError, match="family"):
        load_native(path)

    _rewrite_meta(path, family="vit")
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_native(path)

    with pytest.raises(ValueError, match="reserved"):
        save_native(tmp_path / "x.safetensors", {"w": np.ones(1)}, ViTConfig(),
                    extra_metadata={"format": "mine"})
    with pytest.raises(TypeError):
        save_native(tmp_path / "x.safetensors", {"w": np.ones(1)}, {"not": "a config"})


# --------------------------------------------------------------------------------------------
# npz


def test_npz_round_trip(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    config = dataclasses.replace(preset("gpt2-tiny"), dropout=0.0, n_kv_heads=2)
    tree = _random_tree(param_shapes(config), np.random.default_rng(3))
    tree["file"] = {"allow_pickle": np.arange(3)}  # names np.savez's own parameters use
    tree["scalar"] = np.array(1.5)
    path = save_npz(tmp_path / "t.npz", tree, config)
    loaded, cfg, _ = load_npz(path)
    assert cfg == config
    _assert_tree_equal(loaded, tree)

    path2 = save_npz(tmp_path / "noconf.npz", {"bf": jnp.full((2,), 0.5, jnp.bfloat16)})
    loaded2, cfg2, _ = load_npz(path2)
    assert cfg2 is None
    assert loaded2["bf"].dtype == np.float32 and loaded2["bf"].tolist() == [0.5, 0.5]


def test_npz_errors(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.ones(2))
    with pytest.raises(CheckpointError, match="not a bigmodel .npz"):
        load_npz(plain)

    newer = tmp_path / "newer.npz"
    np.savez(newer, a=np.ones(2), __bigmodel_meta__=np.array(json.dumps(
        {"format": "bigmodel", "format_version": 7})))
    with pytest.raises(CheckpointError, match="format version 7"):
        load_npz(newer)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object),
             __bigmodel_meta__=np.array(json.dumps({"format": "bigmodel", "format_version": 1})))
    with pytest.raises(CheckpointError, match=re.escape(str(pickled))):
        load_npz(pickled)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(CheckpointError, match=re.escape(str(garbage))):
        load_npz(garbage)


def test_native_checksums_catch_damaged_data_and_header(tmp_path):
    config = preset("gpt2-tiny")
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "extra": {"n": np.arange(3)}}
    path = save_native(tmp_path / "m.safetensors", tree, config)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-5] ^= 0x10  # one bit of w's data (stored last): still a well-formed file
    path.write_bytes(bytes(damaged))
    read_safetensors(path)  # the format itself cannot tell...
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*'w' fails its CRC-32"):
        load_native(path)  # ...the checksum can

    # same bytes under another dtype (F32 -> I32: same length, so the header stays valid)
    path.write_bytes(good.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
    with pytest.raises(CheckpointError, match="'w' fails its CRC-32"):
        load_native(path)

    # a file written before checksums were recorded still loads
    path.write_bytes(good)
    _rewrite_meta(path, crc32=None)
    loaded, _, meta = load_native(path)
    assert "crc32" not in meta
    _assert_tree_equal(loaded, tree)
    _rewrite_meta(path, crc32="[1, 2]")
    with pytest.raises(CheckpointError, match="'crc32' metadata"):
        load_native(path)
    with pytest.raises(ValueError, match="reserved"):
        save_native(tmp_path / "x.safetensors", tree, config, extra_metadata={"crc32": "{}"})


@pytest.mark.parametrize("kind", ["native", "npz"])
def test_integer_arrays_at_float_parameters_are_refused_unless_cast(tmp_path, kind):
    config = preset("gpt2-tiny")
    tree = _random_tree(param_shapes(config), np.random.default_rng(0))
    ints = np.arange(tree["embed"]["embedding"].size, dtype=np.int32).reshape(
        tree["embed"]["embedding"].shape)
    tree["embed"]["embedding"] = ints
    tree["final_norm"]["scale"] = np.ones_like(tree["final_norm"]["scale"], dtype=bool)
    tree["extra"] = {"step": np.array(7, np.int64)}  # not a parameter: keeps its dtype
    save, load = (save_native, load_native) if kind == "native" else (save_npz, load_npz)
    path = save(tmp_path / f"m.{'safetensors' if kind == 'native' else 'npz'}", tree, config)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*'embed/embedding' is "
                                              r"int32.*float32.*1 more.*allow_int_cast=True"):
        load(path)
    loaded, _, _ = load(path, allow_int_cast=True)
    assert loaded["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(loaded["embed"]["embedding"], ints.astype(np.float32))
    assert loaded["final_norm"]["scale"].dtype == np.float32
    assert loaded["extra"]["step"].dtype == np.int64 and loaded["extra"]["step"] == 7
    # a BERT head's parameters count too
    bert_cfg = preset("bert-tiny")
    bert_tree = {"classifier": {"kernel": np.zeros((bert_cfg.d_model, 2), np.int64)}}
    path = save(tmp_path / f"b.{'safetensors' if kind == 'native' else 'npz'}", bert_tree, bert_cfg)
    with pytest.raises(CheckpointError, match="'classifier/kernel' is int64"):
        load(path)


def _zip_with_member(path: Path, name: str, member: bytes) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(name, member)
        meta = _npy_bytes(np.array(json.dumps({"format": "bigmodel", "format_version": 1})))
        zf.writestr("__bigmodel_meta__.npy", meta)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_npz_member_headers_are_checked_before_allocating(tmp_path):
    good = _npy_bytes(np.arange(4, dtype=np.float64))
    header_len = int.from_bytes(good[8:10], "little")
    header, body = good[10:10 + header_len], good[10 + header_len:]

    def npy_with_shape(shape: bytes) -> bytes:  # same data, another shape in the .npy header
        h = header.replace(b"(4,)", shape, 1).rstrip(b"\n ")
        h += b" " * (-(10 + len(h) + 1) % 64) + b"\n"
        return good[:8] + len(h).to_bytes(2, "little") + h + body

    path = tmp_path / "m.npz"
    # a header claiming 8 TB: np.load would try to allocate it; we refuse at once
    _zip_with_member(path, "w.npy", npy_with_shape(b"(1000000000000,)"))
    with pytest.raises(CheckpointError,
                       match=re.escape(str(path)) + ".*'w.npy' is corrupt.*8000000000000 bytes"):
        load_npz(path)
    _zip_with_member(path, "w.npy", npy_with_shape(b"(-4,)"))
    with pytest.raises(CheckpointError, match="negative shape"):
        load_npz(path)
    _zip_with_member(path, "w.txt", good)
    with pytest.raises(CheckpointError, match="'w.txt' is not a"):
        load_npz(path)
    _zip_with_member(path, "w.npy", good)
    assert load_npz(path)[0]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    # a bit flipped in a member's data: zipfile's CRC-32 catches it
    data = bytearray(path.read_bytes())
    data[bytes(data).index(body) + 3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*CRC"):
        load_npz(path)


# --------------------------------------------------------------------------------------------
# trees


def test_flatten_unflatten():
    tree = {"b": {"y": np.ones(1), "x": {"k": np.zeros(2)}}, "a": np.arange(2)}
    flat = flatten_tree(tree)
    assert list(flat) == ["a", "b/x/k", "b/y"]
    back = unflatten_tree(flat)
    _assert_tree_equal(back, tree)
    assert list(back) == ["a", "b"]

    with pytest.raises(ValueError, match="without '/'"):
        flatten_tree({"a/b": np.ones(1)})
    with pytest.raises(ValueError, match="empty subtree"):
        flatten_tree({"a": {}, "b": np.ones(1)})
    with pytest.raises(TypeError):
        flatten_tree({"a": {"b": object()}})
    with pytest.raises(ValueError, match="leaf"):
        unflatten_tree({"a": np.ones(1), "a/b": np.ones(1)})
    with pytest.raises(ValueError, match="empty component"):
        unflatten_tree({"a//b": np.ones(1)})


def test_every_config_class_is_loadable():
    # a config class added to reference_numpy.configs must also be registered for load_native
    assert set(CONFIG_CLASSES.values()) == set(typing.get_args(Config))
