"""Pieces every reference model shares: batch checks, layer slicing, stacked gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference_numpy.checks import check_array, check_ids
from reference_numpy.tree import Tree, tree_leaves_with_path, tree_map, tree_set


def require_keys(batch: dict[str, Any], keys: Sequence[str], family: str) -> None:
    """A batch missing a required key names it (and what the family needs)."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{family} batch is missing {missing}; it needs {list(keys)}, got {sorted(batch)}")


def check_token_batch(
    batch: dict[str, Any], key: str, vocab_size: int, max_len: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """ids (B, T) in range and not longer than the model supports; optional attention mask."""
    ids = batch[key]
    check_array(key, ids, ("B", "T"), kind="int")
    b, t = ids.shape
    if t > max_len:
        raise ValueError(f"{key} has length {t}, longer than the model supports (max_len={max_len})")
    check_ids(key, ids, vocab_size)
    mask_key = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}.get(key)
    mask = batch.get(mask_key) if mask_key else None
    if mask is not None:
        check_array(mask_key, mask, (b, t))
        mask = np.asarray(mask).astype(bool)
    return np.asarray(ids), mask


def check_cached_token_batch(
    batch: dict[str, Any], key: str, vocab_size: int, max_len: int, slots: int, cache_pos: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoding step's batch: ids (B, N), the new tokens at slots [cache_pos, cache_pos + N) of
    a cache with ``slots`` slots, in range and within ``max_len``; the attention mask, if any,
    covers every slot: (B, slots). Returns (ids, bool mask or None)."""
    ids = batch[key]
    check_array(key, ids, ("B", "N"), kind="int")
    b, n = ids.shape
    if not 0 <= cache_pos <= slots - n:
        raise ValueError(f"cache_pos {cache_pos} + {n} new tokens does not fit the cache's {slots} slots")
    if cache_pos + n > max_len:
        raise ValueError(f"slot {cache_pos + n - 1} is past the longest sequence the model supports "
                         f"(max_len={max_len})")
    check_ids(key, ids, vocab_size)
    mask_key = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}[key]
    mask = batch.get(mask_key)
    if mask is not None:
        check_array(mask_key, mask, (b, slots))
        mask = np.asarray(mask).astype(bool)
    return np.asarray(ids), mask


def collect_blocks(collect: list | None, prefix: str, i: int, inter: dict[str, Any]) -> None:
    """Append block ``i``'s sub-layer outputs (``block_forward(..., intermediates=)``) to a
    trace list as ``{prefix}layer{i}.attention`` [, ``.cross_attention``], ``.mlp``."""
    if collect is None:
        return
    collect.append((f"{prefix}layer{i}.attention", inter["attn"]))
    if "cross" in inter:
        collect.append((f"{prefix}layer{i}.cross_attention", inter["cross"]))
    collect.append((f"{prefix}layer{i}.mlp", inter["mlp"]))


def layer(stacked: Tree, i: int) -> Tree:
    """Parameters of layer ``i`` from a tree stacked on the leading L axis."""
    return tree_map(lambda a: a[i], stacked)


def stack(trees: list[Tree]) -> Tree:
    """Inverse of ``layer``: per-layer gradient trees -> one stacked tree."""
    return tree_map(lambda *xs: np.stack(xs), trees[0], *trees[1:])


def init_rule(path: str, n_layers: int, std: float = 0.02) -> tuple[str, float]:
    """How the leaf at ``path`` is initialised, shared by both packages.

    Norm scales 1, biases (``final_logits_bias`` too, as HF) and the class token 0, everything
    else N(0, std); the projections
    that write into the residual stream (``attn/out``, ``mlp/down``) get std / sqrt(2 L)
    (GPT-2's scaling, so the residual variance does not grow with depth).
    """
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
        return "ones", 0.0
    if leaf in ("bias", "final_logits_bias") or path == "cls_token":
        return "zeros", 0.0
    if path.endswith(("attn/out/kernel", "mlp/down/kernel")):
        return "normal", float(std / np.sqrt(2 * max(n_layers, 1)))
    return "normal", std


def init_params(shapes: Tree, n_layers: int, rng: np.random.Generator, dtype: Any) -> Tree:
    """A fresh parameter tree from ``configs.param_shapes(config)`` (reference side)."""
    out = tree_map(lambda s: None, shapes)
    for path, shape in tree_leaves_with_path(shapes):
        kind, std = init_rule(path, n_layers)
        if kind == "ones":
            val = np.ones(shape, dtype)
        elif kind == "zeros":
            val = np.zeros(shape, dtype)
        else:
            val = (rng.standard_normal(shape) * std).astype(dtype)
        tree_set(out, path, val)
    return out
