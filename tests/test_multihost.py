"""Two processes on 127.0.0.1, each with 4 simulated CPU devices, train on one global 8-device
mesh through JAX's own multi-controller runtime (``jax.distributed`` with gloo collectives): the
loss trajectory equals the single-process 8-device run, each process reads only its slice of
every batch, process 0 alone logs, and the checkpoint both processes wrote together restores
into one process on one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigmodel_train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from reference_numpy.tree import tree_leaves_with_path

MESH = "data:2,fsdp:2,tensor:2"
ARGS = ["train", "task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte", "max_chars=60000", "seq_len=16",
        "batch_size=8", "steps=6", "schedule=constant", "warmup_steps=0", "max_eval_examples=8",
        "eval_batch_size=8", "sample_tokens=4", "progress=false", "plots=false", "tensorboard=false",
        "log_every=1", "checkpoint_every=3", f"mesh={MESH}"]
# the conftest's rendezvous timeouts, for a loaded CI machine
TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=1800")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_ENABLE_X64")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TIMEOUTS}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x["loss"] for x in lines if x["split"] == "train"]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path: Path) -> None:
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = free_port()
    # process 0 is given its coordinator as a config key, process 1 through JAX's own
    # environment variable (JAX_COORDINATOR_ADDRESS)
    procs = [subprocess.Popen([sys.executable, "-m", "bigmodel_apps", *ARGS, f"coordinator=127.0.0.1:{port}",
                               "num_processes=2", "process_id=0", "--run-dir", str(multi)],
                              env=env_with(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-m", "bigmodel_apps", *ARGS, "num_processes=2", "process_id=1",
                               "--run-dir", str(multi)],
                              env={**env_with(4), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = subprocess.run([sys.executable, "-m", "bigmodel_apps", *ARGS, "--run-dir", str(single)],
                         env=env_with(8), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    # each process fed only the rows its 4 devices hold: data x fsdp = 4 shards of 2 rows, the
    # first two shards on process 0's devices
    assert "process 0 of 2: reads rows 0..3 of every micro-batch of 8" in outs[0][0]
    assert "process 1 of 2: reads rows 4..7 of every micro-batch of 8" in outs[1][0]
    # process 0 alone reports and logs
    assert "final validation" in outs[0][0] and "final validation" not in outs[1][0]
    assert "2 processes" in outs[0][0]

    # the same global program on the same global batches: gloo sums the cross-process partial
    # sums in its own order, so the float32 losses may differ in the last bits (measured: one
    # step by 1 ulp, the rest identical)
    a, b = losses(multi), losses(single)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)

    # the checkpoint both processes wrote together restores in one process, bit for bit equal to
    # the arrays stored, and lands close to the single-process run's parameters
    steps = [s for s, _ in list_checkpoints(multi)]
    assert steps == [3, 6]
    step_dir = latest_checkpoint(multi)
    assert {p.name for p in (step_dir / "state").iterdir()} >= {"ocdbt.process_0", "ocdbt.process_1"}
    saved_multi = load_checkpoint(step_dir, as_numpy=True)
    saved_single = load_checkpoint(latest_checkpoint(single), as_numpy=True)
    for (path, x), (_, y) in zip(tree_leaves_with_path(saved_multi["params"]),
                                 tree_leaves_with_path(saved_single["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=path)
    one_device = subprocess.run([sys.executable, "-m", "bigmodel_apps", "eval", str(multi), "--max-examples", "8"],
                                env=env_with(1), capture_output=True, text=True, timeout=600)
    assert one_device.returncode == 0, one_device.stderr[-3000:]
    assert "perplexity" in one_device.stdout


@pytest.mark.parametrize("keys, message", [
    (["coordinator=127.0.0.1:1234", "num_processes=2", "process_id=0"], "mesh=..."),
    ([f"mesh={MESH}", "coordinator=localhost", "num_processes=2", "process_id=0"], "HOST:PORT or auto"),
    ([f"mesh={MESH}", "coordinator=127.0.0.1:1234", "num_processes=2", "process_id=2"], "must be < num_processes"),
    ([f"mesh={MESH}", "coordinator=127.0.0.1:1234", "num_processes=-1"], "num_processes must be >= 0"),
    ([f"mesh={MESH}", "coordinator=auto", "verify_steps=2"], "verify on one host"),
    (["num_processes=2", "process_id=1"], "mesh=..."),
])
def test_bad_distributed_settings_are_refused_up_front(keys: list[str], message: str) -> None:
    from bigmodel_train.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config(None, None, ["batch_size=8", *keys])


def test_a_coordinator_is_needed(monkeypatch) -> None:
    from bigmodel_train import distributed
    from bigmodel_train.config import build_config

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    cfg = build_config(None, None, ["batch_size=8", f"mesh={MESH}", "num_processes=2", "process_id=1"])
    assert distributed.wanted(cfg)
    with pytest.raises(ValueError, match="no coordinator: set coordinator=HOST:PORT .*JAX_COORDINATOR_ADDRESS"):
        distributed.initialize(cfg)
    assert not distributed.wanted(build_config(None, None, ["batch_size=8"]))


def test_a_mesh_that_does_not_span_every_process_is_refused(tmp_path: Path) -> None:
    """Two processes of 4 devices with a 4-device mesh: the mesh would leave process 1 without
    a device; both processes stop with one clear line instead of hanging in a collective."""
    port = free_port()
    args = [a for a in ARGS if not a.startswith("mesh=")] + ["mesh=data:2,fsdp:2", "steps=1"]
    procs = [subprocess.Popen([sys.executable, "-m", "bigmodel_apps", *args, f"coordinator=127.0.0.1:{port}",
                               "num_processes=2", f"process_id={i}", "--run-dir", str(tmp_path / "run")],
                              env=env_with(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2
        assert "error: mesh data:2,fsdp:2 has 4 devices; a 2-process run has 8" in err
