"""``bigmodel bench``: the benchmark suite (``bigmodel_apps.bench``; same flags as
``python benchmarks/bench.py``)."""

from __future__ import annotations

import argparse

from bigmodel_apps.bench.cli import __doc__ as bench_doc
from bigmodel_apps.bench.cli import add_arguments, run


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: our JAX vs HF transformers (PyTorch) vs our NumPy reference",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=bench_doc)
    add_arguments(p)
    p.set_defaults(func=run)
