"""``bigmodel export --format onnx``: ONNX graphs with dynamic batch and sequence axes.

Route: ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``, opset ``OPSET``) of
the transformers model that our ``hf`` export loads into. Why this route:

* parity: the graph is transformers' own module, which our HF parity tests already hold to our
  forward (measured here: ≤ 2e-7 abs on the tiny models, tests/test_export.py), and the
  exporter is the one optimum and most deployed HF ONNX models use;
* a clean graph: standard ONNX ops (``LayerNormalization``, ``MatMul``, ``Gemm``, ``Softmax``...)
  with no custom domains, so any onnxruntime build runs it; jax2onnx would need a converter for
  each of our primitives (``scan`` over stacked layers among them) and one more dependency;
* no new dependency: torch and transformers are the ``hf`` extra's, onnx / onnxruntime the
  ``deploy`` extra's.

Files: ``model.onnx`` (the full forward; for seq2seq the teacher-forced forward with
``decoder_input_ids``), and for seq2seq also ``encoder.onnx`` (input_ids, attention_mask ->
last_hidden_state) and ``decoder.onnx`` (decoder_input_ids, encoder_hidden_states,
attention_mask -> logits; no KV cache: the decoder reruns on the whole prefix, the
``stablehlo`` export has the cached step). Beside them: ``config.json``, the tokenizer files and
``manifest.json`` (inputs / outputs with their dynamic axes, opset).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.export import ExportModel
from bigmodel_port.export.hf_dir import write_hf_dir

__all__ = ["OPSET", "graphs", "write_onnx"]

OPSET = 17  # the first opset with LayerNormalization as one op; onnxruntime >= 1.14 runs it


def graphs(model: ExportModel) -> dict[str, dict[str, Any]]:
    """file stem -> {"inputs": [(name, axes)], "outputs": [names]} for ``model``'s task; ``axes``
    names the dynamic dims ("batch", "sequence", "source", "target")."""
    bt = {0: "batch", 1: "sequence"}
    task = model.task
    if model.family == "gpt":
        outs = ["last_hidden_state"] if task == "base" else ["logits"]
        return {"model": {"inputs": [("input_ids", bt), ("attention_mask", bt)], "outputs": outs}}
    if model.family == "bert":
        outs = {"base": ["last_hidden_state", "pooler_output"] if model.config.pooler else ["last_hidden_state"],
                "question_answering": ["start_logits", "end_logits"]}.get(task, ["logits"])
        return {"model": {"inputs": [("input_ids", bt), ("attention_mask", bt), ("token_type_ids", bt)],
                          "outputs": outs}}
    if model.family == "vit":
        outs = (["last_hidden_state", "pooler_output"] if model.config.pooler else ["last_hidden_state"]) \
            if task == "base" else ["logits"]
        return {"model": {"inputs": [("pixel_values", {0: "batch"})], "outputs": outs}}
    if model.family == "seq2seq":
        src, tgt = {0: "batch", 1: "source"}, {0: "batch", 1: "target"}
        return {
            "model": {"inputs": [("input_ids", src), ("attention_mask", src), ("decoder_input_ids", tgt)],
                      "outputs": ["logits"]},
            "encoder": {"inputs": [("input_ids", src), ("attention_mask", src)], "outputs": ["last_hidden_state"]},
            "decoder": {"inputs": [("decoder_input_ids", tgt), ("encoder_hidden_states", src), ("attention_mask", src)],
                        "outputs": ["logits"]},
        }
    raise ValueError(f"onnx export has no graphs for family {model.family!r}")


def _output_axes(model: ExportModel, stem: str, output: str) -> dict[int, str]:
    """Dynamic axes of an output: batch always; the token axis where the output has one."""
    if model.family == "vit" or output == "pooler_output" or model.task == "sequence_classification":
        return {0: "batch"}
    if model.family == "seq2seq":
        return {0: "batch", 1: "source" if stem == "encoder" else "target"}
    return {0: "batch", 1: "sequence"}


def _module(hf_model: Any, model: ExportModel, stem: str) -> Any:
    """A torch module taking the graph's inputs positionally and returning its outputs."""
    import torch

    task, family = model.task, model.family

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf_model

        def forward(self, *args: Any) -> Any:
            m = self.m
            if family == "seq2seq":
                if stem == "encoder":
                    return m.get_encoder()(input_ids=args[0], attention_mask=args[1]).last_hidden_state
                if stem == "decoder":
                    h = m.model.decoder(input_ids=args[0], encoder_hidden_states=args[1],
                                        encoder_attention_mask=args[2], use_cache=False).last_hidden_state
                    return m.lm_head(h) + m.final_logits_bias
                return m(input_ids=args[0], attention_mask=args[1], decoder_input_ids=args[2], use_cache=False).logits
            if family == "vit":
                out = m(pixel_values=args[0])
            elif family == "gpt":
                out = m(input_ids=args[0], attention_mask=args[1], use_cache=False)
            else:
                out = m(input_ids=args[0], attention_mask=args[1], token_type_ids=args[2])
            if task == "base":
                pooled = getattr(out, "pooler_output", None)
                return out.last_hidden_state if pooled is None else (out.last_hidden_state, pooled)
            if task == "question_answering":
                return out.start_logits, out.end_logits
            return out.logits

    return Graph().eval()


def _example(model: ExportModel, inputs: list[tuple[str, dict[int, str]]]) -> tuple[Any, ...]:
    """Example tensors to trace (batch 2, lengths 5 / 4 / 3 so no two dynamic axes coincide)."""
    import torch

    c = model.config
    g = torch.Generator().manual_seed(0)
    lengths = {"sequence": 5, "source": 5, "target": 4}
    out = []
    for name, axes in inputs:
        if name == "pixel_values":
            out.append(torch.rand((2, c.n_channels, c.image_size, c.image_size), generator=g))
        elif name == "encoder_hidden_states":
            out.append(torch.randn((2, lengths["source"], c.d_model), generator=g))
        else:
            shape = (2, lengths[axes[1]])
            if name.endswith("input_ids"):
                out.append(torch.randint(0, c.vocab_size, shape, generator=g))
            elif name == "attention_mask":
                out.append(torch.ones(shape, dtype=torch.int64))
            else:  # token_type_ids
                out.append(torch.zeros(shape, dtype=torch.int64))
    return tuple(out)


def write_onnx(model: ExportModel, out: Path, *, opset: int = OPSET) -> dict[str, Any]:
    """Write the ONNX graphs of ``model`` (module docstring) to ``out``; returns a summary."""
    import torch

    from bigmodel_port.trace_torch import load_torch_model

    tmp = Path(tempfile.mkdtemp(prefix="bigmodel-onnx-"))
    try:
        write_hf_dir(model, tmp)
        hf_model = load_torch_model(tmp, model.architecture)
        for f in tmp.iterdir():  # config and tokenizer files travel with the graphs; weights do not
            if f.is_file() and not f.name.startswith("model") and f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, Any] = {"format": "bigmodel-onnx", "format_version": 1, "opset": opset,
                                "exporter": f"torch.onnx.export (TorchScript, torch {torch.__version__})",
                                "family": model.family, "architecture": model.architecture, "task": model.task,
                                "vocab_size": getattr(model.config, "vocab_size", None),
                                "special_ids": dict(model.special_ids), "labels": model.labels, "graphs": {}}
    for stem, spec in graphs(model).items():
        names = [n for n, _ in spec["inputs"]]
        dynamic = {n: axes for n, axes in spec["inputs"]}
        for o in spec["outputs"]:
            dynamic[o] = _output_axes(model, stem, o)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(_module(hf_model, model, stem), _example(model, spec["inputs"]), str(out / f"{stem}.onnx"),
                              input_names=names, output_names=spec["outputs"], dynamic_axes=dynamic,
                              opset_version=opset, dynamo=False)
        manifest["graphs"][stem] = {"file": f"{stem}.onnx", "inputs": [{"name": n, "dynamic_axes": a}
                                                                         for n, a in spec["inputs"]],
                                    "outputs": spec["outputs"]}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"format": "onnx", "opset": opset, "graphs": sorted(manifest["graphs"])}
