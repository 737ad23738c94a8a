"""ViT: logits, every gradient leaf and d pixel_values of the reference vs JAX.

The cotangent is a random ``dlogits`` (B, num_labels); it reaches the patch tokens only through
attention, so it exercises every path: head, final norm, each block, positions, class token,
the patch embedding and its fold back to pixels (``pixel_values`` is a differentiable input).

``head="base"`` (the default for ``classifier=False``, HF ``ViTModel``) compares HF's base
outputs instead: ``concat([last_hidden_state, pooler_output[:, None]], axis=1)`` (B, N + 2, D)
(just last_hidden_state without a pooler), so a random cotangent reaches the pooler too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from bigmodel_apps.parity.harness import CaseData, register, register_trajectory
from bigmodel_jax.models import vit as jvit
from bigmodel_jax.tree import to_jax
from reference_numpy import configs
from reference_numpy.models import vit as rvit
from reference_numpy.tolerances import MODEL_PARITY
from reference_numpy.tree import tree_leaves_with_path, tree_set


def perturb_vit_params(params: dict, rng: np.random.Generator) -> dict:
    """Move every norm scale / bias, every projection bias and the class token away from their
    1 / 0 init, so a mix-up between them (or a dropped gradient) cannot hide; and scale the
    query / key kernels up 10x (std 0.02 -> 0.2), so attention is far from uniform and the
    query / key gradients stand well above the finite-difference noise floor."""
    for path, leaf in list(tree_leaves_with_path(params)):
        if path.endswith(("/scale", "/bias")) or path == "cls_token":
            tree_set(params, path, (leaf + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
        elif path.endswith(("attn/query/kernel", "attn/key/kernel")):
            tree_set(params, path, (10 * leaf).astype(leaf.dtype))
    return params


def image_batch(rng: np.random.Generator, config: Any, batch: int, dtype: Any) -> np.ndarray:
    """Random pixel_values (B, C, H, W), roughly the scale of normalised images."""
    shape = (batch, config.n_channels, config.image_size, config.image_size)
    return rng.standard_normal(shape).astype(dtype)


@register("vit", ({"preset": "vit-tiny", "n_layers": 1}, {"preset": "vit-tiny", "n_layers": 2},
                  {"preset": "vit-tiny", "n_layers": 1, "classifier": False, "pooler": True, "qkv_bias": False}))
def vit_case(
    rng: np.random.Generator, dtype: Any, preset: str = "vit-tiny", *, batch: int = 2, head: str | None = None,
    **overrides: Any,
) -> CaseData:
    """``head``: "classifier" (logits) or "base" (last_hidden_state [+ pooler_output]); default
    "classifier" when the config has one."""
    config = dataclasses.replace(configs.preset(preset, **overrides), dtype=np.dtype(dtype).name, dropout=0.0)
    head = head or ("classifier" if config.classifier else "base")
    if head not in ("classifier", "base"):
        raise ValueError(f"head must be 'classifier' or 'base', got {head!r}")
    params = perturb_vit_params(rvit.init(config, rng), rng)
    pixels = image_batch(rng, config, batch, dtype)

    if head == "classifier":
        def ref_forward(p, i):
            return rvit.forward_with_cache(p, {"pixel_values": i["pixel_values"]}, config)

        def ref_backward(p, cache, dy):
            grads, dpixels = rvit.backward(p, cache, dy, config, return_pixel_grad=True)
            return {"pixel_values": dpixels}, grads

        def jax_forward(p, i):
            return jvit.jit_forward(p, {"pixel_values": i["pixel_values"]}, config)
    else:
        def ref_forward(p, i):
            (h, pooled), cache = rvit.encode_with_cache(p, {"pixel_values": i["pixel_values"]}, config)
            return (h if pooled is None else np.concatenate([h, pooled[:, None]], axis=1)), cache

        def ref_backward(p, cache, dy):
            douts = (dy, None) if not config.pooler else (dy[:, :-1], dy[:, -1])
            grads, dpixels = rvit.encode_backward(p, cache, douts, config, return_pixel_grad=True)
            return {"pixel_values": dpixels}, grads

        def jax_forward(p, i):
            h, pooled = jvit.jit_encode(p, {"pixel_values": i["pixel_values"]}, config)
            return h if pooled is None else jnp.concatenate([h, pooled[:, None]], axis=1)

    return CaseData(
        params=params,
        inputs={"pixel_values": pixels},
        ref_forward=ref_forward,
        ref_backward=ref_backward,
        jax_forward=jax_forward,
        tolerances=MODEL_PARITY,
    )


@register_trajectory("vit")
def vit_trajectory(dtype: Any, preset: str = "vit-tiny"):
    """(params, ref_lg, jax_lg) for ``adamw_trajectory`` on a random labelled image batch."""
    config = dataclasses.replace(configs.preset(preset), dtype=np.dtype(dtype).name)
    rng = np.random.default_rng(3)
    params = rvit.init(config, rng)
    batch = {"pixel_values": image_batch(rng, config, 3, dtype),
             "labels": rng.integers(0, config.num_labels, size=(3,))}
    jbatch = to_jax(batch)
    return (params, lambda p: rvit.loss_and_grad(p, batch, config),
            lambda p: jvit.loss_and_grad(p, jbatch, config))
