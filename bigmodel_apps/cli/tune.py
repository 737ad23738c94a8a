"""``bigmodel tune``: grid or random hyper-parameter search over ``bigmodel train``."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from bigmodel_apps.cli.parsing import IntermixedParser
from bigmodel_apps.cli.train import RUN_PRESETS_HELP
from bigmodel_train.config import ConfigError, build_config
from bigmodel_train.tune import grid_trials, parse_grid, parse_random, random_trials, tune


def add_commands(sub: argparse._SubParsersAction) -> None:
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

            run presets: {RUN_PRESETS_HELP}

            examples:
              bigmodel tune vit-digits lr=1e-3,3e-3 weight_decay=0,0.05 --set steps=300
              bigmodel tune demo --random 8 lr=log:1e-4:1e-2 dropout=uniform:0:0.3 \\
                  batch_size=choice:16,32 --set steps=100 --metric val_loss
              bigmodel tune minilm-docstrings lr=3e-5,1e-4 --metric val_macro_f1"""),
    )
    p.add_argument("specs", nargs="*", metavar="[PRESET] KEY=SPEC",
                   help="a run preset name first (optional), then the search space")
    p.add_argument("--preset", help=f"run preset ({RUN_PRESETS_HELP})")
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
    p.__class__ = IntermixedParser  # add_parser builds a plain ArgumentParser


def _cmd_tune(args: argparse.Namespace) -> int:
    specs = list(args.specs or [])
    preset = args.preset
    if specs and "=" not in specs[0]:
        if preset is not None:
            raise ConfigError(f"two presets given ({preset!r} and {specs[0]!r})")
        preset = specs.pop(0)
    fixed = list(args.set or [])
    if args.no_progress:
        fixed.append("progress=false")
    if args.random is not None:
        if args.random < 1:
            raise ConfigError(f"--random takes a number of trials >= 1, got {args.random}")
        task = build_config(preset, args.config, fixed).task  # which model.<field> keys are ints
        trials = random_trials(parse_random(specs), args.random, args.search_seed, task)
    else:
        trials = grid_trials(parse_grid(specs))
    run_dir = args.run_dir or str(Path("runs") / f"tune-{preset or 'config'}")
    result = tune(trials, run_dir, preset=preset, config_file=args.config, fixed=fixed, metric=args.metric,
                  mode=args.mode, overwrite=args.overwrite, trial_out=print if args.verbose else None)
    return 0 if result.best is not None else 1
