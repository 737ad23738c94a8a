"""Every command against bad input: exit 2, one ``error: …`` line on stderr, no traceback.

argparse's own refusals (a bad option value) also exit 2 with ``error:`` in their usage message.
Only unexpected errors may keep a traceback (exit 1); none of these inputs is unexpected.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel_apps.cli import build_parser, main
from bigmodel_train.config import build_config
from bigmodel_train.trainer import train
from reference_numpy.version import __version__

LM = ["task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte", "max_chars=30000", "seq_len=16",
      "batch_size=4", "warmup_steps=1", "max_eval_examples=8", "eval_batch_size=8", "sample_tokens=4",
      "progress=false", "plots=false", "tensorboard=false"]
MT = ["task=translation", "model=seq2seq-tiny", "data=numbers", "model.n_layers=1", "model.d_model=16",
      "model.n_heads=2", "model.d_ff=16", "seq_len=12", "batch_size=8", "warmup_steps=1", "eval_batch_size=8",
      "max_eval_examples=8", "progress=false", "plots=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    out = {"lm": root / "lm", "mt": root / "mt", "root": root}
    train(build_config(None, None, LM + ["steps=2"]), out["lm"], out=lambda *_: None)
    train(build_config(None, None, MT + ["steps=2"]), out["mt"], out=lambda *_: None)
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("hello\n")
    return out


# (id, argv with {lm} / {mt} / {root} placeholders, a fragment the message must contain)
CASES = [
    # train
    ("train-unknown-key", ["train", "lr_rate=1"], "unknown"),
    ("train-bad-number", ["train", "lr=fast"], "lr must be a number"),
    ("train-zero-steps", ["train", "steps=0"], "steps must be >= 1"),
    ("train-bool-steps", ["train", "steps=true"], "steps must be an integer"),
    ("train-bad-model-field", ["train", "model.n_head=4"], "did you mean 'n_heads'"),
    ("train-bad-dropout", ["train", "dropout=1.5"], "dropout"),
    ("train-heads-do-not-divide", ["train", *LM, "model.n_heads=5"], "n_heads"),
    ("train-unknown-preset", ["train", "gpt-stdlb"], "did you mean 'gpt-stdlib'"),
    ("train-two-presets", ["train", "demo", "--preset", "vit-digits"], "two presets"),
    ("train-missing-config", ["train", "--config", "{root}/nope.toml"], "does not exist"),
    ("train-bad-config-suffix", ["train", "--config", "{root}/notes.txt"], ".json or .toml"),
    ("train-unknown-task", ["train", "task=poetry"], "task must be one of"),
    ("train-missing-data", ["train", *LM, "data={root}/missing.txt", "--run-dir", "{root}/r1"], "missing.txt"),
    ("train-decay-with-sgd", ["train", "optimizer=sgd", "weight_decay=0.1"], "adamw only"),
    ("train-resume-nothing", ["train", "--resume", "--run-dir", "{root}/empty"], "config.json"),
    ("train-resume-and-overwrite", ["train", "--resume", "--overwrite", "--run-dir", "{lm}"], "one of them"),
    ("train-existing-checkpoints", ["train", *LM, "--run-dir", "{lm}"], "--resume"),
    ("train-stop-after-zero", ["train", "--stop-after", "0"], "must be an integer >= 1"),
    # eval
    ("eval-missing-dir", ["eval", "{root}/nope"], "does not exist"),
    ("eval-not-a-run", ["eval", "{root}/empty"], "not a run directory"),
    ("eval-bad-split", ["eval", "{lm}", "--split", "dev"], "invalid choice"),
    ("eval-missing-split", ["eval", "{lm}", "--split", "test"], "not in this run's data"),
    ("eval-corrupt-checkpoint", ["eval", "{lm}", "--checkpoint", "{root}/junk.safetensors"], "junk.safetensors"),
    ("eval-negative-examples", ["eval", "{lm}", "--max-examples", "-1"], "integer >= 0"),
    # generate
    ("generate-missing", ["generate", "{root}/nope"], "nope"),
    ("generate-neither", ["generate", "{root}/empty"], "neither a run directory"),
    ("generate-zero-tokens", ["generate", "{lm}", "--max-new-tokens", "0"], "integer >= 1"),
    ("generate-nan-temperature", ["generate", "{lm}", "--temperature", "nan"], "finite number >= 0"),
    ("generate-inf-temperature", ["generate", "{lm}", "--temperature", "inf"], "finite number >= 0"),
    ("generate-negative-temperature", ["generate", "{lm}", "--temperature", "-1"], "finite number >= 0"),
    ("generate-too-long", ["generate", "{lm}", "--max-new-tokens", "100000"], "max_len"),
    ("generate-beams-and-sampling", ["generate", "{lm}", "--num-beams", "2", "--temperature", "0.7"],
     "beam search is deterministic"),
    ("generate-numpy-sampling", ["generate", "{lm}", "--backend", "numpy", "--temperature", "0.7"],
     "NumPy reference decodes greedily"),
    ("generate-greedy-top-k", ["generate", "{lm}", "--temperature", "0", "--top-k", "5"], "apply to sampling"),
    ("generate-translation-sampling", ["generate", "{mt}", "--temperature", "0.7"], "does not sample"),
    ("generate-corrupt-checkpoint", ["generate", "{lm}", "--checkpoint", "{root}/junk.safetensors"],
     "junk.safetensors"),
    # convert / diff
    ("convert-missing-source", ["convert", "{root}/nope", "{root}/out.npz"], "nope"),
    ("convert-corrupt-source", ["convert", "{root}/junk.safetensors", "{root}/out.npz"], "junk.safetensors"),
    ("diff-missing-dir", ["diff", "{root}/nope"], "nope"),
    ("diff-bad-ids", ["diff", "{root}/empty", "--ids", "a,b"], "--ids"),
    ("diff-zero-length", ["diff", "{root}/empty", "--length", "0"], "integer >= 1"),
    # check / bench
    ("check-unknown-case", ["check", "--only", "no-such-layer"], "unknown case"),
    ("bench-unknown-preset", ["bench", "--preset", "nope", "--sides", "jax", "--out", "{root}/b"], "unknown preset"),
    ("bench-zero-batch", ["bench", "--preset", "gpt2-tiny", "--batch", "0", "--sides", "jax", "--out", "{root}/b"],
     "batch >= 1"),
    # tune
    ("tune-bad-spec", ["tune", "demo", "lr", "--run-dir", "{root}/t"], "not key=values"),
    ("tune-random-zero", ["tune", "--random", "0", "lr=log:1e-4:1e-2", "--run-dir", "{root}/t"], ">= 1"),
    ("tune-unknown-key", ["tune", "lr_rate=1,2", "--run-dir", "{root}/t"], "unknown"),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refusals
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(runs, argv: list[str], fragment: str, capsys) -> None:
    argv = [a.format(**{k: str(v) for k, v in runs.items()}) for a in argv]
    code, err = _run(argv, capsys)
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and "error:" in lines[-1], err
    if lines[-1].startswith("error: "):  # ours (argparse prints its usage first)
        assert len(lines) == 1, err
    assert fragment in err, err


def test_version_comes_from_the_one_version_source(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"bigmodel {__version__}"


def test_every_option_has_help_text() -> None:
    import argparse

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "bigmodel")
    assert not missing, f"options without help text: {missing}"


def test_sgd_works_with_the_default_weight_decay() -> None:
    cfg = build_config(None, None, ["optimizer=sgd"])
    assert cfg.optimizer == "sgd" and cfg.weight_decay is None


def test_importing_the_main_module_does_not_run_the_cli() -> None:
    """A module named by a crafted file, or imported by a tool, must not re-run the CLI with the
    host's argv."""
    code = "import sys; sys.argv = ['x', 'train', '--help']; import bigmodel_apps.__main__; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stdout + done.stderr


def test_an_unexpected_error_keeps_its_traceback(monkeypatch) -> None:
    """Only *expected* errors are shortened: a bug (here a TypeError) propagates with its traceback."""
    import bigmodel_apps.cli.train as cli_train

    def broken(*_a, **_k):
        raise TypeError("a bug")

    monkeypatch.setattr(cli_train, "build_config", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["train", "steps=1"])
