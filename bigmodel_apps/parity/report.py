"""The parity report: every registered case, both dtypes, one table, non-zero exit on failure."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import jax
import numpy as np

import bigmodel_apps.parity.cases  # noqa: F401  (registers every case)
from bigmodel_apps.parity.harness import (
    MATMUL_PRECISION,
    REGISTRY,
    TRAJECTORIES,
    adamw_trajectory,
    compare,
    gradcheck_case,
)
from reference_numpy.tolerances import GRADCHECK_REL


@dataclass
class ReportLine:
    case: str
    options: str
    dtype: str
    quantity: str
    max_abs: float
    rel: float
    tol: float
    passed: bool


def _options_label(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def run_report(
    dtypes: tuple[str, ...] = ("float64", "float32"),
    only: list[str] | None = None,
    with_gradcheck: bool = True,
) -> list[ReportLine]:
    """Run every case (or those whose name is in ``only``) and return one line per quantity."""
    if "float64" in dtypes and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 parity needs jax_enable_x64 set before any JAX work")
    lines: list[ReportLine] = []
    names = sorted(REGISTRY) if not only else [n for n in sorted(REGISTRY) if n in only]
    unknown = set(only or ()) - set(REGISTRY) - set(TRAJECTORIES)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}; known: {sorted(REGISTRY)}")
    for name in names:
        case = REGISTRY[name]
        for i, options in enumerate(case.default_options):
            label = _options_label(options)
            for dtype in dtypes:
                data = case.make(np.random.default_rng(i), np.dtype(dtype), **options)
                for row in compare(data, dtype, seed=i):
                    lines.append(ReportLine(name, label, dtype, row.quantity, row.max_abs,
                                            row.rel, row.tol.rel, row.passed))
            if with_gradcheck:
                data = case.make(np.random.default_rng(100 + i), np.float64, **options)
                rep = gradcheck_case(data, seed=i)
                worst = max(rep.rows, key=lambda r: r.rel, default=None)
                if worst is not None:
                    lines.append(ReportLine(name, label, "float64", f"finite-diff (worst: {worst.name})",
                                            worst.max_abs, worst.rel, GRADCHECK_REL, rep.ok))
    for name in sorted(TRAJECTORIES):
        if only and name not in only:
            continue
        for dtype in dtypes:
            params, ref_lg, jax_lg = TRAJECTORIES[name].make(np.dtype(dtype))
            rows = adamw_trajectory(params, ref_lg, jax_lg, dtype, steps=5)
            for kind in ("loss at step", "params after"):
                group = [r for r in rows if r.quantity.startswith(kind)]
                worst = max(group, key=lambda r: r.rel)
                label = "5 AdamW steps: " + ("worst loss" if kind == "loss at step" else "worst param")
                lines.append(ReportLine(name, "trajectory", dtype, f"{label} ({worst.quantity.split(': ')[-1]})",
                                        worst.max_abs, worst.rel, worst.tol.rel, all(r.passed for r in group)))
    return lines


def print_report(lines: list[ReportLine], out: TextIO | None = None) -> None:
    """Render the table plus a summary line (to stdout by default)."""
    out = sys.stdout if out is None else out
    out.write(f"bigmodel-jax parity report: jax {jax.__version__} on {jax.default_backend()}, "
              f"matmul precision '{MATMUL_PRECISION}', x64={jax.config.jax_enable_x64}\n")
    out.write("errors are normwise: max|jax - ref| and max|jax - ref| / max|ref|\n\n")
    header = f"{'case':<12} {'options':<34} {'dtype':<8} {'quantity':<44} {'max abs':>9} {'max rel':>9} {'tol':>7}  result"
    out.write(header + "\n" + "-" * len(header) + "\n")
    for ln in lines:
        out.write(
            f"{ln.case:<12} {ln.options[:34]:<34} {ln.dtype:<8} {ln.quantity[:44]:<44} "
            f"{ln.max_abs:9.2e} {ln.rel:9.2e} {ln.tol:7.0e}  {'PASS' if ln.passed else 'FAIL'}\n"
        )
    failed = [ln for ln in lines if not ln.passed]
    out.write(f"\n{len(lines) - len(failed)} passed, {len(failed)} failed\n")


def write_json(lines: list[ReportLine], path: str) -> None:
    with open(path, "w") as f:
        json.dump([ln.__dict__ for ln in lines], f, indent=1)
