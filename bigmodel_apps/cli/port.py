"""Porting commands: ``bigmodel convert`` (checkpoint formats) and ``bigmodel diff`` (per-layer
divergence of one checkpoint in two implementations)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from bigmodel_apps.cli.parsing import positive_int
from bigmodel_port.convert import convert
from bigmodel_port.diff import DIFF_TOLERANCE, run_diff, write_json
from reference_numpy.tolerances import Tolerance


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_diff(sub)
    _add_convert(sub)


def _add_diff(sub: argparse._SubParsersAction) -> None:
    sides = ["reference", "jax", "torch"]
    diff = sub.add_parser(
        "diff",
        help="per-layer divergence report of one checkpoint in two implementations",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Run one HF-layout checkpoint directory on one input in two of {reference, jax,
            torch (transformers)} and print, layer by layer (embeddings, each block's attention
            and MLP output, final norm, logits), the max abs and max rel (normwise) error, marking
            the first layer past tolerance: where a porting bug enters. Exits 1 if any row fails.

            --set key=value changes a field of OUR config after the weights are loaded (our
            side(s) only; torch runs the checkpoint as saved), to reproduce a porting bug.

            examples:
              bigmodel diff ./bert-base-uncased --a reference --b torch --text "Hello world"
              bigmodel diff ./llama --a jax --b torch --seed 0 --dtype float64
              bigmodel diff ./bert --a jax --b torch --ids 101,7592,102 --set norm_eps=1e-5"""
        ),
    )
    diff.add_argument("model_dir", metavar="DIR", help="local model directory (config.json + weights)")
    diff.add_argument("--a", default="reference", choices=sides, help="first side (default reference)")
    diff.add_argument("--b", default="torch", choices=sides, help="second side, the error's scale (default torch)")
    given = diff.add_mutually_exclusive_group()
    given.add_argument("--text", help="input text, tokenized with DIR's tokenizer")
    given.add_argument("--ids", help="input token ids, comma-separated (one sequence)")
    given.add_argument("--seed", type=int, help="random token ids (or pixels for ViT) from this seed (default 0)")
    diff.add_argument("--length", type=positive_int, default=8, help="tokens per sequence with --seed (default 8)")
    diff.add_argument("--batch", type=positive_int, default=1, help="sequences / images with --seed (default 1)")
    diff.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                      help="dtype of every side (default float32; float64 exposes subtle bugs)")
    diff.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a field of our config on our side(s); repeatable")
    diff.add_argument("--rtol", type=float, help="row tolerance on max rel (default per dtype)")
    diff.add_argument("--atol", type=float, help="row tolerance on max abs (default per dtype)")
    diff.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    diff.set_defaults(func=_cmd_diff)


def _cmd_diff(args: argparse.Namespace) -> int:
    import jax  # loads when the command runs, not for `bigmodel --help`

    jax.config.update("jax_enable_x64", True)  # float64 traces; float32 arrays stay float32
    tolerance = None
    if args.rtol is not None or args.atol is not None:
        default = DIFF_TOLERANCE[args.dtype]
        tolerance = Tolerance(rel=default.rel if args.rtol is None else args.rtol,
                              abs=default.abs if args.atol is None else args.atol)
    ids = None
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--ids takes comma-separated integers, got {args.ids!r}") from None
    report = run_diff(args.model_dir, args.a, args.b, dtype=args.dtype, overrides=args.set or (), ids=ids,
                      text=args.text, seed=args.seed, length=args.length, batch_size=args.batch,
                      tolerance=tolerance)
    sys.stdout.write(report.format())
    if args.json:
        write_json(report, args.json)
    return 0 if report.passed else 1


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


def _cmd_convert(args: argparse.Namespace) -> int:
    print(convert(args.src, args.dst, architecture=args.architecture, dtype=args.dtype,
                  strict=not args.partial, max_shard_size=args.max_shard_size))
    return 0
