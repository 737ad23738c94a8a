"""Parameter trees: nested ``dict[str, dict | ndarray]`` with the same keys on both sides.

Only dicts are containers here (no lists or tuples), which keeps a tree's paths readable
(``"attn/query/kernel"``) and identical between NumPy, JAX and the checkpoint files.

``tree_flatten`` / ``tree_unflatten`` are the one flat form of a tree, ``{"a/b/c": leaf}``, that
files and checkpoints store. With ``sequences=True`` they also walk optimizer states: tuples,
lists and NamedTuples (optax's and ``reference_numpy.optim``'s) keyed by index or field name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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


def _children(node: Any, sequences: bool) -> list[tuple[Any, Any]] | None:
    """``[(key, child), ...]`` of a container (dict keys sorted), or None for a leaf."""
    if isinstance(node, dict):
        return [(k, node[k]) for k in sorted(node, key=str)]
    if not sequences:
        return None
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # NamedTuple: by field name
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(node)]
    if node is None:  # an empty optax slot: a container without leaves
        return []
    return None


def tree_flatten(tree: Any, *, sep: str = "/", sequences: bool = False) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every leaf, in sorted-key order (leaves untouched).

    Dict keys must be non-empty strings without ``sep``, else two trees could flatten to the
    same keys. A parameter tree (``sequences=False``: only dicts are containers) must also
    survive :func:`tree_unflatten` without a template, so an empty sub-dict (no leaves) is an
    error. ``sequences=True`` also walks tuples, lists, NamedTuples and None (see the module
    docstring); such a tree is rebuilt with ``tree_unflatten(flat, like=template)``.
    """
    if _children(tree, sequences) is None:
        raise TypeError(f"a tree is a dict{' (or tuple / list)' if sequences else ''}, "
                        f"not {type(tree).__name__}")
    flat: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        children = _children(node, sequences)
        if children is None:
            flat[path] = node
            return
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, str) or not k or sep in k:
                    where = f" under {path!r}" if path else ""
                    raise ValueError(f"tree key {k!r}{where} must be a non-empty string without {sep!r}")
            if not node and path and not sequences:
                raise ValueError(f"empty subtree at {path!r}: it has no leaves and cannot be stored; "
                                 "remove it before saving")
        for k, child in children:
            walk(child, f"{path}{sep}{k}" if path else k)

    walk(tree, "")
    return flat


def tree_unflatten(flat: Mapping[str, Any], *, sep: str = "/", like: Any = None) -> Any:
    """Inverse of :func:`tree_flatten`.

    Without ``like``: the nested dicts the paths spell (keys in sorted order); a path that runs
    through a leaf, or has an empty component, is a ValueError. With ``like``: ``like``'s
    structure (dicts, tuples, lists, NamedTuples, None) with each leaf taken from ``flat`` by its
    path; ``flat`` must hold exactly those paths (KeyError naming the missing or extra ones).
    """
    if like is not None:
        wanted = tree_flatten(like, sep=sep, sequences=True)
        missing = [p for p in wanted if p not in flat]
        extra = sorted(set(flat) - set(wanted))
        if missing or extra:
            raise KeyError(f"flat tree does not match the template: missing {missing[:5]}, extra {extra[:5]}")
        return _rebuild(like, "", flat, sep)
    tree: Tree = {}
    for path in sorted(flat):  # sorted: the key order tree_leaves_with_path and tree_flatten have
        parts = path.split(sep) if isinstance(path, str) else [""]
        if not all(parts):
            raise ValueError(f"invalid tree path {path!r}: empty component")
        node = tree
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through the leaf {sep.join(parts[:i + 1])!r}")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"path {path!r} is both a leaf and a subtree")
        node[parts[-1]] = flat[path]
    return tree


def _rebuild(like: Any, path: str, flat: Mapping[str, Any], sep: str) -> Any:
    children = _children(like, True)
    if children is None:
        return flat[path]
    if like is None:
        return None
    if isinstance(like, dict):  # like's own key order
        return {k: _rebuild(like[k], f"{path}{sep}{k}" if path else k, flat, sep) for k in like}
    values = [_rebuild(child, f"{path}{sep}{k}" if path else k, flat, sep) for k, child in children]
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*values)
    return type(like)(values)
