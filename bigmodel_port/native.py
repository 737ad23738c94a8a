"""bigmodel's own checkpoint format: a parameter tree plus the config that built it.

A tree is a nested ``dict`` of arrays (see ``reference_numpy.tree``); on disk it is flat, each
leaf stored under its ``"/"``-joined path (``"layers/attn/query/kernel"``), the same paths
``reference_numpy.tree`` uses, so file keys, NumPy and JAX trees all read alike.

* ``save_native`` / ``load_native``: one ``.safetensors`` file. Its header metadata (strings)
  holds ``format`` = ``"bigmodel"``, ``format_version``, ``family``, ``config_class`` and
  ``config`` (the config dataclass as JSON), plus caller extras such as BERT's ``head``.
* ``save_npz`` / ``load_npz``: the same tree as an uncompressed ``.npz`` (no safetensors
  needed to read it), with the metadata as JSON in a ``__bigmodel_meta__`` entry. Read with
  ``allow_pickle=False``, so an ``.npz`` can never run code.

Versioning: ``FORMAT_VERSION`` is bumped whenever a change would make an older reader
misinterpret a file; a reader refuses files from a newer version instead of guessing.

dtypes: bfloat16 / float8 leaves (e.g. from jax) are stored as such in ``.safetensors`` and come
back as float32 (exact; numpy has no bfloat16). ``.npz`` cannot hold them portably, so
``save_npz`` widens them to float32 (also exact) before writing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from bigmodel_port.atomic import atomic_write
from bigmodel_port.errors import CheckpointError
from bigmodel_port.weights import read_safetensors, read_safetensors_metadata, write_safetensors
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig
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
_RESERVED_KEYS = ("format", "format_version", "family", "config_class", "config")
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


def _config_from_metadata(cls_name: Any, fields: Any, family: Any, path: Path) -> Config:
    """Rebuild the config dataclass; ``fields`` is its ``asdict`` (a dict, or JSON text)."""
    cls = CONFIG_CLASSES.get(cls_name) if isinstance(cls_name, str) else None
    if cls is None:
        raise CheckpointError(f"{path}: unknown config_class {cls_name!r}; "
                              f"known: {', '.join(CONFIG_CLASSES)}")
    if isinstance(fields, str):
        try:
            fields = json.loads(fields)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: config metadata is not valid JSON ({e})") from None
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
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot build {cls_name} from its config metadata: {e}") from None


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, tensors, metadata)


def load_native(path: str | os.PathLike[str]) -> tuple[Tree, Config, dict[str, str]]:
    """``(tree, config, metadata)`` of a file written by :func:`save_native`.

    ``metadata`` is the whole header metadata (including any extras). The format and version
    are checked before any tensor is read. Raises :class:`CheckpointError` naming the file for a
    foreign or corrupt file, a newer format version, or a config this code cannot build.
    """
    path = Path(path)
    metadata = read_safetensors_metadata(path)
    _check_format(metadata.get("format"), metadata.get("format_version"), path)
    config = _config_from_metadata(metadata.get("config_class"), metadata.get("config"),
                                   metadata.get("family"), path)
    return _unflatten_file(read_safetensors(path), path), config, metadata


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


def load_npz(path: str | os.PathLike[str]) -> tuple[Tree, Config | None, dict[str, Any]]:
    """``(tree, config, metadata)`` of a file written by :func:`save_npz`; ``config`` is None if
    none was saved. Never unpickles. Raises :class:`CheckpointError` naming the file if it is corrupt,
    not ours, or from a newer format version."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file gives a bare array
            raise CheckpointError(f"{path} is a single .npy array, not a bigmodel .npz")
        with loaded as z:
            if _NPZ_META_KEY not in z.files:
                raise CheckpointError(
                    f"{path} is not a bigmodel .npz: it has no {_NPZ_META_KEY!r} entry")
            raw = z[_NPZ_META_KEY]
            if raw.ndim != 0 or raw.dtype.kind != "U":
                raise CheckpointError(f"{path}: {_NPZ_META_KEY!r} is not a unicode string")
            try:
                meta = json.loads(str(raw))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: {_NPZ_META_KEY!r} is not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise CheckpointError(f"{path}: {_NPZ_META_KEY!r} is not a JSON object")
            _check_format(meta.get("format"), meta.get("format_version"), path)
            flat = {k: z[k] for k in z.files if k != _NPZ_META_KEY}
    except (CheckpointError, FileNotFoundError, IsADirectoryError):
        raise
    except MemoryError:
        raise
    except Exception as e:  # BadZipFile, truncated members, pickled object arrays (ValueError)...
        raise CheckpointError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    config = None
    if "config_class" in meta:
        config = _config_from_metadata(meta["config_class"], meta.get("config"),
                                       meta.get("family"), path)
    return _unflatten_file(flat, path), config, meta
