"""``bigmodel bench --mesh``: the training step on device meshes of the 8 simulated CPU devices
(conftest), per-device memory and step time against one device, labelled as simulated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_apps.bench import hardware
from bigmodel_apps.bench.mesh import MeshOptions, devices_for, mesh_label
from bigmodel_apps.bench.workloads import Workload
from bigmodel_apps.cli import main
from bigmodel_jax.sharding import MESH_AXES, parse_mesh
from reference_numpy.configs import param_count, preset

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "gpt2-tiny", "--batch", "8", "--seq-len", "16", "--mesh-steps", "2"]


def run_bench(tmp_path: Path, *meshes: str) -> dict:
    assert main(["bench", "--mesh", *meshes, *TINY, "--out", str(tmp_path), "--name", "m"]) == 0
    return json.loads((tmp_path / "m.json").read_text())


@pytest.mark.slow
def test_mesh_bench_reports_per_device_memory_labelled_as_simulated(tmp_path: Path, capsys) -> None:
    result = run_bench(tmp_path, "data:2,fsdp:2,tensor:2", "fsdp:2", "fsdp:8")
    out = capsys.readouterr().out

    # simulated devices say nothing about speed: the JSON and the printed table both say so
    assert result["simulated_devices"] is True
    assert "measure nothing about real parallel speed" in result["timing_note"]
    assert "SIMULATED DEVICES" in out and "measure nothing about real parallel speed" in out
    assert "simulated" in (tmp_path / "m.md").read_text()
    # every result carries the CPU's SIMD flags, as the suite's reports do
    assert result["meta"]["machine"]["cpu_flags"] == hardware.cpu_flags()
    assert "SIMD:" in out or not hardware.cpu_flags()

    runs = {r["mesh"]: r for r in result["runs"]}
    assert list(runs) == ["single device", "data:2,fsdp:2,tensor:2", "fsdp:2", "fsdp:8"]
    assert [r["devices"] for r in runs.values()] == [1, 8, 2, 8]
    cfg = preset("gpt2-tiny")
    full = 4 * param_count(cfg)  # float32 parameters, unsharded
    one = runs["single device"]
    assert one["param_bytes_per_device"] == full == one["param_bytes_total"]
    for name, r in runs.items():
        p, o = r["param_bytes_per_device"], r["opt_state_bytes_per_device"]
        # AdamW: two moments shaped like the parameters and sharded like them, plus a step count
        assert 2 * p <= o <= 2 * p + 64, (name, p, o)
        assert r["param_bytes_total"] == full
        n_shard = math.prod(r["sizes"][a] for a in ("fsdp", "tensor"))
        assert full / n_shard <= p <= full, (name, p)  # no device holds less than its share
        xm = r["xla_memory"]
        assert xm["argument"] > 0 and xm["output"] > 0 and xm["temp"] >= 0 and xm["peak_estimate"] > 0, (name, xm)
        assert r["step_s"] > 0 and r["timing"]["reps"] == 2
        assert math.isfinite(r["first_loss"]) and r["first_loss"] > 0
        assert r["vs_single"]["loss_rel_diff"] <= 1e-5, name  # a mesh reorders reductions, nothing more
    # FSDP: each doubling of the fsdp axis cuts what every device holds and what XLA plans for it
    series = [one, runs["fsdp:2"], runs["fsdp:8"]]
    for key in ("param_bytes_per_device", "opt_state_bytes_per_device"):
        values = [r[key] for r in series]
        assert values == sorted(values, reverse=True) and len(set(values)) == 3, (key, values)
    plans = [r["xla_memory"]["argument"] for r in series]
    assert plans == sorted(plans, reverse=True) and len(set(plans)) == 3, plans
    assert runs["data:2,fsdp:2,tensor:2"]["sharded_param_leaves"] > 0
    assert runs["data:2,fsdp:2,tensor:2"]["vs_single"]["state_bytes_per_device"] < 1


@pytest.mark.parametrize("args, message", [
    (["--mesh", "pipeline:2"], "unknown axis 'pipeline'"),
    (["--mesh", "data:0"], "positive integer"),
    (["--mesh", "data2"], "not AXIS:SIZE"),
    (["--mesh", "data:2,data:2"], "given twice"),
    (["--mesh", "data:3"], "--batch 8 cannot be split over data x fsdp = 3"),
    (["--mesh", "fsdp:2", "--mesh-steps", "0"], "--mesh-steps must be a positive integer"),
    (["--mesh-steps", "3"], "--mesh-steps needs --mesh"),
    (["--mesh", "fsdp:2", "--plan", "smoke"], "cannot be combined with --plan"),
])
def test_bad_meshes_are_clear_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    common = ["--preset", "gpt2-tiny", "--batch", "8", "--seq-len", "16", "--out", str(tmp_path)]
    assert main(["bench", *args, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_too_few_devices_names_the_environment_variable(tmp_path: Path, capsys) -> None:
    jax.devices()  # the backend is up with the 8 devices of conftest: it cannot grow now
    assert main(["bench", "--mesh", "fsdp:16", "--preset", "gpt2-tiny", "--batch", "16", "--seq-len", "16",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs 16 devices" in err and "XLA_FLAGS=--xla_force_host_platform_device_count=16" in err, err
    with pytest.raises(ValueError, match="at least one device"):
        devices_for(0)
    assert len(devices_for(8)) == 8 and len(devices_for(3)) == 3


@given(st.fixed_dictionaries({a: st.integers(1, 6) for a in MESH_AXES}), st.integers(1, 40))
def test_mesh_options_accept_exactly_the_batches_data_x_fsdp_divides(sizes: dict[str, int], batch: int) -> None:
    text = ",".join(f"{a}:{n}" for a, n in sizes.items())
    w = Workload("gpt2-tiny", batch, 16)
    split = sizes["data"] * sizes["fsdp"]
    if batch % split:
        with pytest.raises(ValueError, match=f"cannot be split over data x fsdp = {split}"):
            MeshOptions(w, (text,))
    else:
        opts = MeshOptions(w, (text,))
        assert opts.devices_needed == sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    # the label names exactly the axes larger than 1, and reads back as the same mesh
    label = mesh_label(sizes)
    if label == "single device":
        assert all(n == 1 for n in sizes.values())
    else:
        assert parse_mesh(label) == {a: n for a, n in sizes.items() if n > 1}


@pytest.mark.slow
def test_a_fresh_process_creates_the_simulated_devices_it_needs(tmp_path: Path) -> None:
    """Without XLA_FLAGS, `bench --mesh data:2,tensor:2` starts JAX's CPU backend with 4 devices
    itself (the conftest's 8 devices are not inherited)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--mesh", "data:2,tensor:2", *TINY,
                           "--out", str(tmp_path), "--name", "m"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["simulated_devices"] is True
    assert result["meta"]["machine"]["device_count"] == 4
    assert [r["devices"] for r in result["runs"]] == [1, 4]
