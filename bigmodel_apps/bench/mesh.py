"""``bigmodel bench --mesh data:2,fsdp:2,tensor:2 [MESH ...]``: the JAX training step of the
benchmark (``jax_side.train_step_fn``: loss, ``jax.grad``, AdamW) placed on device meshes by the
logical-axis rules of ``bigmodel_jax.sharding``, with per-device memory and step time per mesh,
next to a single-device baseline measured in the same run (so every figure has a ratio).

Per mesh we report:

* XLA's compiled memory plan of the step (``compiled.memory_analysis()``: arguments, outputs,
  temporaries; for an SPMD program these are the bytes of ONE device);
* the parameter and optimizer-state bytes each device holds (the shard shapes of the placed
  arrays: what FSDP / tensor sharding saves);
* the step time, median of ``steps`` calls after a warm-up call, and the first step's loss (a
  mesh reorders reductions only, so it matches the baseline's to rounding).

On a CPU the devices are simulated (``jax_num_cpu_devices`` / ``--xla_force_host_platform_device_count``):
N XLA "devices" share the machine's cores and exchange data through host memory, so their step
times say nothing about real parallel speed. The result says so (``"simulated_devices": true``
and a header line in the table); the memory plan is real, as the same program is what each
device would run.

Why this step and not ``bigmodel_train.steps.JaxStepper``: the suite's step is the one every other
JAX row of the benchmark times (same loss, same AdamW, same ``PerfOptions``), and compiling it
ahead of time here gives ``memory_analysis`` of exactly the executable that is then timed,
without reaching into the trainer's private compiled function. The placement is the trainer's
(``shard_params``, ``init_opt_state``, ``shard_batch``, ``use_mesh``).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bigmodel_apps.bench import hardware as hw
from bigmodel_apps.bench.jax_side import make_optimizer, memory_of, train_step_fn
from bigmodel_apps.bench.report import meta_lines, num, ratio, si, write_json
from bigmodel_apps.bench.timing import Prepared, Stopwatch, time_interleaved
from bigmodel_apps.bench.workloads import Workload, hf_architecture, init_reference, make_batch
from bigmodel_jax import sharding
from bigmodel_jax.perf import PerfOptions
from bigmodel_port.atomic import atomic_write_text
from reference_numpy.configs import param_count

__all__ = ["MeshOptions", "SIMULATED_NOTE", "devices_for", "markdown", "mesh_label", "run_mesh_bench", "write_all"]

DEFAULT_STEPS = 5  # timed steps per mesh (the median is reported)
SINGLE = "single device"  # label of the baseline
SIMULATED_NOTE = ("Step times on simulated CPU devices measure nothing about real parallel speed: the "
                  "{n} XLA host devices share this machine's {cores} CPU cores and exchange data through "
                  "host memory. The per-device bytes are XLA's plan of the program each device runs and do hold.")


def mesh_label(sizes: dict[str, int]) -> str:
    """``{"data": 2, "fsdp": 2}`` -> ``"data:2,fsdp:2"`` (axes of size 1 left out; all 1 -> "single device")."""
    parts = [f"{a}:{sizes[a]}" for a in sharding.MESH_AXES if sizes.get(a, 1) > 1]
    return ",".join(parts) or SINGLE


@dataclass(frozen=True)
class MeshOptions:
    """What one mesh benchmark measures: ``workload`` on each of ``meshes`` (texts such as
    ``"data:2,fsdp:2,tensor:2"``, see ``sharding.parse_mesh``) and on one device, ``steps`` timed
    steps each, with the model options ``perf``. Bad meshes, and a batch that a mesh's
    ``data x fsdp`` does not divide, are a ``ValueError`` naming the mesh."""

    workload: Workload
    meshes: tuple[str, ...]
    steps: int = DEFAULT_STEPS
    perf: PerfOptions = PerfOptions()
    command: str = ""
    sizes: tuple[dict[str, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.meshes:
            raise ValueError("--mesh needs at least one mesh, e.g. --mesh data:2,fsdp:2,tensor:2")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--mesh-steps must be a positive integer, got {self.steps!r}")
        sizes = []
        for text in self.meshes:
            s = sharding.parse_mesh(text)  # ValueError naming the bad entry
            split = s.get("data", 1) * s.get("fsdp", 1)
            if self.workload.batch % split:
                raise ValueError(f"mesh {text!r}: --batch {self.workload.batch} cannot be split over data x fsdp = "
                                 f"{split} devices; use a batch size divisible by {split}")
            sizes.append(s)
        object.__setattr__(self, "sizes", tuple(sizes))

    @property
    def devices_needed(self) -> int:
        """The largest mesh's device count (every mesh runs on the first that many devices)."""
        return max(math.prod(s.values()) for s in self.sizes)


def _forced_cpu_count() -> int:
    """The CPU device count ``XLA_FLAGS`` asks for (1 when it asks for none)."""
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def devices_for(n: int) -> list[Any]:
    """The first ``n`` devices of JAX's default backend; on a CPU, simulated ones are created if
    the backend is not started yet.

    We set JAX's own ``jax_num_cpu_devices`` config rather than ``XLA_FLAGS`` from inside the
    process: a too-late ``XLA_FLAGS`` is silently ignored once the backend is up, while the
    config raises, so a failure is seen and reported; it also leaves child processes'
    environment alone, and touches only the CPU backend (harmless on a GPU machine). When the
    backend already runs with fewer devices (another JAX computation came first in this
    process) this is a ``ValueError`` giving the exact environment variable to set."""
    if n < 1:
        raise ValueError(f"a mesh needs at least one device, got {n}")
    if n > 1 and _forced_cpu_count() < n and jax.config.jax_num_cpu_devices < n:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            pass  # the backends are up already: their device count is checked below
    devices = jax.devices()
    if len(devices) >= n:
        return list(devices[:n])
    backend = jax.default_backend()
    flag = f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    if backend == "cpu":
        raise ValueError(f"the mesh needs {n} devices, but JAX's CPU backend was started with {len(devices)} in this "
                         f"process; set {flag} in the environment before Python starts, e.g. "
                         f"`{flag} bigmodel bench --mesh ...`")
    raise ValueError(f"the mesh needs {n} devices, but this machine has {len(devices)} {backend} device(s); use a "
                     f"smaller mesh, or simulate it on the CPU: `JAX_PLATFORMS=cpu {flag} bigmodel bench --mesh ...`")


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of the placed arrays ``tree``: each leaf's shard shape (the rules
    only split dimensions they divide, so every device holds the same shard shape)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * x.dtype.itemsize
    return int(total)


def _bytes_total(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure(config: Any, params_np: dict[str, Any], batch_np: dict[str, np.ndarray], sizes: dict[str, int],
            devices: list[Any], perf: PerfOptions, steps: int) -> dict[str, Any]:
    """Place parameters, AdamW state and batch on the mesh ``sizes`` over ``devices`` (exactly
    that many), compile the training step ahead of time, run it once (the loss), then time
    ``steps`` calls from the same state (the outputs are dropped: every call does the same work)."""
    mesh = sharding.make_mesh(sizes, devices)
    with sharding.use_mesh(mesh):  # the blocks' activation constraints, while tracing
        params = sharding.shard_params(params_np, config, mesh)
        opt_state = sharding.init_opt_state(make_optimizer(), params)
        batch = sharding.shard_batch(batch_np, mesh)
        # outputs keep the inputs' placement (ZeRO-3: updated moments stay sharded like the weights)
        out_shardings = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, opt_state),
                         NamedSharding(mesh, PartitionSpec()))
        jitted = jax.jit(train_step_fn(config, perf), out_shardings=out_shardings)
        with Stopwatch() as lower:
            lowered = jitted.lower(params, opt_state, batch)
        with Stopwatch() as comp:
            compiled = lowered.compile()
    losses: list[float] = []

    def call() -> None:
        _, _, loss = compiled(params, opt_state, batch)
        losses.append(float(loss))  # float() waits for the step

    call()  # warm-up, and the loss
    timing = time_interleaved([Prepared("step", call, {})], min_time=0.0, min_reps=steps, max_reps=steps)["step"]
    leaves = jax.tree.leaves(params)
    p_dev, o_dev = _bytes_per_device(params), _bytes_per_device(opt_state)
    return {
        "mesh": mesh_label(sizes), "sizes": {a: int(sizes.get(a, 1)) for a in sharding.MESH_AXES},
        "devices": len(devices), "device_ids": [d.id for d in devices],
        "lower_s": lower.seconds, "compile_s": comp.seconds,
        "xla_memory": memory_of(compiled),
        "param_bytes_per_device": p_dev, "opt_state_bytes_per_device": o_dev, "state_bytes_per_device": p_dev + o_dev,
        "param_bytes_total": _bytes_total(params), "opt_state_bytes_total": _bytes_total(opt_state),
        "sharded_param_leaves": sum(1 for x in leaves if any(a is not None for a in x.sharding.spec)),
        "param_leaves": len(leaves),
        "first_loss": losses[0], "timing": timing.as_dict(), "step_s": timing.median,
    }


def _vs(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def run_mesh_bench(opts: MeshOptions) -> dict[str, Any]:
    """The single-device baseline, then every mesh of ``opts``, one after the other (only one
    mesh's state is on the devices at a time). Returns one JSON-able dict (``markdown`` renders it)."""
    devices = devices_for(opts.devices_needed)  # before anything starts a backend
    w = opts.workload
    config = w.config()
    machine = hw.machine()
    simulated = jax.default_backend() == "cpu"
    result: dict[str, Any] = {
        "kind": "mesh",
        "simulated_devices": simulated,
        "timing_note": (SIMULATED_NOTE.format(n=len(devices), cores=machine["cpu_count"]) if simulated else
                        f"Real {machine['backend']} devices ({machine['device_kind']}): step times are "
                        "measured on them."),
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
                 "versions": hw.versions(), "command": opts.command, "perf": opts.perf.label(),
                 "steps": opts.steps},
        "workload": {**w.describe(), "param_count": param_count(config), "architecture": hf_architecture(config)},
        "runs": [],
    }
    params_np = init_reference(config, w.seed)
    batch_np = make_batch(config, w.batch, w.seq_len, w.seed)
    base: dict[str, Any] | None = None
    for sizes in ({}, *opts.sizes):
        n = math.prod(sizes.values()) if sizes else 1
        print(f"[bench --mesh] {mesh_label(sizes)} ({n} device{'s' if n > 1 else ''}): compiling and timing "
              f"{opts.steps} steps", file=sys.stderr, flush=True)
        rec = measure(config, params_np, batch_np, sizes, devices[:n], opts.perf, opts.steps)
        if base is None:
            base = rec
        rec["vs_single"] = {
            "state_bytes_per_device": _vs(rec["state_bytes_per_device"], base["state_bytes_per_device"]),
            "peak_estimate": _vs(rec["xla_memory"].get("peak_estimate"), base["xla_memory"].get("peak_estimate")),
            "step_s": _vs(rec["step_s"], base["step_s"]),
            "loss_rel_diff": abs(rec["first_loss"] - base["first_loss"]) / max(abs(base["first_loss"]), 1e-30),
        }
        result["runs"].append(rec)
    result["meta"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table, with the simulated-devices warning first when it applies."""
    meta, wl = result["meta"], result["workload"]
    m = meta["machine"]
    sim = result["simulated_devices"]
    steps = meta["steps"]
    lines = [
        f"# Mesh benchmark: {wl['preset']} ({wl['architecture']}), batch {wl['batch']} x {wl['seq_len']}, "
        f"{wl['dtype']}: JAX training step (AdamW)",
        "",
        (f"**SIMULATED DEVICES.** {result['timing_note']}" if sim else result["timing_note"]),
        "",
        *meta_lines(meta, devices=m["device_count"]),
        f"- parameters: {wl['param_count'] / 1e6:.2f}M; JAX options: {meta['perf']}",
        "",
        "Bytes are per device. State = parameters + AdamW moments held by each device; XLA plan = "
        "`compiled.memory_analysis()` of the step (arguments + outputs + temporaries).",
        "",
        f"| mesh | devices | sharded leaves | params / device | optimizer / device | state vs single | "
        f"XLA arguments | XLA outputs | XLA temp | XLA plan | plan vs single | "
        f"step ms (median of {steps}{', simulated' if sim else ''}) | time vs single | loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        xm, vs = r["xla_memory"], r["vs_single"]
        lines.append(
            f"| {r['mesh']} | {r['devices']} | {r['sharded_param_leaves']}/{r['param_leaves']} | "
            f"{si(r['param_bytes_per_device'], 'B')} | {si(r['opt_state_bytes_per_device'], 'B')} | "
            f"{ratio(vs['state_bytes_per_device'])} | {si(xm.get('argument'), 'B')} | {si(xm.get('output'), 'B')} | "
            f"{si(xm.get('temp'), 'B')} | {si(xm.get('peak_estimate'), 'B')} | {ratio(vs['peak_estimate'])} | "
            f"{num(1e3 * r['step_s'], '.1f')} | {ratio(vs['step_s'])} | {vs['loss_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def write_all(result: dict[str, Any], out_dir: str | Path, name: str) -> dict[str, Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    atomic_write_text(md, markdown(result))
    return {"json": write_json(result, out / f"{name}.json"), "md": md}
