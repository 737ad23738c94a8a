"""Move a parameter tree between NumPy and JAX with no renaming and no dtype change."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference_numpy.tree import Tree, tree_map


def _check_x64(a: Any) -> None:
    if np.asarray(a).dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "a float64 leaf cannot move to JAX without x64 mode (it would silently become "
            "float32); call jax.config.update('jax_enable_x64', True) at start-up first"
        )


def to_jax(tree: Tree) -> Tree:
    """NumPy tree -> ``jax.Array`` tree, same keys, same dtypes (float64 needs x64 mode)."""

    def move(a: Any) -> jax.Array:
        _check_x64(a)
        return jnp.asarray(a, dtype=np.asarray(a).dtype)

    return tree_map(move, tree)


def to_numpy(tree: Tree) -> Tree:
    """``jax.Array`` tree (any nested dict, e.g. flax ``FrozenDict``) -> NumPy tree."""
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return tree_map(lambda a: np.asarray(jax.device_get(a)), dict(tree))
