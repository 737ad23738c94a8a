"""Every registered parity case, default options, both dtypes: reference vs JAX, and FD."""

from __future__ import annotations

import numpy as np
import pytest

import bigmodel_apps.parity.cases  # noqa: F401  (registers the cases)
from bigmodel_apps.parity.harness import REGISTRY, compare, format_rows, gradcheck_case

CASES = [(name, i, opts) for name, case in sorted(REGISTRY.items()) for i, opts in enumerate(case.default_options)]
IDS = [f"{name}-{i}" for name, i, _ in CASES]
# whole models take seconds per case and dtype (JAX compiles each): in the slow subset
WHOLE_MODELS = {"bert", "gpt", "seq2seq", "vit"}
PARITY_CASES = [pytest.param(*case, id=case_id, marks=[pytest.mark.slow] if case[0] in WHOLE_MODELS else [])
                for case, case_id in zip(CASES, IDS)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "i", "options"), PARITY_CASES)
def test_reference_matches_jax(name, i, options, dtype):
    data = REGISTRY[name].make(np.random.default_rng(i), dtype, **options)
    rows = compare(data, dtype, seed=i)
    assert all(r.passed for r in rows), format_rows(f"{name} {options} {np.dtype(dtype).name}", rows)


@pytest.mark.parametrize(("name", "i", "options"), CASES, ids=IDS)
def test_reference_backward_matches_finite_differences(name, i, options):
    data = REGISTRY[name].make(np.random.default_rng(100 + i), np.float64, **options)
    report = gradcheck_case(data, seed=i)
    assert report.ok, f"{name} {options}\n{report}"
