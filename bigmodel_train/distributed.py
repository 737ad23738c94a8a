"""Multi-process (multi-host) training on JAX's own runtime: ``jax.distributed``.

JAX runs one Python process per host (multi-controller SPMD). Every process runs the same
program; ``jax.distributed.initialize`` connects them through a coordinator, after which
``jax.devices()`` lists every process's devices and one ``Mesh`` spans them all. A jitted step
on arrays sharded over that mesh is one SPMD program: XLA's collectives cross hosts (NCCL on
GPUs, ICI / DCN on TPUs, gloo over TCP on CPUs).

Where a run gets its coordinates, in this order:

* the run config's keys ``coordinator=HOST:PORT``, ``num_processes=N``, ``process_id=I``;
* JAX's own environment for what the keys leave out: ``JAX_COORDINATOR_ADDRESS`` (JAX reads it
  itself), and the cluster detection of ``jax.distributed.initialize`` (SLURM, Open MPI,
  Kubernetes, Cloud TPU), which fills in the number of processes and this process's id where
  the scheduler provides them (JAX has no environment variable for those two outside a
  cluster: give them as keys).

``coordinator=auto`` asks for JAX's detection alone. With no coordinator key, no
``num_processes`` above 1 and no ``JAX_COORDINATOR_ADDRESS``, the run is a single process and
nothing is initialised.

What the trainer does differently on several processes (``trainer``):

* the data: each process builds only the rows of the global batch that its own devices hold
  (``steps._Placement.local_rows``: our own per-process sampler over the run's deterministic
  batch order; every process computes the same global order from the seed, then reads its slice);
* output: logging, progress, metrics, plots, config and artifacts are written by process 0;
  checkpoints are written cooperatively by all processes (Orbax: each writes its shards);
* a stop signal must reach every process (as a cluster scheduler sends it); the processes agree
  on stopping after each update, so all of them checkpoint the same step.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["agree", "initialize", "is_main", "process_count", "process_index", "sync", "wanted"]

_INITIALIZED: tuple[str, int, int] | None = None


def wanted(cfg: Any) -> bool:
    """Whether ``cfg`` (a ``RunConfig``) or the environment asks for a multi-process run."""
    return bool(getattr(cfg, "coordinator", "") or getattr(cfg, "num_processes", 0) > 1
                or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(cfg: Any) -> None:
    """Connect this process to the others (``jax.distributed.initialize``) if ``cfg`` or the
    environment asks for it (module docstring); a second call with the same coordinates is a
    no-op. On CPU the cross-process collectives are gloo's. Raises ``ValueError`` for
    incomplete coordinates, and when the mesh does not span every process's devices."""
    global _INITIALIZED
    if not wanted(cfg):
        return
    coordinator = cfg.coordinator if cfg.coordinator not in ("", "auto") else None
    if not cfg.coordinator and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(f"num_processes={cfg.num_processes} but no coordinator: set coordinator=HOST:PORT "
                         "(process 0's address), JAX_COORDINATOR_ADDRESS, or coordinator=auto on a cluster JAX detects")
    if not cfg.mesh:
        raise ValueError("a multi-process run shards the JAX step over one mesh spanning every process: set mesh=...")
    num = cfg.num_processes if cfg.num_processes > 0 else None
    pid = cfg.process_id if cfg.process_id >= 0 else None
    key = (str(coordinator), num or 0, -1 if pid is None else pid)
    if _INITIALIZED is not None:
        if _INITIALIZED != key:
            raise ValueError(f"this process already joined a distributed run {_INITIALIZED}; it cannot join {key}")
        return
    import jax

    # gloo carries CPU collectives across processes; other platforms ignore the setting
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    except (ValueError, TypeError) as err:
        raise ValueError(f"distributed run: {err} (set coordinator=HOST:PORT num_processes=N process_id=I, "
                         "or JAX_COORDINATOR_ADDRESS and a scheduler JAX detects)") from None
    _INITIALIZED = key
    if jax.process_count() > 1 and cfg.verify_steps:
        raise ValueError("verify_steps runs the NumPy reference beside the step in one process; verify on one host")
    if cfg.mesh:
        from bigmodel_jax.sharding import parse_mesh

        sizes = parse_mesh(cfg.mesh)
        n = 1
        for v in sizes.values():
            n *= v
        if n != jax.device_count():
            raise ValueError(f"mesh {cfg.mesh} has {n} devices; a {jax.process_count()}-process run has "
                             f"{jax.device_count()} and the mesh must span all of them")


def process_index() -> int:
    """This process's index (0 without jax or outside a distributed run)."""
    import sys

    jax = sys.modules.get("jax")
    return 0 if jax is None else jax.process_index()


def process_count() -> int:
    """The number of processes in the run (1 outside a distributed run)."""
    import sys

    jax = sys.modules.get("jax")
    return 1 if jax is None else jax.process_count()


def is_main() -> bool:
    """True on the process that writes logs, progress and files (process 0)."""
    return process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (returns at once in a single-process run)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a stop signal seen by one of them)."""
    if process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))
