"""A training run's lifecycle under real-world abuse: Ctrl-C and SIGTERM (real signals, in a
subprocess), a second process on the same run directory, a checkpoint of another run or of an
edited config, and a disk that fills up during a save.

Signals and locks are exercised across processes because that is where they matter: a handler
or an flock that only works inside one interpreter proves nothing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from bigmodel_train.config import build_config
from bigmodel_train.run_identity import RunMismatchError
from bigmodel_train.runlock import RunLock, RunLockedError
from bigmodel_train.trainer import load_run, train
from reference_numpy.tree import tree_leaves_with_path

# A tiny GPT with the byte tokenizer on a slice of the stdlib (no BPE training, seconds to set
# up). A constant schedule lets a resumed run change `steps` (tests stop an "endless" run).
LM = ["task=lm", "model=gpt2-tiny", "model.dropout=0.1", "data=stdlib", "tokenizer=byte", "max_chars=60000",
      "seq_len=16", "batch_size=4", "schedule=constant", "warmup_steps=0", "max_eval_examples=8",
      "eval_batch_size=8", "sample_tokens=4", "progress=false", "plots=false", "tensorboard=false", "log_every=1"]


def quiet(*_: object) -> None:
    pass


def params_and_opt(run_dir: Path) -> dict:
    state = load_checkpoint(latest_checkpoint(run_dir), as_numpy=True)
    return {"step": state["step"], "params": state["params"], "opt_state": state["opt_state"]}


def assert_identical(a: dict, b: dict) -> None:
    la, lb = dict(tree_leaves_with_path(a)), dict(tree_leaves_with_path(b))
    assert la.keys() == lb.keys()
    for path in la:
        assert np.array_equal(np.asarray(la[path]), np.asarray(lb[path])), f"{path} differs"


def start_training(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`bigmodel train` of an endless run in a child process (its own session, so a signal
    sent to it does not reach pytest)."""
    cmd = [sys.executable, "-m", "bigmodel_apps", "train", *LM, "steps=1000000", *extra, "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240.0) -> None:
    """Block until the child has logged update ``step`` (metrics.jsonl), i.e. is mid-training."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


# --------------------------------------------------------------------------------------------
# signals


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_is_bit_identical(tmp_path: Path, capsys) -> None:
    """SIGINT mid-run: exit 130, one line naming the checkpoint, no traceback; --resume from
    that checkpoint ends bit-identical to a run that was never interrupted."""
    run = tmp_path / "interrupted"
    proc = start_training(run)
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: SIGINT: stopped after step") and "--resume" in last
    (k, ckpt), = list_checkpoints(run)[-1:]
    assert k >= 3 and str(ckpt) in last
    verify_checkpoint(ckpt)

    # finish 3 more updates from the signal's checkpoint, and compare with a straight run. Both
    # run in child processes too: this one has x64 on (conftest), which changes float32 rounding
    # inside optax (its step count and bias corrections), so it is not the same program.
    straight = tmp_path / "straight"
    for args in (["--resume", f"steps={k + 3}"], [*LM, f"steps={k + 3}"]):
        done = subprocess.run([sys.executable, "-m", "bigmodel_apps", "train", *args, "--run-dir",
                               str(run if "--resume" in args else straight)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    a, b = params_and_opt(run), params_and_opt(straight)
    assert a["step"] == b["step"] == k + 3
    assert_identical(a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_training(run, "checkpoint_every=0")
    wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: SIGTERM")
    verify_checkpoint(latest_checkpoint(run))
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------
# one writer per run directory


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom bigmodel_train.runlock import RunLock\n"
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", *LM, "steps=2", "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and err.startswith("error: ") and err.count("\n") == 1
        assert not (run / "config.json").exists()  # refused before writing anything
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            RunLock(run).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, yet the kernel drops the lock
        holder.wait()
    assert main(["train", *LM, "steps=2", "--run-dir", str(run)]) == 0


def test_the_lock_is_per_holder_and_released_on_exceptions(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with pytest.raises(ZeroDivisionError):
        with RunLock(tmp_path):
            1 / 0
    RunLock(tmp_path).acquire().release()  # free again


# --------------------------------------------------------------------------------------------
# checkpoints are checked against the run before use


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    for run in (a, b):
        train(build_config(None, None, LM + ["steps=2"]), run, out=quiet)
    return a, b


def test_a_checkpoint_of_another_run_is_refused(two_runs, capsys) -> None:
    a, b = two_runs
    before = (a / "metrics.jsonl").read_text()
    other = latest_checkpoint(b)
    assert main(["eval", str(a), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "Traceback" not in err
    assert (a / "metrics.jsonl").read_text() == before  # no foreign metrics appended
    assert main(["generate", str(a), "--checkpoint", str(other), "--max-new-tokens", "2"]) == 2


def test_an_edited_config_is_refused_naming_the_field(two_runs, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(two_runs[0], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model_overrides"] = {**cfg["model_overrides"], "d_model": 64}
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunMismatchError, match=r"d_model \(checkpoint 32, run 64\)"):
        load_run(run)
    for args in (["eval", str(run)], ["train", "--resume", "--run-dir", str(run), "steps=3"],
                 ["generate", str(run), "--max-new-tokens", "2"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "d_model (checkpoint 32, run 64)" in err and "Traceback" not in err, args


def test_a_changed_tokenizer_is_refused(two_runs, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "retokenized"
    shutil.copytree(two_runs[0], run)
    files = [p for p in (run / "tokenizer").rglob("*") if p.is_file()]
    assert files, "the run saved no tokenizer files"
    files[0].write_bytes(files[0].read_bytes() + b" ")
    with pytest.raises(RunMismatchError, match="tokenizer"):
        load_run(run)


# --------------------------------------------------------------------------------------------
# a full disk during a save


def test_a_full_disk_names_the_path_and_the_last_good_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    """ENOSPC injected where step 2's metadata file is written (Orbax's JSON writer, in the
    background thread of the async save): one line, exit 1, the earlier checkpoint intact, the
    half-written step never listed, and the run resumes from step 1."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    run = tmp_path / "run"
    real_save = jch.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):  # noqa: ANN001
        if "step_00000002" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_save(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)
    assert main(["train", *LM, "steps=4", "checkpoint_every=1", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    first = run / "checkpoints" / "step_00000001"
    assert err == (f"error: could not write checkpoint {run / 'checkpoints' / 'step_00000002'}: "
                   f"No space left on device; the last good checkpoint is {first} (earlier checkpoints are intact)")
    verify_checkpoint(first)
    assert list_checkpoints(run) == [(1, first)]
    monkeypatch.undo()
    assert main(["train", "--resume", "--run-dir", str(run)]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]  # keep_last=3
