"""ViT: reference (hand-written backward) vs JAX, finite differences, AdamW steps, the patch
embedding against an explicit convolution, parameter counts, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax.models import vit as jvit
from bigmodel_apps.parity.cases.vit import vit_case
from bigmodel_apps.parity.harness import compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy import optim as roptim
from reference_numpy.configs import param_count, param_shapes, preset
from reference_numpy.models import vit as rvit
from reference_numpy.tolerances import (
    LAYER_PARITY,
    MODEL_PARITY,
    TRAJECTORY_PARITY,
    normwise_error,
    tolerance_for,
)
from reference_numpy.tree import tree_leaves_with_path, tree_map, tree_size


@st.composite
def vit_variants(draw) -> dict:
    """A tiny ViT: every size the family has, drawn small (each draw costs one XLA compile)."""
    patch = draw(st.sampled_from([2, 4]))
    return {
        "n_layers": draw(st.integers(1, 2)),
        "n_heads": draw(st.sampled_from([4, 2])),
        "d_model": draw(st.sampled_from([8, 16])),
        "d_ff": draw(st.sampled_from([8, 24])),
        "patch_size": patch,
        "image_size": patch * draw(st.sampled_from([2, 3, 1])),  # a 2x2, 3x3 or 1x1 patch grid
        "n_channels": draw(st.sampled_from([1, 3])),
        "num_labels": draw(st.integers(2, 7)),
        # HF's variants: ViTModel (no head, tanh pooler), qkv_bias=False checkpoints
        "qkv_bias": draw(st.booleans()),
        "pooler": draw(st.booleans()),
        "classifier": draw(st.booleans()),
    }


# Each example compiles the JAX forward and its transpose (seconds on 2 CPU cores), so a few
# examples per dtype (the dtype is a parameter so that both are always run).
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(max_examples=max(3, settings.default.max_examples // 4))  # a JAX compile per example
@given(v=vit_variants(), batch=st.integers(1, 2), seed=st.integers(0, 50))
def test_reference_matches_jax_logits_and_every_gradient(dtype, v, batch, seed):
    data = vit_case(np.random.default_rng(seed), dtype, batch=batch, **v)
    rows = compare(data, dtype, seed=seed)
    want = {"output", "d/pixel_values", "d/params/cls_token", "d/params/patch_embed/kernel"}
    want |= {"d/params/head/kernel"} if v["classifier"] else set()
    want |= {"d/params/pooler/kernel"} if v["pooler"] else set()
    want |= {"d/params/layers/attn/query/bias"} if v["qkv_bias"] else set()
    names = {r.quantity for r in rows}
    assert names >= want, want - names
    assert v["qkv_bias"] or not any(n.endswith(("query/bias", "key/bias", "value/bias")) for n in names)
    assert all(r.passed for r in rows), format_rows(f"vit {v} {np.dtype(dtype).name}", rows)


@pytest.mark.parametrize("overrides", [
    {"n_layers": 1},
    {"n_layers": 1, "n_channels": 3, "patch_size": 2, "image_size": 4, "n_heads": 2, "d_model": 8, "d_ff": 8},
    # HF ViTModel without q/k/v biases: the pooler path (and the encode backward)
    {"n_layers": 1, "classifier": False, "pooler": True, "qkv_bias": False},
])
def test_whole_model_backward_matches_finite_differences(overrides):
    data = vit_case(np.random.default_rng(0), np.float64, "vit-tiny", **overrides)
    report = gradcheck_case(data, seed=1)
    assert report.ok, str(report)
    names = {r.name for r in report.rows}
    assert "inputs/pixel_values" in names
    if overrides.get("pooler"):
        assert {"params/pooler/kernel", "params/pooler/bias"} <= names


def test_options_shape_the_tree_and_unread_leaves_get_zero_gradients():
    """qkv_bias / pooler / classifier add or drop exactly their leaves; the logits do not read the
    pooler and the base outputs do not read the head (HF reads h[:, 0] for both), so each gets
    an exact zero gradient; a head-less model refuses ``forward`` and names the way out."""
    config = dataclasses.replace(preset("vit-tiny"), dtype="float64", n_layers=1)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 1, 8, 8))
    both = dataclasses.replace(config, pooler=True, qkv_bias=False)
    params = rvit.init(both, rng)
    assert "bias" not in params["layers"]["attn"]["query"] and "bias" in params["layers"]["attn"]["out"]
    assert {"pooler", "head"} <= params.keys()
    logits, cache = rvit.forward_with_cache(params, {"pixel_values": px}, both)
    grads = rvit.backward(params, cache, np.ones_like(logits), both)
    np.testing.assert_array_equal(grads["pooler"]["kernel"], 0.0)
    (h, pooled), cache = rvit.encode_with_cache(params, {"pixel_values": px}, both)
    grads = rvit.encode_backward(params, cache, (None, np.ones_like(pooled)), both)
    np.testing.assert_array_equal(grads["head"]["kernel"], 0.0)
    assert np.abs(grads["pooler"]["kernel"]).max() > 0
    np.testing.assert_array_equal(rvit.hidden_states(params, {"pixel_values": px}, both), h)
    np.testing.assert_array_equal(rvit.pooler_output(params, h), pooled)
    # a zero-bias reference equals the bias-free model (qkv_bias=False is "no bias", not another model)
    with_bias = dataclasses.replace(both, qkv_bias=True)
    p_bias = {**params, "layers": {**params["layers"], "attn": {
        n: {**v, "bias": np.zeros(v["kernel"].shape[1:])} if n != "out" else v
        for n, v in params["layers"]["attn"].items()}}}
    np.testing.assert_array_equal(rvit.hidden_states(p_bias, {"pixel_values": px}, with_bias), h)

    base = dataclasses.replace(config, classifier=False, pooler=True)
    p_base = rvit.init(base, rng)
    assert "head" not in p_base
    for impl, tree in (("reference", p_base), ("jax", to_jax(p_base))):
        mod = rvit if impl == "reference" else jvit
        with pytest.raises(ValueError, match="no classification head .* use hidden_states"):
            mod.forward(tree, {"pixel_values": px}, base)
        with pytest.raises(ValueError, match=r"missing \['pooler'\]"):
            mod.hidden_states({k: v for k, v in tree.items() if k != "pooler"}, {"pixel_values": px}, base)
    with pytest.raises(ValueError, match="no classification head"):
        rvit.loss_and_grad(p_base, {"pixel_values": px, "labels": np.array([0, 1])}, base)
    with pytest.raises(ValueError, match=r"unexpected \['head'\]"):
        rvit.hidden_states(params, {"pixel_values": px}, dataclasses.replace(both, classifier=False))
    with pytest.raises(ValueError, match="params have no pooler"):
        rvit.pooler_output(rvit.init(config, rng), h)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loss_and_grad_agree_and_five_adamw_steps_stay_together(dtype):
    import optax

    config = dataclasses.replace(preset("vit-tiny"), dtype=np.dtype(dtype).name)
    rng = np.random.default_rng(3)
    params = rvit.init(config, rng)
    batch = {"pixel_values": rng.standard_normal((3, 1, 8, 8)).astype(dtype), "labels": np.array([0, 9, 4])}
    tol = tolerance_for(MODEL_PARITY, dtype)
    traj_tol = tolerance_for(TRAJECTORY_PARITY, dtype)

    ref_opt = roptim.adamw(1e-2, weight_decay=0.1, mask=roptim.decay_mask)
    jax_opt = optax.adamw(1e-2, weight_decay=0.1, mask=roptim.decay_mask(params))
    r_params, j_params = params, to_jax(params)
    r_state, j_state = ref_opt.init(r_params), jax_opt.init(j_params)

    @jax.jit  # one compile instead of one per optax primitive and leaf shape
    def jax_step(grads, state, params):
        updates, state = jax_opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(5):
        r_loss, r_grads = rvit.loss_and_grad(r_params, batch, config)
        j_loss, j_grads = jvit.loss_and_grad(j_params, to_jax(batch), config)
        assert np.asarray(r_loss).dtype == dtype and np.asarray(j_loss).dtype == dtype
        _, rel = normwise_error(np.asarray(j_loss), np.asarray(r_loss))
        assert rel <= tol.rel, f"step {step} loss {float(j_loss)} vs {float(r_loss)}"
        r_upd, r_state = ref_opt.update(r_grads, r_state, r_params)
        r_params = roptim.apply_updates(r_params, r_upd)
        j_params, j_state = jax_step(j_grads, j_state, j_params)
        want = dict(tree_leaves_with_path(r_params))
        for path, leaf in tree_leaves_with_path(to_numpy(j_params)):
            max_abs, rel = normwise_error(leaf, want[path])
            assert traj_tol.passes(max_abs, rel), f"step {step} {path}: rel {rel:.2e} max abs {max_abs:.2e}"
    assert float(r_loss) < np.log(config.num_labels)  # five steps on three images do learn


def conv2d_patches(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, p: int) -> np.ndarray:
    """HF's patch embedding written out: Conv2d(C, D, kernel_size=p, stride=p) followed by
    ``.flatten(2).transpose(1, 2)``, by explicit loops over output positions and kernel taps.

    x (B, C, H, W), weight (D, C, p, p), bias (D,) -> (B, (H/p) (W/p), D).
    """
    B, C, H, W = x.shape
    D = weight.shape[0]
    out = np.zeros((B, D, H // p, W // p), x.dtype)
    for i in range(H // p):
        for j in range(W // p):
            out[:, :, i, j] = bias
            for c in range(C):
                for u in range(p):
                    for v in range(p):
                        out[:, :, i, j] += x[:, c, i * p + u, j * p + v][:, None] * weight[None, :, c, u, v]
    return out.reshape(B, D, -1).transpose(0, 2, 1)  # flatten(2).transpose(1, 2): patch-row-major


@given(p=st.sampled_from([1, 2, 3]), grid_h=st.integers(1, 3), grid_w=st.integers(1, 3),
       channels=st.sampled_from([1, 3]), d=st.integers(1, 5), seed=st.integers(0, 50))
def test_patch_embedding_equals_a_stride_p_convolution(p, grid_h, grid_w, channels, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, channels, grid_h * p, grid_w * p))
    weight = rng.standard_normal((d, channels, p, p))  # HF Conv2d layout (D, C, p, p)
    bias = rng.standard_normal(d)
    want = conv2d_patches(x, weight, bias, p)
    kernel = rvit.from_conv_kernel(weight)
    assert kernel.shape == (channels * p * p, d)
    np.testing.assert_array_equal(rvit.to_conv_kernel(kernel, channels, p), weight)
    params = {"kernel": kernel, "bias": bias}
    tol = tolerance_for(LAYER_PARITY, np.float64)

    got, cache = rvit.patch_embed_forward(params, x, p)
    assert got.shape == want.shape
    assert normwise_error(got, want)[1] <= tol.rel
    got_jax = np.asarray(jvit.patch_embed(to_jax(params), jnp.asarray(x), p))
    assert normwise_error(got_jax, want)[1] <= tol.rel
    # patchify is a permutation (so its adjoint is its inverse): unpatchify inverts it exactly.
    np.testing.assert_array_equal(rvit.unpatchify(rvit.patchify(x, p), x.shape, p), x)
    np.testing.assert_array_equal(np.asarray(jvit.patchify(x, p)), rvit.patchify(x, p))
    # d pixels of sum(y * dy) equals the convolution's adjoint, also written out by loops.
    dy = rng.standard_normal(got.shape)
    dx, _ = rvit.patch_embed_backward(params, cache, dy)
    dx_loops = np.zeros_like(x)
    dy_grid = dy.transpose(0, 2, 1).reshape(2, d, grid_h, grid_w)
    for i in range(grid_h):
        for j in range(grid_w):
            window = np.einsum("bd,dcuv->bcuv", dy_grid[:, :, i, j], weight)  # (B, C, p, p)
            dx_loops[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = window
    assert normwise_error(dx, dx_loops)[1] <= tol.rel


def test_class_token_sits_first_and_the_head_reads_only_it():
    """Moving the class token moves the logits; the patches reach them only through attention
    (with the attention output zeroed, the logits do not depend on the image at all)."""
    config = dataclasses.replace(preset("vit-tiny"), dtype="float64")
    rng = np.random.default_rng(0)
    params = rvit.init(config, rng)
    px = rng.standard_normal((2, 1, 8, 8))
    base = rvit.forward(params, {"pixel_values": px}, config)
    # (a random shift: a constant one would be removed by the first LayerNorm)
    params["cls_token"] = params["cls_token"] + rng.standard_normal(config.d_model)
    assert not np.allclose(rvit.forward(params, {"pixel_values": px}, config), base)
    # (a zero-layer model said the same, but configs now refuse n_layers=0)
    flat = dataclasses.replace(config, n_layers=1)
    p0 = rvit.init(flat, rng)
    p0["layers"]["attn"]["out"] = tree_map(np.zeros_like, p0["layers"]["attn"]["out"])
    a = rvit.forward(p0, {"pixel_values": px}, flat)
    np.testing.assert_allclose(a[0], a[1], rtol=1e-12, atol=1e-12)  # (BLAS may round rows differently)


@pytest.mark.parametrize("overrides", [{}, {"n_channels": 3, "patch_size": 2, "n_layers": 1}])
def test_param_count_equals_built_tree(overrides):
    config = preset("vit-tiny", **overrides)
    r_params = rvit.init(config, np.random.default_rng(0))
    # The JAX tree is built for real once (random draws compile per leaf shape, seconds each
    # config); the other config is built abstractly, which runs the same code without the draws.
    j_params = jvit.init(config, 0) if not overrides else jax.eval_shape(lambda: jvit.init(config, 0))
    shapes = dict(tree_leaves_with_path(param_shapes(config)))
    for tree in (j_params, r_params):
        assert tree_size(tree) == param_count(config)
        leaves = dict(tree_leaves_with_path(tree))
        assert leaves.keys() == shapes.keys()
        for path, leaf in leaves.items():
            assert leaf.shape == shapes[path], path
            assert str(leaf.dtype) == config.dtype, f"{path}: {leaf.dtype}"


def test_flax_module_builds_the_reference_tree_and_matches_forward():
    config = dataclasses.replace(preset("vit-tiny"), dtype="float64", n_layers=1)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 1, 8, 8))
    model = jvit.ViT(config)
    # "rbg" keys: XLA's bit generator compiles in a fraction of threefry's time; same init rules.
    variables = jax.jit(lambda key: model.init(key, method=jvit.ViT.params))(jax.random.key(0, impl="rbg"))
    leaves = dict(tree_leaves_with_path(to_numpy(variables["params"])))
    assert {k: v.shape for k, v in leaves.items()} == dict(tree_leaves_with_path(param_shapes(config)))
    assert all(str(v.dtype) == "float64" for v in leaves.values())
    np.testing.assert_array_equal(leaves["final_norm/scale"], 1.0)
    np.testing.assert_array_equal(leaves["cls_token"], 0.0)
    np.testing.assert_array_equal(leaves["head/bias"], 0.0)
    assert 0.01 < leaves["head/kernel"].std() < 0.03  # N(0, 0.02)
    assert leaves["layers/mlp/down/kernel"].std() < 0.02  # residual-writing: 0.02 / sqrt(2 L)
    # apply on the reference's own tree equals the reference forward
    params = rvit.init(config, rng)
    got = np.asarray(jax.jit(model.apply)({"params": to_jax(params)}, px))
    want = rvit.forward(params, {"pixel_values": px}, config)
    max_abs, rel = normwise_error(got, want)
    assert tolerance_for(MODEL_PARITY, np.float64).passes(max_abs, rel), (max_abs, rel)


def test_flax_module_without_head_returns_hf_vitmodel_outputs():
    """classifier=False, pooler=True, qkv_bias=False (HF ViTModel of a bias-free checkpoint):
    ``init`` builds exactly that tree and ``apply`` gives (last_hidden_state, pooler_output)."""
    config = dataclasses.replace(preset("vit-tiny"), dtype="float64", n_layers=1, classifier=False,
                                 pooler=True, qkv_bias=False)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 1, 8, 8))
    model = jvit.ViT(config)
    variables = jax.jit(lambda key: model.init(key, method=jvit.ViT.params))(jax.random.key(0, impl="rbg"))
    leaves = dict(tree_leaves_with_path(to_numpy(variables["params"])))
    assert {k: v.shape for k, v in leaves.items()} == dict(tree_leaves_with_path(param_shapes(config)))
    assert "pooler/kernel" in leaves and not any(k.startswith("head/") for k in leaves)
    params = rvit.init(config, rng)
    h, pooled = jax.jit(model.apply)({"params": to_jax(params)}, px)
    (want_h, want_pooled), _ = rvit.encode_with_cache(params, {"pixel_values": px}, config)
    tol = tolerance_for(MODEL_PARITY, np.float64)
    for got, want in ((h, want_h), (pooled, want_pooled)):
        assert tol.passes(*normwise_error(np.asarray(got), want))
    assert h.shape == (2, config.max_len, config.d_model) and pooled.shape == (2, config.d_model)


@pytest.mark.parametrize("impl", ["reference", "jax"])
def test_bad_batches_raise_clear_errors(impl):
    config = preset("vit-tiny")  # 8x8 single-channel images, 4x4 patches, 10 classes, float32
    if impl == "reference":
        params = rvit.init(config, np.random.default_rng(0))
        run = lambda b: rvit.forward(params, b, config)  # noqa: E731
        step = lambda b: rvit.loss_and_grad(params, b, config)  # noqa: E731
    else:
        params = jvit.init(config, 0)
        run = lambda b: jvit.forward(params, b, config)  # noqa: E731
        step = lambda b: jvit.loss_and_grad(params, b, config)  # noqa: E731
    img = lambda *shape, dtype=np.float32: np.zeros(shape, dtype)  # noqa: E731
    with pytest.raises(ValueError, match=r"missing \['pixel_values'\]"):
        run({"images": img(1, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, C, H, W\), got \(1, 8, 8\)"):
        run({"pixel_values": img(1, 8, 8)})
    with pytest.raises(ValueError, match="3 channels but the config expects n_channels=1"):
        run({"pixel_values": img(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="image size 10x10 is not divisible by patch_size 4"):
        run({"pixel_values": img(1, 1, 10, 10)})
    with pytest.raises(ValueError, match="image size 12x12 differs from config.image_size 8x8"):
        run({"pixel_values": img(1, 1, 12, 12)})
    with pytest.raises(ValueError, match="image size 8x12 differs from config.image_size 8x8"):
        run({"pixel_values": img(1, 1, 8, 12)})
    with pytest.raises(ValueError, match="pixel_values must be a floating-point array, got dtype uint8"):
        run({"pixel_values": img(1, 1, 8, 8, dtype=np.uint8)})
    with pytest.raises(ValueError, match="pixel_values has dtype float64 but the parameters are float32"):
        run({"pixel_values": img(1, 1, 8, 8, dtype=np.float64)})
    good = img(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"missing \['labels'\]"):
        step({"pixel_values": good})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) or equal ignore_index \(-100\), found label 10"):
        step({"pixel_values": good, "labels": np.array([3, 10])})
    with pytest.raises(ValueError, match=r"or equal ignore_index \(-100\), found label -5"):
        step({"pixel_values": good, "labels": np.array([-5, 1])})
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        step({"pixel_values": good, "labels": np.array([[1], [2]])})
    with pytest.raises(ValueError, match="labels must be an integer array"):
        step({"pixel_values": good, "labels": np.array([1.0, 2.0])})
