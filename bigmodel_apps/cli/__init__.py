"""The ``bigmodel`` command line (also ``python -m bigmodel_apps``): one module per command group.

* ``check``                      the parity report (``cli.check``)
* ``diff``, ``convert``          porting (``cli.port``)
* ``train``, ``eval``, ``demo``  training runs (``cli.train``)
* ``generate``                   text from a run or an HF directory (``cli.generate``)
* ``tune``                       hyper-parameter search (``cli.tune``)
* ``bench``                      the benchmark suite (``cli.bench``)
* ``plan``                       the memory planner (``cli.plan``)
* ``export``                     a run / HF dir / checkpoint as HF, StableHLO or ONNX (``cli.export``)
* ``serve``                      an OpenAI-compatible HTTP server (``cli.serve``)

Building the parser loads no jax: a command imports the modules that load jax when it runs,
so ``bigmodel --help`` stays fast. Failures reach the shell as one ``error: …`` line and an
exit code (``cli.errors``: 2 for bad input, 1 for a failed run, 130 / 143 for signals).
"""

from __future__ import annotations

import argparse

from bigmodel_apps.cli import bench, check, export, generate, plan, port, serve, train, tune
from bigmodel_apps.cli.errors import run_command
from reference_numpy.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel",
        description="Transformer models in NumPy (reference) and JAX, kept in agreement.",
    )
    parser.add_argument("--version", action="version", version=f"bigmodel {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (check, port, train, generate, tune, bench, plan, export, serve):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bigmodel`` console script."""
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)

