"""Vision Transformer (Dosovitskiy et al. 2020): forward and the hand-written backward.

Dims: B batch, C channels, N = (image_size / p)^2 patches, P = C p p pixels per patch,
D model width, L layers; in the image layout strings h / w count patch rows / columns and
p / q index a pixel's row / column inside its patch (p = q = patch_size).

    pixel_values                                                      (B, C, H, W)   NCHW, as HF
    patches = rearrange("B C (h p) (w q) -> B (h w) (C p q)")         (B, N, P)
    x       = patches W_patch + b_patch                               (B, N, D)
    x       = [cls; x] + P_pos[0..N]                                  (B, N + 1, D)
    x       = block_l(x)   l = 1..L   (pre-norm, bidirectional, LayerNorm, erf GELU MLP)
    h       = norm_f(x)                                               (B, N + 1, D)
    logits  = h[:, 0] W_head + b_head                                 (B, num_labels)
    loss    = CE(logits, labels)                                      labels (B,) in [0, num_labels)

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
* Evaluation forward: dropout is not applied (``config.dropout`` is a training setting).
* The image must be exactly ``config.image_size`` square: positions are learned for that grid
  (HF's ``interpolate_pos_encoding`` is not supported).
* Initialisation: ``models.common.init_rule`` (norm scales 1, biases and the class token 0,
  other leaves N(0, 0.02), residual-writing projections N(0, 0.02 / sqrt(2 L))).

Backward: the class token's gradient is ``dx[:, 0]`` summed over the batch; the positions get
``dx`` summed over the batch; the patch gradient ``dx[:, 1:]`` runs back through the linear map
and is folded back to pixels by the inverse rearrangement (each pixel belongs to exactly one
patch, so no accumulation is needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import check_array, check_ids
from reference_numpy.configs import ViTConfig, param_shapes
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.embeddings import position_embedding_backward, position_embedding_forward
from reference_numpy.layers.linear import linear_backward, linear_forward
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward
from reference_numpy.losses import cross_entropy_backward, cross_entropy_forward
from reference_numpy.models.common import init_params, layer, require_keys, stack
from reference_numpy.tree import Tree

# --------------------------------------------------------------------------------------------
# shared with the JAX model: block spec, batch checks, the HF conv kernel layout


def block_spec(config: ViTConfig) -> BlockSpec:
    """The encoder block: pre-norm, bidirectional self-attention, LayerNorm, plain MLP."""
    return BlockSpec(prenorm=True, norm="layer", norm_eps=config.norm_eps, activation=config.activation)


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


def check_labels(batch: dict[str, Any], config: ViTConfig, batch_size: int) -> Any:
    """labels: (B,) ints in [0, num_labels) (values checked when known)."""
    require_keys(batch, ["pixel_values", "labels"], "vit")
    labels = batch["labels"]
    check_ids("labels", labels, config.num_labels, (batch_size,))
    return labels


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
# model


def init(config: ViTConfig, rng: np.random.Generator) -> Tree:
    """Fresh parameters (same rules as ``bigmodel_jax.models.vit.init``, NumPy random stream)."""
    return init_params(param_shapes(config), config.n_layers, rng, np.dtype(config.dtype))


def forward_with_cache(params: Tree, batch: dict[str, Any], config: ViTConfig) -> tuple[np.ndarray, Any]:
    """Logits (B, num_labels) and everything backward needs."""
    px = check_pixels(batch, config, params["patch_embed"]["kernel"].dtype)
    B = px.shape[0]
    tokens, c_patch = patch_embed_forward(params["patch_embed"], px, config.patch_size)  # (B, N, D)
    cls = np.broadcast_to(params["cls_token"], (B, 1, config.d_model))
    x = np.concatenate([cls, tokens], axis=1)  # (B, N + 1, D)
    pos, c_pos = position_embedding_forward(params["position"], np.arange(config.max_len))
    x = x + pos  # (N + 1, D) broadcast over B
    spec = block_spec(config)
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        x, c = block_forward(layer(params["layers"], i), x, spec)
        c_blocks.append(c)
    h, c_norm = layer_norm_forward(params["final_norm"], x, eps=config.norm_eps)  # (B, N + 1, D)
    logits, c_head = linear_forward(params["head"], h[:, 0])  # (B, num_labels)
    return logits, (c_patch, c_pos, c_blocks, c_norm, c_head, h.shape)


def forward(params: Tree, batch: dict[str, Any], config: ViTConfig) -> np.ndarray:
    """Class logits (B, num_labels)."""
    return forward_with_cache(params, batch, config)[0]


def backward(
    params: Tree, cache: Any, dlogits: np.ndarray, config: ViTConfig, *, return_pixel_grad: bool = False
) -> Tree | tuple[Tree, np.ndarray]:
    """Hand-written backward from dlogits (B, num_labels) to a gradient tree shaped like params.

    ``return_pixel_grad``: also return d pixel_values (B, C, H, W), as ``(grads, dpixels)``.
    """
    c_patch, c_pos, c_blocks, c_norm, c_head, h_shape = cache
    check_array("dlogits", dlogits, (h_shape[0], config.num_labels), kind="float")
    grads: Tree = {}
    dcls_h, grads["head"] = linear_backward(params["head"], c_head, dlogits)  # (B, D)
    dh = np.zeros(h_shape, dlogits.dtype)
    dh[:, 0] = dcls_h  # only the class token reaches the head
    dx, grads["final_norm"] = layer_norm_backward(params["final_norm"], c_norm, dh)
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["layers"], i), c_blocks[i], dx)
        layer_grads.append(g)
    grads["layers"] = stack(layer_grads[::-1])
    _, grads["position"] = position_embedding_backward(params["position"], c_pos, dx)  # sums over B
    grads["cls_token"] = dx[:, 0].sum(axis=0)
    dpixels, grads["patch_embed"] = patch_embed_backward(params["patch_embed"], c_patch, dx[:, 1:])
    return (grads, dpixels) if return_pixel_grad else grads


def loss_and_grad(params: Tree, batch: dict[str, Any], config: ViTConfig) -> tuple[np.ndarray, Tree]:
    """Mean cross-entropy of the class logits against ``labels`` (B,), and its gradient by the
    hand-written backward."""
    logits, cache = forward_with_cache(params, batch, config)
    labels = check_labels(batch, config, logits.shape[0])
    loss, c_loss = cross_entropy_forward(logits, np.asarray(labels))
    dlogits = cross_entropy_backward(c_loss, np.ones((), logits.dtype))
    return loss, backward(params, cache, dlogits, config)
