"""Parameter trees: nested ``dict[str, dict | ndarray]`` with the same keys on both sides.

Only dicts are containers here (no lists or tuples), which keeps a tree's paths readable
(``"attn/query/kernel"``) and identical between NumPy, JAX and the checkpoint files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Tree = dict[str, Any]


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to one or more trees of the same structure."""
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or other.keys() != tree.keys():
                raise ValueError(
                    f"tree structures differ: keys {sorted(tree)} vs "
                    f"{sorted(other) if isinstance(other, dict) else type(other).__name__}"
                )
        return {k: tree_map(fn, tree[k], *(o[k] for o in rest)) for k in tree}
    return fn(tree, *rest)


def tree_leaves_with_path(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``("a/b/c", leaf)`` pairs in sorted key order."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from tree_leaves_with_path(tree[k], f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, tree


def tree_leaves(tree: Tree) -> list[Any]:
    """Leaves in sorted-path order."""
    return [leaf for _, leaf in tree_leaves_with_path(tree)]


def tree_zeros_like(tree: Tree) -> Tree:
    """A tree of zeros shaped and typed like ``tree`` (the gradient accumulator)."""
    return tree_map(np.zeros_like, tree)


def tree_add(a: Tree, b: Tree) -> Tree:
    """Leaf-wise ``a + b``."""
    return tree_map(lambda x, y: x + y, a, b)


def tree_scale(tree: Tree, s: float) -> Tree:
    """Leaf-wise ``s * x`` keeping each leaf's dtype."""
    return tree_map(lambda x: (x * s).astype(np.asarray(x).dtype, copy=False), tree)


def tree_size(tree: Tree) -> int:
    """Total number of scalars in the tree."""
    return int(sum(np.size(x) for x in tree_leaves(tree)))


def tree_get(tree: Tree, path: str) -> Any:
    """Return the leaf or subtree at ``"a/b/c"``."""
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def tree_set(tree: Tree, path: str, value: Any) -> None:
    """Set the leaf at ``"a/b/c"`` in place."""
    *parents, last = path.split("/")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value
