"""The memory planner (``bigmodel_train.plan``) against what XLA compiles, and ``bigmodel plan``.

XLA's side: the real training step (``bigmodel_train.steps._compile_step``: AdamW, float32
master weights, donated state, the non-finite guard) lowered on abstract sharded arguments on
the 8 simulated CPU devices of conftest, and ``memory_analysis()`` read as
``argument + output - alias + temp`` (the step's peak per device; see the planner's docstring).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from bigmodel_apps.cli import main
from bigmodel_train import plan as planner
from reference_numpy.configs import preset

MESHES = {
    "8,1,1": {"data": 8},
    "1,8,1": {"fsdp": 8},
    "1,1,8": {"tensor": 8},
    "2,2,2": {"data": 2, "fsdp": 2, "tensor": 2},
    "4,2,1": {"data": 4, "fsdp": 2},
}
# gpt2 shrunk so parameters and activations both matter (1.7M parameters) and every rule divides
SMALL = dict(d_model=256, n_heads=8, d_ff=1024, vocab_size=512)


# the compared cases: name -> (preset, overrides); "tiny" / "small" are GPT-2's (the names the
# known gaps below use), the others every other family's tiny preset
CASES = {
    "tiny": ("gpt2-tiny", {}),
    "small": ("gpt2-tiny", SMALL),
    "llama-tiny": ("llama-tiny", {}),  # RoPE, RMSNorm, SwiGLU, GQA (K=2: replicated on tensor=8)
    "bert-tiny": ("bert-tiny", {}),  # masked-LM head (the planner's BERT)
    "vit-tiny": ("vit-tiny", {}),  # 8x8 images: 4 patches + the class token
    "seq2seq-tiny": ("seq2seq-tiny", {}),  # post-norm encoder-decoder with cross-attention
}
FAMILIES = [c for c in CASES if c not in ("tiny", "small")]


def _seq(config) -> int:
    """Tokens per example: 16, or a ViT's patches + class token (8x8 images: 5)."""
    return config.max_len if config.family == "vit" else 16


class CompiledCase(NamedTuple):
    """What the tests read of a compiled step: XLA's memory analysis and its HLO text."""
    argument: int
    output: int
    alias: int
    temp: int
    hlo: str

    def memory_analysis(self) -> CompiledCase:
        return self

    @property
    def argument_size_in_bytes(self) -> int:
        return self.argument

    @property
    def output_size_in_bytes(self) -> int:
        return self.output

    @property
    def alias_size_in_bytes(self) -> int:
        return self.alias

    @property
    def temp_size_in_bytes(self) -> int:
        return self.temp

    def as_text(self) -> str:
        return self.hlo


# Each case compiles in a fresh process (this file's _compiled, same XLA flags and x64 as the test
# process): a long-lived xdist worker that has run hundreds of other tests once crashed inside
# XLA:CPU's compiler on one of these cases (not reproduced in isolation), and a child keeps such
# a crash from taking the worker down with it.
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import test_plan as tp
name, overrides = tp.CASES[sys.argv[2]]
config = tp.preset(name, dropout=0.0, **overrides)
c = tp._compiled(config, tp.MESHES[sys.argv[3]], 8, tp._seq(config))
m = c.memory_analysis()
print(json.dumps([m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                  m.temp_size_in_bytes, c.as_text()]))
"""


@functools.cache
def _compiled_case(size: str, mesh_name: str):
    """The compiled step of ``CASES[size]`` on a mesh, batch 8 x ``_seq`` (``CompiledCase``);
    cached so the memory and the collectives tests compile each case once (~5-12 s each on the
    CI's CPUs)."""
    name, overrides = CASES[size]
    config = preset(name, dropout=0.0, **overrides)
    tests = str(Path(__file__).resolve().parent)
    res = subprocess.run([sys.executable, "-c", _CHILD, tests, size, mesh_name], capture_output=True, text=True,
                         timeout=900, cwd=str(Path(tests).parent))
    assert res.returncode == 0, f"compiling {size} on {mesh_name} failed ({res.returncode}): {res.stderr[-3000:]}"
    return config, CompiledCase(*json.loads(res.stdout.strip().splitlines()[-1]))


def _family_loss(config):
    """(parameter shapes, loss, batch arrays {key: (shape, dtype name)} of a (B, T) batch) the
    trainer's task of this family uses: next-token LM (GPT), masked LM (BERT), image
    classification (ViT), label-smoothed translation (seq2seq)."""
    from bigmodel_jax.models import bert, gpt, seq2seq, vit
    from reference_numpy.configs import param_shapes
    from reference_numpy.models.bert import param_shapes as bert_param_shapes

    family = config.family
    if family == "bert":
        return (bert_param_shapes(config, "mlm"), lambda p, b: bert.loss(p, b, config, "mlm"),
                lambda B, T: {"input_ids": ((B, T), "int32"), "labels": ((B, T), "int32")})
    if family == "vit":
        c, hw = config.n_channels, config.image_size
        return (param_shapes(config), lambda p, b: vit.loss(p, b, config),
                lambda B, T: {"pixel_values": ((B, c, hw, hw), "float32"), "labels": ((B,), "int32")})
    if family == "seq2seq":
        return (param_shapes(config), lambda p, b: seq2seq.loss(p, b, config),
                lambda B, T: {k: ((B, T), "int32") for k in ("input_ids", "decoder_input_ids", "labels")})
    return param_shapes(config), lambda p, b: gpt.loss(p, b, config), lambda B, T: {"input_ids": ((B, T), "int32")}


def _compiled(config, mesh_sizes: dict[str, int], batch: int, seq: int):
    import jax
    import jax.numpy as jnp

    from bigmodel_jax import sharding
    from bigmodel_train.steps import _compile_step, _optimizer_with_lr

    shape_tree, family_loss, batch_arrays = _family_loss(config)

    def loss_fn(p, b, *, dropout_key=None, masks=None):
        return family_loss(p, b)

    mesh = sharding.make_mesh(mesh_sizes)
    shapes = sharding._shape_tree(shape_tree)
    ps = sharding.param_shardings(config, mesh, params=shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sh), shapes, ps)
    opt_kw = {"clip_norm": 1.0, "weight_decay": 0.01}
    opt = _optimizer_with_lr("adamw", opt_kw, None)
    oss = sharding.opt_state_shardings(opt, params)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         jax.eval_shape(opt.init, params), oss)
    step = _compile_step(loss_fn, "adamw", opt_kw, False, jnp.float32, True, (ps, oss, None))
    # one micro-batch: every leaf (1, B, ...), split over data x fsdp on B
    arrays = {k: jax.ShapeDtypeStruct((1, *shape), jnp.dtype(dt),
                                      sharding=sharding.batch_sharding(mesh, len(shape) + 1, batch_axis=1))
              for k, (shape, dt) in batch_arrays(batch, seq).items()}
    with sharding.use_mesh(mesh):
        return step.lower(params, state, arrays, jnp.int32(0), jnp.float32(1e-3),
                          jax.random.key(0), None).compile()


def _xla_bytes(compiled) -> tuple[int, int]:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes, (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                      + m.temp_size_in_bytes)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "seq2seq-tiny", "vit-tiny", "llama-2-7b"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_leaf_splits_equal_the_sharding_rules(name: str, mesh_name: str) -> None:
    """The planner's per-leaf split is logical_spec's (no arrays: param_shardings on shapes)."""
    from jax.sharding import PartitionSpec

    from bigmodel_jax import sharding

    config = preset(name)
    mesh = sharding.make_mesh(MESHES[mesh_name])
    specs = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            p = f"{prefix}/{k}" if prefix else k
            walk(v, p) if isinstance(v, dict) else specs.__setitem__(p, v.spec)

    # the planned tree (BERT: with its masked-LM head)
    walk(sharding.param_shardings(config, mesh, params=sharding._shape_tree(planner._param_shapes(config))))
    sizes = dict(mesh.shape)
    for leaf in planner.leaf_splits(config, sizes):
        spec = specs[leaf.path]
        want = math.prod(sizes[a] for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s))
        assert leaf.split(sizes) == want, (leaf.path, spec, leaf.axes)
        assert isinstance(spec, PartitionSpec)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("size", list(CASES))
def test_total_within_10_percent_of_xla(mesh_name: str, size: str) -> None:
    """Planner total vs XLA's peak per device, gpt2-tiny, SMALL and every other family's tiny
    preset, batch 8 x 16 tokens (ViT: 8 images of 8 x 8), within 10% on every mesh. Pure tensor parallelism (1,1,8) peaks inside the backward layer scan
    (XLA:CPU's buffer assignment / live ranges): the stacked residuals, plus the body's copies of
    one layer's residual slices, the (B, T, D) gradient twice and the layer's sliced weights,
    all full size in (B, T) because only the batch is split (the planner's
    ``layer_backward_bytes``); without that term the plan was 20% / 26% under XLA there."""
    config, compiled = _compiled_case(size, mesh_name)
    args, xla = _xla_bytes(compiled)
    p = planner.plan(CASES[size][0], MESHES[mesh_name], 8, _seq(config), config=config, device="h200")
    # the live state (parameters + two moments + the batch) is the compiled step's arguments
    assert abs(3 * p.params + p.batch_bytes - args) <= 64 + 8 * 8, (3 * p.params + p.batch_bytes, args)
    assert abs(p.total - xla) <= 0.10 * xla, f"plan {p.total} vs XLA {xla} ({p.total / xla:.3f})"


# ---- the compiled program's collectives, read from its HLO text ----------------------------
#
# Every collective instruction of every computation reachable from ENTRY is listed with its
# result arrays (a tuple-shaped, combined all-reduce gives one entry per element: XLA's
# all-reduce combiner merges independent reductions, so an op count would measure the combiner,
# not the program). An instruction inside a while body runs the loop's trip count times: XLA
# writes it in the while's backend_config as "known_trip_count" (the layer scan: L). A loop
# without a known trip count is an error here, not a guess. Bytes: the result size per device.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def hlo_collectives(text: str) -> list[tuple[str, tuple[int, ...], int, str]]:
    """[(kind, shape, bytes, op_name)] per array per execution of ``text`` (HLO module text)."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    cur = entry = None
    for line in text.splitlines():
        if cur is None:
            m = _HEAD.match(line)
            if m and "=" not in line.split("(")[0]:
                cur = m.group(2)
                comps[cur] = []
                entry = cur if m.group(1) else entry
        elif line.strip() == "}":
            cur = None
        elif (m := _INSTR.match(line)):
            comps[cur].append(m.groups())
    out = []

    def visit(comp: str, times: int) -> None:
        for shape, op, rest in comps[comp]:
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                assert trip, f"while loop without a known trip count: {rest[:200]}"
                visit(re.search(r"body=%?([\w.\-]+)", rest).group(1), times * int(trip.group(1)))
            elif op in ("call", "conditional"):
                for callee in re.findall(r"%([\w.\-]+)", rest):
                    if callee in comps:
                        visit(callee, times)
            elif op.removesuffix("-start") in _KINDS:
                assert not op.endswith("-start"), "async collectives: count the -start half only (not seen on CPU)"
                name = re.search(r'op_name="([^"]*)"', rest)
                for dt, dims in _ARRAY.findall(shape):
                    dims_t = tuple(int(x) for x in dims.split(",") if x)
                    out.extend([(op, dims_t, _DTYPE_BYTES[dt] * math.prod(dims_t), name.group(1) if name else "")]
                               * times)

    visit(entry, 1)
    return out


def _split_modelled(arrays):
    """(modelled, not modelled): rank-0 arrays (loss token count, gradient-norm partial sums,
    finiteness flags) and the token-embedding lookup's row exchange (every fused op name from
    ``_take``, kinds other than all-reduce) are the planner's documented omissions."""
    kept, other = [], []
    for kind, shape, nbytes, name in arrays:
        lookup = kind != "all-reduce" and all("_take" in part for part in name.split(":"))
        (other if not shape or lookup else kept).append((kind, nbytes))
    return kept, other


# Where the compiled program and the planner differ (found by reading the HLO; see the report
# in tests' docstring below): (size, mesh) -> {kind: (planned / XLA bytes bound, |count gap|)}
_KNOWN_GAPS = {
    # data-parallel: XLA all-reduces the tied embedding's two gradient contributions (LM head,
    # lookup) separately, and one per-layer (D,) leaf less (combined), so the plan is 7-13% under
    ("tiny", "8,1,1"): {"all-reduce": (0.14, 1)},
    ("small", "8,1,1"): {"all-reduce": (0.08, 1)},
    # two (D,) final-norm gradients fused into tuples with scalars (0.3%)
    ("tiny", "1,8,1"): {"all-reduce": (0.01, 2)},
    ("small", "1,8,1"): {"all-reduce": (0.01, 2)},
    # one extra (B, T-1) vocab reduction of the loss (480 bytes of 1.8 MB)
    ("small", "1,1,8"): {"all-reduce": (0.01, 1)},
    # data x fsdp x tensor: the 'involuntary full rematerialisation' of the embedding gather
    # (XLA's warning) adds an all-gather, a collective-permute and activation-sized all-reduces
    ("tiny", "2,2,2"): {"all-reduce": (0.07, 3), "collective-permute": (1.0, 1)},
    ("small", "2,2,2"): {"all-gather": (0.04, 1), "all-reduce": (0.03, 1)},
    ("tiny", "4,2,1"): {"all-reduce": (0.05, 2)},
    ("small", "4,2,1"): {"all-reduce": (0.03, 2)},
    # the other families (differences read off the per-size multisets of the HLO):
    # llama-tiny: the untied lm_head (D, V) = 13184 B, fsdp-split, is neither all-gathered nor
    # has its gradient all-reduced in XLA's program (the planner counts one of each); on
    # (2,2,2) XLA moves it with two collective-permutes of half its size instead
    ("llama-tiny", "1,8,1"): {"all-gather": (0.10, 1), "all-reduce": (0.18, 1)},
    ("llama-tiny", "2,2,2"): {"all-gather": (0.18, 1), "all-reduce": (0.23, 2), "collective-permute": (1.0, 2)},
    ("llama-tiny", "4,2,1"): {"all-gather": (0.10, 1), "all-reduce": (0.12, 1)},
    # bert-tiny: the tied word embedding's two gradient contributions (lookup, MLM decoder) are
    # all-reduced separately (as GPT-2's), and (D,) leaves are combined with scalars
    ("bert-tiny", "8,1,1"): {"all-reduce": (0.13, 1)},
    ("bert-tiny", "1,8,1"): {"all-gather": (0.01, 1), "all-reduce": (0.01, 2)},
    ("bert-tiny", "2,2,2"): {"all-gather": (0.01, 1), "all-reduce": (0.10, 5), "collective-permute": (1.0, 3)},
    ("bert-tiny", "4,2,1"): {"all-gather": (0.01, 1), "all-reduce": (0.04, 3)},
    # vit-tiny: (D,) leaves combined with scalars; the class-token concat and the patch
    # reshape are resharded with small all-to-alls / collective-permutes (< 4 KB)
    ("vit-tiny", "8,1,1"): {"all-reduce": (0.01, 2)},
    ("vit-tiny", "1,8,1"): {"all-gather": (0.01, 0), "all-reduce": (0.01, 2), "all-to-all": (1.0, 8)},
    ("vit-tiny", "2,2,2"): {"all-gather": (0.02, 1), "all-reduce": (0.10, 9), "all-to-all": (1.0, 2),
                            "collective-permute": (1.0, 6)},
    ("vit-tiny", "4,2,1"): {"all-gather": (0.01, 0), "all-reduce": (0.01, 3), "all-to-all": (1.0, 2)},
    # seq2seq-tiny: the shared embedding has three gradient contributions (encoder and decoder
    # lookups, output head), all-reduced separately (two extra (V, D) arrays); six (D,) leaves
    # combined with scalars
    ("seq2seq-tiny", "8,1,1"): {"all-reduce": (0.11, 4)},
    ("seq2seq-tiny", "1,8,1"): {"all-reduce": (0.01, 6)},
    ("seq2seq-tiny", "2,2,2"): {"all-reduce": (0.12, 3), "collective-permute": (1.0, 1)},
    ("seq2seq-tiny", "4,2,1"): {"all-reduce": (0.08, 4)},
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("size", list(CASES))
def test_collectives_match_the_compiled_hlo(mesh_name: str, size: str) -> None:
    """Per kind, the planner's arrays and bytes equal the compiled HLO's (per array of a tuple,
    loop bodies times their trip count), except the documented gaps of ``_KNOWN_GAPS``; the
    unmodelled rest (scalars, the embedding lookup's exchange) is under 10% of the bytes (up to
    9% for gpt2-tiny on data x fsdp, whose activations are as large as its weights; 2.5% for
    SMALL)."""
    config, compiled = _compiled_case(size, mesh_name)
    got, other = _split_modelled(hlo_collectives(compiled.as_text()))
    split = MESHES[mesh_name].get("data", 1) * MESHES[mesh_name].get("fsdp", 1)
    want = planner.collective_arrays(config, MESHES[mesh_name], 8 // split, _seq(config), 4)
    total = sum(b for _, b in got) + sum(b for _, b in other)
    assert sum(b for _, b in other) <= 0.10 * total, other
    gaps = _KNOWN_GAPS.get((size, mesh_name), {})
    rows = []
    for kind in _KINDS:
        g = [b for k, b in got if k == kind]
        w = [b for k, _, b in want if k == kind]
        if not g and not w:
            continue
        rows.append(f"{kind}: plan {len(w)} arrays {sum(w)} B, XLA {len(g)} arrays {sum(g)} B")
        if kind not in gaps:  # exact: the same multiset of array sizes
            assert collections.Counter(w) == collections.Counter(g), rows[-1]
        else:
            bound, count_gap = gaps[kind]
            assert abs(sum(w) - sum(g)) <= bound * sum(g), rows[-1]
            assert abs(len(w) - len(g)) <= count_gap, rows[-1]
    print(size, mesh_name, "; ".join(rows))


def test_collective_kinds_follow_the_mesh() -> None:
    """fsdp: all-gather of weights + all-reduce of gradients (XLA:CPU's reduce-scatter);
    data: one all-reduce of every gradient (per layer); tensor: all-reduce of activations; one
    device: none. The gathered bytes are the fsdp-split weights at full size."""
    config = preset("gpt2-tiny", **SMALL)
    one = planner.plan("x", {"data": 1}, 8, 16, config=config)
    assert one.collectives == ()
    fsdp = planner.plan("x", {"fsdp": 8}, 8, 16, config=config)
    assert {c.kind for c in fsdp.collectives} == {"all-gather", "all-reduce"}
    data = planner.plan("x", {"data": 8}, 8, 16, config=config)
    # every gradient once, at full size; the position table's T of max_len rows only
    pos = config.max_len * config.d_model * 4
    assert [(c.kind, c.bytes) for c in data.collectives] == [("all-reduce", data.params - pos + pos * 16
                                                               // config.max_len)]
    tensor = planner.plan("x", {"tensor": 8}, 8, 16, config=config)
    assert [c.axes for c in tensor.collectives] == ["tensor"]


def test_tensor_parallel_transient_is_one_layers_backward() -> None:
    """SMALL on tensor=8, batch 8 x 16 (128 tokens, all on every device), float32, no remat: the
    backward of one layer holds its saved activations again, per token 7 D (the block input and
    three per LayerNorm: x - mean, normalised x, output) = 1792, q, k, v and the attention output
    (H/8 = 1 head of 32) = 128, scores and probabilities (1 x 16) = 32, tanh GELU's 6 arrays of
    F/8 = 128 (768): 2720, plus the (B, T, D) gradient twice (512); and its weights split over
    tensor: q, k, v, out kernels 4 x 256 x 32, up / down kernels 2 x 256 x 128, biases
    3 x 32 + 256 + 128 + 256, two norms 4 x 256. The head's float32 logits, log-probabilities and
    gradient (3 x 512/8 per token) and its two (B, T, D) inputs are dead by then: the layer
    reuses their bytes, so the transient is what it needs beyond them."""
    config = preset("gpt2-tiny", **SMALL)
    p = planner.plan("x", {"tensor": 8}, 8, 16, config=config)
    weights = 4 * 256 * 32 + 2 * 256 * 128 + 3 * 32 + 256 + 128 + 256 + 4 * 256
    layer = 128 * (2720 + 512) * 4 + weights * 4
    head = 128 * (2 * 256 + 3 * 64) * 4
    assert p.transient == layer - head
    # under fsdp the gathered weights replace it (the larger of the two), they do not add up
    f = planner.plan("x", {"fsdp": 8}, 8, 16, config=config)
    head = planner.head_bytes(config, 1, 16, 4, 1)
    assert f.transient == max(planner._state(config, f.mesh, None)[1] - head, 2 * f.params - f.activations)


def test_memory_falls_with_fsdp_and_remat_and_the_largest_batch_fits() -> None:
    a = planner.plan("llama-2-7b", {"fsdp": 8}, 8, 4096, dtype="bfloat16", remat="none")
    b = planner.plan("llama-2-7b", {"fsdp": 8}, 8, 4096, dtype="bfloat16", remat="full")
    assert b.activations < a.activations
    assert planner.plan("llama-2-7b", {"fsdp": 8}, 8, 4096).params * 2 == \
        planner.plan("llama-2-7b", {"fsdp": 4}, 8, 4096).params
    p = planner.plan("gpt2-xl", {"data": 1}, 1, 1024)
    assert p.largest_batch >= 1
    assert planner.plan("gpt2-xl", {"data": 1}, p.largest_batch, 1024).fits
    assert not planner.plan("gpt2-xl", {"data": 1}, p.largest_batch + 1, 1024).fits


@pytest.mark.parametrize("kw,fragment", [
    ({"preset_name": "gpt9"}, "unknown preset"),
    ({"mesh": {"pipeline": 2}}, "unknown mesh axis"),
    ({"batch": 6, "mesh": {"fsdp": 4}}, "divisible by 4"),
    ({"device": "tpu-v9"}, "unknown device"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"remat": "some"}, "remat must be one of"),
    ({"seq_len": 5000}, "max_len"),
])
def test_bad_input_is_a_clear_value_error(kw: dict, fragment: str) -> None:
    args = {"preset_name": "gpt2", "mesh": {"data": 2}, "batch": 8, "seq_len": 16, **kw}
    with pytest.raises(ValueError, match=fragment):
        planner.plan(args.pop("preset_name"), args.pop("mesh"), args.pop("batch"), args.pop("seq_len"), **args)


def test_cli_prints_a_table_and_json(capsys) -> None:
    assert main(["plan", "gpt2", "--mesh", "fsdp=8", "--batch", "8", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer state", "activations", "largest batch", "all-gather",
                 "all-reduce", "reduce-scatter"):
        assert word in out, out
    assert main(["plan", "gpt2", "--mesh", "data:2,tensor:2", "--batch", "8", "--seq-len", "128", "--json",
                 "--device", "cpu"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} and d["total"] > d["params"] > 0


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "gpt9", "--batch", "8", "--seq-len", "16"], "unknown preset"),
    (["plan", "gpt2", "--mesh", "fsdp=x", "--batch", "8", "--seq-len", "16"], "positive integer"),
    (["plan", "gpt2", "--mesh", "fsdp=4", "--batch", "6", "--seq-len", "16"], "divisible by 4"),
    (["plan", "gpt2", "--batch", "8", "--seq-len", "16", "--device", "tpu"], "unknown device"),
    (["plan", "gpt2", "--batch", "8", "--seq-len", "16", "--dtype", "int8"], "dtype"),
    (["plan", "gpt2", "--batch", "8", "--seq-len", "16", "--remat", "all"], "remat"),
    (["plan", "gpt2", "--batch", "0", "--seq-len", "16"], "integer >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], fragment: str, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and fragment in err, err
