"""Inverted dropout with an explicit keep-mask: the JAX twin of ``reference_numpy.layers.dropout``.

    y = x * mask / (1 - rate)        mask: True = keep, P(keep) = 1 - rate

Masks come from an explicit PRNG key (``dropout_mask``), never hidden state, so a test can
draw one mask with NumPy and feed it to both sides. ``rate`` is a static Python float.

Whole models draw a *tree* of masks (``{"embed": (B, T, D), "layers": {"attn_probs":
(L, B, H, T, S), ...}}``, shapes from the reference model's ``dropout_mask_shapes``) from one key:

    leaf ``name``            dropout_mask(fold_in(key, stream(name)), shape, rate)
    subtree ``name``         the same rule with key fold_in(key, stream(name))   (seq2seq stacks)
    ``layers`` (stacked, L)  layer l's masks from k_l = split(fold_in(key, stream("layers")), L)[l],
                             leaf ``name`` of a layer from fold_in(k_l, stream(name))

``stream(name)`` is a fixed number per name (CRC-32), so adding a mask never changes the others.
``dropout_mask_tree`` materialises the whole tree (to hand the same masks to the reference);
``MaskSource`` is what a model forward uses: it draws the embedding masks directly and gives
``lax.scan`` the per-layer keys, so one layer's masks exist at a time inside the scan.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax

from reference_numpy.checks import check_array
from reference_numpy.layers.block import BlockSpec
from reference_numpy.layers.dropout import check_mask, check_rate, resolve_mask_tree


def dropout_mask(key: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
    """A boolean keep-mask of ``shape``, each entry True with probability ``1 - rate``."""
    check_rate(rate)
    return jax.random.bernoulli(key, 1.0 - rate, tuple(shape))


def dropout(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """x: (...), mask: bool broadcastable to x.shape -> (...) = x * mask / (1 - rate).

    ``rate == 0`` returns ``x`` unchanged, as the reference.
    """
    check_array("x", x, kind="float")
    check_mask(mask, x)
    check_rate(rate)
    if rate == 0:
        return x
    return x * (mask.astype(x.dtype) * (1.0 / (1.0 - rate)))


# --------------------------------------------------------------------------------------------
# mask trees for whole models


def stream(name: str) -> int:
    """The ``fold_in`` index of mask (or subtree) ``name``: CRC-32 of the name, 31 bits."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _check_key(key: Any) -> None:
    """A PRNG key: a typed key (``jax.random.key``) or a raw uint32 (2,) (``PRNGKey``)."""
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        raise ValueError(f"dropout_key must be a jax PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (str(key.dtype) == "uint32" and tuple(key.shape) == (2,)):
        raise ValueError(
            "dropout_key must be a single jax PRNG key (jax.random.key(seed), or a uint32 (2,) "
            f"PRNGKey), got dtype {key.dtype} shape {tuple(key.shape)}"
        )


def _n_layers(layer_shapes: dict[str, Any]) -> int:
    return int(next(iter(layer_shapes.values()))[0])


def layer_mask_tree(layer_key: jax.Array, shapes: dict[str, Sequence[int]], rate: float) -> dict[str, jax.Array]:
    """One layer's masks: leaf ``name`` of ``shapes`` (no L axis) from ``fold_in(layer_key, stream(name))``."""
    return {name: dropout_mask(jax.random.fold_in(layer_key, stream(name)), shape, rate)
            for name, shape in shapes.items()}


def layer_keys(key: jax.Array, n_layers: int) -> jax.Array:
    """The L per-layer keys of a stack: ``split(fold_in(key, stream("layers")), L)``."""
    return jax.random.split(jax.random.fold_in(key, stream("layers")), n_layers)


def dropout_mask_tree(key: jax.Array, shapes: dict[str, Any], rate: float) -> dict[str, Any]:
    """Every mask of ``shapes`` (a nested dict of shape tuples; ``layers`` leaves lead with L),
    drawn by the rule in the module docstring: exactly the masks a model forward draws from
    ``key``, as one tree to hand to the reference (``np.asarray`` each leaf). Jit-compiled once
    per (shapes, rate): drawn op by op, each of the few dozen threefry draws would dispatch and compile on its own."""
    _check_key(key)
    check_rate(rate)
    return _compiled_draw(json.dumps(shapes, sort_keys=True), float(rate))(key)


@functools.lru_cache(maxsize=64)
def _compiled_draw(shapes_json: str, rate: float) -> Callable[[jax.Array], dict[str, Any]]:
    """``_draw_tree`` for one (shapes, rate), jit-compiled (the shapes travel as JSON: a hashable key)."""
    shapes = json.loads(shapes_json)
    return jax.jit(lambda key: _draw_tree(key, shapes, rate))


def _draw_tree(key: jax.Array, shapes: dict[str, Any], rate: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name == "layers":
            per_layer = {k: tuple(s[1:]) for k, s in shape.items()}
            draw = jax.vmap(lambda k: layer_mask_tree(k, per_layer, rate))  # vmap over keys = a loop
            out[name] = draw(layer_keys(key, _n_layers(shape)))
        elif isinstance(shape, dict):
            out[name] = _draw_tree(jax.random.fold_in(key, stream(name)), shape, rate)
        else:
            out[name] = dropout_mask(jax.random.fold_in(key, stream(name)), shape, rate)
    return out


@dataclass(frozen=True)
class MaskSource:
    """Where a model forward's dropout masks come from: drawn from ``key``, given explicitly as
    ``masks`` (a tree shaped like ``shapes``), or neither (evaluation: ``active`` is False and
    every method is the identity). Build with ``MaskSource.make``."""

    shapes: dict[str, Any]  # mask shapes of this stack (``layers`` leaves lead with L)
    rate: float  # the dropout rate (config.dropout)
    key: Any = None  # a PRNG key, or None
    masks: dict[str, Any] | None = None  # an explicit mask tree, or None

    @classmethod
    def make(cls, shapes: dict[str, Any], rate: float, *, dropout_key: Any = None,
             masks: dict[str, Any] | None = None) -> MaskSource:
        """Check the arguments: not both; ``masks`` shaped like ``shapes``. With ``rate == 0``
        the result is inactive (dropout is the identity)."""
        if dropout_key is not None and masks is not None:
            raise ValueError("pass dropout_key (masks drawn inside) or masks (explicit), not both")
        check_rate(rate)
        if dropout_key is not None:
            _check_key(dropout_key)
        masks = resolve_mask_tree(masks, shapes, rate)
        if rate == 0:
            dropout_key = None
        return cls(shapes, rate, dropout_key, masks)

    @property
    def active(self) -> bool:
        return self.key is not None or self.masks is not None

    def leaf(self, name: str) -> jax.Array | None:
        """Top-level mask ``name`` (e.g. ``"embed"``), or None when inactive."""
        if self.masks is not None:
            return self.masks[name]
        if self.key is not None:
            return dropout_mask(jax.random.fold_in(self.key, stream(name)), self.shapes[name], self.rate)
        return None

    def apply(self, name: str, x: jax.Array) -> jax.Array:
        """x with mask ``name`` applied (inverted dropout), or x itself when inactive."""
        mask = self.leaf(name)
        return x if mask is None else dropout(x, mask, self.rate)

    def sub(self, name: str) -> MaskSource:
        """The source of subtree ``name`` (seq2seq's ``encoder`` / ``decoder``)."""
        return MaskSource(
            self.shapes[name], self.rate,
            None if self.key is None else jax.random.fold_in(self.key, stream(name)),
            None if self.masks is None else self.masks[name],
        )

    def spec(self, spec: BlockSpec) -> BlockSpec:
        """The block spec carrying this rate when active (the block reads ``spec.dropout_rate``)."""
        return replace(spec, dropout_rate=self.rate) if self.active else spec

    def layer_inputs(self) -> Any:
        """What ``lax.scan`` walks beside the stacked parameters: the per-layer keys (L,), the
        stacked masks, or None (inactive)."""
        if self.masks is not None:
            return self.masks["layers"]
        if self.key is not None:
            return layer_keys(self.key, _n_layers(self.shapes["layers"]))
        return None

    def layer_masks(self, item: Any) -> dict[str, jax.Array] | None:
        """Inside the scan: one layer's masks from its slice of ``layer_inputs()``."""
        if self.masks is not None:
            return item
        if self.key is not None:
            per_layer = {k: tuple(s[1:]) for k, s in self.shapes["layers"].items()}
            return layer_mask_tree(item, per_layer, self.rate)
        return None
