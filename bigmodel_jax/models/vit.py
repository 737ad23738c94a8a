"""Vision Transformer in JAX; the twin of ``reference_numpy.models.vit`` (see its docstring for
the equations and the exact patch order, which matches HF's stride-p ``Conv2d``).

Dims: B batch, C channels, N patches, P = C p p, D model width, L layers; in the einops string
h / w count patch rows / columns and p / q index a pixel inside its patch.

Layers are stacked on a leading L axis and run with ``jax.lax.scan``, so compile time does not
grow with depth. ``ViT`` is a Flax linen module whose ``init`` gives exactly the reference tree.

Training-mode dropout (sites and mask shapes: ``reference_numpy.models.vit``): pass
``dropout_key`` and the masks are drawn inside (per layer inside the scan, from per-layer keys
split before it), or pass an explicit ``masks`` tree; ``dropout_masks(config, key, B)`` gives
exactly the tree ``dropout_key=key`` draws, to hand the same masks to the reference. Neither =
evaluation.

``perf`` (``bigmodel_jax.perf.PerfOptions``, default the plain path) switches the layout: scan
or unrolled layer loop, remat policy, bf16 mixed precision (pixels cast too), fused q/k/v,
dot_product_attention.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
from flax.core import unfreeze
import jax
import jax.numpy as jnp
from einops import rearrange

from bigmodel_jax.layers.block import block
from bigmodel_jax.layers.dropout import MaskSource, dropout_mask_tree
from bigmodel_jax.layers.embeddings import position_embedding
from bigmodel_jax.layers.linear import linear
from bigmodel_jax.layers.norms import layer_norm
from bigmodel_jax.losses import cross_entropy
from bigmodel_jax.models.common import init as _init
from bigmodel_jax.models.common import collect_layers, subtree_init
from bigmodel_jax.perf import PerfOptions, cast_input, cast_params, layer_loop, loss_logits, resolve
from reference_numpy.configs import ViTConfig, param_shapes
from reference_numpy.models.vit import block_spec, check_loss_labels, check_params, check_pixels, dropout_mask_shapes
from reference_numpy.models.vit import no_classifier_error
from reference_numpy.tree import tree_map

Tree = dict[str, Any]


def init(config: ViTConfig, seed: int = 0) -> Tree:
    """Fresh parameters for ``config`` (every leaf in ``config.dtype``).

    The cast works around ``models.common.init`` returning float64 ``attn/out`` and ``mlp/down``
    kernels for a float32 config when x64 is on (its std is a NumPy float64 scalar, which JAX
    does not treat as weakly typed); it changes no value.
    """
    dtype = jnp.dtype(config.dtype)
    return tree_map(lambda a: a.astype(dtype), _init(config, seed))


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """(B, C, h p, w p) -> (B, h w, C p p), patch-row-major, (channel, row, column) inside a patch."""
    return rearrange(pixel_values, "B C (h p) (w q) -> B (h w) (C p q)", p=patch_size, q=patch_size)


def patch_embed(params: Tree, pixel_values: jax.Array, patch_size: int, *,
                perf: PerfOptions | None = None) -> jax.Array:
    """pixel_values (B, C, H, W) -> patch tokens (B, N, D); params {kernel: (C p p, D), bias: (D,)}."""
    return linear(params, patchify(pixel_values, patch_size), perf=perf)


def dropout_masks(config: ViTConfig, key: jax.Array, batch_size: int) -> Tree:
    """The keep-masks ``forward(..., dropout_key=key)`` draws for B images, as one tree
    (``reference_numpy.models.vit.dropout_mask_shapes``; layer leaves stacked on L)."""
    return dropout_mask_tree(key, dropout_mask_shapes(config, batch_size), config.dropout)


def hidden_states(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None, collect: list | None = None,
) -> jax.Array:
    """pixel_values (B, C, H, W) -> last_hidden_state (B, N + 1, D) after the final LayerNorm;
    token 0 is the class token (HF's ``last_hidden_state``).

    ``dropout_key``: draw training dropout masks from it; ``masks``: explicit masks
    (``dropout_masks``); neither = evaluation. ``perf``: layout options (module docstring).
    ``collect``: a list the call appends the trace rows to (``bigmodel_jax.trace``; outside
    ``jit``): ``embeddings``, each block's, ``final_norm``."""
    check_params(params, config)
    if resolve(perf).compute_dtype is not None:  # mixed precision: weights and pixels in the compute dtype
        params = cast_params(params, perf)
        batch = {**batch, "pixel_values": cast_input(jnp.asarray(batch["pixel_values"]), perf)}
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    B = px.shape[0]
    drop = MaskSource.make(dropout_mask_shapes(config, B), config.dropout, dropout_key=dropout_key, masks=masks)
    tokens = patch_embed(params["patch_embed"], px, config.patch_size, perf=perf)  # (B, N, D)
    cls = jnp.broadcast_to(params["cls_token"], (B, 1, config.d_model))
    x = jnp.concatenate([cls, tokens], axis=1)  # (B, N + 1, D)
    x = x + position_embedding(params["position"], jnp.arange(config.max_len))[None]
    x = drop.apply("embed", cast_input(x, perf))  # the fp32 position table (perf.cast_params)
    if collect is not None:
        collect.append(("embeddings", x))
    spec = drop.spec(block_spec(config))

    def layer(h: jax.Array, xs: tuple[Tree, Any]) -> tuple[jax.Array, Any]:
        p, m = xs  # this layer's parameters and its dropout key / masks (None in evaluation)
        inter: dict[str, jax.Array] | None = None if collect is None else {}
        return block(p, h, spec, masks=drop.layer_masks(m), perf=perf, intermediates=inter), inter

    x, inter = layer_loop(layer, x, (params["layers"], drop.layer_inputs()), perf)  # lax.scan by default
    collect_layers(collect, "", inter, config.n_layers)
    h = layer_norm(params["final_norm"], x, config.norm_eps)
    if collect is not None:
        collect.append(("final_norm", h))
    return h


def pooler_output(params: Tree, h: jax.Array) -> jax.Array:
    """last_hidden_state (B, N + 1, D) -> pooler_output (B, D) = tanh(h[:, 0] W_pool + b_pool)."""
    if "pooler" not in params:
        raise ValueError("params have no pooler (config.pooler=False); HF ViTModel has one by default")
    return linear(params["pooler"], h[:, 0], "tanh")


def encode(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, collect: list | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """HF ``ViTModel``'s outputs: ``(last_hidden_state (B, N + 1, D), pooler_output (B, D))``;
    pooler_output is None when ``config.pooler`` is False (dropout, ``collect``: see
    ``hidden_states``)."""
    h = hidden_states(params, batch, config, dropout_key=dropout_key, masks=masks, collect=collect)
    return h, (pooler_output(params, h) if config.pooler else None)


jit_encode = jax.jit(encode, static_argnames="config")


def forward(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None, collect: list | None = None,
) -> jax.Array:
    """Class logits (B, num_labels) from the class token of the last hidden state (as HF's
    ``ViTForImageClassification``: not from the pooler). Needs ``config.classifier``
    (dropout and ``perf``: see ``hidden_states``)."""
    if not config.classifier:
        raise no_classifier_error(config)
    h = hidden_states(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf, collect=collect)
    return linear(cast_params(params["head"], perf), h[:, 0], perf=perf)


# forward compiled once per (config, shapes, dtypes): the parity case and tests differentiate this
# (eager op-by-op forward under jax.vjp compiles every primitive and the scan separately).
jit_forward = jax.jit(forward, static_argnames="config")


def loss(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> jax.Array:
    """Mean cross-entropy of the class logits against ``labels`` (B,) in [0, num_labels), -100
    ignored (dropout and ``perf``: see ``hidden_states``; fp32 logits under mixed precision).
    Other labels raise when concrete; under ``jit`` their values are unknown, so a caller that
    jits this checks them on the host first (``loss_and_grad`` and the training step do)."""
    check_loss_labels(batch, config)  # before the forward: a bad label fails fast
    logits = forward(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf)
    return cross_entropy(loss_logits(logits, perf), batch["labels"])


@partial(jax.jit, static_argnames=("config", "perf"))
def _loss_and_grad(
    params: Tree, batch: dict[str, Any], config: ViTConfig, dropout_key: jax.Array | None, masks: Tree | None,
    perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    return jax.value_and_grad(loss)(params, batch, config, dropout_key=dropout_key, masks=masks, perf=perf)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, dropout_key: jax.Array | None = None,
    masks: Tree | None = None, perf: PerfOptions | None = None,
) -> tuple[jax.Array, Tree]:
    """(loss, grads) by ``jax.grad``, jit-compiled with ``config`` static; batch checked before
    tracing (so out-of-range labels raise instead of silently producing NaN). Dropout: see
    ``hidden_states``."""
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    check_loss_labels(batch, config)
    MaskSource.make(dropout_mask_shapes(config, px.shape[0]), config.dropout, dropout_key=dropout_key,
                    masks=masks)  # argument errors before tracing
    return _loss_and_grad(params, {"pixel_values": px, "labels": batch["labels"]}, config, dropout_key, masks, perf)


class ViT(nn.Module):
    """Flax linen ViT whose ``variables["params"]`` is exactly the reference tree
    (``param_shapes(config)``, ``init_rule`` initialisation). ``apply`` gives the logits when
    ``config.classifier`` (HF ``ViTForImageClassification``), else ``encode``'s pair
    ``(last_hidden_state, pooler_output or None)`` (HF ``ViTModel``); ``method=ViT.encode``
    gives that pair for any config.

    Each top-level entry (``patch_embed``, ``cls_token``, ``position``, ``layers`` (L-stacked),
    ``final_norm``, and ``pooler`` / ``head`` when configured) is one ``self.param`` holding its
    subtree, so the tree nests with no renaming. ``model.init(key, method=ViT.params)`` builds the parameters without running a
    forward pass; ``model.init(key, pixel_values)`` works as usual.
    """

    config: ViTConfig

    def setup(self) -> None:
        self._tree = {name: self.param(name, subtree_init(self.config, name, shapes))
                      for name, shapes in param_shapes(self.config).items()}

    def params(self) -> Tree:
        """The parameter tree (for ``init(..., method=ViT.params)``)."""
        return unfreeze(self._tree)  # setup freezes dict attributes; the layers expect plain dicts

    def encode(
        self, pixel_values: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """pixel_values (B, C, H, W) -> (last_hidden_state (B, N + 1, D), pooler_output (B, D) or None);
        ``dropout_key``: training dropout (None = evaluation)."""
        return encode(self.params(), {"pixel_values": pixel_values}, self.config, dropout_key=dropout_key)

    def __call__(self, pixel_values: jax.Array, dropout_key: jax.Array | None = None, *,
                 deterministic: bool = True) -> Any:
        """pixel_values (B, C, H, W) -> class logits (B, num_labels) with ``config.classifier``,
        else ``(last_hidden_state, pooler_output or None)``; ``dropout_key``: training dropout
        (None = evaluation); or ``deterministic=False`` with ``rngs={"dropout": key}`` in
        ``apply``, the linen way."""
        if dropout_key is None and not deterministic:
            dropout_key = self.make_rng("dropout")
        if not self.config.classifier:
            return self.encode(pixel_values, dropout_key)
        return forward(self.params(), {"pixel_values": pixel_values}, self.config, dropout_key=dropout_key)
