"""Initialisation and batch handling shared by the JAX model families."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference_numpy.configs import Config, param_shapes
from reference_numpy.models.common import init_rule
from reference_numpy.tree import Tree, tree_leaves_with_path, tree_map, tree_set


def init(config: Config, seed: int = 0) -> Tree:
    """A fresh parameter tree for ``config`` (same keys, shapes and rules as the reference).

    One key per leaf, ``fold_in(key(seed), leaf index in sorted-path order)``, so adding a
    leaf elsewhere does not change the others' values.
    """
    shapes = param_shapes(config)
    dtype = jnp.dtype(config.dtype)
    root = jax.random.key(seed)
    out = tree_map(lambda s: None, shapes)
    for i, (path, shape) in enumerate(tree_leaves_with_path(shapes)):
        kind, std = init_rule(path, config.n_layers)
        if kind == "ones":
            val = jnp.ones(shape, dtype)
        elif kind == "zeros":
            val = jnp.zeros(shape, dtype)
        else:
            val = std * jax.random.normal(jax.random.fold_in(root, i), shape, dtype)
        tree_set(out, path, val)
    return out


def subtree_init(config: Config, name: str, shapes: Any):
    """Flax initializer for the top-level entry ``name``: its whole subtree by ``init_rule``,
    one ``fold_in`` key per leaf (sorted-path order)."""
    dtype = jnp.dtype(config.dtype)

    def leaf(key: jax.Array, path: str, shape: tuple[int, ...]) -> jax.Array:
        kind, std = init_rule(path, config.n_layers)
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (std * jax.random.normal(key, shape, dtype)).astype(dtype)

    def init_fn(key: jax.Array) -> Any:
        if not isinstance(shapes, dict):
            return leaf(key, name, shapes)
        out = tree_map(lambda s: None, shapes)
        for i, (path, shape) in enumerate(tree_leaves_with_path(shapes)):
            tree_set(out, path, leaf(jax.random.fold_in(key, i), f"{name}/{path}", shape))
        return out

    return init_fn


def concrete(x: Any) -> bool:
    """True for arrays whose values are known (not tracers), so value checks can run."""
    return not isinstance(x, jax.core.Tracer)


def as_bool_mask(mask: Any) -> jax.Array | None:
    return None if mask is None else jnp.asarray(mask).astype(bool)


def tree_size(tree: Tree) -> int:
    return int(sum(np.size(x) for _, x in tree_leaves_with_path(tree)))
