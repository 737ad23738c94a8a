"""``bigmodel export``: a training run, an HF directory or a native checkpoint as an HF
directory, a StableHLO (``jax.export``) artifact or an ONNX graph (``bigmodel_port.export``).

A training run is read here, not in ``bigmodel_port``, because reading it needs the training
stack (``bigmodel_train.trainer.load_run``): its task gives the model config, the tokenizer
(``RUN/tokenizer``, or the byte tokenizer / translation vocabulary, written as an equivalent HF
``tokenizer.json``: ``bigmodel_port.export.hf_tokenizers``) and the label names.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from bigmodel_port.export import FORMATS


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run / HF directory / native checkpoint to HF, StableHLO or ONNX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Export a model so that a runtime without this project runs it. SRC is a training
            run directory (config.json + checkpoints/), an HF model directory (config.json +
            weights) or a native .safetensors / .npz checkpoint. OUT is a new directory.

              hf         config.json, model.safetensors, tokenizer files: transformers'
                         AutoModel* / AutoTokenizer load it
              stablehlo  jax.export artifacts (forward; decode step with KV cache for causal
                         LMs and seq2seq) with symbolic batch / sequence dims + manifest.json
              onnx       ONNX graphs (opset 17) with dynamic batch / sequence axes, via
                         torch.onnx.export of the hf export + manifest.json

            examples:
              bigmodel export runs/gpt-stdlib gpt-hf --format hf
              bigmodel export runs/gpt-stdlib gpt-hlo --format stablehlo
              bigmodel export runs/gpt-stdlib gpt-hlo-int8 --format stablehlo --quantize int8
              bigmodel export ./bert-base-uncased bert-onnx --format onnx"""),
    )
    p.add_argument("src", metavar="SRC", help="run directory, HF directory or native checkpoint")
    p.add_argument("out", metavar="OUT", help="output directory (new, or empty, or --overwrite)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    p.add_argument("--architecture", help="HF class to export as (default: the source's, or the usual one)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint of the run (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="stablehlo only: close over weight-only quantised weights (int8 per output channel; int4 "
                        "groups of 128, LM head int8; norms and biases float); the manifest records it. hf / onnx "
                        "refuse it: transformers cannot read this format")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    model = load_source(args.src, architecture=args.architecture, checkpoint=args.checkpoint)
    from bigmodel_port.export import export

    options = {} if args.quantize is None else {"quantize": {"int8": 8, "int4": 4}[args.quantize]}
    summary = export(model, args.out, args.format, overwrite=args.overwrite, **options)
    fmt = args.format + (f", {args.quantize}" if args.quantize else "")
    print(f"{args.src} -> {args.out} ({fmt}): {model.architecture}, "
          f"{', '.join(summary['files'])}")
    return 0


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def load_source(src: str | Path, *, architecture: str | None = None, checkpoint: str | None = None) -> Any:
    """The ``ExportModel`` of SRC: a run directory, an HF directory or a native checkpoint."""
    from bigmodel_port.export import from_hf_dir, from_native

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(2, "no such run, model directory or checkpoint", str(path))
    if checkpoint is not None and not is_run_dir(path):
        raise ValueError(f"--checkpoint applies to run directories; {path} has no checkpoints/")
    if is_run_dir(path):
        return from_run(path, architecture=architecture, checkpoint=checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"SRC {str(path)!r} is neither a run directory (config.json + checkpoints/) nor an HF "
                             "model directory (config.json + weights)")
        return from_hf_dir(path, architecture)
    if path.suffix in (".safetensors", ".npz"):
        return from_native(path, architecture)
    raise ValueError(f"SRC {str(path)!r} is not recognised: expected a run directory, an HF directory, or a "
                     ".safetensors / .npz native checkpoint")


def from_run(run_dir: Path, *, architecture: str | None = None, checkpoint: str | None = None) -> Any:
    """The ``ExportModel`` of a training run's latest (or given) checkpoint, with its tokenizer,
    labels and special ids."""
    from bigmodel_port.export import ExportModel, default_architecture
    from bigmodel_port.export.hf_dir import vit_preprocessor
    from bigmodel_port.export.hf_tokenizers import byte_tokenizer, word_tokenizer
    from bigmodel_train.tasks import ByteTokenizer, ClassificationTask, ImageTask, LMTask, TranslationTask
    from bigmodel_train.trainer import load_run

    cfg, task, params, _ = load_run(run_dir, checkpoint)
    config = task.model_config
    arch = architecture or default_architecture(config, getattr(task, "head", None))
    tokenizer, labels, special, pre = None, None, {}, None
    max_len = getattr(config, "max_len", None)
    if isinstance(task, LMTask):
        tokenizer = byte_tokenizer(max_len) if isinstance(task.tokenizer, ByteTokenizer) else task.tokenizer
        special = {"bos": task.eos_id, "eos": task.eos_id}
    elif isinstance(task, TranslationTask):
        v = task.vocab
        tokenizer = word_tokenizer(list(v.words), model_max_length=max_len)
        special = {"pad": v.pad_id, "bos": v.bos_id, "eos": v.eos_id, "unk": v.unk_id, "decoder_start": v.bos_id}
    elif isinstance(task, ClassificationTask):
        tokenizer, labels = task.tokenizer, list(task.label_names)
        special = {"pad": int(task.tokenizer.pad_token_id)}
    elif isinstance(task, ImageTask):
        labels = list(task.label_names)
        pre = vit_preprocessor(config.image_size)
    return ExportModel(config=config, params=params, architecture=arch, tokenizer=tokenizer, labels=labels,
                       special_ids=special, preprocessor=pre, source=str(run_dir))
