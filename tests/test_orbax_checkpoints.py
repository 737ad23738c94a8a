"""Training checkpoints on Orbax (bigmodel_train.orbax_checkpoint): async saves that a SIGKILL
cannot turn into a half-written step, keep-last-N, checksummed arrays (a damaged step is named
and skipped), and runs whose checkpoints are in the earlier format (one safetensors file per
step) still load and resume.

Bit-exact comparisons of whole runs are made between processes of the same kind: the test
process runs with x64 enabled (conftest), which changes float32 rounding inside optax, so a run
that starts in a child process is compared with a run made entirely in child processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from reference_numpy.tree import tree_leaves_with_path

LM = ["task=lm", "model=gpt2-tiny", "model.dropout=0.1", "data=stdlib", "tokenizer=byte", "max_chars=60000",
      "seq_len=16", "batch_size=4", "schedule=constant", "warmup_steps=0", "max_eval_examples=8",
      "eval_batch_size=8", "sample_tokens=4", "progress=false", "plots=false", "tensorboard=false", "log_every=1"]

# A child `bigmodel train` whose Orbax commit of one step blocks (after its arrays and metadata
# are written into the temporary directory, before the rename): the parent kills it right there.
BLOCKING_CHILD = """
import pathlib, sys, time
from orbax.checkpoint._src.path import atomicity

marker, blocked_step = pathlib.Path(sys.argv[1]), sys.argv[2]
real = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):
    if self.get_final().name == blocked_step:
        marker.write_text("saving " + blocked_step)
        time.sleep(600)
    return await real(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from bigmodel_apps.cli import main
sys.exit(main(sys.argv[3:]))
"""


def child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigmodel_apps", *args], capture_output=True, text=True,
                          timeout=600)


def state_bytes(path: Path) -> dict[str, bytes]:
    state = load_checkpoint(path, as_numpy=True)
    flat = {f"params/{k}": v for k, v in tree_leaves_with_path(state["params"])}
    flat.update({f"opt_state/{k}": v for k, v in state["opt_state"].items()})
    flat["rng"] = state["rng"]["key_data"]
    return {k: np.asarray(v).tobytes() for k, v in flat.items()}


@pytest.mark.slow
def test_sigkill_during_an_async_save_leaves_the_previous_step(tmp_path: Path) -> None:
    """SIGKILL while step 4 is being committed: step 4 is never listed (only Orbax's temporary
    exists), step 2 restores intact, and resuming from it ends bit-identical to a run that was
    never killed."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    marker = tmp_path / "blocked"
    cmd = [sys.executable, "-c", BLOCKING_CHILD, str(marker), "step_00000004",
           "train", *LM, "steps=6", "checkpoint_every=2", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before the save: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("step 4's save never started")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    entries = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000002" in entries and "step_00000004" not in entries
    assert any(name.startswith("step_00000004.orbax-checkpoint-tmp") for name in entries), entries
    assert [s for s, _ in list_checkpoints(run)] == [2]
    verify_checkpoint(run / "checkpoints" / "step_00000002")

    resumed = child("train", "--resume", "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "step_00000002 (step 2)" in resumed.stdout
    assert not any(p.name.startswith("step_00000004.orbax") for p in (run / "checkpoints").iterdir())
    whole = child("train", *LM, "steps=6", "checkpoint_every=2", "--run-dir", str(ref))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert state_bytes(latest_checkpoint(run)) == state_bytes(latest_checkpoint(ref))


def test_keep_last_and_async_saves(tmp_path: Path) -> None:
    """keep_last=2 keeps the two newest steps (Orbax's max_to_keep); each is a complete step
    directory that verifies, and the final one holds the state the run ended with."""
    run = tmp_path / "run"
    assert main(["train", *LM, "steps=5", "checkpoint_every=1", "keep_last=2", "--run-dir", str(run)]) == 0
    found = list_checkpoints(run)
    assert [s for s, _ in found] == [4, 5]
    for _, path in found:
        assert path.is_dir() and (path / "state").is_dir() and (path / "meta" / "metadata").is_file()
        verify_checkpoint(path)
    meta = json.loads((found[-1][1] / "meta" / "metadata").read_text())
    assert meta["format"] == "bigmodel-train-state-orbax" and meta["step"] == 5
    assert meta["data_position"]["batch_size"] == 4 and meta["checksums"]


def _damage(step_dir: Path) -> Path:
    """Flip bytes in the middle of the largest data file of a step's arrays."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    target.write_bytes(bytes(data))
    return target


def test_a_damaged_step_is_named_and_skipped(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *LM, "steps=4", "checkpoint_every=2", "--run-dir", str(run)]) == 0
    newest = run / "checkpoints" / "step_00000004"
    _damage(newest)
    with pytest.raises(CheckpointError, match="step_00000004.*corrupt"):
        verify_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="skipping unusable checkpoint .*step_00000004"):
        assert main(["eval", str(run), "--max-examples", "4"]) == 0
    with pytest.warns(RuntimeWarning, match="skipping unusable checkpoint .*step_00000004"):
        assert main(["train", "--resume", "steps=5", "--run-dir", str(run)]) == 0
    assert "from " + str(run / "checkpoints" / "step_00000002") in capsys.readouterr().out


def test_metadata_of_another_kind_is_refused_by_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *LM, "steps=2", "--run-dir", str(run)]) == 0
    step = latest_checkpoint(run)
    meta = step / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer bigmodel"):
        load_checkpoint(step, as_numpy=True)
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{step}: unreadable checkpoint metadata"):
        load_checkpoint(step, as_numpy=True)
    shutil.rmtree(step / "meta")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        list_checkpoints(run)


def test_runs_in_the_earlier_format_load_and_resume(tmp_path: Path) -> None:
    """A run whose checkpoint is a step_XXXXXXXX.safetensors file (the format before Orbax, with
    the same state the trainer wrote then) evaluates, and resumes into Orbax steps that end
    bit-identical to a run trained in one go."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(["train", *LM, "steps=4", "--stop-after", "2", "--run-dir", str(run)]) == 0
    step = latest_checkpoint(run)
    state = load_checkpoint(step, as_numpy=True)
    shutil.rmtree(step)
    legacy = save_checkpoint(run, state, 2)
    assert latest_checkpoint(run) == legacy and legacy.name == "step_00000002.safetensors"
    assert main(["eval", str(run), "--max-examples", "4"]) == 0
    assert main(["train", "--resume", "--run-dir", str(run)]) == 0
    assert [(s, p.is_dir()) for s, p in list_checkpoints(run)] == [(2, False), (4, True)]
    assert main(["train", *LM, "steps=4", "--run-dir", str(ref)]) == 0
    assert state_bytes(latest_checkpoint(run)) == state_bytes(latest_checkpoint(ref))
