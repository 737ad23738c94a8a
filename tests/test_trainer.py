"""The trainer: resume bit-identity, accumulation, verify-steps, non-finite detection, determinism,
logs / plots / event files, run configs, and the train / eval / generate / demo commands.

Everything runs tiny models for a few steps; the compiled steps dominate the time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from bigmodel_train.config import ConfigError, build_config
from bigmodel_train.steps import JaxStepper, NonFiniteError, ReferenceStepper, split_micro_batches
from bigmodel_train.tasks import build_task
from bigmodel_train.trainer import BatchOrder, VerifyError, train
from reference_numpy.tolerances import normwise_error
from reference_numpy.tree import tree_leaves_with_path

# A tiny GPT on a slice of the stdlib corpus with the byte tokenizer (no BPE training). Dropout
# and 2-way accumulation are on throughout; tests share this model so that its compiled train
# step (cached per process) is reused.
LM = ["task=lm", "model=gpt2-tiny", "model.dropout=0.1", "accumulate_steps=2", "data=stdlib", "tokenizer=byte",
      "max_chars=60000", "seq_len=16", "batch_size=4", "warmup_steps=1", "max_eval_examples=8",
      "eval_batch_size=8", "sample_tokens=4", "progress=false", "plots=false", "tensorboard=false", "log_every=1"]


def lm_config(*extra: str):
    return build_config(None, None, LM + list(extra))


def quiet(*_: object) -> None:
    pass


def saved_state(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir), as_numpy=True)


def assert_trees_identical(a: dict, b: dict) -> None:
    la, lb = dict(tree_leaves_with_path(a)), dict(tree_leaves_with_path(b))
    assert la.keys() == lb.keys()
    for path in la:
        assert np.array_equal(np.asarray(la[path]), np.asarray(lb[path])), f"{path} differs"


# --------------------------------------------------------------------------------------------
# resume, determinism


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_resume_is_bit_identical(tmp_path: Path, backend: str) -> None:
    """N steps straight == k steps, stop, resume, N - k steps: parameters and optimizer state bit
    for bit. Dropout and accumulation are on, so the data position and the RNG state must both
    be restored; k is not a checkpoint_every multiple (the stop itself checkpoints)."""
    cfg = lm_config("steps=5", "checkpoint_every=2", f"backend={backend}")
    train(cfg, tmp_path / "straight", out=quiet)
    first = train(cfg, tmp_path / "resumed", stop_after=3, out=quiet)
    assert first.stopped_early and first.step == 3
    assert saved_state(tmp_path / "resumed")["data_position"]["batches_done"] == 3
    second = train(cfg, tmp_path / "resumed", resume=True, out=quiet)
    assert second.step == 5
    a, b = saved_state(tmp_path / "straight"), saved_state(tmp_path / "resumed")
    assert_trees_identical(a["params"], b["params"])
    assert_trees_identical(a["opt_state"], b["opt_state"])
    assert a["step"] == b["step"] == 5


def test_same_seed_same_run_other_seed_differs(tmp_path: Path) -> None:
    cfg = lm_config("steps=2")
    train(cfg, tmp_path / "a", out=quiet)
    train(cfg, tmp_path / "b", out=quiet)
    train(lm_config("steps=2", "seed=1"), tmp_path / "c", out=quiet)
    a, b, c = (saved_state(tmp_path / n)["params"] for n in "abc")
    assert_trees_identical(a, b)
    assert not np.array_equal(a["embed"]["embedding"], c["embed"]["embedding"])


def test_batch_order_is_a_fresh_permutation_each_epoch() -> None:
    order = BatchOrder(n=10, batch_size=3, seed=0)  # 3 batches per epoch, 1 example dropped
    epoch0 = np.concatenate([order.indices(t) for t in range(3)])
    epoch1 = np.concatenate([order.indices(t) for t in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(BatchOrder(10, 3, 0).indices(4), order.indices(4))  # stateless
    assert order.position(4) == {"batches_done": 4, "epoch": 1, "batch_in_epoch": 1, "examples": 10,
                                 "batch_size": 3, "seed": 0}


# --------------------------------------------------------------------------------------------
# accumulation


def test_accumulation_equals_one_big_batch() -> None:
    """k = 4 micro-batches of 2 == one batch of 8, in float64 with SGD (so the update is exactly
    -lr * gradient): the JAX step and the reference step with k = 4 both move the parameters by
    -lr * the gradient of the whole batch at once (the reference's hand-written backward)."""
    sgd = ["optimizer=sgd", "weight_decay=0", "clip_norm=none", "schedule=constant", "lr=0.5", "batch_size=8",
           "model.dropout=0", "dtype=float64", "accumulate_steps=4"]
    cfg4 = lm_config(*sgd)
    task = build_task(cfg4)
    split = task.splits["train"]
    full = np.flatnonzero(split.arrays["attention_mask"].all(axis=1))[:8]  # no padding: equal counts
    batch = split.batch(full)
    p0 = task.init_params()
    _, g = task.ref_loss_and_grad(p0, batch)  # the whole batch at once
    g = dict(tree_leaves_with_path(g))
    four = JaxStepper(task.jax_loss, cfg4, p0, donate=False)
    four.step(0, split_micro_batches(batch, 4))
    ref = ReferenceStepper(task.ref_loss_and_grad, cfg4, p0)
    ref.step(0, split_micro_batches(batch, 4))
    for name, stepper in (("jax k=4", four), ("reference k=4", ref)):
        new = dict(tree_leaves_with_path(stepper.params_numpy()))
        for path, p in tree_leaves_with_path(p0):
            _, rel = normwise_error(new[path] - p, -0.5 * g[path])
            assert rel < 1e-9, f"{name}: {path} update off by {rel:.2e}"


# --------------------------------------------------------------------------------------------
# verify-steps


def test_verify_steps_pass_then_a_planted_divergence_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    """Dropout masks and accumulation shared by both sides: the first steps agree. A reference
    backward with one wrong gradient leaf makes the run stop at step 1, naming that leaf."""
    cfg = lm_config("steps=2", "verify_steps=2", "warmup_steps=0", "sample_tokens=0")
    result = train(cfg, tmp_path / "ok", out=quiet)
    assert result.verified_steps == 2

    from reference_numpy.models import gpt as ref_gpt

    honest = ref_gpt.loss_and_grad

    def planted(params, batch, config, **kw):
        loss, grads = honest(params, batch, config, **kw)
        grads["final_norm"]["bias"] = -grads["final_norm"]["bias"]  # a sign bug in one leaf
        return loss, grads

    monkeypatch.setattr(ref_gpt, "loss_and_grad", planted)
    with pytest.raises(VerifyError) as err:
        train(cfg, tmp_path / "bad", out=quiet)
    assert err.value.step == 1 and err.value.tensor == "params/final_norm/bias"
    assert "diverge at step 1" in str(err.value)
    # the command line exits non-zero with the same message
    code = main(["train", *LM, "steps=2", "warmup_steps=0", "sample_tokens=0", "--verify-steps", "2",
                 "--run-dir", str(tmp_path / "cli")])
    assert code == 1
    assert "diverge at step 1: params/final_norm/bias" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# non-finite values


def _toy(cfg):
    """A loss whose value is finite while d/d b sqrt(b) at b = 0 is inf: only grads/b is bad."""
    params = {"a": {"w": np.ones(3, np.float32)}, "b": np.zeros(2, np.float32)}

    def jax_loss(p, batch, *, dropout_key=None, masks=None):
        return jnp.sum(p["a"]["w"] ** 2) + jnp.sum(jnp.sqrt(p["b"]))

    def ref_loss_and_grad(p, batch, *, masks=None):
        with np.errstate(divide="ignore"):
            return (np.sum(p["a"]["w"] ** 2) + np.sum(np.sqrt(p["b"])),
                    {"a": {"w": 2 * p["a"]["w"]}, "b": (0.5 / np.sqrt(p["b"])).astype(np.float32)})

    return params, jax_loss, ref_loss_and_grad


def test_nonfinite_gradient_is_named_and_not_applied() -> None:
    cfg = lm_config()
    params, jax_loss, ref_loss_and_grad = _toy(cfg)
    batch = [{"x": np.zeros((1, 1), np.float32)}]
    for stepper in (JaxStepper(jax_loss, cfg, params), ReferenceStepper(ref_loss_and_grad, cfg, params)):
        out = stepper.step(0, batch)
        assert out.problem == "grads/b"
        assert np.isfinite(out.loss)
        assert_trees_identical(stepper.params_numpy(), params)  # the bad update was skipped


def test_huge_learning_rate_stops_keeping_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = lm_config("steps=5", "schedule=constant", "lr=1e36", "checkpoint_every=1")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path, out=quiet)
    step = err.value.step
    assert step >= 2 and f"at step {step}" in str(err.value)
    assert err.value.tensor.startswith(("loss (first non-finite gradient: grads/", "grads/", "params/"))
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps[-1] == step - 1  # nothing saved from the bad step on
    state = saved_state(tmp_path)
    assert all(np.all(np.isfinite(x)) for _, x in tree_leaves_with_path(state["params"]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_inf_in_a_batch_is_blamed_on_the_input(tmp_path: Path) -> None:
    cfg = build_config("vit-digits", None, ["model=vit-tiny", "model.n_layers=1", "model.d_model=16",
                                            "model.d_ff=32", "steps=2", "batch_size=8", "warmup_steps=1",
                                            "progress=false", "plots=false", "tensorboard=false",
                                            "backend=numpy"])
    task = build_task(cfg, tmp_path)
    victim = BatchOrder(len(task.splits["train"]), cfg.batch_size, cfg.seed).indices(0)[3]
    task.splits["train"].arrays["pixel_values"][victim, 0, 2, 2] = np.inf
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path, task=task, out=quiet)
    assert err.value.step == 1
    assert err.value.tensor == "batch/pixel_values (micro-batch 0, example 3)"


# --------------------------------------------------------------------------------------------
# logs, plots, event files


def _tensorboard_tags(run_dir: Path) -> set[str]:
    """Scalar tags in the TFRecord event files, parsed here (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + n + 4
    return tags


def test_metrics_jsonl_tensorboard_and_plots_are_written(tmp_path: Path) -> None:
    cfg = lm_config("steps=4", "eval_every=2", "plots=true", "tensorboard=true")
    result = train(cfg, tmp_path, out=quiet)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records if r["split"] == "train")
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(r["perplexity"] > 1 for r in val)
    assert val[-1]["perplexity"] == pytest.approx(np.exp(val[-1]["loss"]))
    assert {"train/loss", "train/lr", "val/perplexity", "val/loss"} <= _tensorboard_tags(tmp_path)
    for name in ("loss.png", "metrics.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val"]["perplexity"] == pytest.approx(result.val["perplexity"])


# --------------------------------------------------------------------------------------------
# run configs


def test_run_config_layers_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "vit-digits"\nlr = 0.01\nsteps = 7\nwarmup_steps = 2\n'
                    '[model_overrides]\nn_layers = 1\n')
    cfg = build_config(None, toml, ["steps=9", "model.d_model=32"])
    assert (cfg.task, cfg.lr, cfg.steps) == ("image", 0.01, 9)
    assert cfg.model_overrides["n_layers"] == 1 and cfg.model_overrides["d_model"] == 32
    assert cfg.model_overrides["patch_size"] == 2  # from the preset, untouched
    (tmp_path / "run.json").write_text(json.dumps({"task": "lm", "model.n_layers": 3}))
    assert build_config(None, tmp_path / "run.json").model_overrides == {"n_layers": 3}
    with pytest.raises(ConfigError, match="unknown command-line run-config key 'lrr' .*did you mean 'lr'"):
        build_config(None, None, ["lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown model \(ViTConfig\) key 'd_modle'.*'d_model'"):
        build_config("vit-digits", None, ["model.d_modle=3"])
    with pytest.raises(ConfigError, match="steps must be an integer"):
        build_config(None, None, ["steps=2.5"])
    with pytest.raises(ConfigError, match="divisible by accumulate_steps"):
        build_config(None, None, ["batch_size=6", "accumulate_steps=4"])
    with pytest.raises(ConfigError, match="not key=value"):
        build_config(None, None, ["lr"])


# --------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("command", ["train", "eval", "generate", "demo"])
def test_help_explains_with_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"bigmodel {command}" in out


SMALL = ["steps=3", "warmup_steps=1", "batch_size=8", "eval_batch_size=16", "max_eval_examples=16",
         "progress=false", "log_every=1"]
FAMILIES = {
    "lm": LM + ["steps=3", "sample_tokens=6"],
    "classification": ["task=classification", "model=bert-tiny", "seq_len=24", *SMALL],  # + data= below
    "translation": ["seq2seq-numbers", "model=seq2seq-tiny", "model.n_layers=1", "model.d_model=32",
                    "model.d_ff=32", "seq_len=12", *SMALL],
    "image": ["vit-digits", "model=vit-tiny", "model.n_layers=1", "model.d_model=16", "model.d_ff=32",
              "mixed_precision=true", *SMALL],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_eval_generate_end_to_end(family: str, tmp_path: Path, capsys) -> None:
    args = list(FAMILIES[family])
    if family == "classification":  # a user's JSONL file with string labels
        data = tmp_path / "reviews.jsonl"
        rows = [{"text": f"{w} item number {i}", "label": w} for i in range(16) for w in ("good", "bad", "meh")]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        args += [f"data={data}", "val_fraction=0.25"]
    run = tmp_path / "run"
    assert main(["train", *args, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "final validation" in out
    assert [s for s, _ in list_checkpoints(run)] == [3]
    split = "test" if family == "image" else "val"
    assert main(["eval", str(run), "--split", split, "--max-examples", "16"]) == 0
    out = capsys.readouterr().out
    if family in ("classification", "image"):
        assert "confusion matrix" in out and "macro avg" in out
    if family == "lm":
        assert "perplexity" in out
        # the end-of-run sample's prompt and length: its compiled decoder is reused
        assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out.startswith("def ")
    if family == "translation":
        assert "exact_match" in out and "bleu" in out
        assert main(["generate", str(run), "--prompt", "twenty one"]) == 0
        assert capsys.readouterr().out.startswith("twenty one  ->  ")
    if family == "image":  # bf16 compute, float32 master weights
        params = saved_state(run)["params"]
        assert {np.asarray(x).dtype for _, x in tree_leaves_with_path(params)} == {np.dtype(np.float32)}
        # the NumPy reference scores the checkpoint the same way (to float32 agreement)
        jax_json, ref_json = tmp_path / "jax.json", tmp_path / "ref.json"
        main(["eval", str(run), "--split", "test", "--max-examples", "16", "--json", str(jax_json)])
        main(["eval", str(run), "--split", "test", "--max-examples", "16", "--backend", "numpy",
              "--json", str(ref_json)])
        a, b = json.loads(jax_json.read_text()), json.loads(ref_json.read_text())
        assert a["confusion_matrix"] == b["confusion_matrix"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_train_refuses_to_overwrite_and_resumes_from_the_cli(tmp_path: Path, capsys) -> None:
    run = str(tmp_path / "run")
    args = ["train", *LM, "steps=4", "--run-dir", run]
    assert main([*args, "--stop-after", "2"]) == 0
    assert main(args) == 2  # checkpoints present: neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", run]) == 0
    assert saved_state(Path(run))["step"] == 4


@pytest.mark.hf
def test_generate_from_an_hf_directory_matches_transformers(tmp_path: Path, capsys) -> None:
    """`bigmodel generate HF_DIR` (AutoModelForCausalLM + the directory's tokenizer) prints the
    same greedy continuation as transformers' own generate on the same checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bigmodel_train.data.text import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    tokenizer = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=32,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = "def add"
    ids = tokenizer([prompt], return_tensors="np")["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = prompt + tokenizer.decode(want[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_train_takes_overrides_before_and_after_options() -> None:
    """``bigmodel train PRESET k=v --opt X k=v``: every key=value lands in the overrides."""
    from bigmodel_apps.cli import build_parser

    a = build_parser().parse_args(["train", "gpt-stdlib", "steps=3", "--run-dir", "r", "lr=1e-3",
                                   "--verify-steps", "2", "seed=4"])
    assert a.assignments == ["gpt-stdlib", "steps=3", "lr=1e-3", "seed=4"]
    assert (a.run_dir, a.verify_steps) == ("r", 2)
    assert build_parser().parse_args(["demo", "steps=3", "--run-dir", "r", "lr=1"]).assignments == ["steps=3", "lr=1"]
