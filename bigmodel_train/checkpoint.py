"""Training-state checkpoints: everything needed to resume a run, in one safetensors file per step.

The trainer writes Orbax steps (``bigmodel_train.orbax_checkpoint``: a directory per step,
``checkpoints/step_{step:08d}/``, sharded and async); this module is the format before that,
still read and written for runs that hold it and for any state dict a user saves. Its
directory functions cover both kinds: :func:`list_checkpoints` / :func:`latest_checkpoint` list
Orbax step directories and files together (at equal steps the directory counts as newer), and
:func:`load_checkpoint` / :func:`verify_checkpoint` / :func:`checkpoint_step` given a step
directory read it through Orbax into the same state dict (loading jax).

A *state* is a dict of anything a trainer carries between steps, for example::

    {"params": tree, "opt_state": opt.init(params), "step": 1200,
     "data": {"epoch": 1, "offset": 5120}, "rng": jax.random.key(0),
     "np_rng": np.random.default_rng(0), "config": GPTConfig(...), "metadata": {...}}

It is stored without pickle: every array goes into the safetensors file under a readable name
(``opt_state/0/mu/layers/attn/query/kernel``), and a JSON *structure* in the file's metadata
describes how to rebuild the containers and scalars around them. Supported values:

* containers: ``dict`` / any ``Mapping`` with string keys, ``list``, ``tuple``, NamedTuples (optax
  and ``reference_numpy.optim`` states), dataclasses (configs);
* arrays: NumPy arrays and scalars, JAX arrays (any dtype safetensors holds, bfloat16 and float8
  included; bit-exact), typed JAX PRNG keys (stored as ``jax.random.key_data`` plus the impl name);
* ``np.random.Generator`` (its ``bit_generator.state``, JSON with 128-bit ints);
* Python ``None``, ``bool``, ``int`` (any size), ``float`` (NaN/inf included), ``str``.

Files: ``run_dir/checkpoints/step_{step:08d}.safetensors``, read and written (bit for bit,
streaming one array at a time) by ``bigmodel_port.weights``, the project's one safetensors reader
and writer. Each is written atomically (``bigmodel_port.atomic``: a temporary ``.step_….tmp`` in
the same directory, fsync, rename, fsync of the directory), so a crash at any moment leaves every
earlier checkpoint intact and never a half-written file under a final name; only after the rename
are old checkpoints pruned. Temporary files left by a killed writer are never taken for
checkpoints and are removed by the next save (so one process at a time may save into a run
directory). Each array carries a CRC-32 in the structure, so a file damaged after it was written
is detected on load, not trained on.

Rebuilding types on load:

* without ``like``, containers come back as saved. A NamedTuple or dataclass is rebuilt as its
  own class only if that class is in the *allow-list*: a fixed table keyed by (module, qualified
  name) of the model configs (``reference_numpy.configs``), ``RunConfig``, the optimizer states of
  ``reference_numpy.optim`` and the optax states our trainer and its tests produce (see
  ``_OPTAX_STATE_NAMES``). Loading never imports a module named by the file: a file is data, and
  must not choose which code runs. optax classes are looked up only when optax is already
  imported, or when ``as_numpy=False`` (which needs jax anyway; optax is then imported by us, by
  its fixed name), so :func:`verify_checkpoint` and ``as_numpy=True`` never import jax. Any other
  NamedTuple comes back as a look-alike ``collections.namedtuple`` and any other dataclass as a
  dict of its fields. Add your own state classes with :func:`register_checkpoint_class` (before
  loading; usable as a class decorator). JAX arrays come back as JAX arrays on the default device
  (``as_numpy=True``: everything as NumPy, keys as their uint32 key data);
* with ``like`` (a state of the expected shape, e.g. the freshly initialised one), every
  container and leaf takes ``like``'s exact type (optax NamedTuples, jax arrays placed with
  ``like``'s sharding, a ``jax.ShapeDtypeStruct`` works as a leaf template), and the structure,
  shapes and dtypes must match -- every mismatch is listed by name. A subtree of ``like`` set
  to :data:`AS_SAVED` is taken from the file as is (handy for free-form metadata). Restored jax
  arrays also keep ``like``'s committed-ness, so jitted steps do not recompile after a resume.

Nesting: containers may nest at most ``MAX_DEPTH`` (64) levels deep; saving a deeper state
raises ValueError, and a file claiming a deeper structure is refused as corrupt (so a crafted
file cannot exhaust the stack).

Checkpoint directories: :func:`list_checkpoints` counts regular files named
``step_<8+ digits>.safetensors`` and symlinks of that name to a regular file (followed; pruning
removes the link, never its target). A dangling symlink, or a directory or other non-file under
such a name, raises :class:`CheckpointError` naming it (during a save's pruning it is warned about
instead, so that a save which has already succeeded does not fail). Our own temporaries
(``.step_….tmp``) are skipped silently; any other entry gets one ``RuntimeWarning`` naming it
("ignored: not a checkpoint").

Limits: arrays are copied to host memory (``np.asarray``) when saved, so in a multi-host run
save from one process with fully addressable (gathered) arrays. An array object referenced twice
(tied weights) is stored, and restored, as two arrays. The header metadata (the structure) is
bounded by safetensors' 100 MB header limit, i.e. some millions of leaves.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import keyword
import numbers
import os
import re
import sys
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.errors import CheckpointError
from bigmodel_port.weights import DTYPE_TAGS, read_safetensors, read_safetensors_metadata, storable_array
from bigmodel_port.weights import write_safetensors

__all__ = [
    "AS_SAVED", "CHECKPOINT_DIR", "FORMAT_NAME", "FORMAT_VERSION", "CheckpointError",
    "checkpoint_path", "checkpoint_step", "deserialize_state", "latest_checkpoint",
    "MAX_DEPTH", "list_checkpoints", "load_checkpoint", "register_checkpoint_class",
    "save_checkpoint", "serialize_state", "verify_checkpoint",
]

FORMAT_NAME = "bigmodel-train-state"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"

_NAME_RE = re.compile(r"step_(\d{8,})\.safetensors")
# What bigmodel_port.atomic names its temporaries: ".<target name>.<12 hex>.tmp".
_TMP_RE = re.compile(r"\.step_\d{8,}\.safetensors\.[0-9a-f]+\.tmp")
# Orbax step directories (bigmodel_train.orbax_checkpoint) and its save temporaries.
_DIR_RE = re.compile(r"step_(\d{8,})")
_ORBAX_TMP_RE = re.compile(r"step_\d{8,}\.orbax-checkpoint-tmp.*")


class _AsSaved:
    """Type of :data:`AS_SAVED`."""

    def __repr__(self) -> str:
        return "AS_SAVED"


AS_SAVED = _AsSaved()
"""Put in ``like`` where a subtree should be restored as saved, without a template."""

MAX_DEPTH = 64
"""Deepest container nesting saved or loaded (a legitimate state nests about a dozen levels)."""

# The allow-list of classes rebuilt by name (module docstring): {(module, qualname): class}.
# Filled lazily (_registry) so importing this module imports no config or optimizer module.
_REGISTRY: dict[tuple[str, str], type] = {}
_REGISTRY_READY = False
# optax state classes, by their public name; looked up as optax.<name> (absent ones are skipped:
# optax versions differ). The trainer's optimizers (bigmodel_jax.optim) produce the first six.
_OPTAX_STATE_NAMES = (
    "EmptyState", "ScaleByAdamState", "ScaleByScheduleState", "TraceState", "MultiStepsState",
    "MaskedState", "MaskedNode", "ScaleByRmsState", "ScaleByRStdDevState", "ScaleByLionState",
    "ScaleByAmsgradState", "ScaleByBeliefState", "InjectHyperparamsState",
    "InjectStatefulHyperparamsState", "ApplyIfFiniteState",
)
_OPTAX_REGISTRY: dict[str, type] | None = None  # qualname -> class; built on first need

_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


# --------------------------------------------------------------------------------------------
# files


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``run_dir/checkpoints/step_{step:08d}.safetensors``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{_check_step(step):08d}.safetensors"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the finished checkpoint files in ``run_dir``, by step.

    Counts regular files named ``step_<digits>.safetensors`` and symlinks of that name to a
    regular file (followed). Raises :class:`CheckpointError` naming a dangling symlink, or a
    directory or other non-file, under such a name (and if ``run_dir/checkpoints`` is not a
    directory). Temporaries of an interrupted save (``.step_….tmp``) are skipped silently; every
    other entry is skipped with a ``RuntimeWarning`` naming it. Nothing is read.
    """
    return _listed(run_dir, stacklevel=4)


def _listed(run_dir: str | os.PathLike[str], stacklevel: int) -> list[tuple[int, Path]]:
    """:func:`list_checkpoints`, warning at ``stacklevel`` (counted from here)."""
    found, problems, foreign = _scan(Path(run_dir) / CHECKPOINT_DIR)
    _warn_foreign(foreign, stacklevel=stacklevel)
    if problems:
        raise CheckpointError("; ".join(problems))
    return found


def _scan(directory: Path) -> tuple[list[tuple[int, Path]], list[str], list[str]]:
    """``(checkpoints by step, problems, foreign entries)`` of a checkpoint directory: problems
    are entries named like a checkpoint that are not (readable) checkpoints; foreign entries are
    neither ours nor checkpoints. Orbax step directories (``step_<digits>/``) and files of the
    earlier format (``step_<digits>.safetensors``) are both checkpoints; at equal steps the
    directory sorts last (it is the newer format)."""
    if not directory.exists() and not directory.is_symlink():
        return [], [], []
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (it should hold the run's "
                              "checkpoints)")
    found, problems, foreign = [], [], []
    for entry in os.scandir(directory):
        d = _DIR_RE.fullmatch(entry.name)
        if d is not None:
            if is_orbax_step(Path(entry.path)):
                found.append((int(d.group(1)), Path(entry.path)))
            else:
                problems.append(f"{entry.path} is not a complete checkpoint (no meta/; remove it)")
            continue
        m = _NAME_RE.fullmatch(entry.name)
        if m is None:
            if not (_TMP_RE.fullmatch(entry.name) or _ORBAX_TMP_RE.fullmatch(entry.name)):
                foreign.append(entry.path)
            continue
        try:
            is_file = entry.is_file(follow_symlinks=True)  # a regular file, or a symlink to one
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:  # a symlink loop, say
            is_file = is_dir = False
        if is_file:
            found.append((int(m.group(1)), Path(entry.path)))
        elif entry.is_symlink():
            target = os.readlink(entry.path)
            what = "a directory" if is_dir else "nothing (dangling or unreachable)"
            problems.append(f"{entry.path} is a symlink to {target}, which is {what}; not a "
                            "checkpoint file (remove it or point it at a checkpoint)")
        else:
            kind = "a directory" if is_dir else "not a regular file"
            problems.append(f"{entry.path} is {kind}, not a checkpoint file (remove or rename it)")
    return sorted(found, key=lambda sp: (sp[0], sp[1].is_dir())), problems, sorted(foreign)


def is_orbax_step(path: Path) -> bool:
    """An Orbax step directory of ours (``step_<digits>/`` holding the ``meta`` item)."""
    return path.is_dir() and (path / "meta").is_dir()


def _warn_foreign(foreign: list[str], stacklevel: int) -> None:
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10
                                           else "")
        warnings.warn(f"ignored: not a checkpoint: {shown}", RuntimeWarning,
                      stacklevel=stacklevel)


def latest_checkpoint(run_dir: str | os.PathLike[str], *, valid_only: bool = False
                      ) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or None if there is none.

    ``valid_only=True`` also reads and checks it (header, structure, every array's checksum;
    see :func:`verify_checkpoint`) and, if it is corrupt, warns and falls back to the next
    newest, and so on.
    """
    found = _listed(run_dir, stacklevel=4)
    if not valid_only:
        return found[-1][1] if found else None
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint {path} ({e}); trying an earlier one",
                          RuntimeWarning, stacklevel=2)
            continue
        return path
    return None


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a checkpoint was saved at (reads only the file's header)."""
    path = Path(path)
    if path.is_dir():
        return int(_orbax().read_meta(path)["step"])
    meta = _checked_metadata(path)
    try:
        return _check_step(int(meta["step"]))
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: metadata has no valid 'step' entry") from None


def save_checkpoint(run_dir: str | os.PathLike[str], state: Mapping[str, Any], step: int,
                    keep_last: int | None = 3) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; return its path.

    ``state``: a dict of anything listed in the module docstring (if it has a ``"step"`` entry it
    must equal ``step``). An existing checkpoint of the same step is replaced atomically. After
    the new file is in place, checkpoints are pruned to the ``keep_last`` highest steps (None
    keeps all); the file just written is never pruned, even when later steps exist (a run
    restarted from an earlier checkpoint -- a warning says that ``latest_checkpoint`` will still
    pick the later one).
    """
    step = _check_step(step)
    if keep_last is not None and (isinstance(keep_last, bool)
                                  or not isinstance(keep_last, numbers.Integral) or keep_last < 1):
        raise ValueError(f"keep_last must be an integer >= 1 or None, got {keep_last!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, not {type(state).__name__}")
    if "step" in state and _as_int(state["step"]) != step:
        raise ValueError(f"state['step'] = {state['step']!r} but step = {step}")
    arrays, structure = serialize_state(state)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "step": str(step),
                "structure": json.dumps(structure, separators=(",", ":"))}
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    write_safetensors(path, arrays, metadata)
    _prune(run_dir, step, keep_last)
    return path


def _as_int(x: Any) -> int | None:
    """An integer scalar (Python, NumPy or a 0-d JAX array) as int; None for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    a = np.asarray(x) if hasattr(x, "dtype") else None
    return int(a) if a is not None and a.ndim == 0 and a.dtype.kind in "iu" else None


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete what a killed save left behind (complete or not, a temporary is never used)."""
    for entry in os.scandir(directory):
        if _TMP_RE.fullmatch(entry.name):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _prune(run_dir: str | os.PathLike[str], step: int, keep_last: int | None) -> None:
    # The save has succeeded by now: entries that list_checkpoints refuses are warned about
    # (still named, never silent) rather than failing it.
    found, problems, foreign = _scan(Path(run_dir) / CHECKPOINT_DIR)
    _warn_foreign(foreign, stacklevel=4)
    for problem in problems:
        warnings.warn(f"{problem}; it is not pruned", RuntimeWarning, stacklevel=3)
    later = sorted({s for s, _ in found if s > step})
    if later:
        warnings.warn(f"{Path(run_dir) / CHECKPOINT_DIR} holds checkpoints of later steps "
                      f"{later} than the one just saved ({step}); latest_checkpoint returns the "
                      "highest step", RuntimeWarning, stacklevel=3)
    if keep_last is None:
        return
    files = [(s, p) for s, p in found if not p.is_dir()]  # Orbax prunes its own steps
    for s, p in files[:-keep_last]:
        if s != step:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------
# state <-> (arrays, structure)


def _jax_module() -> Any:
    """jax if it is already imported (a jax value cannot exist otherwise), else None."""
    return sys.modules.get("jax")


def _is_jax_array(x: Any) -> bool:
    jax = _jax_module()
    return jax is not None and isinstance(x, jax.Array)


def _is_typed_key(x: Any) -> bool:
    jax = _jax_module()
    return _is_jax_array(x) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(a.reshape(-1).view(np.uint8)) if a.size else 0


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _name(self, path: tuple[str, ...]) -> str:
        """A unique tensor name for ``path``; a clash (keys holding "/") gets a "#n" suffix."""
        base = "/".join(path) or "<root>"
        name, n = base, 1
        while name in self.arrays or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        return name

    def array(self, a: np.ndarray, path: tuple[str, ...], kind: str) -> dict[str, Any]:
        a = storable_array(a, "/".join(path))  # TypeError naming the path for a dtype it cannot hold
        name = self._name(path)
        self.arrays[name] = a
        return {"t": "array", "kind": kind, "name": name, "dtype": a.dtype.name,
                "shape": list(a.shape), "crc32": _crc32(a)}

    def encode(self, x: Any, path: tuple[str, ...]) -> dict[str, Any]:
        where = "/".join(path) or "<root>"
        if len(path) > MAX_DEPTH:  # the reader refuses deeper files; never write one
            raise ValueError(f"cannot checkpoint the value at {where[:200]!r}: containers nest "
                             f"deeper than {MAX_DEPTH} levels")
        if x is None:
            return {"t": "none"}
        if _is_jax_array(x):
            if _is_typed_key(x):
                jax = _jax_module()
                node = self.array(np.asarray(jax.random.key_data(x)), path, "jax")
                return {"t": "jax_key", "impl": str(jax.random.key_impl(x)), "data": node}
            return self.array(np.asarray(x), path, "jax")
        if isinstance(x, np.ndarray):
            return self.array(x, path, "numpy")
        if isinstance(x, np.generic) and x.dtype.name in DTYPE_TAGS:
            return self.array(np.asarray(x), path, "numpy_scalar")
        if isinstance(x, bool):
            return {"t": "bool", "v": x}
        if isinstance(x, int):
            return {"t": "int", "v": int(x)}
        if isinstance(x, float):
            return {"t": "float", "v": float(x)}
        if isinstance(x, str):
            return {"t": "str", "v": str(x)}
        if isinstance(x, np.random.Generator):
            state = x.bit_generator.state
            return {"t": "np_generator", "state": self.encode(state, (*path, "bit_generator"))}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            fields = {f.name: self.encode(getattr(x, f.name), (*path, f.name))
                      for f in dataclasses.fields(x)}
            return {"t": "dataclass", "module": cls.__module__, "class": cls.__qualname__,
                    "fields": fields}
        if isinstance(x, tuple) and hasattr(type(x), "_fields"):
            cls = type(x)
            items = [self.encode(v, (*path, f)) for f, v in zip(cls._fields, x)]
            return {"t": "namedtuple", "module": cls.__module__, "class": cls.__qualname__,
                    "fields": list(cls._fields), "items": items}
        if isinstance(x, (tuple, list)):
            items = [self.encode(v, (*path, str(i))) for i, v in enumerate(x)]
            return {"t": "tuple" if isinstance(x, tuple) else "list", "items": items}
        if isinstance(x, Mapping):
            keys = list(x)
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise TypeError(f"cannot checkpoint the dict at {where!r}: key {bad[0]!r} is not "
                                "a string")
            return {"t": "dict", "keys": keys,
                    "items": [self.encode(x[k], (*path, k)) for k in keys]}
        raise TypeError(f"cannot checkpoint the value at {where!r}: {type(x).__name__} is not an "
                        "array, scalar, string, None, dict, list, tuple, NamedTuple, dataclass, "
                        "JAX PRNG key or np.random.Generator")


def serialize_state(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, structure)``: every array of ``state`` by name, and the JSON-able description
    that :func:`deserialize_state` rebuilds ``state`` from. Used by :func:`save_checkpoint`."""
    enc = _Encoder()
    structure = enc.encode(state, ())
    return enc.arrays, structure


def _state_class_kind(cls: Any) -> str | None:
    """"namedtuple" / "dataclass" for a class the checkpoint format rebuilds by name, else None."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return "namedtuple"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    return None


def register_checkpoint_class(cls: type) -> type:
    """Add a NamedTuple or dataclass type to the classes that loading rebuilds by name (without
    it, a state of ``cls`` loads as a look-alike namedtuple / a dict of its fields). Returns
    ``cls``, so it works as a class decorator. Registering the same class again is a no-op; a
    different class under the same module and qualified name raises ValueError."""
    if _state_class_kind(cls) is None:
        raise TypeError(f"register_checkpoint_class takes a NamedTuple or dataclass type, not "
                        f"{cls!r}")
    key = (cls.__module__, cls.__qualname__)
    registry = _registry()
    if registry.get(key, cls) is not cls:
        raise ValueError(f"another class is already registered as {key[0]}.{key[1]}")
    registry[key] = cls
    return cls


def _registry() -> dict[tuple[str, str], type]:
    """The allow-list without optax: our configs and the reference optimizer states."""
    global _REGISTRY_READY
    if not _REGISTRY_READY:
        from bigmodel_train.config import RunConfig  # lazily: config imports more than we need
        from reference_numpy import configs as ref_configs
        from reference_numpy import optim as ref_optim

        classes = [ref_configs.BertConfig, ref_configs.GPTConfig, ref_configs.Seq2SeqConfig,
                   ref_configs.ViTConfig, RunConfig, ref_optim.EmptyState,
                   ref_optim.ScaleByScheduleState, ref_optim.TraceState,
                   ref_optim.ScaleByAdamState, ref_optim.AddDecayedWeightsState,
                   ref_optim.MultiStepsState]
        for cls in classes:
            _REGISTRY.setdefault((cls.__module__, cls.__qualname__), cls)
        _REGISTRY_READY = True
    return _REGISTRY


def _optax_registry(import_optax: bool) -> dict[str, type]:
    """optax's state classes by qualified name; empty unless optax is imported or may be
    (``import_optax``: the caller builds jax values anyway). Only the fixed name "optax" is ever
    imported here, never one read from a file."""
    global _OPTAX_REGISTRY
    if _OPTAX_REGISTRY is None:
        optax = sys.modules.get("optax")
        if optax is None and import_optax:
            try:
                import optax
            except ImportError:
                optax = None
        if optax is None:
            return {}
        table = {}
        for name in _OPTAX_STATE_NAMES:
            cls = getattr(optax, name, None)
            if _state_class_kind(cls) is not None:
                table[cls.__qualname__] = cls
        _OPTAX_REGISTRY = table
    return _OPTAX_REGISTRY


def _resolve_class(module: Any, qualname: Any, kind: str, *, allow_jax: bool = True
                   ) -> type | None:
    """The allow-listed class a file names by (module, qualname), or None (a stand-in is then
    used). Pure look-up: nothing named by the file is imported. ``allow_jax=False``: optax
    classes only if optax is already imported."""
    if not (isinstance(module, str) and isinstance(qualname, str)):
        return None
    cls = _registry().get((module, qualname))
    if cls is None and (module == "optax" or module.startswith("optax.")):
        # by name within optax: its classes move between private modules across releases
        cls = _optax_registry(import_optax=allow_jax).get(qualname)
    return cls if cls is not None and _state_class_kind(cls) == kind else None


class _Decoder:
    """Rebuilds a state from its structure and arrays, optionally guided by ``like``."""

    def __init__(self, arrays: Mapping[str, np.ndarray], file: Path | None, *, as_numpy: bool
                 ) -> None:
        self.arrays = arrays
        self.file = file
        self.as_numpy = as_numpy
        self.mismatches: list[str] = []
        self.depth = 0  # containers entered; bounded by MAX_DEPTH (a crafted file may nest deeper)

    # -- helpers ------------------------------------------------------------------------------

    def corrupt(self, what: str) -> CheckpointError:
        prefix = f"{self.file}: " if self.file is not None else ""
        return CheckpointError(f"{prefix}corrupt checkpoint: {what}")

    def node_field(self, node: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(node, dict) or not isinstance(node.get(key), types):
            raise self.corrupt(f"structure entry at {where!r} lacks a valid {key!r}")
        return node[key]

    def mismatch(self, where: str, msg: str) -> None:
        self.mismatches.append(f"{where}: {msg}")

    def stored_array(self, node: dict[str, Any], where: str) -> np.ndarray:
        """The array a structure node names, checked against its recorded dtype, shape, CRC."""
        name = self.node_field(node, "name", str, where)
        dtype = self.node_field(node, "dtype", str, where)
        shape = tuple(self.node_field(node, "shape", list, where))
        expected = where or "<root>"  # as the encoder names it (a top-level key "" included)
        base, _, n = name.rpartition("#")
        if name != expected and not (base == expected and n.isdigit()):
            # the encoder names each array by its path: a renamed key or field would otherwise
            # move an array to another place in the state without any error
            raise self.corrupt(f"array {name[:200]!r} is stored for {where[:200]!r}")
        if name not in self.arrays:
            raise self.corrupt(f"array {name!r} (for {where!r}) is missing from the file")
        if dtype not in DTYPE_TAGS:
            raise self.corrupt(f"array {name!r} has unknown dtype {dtype!r}")
        a = self.arrays[name]
        if a.dtype.name != dtype or a.shape != shape:
            raise self.corrupt(f"array {name!r} is {a.dtype}{list(a.shape)} in the file but the "
                               f"structure says {dtype}{list(shape)}")
        crc = node.get("crc32")
        if crc is not None and _crc32(a if a.flags.c_contiguous else a.copy(order="C")) != crc:
            raise self.corrupt(f"array {name!r} fails its CRC-32 check (the data was damaged "
                               "after it was written)")
        return a

    def wrap_key(self, data: np.ndarray, impl: str, like: Any, where: str) -> Any:
        """A typed JAX PRNG key from its key data; a bad impl name or data shape is corrupt."""
        import jax

        try:
            return jax.random.wrap_key_data(self.to_jax(data, like), impl=impl)
        except (TypeError, ValueError, KeyError) as e:
            raise self.corrupt(f"JAX PRNG key at {where!r} (impl {impl[:50]!r}) cannot be "
                               f"rebuilt ({str(e)[:200]})") from None

    def to_jax(self, a: np.ndarray, like: Any = None) -> Any:
        import jax  # lazy: only states saved from jax (or a jax `like`) need it

        # Follow like's placement, committed-ness included: jit's cache keys on it, so a
        # committed copy of an uncommitted array would recompile every jitted step once.
        sharding = getattr(like, "sharding", None)
        if sharding is None or getattr(like, "committed", True) is False:
            return jax.device_put(a)
        return jax.device_put(a, sharding)

    # -- without like -------------------------------------------------------------------------

    def enter(self, where: str) -> None:
        self.depth += 1
        # a little slack over the encoder's bound: the root, and a generator's decode_like that
        # re-enters decode, add levels without adding path components
        if self.depth > MAX_DEPTH + 4:
            raise self.corrupt(f"the structure nests deeper than {MAX_DEPTH} levels at "
                               f"{where[:200]!r}")

    def decode(self, node: Any, where: str) -> Any:
        self.enter(where)
        try:
            return self.decode_node(node, where)
        finally:
            self.depth -= 1

    def decode_node(self, node: Any, where: str) -> Any:
        t = self.node_field(node, "t", str, where)
        if t == "none":
            return None
        if t in ("bool", "int", "float", "str"):
            v = node.get("v")
            expected = {"bool": bool, "int": int, "float": (float, int), "str": str}[t]
            if not isinstance(v, expected) or (t == "int" and isinstance(v, bool)):
                raise self.corrupt(f"{t} value at {where!r} is {v!r:.200}")
            if t == "float" and isinstance(v, int):
                try:
                    return float(v)
                except OverflowError:  # an int beyond float range: no float was written so
                    raise self.corrupt(f"float value at {where!r} is out of range") from None
            return v
        if t == "array":
            a = self.stored_array(node, where)
            kind = node.get("kind")
            if kind == "numpy_scalar":
                return a[()]
            if kind == "jax" and not self.as_numpy:
                return self.to_jax(a)
            return a
        if t == "jax_key":
            data = self.stored_array(self.node_field(node, "data", dict, where), where)
            if self.as_numpy:
                return data
            impl = self.node_field(node, "impl", str, where)
            return self.wrap_key(data, impl, None, where)
        if t == "np_generator":
            return self.generator(self.decode(self.node_field(node, "state", dict, where),
                                              _join(where, "bit_generator")), where)
        if t in ("list", "tuple"):
            items = [self.decode(v, _join(where, str(i)))
                     for i, v in enumerate(self.node_field(node, "items", list, where))]
            return items if t == "list" else tuple(items)
        if t == "dict":
            keys, items = self.dict_parts(node, where)
            return {k: self.decode(v, _join(where, k)) for k, v in zip(keys, items)}
        if t == "namedtuple":
            fields = self.node_field(node, "fields", list, where)
            items = [self.decode(v, _join(where, f)) for f, v in
                     zip(fields, self.node_field(node, "items", list, where))]
            if len(items) != len(fields) or not _valid_field_names(fields):
                raise self.corrupt(f"namedtuple at {where!r} has malformed fields")
            cls = _resolve_class(node.get("module"), node.get("class"), "namedtuple",
                                 allow_jax=not self.as_numpy)
            if cls is None or tuple(cls._fields) != tuple(fields):
                name = str(node.get("class", "State")).rsplit(".", 1)[-1]
                usable = name.isidentifier() and not keyword.iskeyword(name)
                cls = collections.namedtuple(name if usable else "State", fields)
            return cls(*items)
        if t == "dataclass":
            raw = self.node_field(node, "fields", dict, where)
            values = {k: self.decode(v, _join(where, k)) for k, v in raw.items()}
            cls = _resolve_class(node.get("module"), node.get("class"), "dataclass",
                                 allow_jax=not self.as_numpy)
            if cls is None:
                return values
            return self.build_dataclass(cls, values, where)
        raise self.corrupt(f"unknown structure entry type {t!r} at {where!r}")

    def dict_parts(self, node: dict[str, Any], where: str) -> tuple[list[str], list[Any]]:
        keys = self.node_field(node, "keys", list, where)
        items = self.node_field(node, "items", list, where)
        if len(keys) != len(items) or not all(isinstance(k, str) for k in keys) \
                or len(set(keys)) != len(keys):
            raise self.corrupt(f"dict at {where!r} has malformed keys")
        return keys, items

    def generator(self, state: Any, where: str) -> np.random.Generator:
        name = state.get("bit_generator") if isinstance(state, dict) else None
        if name not in _BIT_GENERATORS:
            raise self.corrupt(f"np.random.Generator at {where!r} names an unknown bit "
                               f"generator {name!r}")
        gen = np.random.Generator(getattr(np.random, name)())
        try:
            gen.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise self.corrupt(f"np.random.Generator state at {where!r} is invalid "
                               f"({str(e)[:200]})") from None
        return gen

    def build_dataclass(self, cls: type, values: dict[str, Any], where: str) -> Any:
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{self.file}: {cls.__name__} at {where!r} has no fields "
                                  f"{unknown} (written by a newer or modified version?)")
        try:
            return cls(**{k: v for k, v in values.items() if k in init})
        except Exception as e:  # a constructor's own validation, whatever it raises
            raise CheckpointError(f"{self.file}: cannot rebuild {cls.__name__} at {where!r}: "
                                  f"{type(e).__name__}: {str(e)[:300]}") from None

    # -- with like ----------------------------------------------------------------------------

    def decode_like(self, node: Any, like: Any, where: str) -> Any:
        """``node`` rebuilt with ``like``'s types; mismatches are recorded, not raised, so that
        they can all be listed at once (the returned value is then meaningless)."""
        self.enter(where)
        try:
            return self.decode_like_node(node, like, where)
        finally:
            self.depth -= 1

    def decode_like_node(self, node: Any, like: Any, where: str) -> Any:
        if like is AS_SAVED:
            return self.decode(node, where)
        t = self.node_field(node, "t", str, where)
        jax = _jax_module()
        if t == "array":
            return self.array_like(node, like, where)
        if t == "jax_key":
            if not _is_typed_key(like):
                self.mismatch(where, f"a JAX PRNG key in the checkpoint, {_describe(like)} "
                                     "expected")
                return like
            impl = self.node_field(node, "impl", str, where)
            if impl != str(jax.random.key_impl(like)):
                self.mismatch(where, f"key impl {impl} in the checkpoint, "
                                     f"{jax.random.key_impl(like)} expected")
                return like
            data = self.stored_array(self.node_field(node, "data", dict, where), where)
            expected = jax.random.key_data(like)
            if data.shape != expected.shape:
                self.mismatch(where, f"key data shape {data.shape}, {expected.shape} expected")
                return like
            return self.wrap_key(data, impl, like, where)
        if t == "np_generator":
            if not isinstance(like, np.random.Generator):
                self.mismatch(where, f"np.random.Generator in the checkpoint, {_describe(like)} "
                                     "expected")
                return like
            gen = self.decode(node, where)
            if type(gen.bit_generator) is not type(like.bit_generator):
                self.mismatch(where, f"bit generator {type(gen.bit_generator).__name__} in the "
                                     f"checkpoint, {type(like.bit_generator).__name__} expected")
            return gen
        if t in ("none", "bool", "int", "float", "str"):
            value = self.decode(node, where)
            if type(value) is not type(like):
                self.mismatch(where, f"{_describe(value)} in the checkpoint, {_describe(like)} "
                                     "expected")
            return value
        if t == "dict":
            if not isinstance(like, Mapping):
                self.mismatch(where, f"dict in the checkpoint, {_describe(like)} expected")
                return like
            keys, items = self.dict_parts(node, where)
            saved = dict(zip(keys, items))
            missing = [k for k in like if k not in saved]
            extra = [k for k in keys if k not in like]
            if missing:
                self.mismatch(where, f"keys missing from the checkpoint: {missing}")
            if extra:
                self.mismatch(where, f"keys in the checkpoint but not expected: {extra}")
            out = {k: self.decode_like(saved[k], like[k], _join(where, k))
                   for k in like if k in saved}
            return out if type(like) is dict else _rebuild_mapping(like, out)
        if t in ("list", "tuple", "namedtuple"):
            items = self.node_field(node, "items", list, where)
            is_nt = isinstance(like, tuple) and hasattr(type(like), "_fields")
            if t == "namedtuple":
                fields = self.node_field(node, "fields", list, where)
                name = str(node.get("class", "")).rsplit(".", 1)[-1]
                if not is_nt or tuple(type(like)._fields) != tuple(fields) \
                        or type(like).__name__ != name:
                    self.mismatch(where, f"{name}{tuple(fields)} in the checkpoint, "
                                         f"{_describe(like)} expected")
                    return like
                labels = fields
            else:
                expected_type = list if t == "list" else tuple
                if is_nt or not isinstance(like, expected_type):
                    self.mismatch(where, f"{t} in the checkpoint, {_describe(like)} expected")
                    return like
                if len(like) != len(items):
                    self.mismatch(where, f"{t} of length {len(items)} in the checkpoint, "
                                         f"{len(like)} expected")
                    return like
                labels = [str(i) for i in range(len(items))]
            values = [self.decode_like(v, lk, _join(where, lab))
                      for v, lk, lab in zip(items, like, labels)]
            if is_nt:
                return type(like)(*values)
            return type(like)(values)
        if t == "dataclass":
            if not (dataclasses.is_dataclass(like) and not isinstance(like, type)):
                self.mismatch(where, f"dataclass {node.get('class')} in the checkpoint, "
                                     f"{_describe(like)} expected")
                return like
            name = str(node.get("class", "")).rsplit(".", 1)[-1]
            if type(like).__name__ != name:
                self.mismatch(where, f"dataclass {name} in the checkpoint, "
                                     f"{type(like).__name__} expected")
                return like
            raw = self.node_field(node, "fields", dict, where)
            values = {}
            for f in dataclasses.fields(like):
                if f.name in raw:
                    values[f.name] = self.decode_like(raw[f.name], getattr(like, f.name),
                                                      _join(where, f.name))
            # fields added to the class since the file was written keep like's values
            extra = sorted(set(raw) - set(values))
            if extra:
                self.mismatch(where, f"fields in the checkpoint but not in "
                                     f"{type(like).__name__}: {extra}")
                return like
            return self.build_dataclass(type(like), {**{f.name: getattr(like, f.name) for f in
                                                        dataclasses.fields(like)}, **values},
                                        where)
        raise self.corrupt(f"unknown structure entry type {t!r} at {where!r}")

    def array_like(self, node: dict[str, Any], like: Any, where: str) -> Any:
        jax = _jax_module()
        is_struct = jax is not None and isinstance(like, jax.ShapeDtypeStruct)
        if not (isinstance(like, (np.ndarray, np.generic)) or _is_jax_array(like) or is_struct):
            self.mismatch(where, f"an array in the checkpoint, {_describe(like)} expected")
            return like
        if _is_typed_key(like):
            self.mismatch(where, "a plain array in the checkpoint, a JAX PRNG key expected")
            return like
        a = self.stored_array(node, where)
        shape, dtype = tuple(np.shape(like)), np.dtype(like.dtype)
        if a.shape != shape or a.dtype != dtype:
            self.mismatch(where, f"{a.dtype}{list(a.shape)} in the checkpoint, "
                                 f"{dtype}{list(shape)} expected")
            return like
        if isinstance(like, np.generic):
            return a[()]
        if isinstance(like, np.ndarray):
            return a
        return self.to_jax(a, like)


def _valid_field_names(fields: list[Any]) -> bool:
    """What ``collections.namedtuple`` accepts without renaming (so the stand-in can be built)."""
    return (all(isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f)
                and not f.startswith("_") for f in fields) and len(set(fields)) == len(fields))


def _join(where: str, key: str) -> str:
    return key if where == "<root>" else f"{where}/{key}"


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} {x.dtype}{list(np.shape(x))}"
    return type(x).__name__


def _rebuild_mapping(like: Mapping[str, Any], values: dict[str, Any]) -> Any:
    """``values`` as ``like``'s mapping type (e.g. a flax FrozenDict), or a dict if it cannot be
    built from one."""
    try:
        return type(like)(values)
    except Exception:
        return values


def deserialize_state(arrays: Mapping[str, np.ndarray], structure: Mapping[str, Any],
                      like: Any = None, *, as_numpy: bool = False) -> Any:
    """Inverse of :func:`serialize_state`; ``like`` / ``as_numpy`` as in :func:`load_checkpoint`.
    Raises :class:`CheckpointError` listing every mismatch against ``like``."""
    return _deserialize(arrays, structure, like, as_numpy=as_numpy, file=None)


def _deserialize(arrays: Mapping[str, np.ndarray], structure: Any, like: Any, *,
                 as_numpy: bool, file: Path | None) -> Any:
    dec = _Decoder(arrays, file, as_numpy=as_numpy)
    if like is None:
        return dec.decode(structure, "<root>")
    out = dec.decode_like(structure, like, "<root>")
    if dec.mismatches:
        where = f"{file}" if file is not None else "checkpoint"
        raise CheckpointError(
            f"{where} does not match the expected state ({len(dec.mismatches)} "
            f"mismatch{'es' if len(dec.mismatches) > 1 else ''}):\n  "
            + "\n  ".join(dec.mismatches))
    return out


# --------------------------------------------------------------------------------------------
# reading


def _checked_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a checkpoint file, after checking format and version."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint "
                              "(latest_checkpoint(run_dir) finds the newest)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta = read_safetensors_metadata(path)  # CheckpointError naming the file if corrupt
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a training checkpoint: its format is {fmt!r}, not "
                              f"{FORMAT_NAME!r}" + (" (a model file: read it with "
                                                    "bigmodel_port.native.load_native)"
                                                    if fmt == "bigmodel" else ""))
    if not (isinstance(version, str) and version.isdigit() and int(version) >= 1):
        raise CheckpointError(f"{path}: unknown format_version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer bigmodel (training checkpoint "
                              f"format {version}; this one reads <= {FORMAT_VERSION}); upgrade "
                              "bigmodel to load it")
    return meta


def _read(path: Path) -> tuple[dict[str, str], Any, dict[str, np.ndarray]]:
    meta = _checked_metadata(path)
    try:
        structure = json.loads(meta["structure"])
    except KeyError:
        raise CheckpointError(f"{path}: metadata has no 'structure' entry") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than int() takes
        raise CheckpointError(f"{path}: the 'structure' metadata is not valid JSON "
                              f"({str(e)[:200]})") from None
    except RecursionError:  # json's own nesting guard; our decoder bounds depth at MAX_DEPTH
        raise CheckpointError(f"{path}: corrupt checkpoint: the 'structure' metadata nests too "
                              f"deeply (more than {MAX_DEPTH} levels are never written)") from None
    if not isinstance(structure, dict) or structure.get("t") != "dict":
        raise CheckpointError(f"{path}: the 'structure' metadata does not describe a dict")
    return meta, structure, read_safetensors(path, widen=False)  # bf16 / fp8 kept bit for bit


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it is a complete, intact checkpoint:
    a valid header of this format, a structure whose every array is in the file with the
    recorded dtype, shape and CRC-32. For a file of this format it builds no JAX values (works
    without jax installed); an Orbax step directory is read whole through Orbax (loads jax)."""
    path = Path(path)
    if path.is_dir():
        _orbax().read_state(path)
        return
    _, structure, arrays = _read(path)
    _deserialize(arrays, structure, None, as_numpy=True, file=path)


def load_checkpoint(path: str | os.PathLike[str], like: Any = None, *,
                    as_numpy: bool = False) -> dict[str, Any]:
    """The state dict saved in the checkpoint file ``path`` (or Orbax step directory: then read
    whole, without ``like``; restore onto shardings with ``orbax_checkpoint.read_state``).

    ``like``: optional template state; the result then has ``like``'s exact container and leaf
    types (see the module docstring), and any difference in structure, shape or dtype raises
    :class:`CheckpointError` listing every mismatch by name. ``as_numpy=True`` returns NumPy
    arrays in place of JAX ones (ignored where ``like`` asks for JAX arrays).
    Raises :class:`CheckpointError` naming the file if it is corrupt, truncated, not a training
    checkpoint, or from a newer format version.
    """
    path = Path(path)
    if path.is_dir():
        if like is not None:
            raise ValueError(f"{path} is an Orbax step directory: restore it onto templates with "
                             "bigmodel_train.orbax_checkpoint.read_state(path, targets)")
        state = _orbax().read_state(path)
        if not as_numpy:
            import jax.numpy as jnp

            state = _map_arrays(state, jnp.asarray)
        return state
    _, structure, arrays = _read(path)
    return _deserialize(arrays, structure, like, as_numpy=as_numpy, file=path)


def _orbax() -> Any:
    """``bigmodel_train.orbax_checkpoint``, imported on first use (it loads jax and orbax)."""
    from bigmodel_train import orbax_checkpoint

    return orbax_checkpoint


def _map_arrays(node: Any, fn: Any) -> Any:
    if isinstance(node, dict):
        return {k: _map_arrays(v, fn) for k, v in node.items()}
    return fn(node) if isinstance(node, np.ndarray) else node
