"""Run logs: ``metrics.jsonl`` (one JSON record per line), TensorBoard event files, PNG plots.

Every record is ``{"step": int, "split": "train" | "val" | "test" | ..., "time": float, ...}``
plus the metrics themselves. Scalars also go to TensorBoard as ``<split>/<name>`` (event files
under ``run_dir/tensorboard``, readable by ``tensorboard --logdir run_dir``); lists and tables
(a confusion matrix, per-class F1) stay in the JSONL only. ``plot_metrics`` draws the loss
curves (``loss.png``) and every other scalar metric (``metrics.png``) from the JSONL, so plots
can be redrawn from any finished or interrupted run.

Nothing here imports jax; matplotlib and tensorboardX (the ``[train]`` extra) are imported when
used (a run with ``plots=false tensorboard=false`` needs neither); a missing one raises
``MissingExtraError`` naming ``pip install 'bigmodel-jax[train]'``.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_bytes, atomic_write_text
from bigmodel_train.extras import missing_extra

__all__ = ["METRICS_FILE", "RunLogger", "read_metrics", "plot_metrics", "jsonable"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def jsonable(x: Any) -> Any:
    """NumPy / JAX scalars and arrays -> plain Python (lists, floats, ints); NaN/inf as strings
    would break plotting, so they stay floats (JSON ``NaN`` / ``Infinity``, which json reads)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    if hasattr(x, "shape") and hasattr(x, "tolist"):  # np.ndarray, jax.Array
        return jsonable(np.asarray(x).tolist())
    return x


def _is_scalar(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class RunLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and, optionally, TensorBoard event files.

    ``resume_step``: continuing a run from a checkpoint at that step; records written after it by
    the interrupted run are dropped first (they would be repeated), and TensorBoard is told to
    purge them too.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        summary_writer: Any = None  # tensorboardX.SummaryWriter when tensorboard
        if tensorboard:  # imported first: a missing extra leaves the run directory untouched
            try:
                from tensorboardX import SummaryWriter as summary_writer
            except ImportError as err:
                raise missing_extra("tensorboardX", "TensorBoard logging (tensorboard=true)", err,
                                    off="tensorboard=false") from err
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if summary_writer is not None:
            kw = {} if resume_step is None else {"purge_step": resume_step + 1}
            self._tb = summary_writer(logdir=str(self.run_dir / TENSORBOARD_DIR), **kw)

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one record; returns it (JSON-able)."""
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **jsonable(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "split", "time") or not _is_scalar(v):
                    continue
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _series(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """(split, metric) -> (steps, values) for every finite scalar metric."""
    series: dict[tuple[str, str], tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        for k, v in r.items():
            if k in ("step", "split", "time") or not _is_scalar(v) or not math.isfinite(v):
                continue
            steps, values = series[(r["split"], k)]
            steps.append(r["step"])
            values.append(float(v))
    return series


# Metrics that are bookkeeping, not quality: kept out of metrics.png.
_NOT_PLOTTED = {"lr", "grad_norm", "elapsed_s", "epoch", "n", "tokens"}


def plot_metrics(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw ``loss.png`` (train and validation loss against step; log scale when it spans a
    decade) and ``metrics.png`` (one panel per other metric, one line per split) next to the
    run's ``metrics.jsonl``; returns the files written (none when there is nothing to plot)."""
    try:
        import matplotlib
    except ImportError as err:
        raise missing_extra("matplotlib", "plots (plots=true)", err, off="plots=false") from err
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = _series(read_metrics(run_dir))
    written: list[Path] = []
    loss_keys = [key for key in series if key[1] == "loss"]
    if loss_keys:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        lo, hi = math.inf, -math.inf
        for split, name in sorted(loss_keys):
            steps, values = series[(split, name)]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=f"{split} loss")
            lo, hi = min(lo, min(values)), max(hi, max(values))
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"loss — {run_dir.name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, run_dir / "loss.png"))
        plt.close(fig)
    names = sorted({name for (_, name) in series
                    if name != "loss" and name not in _NOT_PLOTTED and not name.endswith("_per_s")})
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for (split, n), (steps, values) in sorted(series.items()):
                if n == name:
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=split)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "metrics.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically (a reader never sees half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path
