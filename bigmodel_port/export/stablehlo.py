"""``bigmodel export --format stablehlo``: ``jax.export`` artifacts of our own forward.

Each function is the family's one forward (``bigmodel_jax.models.*``; the decode steps are
``bigmodel_jax.generation.step``) with the parameters closed over, so they are baked into the
artifact as constants: a runtime needs the artifact and ``manifest.json``, nothing else.
Batch and sequence dims are symbolic (``jax.export.symbolic_shape``), constrained to what the
model supports (a sequence no longer than ``max_len``; a decode step's new tokens no more than
its cache slots), so one artifact serves every shape.

Functions (``<name>.jax_export`` each, ``manifest.json`` lists their inputs and outputs with
shapes as dim-letter strings and dtypes):

==========  ==================  ===================================================================
family      function            inputs -> outputs
==========  ==================  ===================================================================
gpt         forward             input_ids, attention_mask (b, t) -> logits (b, t, V)
            decode_step         input_ids (b, n), cache_pos (), attention_mask (b, s),
                                cache_k, cache_v (L, b, s, K, E) -> logits (b, n, V), cache_k,
                                cache_v. The runtime allocates the zeroed cache (s slots), runs a
                                prefill at cache_pos 0, then one-token steps; attention_mask marks
                                the slots holding real tokens.
bert        forward             input_ids, attention_mask, token_type_ids (b, t) -> the head's
                                logits (base: last_hidden_state [, pooler_output])
seq2seq     forward             input_ids, attention_mask (b, s), decoder_input_ids (b, t) -> logits
            encode              input_ids, attention_mask (b, s) -> encoder_hidden_states (b, s, D)
            cross_cache         encoder_hidden_states -> cross_k, cross_v (L, b, s, K, E)
            decode_step         decoder_input_ids (b, n), cache_pos (), attention_mask (b, s),
                                cache_k, cache_v (L, b, m, K, E), cross_k, cross_v -> logits
                                (b, n, V), cache_k, cache_v
vit         forward             pixel_values (b, C, H, W) -> logits (b, classes) (base:
                                last_hidden_state, pooler_output)
==========  ==================  ===================================================================

``quantize`` (8 or 4 bits, ``bigmodel export --quantize int8 / int4``): the closed-over weights
are ``bigmodel_jax.quant.quantize_tree``'s (norms and biases float; with int4 the LM head and a
tied embedding int8), so the artifact holds int8 / packed int4 codes and their scales and each
function dequantises at use, exactly as our forward does on the quantised tree. The manifest's
``quantization`` entry says the bits, the exclusions and every quantised leaf's bits / group
size (None for a float export).

Integer inputs are int32; masks are int32 (1 = real token). Read back with
``jax.export.deserialize(open(f, "rb").read()).call(*inputs)``: only jax and numpy are needed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export as jax_export

from bigmodel_jax.generation.step import decode_step
from bigmodel_jax.models import bert, gpt, seq2seq, vit
from bigmodel_jax.quant import is_quantized, quantize_tree
from bigmodel_jax.tree import to_jax
from bigmodel_port.atomic import atomic_write_text
from bigmodel_port.export import ExportModel

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "exported_functions", "quantize_params", "write_stablehlo"]

FORMAT_NAME = "bigmodel-stablehlo"
FORMAT_VERSION = 1
SUFFIX = ".jax_export"

# dim letter -> what it counts (the manifest's legend)
DIMS = {"b": "batch", "t": "sequence (tokens)", "s": "source tokens / cache slots", "n": "new tokens of a step",
        "m": "decoder cache slots"}


@dataclasses.dataclass
class Function:
    """One exported function: ``fn(*inputs)`` with named inputs (shape strings and dtypes) and
    named outputs."""

    name: str
    fn: Callable[..., Any]
    inputs: list[tuple[str, str, Any]]  # (name, shape as dim letters / numbers "b, t", dtype)
    outputs: list[str]
    constraints: tuple[str, ...] = ()
    note: str = ""


def _specs(inputs: list[tuple[str, str, Any]], constraints: tuple[str, ...]) -> list[jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs with the symbolic dims shared across inputs (one scope)."""
    letters: list[str] = []
    for _, shape, _ in inputs:
        for d in (x.strip() for x in shape.split(",") if x.strip()):
            if not d.isdigit() and d not in letters:
                letters.append(d)
    syms = dict(zip(letters, jax_export.symbolic_shape(", ".join(letters), constraints=constraints))) if letters else {}
    out = []
    for _, shape, dtype in inputs:
        dims = tuple(int(d) if d.isdigit() else syms[d] for d in (x.strip() for x in shape.split(",") if x.strip()))
        out.append(jax.ShapeDtypeStruct(dims, dtype))
    return out


def _mask(m: jax.Array) -> jax.Array:
    return m != 0


def _jax_params(tree: Any) -> Any:
    """``to_jax`` for a float tree; a tree with ``QuantizedWeight`` leaves (already JAX, from
    ``quantize_tree``) as it is."""
    if any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized)):
        return tree
    return to_jax(tree)


def _leaves_with_path(tree: Any, path: str = "") -> Any:
    """("a/b/c", leaf) pairs of a nested-dict tree, a ``QuantizedWeight`` counted as one leaf."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves_with_path(tree[k], f"{path}/{k}" if path else k)
    else:
        yield path, tree


def quantize_params(model: ExportModel, bits: int) -> tuple[ExportModel, dict[str, Any]]:
    """``model`` with its weights quantised to ``bits`` (``quantize_tree``'s defaults), and the
    manifest's ``quantization`` record: bits, the exclusion patterns, the int4 LM-head rule,
    every quantised leaf's bits / group size / contraction axes and the leaves kept in float."""
    from reference_numpy.quant import BITS, DEFAULT_EXCLUDE, DEFAULT_INT8_KEEP

    if bits not in BITS:
        raise ValueError(f"quantize must be one of {BITS} bits, got {bits!r}")
    tree = quantize_tree(to_jax(model.params), bits)
    leaves, kept = {}, []
    for path, leaf in _leaves_with_path(tree):
        if is_quantized(leaf):
            leaves[path] = {"bits": leaf.bits, "group_size": leaf.group_size, "axes": list(leaf.axes)}
        else:
            kept.append(path)
    record = {"bits": bits, "exclude": list(DEFAULT_EXCLUDE),
              "int8_keep": list(DEFAULT_INT8_KEEP) if bits == 4 else [],
              "scheme": "weight-only symmetric: int8 one scale per output channel; int4 one scale per group of "
                        "group_size inputs, codes in [-7, 7] packed two per byte (reference_numpy.qweight)",
              "leaves": leaves, "float_leaves": kept}
    return dataclasses.replace(model, params=tree), record


def exported_functions(model: ExportModel) -> list[Function]:
    """The functions the artifact holds for ``model`` (module docstring), params closed over."""
    c, p, task = model.config, _jax_params(model.params), model.task
    i32, f32 = jnp.int32, jnp.float32
    if model.family == "gpt":
        L, K, E, T = c.n_layers, c.kv_heads, c.e, c.max_len
        tokens = [("input_ids", "b, t", i32), ("attention_mask", "b, t", i32)]
        if task == "base":
            fwd = Function("forward", lambda ids, m: gpt.hidden_states(p, {"input_ids": ids, "attention_mask": _mask(m)}, c),
                           tokens, ["last_hidden_state"], (f"t <= {T}",))
            return [fwd]

        def step(ids: Any, pos: Any, m: Any, k: Any, v: Any) -> Any:
            # pos joins Python-int indices inside dynamic_update_slice: give it their dtype (int64 under x64)
            logits, cache = decode_step(p, {"k": k, "v": v}, ids, pos.astype(int), _mask(m), c)
            return logits, cache["k"], cache["v"]

        cache = f"{L}, b, s, {K}, {E}"
        return [
            Function("forward", lambda ids, m: gpt.forward(p, {"input_ids": ids, "attention_mask": _mask(m)}, c),
                     tokens, ["logits"], (f"t <= {T}",)),
            Function("decode_step", step,
                     [("input_ids", "b, n", i32), ("cache_pos", "", i32), ("attention_mask", "b, s", i32),
                      ("cache_k", cache, f32), ("cache_v", cache, f32)],
                     ["logits", "cache_k", "cache_v"], ("s >= n", f"s <= {T}"),
                     "tokens input_ids go to slots [cache_pos, cache_pos + n); start from zeroed caches"),
        ]
    if model.family == "bert":
        head = task
        inputs = [("input_ids", "b, t", i32), ("attention_mask", "b, t", i32), ("token_type_ids", "b, t", i32)]

        def bert_fwd(ids: Any, m: Any, tt: Any) -> Any:
            out = bert.forward(p, {"input_ids": ids, "attention_mask": m, "token_type_ids": tt}, c, head)
            if head == "base":
                return out if c.pooler else out[0]
            if head == "question_answering":
                return out[..., 0], out[..., 1]
            return out

        outs = {"base": ["last_hidden_state", "pooler_output"] if c.pooler else ["last_hidden_state"],
                "question_answering": ["start_logits", "end_logits"]}.get(head, ["logits"])
        return [Function("forward", bert_fwd, inputs, outs, (f"t <= {c.max_len}",))]
    if model.family == "seq2seq":
        S, L, D = c.max_len, c.decoder_layers, c.d_model
        K, E = c.n_kv_heads or c.n_heads, c.d_model // c.n_heads
        src = [("input_ids", "b, s", i32), ("attention_mask", "b, s", i32)]

        def encode(ids: Any, m: Any) -> Any:
            return seq2seq.encode(p, {"input_ids": ids, "attention_mask": m}, c)

        def cross(enc: Any) -> Any:
            cc = seq2seq.init_cache(p, enc, c, 1)
            return cc["ck"], cc["cv"]

        def step(ids: Any, pos: Any, m: Any, k: Any, v: Any, ck: Any, cv: Any) -> Any:
            logits, cc = seq2seq.decode_step(p, {"k": k, "v": v, "ck": ck, "cv": cv},
                                             {"decoder_input_ids": ids, "attention_mask": m}, pos.astype(int), c)
            return logits, cc["k"], cc["v"]

        self_cache, cross_cache = f"{L}, b, m, {K}, {E}", f"{L}, b, s, {K}, {E}"
        return [
            Function("forward", lambda ids, m, dec: seq2seq.forward(
                p, {"input_ids": ids, "attention_mask": m, "decoder_input_ids": dec}, c),
                [*src, ("decoder_input_ids", "b, t", i32)], ["logits"], (f"s <= {S}", f"t <= {S}")),
            Function("encode", encode, src, ["encoder_hidden_states"], (f"s <= {S}",)),
            Function("cross_cache", cross, [("encoder_hidden_states", f"b, s, {D}", f32)], ["cross_k", "cross_v"],
                     (f"s <= {S}",)),
            Function("decode_step", step,
                     [("decoder_input_ids", "b, n", i32), ("cache_pos", "", i32), ("attention_mask", "b, s", i32),
                      ("cache_k", self_cache, f32), ("cache_v", self_cache, f32),
                      ("cross_k", cross_cache, f32), ("cross_v", cross_cache, f32)],
                     ["logits", "cache_k", "cache_v"], ("m >= n", f"m <= {S}", f"s <= {S}"),
                     "decoder tokens go to slots [cache_pos, cache_pos + n) of zeroed cache_k / cache_v; "
                     "cross_k / cross_v from cross_cache(encode(...))"),
        ]
    if model.family == "vit":
        px = [("pixel_values", f"b, {c.n_channels}, {c.image_size}, {c.image_size}", f32)]
        if task == "base":
            outs = ["last_hidden_state", "pooler_output"] if c.pooler else ["last_hidden_state"]
            return [Function("forward", lambda x: vit.encode(p, {"pixel_values": x}, c) if c.pooler
                             else vit.encode(p, {"pixel_values": x}, c)[0], px, outs)]
        return [Function("forward", lambda x: vit.forward(p, {"pixel_values": x}, c), px, ["logits"])]
    raise ValueError(f"stablehlo export has no functions for family {model.family!r}")


def _shape_text(shape: tuple[Any, ...]) -> list[Any]:
    return [d if isinstance(d, int) else str(d) for d in shape]


def write_stablehlo(model: ExportModel, out: Path, *, quantize: int | None = None) -> dict[str, Any]:
    """Export every function of ``model`` to ``out`` and write ``manifest.json``; ``quantize``
    (8 or 4 bits): close over the quantised weights instead (module docstring)."""
    quantization = None
    if quantize is not None:
        model, quantization = quantize_params(model, quantize)
    functions = {}
    for f in exported_functions(model):
        specs = _specs(f.inputs, f.constraints)
        exp = jax_export.export(jax.jit(f.fn))(*specs)
        (out / f"{f.name}{SUFFIX}").write_bytes(exp.serialize())
        outs = exp.out_avals
        if len(outs) != len(f.outputs):
            raise AssertionError(f"{f.name}: {len(outs)} outputs for names {f.outputs}")
        functions[f.name] = {
            "file": f"{f.name}{SUFFIX}",
            "inputs": [{"name": n, "shape": _shape_text(s.shape), "dtype": str(jnp.dtype(s.dtype))}
                       for (n, _, _), s in zip(f.inputs, specs)],
            "outputs": [{"name": n, "shape": _shape_text(a.shape), "dtype": str(a.dtype)} for n, a in zip(f.outputs, outs)],
            "constraints": list(f.constraints),
            **({"note": f.note} if f.note else {}),
        }
    c = model.config
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "jax_version": jax.__version__,
        "family": model.family, "architecture": model.architecture, "task": model.task,
        "config": dataclasses.asdict(c), "vocab_size": getattr(c, "vocab_size", None),
        "special_ids": dict(model.special_ids), "labels": model.labels, "dims": DIMS, "functions": functions,
        "quantization": quantization,
        "how_to_run": "jax.export.deserialize(open(file, 'rb').read()).call(*inputs), inputs in the listed order",
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"format": "stablehlo", "functions": sorted(functions),
            **({"quantization": f"int{quantize}"} if quantize is not None else {})}
