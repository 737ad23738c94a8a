"""The ``bigmodel`` command line (also ``python -m bigmodel_jax``)."""

from __future__ import annotations

import argparse
import sys
import textwrap


def _cmd_check(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 parity; float32 arrays stay float32
    from bigmodel_jax.parity.report import print_report, run_report, write_json

    lines = run_report(tuple(args.dtype), args.only, with_gradcheck=not args.no_gradcheck)
    print_report(lines)
    if args.json:
        write_json(lines, args.json)
    return 0 if all(ln.passed for ln in lines) else 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from bigmodel_port.convert import convert

    print(convert(args.src, args.dst, architecture=args.architecture, dtype=args.dtype,
                  strict=not args.partial, max_shard_size=args.max_shard_size))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between HF model directories, native .safetensors and .npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Convert a checkpoint; each format is read from its path: a directory is an HF model
            directory (config.json + model.safetensors / shards / pytorch_model.bin), a
            .safetensors file is our native format (tree + config + format version), .npz is
            the same tree as NumPy arrays. HF -> native/npz -> HF writes the same tensors bit
            for bit. Models are never downloaded: SRC must be local.

            examples:
              bigmodel convert ./bert-base-uncased bert.safetensors
              bigmodel convert bert.safetensors bert.npz --dtype float64
              bigmodel convert bert.npz ./bert-hf            # back to transformers' layout"""
        ),
    )
    p.add_argument("src", help="HF directory, .safetensors (native) or .npz")
    p.add_argument("dst", help="HF directory, .safetensors (native) or .npz")
    p.add_argument("--architecture", help="HF class to write or read as (e.g. BertForMaskedLM)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="cast every parameter")
    p.add_argument("--partial", action="store_true",
                   help="allow a partial HF load (missing / mismatched tensors freshly initialised)")
    p.add_argument("--max-shard-size", default="5GB", help="shard HF safetensors above this size")
    p.set_defaults(func=_cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel",
        description="Transformer models in NumPy (reference) and JAX, kept in agreement.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
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
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bigmodel`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
