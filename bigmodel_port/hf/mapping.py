"""The machinery behind the per-architecture name tables: HF state dict <-> our parameter tree.

Each architecture module (``bigmodel_port.hf.bert`` ...) lists its parameters once, as ``Rule``s:
our leaf path, the HF tensor name and how the tensor changes between the two layouts (``kind``).
Everything else — stacking per-layer tensors on our leading L axis, the expected HF shape of
every tensor, strict loading (missing / unexpected / shape-mismatched names, listed), tied
copies, partial loads — is done here, once, for every architecture.

Layouts: our kernels are (In, Out) with heads split out ((D, H, E) for a query projection,
(H, E, D) for the output projection); ``torch.nn.Linear`` stores (Out, In); GPT-2's ``Conv1D``
stores (In, Out) with heads fused; a ViT patch convolution stores (D, C, p, p).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bigmodel_port.errors import CheckpointError
from reference_numpy.tree import tree_get, tree_unflatten

Shape = tuple[int, ...]

# kind -> (HF shape from our per-layer shape, HF tensor -> ours, ours -> HF tensor).
# ``s`` is our (unstacked) leaf shape; ``hf`` the rule's explicit HF shape when it has one.


def _linear_in(s: Shape) -> Shape:  # ours (In, *out): torch Linear (prod(out), In)
    return (math.prod(s[1:]), s[0])


def _linear_out(s: Shape) -> Shape:  # ours (*in, Out): torch Linear (Out, prod(in))
    return (s[-1], math.prod(s[:-1]))


KINDS: dict[str, tuple[Callable[..., Shape], Callable[..., np.ndarray], Callable[..., np.ndarray]]] = {
    # same tensor
    "copy": (lambda s, hf: s, lambda w, s: w, lambda a, s, hf: a),
    # same elements in the same order, another shape (a (H*E,) bias <-> (H, E); ViT's (1, 1, D))
    "reshape": (lambda s, hf: hf or (math.prod(s),), lambda w, s: w.reshape(s),
                lambda a, s, hf: a.reshape(hf or (a.size,))),
    # torch.nn.Linear weight (Out, In) <-> our (In, *out) kernel: transpose, then split heads
    "linear": (lambda s, hf: _linear_in(s), lambda w, s: w.T.reshape(s),
               lambda a, s, hf: a.reshape(s[0], -1).T),
    # torch.nn.Linear weight (Out, In) <-> our (*in, Out) kernel (attention output: (H, E, D))
    "linear_out": (lambda s, hf: _linear_out(s), lambda w, s: w.T.reshape(s),
                   lambda a, s, hf: a.reshape(-1, s[-1]).T),
    # GPT-2 Conv1D weight (In, Out): our layout already, heads fused
    "conv1d": (lambda s, hf: (s[0], math.prod(s[1:])), lambda w, s: w.reshape(s),
               lambda a, s, hf: a.reshape(s[0], -1)),
    "conv1d_out": (lambda s, hf: (math.prod(s[:-1]), s[-1]), lambda w, s: w.reshape(s),
                   lambda a, s, hf: a.reshape(-1, s[-1])),
    # patch convolution weight (D, C, p, p) <-> our (C*p*p, D) kernel (ViT; see models.vit)
    "conv": (lambda s, hf: hf, lambda w, s: w.reshape(w.shape[0], -1).T,
             lambda a, s, hf: a.T.reshape(hf)),
}


@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one of our leaves (or several, for a fused HF tensor).

    ``ours``: "/"-joined leaf path; a tuple of paths for a fused HF tensor (GPT-2's ``c_attn``)
    that is split in equal-width parts along ``fused_axis`` of the HF tensor.
    ``hf``: the HF name; ``{i}`` marks a per-layer tensor, stacked on our leading L axis.
    ``kind``: a key of ``KINDS``. ``hf_shape``: the HF shape, for kinds that need it.
    ``tied_to``: the HF name this tensor is a tied copy of (e.g. an LM head that is the word
    embedding): it may be absent from a checkpoint; if present it must equal its source.
    """

    ours: str | tuple[str, ...]
    hf: str
    kind: str = "copy"
    hf_shape: Shape | None = None
    fused_axis: int = 0
    tied_to: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; known: {sorted(KINDS)}")

    @property
    def paths(self) -> tuple[str, ...]:
        return self.ours if isinstance(self.ours, tuple) else (self.ours,)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def linear_rules(ours: str, hf: str, bias: bool = True, kind: str = "linear") -> list[Rule]:
    """A ``torch.nn.Linear`` ``hf`` (``.weight``, and ``.bias`` unless ``bias=False``) <-> our
    ``ours/kernel`` (and ``ours/bias``); ``kind``: the kernel's layout ("linear" (In, *out),
    "linear_out" (*in, Out))."""
    rules = [Rule(f"{ours}/kernel", f"{hf}.weight", kind)]
    if bias:
        rules.append(Rule(f"{ours}/bias", f"{hf}.bias", "reshape"))
    return rules


def norm_rules(ours: str, hf: str, bias: bool = True) -> list[Rule]:
    """A LayerNorm ``hf`` (``.weight``, ``.bias``) <-> our ``ours/scale``, ``ours/bias``; an
    RMSNorm has no bias (``bias=False``)."""
    rules = [Rule(f"{ours}/scale", f"{hf}.weight")]
    if bias:
        rules.append(Rule(f"{ours}/bias", f"{hf}.bias"))
    return rules


@dataclass
class Mapping:
    """An architecture's complete table for one config: rules, HF names to ignore (buffers such
    as ``position_ids``; regexes), and the base-model prefix of a head model (``"bert."``) so a
    bare base-model checkpoint loads into a head model and vice versa, as in transformers."""

    rules: list[Rule]
    ignore: tuple[str, ...] = ()
    prefix: str = ""  # prefix of the base-model tensors in this architecture's own checkpoints

    def hf_names(self, n_layers: dict[str, int]) -> list[str]:
        return [name for r in self.rules for name in _names(r, n_layers)]


@dataclass
class LoadReport:
    """What a load did: names (HF) that were missing, unexpected or of the wrong shape, and our
    leaves that were freshly initialised because of them (partial loads only)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"
    initialised: list[str] = field(default_factory=list)  # our leaf paths

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for title, names in (("missing from the checkpoint", self.missing),
                             ("unexpected in the checkpoint", self.unexpected),
                             ("of the wrong shape", self.mismatched),
                             ("freshly initialised", self.initialised)):
            if names:
                parts.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
        return "\n".join(parts) if parts else "all tensors matched"


# --------------------------------------------------------------------------------------------


def _leaf_shape(shapes: dict[str, Any], path: str) -> Shape:
    node: Any = shapes
    for k in path.split("/"):
        if not isinstance(node, dict) or k not in node:
            raise KeyError(f"rule names {path!r}, which is not in this config's parameter tree")
        node = node[k]
    return tuple(node)


def _layers_of(rule: Rule, shapes: dict[str, Any]) -> int:
    return _leaf_shape(shapes, rule.paths[0])[0]


def _names(rule: Rule, n_layers: dict[str, int]) -> list[str]:
    if not rule.per_layer:
        return [rule.hf]
    return [rule.hf.format(i=i) for i in range(n_layers[rule.hf])]


def _unit_shapes(rule: Rule, shapes: dict[str, Any]) -> list[Shape]:
    """Our per-layer (unstacked) shape of each leaf the rule fills."""
    out = []
    for p in rule.paths:
        s = _leaf_shape(shapes, p)
        out.append(s[1:] if rule.per_layer else s)
    return out


def expected_hf_shape(rule: Rule, shapes: dict[str, Any]) -> Shape:
    """The shape the HF tensor of ``rule`` must have for this config."""
    hf_shape_of = KINDS[rule.kind][0]
    parts = [hf_shape_of(s, rule.hf_shape) for s in _unit_shapes(rule, shapes)]
    if len(parts) == 1:
        return tuple(parts[0])
    ax = rule.fused_axis
    return tuple(sum(p[ax] for p in parts) if d == ax else parts[0][d] for d in range(len(parts[0])))


def _to_ours(rule: Rule, w: np.ndarray, unit: list[Shape]) -> list[np.ndarray]:
    to_ours = KINDS[rule.kind][1]
    if len(unit) == 1:
        return [to_ours(w, unit[0])]
    hf_shape_of = KINDS[rule.kind][0]
    widths = [hf_shape_of(s, rule.hf_shape)[rule.fused_axis] for s in unit]
    pieces = np.split(w, np.cumsum(widths)[:-1], axis=rule.fused_axis)
    return [to_ours(p, s) for p, s in zip(pieces, unit)]


def _to_hf(rule: Rule, leaves: list[np.ndarray], unit: list[Shape]) -> np.ndarray:
    to_hf = KINDS[rule.kind][2]
    parts = [to_hf(a, s, rule.hf_shape) for a, s in zip(leaves, unit)]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=rule.fused_axis)
    return np.ascontiguousarray(out)


def _align_prefix(state: dict[str, np.ndarray], wanted: set[str], prefix: str) -> dict[str, np.ndarray]:
    """Add or strip the base-model prefix so the checkpoint's names meet the model's (a bare
    ``BertModel`` checkpoint loading into ``BertForSequenceClassification``, or the reverse)."""
    if not prefix:
        return state
    have = set(state)
    if have & wanted:
        # Same layout; a checkpoint of a head model read by a base model keeps its prefix.
        if not any(w.startswith(prefix) for w in wanted):
            return {k[len(prefix):] if k.startswith(prefix) and k[len(prefix):] in wanted else k: v
                    for k, v in state.items()}
        return state
    if any(w.startswith(prefix) for w in wanted) and any(prefix + k in wanted for k in have):
        return {prefix + k if prefix + k in wanted else k: v for k, v in state.items()}
    if any(k.startswith(prefix) and k[len(prefix):] in wanted for k in have):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


# ml_dtypes' narrow floats (bfloat16, float8_*, ...: what a jax bfloat16 array becomes under
# np.asarray) are filed by NumPy under kind "V", yet they are floats; their names say so.
_NARROW_FLOAT_NAMES = ("bfloat", "float")
# integer and boolean kinds: the ones ``allow_int_cast=True`` lets through
_INT_KINDS = "iub"


def is_float_dtype(dtype: Any) -> bool:
    """True for a real floating dtype: NumPy's float16/32/64 (kind "f") or an ml_dtypes
    bfloat16 / float8 (kind "V", but a float)."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or (dt.kind == "V" and dt.name.startswith(_NARROW_FLOAT_NAMES))


def check_float_source(name: str, array: Any, allow_int_cast: bool = False, *,
                       target: str = "a float parameter") -> None:
    """Refuse a checkpoint tensor that would fill a floating-point parameter but is not a float.

    Every parameter of our models is floating-point. A tensor of an integer or boolean dtype
    where one is expected is a corrupt, mislabelled or hand-built file: casting it silently
    would load a model of rounded weights (or all ones and zeros) without a word. ``name`` is
    the tensor's name in the file, ``target`` what it fills (both go into the message).
    ``allow_int_cast=True`` is the explicit opt-in for integer / boolean tensors (the caller
    then casts them); any other non-float dtype (complex, string, object) is always refused.
    Float-to-float casts (float16 / bfloat16 -> float32) are not this function's business:
    they are exact widenings, or the narrowing the caller asked for with its ``dtype``.

    Raises ``CheckpointError`` naming the tensor, its dtype and what it fills.
    """
    dt = np.asarray(array).dtype  # free for a NumPy array (what the readers return)
    if is_float_dtype(dt):
        return
    if dt.kind in _INT_KINDS:
        if allow_int_cast:
            return
        raise CheckpointError(
            f"tensor {name!r} has dtype {dt}, but it fills {target}, which is floating-point; "
            "an integer or boolean tensor there means a corrupt or mislabelled checkpoint. "
            "Pass allow_int_cast=True to cast it to float anyway")
    raise CheckpointError(f"tensor {name!r} has dtype {dt}, which cannot fill {target} "
                          "(floating-point; only float, and with allow_int_cast=True integer or "
                          "boolean, tensors can)")


def import_state_dict(
    state: dict[str, np.ndarray],
    mapping: Mapping,
    shapes: dict[str, Any],
    *,
    strict: bool = True,
    init: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    dtype: Any = None,
    allow_int_cast: bool = False,
) -> tuple[dict[str, Any], LoadReport]:
    """An HF state dict -> our parameter tree (shapes from ``param_shapes`` of the config).

    ``strict`` (default): any missing, unexpected or wrongly shaped tensor raises
    ``CheckpointError`` listing every one by name. ``strict=False`` is the explicit opt-in to a
    partial load (a new classification head, a resized vocabulary): leaves without a usable
    tensor come from ``init(shapes)`` and are listed in the report's ``initialised``; unexpected
    tensors are skipped and listed. ``dtype``: cast every leaf (default: keep the file's).

    Every tensor the model reads must be floating-point (``check_float_source``): an integer or
    boolean one raises ``CheckpointError`` naming it, unless ``allow_int_cast=True``, which casts
    it to ``dtype`` (float32 when ``dtype`` is None). Tensors the mapping ignores (buffers such
    as BERT's int64 ``position_ids``) are not checked.
    """
    n_layers = {r.hf: _layers_of(r, shapes) for r in mapping.rules if r.per_layer}
    wanted = set(mapping.hf_names(n_layers))
    state = _align_prefix(state, wanted, mapping.prefix)
    report = LoadReport()
    used: set[str] = set()
    flat: dict[str, Any] = {}  # our leaf path -> array
    failed_paths: set[str] = set()
    for rule in mapping.rules:
        unit = _unit_shapes(rule, shapes)
        want = expected_hf_shape(rule, shapes)
        per_leaf: list[list[np.ndarray]] = [[] for _ in rule.paths]
        ok = True
        for name in _names(rule, n_layers):
            if name not in state:
                if rule.tied_to is not None:
                    continue  # a tied copy: the source tensor carries it
                report.missing.append(name)
                ok = False
                continue
            used.add(name)
            w = np.asarray(state[name])
            check_float_source(name, w, allow_int_cast, target=f"our {' + '.join(rule.paths)}")
            if w.dtype.kind in _INT_KINDS:  # allowed above: cast now, so no leaf stays an int
                w = w.astype(np.float32 if dtype is None else dtype)
            if tuple(w.shape) != want:
                report.mismatched.append(f"{name}: checkpoint {tuple(w.shape)} vs model {want}")
                ok = False
                continue
            if rule.tied_to is not None:
                src = state.get(rule.tied_to)
                if src is not None and not np.array_equal(src, w):
                    raise CheckpointError(
                        f"{name} should be a tied copy of {rule.tied_to} for this config, but the "
                        "checkpoint's values differ (an untied checkpoint: set the config's "
                        "tie option to False to load it)")
                continue
            for j, leaf in enumerate(_to_ours(rule, w, unit)):
                per_leaf[j].append(leaf)
        if rule.tied_to is not None:
            continue
        if not ok:
            failed_paths.update(rule.paths)
            continue
        for path, leaves in zip(rule.paths, per_leaf):
            value = np.stack(leaves) if rule.per_layer else leaves[0]
            flat[path] = value if dtype is None else value.astype(dtype)
    ignore = [re.compile(p) for p in mapping.ignore]
    report.unexpected = sorted(k for k in state if k not in used and not any(p.fullmatch(k) for p in ignore))
    if not report.ok and strict:
        raise CheckpointError(
            "checkpoint does not match the model:\n" + report.describe()
            + "\n(pass strict=False to load what matches and initialise the rest)")
    if failed_paths:
        if init is None:
            raise CheckpointError("partial load needs an init function:\n" + report.describe())
        fresh = init(shapes)
        for path in sorted(failed_paths):
            value = np.asarray(tree_get(fresh, path))
            flat[path] = value if dtype is None else value.astype(dtype)
            report.initialised.append(path)
    return _ordered(tree_unflatten(flat), shapes), report


def _ordered(tree: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with keys in ``shapes``' order (so two loads of one model print alike)."""
    return {k: _ordered(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in shapes.items()}


def export_state_dict(tree: dict[str, Any], mapping: Mapping, shapes: dict[str, Any]) -> dict[str, np.ndarray]:
    """Our parameter tree -> an HF state dict (tied copies left out, as ``save_pretrained`` does)."""
    n_layers = {r.hf: _layers_of(r, shapes) for r in mapping.rules if r.per_layer}
    out: dict[str, np.ndarray] = {}
    for rule in mapping.rules:
        if rule.tied_to is not None:
            continue
        unit = _unit_shapes(rule, shapes)
        leaves = [np.asarray(tree_get(tree, p)) for p in rule.paths]
        for s, p, a in zip(unit, rule.paths, leaves):
            got = a.shape[1:] if rule.per_layer else a.shape
            if tuple(got) != tuple(s):
                raise CheckpointError(f"leaf {p} has shape {a.shape}, config wants {s}")
        for i, name in enumerate(_names(rule, n_layers)):
            layer = [a[i] for a in leaves] if rule.per_layer else leaves
            out[name] = _to_hf(rule, layer, unit)
    return out
