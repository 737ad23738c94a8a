"""Shard parameters, optimizer state, batches and activations over a device mesh, on JAX's own
SPMD partitioner (``jax.sharding.Mesh`` + ``NamedSharding``; XLA inserts the collectives).

The design is MaxText's: every parameter leaf carries *logical* axis names
(``reference_numpy.configs.param_axes`` / ``axes_for_path``: embed, heads, kv_heads, head_dim,
mlp, vocab, layers, ...), and one rules table maps each logical name to mesh axes. The mesh has
three axes, always in this order:

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split AND the weights' embed dimension is split (ZeRO-3 / FSDP: XLA
            all-gathers a weight before its matmul and reduce-scatters its gradient)
    tensor  Megatron-style tensor parallelism: heads, kv_heads, mlp and vocab are split

``DEFAULT_RULES`` (the README's "Scaling out" table)::

    batch              -> (data, fsdp)     the batch dimension of the inputs
    embed              -> fsdp             the model width D of every weight
    heads, kv_heads    -> tensor           H and K of the attention projections
    mlp                -> tensor           F of the MLP
    vocab              -> tensor           V of the embedding / LM head
    activation_batch   -> (data, fsdp)     activations (B, T, D) at block boundaries:
    activation_length  -> None               split like the batch, and NOT over fsdp on D
    activation_embed   -> None               (that would all-gather them for every matmul)
    anything else      -> replicated       head_dim, layers, position, patch, classes, None

A rule is used only where its mesh axes divide the dimension; otherwise that dimension is
replicated along that axis and one INFO line per leaf on the ``bigmodel_jax.sharding`` logger
says so (e.g. GQA's ``kv_heads=2`` on ``tensor=4`` is replicated, as MaxText does). A mesh axis
is used at most once per leaf (a later dimension asking for it goes without). Sharding never
changes the math: results equal the single-device run up to the order of the reductions.

The optimizer state needs no rules of its own: ``init_opt_state(optimizer, sharded_params)``
gives every state leaf that mirrors a parameter (Adam's ``mu`` / ``nu``, momentum) that
parameter's sharding, so the state is sharded like the parameters (ZeRO-3 / FSDP on the fsdp
axis). A bare ``jax.jit(optimizer.init)(sharded_params)`` does NOT: the zeros it creates do not
depend on the parameters' values, so XLA leaves them replicated (seen with jax 0.10).

Activation constraints: ``bigmodel_jax.layers.block`` marks its input and output hidden states
with the logical names ``activation_batch, activation_length, activation_embed``
(``flax.linen.with_logical_constraint``). That is a no-op unless a rules context is active;
``use_mesh(mesh, rules)`` provides it around the tracing of a jitted step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reference_numpy.configs import Config, axes_for_path, param_shapes

__all__ = [
    "ACTIVATION_NAMES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "Rules",
    "activation_rules",
    "batch_sharding",
    "init_opt_state",
    "logical_spec",
    "make_mesh",
    "opt_state_shardings",
    "param_shardings",
    "parse_mesh",
    "shard_batch",
    "shard_params",
    "spec_axes",
    "use_mesh",
]

logger = logging.getLogger("bigmodel_jax.sharding")

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical name -> mesh axis, a tuple of mesh axes (the dimension is split over their product),
# or None (replicated)
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# the names bigmodel_jax.layers.block constrains its (B, T, D) input and output with
ACTIVATION_NAMES: tuple[str, str, str] = ("activation_batch", "activation_length", "activation_embed")

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("position", None),
    ("patch", None),
    ("classes", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
)


# --------------------------------------------------------------------------------------------
# the mesh


def parse_mesh(text: str) -> dict[str, int]:
    """``"data:2,fsdp:2,tensor:2"`` (or ``"fsdp=8"``) -> ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Axes left out have size 1 (``make_mesh``). Raises ``ValueError`` naming the bad part: an
    empty text, an entry that is not ``AXIS:SIZE``, an axis outside ``MESH_AXES``, a repeated
    axis or a size that is not a positive integer."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a mesh is written like 'data:2,fsdp:2,tensor:2' (axes {', '.join(MESH_AXES)}); "
                         f"got {text!r}")
    sizes: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*[:=]\s*(\S+)\s*", part)
        if m is None:
            raise ValueError(f"mesh {text!r}: entry {part.strip()!r} is not AXIS:SIZE "
                             f"(e.g. 'data:2,fsdp:2,tensor:2')")
        name, size = m.group(1), m.group(2)
        if name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        if not re.fullmatch(r"[0-9]+", size) or int(size) < 1:
            raise ValueError(f"mesh {text!r}: the size of {name!r} must be a positive integer, got {size!r}")
        sizes[name] = int(size)
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` in that order over ``devices``
    (default ``jax.devices()``, every device of every process). Sizes missing from ``axes`` are
    1; their product must equal the number of devices.

    The axes are ``AxisType.Auto``: shardings are propagated by the XLA partitioner (GSPMD /
    Shardy), the model code is unchanged. Raises ``ValueError`` for an unknown axis name, a size
    that is not a positive integer, or sizes whose product is not the device count."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {', '.join(MESH_AXES)}")
    for name, size in axes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {size!r}")
    shape = tuple(int(axes.get(name, 1)) for name in MESH_AXES)
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        sizes = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, shape))
        raise ValueError(f"mesh {sizes} holds {math.prod(shape)} devices, but there are {len(devices)}: "
                         f"the sizes' product must equal the device count")
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


# --------------------------------------------------------------------------------------------
# logical names -> PartitionSpec


def _check_rules(rules: Rules, mesh: Mesh | None = None) -> dict[str, tuple[str, ...]]:
    """``rules`` as {logical name: mesh axes tuple} (first entry of a name wins, as in flax);
    a malformed table, or a mesh axis ``mesh`` lacks, is a ``ValueError``."""
    table: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        # lists are accepted too: a table read from JSON / YAML has no tuples
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"a sharding rule is (logical name, mesh axes), got {entry!r}")
        name, target = entry
        axes = () if target is None else (target,) if isinstance(target, str) else target
        axes = tuple(axes) if isinstance(axes, list) else axes
        if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
            raise ValueError(f"rule for {name!r}: the mesh axes must be a name, a tuple of names or None; "
                             f"got {target!r}")
        if mesh is not None:
            missing = [a for a in axes if a not in mesh.shape]
            if missing:
                raise ValueError(f"rule for {name!r} names mesh axes {missing}, which the mesh "
                                 f"({', '.join(mesh.axis_names)}) does not have")
        table.setdefault(name, axes)
    return table


def spec_axes(
    names: Sequence[str | None], shape: Sequence[int], mesh_sizes: Mapping[str, int],
    table: Mapping[str, tuple[str, ...]], *, dropped: list[str] | None = None,
) -> tuple[tuple[str, ...], ...]:
    """The mesh axes each dimension is split over (``logical_spec``'s rule on plain mesh sizes,
    so the memory planner computes splits without a mesh or devices): a dimension takes its
    name's mesh axes from ``table`` ({logical name: mesh axes}, as ``_check_rules`` returns),
    keeping an axis only if its size is > 1, no earlier dimension used it, and it divides the
    dimension together with the axes kept before it. An axis dropped for divisibility is
    described in ``dropped`` (when given). A mesh axis missing from ``mesh_sizes`` has size 1."""
    used: set[str] = set()
    out: list[tuple[str, ...]] = []
    for name, dim in zip(names, shape):
        kept: list[str] = []
        for axis in table.get(name, ()) if name is not None else ():
            size = mesh_sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            split = math.prod(mesh_sizes.get(a, 1) for a in kept) * size
            if dim % split:
                if dropped is not None:
                    dropped.append(f"{name}={dim} not divisible by {'x'.join([*kept, axis])}={split}; "
                                   f"replicated along {axis}")
                continue
            kept.append(axis)
            used.add(axis)
        out.append(tuple(kept))
    return tuple(out)


def logical_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None,
    *, what: str = "array",
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical axis ``names`` and ``shape`` on ``mesh``.

    Each dimension takes its name's mesh axes (``rules``, default ``DEFAULT_RULES``; a name with
    no rule is replicated), keeping an axis only if it has size > 1, is not already used by an
    earlier dimension, and divides the dimension together with the axes kept before it. Axes
    dropped for divisibility are reported in one INFO line naming ``what``."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
    table = _check_rules(DEFAULT_RULES if rules is None else rules, mesh)
    dropped: list[str] = []
    axes = spec_axes(names, shape, dict(mesh.shape), table, dropped=dropped)
    spec: list[Any] = [None if not kept else kept[0] if len(kept) == 1 else kept for kept in axes]
    if dropped:
        logger.info("%s: %s", what, "; ".join(dropped))
    while spec and spec[-1] is None:  # P("fsdp", None) == P("fsdp"); the short form reads better
        spec.pop()
    return PartitionSpec(*spec)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(key))
    return "/".join(parts)


def _stacked(path: str) -> bool:
    """Per-layer leaves stacked on a leading L axis live under a ``layers`` key (as in
    ``param_axes``); a list of per-layer trees (``layers/0/...``) is not stacked."""
    parts = path.split("/")
    return any(p == "layers" and i + 1 < len(parts) and not parts[i + 1].isdigit() for i, p in enumerate(parts))


def _shape_tree(node: Any) -> Any:
    """``param_shapes``' nested dicts of shape tuples -> the same tree of ShapeDtypeStructs."""
    if isinstance(node, dict):
        return {k: _shape_tree(v) for k, v in node.items()}
    return jax.ShapeDtypeStruct(tuple(node), np.float32)


def param_shardings(config: Config, mesh: Mesh, rules: Rules | None = None, params: Any = None) -> Any:
    """The tree of ``NamedSharding``s for ``config``'s parameters on ``mesh``, mirroring
    ``params``' tree (its paths and shapes; NumPy or JAX leaves; e.g. a BERT tree with its head)
    or, when None, ``param_shapes(config)``.

    A leaf's logical names come from ``reference_numpy.configs.axes_for_path``; a leaf no rule
    names is replicated. Rules that do not divide a dimension fall back to replication
    (``logical_spec``; one INFO line per leaf)."""
    tree = _shape_tree(param_shapes(config)) if params is None else params

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        p = _path_str(path)
        shape = tuple(np.shape(leaf))
        names = axes_for_path(p, len(shape), _stacked(p))
        if names is None:
            if shape:
                logger.info("%s: no logical axis rule for a leaf of shape %s; replicated", p, shape)
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_spec(names, shape, mesh, rules, what=p))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(params: Any, config: Config, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``params`` placed on ``mesh`` by ``param_shardings`` (``jax.device_put``: each device
    receives only its shard)."""
    return jax.device_put(params, param_shardings(config, mesh, rules, params=params))


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """The ``NamedSharding``s of ``optimizer.init(params)`` for ``params`` already placed on a
    mesh (``shard_params``): a state leaf that mirrors a parameter (found by
    ``optax.tree_map_params``) with the parameter's shape takes the parameter's sharding; every
    other leaf (step counts, a factored second moment) is replicated."""
    leaves = jax.tree.leaves(params)
    shardings = [getattr(x, "sharding", None) for x in leaves]
    if not leaves or not all(isinstance(s, NamedSharding) for s in shardings):
        raise ValueError("opt_state_shardings needs parameters placed on a mesh (shard_params); "
                         f"got shardings {sorted({type(s).__name__ for s in shardings})}")
    replicated = NamedSharding(shardings[0].mesh, PartitionSpec())
    state = jax.eval_shape(optimizer.init, params)

    def like_param(leaf: Any, param: Any) -> NamedSharding:
        return param.sharding if np.shape(leaf) == np.shape(param) else replicated

    return optax.tree_map_params(optimizer, like_param, state, params,
                                 transform_non_params=lambda _: replicated)


def init_opt_state(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """``optimizer.init(params)`` created directly in ``opt_state_shardings`` (each device
    allocates only its shard of the moments; no replicated copy is ever built)."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params))(params)


def batch_sharding(
    mesh: Mesh, ndim: int, batch_axis: int = 0, *, size: int | None = None, rules: Rules | None = None,
) -> NamedSharding:
    """The sharding of an ``ndim``-dimensional batch array whose dimension ``batch_axis`` is
    the batch: split over the mesh axes of the logical name ``"batch"`` (default ``(data,
    fsdp)``), the rest replicated. ``size``: the batch size, checked to be divisible by those
    axes (``ValueError`` naming it) — jax's own error for an uneven split is less clear."""
    if ndim < 1 or not -ndim <= batch_axis < ndim:
        raise ValueError(f"batch_axis={batch_axis} is not a dimension of a {ndim}-dimensional batch array")
    axes = tuple(a for a in _check_rules(DEFAULT_RULES if rules is None else rules, mesh).get("batch", ()))
    split = math.prod(mesh.shape[a] for a in axes)
    if size is not None and size % split:
        raise ValueError(f"a batch of {size} examples cannot be split over {' x '.join(axes)} = {split} devices; "
                         f"use a batch size divisible by {split}")
    spec: list[Any] = [None] * ndim
    spec[batch_axis % ndim] = axes if axes else None
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, batch_axis: int = 0, rules: Rules | None = None) -> dict:
    """A dict of batch arrays placed on ``mesh`` with ``batch_sharding`` (dimension
    ``batch_axis`` split over (data, fsdp)); ``ValueError`` naming the key whose batch does not
    divide. Scalars (0-d) are replicated."""
    out = {}
    for key, value in batch.items():
        x = np.asarray(value) if not isinstance(value, jax.Array) else value
        if x.ndim == 0:
            out[key] = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
            continue
        try:
            sharding = batch_sharding(mesh, x.ndim, batch_axis, size=x.shape[batch_axis], rules=rules)
        except ValueError as err:
            raise ValueError(f"batch[{key!r}] {tuple(x.shape)}: {err}") from None
        out[key] = jax.device_put(x, sharding)
    return out


# --------------------------------------------------------------------------------------------
# activation constraints


def activation_rules(rules: Rules | None = None) -> Rules:
    """``rules`` (default ``DEFAULT_RULES``) with the activation names' default entries added
    where the table has none (a user table of parameter rules keeps working)."""
    table = _check_rules(DEFAULT_RULES if rules is None else rules)
    # the table in flax's form; a name listed twice keeps its first entry, as in logical_spec
    rules = tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes) for name, axes in table.items())
    named = set(table)
    extra = tuple(r for r in DEFAULT_RULES if r[0] in ACTIVATION_NAMES and r[0] not in named)
    return rules + extra


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Within this context, jit traces with ``mesh`` as the current mesh (``jax.set_mesh``) and
    with the logical rules ``activation_rules(rules)`` (``flax.linen.logical_axis_rules``), so the
    blocks' ``with_logical_constraint`` become real sharding constraints. Enter it around every
    call of a jitted step: the mesh is part of jit's cache key, so a trace made outside the
    context (without constraints) is not reused inside it, and a call outside retraces.

    (``with mesh:``, the older form, does not set the abstract mesh that flax's constraints read
    in this JAX, so they would stay no-ops.)"""
    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(rules)):
        yield mesh
