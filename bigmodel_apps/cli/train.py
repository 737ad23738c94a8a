"""Training commands: ``bigmodel train``, ``bigmodel eval`` and ``bigmodel demo`` (the loop
itself lives in ``bigmodel_train``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import time
from pathlib import Path
from typing import Any

from bigmodel_apps.cli.parsing import IntermixedParser, nonnegative_int, positive_int
from bigmodel_port.atomic import atomic_write_text
from bigmodel_train.checkpoint import list_checkpoints
from bigmodel_train.config import (
    RUN_PRESETS,
    ConfigError,
    build_config,
    load_run_config,
    parse_overrides,
    validate,
)
from bigmodel_train.logging import jsonable
from bigmodel_train.metrics import format_classification_report
from bigmodel_train.trainer import evaluate_run, train

RUN_PRESETS_HELP = ", ".join(RUN_PRESETS)  # for the help texts of train and tune


def add_commands(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "train", help="train a model (JAX or the NumPy reference) on built-in data or your files",
        formatter_class=raw,
        description=textwrap.dedent(
            f"""\
            Train one of the four families on a built-in offline data set or your own files.
            The configuration is a run preset, then --config FILE (.json / .toml), then
            key=value overrides; model.<field>=value sets a field of the model config (e.g.
            model.n_layers=4). Unknown keys are refused. Writes RUN_DIR/config.json,
            checkpoints/ (Orbax steps: async, keep-last-N, atomic), metrics.jsonl, TensorBoard
            events, loss.png and metrics.png, summary.json. Several hosts: coordinator=HOST:PORT
            num_processes=N process_id=I on each (or JAX's environment), with a mesh. Exits 1 if --verify-steps finds the JAX and NumPy
            trajectories diverging or a loss / gradient becomes non-finite.

            run presets: {RUN_PRESETS_HELP}

            data: lm: stdlib | file.txt | file.jsonl (text); classification: docstrings |
            file.jsonl (text, label); translation: numbers | numbers-fr | file.jsonl (source,
            target); image: digits | file.npz (images, labels) | images.npy,labels.npy

            examples:
              bigmodel train vit-digits                       # ViT on the shipped 8x8 digits
              bigmodel train gpt-stdlib steps=300 lr=1e-3 --verify-steps 3
              bigmodel train minilm-docstrings --run-dir runs/cls
              bigmodel train task=lm model=llama-tiny data=notes.txt tokenizer=byte seq_len=64
              bigmodel train --config run.toml accumulate_steps=4 mixed_precision=true
              bigmodel train --resume --run-dir runs/vit-digits"""),
    )
    p.add_argument("assignments", nargs="*", metavar="[PRESET] KEY=VALUE",
                   help="a run preset name first (optional), then key=value overrides")
    p.add_argument("--preset", help=f"run preset ({RUN_PRESETS_HELP})")
    p.add_argument("--config", metavar="FILE", help="run config file (.json or .toml)")
    p.add_argument("--run-dir", help="output directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR from its latest checkpoint (bit-identical to an uninterrupted run)")
    p.add_argument("--overwrite", action="store_true", help="start over in a RUN_DIR that holds checkpoints")
    p.add_argument("--verify-steps", type=int, metavar="N",
                   help="run the first N steps on JAX and on the NumPy reference; stop if they diverge")
    p.add_argument("--backend", choices=["jax", "numpy"], help="jax (default) or the NumPy reference trainer")
    p.add_argument("--steps", type=int, help="number of optimizer updates (same as steps=N)")
    p.add_argument("--seed", type=int, help="seed of init, data order and dropout (same as seed=N)")
    p.add_argument("--stop-after", type=positive_int, metavar="K",
                   help="stop with a checkpoint after K updates, as if interrupted (then --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p.__class__ = IntermixedParser  # key=value overrides before and after the options

    p = sub.add_parser(
        "eval", help="evaluate a run's checkpoint on a split and print its metrics", formatter_class=raw,
        description=textwrap.dedent(
            """\
            Load a run directory written by `bigmodel train` (its latest checkpoint, or
            --checkpoint), rebuild its data split with the run's own preprocessing (tokenizer,
            vocabulary, labels) and print the task's metrics: loss and perplexity (lm); accuracy,
            precision / recall / F1 (micro, macro, per class), confusion matrix and top-k
            (classification, image); exact match and BLEU of greedy decoding (translation).
            The record is also appended to RUN_DIR/metrics.jsonl.

            examples:
              bigmodel eval runs/vit-digits --split test
              bigmodel eval runs/gpt-stdlib --max-examples 256 --json val.json"""),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `bigmodel train`")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split to score (default val)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint: a step directory (or a .safetensors file of the earlier format); default: the latest")
    p.add_argument("--backend", choices=["jax", "numpy"], default="jax", help="implementation to run")
    p.add_argument("--max-examples", type=nonnegative_int, default=0,
                   help="evaluate the first N examples only (0: all)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "demo", help="the main job: train a small GPT on the stdlib source, verified against NumPy",
        formatter_class=raw,
        description=textwrap.dedent(
            """\
            Train a small GPT (2 layers, D=96) on the Python standard library's own source
            code with a BPE vocabulary trained on it, with a progress bar (throughput, ETA);
            verify the first 2 steps against the NumPy reference (exit 1 if they diverge);
            report validation perplexity, a generated sample and the throughput, and write
            the loss plot. A few minutes on 2 CPU cores. Takes the same key=value overrides as
            `bigmodel train` (preset "demo").

            examples:
              bigmodel demo
              bigmodel demo --steps 100 --run-dir /tmp/demo"""),
    )
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="overrides of the demo preset")
    p.add_argument("--run-dir", default=str(Path("runs") / "demo"), help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int, help="optimizer updates (default 400)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    p.__class__ = IntermixedParser


def _train_config(args: argparse.Namespace) -> Any:
    """RunConfig from --preset / a leading preset word, --config, key=value and the flags."""
    assignments = list(args.assignments or [])
    preset = args.preset
    if assignments and "=" not in assignments[0]:
        if preset is not None:
            raise ConfigError(f"two presets given ({preset!r} and {assignments[0]!r})")
        preset = assignments.pop(0)
    bad = [a for a in assignments if "=" not in a]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not key=value (e.g. lr=3e-4 or model.d_model=64)")
    for flag, key in (("verify_steps", "verify_steps"), ("backend", "backend"), ("steps", "steps"),
                      ("seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            assignments.append(f"{key}={value}")
    if getattr(args, "no_progress", False):
        assignments.append("progress=false")
    return build_config(preset, args.config, assignments), preset


def _default_run_dir(cfg: Any, preset: str | None) -> str:
    return str(Path("runs") / (preset or f"{cfg.task}-{cfg.model}"))


def _run_training(cfg: Any, run_dir: str, *, resume: bool, stop_after: int | None = None,
                  overwrite: bool = False) -> int:
    """Train; failures reach the shell through ``cli.errors`` (2: bad input, 1: a failed run,
    130 / 143: interrupted after a checkpoint)."""
    if not resume and not overwrite and list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with --resume, start over with "
                          "--overwrite, or pick another --run-dir")
    train(cfg, run_dir, resume=resume, stop_after=stop_after, overwrite=overwrite)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over: pass one of them")
    if args.resume and not args.run_dir:
        cfg, preset = _train_config(args)
        args.run_dir = _default_run_dir(cfg, preset)
    if args.resume and (Path(args.run_dir) / "config.json").exists():
        # the run's own config; command-line key=value may change steps / logging only
        saved = load_run_config(args.run_dir)
        changes = parse_overrides([a for a in (args.assignments or []) if "=" in a])
        for flag in ("steps", "verify_steps"):
            if getattr(args, flag, None) is not None:
                changes[flag] = getattr(args, flag)
        if args.no_progress:
            changes["progress"] = False
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(saved)})
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}")
        cfg, run_dir = validate(dataclasses.replace(saved, **changes)), args.run_dir
    else:
        cfg, preset = _train_config(args)
        run_dir = args.run_dir or _default_run_dir(cfg, preset)
    return _run_training(cfg, run_dir, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)


def _print_metrics(task: Any, m: dict[str, Any]) -> None:
    print(task.summary(m))
    for k, v in m.items():
        if isinstance(v, float):
            print(f"  {k:>18}: {v:.6g}")
    if "per_class" in m:
        report = {name: {"precision": d["precision"], "recall": d["recall"], "f1-score": d["f1"],
                         "support": d["support"]} for name, d in m["per_class"].items()}
        report["accuracy"] = m["accuracy"]
        n = sum(d["support"] for d in m["per_class"].values())
        report["micro avg"] = {"precision": m["precision_micro"], "recall": m["recall_micro"],
                               "f1-score": m["f1_micro"], "support": n}
        report["macro avg"] = {"precision": m["precision_macro"], "recall": m["recall_macro"],
                               "f1-score": m["f1_macro"], "support": n}
        print()
        print(format_classification_report(report))
        names = m["labels"]
        width = max(len(str(x)) for x in names + [str(max(max(r) for r in m["confusion_matrix"]))]) + 1
        print("confusion matrix (rows: true, columns: predicted)")
        print(" " * width + "".join(f"{str(n)[:width]:>{width}}" for n in names))
        for name, row in zip(names, m["confusion_matrix"]):
            print(f"{str(name)[:width]:>{width}}" + "".join(f"{c:>{width}}" for c in row))
    for ex in m.get("examples", []):
        print(f"  {ex['source']}  ->  {ex['hypothesis']}   (reference: {ex['reference']})")


def _cmd_eval(args: argparse.Namespace) -> int:
    task, m = evaluate_run(args.run_dir, args.split, checkpoint=args.checkpoint, backend=args.backend,
                           max_examples=args.max_examples)
    print(f"{args.run_dir} ({args.split}, {m.get('n', m.get('tokens', '?'))} "
          f"{'tokens' if 'tokens' in m else 'examples'}):")
    _print_metrics(task, m)
    if args.json:
        atomic_write_text(args.json, json.dumps(jsonable(m), indent=2) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    assignments = list(args.assignments or [])
    if args.steps is not None:
        assignments.append(f"steps={args.steps}")
    if args.no_progress:
        assignments.append("progress=false")
    cfg = build_config("demo", None, assignments)
    print("bigmodel demo: a small GPT on the Python standard library's source (BPE vocabulary trained on it), "
          f"{cfg.steps} steps; the first {cfg.verify_steps} steps are checked against the NumPy reference.")
    start = time.time()
    code = _run_training(cfg, args.run_dir, resume=False, overwrite=True)
    summary = Path(args.run_dir) / "summary.json"
    if code == 0 and summary.exists():
        s = json.loads(summary.read_text(encoding="utf-8"))
        print(f"\ndemo done in {time.time() - start:.0f} s: validation perplexity {s['val']['perplexity']:.1f} "
              f"(an untrained model: ~{cfg.vocab_size}), {s['throughput']:,.0f} tokens/s, "
              f"{s['verified_steps']} steps verified against NumPy; loss plot {Path(args.run_dir) / 'loss.png'}")
    return code
