"""Which run a checkpoint belongs to, and whether it still fits the run directory.

A run directory gets a random ``run_id`` in ``RUN_DIR/run.json`` when training first writes
it. Every checkpoint stores that id, the run config, the model config and a fingerprint of the
run's data artifacts (tokenizer / vocabulary / label names: what turns text into ids). Resume,
eval and generate call :func:`check_checkpoint` before they use the weights, so

* a checkpoint of another run (``eval RUN --checkpoint OTHER_RUN/...``) is refused, instead of
  appending foreign metrics to this run;
* an edited ``config.json`` or tokenizer is refused with the differing fields named, instead
  of a shape error deep inside JAX.

Checkpoints written before run ids existed carry no id and no fingerprint; for them only the
configs are compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from bigmodel_port.atomic import atomic_write_text

__all__ = ["RUN_FILE", "ARTIFACTS", "RunMismatchError", "ensure_run_id", "read_run_id",
           "artifact_fingerprint", "config_differences", "check_checkpoint", "MODEL_FIELDS"]

RUN_FILE = "run.json"
# What a task writes to turn raw data into ids and labels (Task.save_artifacts).
ARTIFACTS = ("tokenizer", "vocab.json", "labels.json")

# Run-config fields that decide the model's shape or what its ids and labels mean; a checkpoint
# whose run config differs in any of them cannot be evaluated with this run's data pipeline.
MODEL_FIELDS = ("task", "model", "model_overrides", "data", "tokenizer", "vocab_size", "max_chars", "seq_len",
                "val_fraction", "test_fraction", "dtype", "dropout", "seed")


class RunMismatchError(ValueError):
    """A checkpoint that does not belong to, or no longer fits, the run directory."""


def read_run_id(run_dir: str | os.PathLike[str]) -> str | None:
    """The run's id, or None for a directory written before ids existed."""
    p = Path(run_dir) / RUN_FILE
    if not p.is_file():
        return None
    try:
        rid = json.loads(p.read_text(encoding="utf-8")).get("run_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise RunMismatchError(f"{p} is not valid: expected JSON with a run_id") from None
    if not isinstance(rid, str) or not rid:
        raise RunMismatchError(f"{p} is not valid: expected JSON with a run_id")
    return rid


def ensure_run_id(run_dir: str | os.PathLike[str]) -> str:
    """The run's id, created (atomically) on first use."""
    rid = read_run_id(run_dir)
    if rid is None:
        rid = uuid.uuid4().hex
        atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps({"run_id": rid}) + "\n")
    return rid


def artifact_fingerprint(run_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the run's tokenizer / vocabulary / label files (names and bytes)."""
    root = Path(run_dir)
    h = hashlib.sha256()
    for name in ARTIFACTS:
        p = root / name
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any], fields: Any = None) -> list[str]:
    """``["d_model (checkpoint 128, run 64)", ...]`` for the (given) fields that differ."""
    names = sorted(set(saved) | set(current)) if fields is None else list(fields)
    missing = object()
    out = []
    for k in names:
        a, b = saved.get(k, missing), current.get(k, missing)
        if a != b:
            def show(v: Any) -> str:
                return "absent" if v is missing else repr(v)
            out.append(f"{k} (checkpoint {show(a)}, run {show(b)})")
    return out


def _flat(run_config: dict[str, Any]) -> dict[str, Any]:
    """Run-config dict with ``model_overrides`` spread out as ``model.<field>`` keys."""
    out = {k: v for k, v in run_config.items() if k != "model_overrides"}
    overrides = run_config.get("model_overrides")
    if isinstance(overrides, dict):
        out.update({f"model.{k}": v for k, v in overrides.items()})
    return out


def check_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                     run_config: Any, model_config: Any) -> None:
    """Raise ``RunMismatchError`` unless the checkpoint ``state`` (read from ``path``) was written
    by this run with the same model config, data settings and tokenizer."""
    where = f"checkpoint {path}"
    run_id = read_run_id(run_dir)
    saved_id = state.get("run_id")
    if saved_id is not None and run_id is not None and saved_id != run_id:
        raise RunMismatchError(f"{where} belongs to another run (run id {saved_id}), not to {run_dir} "
                               f"(run id {run_id}); evaluate it in its own run directory")
    saved_model = state.get("model_config")
    if isinstance(saved_model, dict):
        diff = config_differences(saved_model, dataclasses.asdict(model_config))
        if diff:
            raise RunMismatchError(f"{where} holds a different model than {run_dir} builds: " + "; ".join(diff))
    saved_cfg = state.get("config")
    if isinstance(saved_cfg, dict):
        saved, current = _flat(saved_cfg), _flat(dataclasses.asdict(run_config))
        diff = config_differences(saved, current, [k for k in saved | current
                                                   if k in MODEL_FIELDS or k.startswith("model.")])
        if diff:
            raise RunMismatchError(f"{where} was trained with different settings than {run_dir}/config.json: "
                                   + "; ".join(diff))
    saved_fp = state.get("artifacts")
    if isinstance(saved_fp, str) and saved_fp != artifact_fingerprint(run_dir):
        raise RunMismatchError(f"{where} was trained with a different tokenizer / vocabulary / label set than "
                               f"{run_dir} now holds ({', '.join(ARTIFACTS)} changed)")
