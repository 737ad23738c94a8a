"""The ``bigmodel`` command line (also ``python -m bigmodel_jax``)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any


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


def _cmd_diff(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 traces; float32 arrays stay float32
    from bigmodel_port.diff import DIFF_TOLERANCE, run_diff, write_json
    from reference_numpy.tolerances import Tolerance

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
            raise SystemExit(f"bigmodel diff: --ids takes comma-separated integers, got {args.ids!r}") from None
    report = run_diff(args.model_dir, args.a, args.b, dtype=args.dtype, overrides=args.set or (), ids=ids,
                      text=args.text, seed=args.seed, length=args.length, batch_size=args.batch,
                      tolerance=tolerance)
    sys.stdout.write(report.format())
    if args.json:
        write_json(report, args.json)
    return 0 if report.passed else 1


# --------------------------------------------------------------------------------------------
# training: train / eval / generate / demo (the loop lives in bigmodel_train)

_RUN_PRESETS_HELP = "gpt-stdlib, minilm-docstrings, seq2seq-numbers, vit-digits, demo"


def _train_config(args: argparse.Namespace) -> Any:
    """RunConfig from --preset / a leading preset word, --config, key=value and the flags."""
    from bigmodel_train.config import build_config

    assignments = list(args.assignments or [])
    preset = args.preset
    if assignments and "=" not in assignments[0]:
        if preset is not None:
            raise SystemExit(f"bigmodel train: two presets given ({preset!r} and {assignments[0]!r})")
        preset = assignments.pop(0)
    bad = [a for a in assignments if "=" not in a]
    if bad:
        raise SystemExit(f"bigmodel train: {bad[0]!r} is not key=value (e.g. lr=3e-4 or model.d_model=64)")
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
    """Train and map the failures to exit codes: 1 for divergence / non-finite values."""
    import shutil

    from bigmodel_train.checkpoint import list_checkpoints
    from bigmodel_train.config import ConfigError
    from bigmodel_train.data.stream import DataError
    from bigmodel_train.steps import NonFiniteError
    from bigmodel_train.trainer import RunCorruptError, VerifyError, train

    if not resume and list_checkpoints(run_dir):
        if not overwrite:
            print(f"bigmodel train: {run_dir} already holds checkpoints; continue it with --resume, start over "
                  f"with --overwrite, or pick another --run-dir", file=sys.stderr)
            return 2
        shutil.rmtree(Path(run_dir) / "checkpoints")
    try:
        train(cfg, run_dir, resume=resume, stop_after=stop_after)
    except (VerifyError, NonFiniteError, RunCorruptError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, FileNotFoundError) as err:  # bad settings or bad data: say which
        print(f"bigmodel train: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bigmodel_train.config import ConfigError, load_run_config

    try:
        if args.resume and not args.run_dir:
            cfg, preset = _train_config(args)
            args.run_dir = _default_run_dir(cfg, preset)
        if args.resume and (Path(args.run_dir) / "config.json").exists():
            # the run's own config; command-line key=value may change steps / logging only
            import dataclasses

            from bigmodel_train.config import parse_overrides, validate

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
    except ConfigError as err:
        print(f"bigmodel train: {err}", file=sys.stderr)
        return 2
    return _run_training(cfg, run_dir, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)


def _print_metrics(task: Any, m: dict[str, Any]) -> None:
    from bigmodel_train.metrics import format_classification_report

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
    import json

    from bigmodel_train.logging import jsonable
    from bigmodel_train.trainer import evaluate_run

    task, m = evaluate_run(args.run_dir, args.split, checkpoint=args.checkpoint, backend=args.backend,
                           max_examples=args.max_examples)
    print(f"{args.run_dir} ({args.split}, {m.get('n', m.get('tokens', '?'))} "
          f"{'tokens' if 'tokens' in m else 'examples'}):")
    _print_metrics(task, m)
    if args.json:
        from bigmodel_port.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(jsonable(m), indent=2) + "\n")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from bigmodel_train.tasks import LMTask, TranslationTask

    path = Path(args.model)
    prompts = args.prompt or ["def "]
    if (path / "config.json").exists() and (path / "checkpoints").is_dir():
        from bigmodel_train.trainer import load_run

        cfg, task, params, _ = load_run(path, args.checkpoint)
        if args.backend == "jax":
            from bigmodel_jax.tree import to_jax

            params = to_jax(params)
        if isinstance(task, LMTask):
            for i, prompt in enumerate(prompts):
                text = task.sample(params, args.backend, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed + i)
                print(text)
                print("-" * 40)
        elif isinstance(task, TranslationTask):
            for src, hyp in zip(prompts, task.translate(params, prompts, args.backend, num_beams=args.num_beams)):
                print(f"{src}  ->  {hyp}")
        else:
            print(f"bigmodel generate: {path} is a {cfg.task!r} run, which does not generate text", file=sys.stderr)
            return 2
        return 0
    if (path / "config.json").exists():
        return _generate_hf(path, prompts, args)
    print(f"bigmodel generate: {path} is neither a run directory (config.json + checkpoints/) nor an HF model "
          f"directory (config.json + weights)", file=sys.stderr)
    return 2


def _generate_hf(path: Path, prompts: list[str], args: argparse.Namespace) -> int:
    """Generate with an HF directory: AutoModelForCausalLM, or MarianMTModel for translation."""
    import json

    import numpy as np

    hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    pkg = __import__("bigmodel_jax" if args.backend == "jax" else "reference_numpy")
    from bigmodel_port.tokenization import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    seq2seq = hf.get("model_type") == "marian" or hf.get("is_encoder_decoder", False)
    model = (pkg.MarianMTModel if seq2seq else pkg.AutoModelForCausalLM).from_pretrained(path)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.temperature > 0 and not seq2seq:
        options.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for prompt in prompts:
        enc = tokenizer([prompt], return_tensors="np")
        ids = np.asarray(enc["input_ids"])
        out = np.asarray(model.generate(ids, attention_mask=enc.get("attention_mask"), **options))
        text = tokenizer.decode(out[0].tolist() if seq2seq else out[0, ids.shape[1]:].tolist(),
                                skip_special_tokens=True)
        print(text if seq2seq else prompt + text)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bigmodel_train.config import ConfigError, build_config

    assignments = list(args.assignments or [])
    if args.steps is not None:
        assignments.append(f"steps={args.steps}")
    if args.no_progress:
        assignments.append("progress=false")
    try:
        cfg = build_config("demo", None, assignments)
    except ConfigError as err:
        print(f"bigmodel demo: {err}", file=sys.stderr)
        return 2
    import json
    import time

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


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
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
            checkpoints/ (keep-last-N, atomic), metrics.jsonl, TensorBoard events, loss.png and
            metrics.png, summary.json. Exits 1 if --verify-steps finds the JAX and NumPy
            trajectories diverging or a loss / gradient becomes non-finite.

            run presets: {_RUN_PRESETS_HELP}

            data: lm: stdlib | file.txt | file.jsonl (text); classification: docstrings |
            file.jsonl (text, label); translation: numbers | numbers-fr | file.jsonl (source,
            target); image: digits | file.npz (images, labels) | images.npy,labels.npy

            examples:
              bigmodel train vit-digits                       # ViT on sklearn digits
              bigmodel train gpt-stdlib steps=300 lr=1e-3 --verify-steps 3
              bigmodel train minilm-docstrings --run-dir runs/cls
              bigmodel train task=lm model=llama-tiny data=notes.txt tokenizer=byte seq_len=64
              bigmodel train --config run.toml accumulate_steps=4 mixed_precision=true
              bigmodel train --resume --run-dir runs/vit-digits"""),
    )
    p.add_argument("assignments", nargs="*", metavar="[PRESET] KEY=VALUE",
                   help="a run preset name first (optional), then key=value overrides")
    p.add_argument("--preset", help=f"run preset ({_RUN_PRESETS_HELP})")
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
    p.add_argument("--stop-after", type=int, metavar="K",
                   help="stop with a checkpoint after K updates, as if interrupted (then --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p.__class__ = _IntermixedParser  # key=value overrides before and after the options

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
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", default="val", help="train, val or test (default val)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file (default: the latest)")
    p.add_argument("--backend", choices=["jax", "numpy"], default="jax", help="implementation to run")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate the first N examples only (0: all)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "generate", help="generate text with a trained run or an HF model directory", formatter_class=raw,
        description=textwrap.dedent(
            """\
            Continue prompts with a causal LM, or translate source sentences with an
            encoder-decoder. MODEL is a run directory of `bigmodel train` (task lm or
            translation), or a local HF directory loaded with AutoModelForCausalLM (GPT-2,
            Llama) or MarianMTModel, with its tokenizer. Nothing is downloaded.

            examples:
              bigmodel generate runs/gpt-stdlib --prompt "import os" --max-new-tokens 60
              bigmodel generate runs/seq2seq-numbers --prompt "three hundred and twelve"
              bigmodel generate ./gpt2 --prompt "Hello" --temperature 0"""),
    )
    p.add_argument("model", metavar="MODEL", help="run directory or HF model directory")
    p.add_argument("--prompt", action="append", help="prompt / source sentence (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (default 40)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width for translation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file of the run (default: the latest)")
    p.add_argument("--backend", choices=["jax", "numpy"], default="jax", help="implementation to run")
    p.set_defaults(func=_cmd_generate)

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
    p.__class__ = _IntermixedParser


def _cmd_tune(args: argparse.Namespace) -> int:
    from bigmodel_train.config import ConfigError
    from bigmodel_train.data.stream import DataError
    from bigmodel_train.tune import grid_trials, parse_grid, parse_random, random_trials, tune

    specs = list(args.specs or [])
    preset = args.preset
    if specs and "=" not in specs[0]:
        if preset is not None:
            print(f"bigmodel tune: two presets given ({preset!r} and {specs[0]!r})", file=sys.stderr)
            return 2
        preset = specs.pop(0)
    fixed = list(args.set or [])
    if args.no_progress:
        fixed.append("progress=false")
    try:
        if args.random is not None:
            from bigmodel_train.config import build_config

            task = build_config(preset, args.config, fixed).task  # which model.<field> keys are ints
            trials = random_trials(parse_random(specs), args.random, args.search_seed, task)
        else:
            trials = grid_trials(parse_grid(specs))
        run_dir = args.run_dir or str(Path("runs") / f"tune-{preset or 'config'}")
        result = tune(trials, run_dir, preset=preset, config_file=args.config, fixed=fixed, metric=args.metric,
                      mode=args.mode, overwrite=args.overwrite, trial_out=print if args.verbose else None)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as err:
        print(f"bigmodel tune: {err}", file=sys.stderr)
        return 2
    return 0 if result.best is not None else 1


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-parser that takes its positionals anywhere among the options
    (``bigmodel tune demo --random 8 lr=log:1e-4:1e-2``); plain argparse stops filling an
    ``nargs="*"`` positional at the first option."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="grid or random hyper-parameter search over `bigmodel train`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            f"""\
            Train one run per trial in RUN_DIR/trial_NNN on the base configuration (a run
            preset, --config FILE, --set key=value) plus the trial's values, and rank the
            trials by a validation metric. Any run-config key or model.<field> can be searched.

            grid (every combination):    lr=1e-3,3e-4 weight_decay=0,0.01
            random (--random N draws, seeded by --search-seed):
              lr=log:1e-4:1e-2   log-uniform        dropout=uniform:0:0.3   uniform
              warmup_steps=int:0:20  integers       batch_size=choice:8,16  (or 8,16)
            Integer fields drawn from uniform / log ranges are rounded.

            metrics: val_loss, val_perplexity (minimised); val_accuracy, val_macro_f1,
            val_bleu, val_exact_match, ... (maximised); test_<name> where a test split exists.

            Prints a table (trial, values, metric, wall time) and writes
            RUN_DIR/tune_results.csv and RUN_DIR/best_config.json, and the command that
            re-runs the best trial (bigmodel train --config RUN_DIR/best_config.json).
            Exits 1 if every trial failed (e.g. a non-finite loss).

            run presets: {_RUN_PRESETS_HELP}

            examples:
              bigmodel tune vit-digits lr=1e-3,3e-3 weight_decay=0,0.05 --set steps=300
              bigmodel tune demo --random 8 lr=log:1e-4:1e-2 dropout=uniform:0:0.3 \\
                  batch_size=choice:16,32 --set steps=100 --metric val_loss
              bigmodel tune minilm-docstrings lr=3e-5,1e-4 --metric val_macro_f1"""),
    )
    p.add_argument("specs", nargs="*", metavar="[PRESET] KEY=SPEC",
                   help="a run preset name first (optional), then the search space")
    p.add_argument("--preset", help=f"run preset ({_RUN_PRESETS_HELP})")
    p.add_argument("--config", metavar="FILE", help="base run config file (.json or .toml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a fixed override applied to every trial; repeatable (--set steps=100 --set seed=1)")
    p.add_argument("--random", type=int, metavar="N", help="random search with N trials (default: grid)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random-search draws (default 0)")
    p.add_argument("--metric", default="val_loss", help="metric to optimise (default val_loss)")
    p.add_argument("--mode", choices=["min", "max"], help="direction (default: min for loss / perplexity, else max)")
    p.add_argument("--run-dir", help="output directory (default runs/tune-<preset>)")
    p.add_argument("--overwrite", action="store_true", help="redo trials whose directories exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the trials")
    p.add_argument("--verbose", action="store_true", help="print each trial's own training output")
    p.set_defaults(func=_cmd_tune)
    p.__class__ = _IntermixedParser  # add_parser builds a plain ArgumentParser


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
    diff.add_argument("--length", type=int, default=8, help="tokens per sequence with --seed (default 8)")
    diff.add_argument("--batch", type=int, default=1, help="sequences / images with --seed (default 1)")
    diff.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                      help="dtype of every side (default float32; float64 exposes subtle bugs)")
    diff.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a field of our config on our side(s); repeatable")
    diff.add_argument("--rtol", type=float, help="row tolerance on max rel (default per dtype)")
    diff.add_argument("--atol", type=float, help="row tolerance on max abs (default per dtype)")
    diff.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    diff.set_defaults(func=_cmd_diff)
    _add_convert(sub)
    _add_training_commands(sub)
    _add_tune(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``bigmodel bench``: the benchmark suite (``bigmodel_jax.bench``; same flags as
    ``python benchmarks/bench.py``)."""
    from bigmodel_jax.bench.cli import __doc__ as bench_doc
    from bigmodel_jax.bench.cli import add_arguments

    p = sub.add_parser(
        "bench", help="benchmarks: our JAX vs HF transformers (PyTorch) vs our NumPy reference",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=bench_doc)
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bigmodel_jax.bench.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bigmodel`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
