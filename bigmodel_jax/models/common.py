"""Initialisation and batch handling shared by the JAX model families."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference_numpy.configs import Config, param_shapes
from reference_numpy.models.common import collect_blocks, init_rule
from reference_numpy.tree import Tree, tree_leaves_with_path, tree_map, tree_set


def init_leaf(path: str, shape: tuple[int, ...], key: jax.Array, n_layers: int, dtype: Any) -> jax.Array:
    """One leaf by the shared ``init_rule`` (ones / zeros / scaled normal)."""
    kind, std = init_rule(path, n_layers)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, dtype)).astype(dtype)


def init_from_shapes(shapes: Any, key: jax.Array, n_layers: int, dtype: Any, prefix: str = "") -> Any:
    """A tree shaped like ``shapes``, leaf i drawn with ``fold_in(key, i)`` (sorted-path order),
    so adding a leaf elsewhere does not change the others' values. ``prefix`` is the subtree's
    path in the full tree (the init rule looks at full paths)."""
    if not isinstance(shapes, dict):
        return init_leaf(prefix, shapes, key, n_layers, dtype)
    out = tree_map(lambda s: None, shapes)
    for i, (path, shape) in enumerate(tree_leaves_with_path(shapes)):
        full = f"{prefix}/{path}" if prefix else path
        tree_set(out, path, init_leaf(full, shape, jax.random.fold_in(key, i), n_layers, dtype))
    return out


def init(config: Config, seed: int = 0) -> Tree:
    """A fresh parameter tree for ``config`` (same keys, shapes and rules as the reference)."""
    return init_from_shapes(param_shapes(config), jax.random.key(seed), config.n_layers, jnp.dtype(config.dtype))


def subtree_init(config: Config, name: str, shapes: Any):
    """Flax initializer for the top-level entry ``name``: its whole subtree by ``init_rule``."""
    return lambda key: init_from_shapes(shapes, key, config.n_layers, jnp.dtype(config.dtype), prefix=name)


def concrete(x: Any) -> bool:
    """True for arrays whose values are known (not tracers), so value checks can run."""
    return not isinstance(x, jax.core.Tracer)


def as_bool_mask(mask: Any) -> jax.Array | None:
    return None if mask is None else jnp.asarray(mask).astype(bool)


def tree_size(tree: Tree) -> int:
    return int(sum(np.size(x) for _, x in tree_leaves_with_path(tree)))


def collect_layers(collect: list | None, prefix: str, stacked: Any, n_layers: int) -> None:
    """Append the blocks' sub-layer outputs (``block(..., intermediates=)``, stacked on L by the
    layer loop) to a trace list: ``{prefix}layer{i}.attention`` [, ``.cross_attention``], ``.mlp``."""
    if collect is not None:
        for i in range(n_layers):
            collect_blocks(collect, prefix, i, jax.tree.map(lambda a, i=i: a[i], stacked))
