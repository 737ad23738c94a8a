"""Hyper-parameter search over the trainer: grid or seeded random search.

A search space maps run-config keys (any ``RunConfig`` field, or ``model.<field>``) to values::

    grid:    lr=1e-3,3e-4  weight_decay=0,0.01           -> every combination (itertools.product)
    random:  lr=log:1e-4:1e-2  dropout=uniform:0:0.3      -> N draws from a seeded generator
             warmup_steps=int:0:20  batch_size=choice:8,16

Each trial is one ``train(...)`` run in ``RUN_DIR/trial_NNN/`` on the base configuration
(preset <- config file <- fixed overrides) plus the trial's values. Every trial's config is built
and validated before the first one trains, so a bad spec fails in seconds, not after an hour.
The results go to ``RUN_DIR/tune_results.csv`` (rewritten after every trial, so an interrupted
search keeps what it finished) and the best trial's full configuration to
``RUN_DIR/best_config.json``, which ``bigmodel train --config`` re-runs as is.

Integer fields (``batch_size``, ``warmup_steps``, ...) drawn from ``uniform`` / ``log`` ranges are
rounded to the nearest integer. Nothing here imports jax (the trainer does, when a trial runs).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_train.config import (
    RUN_PRESETS,
    ConfigError,
    RunConfig,
    _parse_scalar,
    _unknown,
    build_config,
    model_config_class,
    parse_overrides,
    save_config,
)
from bigmodel_train.steps import NonFiniteError
from bigmodel_train.trainer import VerifyError, train

__all__ = [
    "Distribution", "TuneResult", "Trial", "parse_grid", "parse_random", "grid_trials", "random_trials",
    "metric_spec", "tune", "format_table",
]

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_RUN_TYPES = typing.get_type_hints(RunConfig)
DIST_KINDS = ("log", "uniform", "int", "choice")

# metric aliases -> (split, key in the task's evaluate() dict)
_ALIASES = {"val_macro_f1": "val_f1_macro", "val_micro_f1": "val_f1_micro", "val_acc": "val_accuracy",
            "val_ppl": "val_perplexity", "test_macro_f1": "test_f1_macro", "test_acc": "test_accuracy"}
_MINIMISED = ("loss", "perplexity")  # everything else (accuracy, f1, bleu, exact match) is maximised


@dataclass(frozen=True)
class Distribution:
    """One random-search dimension: ``log`` / ``uniform`` on [low, high], ``int`` on the integers
    low..high (both included), or ``choice`` among ``values``."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[Any, ...] = ()

    def sample(self, rng: np.random.Generator, integer: bool = False) -> Any:
        """One draw; ``integer`` rounds a continuous draw (an int-typed field)."""
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "log":  # log-uniform: uniform in log space, so each decade is equally likely
            x = float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        else:
            x = float(rng.uniform(self.low, self.high))
        x = min(max(x, self.low), self.high)  # exp(log(x)) may round a hair outside the bounds
        return int(round(x)) if integer else x


@dataclass
class Trial:
    """One finished (or failed) trial."""

    index: int
    values: dict[str, Any]
    run_dir: Path
    metric: float | None = None  # None: the run failed (non-finite loss, ...)
    wall_s: float = 0.0
    error: str | None = None
    val: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneResult:
    """What ``tune`` returns."""

    trials: list[Trial]
    metric: str
    mode: str  # "min" | "max"
    best: Trial | None
    best_config: Path | None
    results_csv: Path


# --------------------------------------------------------------------------------------------
# parsing the search space


def _split_spec(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise ConfigError(f"search spec {spec!r} is not key=values (e.g. lr=1e-3,3e-4 or lr=log:1e-4:1e-2)")
    if not key.startswith("model.") and key not in _RUN_FIELDS:
        raise _unknown(key, sorted(_RUN_FIELDS) + ["model.<field>"], f"search spec {spec!r}: run-config")
    if key == "model.":
        raise ConfigError(f"search spec {spec!r}: 'model.' needs a field name, e.g. model.d_model=64,128")
    return key, value.strip()


def _values(spec: str, text: str) -> tuple[Any, ...]:
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ConfigError(f"search spec {spec!r}: empty value in the list {text!r}")
    vals = tuple(_parse_scalar(t) for t in items)
    if len(set(map(repr, vals))) != len(vals):
        raise ConfigError(f"search spec {spec!r}: a value is repeated in {text!r}")
    return vals


def _number(spec: str, text: str, what: str) -> float:
    v = _parse_scalar(text.strip())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"search spec {spec!r}: {what} must be a finite number, got {text!r}")
    return float(v)


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-3,3e-4", "weight_decay=0,0.01"]`` -> ``{"lr": [1e-3, 3e-4], "weight_decay": [0, 0.01]}``
    (key order kept: the first key varies slowest). Raises ``ConfigError`` naming the bad spec."""
    space: dict[str, list[Any]] = {}
    for spec in specs:
        key, text = _split_spec(spec)
        if key in space:
            raise ConfigError(f"search spec {spec!r}: {key} is given twice")
        if text.split(":", 1)[0] in DIST_KINDS and ":" in text:
            raise ConfigError(f"search spec {spec!r}: {text!r} is a random-search range; add --random N "
                              f"(grid search takes comma-separated values, e.g. {key}=1e-3,3e-4)")
        space[key] = list(_values(spec, text))
    if not space:
        raise ConfigError("empty search space: give at least one key=values (e.g. lr=1e-3,3e-4)")
    return space


def parse_random(specs: Sequence[str]) -> dict[str, Distribution]:
    """Random-search dimensions: ``key=log:LOW:HIGH`` (log-uniform, 0 < LOW < HIGH),
    ``key=uniform:LOW:HIGH``, ``key=int:LOW:HIGH`` (integers, both ends included),
    ``key=choice:A,B,...`` or plain ``key=A,B,...`` (choice; one value: fixed)."""
    space: dict[str, Distribution] = {}
    for spec in specs:
        key, text = _split_spec(spec)
        if key in space:
            raise ConfigError(f"search spec {spec!r}: {key} is given twice")
        kind, sep, rest = text.partition(":")
        if not sep or kind not in DIST_KINDS:
            if sep and kind.isalpha():
                raise ConfigError(f"search spec {spec!r}: unknown distribution {kind!r}; use one of "
                                  f"{', '.join(DIST_KINDS)} (e.g. lr=log:1e-4:1e-2)")
            space[key] = Distribution("choice", values=_values(spec, text))
            continue
        if kind == "choice":
            space[key] = Distribution("choice", values=_values(spec, rest))
            continue
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise ConfigError(f"search spec {spec!r}: {kind} needs LOW:HIGH, e.g. {key}={kind}:"
                              + ("1e-4:1e-2" if kind == "log" else "0:10"))
        low, high = _number(spec, bounds[0], "LOW"), _number(spec, bounds[1], "HIGH")
        if not low < high:
            raise ConfigError(f"search spec {spec!r}: LOW ({bounds[0]}) must be < HIGH ({bounds[1]})")
        if kind == "log" and low <= 0:
            raise ConfigError(f"search spec {spec!r}: a log range needs LOW > 0, got {bounds[0]}")
        if kind == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"search spec {spec!r}: int bounds must be integers, got {bounds[0]}:{bounds[1]}")
        space[key] = Distribution(kind, low, high)
    if not space:
        raise ConfigError("empty search space: give at least one key=range (e.g. lr=log:1e-4:1e-2)")
    return space


def grid_trials(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, the last key varying fastest."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def _is_int_field(key: str, task: str | None) -> bool:
    if key.startswith("model."):
        if task is None:
            return False
        hints = typing.get_type_hints(model_config_class(task))
        return hints.get(key[len("model."):]) is int
    return _RUN_TYPES.get(key) is int


def random_trials(space: Mapping[str, Distribution], n: int, seed: int, task: str | None = None
                  ) -> list[dict[str, Any]]:
    """``n`` draws from ``np.random.default_rng(seed)``, keys in order within a trial (the same
    seed and space give the same trials). ``task`` tells which ``model.<field>`` keys are ints."""
    if n < 1:
        raise ConfigError(f"--random needs at least 1 trial, got {n}")
    rng = np.random.default_rng(seed)
    return [{k: d.sample(rng, _is_int_field(k, task)) for k, d in space.items()} for _ in range(n)]


# --------------------------------------------------------------------------------------------
# the metric


def metric_spec(metric: str, task: str, mode: str | None = None) -> tuple[str, str, str]:
    """``(split, key, mode)`` of a metric name such as ``val_loss`` (min), ``val_accuracy`` /
    ``val_macro_f1`` / ``val_bleu`` (max). ``mode`` ("min" / "max") overrides the direction."""
    name = _ALIASES.get(metric, metric)
    split, sep, key = name.partition("_")
    if not sep or split not in ("val", "test") or not key:
        raise ConfigError(f"--metric {metric!r}: expected val_<name> or test_<name>, e.g. val_loss, "
                          f"val_accuracy, val_macro_f1")
    known = _TASK_METRICS[task]
    if key not in known:
        raise _unknown(key, known, f"--metric {metric!r} (task {task}):")
    if mode is None:
        mode = "min" if key in _MINIMISED else "max"
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got {mode!r}")
    return split, key, mode


_CLS = ["loss", "accuracy", "precision_micro", "recall_micro", "f1_micro", "precision_macro", "recall_macro",
        "f1_macro", "top3_accuracy"]
# the scalar metrics each task's evaluate() returns (bigmodel_train/tasks.py)
_TASK_METRICS: dict[str, list[str]] = {
    "lm": ["loss", "perplexity", "accuracy", "top5_accuracy"],
    "classification": _CLS,
    "image": _CLS,
    "translation": ["loss", "perplexity", "token_accuracy", "exact_match", "bleu"],
}


# --------------------------------------------------------------------------------------------
# running the search


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(trials: Sequence[Trial], keys: Sequence[str], metric: str, best: Trial | None) -> str:
    """The results as an aligned text table (``*`` marks the best trial)."""
    header = ["trial", *keys, metric, "wall_s"]
    rows = [[f"{t.index:03d}" + ("*" if t is best else ""), *(_fmt(t.values[k]) for k in keys),
             _fmt(t.metric) if t.metric is not None else f"failed: {(t.error or '')[:40]}", f"{t.wall_s:.1f}"]
            for t in trials]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _write_csv(path: Path, trials: Sequence[Trial], keys: Sequence[str], metric: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", *keys, metric, "wall_s", "status", "run_dir"])
    for t in trials:
        w.writerow([t.index, *(json.dumps(t.values[k]) if not isinstance(t.values[k], str) else t.values[k]
                               for k in keys),
                    "" if t.metric is None else repr(t.metric), f"{t.wall_s:.3f}",
                    "ok" if t.error is None else f"failed: {t.error}", str(t.run_dir)])
    atomic_write_text(path, buf.getvalue())


def tune(
    trials: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike[str],
    *,
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    fixed: Sequence[str] | Mapping[str, Any] = (),
    metric: str = "val_loss",
    mode: str | None = None,
    overwrite: bool = False,
    out: Callable[[str], None] = print,
    trial_out: Callable[[str], None] | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> TuneResult:
    """Train every trial (base config + its values) into ``run_dir/trial_NNN`` and rank them by
    ``metric``. Writes ``run_dir/tune_results.csv`` and ``run_dir/best_config.json``.

    A trial whose run fails (non-finite loss, divergence) is recorded as failed and the search goes
    on; a bad configuration raises ``ConfigError`` before anything trains. ``trial_out`` receives
    the trainer's own messages (default: dropped, the table is the report).
    """
    if train_fn is None:
        train_fn = train
    if not trials:
        raise ConfigError("no trials to run")
    if preset is not None and preset not in RUN_PRESETS:
        raise _unknown(preset, list(RUN_PRESETS), "run preset")
    run_dir = Path(run_dir)
    base = dict(parse_overrides(fixed) if not isinstance(fixed, Mapping) else fixed)
    keys = list(trials[0])
    configs: list[RunConfig] = []
    for i, values in enumerate(trials):
        try:
            configs.append(build_config(preset, config_file, {**base, **values}))
        except ConfigError as err:
            raise ConfigError(f"trial {i:03d} {_fmt_values(values)}: {err}") from None
    split, key, mode = metric_spec(metric, configs[0].task, mode)
    if len(configs) != len({json.dumps(c.to_dict(), sort_keys=True) for c in configs}):
        out("note: some trials have identical configurations (a key repeats a fixed value?)")
    run_dir.mkdir(parents=True, exist_ok=True)
    for i in range(len(configs)):
        d = run_dir / f"trial_{i:03d}"
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{d} already exists; pass --overwrite (overwrite=True) to redo the "
                                      f"search or pick another --run-dir")
            shutil.rmtree(d)
    out(f"tuning {len(configs)} trials of {preset or config_file or 'the defaults'} on {metric} ({mode}); "
        f"runs in {run_dir}/trial_NNN")
    results_csv = run_dir / "tune_results.csv"
    done: list[Trial] = []
    sink = trial_out or (lambda _msg: None)
    for i, (values, cfg) in enumerate(zip(trials, configs)):
        d = run_dir / f"trial_{i:03d}"
        t0 = time.time()
        trial = Trial(i, dict(values), d)
        try:
            res = train_fn(cfg, d, out=sink)
            metrics = res.val if split == "val" else (res.test or {})
            if key not in metrics:
                raise ConfigError(f"--metric {metric}: the run reported no {split} {key!r}; it has "
                                  f"{sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
            trial.metric, trial.val = float(metrics[key]), dict(res.val)
            if not math.isfinite(trial.metric):
                trial.error, trial.metric = f"{metric} is {trial.metric}", None
        except (NonFiniteError, VerifyError) as err:
            trial.error = str(err).splitlines()[0]
        trial.wall_s = time.time() - t0
        done.append(trial)
        shown = _fmt(trial.metric) if trial.metric is not None else f"failed ({trial.error})"
        out(f"trial {i:03d}/{len(configs) - 1:03d} {_fmt_values(values)}: {metric}={shown} ({trial.wall_s:.1f} s)")
        _write_csv(results_csv, done, keys, metric)
    ok = [t for t in done if t.metric is not None]
    # ties go to the earlier trial (min/max keep the first of equal keys)
    best = (min(ok, key=lambda t: t.metric) if mode == "min" else max(ok, key=lambda t: t.metric)) if ok else None
    best_config = None
    out("")
    out(format_table(done, keys, metric, best))
    out(f"results: {results_csv}")
    if best is None:
        out("every trial failed: no best configuration")
    else:
        best_config = run_dir / "best_config.json"
        save_config(configs[best.index], best_config)
        out(f"best: trial {best.index:03d} {_fmt_values(best.values)} {metric}={_fmt(best.metric)}")
        out(f"best config: {best_config}")
        out(f"re-run it:   bigmodel train --config {best_config} --run-dir {run_dir / 'best'}")
    return TuneResult(done, metric, mode, best, best_config, results_csv)


def _fmt_values(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items())

