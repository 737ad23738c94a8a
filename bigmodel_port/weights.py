"""Reading and writing flat state dicts (``dict[str, np.ndarray]``) in HuggingFace's file layout.

No model knowledge lives here: names are HF's parameter names, untouched. Translation to our
parameter tree happens in ``bigmodel_port.hf.<arch>``.

Files read, in this order of preference (the first one present wins, as in transformers):

1. ``model.safetensors``
2. ``model.safetensors.index.json`` plus the shards it names
3. ``pytorch_model.bin``
4. ``pytorch_model.bin.index.json`` plus the shards it names

This module also holds the one safetensors reader (:func:`read_safetensors`) and writer
(:func:`write_safetensors`) of the project: model files (``bigmodel_port.native``) and training
checkpoints (``bigmodel_train.checkpoint``) go through them too.

Dtypes: numpy has no bfloat16 (nor float8), so those tensors are converted to ``float32`` on
load. The conversion is exact: a bfloat16 is the upper 16 bits of the float32 with the same
value, so we shift its bit pattern left by 16 (safetensors) or let torch widen it (``.bin``).
Cast back explicitly (``config.dtype``) if you need the narrow type. All other dtypes come back
unchanged. ``read_safetensors(path, widen=False)`` keeps them instead, bit for bit, as
ml_dtypes' bfloat16 / float8 (what training checkpoints need).

Safety: ``.bin`` files are pickles. They are read with ``torch.load(weights_only=True)`` only;
a pickle that would run code is refused with a :class:`CheckpointError`. safetensors headers
are validated here (lengths, JSON, offsets against the file size, tensors tiling the data
section as the format requires) before the safetensors library reads any tensor, so a corrupt
or truncated file gives an error naming the file and the problem instead of the library's
anonymous one.

Writing streams: the header first, then each array's bytes straight from its buffer, into an
atomic temporary (``bigmodel_port.atomic``), so saving never holds a second copy of the tensors
in memory (the library's ``safetensors.numpy.save_file`` builds the whole file in memory first).
Tensors are laid out as the library lays them out (widest dtype first, then by name), so every
tensor starts at a multiple of its item size, and the library reads our files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors import safe_open

from bigmodel_port.atomic import atomic_open, atomic_write_text
from bigmodel_port.errors import CheckpointError
from bigmodel_port.paths import local_model_dir

__all__ = [
    "DTYPE_TAGS", "SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME", "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME",
    "find_shared_tensors", "find_weights_file", "load_state_dict", "parse_size", "read_safetensors",
    "read_safetensors_metadata", "save_state_dict", "storable_array", "tensor_crc32",
    "write_safetensors",
]

# HuggingFace's file names (transformers.utils.SAFE_WEIGHTS_NAME etc.).
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Shard names our own save_state_dict writes (HF's pattern), so a later save can find stale ones.
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# The safetensors library refuses headers over 100 MB; a bigger length means a foreign file.
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype tag -> numpy dtype, for the dtypes numpy has natively (little-endian on disk).
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
# Tags numpy lacks; widened to float32 on load (see the module docstring).
_WIDENED_ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# ml_dtypes' names for them (what jax arrays of these dtypes become under np.asarray).
_ML_DTYPE_TAGS = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# numpy dtype name -> safetensors tag, for every dtype written and (widen=False) read back.
DTYPE_TAGS: dict[str, str] = {**{dt.name: tag for tag, dt in _NP_DTYPES.items()}, **_ML_DTYPE_TAGS}


# --------------------------------------------------------------------------------------------
# sizes


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNIT_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(size: int | str) -> int:
    """A size in bytes from an int or a string such as ``"5GB"``, ``"500MiB"``, ``"100"``.

    HuggingFace semantics (``transformers.utils.convert_file_size_to_int``): ``KB/MB/GB/TB`` are
    powers of 10 (``"5GB"`` = 5 * 10**9), ``KiB/MiB/GiB/TiB`` powers of 2 (``"1GiB"`` = 2**30),
    and a lowercase final ``b`` with a decimal prefix means bits (``"8Gb"`` = 10**9 bytes).
    Units are otherwise case-insensitive; a bare number is bytes.
    """
    if isinstance(size, bool):  # bool is an int subclass; True bytes is certainly a mistake
        raise TypeError("size must be an int or a string like '5GB', not a bool")
    if isinstance(size, (int, np.integer)):
        n = int(size)
    elif isinstance(size, str):
        m = _SIZE_RE.match(size)
        if m is None:
            raise ValueError(f"cannot parse size {size!r}; "
                             "use bytes or a unit: '5GB', '500MiB', '100KB'")
        number, unit = float(m.group(1)), m.group(2)
        if unit is None or unit.lower() == "b":
            n = int(number)
        else:
            power = _UNIT_POWER[unit[0].lower()]
            binary = unit[1].lower() == "i"
            n = int(number * (2 ** (10 * power) if binary else 10 ** (3 * power)))
            if not binary and unit[-1] == "b":  # "Gb": gigabits, as in HF
                n //= 8
    else:
        raise TypeError(f"size must be an int or a string like '5GB', not {type(size).__name__}")
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


# --------------------------------------------------------------------------------------------
# safetensors files


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class _Header:
    entries: dict[str, _Entry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(path: Path) -> _Header:
    """Parse and validate a safetensors header without trusting anything in it.

    Checks the header length against the file size, that the header is a JSON object, that every
    entry has a known dtype, a shape of non-negative ints and in-range data offsets whose span
    matches dtype and shape. The safetensors library checks most of this too, but its errors do
    not say which file is broken, and it is not asked to parse a header we have not vetted.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length field")
        n = int.from_bytes(prefix, "little")
        if n > size - 8:
            raise _corrupt(path, f"header length {n} bytes is beyond the file size ({size} bytes)")
        if n > _MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {n} bytes exceeds the format's 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # bad UTF-8, bad JSON, an integer of more digits than int() takes
        raise _corrupt(path, f"header is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:  # json's nesting guard (a valid header nests 3 levels)
        raise _corrupt(path, "header JSON nests too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent, or null (which the library accepts too)
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _corrupt(path, "__metadata__ is not a mapping of strings to strings")

    data_size = size - 8 - n
    entries: dict[str, _Entry] = {}
    for name, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str)
                and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)):
            raise _corrupt(path, f"tensor {name!r:.200} entry is malformed: {e!r:.200}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r:.200} has invalid shape {shape!r:.200}")
        if not (len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {name!r:.200} has invalid data_offsets "
                                 f"{offsets!r:.200}")
        if dtype in _NP_DTYPES:
            itemsize = _NP_DTYPES[dtype].itemsize
        elif dtype in _WIDENED_ITEMSIZE:
            itemsize = _WIDENED_ITEMSIZE[dtype]
        else:
            supported = sorted([*_NP_DTYPES, *_WIDENED_ITEMSIZE])
            raise CheckpointError(f"{path}: tensor {name!r:.200} has dtype {dtype!r:.50}, which "
                                  f"bigmodel cannot read (supported: {', '.join(supported)})")
        begin, end = offsets
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} data_offsets [{begin}, {end}] lie beyond the "
                                 f"file's data section ({data_size} bytes; file is {size} bytes)")
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise _corrupt(path, f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes "
                                 f"but its data_offsets [{begin}, {end}] span {end - begin}")
        entries[name] = _Entry(dtype, tuple(shape), begin, end)
    # The format has the tensors tile the data section, back to back and in full.
    filled = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != filled:
            raise _corrupt(path, f"tensor {name!r} data_offsets [{e.begin}, {e.end}] "
                                 f"{'overlap' if e.begin < filled else 'leave a gap after'} the "
                                 f"tensor before it (which ends at {filled})")
        filled = e.end
    if filled != data_size:
        raise _corrupt(path, f"the data section holds {data_size} bytes but its tensors fill {filled}")
    return _Header(entries, metadata, 8 + n)


def _ml_dtype(tag: str, path: Path, name: str) -> np.dtype[Any]:
    """ml_dtypes' type for a BF16 / F8 tag (ml_dtypes ships with jax)."""
    try:
        import ml_dtypes
    except ImportError:
        raise CheckpointError(f"{path}: tensor {name!r} is {tag}; reading it needs the ml_dtypes "
                              "package (installed with jax)") from None
    return np.dtype(getattr(ml_dtypes, next(n for n, t in _ML_DTYPE_TAGS.items() if t == tag)))


def _widen_to_float32(a: np.ndarray, tag: str) -> np.ndarray:
    """float32 values of a BF16 tensor read as its uint16 bit patterns, or of an ml_dtypes
    float8 tensor (exact: every bf16 / fp8 value is representable in float32)."""
    if tag == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)  # bf16 = top half of f32
    return a.astype(np.float32)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty dict if none), validating the
    header but reading no tensor data."""
    return dict(_read_header(Path(path)).metadata)


def read_safetensors(path: str | os.PathLike[str], *, widen: bool = True,
                     crc32: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, in header order, read bit for bit.

    The header is validated here first (:func:`_read_header`); the tensors are then read by the
    safetensors library. ``widen=True``: BF16 / F8 tensors become float32 (exact; numpy has no
    such dtypes, and BF16 needs no extra package). ``widen=False``: they come back as ml_dtypes'
    bfloat16 / float8. ``crc32``: expected :func:`tensor_crc32` of every tensor by name (e.g.
    recorded in the file's metadata by its writer); the file must hold exactly those tensors,
    each matching. Raises :class:`CheckpointError` naming the file if it is corrupt or truncated.
    """
    path = Path(path)
    header = _read_header(path)
    if crc32 is not None and set(crc32) != set(header.entries):
        missing = sorted(set(crc32) - set(header.entries))
        extra = sorted(set(header.entries) - set(crc32))
        raise _corrupt(path, f"its tensors do not match its recorded checksums (missing: "
                             f"{missing[:10]}, unexpected: {extra[:10]})")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(path, framework="numpy") as lib, open(path, "rb") as f:
            for name, e in header.entries.items():
                if e.dtype in _NP_DTYPES:
                    a = lib.get_tensor(name)
                    if a.dtype != _NP_DTYPES[e.dtype] or a.shape != e.shape:
                        raise _corrupt(path, f"tensor {name!r} read back as {a.dtype}{a.shape}, "
                                             f"not {e.dtype}{e.shape} (file changed?)")
                # raw bytes: the library reads BF16 to numpy only after ml_dtypes loads, F8 never
                elif e.dtype == "BF16" and widen:
                    a = np.empty(e.shape, np.dtype("<u2"))  # bit patterns, widened below
                else:
                    a = np.empty(e.shape, _ml_dtype(e.dtype, path, name))
                if e.dtype not in _NP_DTYPES:
                    f.seek(header.data_start + e.begin)
                    if f.readinto(a.reshape(-1).view(np.uint8)) != e.end - e.begin:
                        raise _corrupt(path, f"tensor {name!r} is cut short")
                if crc32 is not None and _crc(e.dtype, e.shape, a) != crc32[name]:
                    raise _corrupt(path, f"tensor {name!r} fails its CRC-32 check (the file was "
                                         "damaged after it was written)")
                out[name] = _widen_to_float32(a, e.dtype) if widen and e.dtype not in _NP_DTYPES \
                    else a
    except (CheckpointError, MemoryError):
        raise
    except BaseException as exc:  # noqa: B036 -- see below
        # The library's errors (a file changed since the checks) name no file; a Rust panic in
        # it arrives as pyo3's PanicException, a BaseException. Interrupts stay interrupts.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return out


def _crc(tag: str, shape: tuple[int, ...] | list[int], a: np.ndarray) -> int:
    """CRC-32 of the tag, the shape and the raw bytes of the C-contiguous array ``a``."""
    crc = zlib.crc32(f"{tag}{list(shape)}".encode("ascii"))
    return zlib.crc32(a.reshape(-1).view(np.uint8), crc) if a.size else crc


def tensor_crc32(value: Any) -> int:
    """The checksum :func:`read_safetensors` checks with ``crc32=``: CRC-32 over the tensor's
    safetensors dtype tag, its shape and its bytes as :func:`write_safetensors` stores them (so a
    changed dtype or shape in the header is caught, not only changed data)."""
    a = storable_array(value, "tensor")
    return _crc(DTYPE_TAGS[a.dtype.name], a.shape, a)


def storable_array(value: Any, name: str) -> np.ndarray:
    """``value`` as the array :func:`write_safetensors` stores: C-contiguous, little-endian, of
    a dtype safetensors holds (``DTYPE_TAGS``); TypeError naming the tensor otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings, got {name!r}")
    # np.asarray also pulls jax arrays to host (and keeps a 0-d array 0-d)
    a = np.asarray(value)
    if a.dtype.name not in DTYPE_TAGS:  # object, string, complex, float128...: say which tensor
        raise TypeError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store "
                        f"(it stores {', '.join(DTYPE_TAGS)})")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")


def _header_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """The length field and JSON header of a file holding ``arrays`` back to back, in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, a in arrays.items():
        header[name] = {"dtype": DTYPE_TAGS[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # an 8-byte aligned data section, as the library writes
    return len(raw).to_bytes(8, "little") + raw


def _write_array(f: IO[bytes], a: np.ndarray) -> None:
    """Append the raw bytes of the C-contiguous little-endian array ``a``."""
    if a.size:
        f.write(memoryview(a.reshape(-1).view(np.uint8)))


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (arrays, or anything ``np.asarray`` accepts, such as jax
    arrays) to the safetensors file ``path``, streaming one array at a time; returns it as a
    Path. ``metadata`` values must be strings.

    Not ``safetensors.numpy.save_file``: it builds the whole file in memory (a second copy of
    every tensor), and releases of it have stored a 0-d array as shape ``[1]``.
    """
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    arrays = {name: storable_array(v, name) for name, v in tensors.items()}
    if "__metadata__" in arrays:
        raise ValueError("'__metadata__' is reserved for the file's metadata, not a tensor name")
    # the library's layout: widest item first (each tensor then starts aligned), then by name
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    arrays = {name: arrays[name] for name in order}
    with atomic_open(path, "wb") as f:
        f.write(_header_bytes(arrays, metadata))
        for a in arrays.values():
            _write_array(f, a)
    return Path(path)


# --------------------------------------------------------------------------------------------
# PyTorch pickles (read only)


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only message (the blocked global)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return (lines[0] if lines else type(exc).__name__)[:300]


def _load_torch_file(path: Path) -> dict[str, np.ndarray]:
    """Tensors of one ``pytorch_model*.bin``, via ``torch.load(weights_only=True)`` only."""
    try:
        import torch  # lazily: torch is only needed for .bin files
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle checkpoint and reading it needs torch, which is not "
            "installed. Install torch (the CPU build is enough), or convert the checkpoint to "
            "model.safetensors on a machine that has it."
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint, and loading it would "
            f"execute code stored in the file ({_unpickling_reason(e)}). Load it only if you trust "
            "its source, and convert it to safetensors."
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # torch reports corruption as RuntimeError, EOFError, zip errors...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict "
                              "(a mapping of parameter names to tensors)")

    out: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            out[key] = _torch_to_numpy(value, path, key)
        else:
            skipped.append(f"{key!r} ({type(value).__name__})")
    if not out:
        raise CheckpointError(
            f"{path} holds no tensors at top level (entries: {', '.join(skipped[:20]) or 'none'}). "
            "If it is a training checkpoint, save the model's state_dict() on its own."
        )
    if skipped:
        # e.g. a version counter or config stored beside the weights: not parameters, so drop
        # them, but say so rather than silently.
        warnings.warn(f"{path}: ignored {len(skipped)} non-tensor entries: "
                      f"{', '.join(skipped[:20])}{' ...' if len(skipped) > 20 else ''}", stacklevel=3)
    return out


def _torch_to_numpy(t: Any, path: Path, key: str) -> np.ndarray:
    import torch

    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    # bf16 / fp8 have no numpy dtype: widen to float32, which is exact for every value.
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float32)
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor {key!r} of dtype {t.dtype} has no numpy "
                              f"equivalent: {e}") from None


# --------------------------------------------------------------------------------------------
# directories: single file or sharded


def _read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (parameter name -> shard file name) of a HF index file, validated."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: no 'weight_map' mapping parameter names to shard files")
    for shard in set(weight_map.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise CheckpointError(
                f"{index_path}: shard name {shard!r} points outside the model directory")
    return weight_map


def _load_sharded(index_path: Path, load_file: Any) -> dict[str, np.ndarray]:
    """Load every shard an index names and check each name is found in its shard."""
    weight_map = _read_index(index_path)
    directory = index_path.parent
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = sorted(s for s in by_shard if not (directory / s).is_file())
    if missing:
        raise CheckpointError(f"{index_path} names shard files that are not in {directory}: "
                              f"{', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(by_shard):
        tensors = load_file(directory / shard)
        absent = [name for name in by_shard[shard] if name not in tensors]
        if absent:
            raise CheckpointError(
                f"{index_path} maps {len(absent)} parameter(s) to shard {shard}, which does not "
                f"contain them: {', '.join(absent[:20])}{' ...' if len(absent) > 20 else ''}"
            )
        extra = set(tensors) - set(by_shard[shard])
        if extra:  # the index is authoritative (as in transformers); mention what we skip
            warnings.warn(f"{directory / shard}: ignored {len(extra)} tensor(s) the index does not "
                          f"map to this shard: {', '.join(sorted(extra)[:20])}", stacklevel=3)
        for name in by_shard[shard]:
            out[name] = tensors[name]
        del tensors  # keep only one shard's worth of unused tensors alive at a time
    return out


def find_weights_file(model_dir: str | os.PathLike[str]) -> Path:
    """The weights file (or index) :func:`load_state_dict` reads from ``model_dir``, by HF's
    order of preference; :class:`CheckpointError` listing the directory if there is none."""
    directory = local_model_dir(model_dir)
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    listing = ", ".join(present[:40])
    if len(present) > 40:
        listing += f" ... and {len(present) - 40} more"
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; the directory holds: {listing or 'nothing'}"
    )


def load_state_dict(model_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The flat state dict (HF parameter names -> numpy arrays) stored in ``model_dir``.

    Reads the first of ``model.safetensors``, ``model.safetensors.index.json`` (+ shards),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (+ shards) that exists; a single
    file wins over an index when both are present. bfloat16 / float8 tensors come back as float32
    (exact). Raises :class:`ModelNotFoundError` if ``model_dir`` is not a directory,
    :class:`CheckpointError` for missing / corrupt files or a pickle that would run code, and
    ImportError for a ``.bin`` checkpoint when torch is not installed.
    """
    path = find_weights_file(model_dir)
    if path.name == SAFE_WEIGHTS_NAME:
        return read_safetensors(path)
    if path.name == SAFE_WEIGHTS_INDEX_NAME:
        return _load_sharded(path, read_safetensors)
    if path.name == WEIGHTS_NAME:
        return _load_torch_file(path)
    return _load_sharded(path, _load_torch_file)


# --------------------------------------------------------------------------------------------
# saving


def find_shared_tensors(tensors: Mapping[str, Any]) -> list[list[str]]:
    """Groups (of two or more names) whose arrays are the same view of the same memory, such as
    tied input / output embeddings. ``save_state_dict`` writes each name in full, so drop all
    but one name of each group first if the duplicates are not wanted in the file."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            continue  # jax / other arrays: no aliasing visible from here
        key = (value.__array_interface__["data"][0], value.shape, value.strides, value.dtype.str)
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _stale_weight_files(directory: Path) -> set[str]:
    """Safetensors weight files a previous save may have left in ``directory``: the single file,
    the index, the shards that index names and anything matching our shard pattern."""
    stale = {p.name for p in directory.iterdir() if _SHARD_RE.fullmatch(p.name)}
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        if (directory / name).exists():
            stale.add(name)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            stale.update(s for s in _read_index(index).values() if Path(s).name == s)
        except (CheckpointError, OSError):
            pass  # an unreadable old index: its shards are then only found by pattern
    return stale


def _split_into_shards(arrays: Mapping[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    """huggingface_hub's ``split_state_dict_into_shards_factory`` (what ``save_pretrained`` uses),
    so the same tensors land in the same shard files: tensors in order fill the open shard until
    the next would overflow it; a tensor over the limit is given a shard of its own at once,
    while the open shard stays open (so it is numbered after it)."""
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    filled = 0
    for name, a in arrays.items():
        if a.nbytes > limit:
            shards.append({name: a})
            continue
        if current and filled + a.nbytes > limit:
            shards.append(current)
            current, filled = {}, 0
        current[name] = a
        filled += a.nbytes
    if current or not shards:  # an empty state dict still gets one (empty) file
        shards.append(current)
    return shards


def save_state_dict(model_dir: str | os.PathLike[str], tensors: Mapping[str, Any], *,
                    max_shard_size: int | str = "5GB",
                    metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``tensors`` to ``model_dir`` in HF layout; returns the files written.

    One ``model.safetensors`` if the total fits in ``max_shard_size`` (see :func:`parse_size`),
    else shards ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    (``{"metadata": {"total_size": bytes, "total_parameters": n}, "weight_map": {name: shard}}``),
    split exactly as ``save_pretrained`` splits: tensors in the given order fill a shard until
    the next one would overflow it; a tensor larger than the limit gets a shard of its own.
    ``metadata`` goes into every file's header and defaults to ``{"format": "pt"}``, which
    transformers expects.

    Arrays are made C-contiguous. Tensors that share memory are each written in full
    (safetensors has no aliasing): pass distinct tensors, e.g. drop tied duplicates found with
    :func:`find_shared_tensors` as ``save_pretrained`` does.

    Every file is written atomically. Safetensors weight files of an earlier save in the same
    directory (the single file, an index and its shards) are deleted only after the new files
    and index are in place. A crash in between leaves each file complete, but an overwritten
    shard set of the same count can then pair new shards with the old index.
    """
    limit = parse_size(max_shard_size)
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    arrays = {name: storable_array(v, name) for name, v in tensors.items()}
    directory = Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stale = _stale_weight_files(directory)

    shards = _split_into_shards(arrays, limit)

    written: list[Path] = []
    if len(shards) == 1:
        written.append(write_safetensors(directory / SAFE_WEIGHTS_NAME, shards[0], meta))
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            written.append(write_safetensors(directory / shard_name, shard, meta))
            weight_map.update(dict.fromkeys(shard, shard_name))
        # total_parameters: what transformers >= 5 writes beside total_size (loaders ignore both)
        index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values()),
                              "total_parameters": sum(a.size for a in arrays.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        # The index goes last: it is what makes the new shard set the one that gets loaded.
        written.append(atomic_write_text(directory / SAFE_WEIGHTS_INDEX_NAME,
                                         json.dumps(index, indent=2, sort_keys=True) + "\n"))

    for name in sorted(stale - {p.name for p in written}):
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
    return written
