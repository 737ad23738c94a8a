"""``bigmodel check``: the parity report of every layer and model (NumPy reference vs JAX)."""

from __future__ import annotations

import argparse
import textwrap


def add_commands(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "check",
        help="parity report: every layer in both implementations, errors vs tolerances",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Run every registered layer once in the NumPy reference and in JAX on identical
            parameters and inputs; compare the output and every gradient (hand-written backward
            vs jax.vjp), and check the reference backward against finite differences.
            Exits 1 if anything is past its tolerance.

            example:  bigmodel check --dtype float32 --only attention linear"""
        ),
    )
    check.add_argument("--dtype", nargs="+", default=["float64", "float32"],
                       choices=["float64", "float32"], help="dtypes to compare (default both)")
    check.add_argument("--only", nargs="+", metavar="CASE", help="only these cases")
    check.add_argument("--no-gradcheck", action="store_true", help="skip finite differences")
    check.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    check.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    # jax and the harness load when the command runs, not for `bigmodel --help`
    import jax

    from bigmodel_apps.parity.report import print_report, run_report, write_json

    jax.config.update("jax_enable_x64", True)  # float64 parity; float32 arrays stay float32
    lines = run_report(tuple(args.dtype), args.only, with_gradcheck=not args.no_gradcheck)
    print_report(lines)
    if args.json:
        write_json(lines, args.json)
    return 0 if all(ln.passed for ln in lines) else 1
