"""Training checkpoints on Orbax: a ``CheckpointManager`` with async saves and keep-last-N, on
sharded arrays, in every process of a multi-host run.

A training *state* (``trainer._checkpoint_state``) is a dict such as::

    {"run_id": "...", "artifacts": "...", "step": 200, "data_position": {...},
     "rng": {"seed": 0, "key_data": uint32 (2,)}, "config": {...}, "model_config": {...},
     "params": tree of arrays, "opt_state": {"0/mu/embed/embedding": array, ...}}

It is split in two Orbax items of one step directory, ``RUN_DIR/checkpoints/step_{step:08d}/``:

    state/   every array leaf (``StandardSave``: OCDBT + Zarr via TensorStore). Sharded
             ``jax.Array``s are written shard by shard by the processes that hold them, so no
             process ever gathers a whole model; NumPy arrays (the reference backend) too.
    meta/    everything else, as JSON (``JsonSave``, written by process 0): step, data position,
             configs, run identity, this format's name and version, and a CRC-32 of every array
             (see below).

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices (so the
next step may donate their buffers), and a background thread writes them. Orbax writes into
``step_….orbax-checkpoint-tmp-…`` and renames it to its final name only when every item is
complete, so a process killed mid-save (SIGKILL included) leaves every earlier step intact and
never a half-written step under a final name; the manager removes such temporaries the next
time it opens the directory. ``keep_last`` is Orbax's ``max_to_keep``.

Restoring takes *targets*: a tree of ``jax.ShapeDtypeStruct`` with the shardings wanted now, or
NumPy arrays. A state saved on mesh A is read straight onto mesh B, or one device, bit for bit
(TensorStore reads each device's slice of the stored whole array).

Integrity: TensorStore checks none of the bytes it reads, so the meta item keeps a CRC-32 of each
array, computed on the host at save time when the array is fully addressable (one process; on
a multi-host run, where no process sees every shard, the sums are omitted and integrity rests
on the filesystem). ``restore`` compares them and raises :class:`CheckpointError` naming the
step directory and the array on any difference.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.errors import CheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "RunCheckpoints", "is_step_dir", "read_state", "step_dir"]

FORMAT_NAME = "bigmodel-train-state-orbax"
FORMAT_VERSION = 1
STEP_PREFIX = "step"
STEP_DIGITS = 8
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's own marker (atomicity.TMP_DIR_SUFFIX)
# State entries whose values are flat "a/b/c"-keyed dicts (optimizer states): stored nested,
# because Orbax turns dict keys into storage paths.
_FLAT_ENTRIES = ("opt_state", "opt_state_ref")


def step_dir(checkpoints: str | os.PathLike[str], step: int) -> Path:
    """``checkpoints/step_{step:08d}`` (Orbax's standard name format with our prefix)."""
    return Path(checkpoints) / f"{STEP_PREFIX}_{step:0{STEP_DIGITS}d}"


def is_step_dir(path: Path) -> bool:
    """True for a finished Orbax step directory (not a temporary of an interrupted save)."""
    return path.is_dir() and TMP_SUFFIX not in path.name and (path / "meta").is_dir()


# --------------------------------------------------------------------------------------------
# state dict <-> (arrays, meta)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith(("jax", "jaxlib"))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)``: the array leaves (nested dicts) and everything else (JSON values)."""
    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {}

    def walk(node: Any, a: dict[str, Any], m: dict[str, Any]) -> None:
        for key, value in node.items():
            if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
                raise ValueError(f"state keys must be plain strings, got {key!r}")
            if _is_array(value):
                a[key] = value
            elif isinstance(value, Mapping):
                a_sub: dict[str, Any] = {}
                m_sub: dict[str, Any] = {}
                walk(value, a_sub, m_sub)
                if a_sub:
                    a[key] = a_sub
                if m_sub or not a_sub:
                    m[key] = m_sub
            elif isinstance(value, np.generic):  # a NumPy scalar in metadata: its Python value
                m[key] = value.item()
            else:
                m[key] = value

    state = {k: (_nest(v) if k in _FLAT_ENTRIES else v) for k, v in state.items()}
    walk(state, arrays, meta)
    json.dumps(meta)  # TypeError now, naming nothing half-saved, if a value is not JSON
    return arrays, meta


def _merge(arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in meta.items() if k not in _META_ONLY}
    for key, value in arrays.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(value, out[key])
        else:
            out[key] = value
    for key in _FLAT_ENTRIES:
        if key in out:
            out[key] = _flatten(out[key])
    return out


_META_ONLY = ("format", "format_version", "checksums")


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)


def _checksums(arrays: Mapping[str, Any]) -> dict[str, int] | None:
    """CRC-32 of every array (host copy), or None when some array is not fully addressable."""
    flat = _flatten(arrays)
    if not all(getattr(x, "is_fully_addressable", True) for x in flat.values()):
        return None
    return {path: _crc32(np.asarray(x)) for path, x in flat.items()}


# --------------------------------------------------------------------------------------------
# the manager


def _ocp() -> Any:
    import orbax.checkpoint as ocp

    return ocp


def _manager(checkpoints: Path, keep_last: int | None, async_save: bool, read_only: bool = False) -> Any:
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, enable_async_checkpointing=async_save, read_only=read_only,
        step_name_format=ocp.step.standard_name_format(step_prefix=STEP_PREFIX,
                                                       step_format_fixed_length=STEP_DIGITS),
        cleanup_tmp_directories=not read_only, create=not read_only)
    return ocp.CheckpointManager(checkpoints.absolute(), options=options, item_names=("state", "meta"))


class RunCheckpoints:
    """The Orbax checkpoints of one run directory (``RUN_DIR/checkpoints``).

    Every process of a multi-host run constructs one and calls ``save`` / ``wait`` together:
    Orbax coordinates them (each writes its own shards; process 0 writes the metadata and
    renames the step directory into place).
    """

    def __init__(self, checkpoints: str | os.PathLike[str], keep_last: int | None = 3, *,
                 async_save: bool = True) -> None:
        """``keep_last``: steps kept (None: all); ``async_save``: write in a background thread."""
        self.directory = Path(checkpoints)
        self._mngr = _manager(self.directory, keep_last, async_save)

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Start writing ``state`` as step ``step``; returns the step directory it will have.
        Raises (``OSError`` among others) for errors found now; errors of the background write
        surface in the next ``save`` or ``wait``."""
        ocp = _ocp()
        if int(step) in self._mngr.all_steps():
            # a run resumed from an earlier step (past a damaged newer one) writes this step anew
            self._mngr.delete(int(step))
        arrays, meta = split_state(state)
        meta = {**meta, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": int(step),
                "checksums": _checksums(arrays)}
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
        return step_dir(self.directory, step)

    def wait(self) -> None:
        """Block until every started save is on disk (re-raising a background write's error)."""
        self._mngr.wait_until_finished()
        self._mngr.check_for_errors()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self._mngr.close()


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta item (JSON) of an Orbax step directory, after checking its format and version."""
    path = Path(path)
    file = path / "meta" / "metadata"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {file.relative_to(path)})") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a bigmodel training checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer bigmodel (format {version}; this one reads "
                              f"<= {FORMAT_VERSION}); upgrade bigmodel to load it")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{path}: metadata has no valid 'step' entry")
    return meta


def _stored_tree(path: Path) -> dict[str, Any]:
    """The array item's tree of Orbax array metadata (shape, dtype per leaf)."""
    ocp = _ocp()
    try:
        tree = ocp.StandardCheckpointHandler().metadata(path / "state").tree
    except Exception as err:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        raise CheckpointError(f"{path}: unreadable array metadata ({type(err).__name__}: {str(err)[:300]})") from None
    return dict(tree)


def _numpy_targets(tree: Any) -> Any:
    """Restore targets that read each array whole, as NumPy."""
    import jax

    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)


def read_state(path: str | os.PathLike[str], targets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The state dict saved in the Orbax step directory ``path``.

    ``targets``: the arrays part of a state (``split_state(state)[0]`` of a template, with
    ``jax.ShapeDtypeStruct`` leaves carrying the wanted shardings, or NumPy arrays); None reads
    every array as NumPy. Raises :class:`CheckpointError` naming ``path`` if the step is
    incomplete, corrupt (a checksum differs), unreadable, or does not match ``targets``.
    """
    ocp = _ocp()
    path = Path(path)
    meta = read_meta(path)
    stored = _stored_tree(path)
    if targets is not None:
        # entries the caller has no template for (say, the reference optimizer's state while
        # verifying) are read as NumPy
        given = {k: (_nest(v) if k in _FLAT_ENTRIES else v) for k, v in targets.items()}
        extra = sorted(set(given) - set(stored))
        if extra:
            raise CheckpointError(f"{path} does not match the expected state: it has no {extra}")
        targets = {k: given[k] if k in given else _numpy_targets(v) for k, v in stored.items()}
    else:
        targets = _numpy_targets(stored)
    try:
        # a step directory is read by itself (no manager: it may lie outside any run directory)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            arrays = ckptr.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets)))["state"]
    except Exception as err:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        raise CheckpointError(f"{path}: corrupt or mismatched checkpoint ({type(err).__name__}: "
                              f"{str(err)[:400]})") from None
    sums = meta.get("checksums")
    if isinstance(sums, dict):
        flat = _flatten(arrays)
        if sorted(flat) != sorted(sums):
            raise CheckpointError(f"{path}: corrupt checkpoint: its arrays {sorted(set(flat) ^ set(sums))[:5]} do "
                                  "not match the ones recorded at save time")
        for name, x in flat.items():
            if getattr(x, "is_fully_addressable", True) and _crc32(np.asarray(x)) != sums[name]:
                raise CheckpointError(f"{path}: corrupt checkpoint: array {name!r} fails its CRC-32 check "
                                      "(damaged after it was written)")
    return _merge(arrays, meta)
