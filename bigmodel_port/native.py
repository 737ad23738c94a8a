"""bigmodel's own checkpoint format: a parameter tree plus the config that built it.

A tree is a nested ``dict`` of arrays (see ``reference_numpy.tree``); on disk it is flat, each
leaf stored under its ``"/"``-joined path (``"layers/attn/query/kernel"``), the same paths
``reference_numpy.tree`` uses, so file keys, NumPy and JAX trees all read alike.

* ``save_native`` / ``load_native``: one ``.safetensors`` file. Its header metadata (strings)
  holds ``format`` = ``"bigmodel"``, ``format_version``, ``family``, ``config_class`` and
  ``config`` (the config dataclass as JSON), ``crc32`` (JSON: each tensor's
  ``bigmodel_port.weights.tensor_crc32``, over dtype, shape and bytes; checked on load when
  present, so a damaged file is refused rather than loaded), plus caller extras such as BERT's
  ``head``.
* ``save_npz`` / ``load_npz``: the same tree as an uncompressed ``.npz`` (no safetensors
  needed to read it), with the metadata as JSON in a ``__bigmodel_meta__`` entry. Read member by
  member with ``zipfile`` (whose CRC-32 check covers every member) and ``.npy`` headers checked
  against the member sizes before anything is allocated; object arrays are refused, so an
  ``.npz`` can never run code.

Loading checks dtypes: an integer or bool array at a parameter path of the config
(``reference_numpy.configs.param_shapes``, plus every BERT head) whose ``dtype`` is a float type is
refused, naming the leaf, unless ``allow_int_cast=True`` (then it is cast to the config's dtype).
Other leaves (a caller's extras such as a step counter) keep their dtype.

Versioning: ``FORMAT_VERSION`` is bumped whenever a change would make an older reader
misinterpret a file; a reader refuses files from a newer version instead of guessing.

dtypes: bfloat16 / float8 leaves (e.g. from jax) are stored as such in ``.safetensors`` and come
back as float32 (exact; numpy has no bfloat16). ``.npz`` cannot hold them portably, so
``save_npz`` widens them to float32 (also exact) before writing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from bigmodel_port.atomic import atomic_write
from bigmodel_port.errors import CheckpointError
from bigmodel_port.weights import read_safetensors, read_safetensors_metadata, tensor_crc32
from bigmodel_port.weights import write_safetensors
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig
from reference_numpy.configs import param_shapes
from reference_numpy.models import bert
from reference_numpy.tree import Tree, tree_flatten
from reference_numpy.tree import tree_unflatten as unflatten_tree

__all__ = [
    "CONFIG_CLASSES", "FORMAT_NAME", "FORMAT_VERSION", "flatten_tree", "load_native", "load_npz",
    "save_native", "save_npz", "unflatten_tree",
]

FORMAT_NAME = "bigmodel"
FORMAT_VERSION = 1

# Config classes a file may name in ``config_class``, by class name.
CONFIG_CLASSES: dict[str, type] = {
    c.__name__: c for c in (BertConfig, GPTConfig, Seq2SeqConfig, ViTConfig)}

# Metadata keys save_native owns; extra_metadata may not override them.
_RESERVED_KEYS = ("format", "format_version", "family", "config_class", "config", "crc32")
_NPZ_META_KEY = "__bigmodel_meta__"


# --------------------------------------------------------------------------------------------
# trees <-> flat dicts (reference_numpy.tree's flat form; unflatten_tree is its tree_unflatten)


def flatten_tree(tree: Tree) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` for every leaf (``reference_numpy.tree.tree_flatten``, so keys are
    checked and in sorted path order); leaves go through ``np.asarray`` (so jax arrays are copied
    to host memory)."""
    flat: dict[str, np.ndarray] = {}
    for path, leaf in tree_flatten(tree).items():
        a = np.asarray(leaf)
        if a.dtype.kind == "O":
            raise TypeError(f"leaf {path!r} is {type(leaf).__name__}, not a numeric array")
        flat[path] = a
    return flat


def _unflatten_file(flat: Mapping[str, Any], path: Path) -> Tree:
    """unflatten_tree, with a malformed key reported against the file it came from."""
    try:
        return unflatten_tree(flat)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------
# metadata shared by both file kinds


def _config_class_name(config: Any) -> str:
    name = type(config).__name__
    if CONFIG_CLASSES.get(name) is not type(config):
        raise TypeError(f"config must be one of {', '.join(CONFIG_CLASSES)}, not {name}")
    return name


def _check_format(fmt: Any, version: Any, path: Path) -> None:
    """Refuse files that are not ours, or whose format version this code does not know."""
    if fmt is None:
        raise CheckpointError(
            f"{path} is not a bigmodel checkpoint: its metadata has no 'format' entry. A HuggingFace "
            "checkpoint is read from its directory with bigmodel_port.weights.load_state_dict.")
    if fmt != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not a bigmodel checkpoint: its format is {fmt!r}, not {FORMAT_NAME!r}"
            + (" (a HuggingFace / PyTorch file; read it with load_state_dict)" if fmt == "pt" else ""))
    if isinstance(version, int) and not isinstance(version, bool):
        v = version
    elif isinstance(version, str) and re.fullmatch(r"[0-9]+", version):
        v = int(version)
    else:
        raise CheckpointError(f"{path}: unknown bigmodel format_version {version!r} "
                              f"(expected an integer ≤ {FORMAT_VERSION})")
    if v > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer bigmodel (format version {v}; this one "
                              f"reads ≤ {FORMAT_VERSION}); upgrade bigmodel to load it")
    if v < 1:
        raise CheckpointError(f"{path}: unknown bigmodel format_version {v} (versions start at 1)")


def _json_object(text: str, path: Path, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or ``CheckpointError`` naming ``path`` and ``what``."""
    try:
        value = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an int of more digits than int() takes
        raise CheckpointError(f"{path}: {what} is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nests too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def _config_from_metadata(cls_name: Any, fields: Any, family: Any, path: Path) -> Config:
    """Rebuild the config dataclass; ``fields`` is its ``asdict`` (a dict, or JSON text)."""
    cls = CONFIG_CLASSES.get(cls_name) if isinstance(cls_name, str) else None
    if cls is None:
        raise CheckpointError(f"{path}: unknown config_class {cls_name!r}; "
                              f"known: {', '.join(CONFIG_CLASSES)}")
    if isinstance(fields, str):
        fields = _json_object(fields, path, "config metadata")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: config metadata is not a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"{path}: config has fields {cls_name} does not know: {', '.join(unknown)} "
            "(written by a newer or modified bigmodel?)")
    if family is not None and family != cls.family:
        raise CheckpointError(f"{path}: family {family!r} does not match config_class {cls_name} "
                              f"(family {cls.family!r})")
    # Fields missing from the file (added after it was written) take the class defaults.
    try:
        return cls(**fields)
    except Exception as e:  # the config's own validation, whatever it raises
        raise CheckpointError(f"{path}: cannot build {cls_name} from its config metadata: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None


def _config_metadata(config: Config) -> dict[str, Any]:
    name = _config_class_name(config)  # first: a non-config has no .family to read
    return {"family": config.family, "config_class": name, "config": dataclasses.asdict(config)}


# --------------------------------------------------------------------------------------------
# .safetensors


def save_native(path: str | os.PathLike[str], tree: Tree, config: Config, *,
                extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tree`` and ``config`` to the ``.safetensors`` file ``path``.

    ``extra_metadata`` adds string entries to the header (e.g. ``{"head": "mlm"}`` for BERT);
    it may not override ``format``, ``format_version``, ``family``, ``config_class``, ``config``.
    Returns ``path`` as a Path. Parent directories are created.
    """
    cm = _config_metadata(config)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "family": cm["family"], "config_class": cm["config_class"],
                "config": json.dumps(cm["config"], sort_keys=True)}
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED_KEYS:
            raise ValueError(f"extra_metadata may not set the reserved key {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"extra_metadata must map strings to strings; got {key!r}: {value!r}")
        metadata[key] = value
    tensors = flatten_tree(tree)
    metadata["crc32"] = json.dumps({k: tensor_crc32(a) for k, a in tensors.items()},
                                   separators=(",", ":"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, tensors, metadata)


def load_native(path: str | os.PathLike[str], *, allow_int_cast: bool = False, allow_quantized: bool = False
                ) -> tuple[Tree, Config, dict[str, str]]:
    """``(tree, config, metadata)`` of a file written by :func:`save_native`.

    ``metadata`` is the whole header metadata (including any extras). The format and version
    are checked before any tensor is read, then every tensor against its recorded CRC-32.
    Raises :class:`CheckpointError` naming the file for a foreign or corrupt file, a newer format
    version, a config this code cannot build, or an integer / bool array at a float parameter
    (``allow_int_cast=True`` casts it to the config's dtype instead; module docstring). A
    quantised file (``bigmodel_port.quant_io``) is refused unless ``allow_quantized``: its
    weights are int codes and scales, not the parameter tree.
    """
    path = Path(path)
    metadata = read_safetensors_metadata(path)
    _check_format(metadata.get("format"), metadata.get("format_version"), path)
    if "quantization" in metadata and not allow_quantized:
        raise CheckpointError(f"{path} holds a quantised model: load it with "
                              "bigmodel_port.quant_io.load_quantized")
    config = _config_from_metadata(metadata.get("config_class"), metadata.get("config"),
                                   metadata.get("family"), path)
    crc32 = None
    if "crc32" in metadata:  # files written before checksums were recorded have none
        try:
            crc32 = json.loads(metadata["crc32"])
        except (ValueError, RecursionError):
            crc32 = None
        if not (isinstance(crc32, dict)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in crc32.values())):
            raise CheckpointError(f"{path}: corrupt file: its 'crc32' metadata is not a JSON "
                                  "object of tensor checksums")
    flat = read_safetensors(path, crc32=crc32)
    return _unflatten_file(_check_int_leaves(flat, config, path, allow_int_cast), path), config, \
        metadata


def _check_int_leaves(flat: dict[str, np.ndarray], config: Config, path: Path,
                      allow_int_cast: bool) -> dict[str, np.ndarray]:
    """Refuse (or, when allowed, cast) integer / bool arrays at the config's float parameters:
    they would load into float parameters as silently wrong weights."""
    ints = [k for k, a in flat.items() if a.dtype.kind in "biu"]
    if not ints or not str(config.dtype).startswith(("float", "bfloat")):
        return flat
    try:
        params = _parameter_paths(config)
    except Exception as e:  # a config the model cannot be built from
        raise CheckpointError(f"{path}: its config describes no valid model "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    bad = [k for k in ints if k in params]
    if bad and not allow_int_cast:
        raise CheckpointError(
            f"{path}: parameter {bad[0]!r} is {flat[bad[0]].dtype}, but the config's parameters "
            f"are {config.dtype}" + (f" ({len(bad) - 1} more such leaves)" if len(bad) > 1 else "")
            + "; pass allow_int_cast=True to cast them")
    dtype = np.float32 if config.dtype == "bfloat16" else np.dtype(config.dtype)
    return {k: a.astype(dtype) if k in bad else a for k, a in flat.items()}


def _parameter_paths(config: Config) -> set[str]:
    """The "/"-joined paths of ``config``'s parameters (every BERT head's included)."""
    shapes = [param_shapes(config)]
    if isinstance(config, BertConfig):
        shapes += [bert.param_shapes(config, head) for head in bert.HEADS]
    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                out.add(prefix + k)

    for s in shapes:
        walk(s, "")
    return out


# --------------------------------------------------------------------------------------------
# .npz


def _npz_storable(path: str, a: np.ndarray) -> np.ndarray:
    """``.npy`` records ml_dtypes' bfloat16 / float8 as opaque void bytes that come back
    unusable, so widen them to float32 (exact) first."""
    if a.dtype.kind == "V":
        if a.dtype.names is None and a.dtype.name.startswith(("bfloat16", "float8")):
            return a.astype(np.float32)
        raise TypeError(f"leaf {path!r} has dtype {a.dtype}, which .npz cannot store portably")
    return a


def _write_npz(f: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez`` does, minus its keyword-argument interface: with ``np.savez(f, **arrays)``
    a tree key named ``file`` or ``allow_pickle`` would collide with its parameters."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)


def save_npz(path: str | os.PathLike[str], tree: Tree, config: Config | None = None, *,
             extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tree`` (and ``config``, if given) to the ``.npz`` file ``path``
    (used as given: no ``.npz`` suffix is added). ``extra_metadata``: string entries kept with
    it, as in :func:`save_native`. Returns ``path`` as a Path."""
    flat = {k: _npz_storable(k, a) for k, a in flatten_tree(tree).items()}
    if _NPZ_META_KEY in flat:
        raise ValueError(f"{_NPZ_META_KEY!r} is reserved for the file's metadata")
    meta: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if config is not None:
        meta.update(_config_metadata(config))
    for key, value in (extra_metadata or {}).items():
        if key in meta or key in _RESERVED_KEYS:
            raise ValueError(f"extra_metadata may not set the reserved key {key!r}")
        meta[key] = str(value)
    flat[_NPZ_META_KEY] = np.array(json.dumps(meta, sort_keys=True))  # 0-d unicode, no pickle
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: _write_npz(f, flat))


def load_npz(path: str | os.PathLike[str], *, allow_int_cast: bool = False
             ) -> tuple[Tree, Config | None, dict[str, Any]]:
    """``(tree, config, metadata)`` of a file written by :func:`save_npz`; ``config`` is None if
    none was saved. Never unpickles. Raises :class:`CheckpointError` naming the file if it is
    corrupt, not ours, or from a newer format version, or for an integer / bool array at a float
    parameter of the config (unless ``allow_int_cast=True``; see :func:`load_native`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":  # what np.save writes
                raise CheckpointError(f"{path} is a single .npy array, not a bigmodel .npz")
        flat = _read_npz(path)
    except (CheckpointError, FileNotFoundError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:  # BadZipFile, truncated members, bad .npy headers, a bad CRC-32...
        raise CheckpointError(f"{path}: not a readable .npz ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None
    if _NPZ_META_KEY not in flat:
        raise CheckpointError(f"{path} is not a bigmodel .npz: it has no {_NPZ_META_KEY!r} entry")
    raw = flat.pop(_NPZ_META_KEY)
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise CheckpointError(f"{path}: {_NPZ_META_KEY!r} is not a unicode string")
    meta = _json_object(str(raw), path, repr(_NPZ_META_KEY))
    _check_format(meta.get("format"), meta.get("format_version"), path)
    config = None
    if "config_class" in meta:
        config = _config_from_metadata(meta["config_class"], meta.get("config"),
                                       meta.get("family"), path)
        flat = _check_int_leaves(flat, config, path, allow_int_cast)
    return _unflatten_file(flat, path), config, meta


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every ``<name>.npy`` member of the zip file ``path`` as ``{name: array}``.

    Not ``np.load``: it allocates whatever shape a member's ``.npy`` header claims before reading
    a byte of data, so one flipped digit there can ask for terabytes. Here each header is checked
    against the member's size first, object dtypes are refused (no pickles), and each member is
    read to its end, so zipfile checks its CRC-32. Errors propagate as raised (the caller wraps
    them)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy") or name[:-4] in out:
                raise CheckpointError(f"{path}: member {name!r:.200} is not a (unique) .npy array")
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise CheckpointError(f"{path}: member {name!r:.200} has .npy format "
                                          f"version {version}, which save_npz never writes")
                if any(d < 0 for d in shape):
                    raise CheckpointError(f"{path}: member {name!r:.200} has a negative shape "
                                          f"{shape}")
                if dtype.hasobject:
                    raise CheckpointError(f"{path}: member {name!r:.200} holds Python objects "
                                          "(refused: loading them would unpickle)")
                nbytes = math.prod(shape) * dtype.itemsize
                if info.file_size - member.tell() != nbytes:
                    raise CheckpointError(
                        f"{path}: member {name!r:.200} is corrupt: its header says "
                        f"{dtype}{list(shape)} ({nbytes} bytes) but it holds "
                        f"{info.file_size - member.tell()} bytes of data")
                data = member.read(nbytes)
                if len(data) != nbytes or member.read(1):  # reading to the end checks the CRC
                    raise CheckpointError(f"{path}: member {name!r:.200} is cut short")
            a = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
            out[name[:-4]] = a.copy()  # writable, and owning its memory
    return out
