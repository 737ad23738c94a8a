"""Vision Transformer (Dosovitskiy et al. 2020): forward and the hand-written backward.

Dims: B batch, C channels, N = (image_size / p)^2 patches, P = C p p pixels per patch,
D model width, L layers; in the image layout strings h / w count patch rows / columns and
p / q index a pixel's row / column inside its patch (p = q = patch_size).

    pixel_values                                                      (B, C, H, W)   NCHW, as HF
    patches = rearrange("B C (h p) (w q) -> B (h w) (C p q)")         (B, N, P)
    x       = patches W_patch + b_patch                               (B, N, D)
    x       = [cls; x] + P_pos[0..N]                                  (B, N + 1, D)
    x       = block_l(x)   l = 1..L   (pre-norm, bidirectional, LayerNorm, erf GELU MLP)
    h       = norm_f(x)                  last_hidden_state            (B, N + 1, D)
    pooled  = tanh(h[:, 0] W_pool + b_pool)  pooler_output            (B, D)   config.pooler
    logits  = h[:, 0] W_head + b_head                                 (B, num_labels)   config.classifier
    loss    = CE(logits, labels)                                      labels (B,) in [0, num_labels), -100 ignored

Options (``ViTConfig``), as HF: ``qkv_bias=False`` drops the query / key / value biases (the
output projection keeps its bias); ``pooler`` adds the tanh pooler of HF ``ViTModel``
(``pooler_output``); ``classifier=False`` drops the head (HF ``ViTModel``). As in HF's
``ViTForImageClassification``, the head reads the class token of ``h``, never the pooler.
Entry points: ``forward`` / ``forward_with_cache`` / ``backward`` / ``loss_and_grad`` for the
logits; ``hidden_states``, ``pooler_output`` and ``encode_with_cache`` / ``encode_backward``
(cotangent pair ``(d last_hidden_state, d pooler_output)``) for HF ``ViTModel``'s outputs.

Patch order (the HF porting table relies on it). Patch ``n = i * (W / p) + j`` is the one at
patch row ``i``, patch column ``j`` (row-major over the grid, as HF's
``conv(x).flatten(2).transpose(1, 2)``), and inside a patch the pixel ``x[c, i p + u, j p + v]``
sits at index ``c p^2 + u p + v`` of the patch vector (channel slowest, then pixel row, then
pixel column). So ``patches @ W_patch`` is exactly HF's stride-p ``Conv2d`` with weight
``w: (D, C, p, p)`` when

    W_patch = w.reshape(D, C * p * p).T          (C p p, D)      (``from_conv_kernel``)
    w       = W_patch.T.reshape(D, C, p, p)                      (``to_conv_kernel``)
    b_patch = conv bias (D,)

HF ViT checkpoint names: ``embeddings.patch_embeddings.projection.weight`` -> ``patch_embed/kernel``
(this transform), ``embeddings.cls_token`` (1, 1, D) -> ``cls_token`` (D,),
``embeddings.position_embeddings`` (1, N + 1, D) -> ``position/embedding``.

* The final LayerNorm runs over every token (HF's ``last_hidden_state``), the head reads the
  class token only; norms are per token, so that is the same as normalising just the class token.
* Training-mode dropout (HF ViT's hidden dropout, rate ``config.dropout`` =
  ``hidden_dropout_prob``; HF's separate attention-probability dropout is not modelled) when
  ``masks`` is given, a tree shaped by ``dropout_mask_shapes`` (keep-masks, True = keep, kept
  entries scaled by 1 / (1 - p)); no masks = evaluation:

      x = drop([cls; x] + P_pos; masks["embed"] (B, N + 1, D))     after adding the positions
      in block l: attention output / MLP output, before the residual add:
                  masks["layers"]["attn_out"][l], masks["layers"]["mlp_out"][l]   (B, N + 1, D)

  The head and the pooler have no dropout (as HF). The JAX model draws the same tree from a key
  (``bigmodel_jax.models.vit.dropout_masks``).
* The image must be exactly ``config.image_size`` square: positions are learned for that grid
  (HF's ``interpolate_pos_encoding`` is not supported).
* Initialisation: ``models.common.init_rule`` (norm scales 1, biases and the class token 0,
  other leaves N(0, 0.02), residual-writing projections N(0, 0.02 / sqrt(2 L))).

Backward: the pooler's input gradient is added to ``dh[:, 0]``; a leaf the requested outputs do
not read (the pooler for logits, the head for ``encode``) gets an exact zero gradient. The class
token's gradient is ``dx[:, 0]`` summed over the batch; the positions get
``dx`` summed over the batch; the patch gradient ``dx[:, 1:]`` runs back through the linear map
and is folded back to pixels by the inverse rearrangement (each pixel belongs to exactly one
patch, so no accumulation is needed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from reference_numpy.checks import check_array
from reference_numpy.configs import ViTConfig, param_shapes
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.dropout import (
    dropout_backward,
    dropout_mask_tree,
    optional_dropout_forward,
    resolve_mask_tree,
)
from reference_numpy.layers.embeddings import position_embedding_backward, position_embedding_forward
from reference_numpy.layers.linear import linear_backward, linear_forward
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward
from reference_numpy.losses import check_labels, cross_entropy_backward, cross_entropy_forward
from reference_numpy.models.common import collect_blocks, init_params, layer, require_keys, stack
from reference_numpy.tree import Tree, tree_zeros_like

# --------------------------------------------------------------------------------------------
# shared with the JAX model: block spec, batch checks, the HF conv kernel layout


def block_spec(config: ViTConfig) -> BlockSpec:
    """The encoder block: pre-norm, bidirectional self-attention, LayerNorm, plain MLP."""
    return BlockSpec(prenorm=True, norm="layer", norm_eps=config.norm_eps, activation=config.activation)


def dropout_mask_shapes(config: ViTConfig, batch_size: int) -> dict[str, Any]:
    """Shapes of the training masks for B images (shared with the JAX model), N + 1 = max_len
    tokens: ``{"embed": (B, N + 1, D), "layers": {"attn_out": (L, B, N + 1, D),
    "mlp_out": (L, B, N + 1, D)}}``."""
    B, N1, D, L = batch_size, config.max_len, config.d_model, config.n_layers
    return {"embed": (B, N1, D), "layers": {"attn_out": (L, B, N1, D), "mlp_out": (L, B, N1, D)}}


def check_pixels(batch: dict[str, Any], config: ViTConfig, dtype: Any = None) -> Any:
    """pixel_values: (B, C, H, W) float with C = n_channels and H = W = image_size.

    ``dtype``: the parameters' dtype, which the images must share (no silent up/down-cast).
    Only shapes and dtypes are read, so this runs on JAX tracers too.
    """
    require_keys(batch, ["pixel_values"], "vit")
    px = batch["pixel_values"]
    check_array("pixel_values", px, ("B", "C", "H", "W"), kind="float")
    _, c, h, w = px.shape
    if c != config.n_channels:
        raise ValueError(
            f"pixel_values has {c} channels but the config expects n_channels={config.n_channels} "
            "(images are NCHW: (B, C, H, W))"
        )
    p, s = config.patch_size, config.image_size
    if h % p or w % p:
        raise ValueError(f"pixel_values image size {h}x{w} is not divisible by patch_size {p}")
    if (h, w) != (s, s):
        raise ValueError(
            f"pixel_values image size {h}x{w} differs from config.image_size {s}x{s}; positions are "
            f"learned for a {s // p}x{s // p} patch grid (resize the images)"
        )
    if dtype is not None and str(px.dtype) != str(dtype):
        raise ValueError(f"pixel_values has dtype {px.dtype} but the parameters are {dtype}; cast the images")
    return px


def check_loss_labels(batch: dict[str, Any], config: ViTConfig) -> None:
    """The loss's ``labels`` (B,), B from ``pixel_values``, each in [0, num_labels) or -100
    (ignored, as HF's ``ViTForImageClassification``); ``losses.check_labels``: values when
    concrete, under ``jit`` the caller checks on the host."""
    require_keys(batch, ["pixel_values", "labels"], "vit")
    check_labels(batch["labels"], config.num_labels, "labels", shape=(np.shape(batch["pixel_values"])[0],))


def from_conv_kernel(weight: np.ndarray) -> np.ndarray:
    """HF ``Conv2d`` weight (D, C, p, p) -> our ``patch_embed/kernel`` (C p p, D)."""
    d = weight.shape[0]
    return np.ascontiguousarray(np.asarray(weight).reshape(d, -1).T)


def to_conv_kernel(kernel: np.ndarray, n_channels: int, patch_size: int) -> np.ndarray:
    """Our ``patch_embed/kernel`` (C p p, D) -> HF ``Conv2d`` weight (D, C, p, p)."""
    p = patch_size
    return np.ascontiguousarray(np.asarray(kernel).T.reshape(-1, n_channels, p, p))


# --------------------------------------------------------------------------------------------
# patch embedding


def patchify(pixel_values: np.ndarray, patch_size: int) -> np.ndarray:
    """(B, C, h p, w p) -> (B, h w, C p p): ``rearrange("B C (h p) (w q) -> B (h w) (C p q)")``."""
    B, C, H, W = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(B, C, H // p, p, W // p, p)  # B C h p w q
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # B (h w) (C p q)


def unpatchify(patches: np.ndarray, shape: tuple[int, int, int, int], patch_size: int) -> np.ndarray:
    """Inverse of ``patchify``: (B, h w, C p p) -> (B, C, h p, w p) (a permutation, so also its
    adjoint: the pixel gradient of ``patchify``)."""
    B, C, H, W = shape
    p = patch_size
    x = patches.reshape(B, H // p, W // p, C, p, p)  # B h w C p q
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)  # B C (h p) (w q)


def patch_embed_forward(params: Tree, pixel_values: np.ndarray, patch_size: int) -> tuple[np.ndarray, Any]:
    """pixel_values (B, C, H, W) -> patch tokens (B, N, D); params {kernel: (C p p, D), bias: (D,)}."""
    y, c_lin = linear_forward(params, patchify(pixel_values, patch_size))
    return y, (pixel_values.shape, patch_size, c_lin)


def patch_embed_backward(params: Tree, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Tree]:
    """dy (B, N, D) -> (d pixel_values (B, C, H, W), {kernel, bias})."""
    shape, patch_size, c_lin = cache
    dpatches, grads = linear_backward(params, c_lin, dy)
    return unpatchify(dpatches, shape, patch_size), grads


# --------------------------------------------------------------------------------------------
# model options: which leaves the tree has (shared with the JAX model)

def check_params(params: Tree, config: ViTConfig) -> None:
    """The tree's top-level entries must be those of ``param_shapes(config)``: a ``pooler`` only
    when ``config.pooler``, a ``head`` only when ``config.classifier`` (runs on tracers too)."""
    if not isinstance(params, dict):
        raise ValueError(f"vit params must be a dict tree, got {type(params).__name__}")
    want = set(param_shapes(config))
    missing, extra = sorted(want - set(params)), sorted(set(params) - want)
    if missing or extra:
        raise ValueError(
            f"vit params do not fit the config (pooler={config.pooler}, classifier={config.classifier}): "
            f"missing {missing}, unexpected {extra}"
        )


def no_classifier_error(config: ViTConfig) -> ValueError:
    """The error for asking a head-less ViT (HF ``ViTModel``) for logits."""
    return ValueError(
        "this ViT has no classification head (config.classifier=False, as HF ViTModel): use "
        "hidden_states(params, batch, config) for last_hidden_state (B, N + 1, D) and "
        "pooler_output(params, h) for the pooled class token"
        + ("" if config.pooler else " (config.pooler=True is needed for the latter)")
    )


# --------------------------------------------------------------------------------------------
# model


def dropout_masks(config: ViTConfig, rng: np.random.Generator, batch_size: int) -> Tree:
    """A fresh tree of keep-masks (``dropout_mask_shapes``) drawn with P(keep) = 1 - config.dropout."""
    return dropout_mask_tree(rng, dropout_mask_shapes(config, batch_size), config.dropout)


def init(config: ViTConfig, rng: np.random.Generator) -> Tree:
    """Fresh parameters (same rules as ``bigmodel_jax.models.vit.init``, NumPy random stream)."""
    return init_params(param_shapes(config), config.n_layers, rng, np.dtype(config.dtype))


def _trunk_forward(
    params: Tree, px: np.ndarray, config: ViTConfig, masks: Tree | None = None, collect: list | None = None
) -> tuple[np.ndarray, Any]:
    """pixel_values (B, C, H, W) -> last_hidden_state (B, N + 1, D) and its cache (``masks``:
    training dropout masks, ``dropout_mask_shapes``; None = evaluation; ``collect``: the trace
    list, see ``forward_with_cache``)."""
    B = px.shape[0]
    masks = resolve_mask_tree(masks, dropout_mask_shapes(config, B), config.dropout)
    tokens, c_patch = patch_embed_forward(params["patch_embed"], px, config.patch_size)  # (B, N, D)
    cls = np.broadcast_to(params["cls_token"], (B, 1, config.d_model))
    x = np.concatenate([cls, tokens], axis=1)  # (B, N + 1, D)
    pos, c_pos = position_embedding_forward(params["position"], np.arange(config.max_len))
    x = x + pos  # (N + 1, D) broadcast over B
    x, c_drop = optional_dropout_forward(x, None if masks is None else masks["embed"], config.dropout)
    if collect is not None:
        collect.append(("embeddings", x))
    spec = block_spec(config)
    if masks is not None:
        spec = dataclasses.replace(spec, dropout_rate=config.dropout)
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        m = None if masks is None else layer(masks["layers"], i)
        inter: dict[str, np.ndarray] | None = None if collect is None else {}
        x, c = block_forward(layer(params["layers"], i), x, spec, masks=m, intermediates=inter)
        collect_blocks(collect, "", i, inter)
        c_blocks.append(c)
    h, c_norm = layer_norm_forward(params["final_norm"], x, eps=config.norm_eps)  # (B, N + 1, D)
    if collect is not None:
        collect.append(("final_norm", h))
    return h, {"patch": c_patch, "pos": c_pos, "drop": c_drop, "blocks": c_blocks, "norm": c_norm,
               "h_shape": h.shape}


def _trunk_backward(params: Tree, cache: Any, dh: np.ndarray, grads: Tree, config: ViTConfig) -> np.ndarray:
    """d last_hidden_state (B, N + 1, D) -> d pixel_values (B, C, H, W); the trunk's leaves of
    ``grads`` are overwritten (the head / pooler leaves are the caller's)."""
    dx, grads["final_norm"] = layer_norm_backward(params["final_norm"], cache["norm"], dh)
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["layers"], i), cache["blocks"][i], dx)
        layer_grads.append(g)
    grads["layers"] = stack(layer_grads[::-1])
    dx = dropout_backward(cache["drop"], dx)  # the embedding dropout (identity in evaluation)
    _, grads["position"] = position_embedding_backward(params["position"], cache["pos"], dx)  # sums over B
    grads["cls_token"] = dx[:, 0].sum(axis=0)
    dpixels, grads["patch_embed"] = patch_embed_backward(params["patch_embed"], cache["patch"], dx[:, 1:])
    return dpixels


def encode_with_cache(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray | None], Any]:
    """HF ``ViTModel``'s outputs ``(last_hidden_state (B, N + 1, D), pooler_output (B, D) or None
    when config.pooler is False)`` and everything ``encode_backward`` needs (``masks``: training
    dropout masks, ``dropout_mask_shapes``; None = evaluation; ``collect``: see
    ``forward_with_cache``)."""
    check_params(params, config)
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    h, c_trunk = _trunk_forward(params, px, config, masks, collect)
    pooled, c_pool = linear_forward(params["pooler"], h[:, 0], "tanh") if config.pooler else (None, None)
    return (h, pooled), {"kind": "encode", "trunk": c_trunk, "pool": c_pool}


def hidden_states(params: Tree, batch: dict[str, Any], config: ViTConfig, *, masks: Tree | None = None) -> np.ndarray:
    """pixel_values (B, C, H, W) -> last_hidden_state (B, N + 1, D) after the final LayerNorm;
    token 0 is the class token (HF's ``last_hidden_state``). ``masks``: training dropout masks
    (``dropout_mask_shapes``), None = evaluation."""
    check_params(params, config)
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    return _trunk_forward(params, px, config, masks)[0]


def pooler_output(params: Tree, h: np.ndarray) -> np.ndarray:
    """last_hidden_state (B, N + 1, D) -> pooler_output (B, D) = tanh(h[:, 0] W_pool + b_pool)."""
    if "pooler" not in params:
        raise ValueError("params have no pooler (config.pooler=False); HF ViTModel has one by default")
    check_array("h", h, ("B", "N", params["pooler"]["kernel"].shape[0]), kind="float")
    return linear_forward(params["pooler"], h[:, 0], "tanh")[0]


def encode_backward(
    params: Tree, cache: Any, douts: tuple[np.ndarray | None, np.ndarray | None], config: ViTConfig,
    *, return_pixel_grad: bool = False,
) -> Tree | tuple[Tree, np.ndarray]:
    """Hand-written backward of ``encode_with_cache`` from the cotangent pair
    ``(d last_hidden_state (B, N + 1, D), d pooler_output (B, D))`` (either may be None) to a
    gradient tree shaped like params (a ``head`` the outputs never read gets exact zeros).

    ``return_pixel_grad``: also return d pixel_values (B, C, H, W), as ``(grads, dpixels)``.
    """
    if cache.get("kind") != "encode":
        raise ValueError("cache was made by forward_with_cache (logits); use backward")
    dh, dpooled = douts
    h_shape = cache["trunk"]["h_shape"]
    B, _, D = h_shape
    dtype = params["patch_embed"]["kernel"].dtype
    dh = np.zeros(h_shape, dtype) if dh is None else np.array(dh)  # a copy: the pooler adds into it
    check_array("d last_hidden_state", dh, h_shape, kind="float")
    grads = tree_zeros_like(params)  # a leaf the outputs never read (the head) stays 0
    if dpooled is not None:
        if not config.pooler:
            raise ValueError("d pooler_output given but config.pooler is False (pooler_output is None)")
        check_array("d pooler_output", dpooled, (B, D), kind="float")
        dcls, grads["pooler"] = linear_backward(params["pooler"], cache["pool"], dpooled)
        dh[:, 0] += dcls  # the pooler reads the class token only
    dpixels = _trunk_backward(params, cache["trunk"], dh, grads, config)
    return (grads, dpixels) if return_pixel_grad else grads


def forward_with_cache(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[np.ndarray, Any]:
    """Logits (B, num_labels) and everything backward needs (needs ``config.classifier``).
    ``masks``: training dropout masks (``dropout_mask_shapes``; e.g. ``np.asarray`` of the JAX
    ``dropout_masks``), None = evaluation. ``collect``: a list this call appends the trace rows
    to (``reference_numpy.trace``): ``embeddings``, each block's, ``final_norm``."""
    if not config.classifier:
        raise no_classifier_error(config)
    check_params(params, config)
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    h, c_trunk = _trunk_forward(params, px, config, masks, collect)
    logits, c_head = linear_forward(params["head"], h[:, 0])  # (B, num_labels); HF reads h[:, 0], not the pooler
    return logits, {"kind": "logits", "trunk": c_trunk, "head": c_head}


def forward(params: Tree, batch: dict[str, Any], config: ViTConfig, *, masks: Tree | None = None) -> np.ndarray:
    """Class logits (B, num_labels) (HF ``ViTForImageClassification``); a head-less config
    (``classifier=False``) raises and points to ``hidden_states`` / ``pooler_output``
    (``masks``: see ``forward_with_cache``)."""
    return forward_with_cache(params, batch, config, masks=masks)[0]


def backward(
    params: Tree, cache: Any, dlogits: np.ndarray, config: ViTConfig, *, return_pixel_grad: bool = False
) -> Tree | tuple[Tree, np.ndarray]:
    """Hand-written backward from dlogits (B, num_labels) to a gradient tree shaped like params
    (a ``pooler``, which the logits do not read, gets exact zeros).

    ``return_pixel_grad``: also return d pixel_values (B, C, H, W), as ``(grads, dpixels)``.
    """
    if cache.get("kind") != "logits":
        raise ValueError("cache was made by encode_with_cache; use encode_backward")
    h_shape = cache["trunk"]["h_shape"]
    check_array("dlogits", dlogits, (h_shape[0], config.num_labels), kind="float")
    grads = tree_zeros_like(params)
    dcls_h, grads["head"] = linear_backward(params["head"], cache["head"], dlogits)  # (B, D)
    dh = np.zeros(h_shape, dlogits.dtype)
    dh[:, 0] = dcls_h  # only the class token reaches the head
    dpixels = _trunk_backward(params, cache["trunk"], dh, grads, config)
    return (grads, dpixels) if return_pixel_grad else grads


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: ViTConfig, *, masks: Tree | None = None
) -> tuple[np.ndarray, Tree]:
    """Mean cross-entropy of the class logits against ``labels`` (B,), and its gradient by the
    hand-written backward (``masks``: training dropout masks, see ``forward_with_cache``;
    None = evaluation)."""
    logits, cache = forward_with_cache(params, batch, config, masks=masks)
    check_loss_labels(batch, config)
    loss, c_loss = cross_entropy_forward(logits, np.asarray(batch["labels"]))
    dlogits = cross_entropy_backward(c_loss, np.ones((), logits.dtype))
    return loss, backward(params, cache, dlogits, config)
