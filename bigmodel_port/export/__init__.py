"""Export a model to a runtime that does not import this project: ``bigmodel export``.

Three formats (``FORMATS``), each a directory:

* ``hf`` (``export.hf_dir``): a HuggingFace directory (``config.json``, safetensors, tokenizer
  files, ``generation_config.json`` / ``preprocessor_config.json`` where they apply) that
  transformers' ``AutoModel*`` / ``AutoTokenizer`` load. The weights go through the one HF name
  table per architecture (``bigmodel_port.hf``): nothing here restates a name.
* ``stablehlo`` (``export.stablehlo``): ``jax.export`` artifacts of the forward (and, for causal
  LMs and seq2seq, the cached decode step) with symbolic batch / sequence dims, plus
  ``manifest.json``.
* ``onnx`` (``export.onnx``): ONNX graphs with dynamic batch / sequence axes, via
  ``torch.onnx.export`` of the ``hf`` export (``export.onnx``'s docstring says why).

What every format exports is an :class:`ExportModel`: a config, a NumPy parameter tree, the HF
architecture (which fixes the head), and what a runtime needs besides the weights (tokenizer,
label names, special token ids). :func:`from_hf_dir` and :func:`from_native` build one from an
HF directory or a native checkpoint; a *training run* is read one layer up
(``bigmodel_apps.cli.export``), because reading it needs ``bigmodel_train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bigmodel_port.convert import read_any
from bigmodel_port.hf import arch_module
from bigmodel_port.hf.checkpoint import check_expressible, fit_config, hf_config_for, load_pretrained, model_type_of
from bigmodel_port.tokenization import AutoTokenizer
from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig
from reference_numpy.tree import Tree

__all__ = ["FORMATS", "ExportModel", "default_architecture", "export", "from_hf_dir", "from_native",
           "inference_config", "task_of"]

FORMATS = ("hf", "stablehlo", "onnx")

# Why only ``stablehlo`` takes ``quantize``: transformers loads quantised weights only through its
# quantisation backends (bitsandbytes, GPTQ, AWQ, compressed-tensors, torchao), each with its own
# on-disk format and package; our symmetric int8-per-channel / int4-groups-of-128 codes (packed
# two per byte) are none of them, and the onnx route is torch.onnx over the hf export.
QUANTIZE_REFUSED = ("--quantize applies to --format stablehlo only, not {fmt}: transformers cannot read our "
                    "weight-only int8 / int4 group format (it loads quantised weights only through its own "
                    "quantisation backends, each a format and a package of its own), and the onnx export is "
                    "built from the hf one; export float weights, or use --format stablehlo --quantize")

# Config fields that only shape training (the loss / dropout), never the logits of an
# evaluation forward: an export may set them to what the HF config reads back.
TRAINING_ONLY_FIELDS = ("dropout", "label_smoothing")

# BERT head (native metadata "head", the ``bert.forward`` head) -> HF class
BERT_HEADS = {"base": "BertModel", "mlm": "BertForMaskedLM",
              "sequence_classification": "BertForSequenceClassification",
              "token_classification": "BertForTokenClassification",
              "question_answering": "BertForQuestionAnswering"}


@dataclass
class ExportModel:
    """A model ready to export: what every format reads.

    ``tokenizer``: an object with ``save_pretrained(dir)`` writing HF tokenizer files (our
    ``PreTrainedTokenizerFast`` family), or None (ViT; or a source without one). ``labels``:
    class names by id (id2label), when known. ``special_ids``: ``bos`` / ``eos`` / ``pad`` /
    ``unk`` / ``decoder_start`` token ids, when known. ``hf_config``: a ``config.json`` whose
    fields we do not model are kept. ``preprocessor``: ``preprocessor_config.json`` (ViT)."""

    config: Config
    params: Tree
    architecture: str
    tokenizer: Any = None
    labels: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    hf_config: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    source: str = ""

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def task(self) -> str:
        """Our task name of the architecture: "causal_lm", "base", "mlm", "seq2seq_lm", ..."""
        return task_of(self.architecture)


def task_of(architecture: str) -> str:
    """Our task of an HF class (``ARCHITECTURES`` of its module), or a clear error."""
    return arch_module(model_type_of(architecture)).ARCHITECTURES[architecture]


def default_architecture(config: Config, head: str | None = None) -> str:
    """The HF class that runs ``config`` with its usual head: a causal LM for GPT (GPT-2 with
    learned positions, Llama with RoPE), BERT's ``head`` (default masked LM), Marian for seq2seq,
    the ViT classifier when the config has one."""
    if isinstance(config, BertConfig):
        head = head or "mlm"
        if head not in BERT_HEADS:
            raise ValueError(f"unknown BERT head {head!r}; known: {sorted(BERT_HEADS)}")
        return BERT_HEADS[head]
    if isinstance(config, GPTConfig):
        return "GPT2LMHeadModel" if config.positions == "learned" else "LlamaForCausalLM"
    if isinstance(config, Seq2SeqConfig):
        return "MarianMTModel"
    if isinstance(config, ViTConfig):
        return "ViTForImageClassification" if config.classifier else "ViTModel"
    raise TypeError(f"no HF architecture for {type(config).__name__}")


def inference_config(config: Config, architecture: str) -> Config:
    """``config`` with its training-only fields (``TRAINING_ONLY_FIELDS``) set to what the HF
    config of ``architecture`` reads back, so a run trained with label smoothing or dropout
    exports (those fields never change the logits of an evaluation forward). A field that does
    change the logits and that the architecture cannot carry still raises ``ValueError``."""
    config = fit_config(config, architecture)
    hf = hf_config_for(config, architecture)
    back = arch_module(model_type_of(architecture)).config_from_hf(hf, architecture)
    changes = {f: getattr(back, f) for f in TRAINING_ONLY_FIELDS
               if hasattr(config, f) and getattr(config, f) != getattr(back, f)}
    return replace(config, **changes) if changes else config


def _labels_from_hf(hf: dict[str, Any]) -> list[str] | None:
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        return None


def _special_ids_from_hf(hf: dict[str, Any]) -> dict[str, int]:
    out = {}
    for ours, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id"),
                      ("decoder_start", "decoder_start_token_id")):
        v = hf.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            out[ours] = v
    return out


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def from_hf_dir(path: str | os.PathLike[str], architecture: str | None = None) -> ExportModel:
    """An HF model directory (config.json + weights [+ tokenizer files])."""
    got = load_pretrained(path, architecture)
    d = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(d) if _has_tokenizer(d) else None
    pre = d / "preprocessor_config.json"
    return ExportModel(
        config=got.config, params=got.params, architecture=got.architecture, tokenizer=tokenizer,
        labels=_labels_from_hf(got.hf_config), special_ids=_special_ids_from_hf(got.hf_config),
        hf_config=got.hf_config, generation_config=got.generation_config,
        preprocessor=json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else None, source=str(path))


def from_native(path: str | os.PathLike[str], architecture: str | None = None) -> ExportModel:
    """A native ``.safetensors`` (or ``.npz``) checkpoint; the architecture is the one it
    remembers, else ``architecture``, else ``default_architecture`` (with BERT's ``head``)."""
    config, tree, meta = read_any(path)
    hf_config = json.loads(meta["hf_config"]) if "hf_config" in meta else None
    arch = architecture or meta.get("architecture")
    if arch is None:
        head = None
        if isinstance(config, BertConfig):  # the head is in the native metadata when saved by a run
            from bigmodel_port.native import load_native

            head = load_native(path)[2].get("head") if Path(path).suffix == ".safetensors" else None
        arch = default_architecture(config, head)
    if hf_config is not None and arch not in (hf_config.get("architectures") or [arch]):
        hf_config = {k: v for k, v in hf_config.items() if k != "architectures"}
    return ExportModel(config=config, params=tree, architecture=arch, hf_config=hf_config,
                       labels=_labels_from_hf(hf_config or {}), special_ids=_special_ids_from_hf(hf_config or {}),
                       source=str(path))


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {str(out)!r} is a file; an export writes a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"OUT {str(out)!r} exists and is not empty; pass --overwrite (overwrite=True) to replace it")


def export(model: ExportModel, out: str | os.PathLike[str], fmt: str, *, overwrite: bool = False,
           **options: Any) -> dict[str, Any]:
    """Write ``model`` in format ``fmt`` to the directory ``out``; returns the summary dict
    (files, and what each format checked). The export is built in a temporary sibling directory
    and renamed into place at the end, so a failed export leaves ``out`` as it was.

    ``options`` go to the format's writer; ``quantize=8 | 4`` (weight-only int8 / int4) is taken by
    ``stablehlo`` alone (``QUANTIZE_REFUSED`` says why).

    Raises ``ValueError`` for an unknown format, a non-empty ``out`` without ``overwrite``, a
    ``quantize`` for hf / onnx, or a model the format cannot express (naming the field)."""
    check_format(fmt)
    if options.get("quantize") is not None and fmt != "stablehlo":
        raise ValueError(QUANTIZE_REFUSED.format(fmt=fmt))
    out = Path(out)
    _check_out(out, overwrite)
    if not dataclasses.is_dataclass(model.config):
        raise TypeError("model.config must be a config dataclass")
    if model.source and Path(model.source).resolve() == out.resolve():
        raise ValueError(f"OUT {str(out)!r} is the source itself; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "hf":
            from bigmodel_port.export.hf_dir import write_hf_dir

            summary = write_hf_dir(model, tmp, **options)
        elif fmt == "stablehlo":
            from bigmodel_port.export.stablehlo import write_stablehlo

            summary = write_stablehlo(model, tmp, **options)
        else:
            from bigmodel_port.export.onnx import write_onnx

            summary = write_onnx(model, tmp, **options)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return summary


def expressible(model: ExportModel) -> Config:
    """The config the HF class writes for ``model`` (``inference_config``), checked: ``ValueError``
    naming every field config.json cannot carry."""
    config = inference_config(model.config, model.architecture)
    check_expressible(config, model.architecture, model.hf_config)
    return config
