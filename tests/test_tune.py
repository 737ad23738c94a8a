"""`bigmodel tune`: grid / random search spaces, the results CSV, the best-config file, bad specs.

The end-to-end test trains 2 trials of the tiny GPT of tests/test_trainer.py for 2 steps; the
ranking tests use a stand-in ``train_fn`` (no compile) so that failures and both directions are
covered in milliseconds.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.config import ConfigError, build_config, load_run_config
from bigmodel_train.steps import NonFiniteError
from bigmodel_train.trainer import TrainResult
from bigmodel_train.tune import grid_trials, metric_spec, parse_grid, parse_random, random_trials, tune

# the tiny LM of tests/test_trainer.py (byte tokenizer, a slice of the stdlib corpus)
LM = ["task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte", "max_chars=60000", "seq_len=16",
      "batch_size=4", "warmup_steps=1", "max_eval_examples=8", "eval_batch_size=8", "sample_tokens=0",
      "progress=false", "plots=false", "tensorboard=false", "log_every=1", "steps=2"]


# --------------------------------------------------------------------------------------------
# search spaces


def test_grid_enumerates_the_product_in_order() -> None:
    space = parse_grid(["lr=1e-3,3e-4,1e-4", "weight_decay=0,0.01", "batch_size=8,16", "model.dropout=0.1"])
    assert space == {"lr": [1e-3, 3e-4, 1e-4], "weight_decay": [0, 0.01], "batch_size": [8, 16],
                     "model.dropout": [0.1]}
    trials = grid_trials(space)
    brute = []  # nested loops, the last key fastest
    for lr in (1e-3, 3e-4, 1e-4):
        for wd in (0, 0.01):
            for bs in (8, 16):
                brute.append({"lr": lr, "weight_decay": wd, "batch_size": bs, "model.dropout": 0.1})
    assert trials == brute and len(trials) == 3 * 2 * 2


def test_random_search_is_seeded_and_respects_ranges() -> None:
    space = parse_random(["lr=log:1e-4:1e-2", "dropout=uniform:0:0.3", "batch_size=choice:8,16",
                          "warmup_steps=uniform:0:5", "model.n_layers=int:1:3", "weight_decay=0,0.01"])
    a = random_trials(space, 400, seed=7, task="lm")
    assert a == random_trials(space, 400, seed=7, task="lm")  # deterministic given the seed
    assert a != random_trials(space, 400, seed=8, task="lm")
    lr = np.array([t["lr"] for t in a])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    # log-uniform: each decade holds about half the draws (a plain uniform would put ~9% in the
    # lower decade); binomial sd at n=400 is 0.025, so 0.4..0.6 is a 4-sd band
    assert 0.4 < np.mean(lr < 1e-3) < 0.6
    assert all(0 <= t["dropout"] <= 0.3 for t in a)
    assert {t["batch_size"] for t in a} == {8, 16}
    assert {t["weight_decay"] for t in a} == {0, 0.01}
    # integer fields come out as ints covering their (inclusive) range
    assert {t["warmup_steps"] for t in a} == set(range(6)) and all(type(t["warmup_steps"]) is int for t in a)
    assert {t["model.n_layers"] for t in a} == {1, 2, 3}


@pytest.mark.parametrize("specs, mode, match", [
    (["lr"], "grid", "not key=values"),
    (["lr="], "grid", "not key=values"),
    (["lrr=1e-3,1e-4"], "grid", "did you mean 'lr'"),
    (["lr=1e-3,,1e-4"], "grid", "empty value"),
    (["lr=1e-3,1e-3"], "grid", "repeated"),
    (["lr=1e-3", "lr=1e-4"], "grid", "given twice"),
    (["lr=log:1e-4:1e-2"], "grid", "random-search range; add --random"),
    ([], "grid", "empty search space"),
    (["lr=log:0:1e-2"], "random", "LOW > 0"),
    (["lr=log:1e-2:1e-4"], "random", "must be < HIGH"),
    (["lr=log:1e-4"], "random", "needs LOW:HIGH"),
    (["lr=uniform:a:1"], "random", "LOW must be a finite number"),
    (["lr=gauss:0:1"], "random", "unknown distribution 'gauss'"),
    (["warmup_steps=int:0:2.5"], "random", "int bounds must be integers"),
])
def test_bad_specs_are_refused_with_the_spec_named(specs: list[str], mode: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_grid(specs) if mode == "grid" else parse_random(specs)


def test_bad_metric_and_bad_trial_values_fail_before_training(tmp_path: Path) -> None:
    assert metric_spec("val_loss", "lm") == ("val", "loss", "min")
    assert metric_spec("val_macro_f1", "classification") == ("val", "f1_macro", "max")
    with pytest.raises(ConfigError, match="did you mean 'bleu'"):
        metric_spec("val_blue", "translation")
    with pytest.raises(ConfigError, match="val_<name>"):
        metric_spec("loss", "lm")

    def never(*_a, **_k):
        raise AssertionError("no trial may train when one configuration is bad")

    # the third trial's warmup is not < steps: refused with the trial named, nothing trained
    with pytest.raises(ConfigError, match=r"trial 001 warmup_steps=5: warmup_steps \(5\) must be < steps"):
        tune(grid_trials(parse_grid(["warmup_steps=0,5"])), tmp_path, fixed=LM, train_fn=never, out=lambda _: None)
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        tune([{"model.d_modle": 8}], tmp_path, fixed=LM, train_fn=never, out=lambda _: None)
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        tune([{"lr": 1e-3}], tmp_path, fixed=LM, metric="val_accurcy", train_fn=never, out=lambda _: None)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# ranking (a stand-in trainer)


def fake_train(cfg, run_dir, *, out=print, **_):
    """val accuracy peaks at lr = 1e-3; lr >= 1 'diverges'."""
    if cfg.lr >= 1:
        raise NonFiniteError(1, "loss", "planted")
    acc = 1 - abs(math.log10(cfg.lr) + 3) / 10
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "summary.json").write_text("{}")
    return TrainResult(run_dir=Path(run_dir), step=cfg.steps, val={"loss": 1 - acc, "accuracy": acc})


def test_failed_trials_are_recorded_and_the_best_is_picked_in_both_directions(tmp_path: Path) -> None:
    trials = grid_trials(parse_grid(["lr=1e-2,1e-3,10,1e-4"]))
    res = tune(trials, tmp_path / "max", fixed=LM, metric="val_accuracy", train_fn=fake_train, out=lambda _: None)
    assert res.mode == "max" and res.best.values == {"lr": 1e-3}
    assert res.trials[2].metric is None and "planted" in res.trials[2].error
    res = tune(trials, tmp_path / "min", fixed=LM, metric="val_loss", train_fn=fake_train, out=lambda _: None)
    assert res.mode == "min" and res.best.values == {"lr": 1e-3}
    res = tune(trials, tmp_path / "forced", fixed=LM, metric="val_loss", mode="max", train_fn=fake_train,
               out=lambda _: None)
    assert res.best.values == {"lr": 1e-2}  # loss 0.1 ties with lr=1e-4; the earlier trial wins
    rows = list(csv.DictReader(open(tmp_path / "max" / "tune_results.csv")))
    assert [r["status"].split(":")[0] for r in rows] == ["ok", "ok", "failed", "ok"]
    # a finished search is not silently redone in the same directory
    with pytest.raises(FileExistsError, match="--overwrite"):
        tune(grid_trials(parse_grid(["lr=1e-2,1e-3"])), tmp_path / "max", fixed=LM, train_fn=fake_train,
             out=lambda _: None)


# --------------------------------------------------------------------------------------------
# end to end, from the command line


def test_tune_cli_grid_end_to_end(tmp_path: Path, capsys) -> None:
    """2 real trials: one CSV row each with the values; the best (by each trial's own
    summary.json) is written as a config that build_config and `train --config` reproduce."""
    run_dir = tmp_path / "tune"
    argv = ["tune", "lr=3e-3,1e-2", "--run-dir", str(run_dir), *itertools.chain(*(["--set", a] for a in LM))]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(run_dir / "tune_results.csv")))
    assert [(r["trial"], float(r["lr"])) for r in rows] == [("0", 3e-3), ("1", 1e-2)]
    losses = []
    for i, r in enumerate(rows):
        trial_dir = run_dir / f"trial_{i:03d}"
        assert load_run_config(trial_dir).lr == float(r["lr"])
        summary = json.loads((trial_dir / "summary.json").read_text())
        assert float(r["val_loss"]) == pytest.approx(summary["val"]["loss"], rel=1e-12)
        assert float(r["wall_s"]) > 0
        losses.append(summary["val"]["loss"])
    best = int(np.argmin(losses))
    best_file = run_dir / "best_config.json"
    cfg = build_config(None, best_file, [])
    assert cfg == load_run_config(run_dir / f"trial_{best:03d}")
    assert cfg.lr == float(rows[best]["lr"]) and cfg.steps == 2 and cfg.tokenizer == "byte"
    # the printed table names every trial with its values, and the re-run command is printed
    assert "trial" in printed and "val_loss" in printed and "wall_s" in printed
    assert f"{best:03d}*" in printed and f"bigmodel train --config {best_file}" in printed
    # the printed command works: retraining the best config gives the best trial's loss again
    assert main(["train", "--config", str(best_file), "--run-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["val"]["loss"] == pytest.approx(losses[best], rel=1e-6)


def test_tune_cli_reports_bad_specs(tmp_path: Path, capsys) -> None:
    assert main(["tune", "lr=log:1e-4:1e-2", "--run-dir", str(tmp_path)]) == 2
    assert "add --random" in capsys.readouterr().err
    assert main(["tune", "--random", "2", "lr=log:-1:1", "--run-dir", str(tmp_path)]) == 2
    assert "LOW > 0" in capsys.readouterr().err
    assert main(["tune", "nopreset", "lr=1,2", "--run-dir", str(tmp_path)]) == 2
    assert "unknown run preset" in capsys.readouterr().err


def test_help_explains_with_an_example(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "bigmodel tune" in out and "log:1e-4:1e-2" in out
