"""What is measured: a config, a batch, and one set of weights shared by every side.

Imports neither jax nor torch at module level: the NumPy side and the ``torch.compile`` worker
(a subprocess) rebuild the same batch from the same seed with this module alone.

Weights: we draw our reference tree (``reference_numpy.models.<family>.init``), export it as an
HF directory with ``bigmodel_port.hf.checkpoint.save_pretrained`` (config.json + safetensors, no
download), let transformers load that directory, and read it back with ``load_pretrained``, so
the JAX, PyTorch and NumPy sides all run exactly the bytes on disk.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.hf.checkpoint import load_pretrained, save_pretrained
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig, preset
from reference_numpy.losses import IGNORE_INDEX
from reference_numpy.models import bert, gpt, vit

SIDES = ("jax", "torch", "torch.compile", "numpy")  # what runs the model
KINDS = ("train", "forward", "decode")  # what is measured
# default preset of each family
DEFAULT_PRESETS = {"bert": "bert-base", "gpt": "gpt2", "llama": "llama-3.2-1b", "vit": "vit-base-16"}
MLM_PROBABILITY = 0.15  # share of positions with a masked-LM label, as BERT's pre-training


@dataclass(frozen=True)
class Workload:
    """One measured setting. ``dtype`` is the compute dtype ("float32" or "bfloat16"; master
    weights stay fp32); ``overrides`` are config fields to change (e.g. ``n_layers``)."""

    preset: str
    batch: int
    seq_len: int  # T (ignored by ViT, whose length is patches + 1)
    dtype: str = "float32"
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq_len < 2:
            raise ValueError(f"need batch >= 1 and seq_len >= 2, got batch={self.batch}, seq_len={self.seq_len}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def config(self) -> Config:
        """The preset with dropout off (the step measures the model's math; dropout's RNG is a
        separate cost that HF and we pay differently) and the overrides applied. BERT uses the
        masked-LM model, which has no pooler (HF ``BertForMaskedLM``)."""
        base = preset(self.preset)
        fields: dict[str, Any] = {"dropout": 0.0, **dict(self.overrides)}
        if isinstance(base, BertConfig):
            fields.setdefault("pooler", False)
        if isinstance(base, Seq2SeqConfig):
            raise ValueError("the benchmark covers bert, gpt (GPT-2 / Llama) and vit presets; seq2seq "
                             "has no HF twin here")
        cfg = dataclasses.replace(base, **fields)
        if not isinstance(cfg, ViTConfig) and self.seq_len > cfg.max_len:
            raise ValueError(f"seq_len {self.seq_len} > max_len {cfg.max_len} of preset {self.preset}")
        return cfg

    def describe(self) -> dict[str, Any]:
        cfg = self.config()
        return {"preset": self.preset, "family": family(cfg), "batch": self.batch,
                "seq_len": tokens_per_example(cfg, self.seq_len), "dtype": self.dtype,
                "overrides": dict(self.overrides), "seed": self.seed,
                "config": dataclasses.asdict(cfg), "unit": unit(cfg)}


def family(config: Config) -> str:
    """"bert", "gpt" (GPT-2 and Llama shapes) or "vit"."""
    return config.family


BENCHMARKED_FAMILIES = ("bert", "gpt", "vit")


def model_module(config: Config, package: str) -> Any:
    """The family's model module in ``package`` ("bigmodel_jax.models" or
    "reference_numpy.models"): both name it after ``config.family``."""
    if config.family not in BENCHMARKED_FAMILIES:
        raise TypeError(f"no benchmarked model for {type(config).__name__} (families: {BENCHMARKED_FAMILIES})")
    return importlib.import_module(f"{package}.{config.family}")


def head(config: Config) -> str:
    """The BERT head we benchmark (masked LM, the pre-training objective); "" for other families."""
    return "mlm" if isinstance(config, BertConfig) else ""


def hf_architecture(config: Config) -> str:
    """The transformers class that runs the same model and loss."""
    if isinstance(config, BertConfig):
        return "BertForMaskedLM"
    if isinstance(config, GPTConfig):
        return "GPT2LMHeadModel" if config.positions == "learned" else "LlamaForCausalLM"
    if isinstance(config, ViTConfig):
        return "ViTForImageClassification"
    raise TypeError(f"no HF architecture for {type(config).__name__}")


def unit(config: Config) -> str:
    """What throughput counts: tokens, or images for ViT."""
    return "images" if isinstance(config, ViTConfig) else "tokens"


def tokens_per_example(config: Config, seq_len: int) -> int:
    """Sequence length one example carries (ViT: patches + class token)."""
    return config.max_len if isinstance(config, ViTConfig) else seq_len


def units_per_step(config: Config, batch: int, seq_len: int) -> int:
    """Tokens (B * T) or images (B) one step processes."""
    return batch if isinstance(config, ViTConfig) else batch * seq_len


def make_batch(config: Config, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch with HF's key names, the same for every side (int64 ids, fp32 pixels).

    BERT: ``input_ids``, ``attention_mask`` (ones), ``token_type_ids`` (zeros), ``labels`` with
    15% of positions (at least one per row) labelled and the rest -100. GPT: ``input_ids``
    (``labels`` = ``input_ids``, shifted inside the loss on both sides). ViT: ``pixel_values``
    (B, C, H, W) and ``labels`` (B,).
    """
    rng = np.random.default_rng(seed)
    if isinstance(config, ViTConfig):
        px = rng.standard_normal((batch, config.n_channels, config.image_size, config.image_size))
        return {"pixel_values": px.astype(np.float32),
                "labels": rng.integers(0, config.num_labels, (batch,)).astype(np.int64)}
    ids = rng.integers(0, config.vocab_size, (batch, seq_len)).astype(np.int64)
    if isinstance(config, BertConfig):
        chosen = rng.random((batch, seq_len)) < MLM_PROBABILITY
        chosen[:, 0] |= ~chosen.any(axis=1)  # every row has a label: no all-ignored rows
        labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids), "labels": labels}
    return {"input_ids": ids, "labels": ids.copy()}


def inputs_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch without its targets (what a forward pass reads)."""
    return {k: v for k, v in batch.items() if k not in ("labels",)}


def init_reference(config: Config, seed: int = 0) -> dict[str, Any]:
    """Our reference tree for ``config`` (fp32), drawn with NumPy from ``seed``."""
    cfg = dataclasses.replace(config, dtype="float32")
    rng = np.random.default_rng(seed)
    if isinstance(cfg, BertConfig):
        return bert.init(cfg, rng, head(cfg))
    if isinstance(cfg, GPTConfig):
        return gpt.init(cfg, rng)
    if isinstance(cfg, ViTConfig):
        return vit.init(cfg, rng)
    raise TypeError(f"no reference init for {type(cfg).__name__}")


def write_shared_weights(config: Config, directory: str | Path, seed: int = 0) -> tuple[Config, dict[str, Any]]:
    """Draw the weights, write them as an HF directory and read them back.

    Returns the config as read back (``load_pretrained``'s translation of config.json, checked to
    equal ours) and the NumPy tree every side uses; transformers loads ``directory`` itself.
    """
    cfg = dataclasses.replace(config, dtype="float32")
    arch = hf_architecture(cfg)
    save_pretrained(directory, cfg, init_reference(cfg, seed), arch)
    loaded = load_pretrained(directory, arch)
    back = dataclasses.replace(loaded.config, dtype="float32")
    if back != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(back, f.name)}
        raise AssertionError(f"config changed on the HF round trip (ours, read back): {diff}")
    return cfg, loaded.params
