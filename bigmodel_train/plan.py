"""Memory planner: per-device bytes and collective traffic of one AdamW training step on a mesh,
from the model config alone (pure arithmetic on shapes with ``bigmodel_jax.sharding``'s rules:
nothing is allocated and no device is used, so ``llama-2-7b`` on 64 devices plans instantly). ``bigmodel plan`` prints it.

What one device holds for one step of ``bigmodel_train.steps.JaxStepper`` (float32 master
weights, AdamW, every parameter leaf split by the logical-axis rules of
``bigmodel_jax.sharding``; the batch split over ``data x fsdp``):

    parameters        sum over leaves of numel / split x 4 bytes (float32 master weights)
    gradients         the same (float32: the bf16 cast is inside the differentiated function)
    optimizer state   AdamW's two moments mu, nu: 2 x parameters (+ the int32 step counter)
    activations       what the backward keeps per block under the remat policy (``_block_saved``)
                      at the compute dtype, for B / (data x fsdp) examples of T tokens, plus the
                      float32 logits the loss reads and their gradient (``head_bytes``)
    transient         buffers that live only inside the step. It peaks in one of two phases
                      (XLA reuses buffers between them): the backward holds the activations
                      less the head's (dead once the head's backward has run) plus the larger of
                      the head's, (a) the backward of one scanned layer: its slice of every
                      saved activation (the scan body's dynamic-slice of the stacked residuals
                      is a copy), the (B, T, D) gradient twice and the layer's weights sliced
                      out of their (L, ...) stack (``layer_backward_bytes``); with only the batch
                      split over data x fsdp, (B, T, D) is full size on every tensor device, so
                      this is the backward's largest transient under tensor parallelism; and
                      (b) the weights all-gathered over ``fsdp`` (full size: XLA gathers each
                      stacked (L, ...) weight before the layer scan); the update holds the new
                      moments and parameters (2 x parameters beyond the gradient buffer),
                      materialised in full before the step's non-finite guard
                      (``jnp.where(ok, new, old)``) picks them.
                      transient = max(backward, update) - activations

The total is compared (tests/test_plan.py) with XLA's ``memory_analysis()`` of the compiled step
as ``argument + output - alias + temp``: the arguments are the live state (parameters, moments,
batch); the donated outputs alias them, so ``output - alias`` is only what is new (the loss, the
norms); ``temp`` is XLA's peak of everything else (gradients, activations, gathered weights,
update buffers). That sum is the device memory the step needs at its peak.

Collectives per step (per device, bytes of the *result* of each op), as XLA:CPU compiles them
(``collective_arrays`` has the rules): fsdp all-gathers the fsdp-split weights (forward, and the
scanned ones again in the backward); the gradients are all-reduced over data x fsdp (XLA:CPU
lowers FSDP's reduce-scatter to an all-reduce and a slice: on GPU / TPU the fsdp part is a
reduce-scatter of 1/fsdp these bytes); tensor all-reduces (B, T, D) activations at the
row-parallel outputs (forward) and column-parallel inputs (backward).

Numbers for the devices: see ``DEVICES``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from reference_numpy.configs import (BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig, axes_for_path,
                                     param_shapes)

__all__ = ["DEVICES", "DTYPES", "REMAT", "Collective", "Plan", "batch_bytes", "collective_arrays", "device_memory",
           "head_bytes", "largest_batch", "leaf_splits", "plan"]

MESH_AXES = ("data", "fsdp", "tensor")  # the order of bigmodel_jax.sharding.MESH_AXES

# Device memory in bytes. Sources: NVIDIA H200 datasheet 141 GB HBM3e, of which nvidia-smi
# reports 143771 MiB total and CUDA can allocate ~139 GiB (we plan against 139 GiB); H100 SXM and
# A100-80GB datasheets: 80 GB (nvidia-smi: 81559 MiB; ~79 GiB usable); TPU v5e: 16 GiB HBM per
# chip (cloud.google.com/tpu/docs/v5e); cpu: this machine's MemTotal (/proc/meminfo).
DEVICES: dict[str, int | None] = {
    "h200": 139 * 2**30,
    "h100": 79 * 2**30,
    "a100-80g": 79 * 2**30,
    "tpu-v5e": 16 * 2**30,
    "cpu": None,  # read at plan time
}
DTYPES = {"float32": 4, "bfloat16": 2}  # compute dtype -> bytes; float32 master weights either way
REMAT = ("none", "full", "dots", "dots_no_batch")  # bigmodel_jax.perf.REMAT_POLICIES' names
F32 = 4


def device_memory(device: str) -> int:
    """Bytes of memory of ``device`` (a ``DEVICES`` name); ``ValueError`` for an unknown one."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if DEVICES[device] is not None:
        return int(DEVICES[device])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ValueError("cannot read MemTotal from /proc/meminfo for --device cpu")


# --------------------------------------------------------------------------------------------
# per-leaf splits: bigmodel_jax.sharding's rules (spec_axes, the logic of logical_spec) on mesh sizes


def _rules_table(rules: Any) -> dict[str, tuple[str, ...]]:
    # the one rules table and its validation; importing it loads jax but allocates nothing
    from bigmodel_jax.sharding import DEFAULT_RULES, _check_rules
    return _check_rules(DEFAULT_RULES if rules is None else rules)


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.extend(_leaves(v, p) if isinstance(v, dict) else [(p, tuple(v))])
    return out


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    shape: tuple[int, ...]
    axes: tuple[tuple[str, ...], ...]  # mesh axes per dimension

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def split(self, mesh: Mapping[str, int], only: tuple[str, ...] = MESH_AXES) -> int:
        """Into how many pieces the mesh axes in ``only`` split this leaf."""
        return math.prod(mesh.get(a, 1) for dim in self.axes for a in dim if a in only)


def _param_shapes(config: Config) -> dict[str, Any]:
    """The parameter tree the planned step trains: ``param_shapes(config)``, and for BERT the
    encoder with its masked-LM head (pre-training: transform, norm, the (V,) bias; the decoder is
    the tied word embedding), ``reference_numpy.models.bert.param_shapes(config, "mlm")``."""
    if isinstance(config, BertConfig):
        from reference_numpy.models.bert import param_shapes as bert_param_shapes
        return bert_param_shapes(config, "mlm")
    return param_shapes(config)


def batch_bytes(config: Config, batch_local: int, seq: int) -> int:
    """Bytes of one device's slice of the batch the step reads (int32 ids, float32 pixels):
    GPT input_ids (labels are the shifted ids); BERT's masked LM input_ids and labels; the
    encoder-decoder's input_ids, decoder_input_ids and labels (source and target ``seq`` long);
    ViT's pixel_values (C, H, W) and one label per image."""
    if isinstance(config, ViTConfig):
        return batch_local * (config.n_channels * config.image_size ** 2 * F32 + 4)
    arrays = {BertConfig: 2, Seq2SeqConfig: 3}.get(type(config), 1)
    return batch_local * seq * 4 * arrays


def leaf_splits(config: Config, mesh: Mapping[str, int], rules: Any = None) -> list[Leaf]:
    """Every parameter leaf of the planned tree (``_param_shapes``: ``param_shapes(config)``,
    BERT with its masked-LM head) with the mesh axes that split it."""
    from bigmodel_jax.sharding import _stacked, spec_axes

    table = _rules_table(rules)
    out = []
    for path, shape in _leaves(_param_shapes(config)):
        names = axes_for_path(path, len(shape), _stacked(path))
        axes = ((),) * len(shape) if names is None else spec_axes(names, shape, mesh, table)
        out.append(Leaf(path, shape, axes))
    return out


# --------------------------------------------------------------------------------------------
# activations


# What the backward of one block keeps per token, in units of D (norms) and F (the MLP), as JAX's
# partial evaluation saves it (``jax.ad_checkpoint.print_saved_residuals`` of ``gpt.block``):
# LayerNorm keeps x - mean, the normalised x and its output (the projections' input); RMSNorm the
# normalised x and its output. The MLP's activation keeps its input and what its derivative reads:
# erf GELU 4 arrays, tanh GELU 6, SiLU 4, ReLU 2 and a byte mask; a gated MLP adds the up
# projection and the product. Other activations: input and output.
NORM_SAVED = {"layer": 3, "rms": 2}
ACTIVATION_SAVED = {"gelu": 4.0, "gelu_tanh": 6.0, "silu": 4.0, "relu": 2.25}


def _block_saved(d: int, h: int, k: int, e: int, f: int, s: int, gated: bool, remat: str, t: int,
                 cross: int = 0, norm: str = "layer", activation: str = "gelu") -> tuple[float, float]:
    """(elements per token a block's backward keeps, elements per token one block holds while it
    is recomputed) under ``remat``; ``t`` the tensor split, ``s`` the attended length, ``cross``
    the source length of a cross-attention (0: none). Heads / mlp are split over ``t`` where the
    rules split them (the caller passes split sizes)."""
    qkv = (h + 2 * k) * e
    attn = qkv + h * s + h * s + h * e  # q k v, scores, probabilities, attention output
    mlp = (ACTIVATION_SAVED.get(activation, 2.0) + (2 if gated else 0)) * f
    # the block's input (the layer scan's carry); two norms; RMSNorm's backward also reads the
    # mid-block residual, LayerNorm's reads x - mean instead
    stream = d + 2 * NORM_SAVED.get(norm, 3) * d + (d if norm == "rms" else 0)
    if cross:
        attn += 2 * (h * e) + 2 * h * cross + h * e + d + d  # cross q, scores, probs, out, norm
    every = stream + attn + mlp
    if remat == "none":
        return every, 0.0
    if remat == "full":
        return d, every
    dots = qkv + h * s + h * e + d + (2 if gated else 1) * f + d  # matmul outputs
    if cross:
        dots += h * e + h * cross + h * e + d
    if remat == "dots_no_batch":  # attention's scores and outputs have batch dims: recomputed
        dots -= h * s + h * e + (h * cross + h * e if cross else 0)
    return d + dots, every - dots


def _family_dims(config: Config, t: int, seq: int) -> list[tuple[int, tuple]]:
    """[(number of blocks, _block_saved's arguments)] per stack, with heads / mlp split by ``t``
    where they divide (as the rules do)."""
    def sp(n: int) -> int:
        return n // t if n % t == 0 else n

    c = config
    norm, act = getattr(c, "norm", "layer"), c.activation
    if isinstance(c, GPTConfig):
        return [(c.n_layers, (c.d_model, sp(c.n_heads), sp(c.kv_heads), c.e, sp(c.d_ff), seq, c.gated_mlp, 0,
                              norm, act))]
    if isinstance(c, (BertConfig, ViTConfig)):
        e = c.d_model // c.n_heads
        return [(c.n_layers, (c.d_model, sp(c.n_heads), sp(c.n_heads), e, sp(c.d_ff), seq, False, 0, norm, act))]
    if isinstance(c, Seq2SeqConfig):
        e = c.d_model // c.n_heads
        kv = c.n_kv_heads or c.n_heads
        return [(c.n_layers, (c.d_model, sp(c.n_heads), sp(c.n_heads), e, sp(c.d_ff), seq, False, 0, norm, act)),
                (c.decoder_layers, (c.d_model, sp(c.n_heads), sp(kv), e, sp(c.d_ff), seq, False, seq, norm, act))]
    raise TypeError(f"not a model config: {type(config).__name__}")


def _saved(dims: tuple, remat: str, t: int) -> tuple[float, float]:
    d, h, k, e, f, s, gated, cross, norm, act = dims
    return _block_saved(d, h, k, e, f, s, gated, remat, t, cross=cross, norm=norm, activation=act)


def head_bytes(config: Config, batch_local: int, seq: int, dsize: int, t: int) -> int:
    """Bytes of the model's ends the backward keeps: the embeddings' output and the final norm's
    (compute dtype), and the float32 logits, log-probabilities and their gradient (the loss
    reads float32 logits), the vocab split over ``t`` where it divides."""
    v = config.vocab_size
    v_local = v // t if v % t == 0 else v
    return int(batch_local * seq * (2 * config.d_model * dsize + 3 * v_local * F32))


def activation_bytes(config: Config, batch_local: int, seq: int, dsize: int, remat: str, t: int) -> int:
    """Bytes of activations one device keeps for the backward (module docstring): every block's
    saved residuals (the one being recomputed in full, under remat) and ``head_bytes``."""
    kept = peak = 0.0
    for n, dims in _family_dims(config, t, seq):
        saved, recompute = _saved(dims, remat, t)
        kept += n * saved
        peak = max(peak, recompute)
    return int(batch_local * seq * (kept + peak) * dsize) + head_bytes(config, batch_local, seq, dsize, t)


def layer_backward_bytes(config: Config, batch_local: int, seq: int, dsize: int, remat: str, t: int) -> int:
    """Bytes the backward of one scanned layer holds beyond ``activation_bytes``: its slice of
    every saved activation, which the scan's body takes out of the stacked (L, B, T, ...)
    residuals with a dynamic-slice (a copy on XLA:CPU: all of them at the start of the body), and
    the residual stream's gradient (B, T, D) twice (the scan's carry and the copy that the
    weight-gradient matmuls read). Read off XLA:CPU's buffer assignment of the pure
    tensor-parallel step, where it is the largest transient (tests/test_plan.py)."""
    most = 0.0
    for _, dims in _family_dims(config, t, seq):
        saved, _ = _saved(dims, remat, t)
        most = max(most, saved + 2 * dims[0])
    return int(batch_local * seq * most * dsize)


# --------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-gather | all-reduce (XLA:CPU lowers reduce-scatter to all-reduce + slice)
    axes: str  # the mesh axes it runs over
    count: int  # arrays per step
    bytes: int  # per device per step: the sum of the result sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    preset: str
    mesh: dict[str, int]
    batch: int
    seq_len: int
    dtype: str
    remat: str
    device: str
    device_bytes: int
    params: int  # bytes per device
    grads: int
    opt_state: int
    activations: int
    transient: int
    batch_bytes: int
    collectives: tuple[Collective, ...]
    largest_batch: int  # the largest global batch (multiple of data x fsdp) that fits; 0: none

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations + self.transient + self.batch_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["collectives"] = [dataclasses.asdict(c) for c in self.collectives]
        d.update(total=self.total, fits=self.fits)
        return d


def _check(config: Any, mesh: Mapping[str, int], batch: int, seq_len: int, dtype: str, remat: str) -> None:
    for name, size in mesh.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {size!r}")
    for name, v in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    split = mesh.get("data", 1) * mesh.get("fsdp", 1)
    if batch % split:
        raise ValueError(f"a batch of {batch} cannot be split over data x fsdp = {split} devices; "
                         f"use a batch divisible by {split}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {', '.join(REMAT)}, got {remat!r}")
    max_len = getattr(config, "max_len", None)
    if isinstance(config, ViTConfig):
        if seq_len != config.max_len:
            raise ValueError(f"a ViT's sequence is its {config.max_len} patches + class token; seq_len "
                             f"must be {config.max_len}, got {seq_len}")
    elif max_len is not None and seq_len > max_len:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_len={max_len}")


def _state(config: Config, mesh: Mapping[str, int], rules: Any) -> tuple[int, int, int]:
    """(parameter bytes per device, fsdp-gathered parameter bytes, float32 bytes of the largest
    stack's one layer as its scan body reads it: after the fsdp gather, split over the rest)."""
    from bigmodel_jax.sharding import _stacked

    leaves = leaf_splits(config, mesh, rules)
    params = sum(leaf.numel * F32 // leaf.split(mesh) for leaf in leaves)
    # fsdp-gathered bytes: the unstacked leaves (embeddings, heads) stay gathered through the
    # step; each stack's (L, ...) weights are gathered before its own layer scan (forward and
    # backward: an encoder-decoder's decoder backward runs before the encoder's), so only the
    # largest stack's are live at once
    flat = 0
    stacks: dict[str, int] = {}  # per stack ("layers", "encoder/layers", ...)
    layer: dict[str, int] = {}
    for leaf in leaves:
        full = leaf.numel * F32 // leaf.split(mesh, ("data", "tensor"))
        stack = leaf.path[:leaf.path.index("layers/")] if _stacked(leaf.path) else None
        if leaf.split(mesh, ("fsdp",)) > 1:
            if stack is None:
                flat += full
            else:
                stacks[stack] = stacks.get(stack, 0) + full
        if stack is not None:
            layer[stack] = layer.get(stack, 0) + full // leaf.shape[0]
    return params, flat + max(stacks.values(), default=0), max(layer.values(), default=0)


def collective_arrays(config: Config, mesh: Mapping[str, int], batch_local: int, seq: int, dsize: int,
                      rules: Any = None) -> list[tuple[str, str, int]]:
    """[(kind, mesh axes, bytes per device)] of every array one step communicates, in the form
    XLA:CPU compiles it (tests/test_plan.py parses the compiled HLO and compares):

    - a stacked (L, ...) leaf is communicated per layer inside the layer scan: L arrays;
    - fsdp: every fsdp-split leaf is all-gathered (at its size over fsdp) in the forward; in the
      backward of the scan again, except biases (their gradient does not read them); outside
      the scan only rank-1 scales are gathered again (the gathered matrices stay live);
    - data x fsdp: every gradient is all-reduced at its size over (data, fsdp) -- XLA:CPU has
      no reduce-scatter: it all-reduces, then slices the fsdp shard (on GPU / TPU this is the
      reduce-scatter of FSDP, 1/fsdp of these bytes); with both data and fsdp > 1 the
      fsdp-split matrices take a second all-reduce of their shard over data;
    - tensor: per block the forward all-reduces the (B, T, D) output of each row-parallel
      matmul (attention out, MLP down) and the backward the input gradient of each
      column-parallel one (q, k, v separately, the MLP's up / gate); a vocab split adds the LM
      head's input gradient and three (B, T-1) float32 reductions of the loss over the vocab;
    - the position table is read as table[:T], so only T rows are gathered / reduced;
    - BERT's pooler is not read by the masked-LM loss: nothing of it is communicated.

    Checked against XLA for GPT configs; other families use the same rules (their extra
    blocks, e.g. cross-attention, are not counted). Not modelled (tests/test_plan.py lists them per mesh): rank-0 collectives (loss token
    count, gradient-norm partial sums, finiteness flags: bytes, not kilobytes), and the token
    embedding lookup's row exchange on an fsdp-split table (all-gather / all-to-all of ids and
    rows, XLA's gather partitioning)."""
    m = {a: mesh.get(a, 1) for a in MESH_AXES}
    out: list[tuple[str, str, int]] = []
    split = m["data"] * m["fsdp"]
    batch_axes = ",".join(a for a in ("data", "fsdp") if m[a] > 1)
    from bigmodel_jax.sharding import _stacked

    for leaf in leaf_splits(config, m, rules):
        if isinstance(config, BertConfig) and leaf.path.startswith("pooler/"):
            continue  # the masked-LM loss does not read the pooler: its gradient is a constant 0
        n = leaf.shape[0] if _stacked(leaf.path) else 1
        per = leaf.numel // n * F32
        if leaf.path.startswith("position/") or "/position/" in leaf.path:
            per = per // leaf.shape[0] * seq
        local = per // leaf.split(m, ("tensor",))
        if m["fsdp"] > 1 and leaf.split(m, ("fsdp",)) > 1:
            out += [("all-gather", "fsdp", local)] * n
            if not leaf.path.endswith("bias") and (n > 1 or len(leaf.shape) == 1):
                out += [("all-gather", "fsdp", local)] * n
        if split > 1:
            out += [("all-reduce", batch_axes, local)] * n
            if (m["data"] > 1 and m["fsdp"] > 1 and leaf.split(m, ("fsdp",)) > 1
                    and len(leaf.shape) - (n > 1) >= 2):
                out += [("all-reduce", "data", local // m["fsdp"])] * n
    t = m["tensor"]
    if t > 1:
        act = batch_local * seq * config.d_model * dsize
        kv = getattr(config, "kv_heads", None) or getattr(config, "n_kv_heads", None) or config.n_heads
        h, k, f = (config.n_heads % t == 0), (kv % t == 0), (config.d_ff % t == 0)
        per_block = h + f + h + 2 * k + f * (2 if getattr(config, "gated_mlp", False) else 1)
        blocks = config.n_layers + getattr(config, "decoder_layers", 0)
        out += [("all-reduce", "tensor", act)] * (blocks * per_block)
        if config.vocab_size % t == 0:
            out += [("all-reduce", "tensor", act)] * 2 + [("all-reduce", "tensor", batch_local * (seq - 1) * F32)] * 3
    return out


def _group(arrays: list[tuple[str, str, int]]) -> list[Collective]:
    groups: dict[tuple[str, str], list[int]] = {}
    for kind, axes, nbytes in arrays:
        groups.setdefault((kind, axes), []).append(nbytes)
    return [Collective(kind, axes, len(b), sum(b)) for (kind, axes), b in groups.items()]


def plan(preset_name: str, mesh: Mapping[str, int], batch: int, seq_len: int, *, dtype: str = "float32",
         remat: str = "none", device: str = "h200", rules: Any = None, config: Config | None = None) -> Plan:
    """The per-device plan of one AdamW step of ``preset_name`` (or ``config``) on ``mesh``
    (module docstring). ``ValueError`` for an unknown preset / device / dtype / remat policy, a
    mesh axis that is not data / fsdp / tensor, or a batch the data x fsdp axes do not divide."""
    from reference_numpy.configs import PRESETS, preset

    if config is None:
        if preset_name not in PRESETS:
            raise ValueError(f"unknown preset {preset_name!r}; choose from {', '.join(sorted(PRESETS))}")
        config = preset(preset_name)
    mesh = {a: int(mesh.get(a, 1)) if not isinstance(mesh.get(a, 1), bool) else mesh[a] for a in mesh}
    _check(config, mesh, batch, seq_len, dtype, remat)
    device_bytes = device_memory(device)
    full = {a: mesh.get(a, 1) for a in MESH_AXES}
    dsize = DTYPES[dtype]
    params, gathered, layer_weights = _state(config, full, rules)

    def at(b: int) -> tuple[int, int, int]:
        local = b // (full["data"] * full["fsdp"])
        acts = activation_bytes(config, local, seq_len, dsize, remat, full["tensor"])
        # The step peaks in one of two phases (XLA reuses buffers between them): the backward
        # holds activations + the fsdp-gathered weights; the update holds the new parameters and
        # new moments (2 x parameters beyond the gradients, whose buffer the third reuses) until
        # the non-finite guard selects them. ``transient`` is what the larger phase adds to the
        # activations.
        # the backward of one scanned layer: its activation slices and gradients
        # (``layer_backward_bytes``) and its weights, sliced out of the (L, ...) stack (a copy at
        # the compute dtype); under fsdp the gathered weights (and, on XLA:CPU, the full-size
        # gradients it all-reduces, as large) take that place instead
        layer = layer_backward_bytes(config, local, seq_len, dsize, remat, full["tensor"]) \
            + layer_weights * dsize // F32
        # The logits and their gradient are dead once the head's backward has run, before the
        # layer scan's backward starts: the head's buffers and the layer's take turns.
        head = head_bytes(config, local, seq_len, dsize, full["tensor"])
        backward = acts - head + max(head, layer, gathered if full["fsdp"] > 1 else 0)
        transient = max(backward, 2 * params) - acts
        return acts, transient, batch_bytes(config, local, seq_len)

    acts, transient, batch_b = at(batch)
    colls = _group(collective_arrays(config, full, batch // (full["data"] * full["fsdp"]), seq_len, dsize, rules))
    fixed = params * 4  # parameters, gradients, two moments
    split = full["data"] * full["fsdp"]
    best = 0
    if fixed < device_bytes:
        lo, hi = 0, 1
        while sum(at(hi * split)) + fixed <= device_bytes and hi < 2**40:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sum(at(mid * split)) + fixed <= device_bytes:
                lo = mid
            else:
                hi = mid
        best = lo * split
    return Plan(preset_name, {a: full[a] for a in MESH_AXES}, batch, seq_len, dtype, remat, device, device_bytes,
                params, params, 2 * params + 8, acts, transient, batch_b, tuple(colls), best)


def largest_batch(p: Plan) -> int:
    """The plan's largest global batch that fits (a multiple of data x fsdp; 0 if none does)."""
    return p.largest_batch


def _gb(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.2f} MiB" if n >= 2**20 else f"{n / 1024:8.2f} KiB"


def format_plan(p: Plan) -> str:
    """The readable table ``bigmodel plan`` prints."""
    mesh = ", ".join(f"{a}={s}" for a, s in p.mesh.items())
    n = math.prod(p.mesh.values())
    rows = [f"{p.preset}: AdamW step, batch {p.batch} x {p.seq_len} tokens, {p.dtype} compute "
            f"(float32 master weights), remat={p.remat}, mesh {mesh} ({n} devices)",
            "per device:",
            f"  parameters       {_gb(p.params)}",
            f"  gradients        {_gb(p.grads)}",
            f"  optimizer state  {_gb(p.opt_state)}   (AdamW mu, nu)",
            f"  activations      {_gb(p.activations)}   (remat={p.remat})",
            f"  transient        {_gb(p.transient)}   (update buffers or the backward's peak)",
            f"  batch            {_gb(p.batch_bytes)}",
            f"  total            {_gb(p.total)}   of {_gb(p.device_bytes)} on {p.device}: "
            f"{'fits' if p.fits else 'does NOT fit'} ({100 * p.total / p.device_bytes:.0f}%)",
            f"largest batch that fits: {p.largest_batch}" + ("" if p.largest_batch else
                                                            " (the state alone does not fit: add devices)"),
            "collectives per step (per device):"]
    if not p.collectives:
        rows.append("  none (one device)")
    for c in p.collectives:
        note = ("   (XLA:CPU's form of the fsdp reduce-scatter: all-reduce, then slice)"
                if c.kind == "all-reduce" and "fsdp" in c.axes.split(",") else "")
        rows.append(f"  {c.kind:15s} over {c.axes:10s} {c.count:5d} arrays  {_gb(c.bytes)}{note}")
    return "\n".join(rows)
