"""Layer-by-layer trace of a HuggingFace transformers PyTorch model, by forward hooks.

Dims: B batch, T time, D model width, V vocabulary, C classes.

The rows and their definitions are those of ``reference_numpy.trace`` (see its docstring); this
module reads the same tensors off the HF modules without changing the model's code:

* ``embeddings``: the ``hidden_states`` input of block 0 (a forward pre-hook). That is HF's
  embedding output after (eval-mode, identity) dropout: BERT / ViT ``embeddings(...)``, GPT-2
  ``wte + wpe``, Llama ``embed_tokens``, Marian ``embed_tokens * scale + positions``.
* ``layer{i}.attention``: post-norm blocks (BERT, Marian) -- the output of the module that ends
  the attention sub-layer (``BertAttention``, Marian's ``self_attn_layer_norm``); pre-norm blocks
  (GPT-2, Llama, ViT) -- the *input* of the MLP's norm (``ln_2`` / ``post_attention_layernorm`` /
  ``layernorm_after``), which is exactly ``x + attn(norm(x))``.
* ``layer{i}.cross_attention``: Marian decoder blocks, ``encoder_attn_layer_norm``'s output.
* ``layer{i}.mlp``: the block module's output.
* ``final_norm`` / ``pooler_output``: those modules' outputs; ``last_hidden_state`` / ``logits``:
  the model's output fields (question answering: ``stack([start_logits, end_logits], -1)``).

torch and transformers are imported inside the functions: ``bigmodel_port`` itself imports no
autograd framework.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

Trace = list[tuple[str, np.ndarray]]

__all__ = ["FLOAT32_INSIDE", "HOOKS", "Trace", "effective_dtype", "load_torch_model", "trace_torch",
           "trace_torch_model"]


@dataclass(frozen=True)
class StackHooks:
    """Where one stack of blocks keeps the tensors of a trace (module paths relative to the
    stack, dotted; ``("in", p)``: input of module ``p``, ``("out", p)``: its output)."""

    layers: tuple[str, ...]  # the ModuleList of blocks: the first of these paths that exists
    attention: tuple[str, str]  # the attention row, relative to a block
    cross_attention: tuple[str, str] | None = None  # decoder blocks with cross-attention
    final_norm: str | None = None  # the stack's final norm, if any


# HF model_type -> {stack path relative to the base model ("" = the base model itself): hooks}.
HOOKS: dict[str, dict[str, StackHooks]] = {
    "bert": {"": StackHooks(("encoder.layer",), ("out", "attention"))},
    "gpt2": {"": StackHooks(("h",), ("in", "ln_2"), final_norm="ln_f")},
    "llama": {"": StackHooks(("layers",), ("in", "post_attention_layernorm"), final_norm="norm")},
    # transformers 5 keeps ViT's blocks at ``layers``, v4 at ``encoder.layer``
    "vit": {"": StackHooks(("layers", "encoder.layer"), ("in", "layernorm_after"), final_norm="layernorm")},
    "marian": {
        "encoder": StackHooks(("layers",), ("out", "self_attn_layer_norm")),
        "decoder": StackHooks(("layers",), ("out", "self_attn_layer_norm"),
                              cross_attention=("out", "encoder_attn_layer_norm")),
    },
}


# transformers computes these parts in float32 whatever the model's dtype (Llama and ViT on
# purpose, for bf16 models; Marian builds its table with torch.FloatTensor), so a float64 run of the HF model carries float32 rounding there (measured: ~1e-7
# relative from ``layer0.attention`` on for Llama, ~1e-8 from ``encoder.embeddings`` for Marian)
# and is compared at float32 tolerance.
FLOAT32_INSIDE = {
    "llama": "RMSNorm, the attention softmax and the RoPE tables",
    "vit": "the attention softmax",
    "marian": "the sinusoidal position table",
}


def effective_dtype(model_type: str, dtype: str) -> str:
    """The precision an HF model of ``model_type`` run in ``dtype`` actually computes at."""
    return "float32" if dtype == "float64" and model_type in FLOAT32_INSIDE else dtype


def _module(root: Any, path: str) -> Any:
    m = root
    for part in filter(None, path.split(".")):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _has_module(root: Any, path: str) -> bool:
    try:
        _module(root, path)
    except (AttributeError, IndexError):
        return False
    return True


def _first(x: Any) -> Any:
    """A module's hidden-state output: the tensor itself, or the first entry of a tuple."""
    return x[0] if isinstance(x, (tuple, list)) else x


def load_torch_model(model_dir: str | os.PathLike[str], architecture: str, dtype: str = "float32") -> Any:
    """``transformers.<architecture>.from_pretrained(model_dir)`` in eval mode, in ``dtype``,
    with the eager (reference) attention implementation."""
    import torch
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {architecture}")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # keep the report's output clean
    try:
        model = cls.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager")
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def trace_torch_model(model: Any, batch: dict[str, Any], task: str) -> Trace:
    """The trace of a loaded HF ``model`` (eval mode) on ``batch`` (NumPy arrays under HF's input
    names); ``task`` as in ``reference_numpy.trace.trace`` ("base": ``last_hidden_state``
    [+ ``pooler_output``]; else ``logits``)."""
    import torch

    model_type = model.config.model_type
    if model_type not in HOOKS:
        raise ValueError(f"no trace hooks for model_type {model_type!r}; known: {sorted(HOOKS)}")
    base = model.base_model
    got: dict[str, torch.Tensor] = {}
    handles = []

    def keep_in(name: str):
        def hook(module, args, kwargs):
            got[name] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        return hook

    def keep_out(name: str):
        def hook(module, args, out):
            got[name] = _first(out)
        return hook

    def attach(path_kind: tuple[str, str], root: Any, name: str) -> None:
        kind, path = path_kind
        m = _module(root, path)
        if kind == "in":
            handles.append(m.register_forward_pre_hook(keep_in(name), with_kwargs=True))
        else:
            handles.append(m.register_forward_hook(keep_out(name)))

    dtype = next(model.parameters()).dtype
    inputs = {k: (torch.from_numpy(np.asarray(v)).to(dtype) if np.asarray(v).dtype.kind == "f"
                  else torch.from_numpy(np.asarray(v, dtype=np.int64)))
              for k, v in batch.items() if v is not None}
    order: list[str] = []
    try:  # the hooks come off again whatever happens: the model stays as it was loaded
        for stack_path, spec in HOOKS[model_type].items():
            prefix = f"{stack_path}." if stack_path else ""
            stack = _module(base, stack_path)
            found = [p for p in spec.layers if _has_module(stack, p)]
            if not found:
                raise RuntimeError(f"no blocks at {list(spec.layers)} in {type(stack).__name__}; the HF "
                                   f"module layout of {model_type} changed?")
            blocks = _module(stack, found[0])
            if len(blocks) == 0:
                raise ValueError("the model has no blocks to trace")
            attach(("in", "0"), blocks, f"{prefix}embeddings")
            order.append(f"{prefix}embeddings")
            for i, blk in enumerate(blocks):
                attach(spec.attention, blk, f"{prefix}layer{i}.attention")
                order.append(f"{prefix}layer{i}.attention")
                if spec.cross_attention is not None:
                    attach(spec.cross_attention, blk, f"{prefix}layer{i}.cross_attention")
                    order.append(f"{prefix}layer{i}.cross_attention")
                attach(("out", ""), blk, f"{prefix}layer{i}.mlp")
                order.append(f"{prefix}layer{i}.mlp")
            if spec.final_norm is not None:
                attach(("out", spec.final_norm), stack, f"{prefix}final_norm")
                order.append(f"{prefix}final_norm")
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            attach(("out", ""), pooler, "pooler_output")
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()

    if task == "base":
        got["last_hidden_state"] = out.last_hidden_state
        order.append("last_hidden_state")
        if "pooler_output" in got:
            order.append("pooler_output")
    else:
        if "pooler_output" in got:
            order.append("pooler_output")
        if task == "question_answering":
            got["logits"] = torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, T, 2)
        else:
            got["logits"] = out.logits
        order.append("logits")
    missing = [n for n in order if n not in got]
    if missing:
        raise RuntimeError(f"hooks did not fire for {missing}; the HF module layout of {model_type} changed?")
    return [(n, got[n].detach().cpu().numpy()) for n in order]


def trace_torch(model_dir: str | os.PathLike[str], architecture: str, batch: dict[str, Any], task: str,
                dtype: str = "float32") -> Trace:
    """Load ``architecture`` from ``model_dir`` with transformers and trace it on ``batch``."""
    return trace_torch_model(load_torch_model(model_dir, architecture, dtype), batch, task)
