"""Run configuration: a named preset, then a JSON / TOML config file, then ``key=value`` overrides.

A run is described by one frozen ``RunConfig``. It is built in three layers, later ones winning::

    RunConfig defaults  <-  RUN_PRESETS[preset]  <-  config file (.json / .toml)  <-  key=value

``model.<field>=value`` sets a field of the *model* config (``reference_numpy.configs``), e.g.
``model.d_model=128``; every other key is a ``RunConfig`` field. Unknown keys are refused with the
list of known ones and the closest match, and every value is checked against its field's type, so
a typo never silently trains the wrong model. Nothing here imports jax.

The config file is a flat table of the same keys; model fields go either as dotted keys
(``"model.d_model": 128``) or in a ``model_overrides`` table (TOML ``[model_overrides]``).
A ``preset`` key in the file picks the base preset (the command line's ``--preset`` wins).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_port.atomic import atomic_write_text
from reference_numpy.configs import PRESETS, BertConfig, ConfigFieldError, GPTConfig, Seq2SeqConfig, ViTConfig

__all__ = [
    "TASKS", "RUN_PRESETS", "RunConfig", "ConfigError", "build_config", "parse_overrides",
    "load_config_file", "model_config_class", "save_config", "load_run_config",
]

# task -> model family config class (the family of ``model`` must match)
TASKS: dict[str, type] = {
    "lm": GPTConfig,  # causal language modelling (GPT / Llama)
    "classification": BertConfig,  # sequence classification (BERT)
    "translation": Seq2SeqConfig,  # encoder-decoder translation
    "image": ViTConfig,  # image classification (ViT)
}

SCHEDULE_KINDS = ("constant", "warmup_linear", "warmup_cosine")
DEFAULT_ADAMW_DECAY = 0.01  # RunConfig.weight_decay=None with optimizer=adamw
OPTIMIZERS = ("sgd", "adam", "adamw")
BACKENDS = ("jax", "numpy")


class ConfigError(ValueError):
    """A bad run configuration (unknown key, wrong type, out-of-range value)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs besides the data files themselves."""

    # --- what to train -----------------------------------------------------------------------
    task: str = "lm"  # "lm" | "classification" | "translation" | "image" (TASKS)
    model: str = "gpt2-tiny"  # model preset (reference_numpy.configs.PRESETS), "minilm" (the
    #                           pretrained all-MiniLM-L6-v2, classification only) or a local HF dir
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (model.X=)
    data: str = "stdlib"  # built-in dataset (stdlib | docstrings | numbers | digits) or a file path
    tokenizer: str = "bpe"  # lm: "bpe" (trained on the training split) or "byte"; others ignore it
    vocab_size: int = 2048  # BPE vocabulary size when a tokenizer is trained
    max_chars: int = 2_000_000  # cap on corpus characters read (stdlib corpus / text files); 0 = all
    seq_len: int = 128  # tokens per sequence (packed LM blocks, padded classification inputs)
    val_fraction: float = 0.1  # share of examples (documents for LM) held out for validation
    test_fraction: float = 0.0  # share held out as a test split (image / classification tasks)
    # --- optimisation ------------------------------------------------------------------------
    steps: int = 200  # optimizer updates
    batch_size: int = 32  # examples per update, split into accumulate_steps micro-batches
    accumulate_steps: int = 1  # micro-batches per update (gradient accumulation)
    optimizer: str = "adamw"  # "sgd" | "adam" | "adamw"
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    schedule: str = "warmup_cosine"  # "constant" | "warmup_linear" | "warmup_cosine"
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float | None = None  # AdamW decoupled decay (kernels and embeddings only); None:
    #                                    DEFAULT_ADAMW_DECAY with adamw, no decay with sgd / adam
    clip_norm: float | None = 1.0  # global-norm gradient clipping (None: off)
    dropout: float | None = None  # override the model's dropout rate (None: keep the config's)
    mixed_precision: bool = False  # bf16 compute with float32 master weights (JAX backend only)
    dtype: str = "float32"  # parameter dtype ("float32" or "float64"; float64 needs x64)
    seed: int = 0  # init, data order, dropout: the same seed gives the same run
    backend: str = "jax"  # "jax" (jit-compiled) or "numpy" (the reference, small models only)
    mesh: str = ""  # device mesh of the JAX step, "data:2,fsdp:2,tensor:2" (bigmodel_jax.sharding); "": one
    #                 device. Sizes missing are 1; their product must equal the number of devices.
    verify_steps: int = 0  # run the first N steps on both backends and stop if they diverge
    # --- several processes (hosts): bigmodel_train.distributed --------------------------------
    coordinator: str = ""  # HOST:PORT of process 0's coordinator ("auto": JAX's cluster detection;
    #                        "": one process, unless JAX_COORDINATOR_ADDRESS is set)
    num_processes: int = 0  # processes in the run (0: from JAX's environment)
    process_id: int = -1  # this process's index (-1: from JAX's environment)
    # --- evaluation, logging, checkpoints ----------------------------------------------------
    eval_every: int = 0  # evaluate on the validation split every N steps (0: only at the end)
    eval_batch_size: int = 64  # examples per evaluation batch
    max_eval_examples: int = 0  # cap on validation examples per evaluation (0: all)
    log_every: int = 10  # write train loss / lr / throughput every N steps
    checkpoint_every: int = 0  # save a checkpoint every N steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    progress: bool = True  # tqdm progress bar with throughput and ETA
    plots: bool = True  # PNG plots of the loss and metric curves at the end
    tensorboard: bool = True  # TensorBoard event files next to metrics.jsonl
    sample_tokens: int = 48  # lm: tokens generated for the end-of-run sample (0: none)
    prompt: str = "def "  # lm: prompt of the end-of-run sample

    def __post_init__(self) -> None:
        # Built by hand (not through build_config) a config is checked all the same: types first
        # (an int where a float is due is widened; a string or bool for a number is refused), then
        # ranges and consistency (validate).
        for name, annotation in _TYPES.items():
            value = getattr(self, name)
            typed = _coerce(name, value, annotation, "RunConfig")
            if type(typed) is not type(value) and not (type(typed) is float and type(value) is int):
                raise ConfigError(f"RunConfig: {name} must be {_type_name(annotation)}, got {value!r}")
            if typed is not value:
                object.__setattr__(self, name, typed)
        validate(self)

    @property
    def micro_batch_size(self) -> int:
        """Examples per micro-batch (``batch_size / accumulate_steps``)."""
        return self.batch_size // self.accumulate_steps

    def model_config_class(self) -> type:
        """The model config dataclass of this task's family."""
        return TASKS[self.task]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what ``config.json`` of a run holds)."""
        return dataclasses.asdict(self)


# Named starting points: the documented one-line commands build on these.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2-style decoder on the Python standard library's source, BPE vocabulary trained on it.
    "gpt-stdlib": dict(
        task="lm", model="gpt2-tiny", data="stdlib", tokenizer="bpe", vocab_size=2048,
        model_overrides=dict(n_layers=3, d_model=128, n_heads=4, d_ff=512, max_len=64, dropout=0.0),
        seq_len=64, batch_size=32, steps=500, lr=2e-3, warmup_steps=30, max_chars=2_000_000,
        eval_every=250, max_eval_examples=512,
    ),
    # The demo: small enough for a few minutes on 2 CPU cores, jit compile included.
    "demo": dict(
        task="lm", model="gpt2-tiny", data="stdlib", tokenizer="bpe", vocab_size=1024,
        model_overrides=dict(n_layers=2, d_model=96, n_heads=4, d_ff=384, max_len=64, dropout=0.0),
        seq_len=64, batch_size=32, steps=400, lr=5e-3, warmup_steps=20, max_chars=1_000_000,
        eval_every=100, max_eval_examples=256, verify_steps=2, sample_tokens=48,
    ),
    # Fine-tune the pretrained all-MiniLM-L6-v2 (fresh classifier) on standard-library docstrings.
    "minilm-docstrings": dict(
        task="classification", model="minilm", data="docstrings", seq_len=32, batch_size=16,
        steps=150, lr=1e-4, warmup_steps=15, weight_decay=0.01, val_fraction=0.15,
        test_fraction=0.15, eval_every=50, dropout=0.1,
    ),
    # Encoder-decoder on the generated number-words translation task.
    "seq2seq-numbers": dict(
        task="translation", model="seq2seq-tiny", data="numbers",
        model_overrides=dict(n_layers=2, d_model=128, n_heads=4, d_ff=256, max_len=64,
                             dropout=0.0, label_smoothing=0.0, prenorm=True),
        seq_len=16, batch_size=64, steps=600, lr=2e-3, warmup_steps=60, val_fraction=0.1,
        test_fraction=0.1, eval_every=300, max_eval_examples=500,
    ),
    # ViT on scikit-learn's 8x8 digits, 2x2 patches.
    "vit-digits": dict(
        task="image", model="vit-tiny", data="digits",
        model_overrides=dict(n_layers=4, d_model=64, n_heads=4, d_ff=128, image_size=8,
                             patch_size=2, n_channels=1, num_labels=10, dropout=0.0),
        batch_size=64, steps=1500, lr=2e-3, warmup_steps=100, val_fraction=0.1,
        test_fraction=0.2, eval_every=500, weight_decay=0.05,
    ),
}


# --------------------------------------------------------------------------------------------
# parsing and validation

_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)  # field name -> resolved annotation


def model_config_class(task: str) -> type:
    """The model config dataclass of ``task``."""
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {task!r}") from None


def _unknown(key: str, known: Sequence[str], what: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {what} key {key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, "a table")
    return name + (" or none" if type(None) in typing.get_args(annotation) else "")


def _parse_scalar(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false/null, lists), else the
    string itself; ``none`` / ``None`` also read as null."""
    if text in ("none", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(name: str, value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the type ``annotation`` names (int, float, bool, str, optional, dict)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], where)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
        return value
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {name} must be a table / dict, got {value!r}")
        return dict(value)
    return value


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-4", "model.d_model=64"]`` -> ``{"lr": 3e-4, "model.d_model": 64}``.

    Values are read as JSON when they parse (so ``3e-4`` is a float and ``true`` a bool), else as
    strings. A missing ``=`` raises ``ConfigError`` naming the argument.
    """
    out: dict[str, Any] = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {a!r} is not key=value (e.g. lr=3e-4 or model.d_model=64)")
        out[key.strip()] = _parse_scalar(value.strip())
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The key/value table of a ``.json`` or ``.toml`` run-config file (flattened: a nested
    ``model_overrides`` / ``model`` table becomes ``model.<field>`` keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        if p.suffix == ".json":
            raw = json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".toml":
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"config file {p}: expected a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: the top level must be a table of keys, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "model_overrides" or (k == "model" and isinstance(v, Mapping)):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config file {p}: model_overrides must be a table")
            flat.update({f"model.{mk}": mv for mk, mv in v.items()})
        else:
            flat[k] = v
    return flat


def _apply(values: dict[str, Any], updates: Mapping[str, Any], where: str) -> None:
    """Merge ``updates`` into ``values`` (RunConfig fields plus ``model.X`` entries), checking keys."""
    for key, value in updates.items():
        if key.startswith("model."):
            sub = key[len("model."):]
            if not sub:
                raise ConfigError(f"{where}: 'model.' needs a field name, e.g. model.d_model=64")
            values.setdefault("model_overrides", {})
            values["model_overrides"] = {**values["model_overrides"], sub: value}
            continue
        if key not in _FIELDS:
            raise _unknown(key, list(_FIELDS) + ["model.<field>"], f"{where} run-config")
        if key == "model_overrides":
            values["model_overrides"] = {**values.get("model_overrides", {}),
                                         **_coerce(key, value, dict, where)}
            continue
        values[key] = value


def _check_model_overrides(cfg: RunConfig) -> None:
    """Refuse bad ``model.X`` overrides now, before any data is read.

    Each key must be a field of the task's config class and its value of the field's type (the
    coerced values are stored back). When ``cfg.model`` names a preset, the model config is built
    as the task will build it (preset <- overrides <- the run's ``dropout`` and ``dtype``), so its
    own validation refuses sizes, divisibility, probabilities and names, here reported by their
    ``model.X`` keys. Fields the task takes from the data (vocabulary, classes, image size) are
    checked again when it does. An explicit ``model.max_len`` shorter than ``seq_len`` is refused:
    every sequence of the lm / classification / translation data is ``seq_len`` positions long.
    """
    cls = model_config_class(cfg.task)
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    overrides = cfg.model_overrides
    for key, value in list(overrides.items()):
        if key not in known:
            raise _unknown(key, list(known), f"model ({cls.__name__})")
        overrides[key] = _coerce(f"model.{key}", value, hints[key], "model override")
    max_len = overrides.get("max_len")
    if cfg.task in ("lm", "classification", "translation") and max_len is not None and max_len < cfg.seq_len:
        raise ConfigError(f"model.max_len={max_len} is shorter than seq_len={cfg.seq_len}, the length of every "
                          f"{cfg.task} sequence: set model.max_len >= {cfg.seq_len} or lower seq_len")
    base = PRESETS.get(cfg.model)
    if not isinstance(base, cls) or Path(cfg.model).is_dir():
        return  # "minilm", an HF directory, an unknown name or another family: the task says which
    changes = {**overrides, "dtype": cfg.dtype}
    if cfg.dropout is not None:
        changes["dropout"] = cfg.dropout
    patch = changes.get("patch_size", getattr(base, "patch_size", None))
    if cfg.task == "image" and "image_size" not in overrides and isinstance(patch, int) and patch > 0:
        changes["image_size"] = patch  # the data sets it; the task checks that patches tile it
    try:
        dataclasses.replace(base, **changes)
    except ConfigFieldError as err:
        named = [f"model.{f}={overrides[f]!r}" for f in err.fields if f in overrides] or [f"model={cfg.model!r}"]
        raise ConfigError(f"{', '.join(named)} (preset {cfg.model!r}): {err}") from None


def _mesh_sizes(text: str) -> dict[str, int]:
    """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}``, by ``bigmodel_jax.sharding.parse_mesh``
    (imported only when a mesh is asked for: it loads jax)."""
    from bigmodel_jax.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as err:
        raise ConfigError(f"mesh={text!r}: {err}") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Range and consistency checks; returns ``cfg`` (model overrides coerced to their types)."""
    model_config_class(cfg.task)

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.accumulate_steps >= 1, f"accumulate_steps must be >= 1, got {cfg.accumulate_steps}")
    need(cfg.batch_size % cfg.accumulate_steps == 0,
         f"batch_size ({cfg.batch_size}) must be divisible by accumulate_steps ({cfg.accumulate_steps})")
    need(cfg.seq_len >= 2, f"seq_len must be >= 2, got {cfg.seq_len}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {list(OPTIMIZERS)}, got {cfg.optimizer!r}")
    need(cfg.schedule in SCHEDULE_KINDS, f"schedule must be one of {list(SCHEDULE_KINDS)}, got {cfg.schedule!r}")
    need(cfg.backend in BACKENDS, f"backend must be one of {list(BACKENDS)}, got {cfg.backend!r}")
    need(cfg.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {cfg.dtype!r}")
    need(cfg.lr >= 0, f"lr must be >= 0, got {cfg.lr}")
    need(0 <= cfg.min_lr <= max(cfg.lr, 0), f"min_lr must be in [0, lr], got {cfg.min_lr}")
    need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.schedule == "constant" or cfg.warmup_steps < cfg.steps,
         f"warmup_steps ({cfg.warmup_steps}) must be < steps ({cfg.steps}) for schedule {cfg.schedule!r}")
    need(cfg.clip_norm is None or cfg.clip_norm > 0, f"clip_norm must be > 0 or none, got {cfg.clip_norm}")
    need(cfg.dropout is None or 0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(0 <= cfg.val_fraction < 1, f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    need(0 <= cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1,
         f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got {cfg.test_fraction}")
    need(cfg.verify_steps >= 0, f"verify_steps must be >= 0, got {cfg.verify_steps}")
    if cfg.mesh:
        need(cfg.backend == "jax", "mesh shards the JAX step; the NumPy reference runs on one CPU")
        sizes = _mesh_sizes(cfg.mesh)
        split = sizes.get("data", 1) * sizes.get("fsdp", 1)
        need(cfg.micro_batch_size % split == 0,
             f"mesh {cfg.mesh}: the micro-batch of {cfg.micro_batch_size} examples (batch_size / accumulate_steps) "
             f"must be divisible by data x fsdp = {split}")
    need(cfg.num_processes >= 0, f"num_processes must be >= 0 (0: from JAX's environment), got {cfg.num_processes}")
    need(cfg.process_id >= -1, f"process_id must be >= 0 (-1: from JAX's environment), got {cfg.process_id}")
    need(cfg.num_processes == 0 or cfg.process_id < cfg.num_processes,
         f"process_id={cfg.process_id} must be < num_processes={cfg.num_processes}")
    if cfg.coordinator or cfg.num_processes > 1:  # (the coordinator may also come from JAX's environment)
        need(cfg.coordinator in ("", "auto") or re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", cfg.coordinator) is not None,
             f"coordinator must be HOST:PORT or auto, got {cfg.coordinator!r}")
        need(cfg.backend == "jax" and bool(cfg.mesh),
             "a multi-process run shards the JAX step over one mesh spanning every process: set backend=jax "
             "and mesh=... (its size is the total number of devices)")
        need(cfg.verify_steps == 0, "verify_steps runs the NumPy reference beside the step in one process; "
             "verify on one host first")
    need(not (cfg.verify_steps and cfg.mixed_precision),
         "verify_steps compares float32 steps with the NumPy reference; turn mixed_precision off")
    need(not (cfg.mixed_precision and cfg.backend == "numpy"),
         "mixed_precision (bf16) needs backend=jax: the NumPy reference computes in float32/64 only")
    need(cfg.tokenizer in ("bpe", "byte") or cfg.task != "lm" or Path(cfg.tokenizer).exists(),
         f"tokenizer must be 'bpe', 'byte' or a tokenizer directory, got {cfg.tokenizer!r}")
    for name in ("eval_every", "log_every", "checkpoint_every", "max_eval_examples", "sample_tokens",
                 "max_chars"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.keep_last >= 1, f"keep_last must be >= 1, got {cfg.keep_last}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.weight_decay is None or cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.optimizer == "adamw" or not cfg.weight_decay,
         f"weight_decay={cfg.weight_decay} is applied by optimizer=adamw only; optimizer={cfg.optimizer} would "
         "ignore it: drop it or set weight_decay=none")
    _check_model_overrides(cfg)
    return cfg


def build_config(
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> RunConfig:
    """Defaults <- ``RUN_PRESETS[preset]`` <- ``config_file`` <- ``overrides`` (strings
    ``key=value`` or a dict), validated. Raises ``ConfigError`` naming any bad key or value."""
    file_values = load_config_file(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in RUN_PRESETS:
            raise _unknown(preset, list(RUN_PRESETS), "run preset")
        _apply(values, RUN_PRESETS[preset], f"preset {preset!r}")
    _apply(values, file_values, f"config file {config_file}")
    updates = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    _apply(values, updates, "command-line")
    typed = {k: _coerce(k, v, _TYPES[k], "run config") for k, v in values.items()}
    return validate(RunConfig(**typed))


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as JSON atomically (a run's ``config.json``)."""
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read a run's ``config.json`` back (validated like any other config)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p} does not exist: not a run directory written by `bigmodel train`")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p} is not valid JSON: {err}") from None
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{p}: unknown run-config keys {unknown} (written by a newer version?)")
    typed = {k: _coerce(k, v, _TYPES[k], str(p)) for k, v in raw.items()}
    return validate(RunConfig(**typed))
