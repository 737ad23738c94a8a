"""`bigmodel train … mesh=data:2,fsdp:2,tensor:2`: every built-in task trains on a mesh of the 8
simulated CPU devices (conftest) and lands where the single-device run lands; evaluation and
generation then run on the sharded weights, and a run resumes onto another mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.checkpoint import latest_checkpoint, load_checkpoint
from bigmodel_train.config import ConfigError, build_config
from reference_numpy.tolerances import normwise_error
from reference_numpy.tree import tree_leaves_with_path

COMMON = ["steps=3", "warmup_steps=1", "batch_size=8", "eval_batch_size=8", "max_eval_examples=8",
          "progress=false", "plots=false", "tensorboard=false", "log_every=1"]
TASKS = {
    "lm": ["task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte", "max_chars=30000", "seq_len=16",
           "sample_tokens=4", "accumulate_steps=2", "batch_size=16"],
    "classification": ["task=classification", "model=bert-tiny", "seq_len=16"],
    "translation": ["seq2seq-numbers", "model=seq2seq-tiny", "model.n_layers=1", "model.d_model=32",
                    "model.d_ff=32", "seq_len=12"],
    "image": ["vit-digits", "model=vit-tiny", "model.n_layers=1", "model.d_model=16", "model.d_ff=32"],
}
MESHES = ["data:2,fsdp:2,tensor:2", "fsdp:8", "tensor:8"]


def assert_close_to(a: dict, b: dict) -> None:
    """Parameters after AdamW steps on a mesh vs one device, float32: the mesh only reorders the
    reductions (all-reduce / reduce-scatter). The whole tree agrees to 1e-5 (normwise); a single
    leaf may drift further, as Adam divides each update by that entry's own |g| and so magnifies
    rounding in tiny gradients (tests/test_sharding.py ADAMW_LEAF, measured up to 6e-5)."""
    assert a.keys() == b.keys()
    flat_a = np.concatenate([np.ravel(a[k]) for k in sorted(a)])
    flat_b = np.concatenate([np.ravel(b[k]) for k in sorted(a)])
    assert normwise_error(flat_a, flat_b)[1] <= 1e-5
    for path in a:
        _, rel = normwise_error(a[path], b[path])
        assert rel <= 2e-4, f"{path}: rel {rel:.2e}"


def final_params(run: Path) -> dict:
    return dict(tree_leaves_with_path(load_checkpoint(latest_checkpoint(run), as_numpy=True)["params"]))


def args_for(task: str, tmp_path: Path) -> list[str]:
    args = [*TASKS[task], *COMMON] if task != "lm" else [*COMMON, *TASKS[task]]
    if task == "classification":
        data = tmp_path / "reviews.jsonl"
        rows = [{"text": f"{w} item number {i}", "label": w} for i in range(16) for w in ("good", "bad", "meh")]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        args += [f"data={data}", "val_fraction=0.25"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_on_a_mesh_like_on_one_device(task: str, tmp_path: Path, capsys) -> None:
    args = args_for(task, tmp_path)
    one, sharded = tmp_path / "one", tmp_path / "mesh"
    assert main(["train", *args, "--run-dir", str(one)]) == 0
    assert main(["train", *args, "mesh=data:2,fsdp:2,tensor:2", "--run-dir", str(sharded)]) == 0
    assert_close_to(final_params(sharded), final_params(one))
    capsys.readouterr()
    assert main(["eval", str(sharded), "--max-examples", "8"]) == 0
    if task == "lm":
        assert main(["generate", str(sharded), "--max-new-tokens", "3", "--temperature", "0"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [*MESHES, ""])
def test_a_run_resumes_onto_another_mesh(mesh: str, tmp_path: Path) -> None:
    """An Orbax checkpoint of a run on mesh A is read straight onto mesh B (or one device): every
    array lands in B's sharding, bit for bit, and the run continues to where a one-device run goes
    (float32 rounding of the reordered reductions apart)."""
    import jax

    from bigmodel_train.orbax_checkpoint import read_state
    from bigmodel_train.steps import JaxStepper
    from bigmodel_train.tasks import build_task

    args = [*args_for("lm", tmp_path), "steps=4"]
    run, one = tmp_path / "run", tmp_path / "one"
    assert main(["train", *args, "mesh=data:2,fsdp:2,tensor:2", "--run-dir", str(run), "--stop-after", "2"]) == 0

    path = latest_checkpoint(run)
    assert path.is_dir() and path.name == "step_00000002"
    saved = load_checkpoint(path, as_numpy=True)  # the stored arrays, whole, on the host
    cfg = build_config(None, None, [*args, f"mesh={mesh}"])
    task = build_task(cfg, run)
    stepper = JaxStepper(task.jax_loss, cfg, task.init_params(), model_config=task.model_config)
    targets = stepper.state_targets()
    state = read_state(path, targets)
    stepper.set_state(state)
    for (path_, x), want in zip(tree_leaves_with_path(state["params"]), jax.tree.leaves(targets["params"])):
        assert x.sharding == want.sharding, path_  # placed on mesh B as it is read
    restored = dict(tree_leaves_with_path(stepper.params_numpy()))
    for path_, x in tree_leaves_with_path(saved["params"]):
        assert restored[path_].tobytes() == x.tobytes(), path_
    assert {k: np.asarray(v).tobytes() for k, v in stepper.opt_state_flat().items()} == \
        {k: np.asarray(v).tobytes() for k, v in saved["opt_state"].items()}

    if mesh:  # the optimizer state is sharded like the parameters (ZeRO-3 on fsdp)
        import jax

        param_specs = [x.sharding.spec for x in jax.tree.leaves(stepper.params)]
        mu = jax.tree.leaves(stepper.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        mu_specs = [x.sharding.spec for x in jax.tree.leaves([m.mu for m in mu if hasattr(m, "mu")])]
        assert mu_specs and mu_specs == param_specs
        assert any(any(ax is not None for ax in spec) for spec in param_specs)
    assert main(["train", "--resume", "--run-dir", str(run), f"mesh={mesh}"]) == 0
    assert main(["train", *args, "--run-dir", str(one)]) == 0
    assert_close_to(final_params(run), final_params(one))


def test_bad_meshes_are_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="data x fsdp = 8"):
        build_config(None, None, ["mesh=data:8", "batch_size=4"])
    with pytest.raises(ConfigError, match="mesh"):
        build_config(None, None, ["mesh=pipeline:2"])
    with pytest.raises(ConfigError, match="NumPy reference"):
        build_config(None, None, ["mesh=data:2", "backend=numpy"])
