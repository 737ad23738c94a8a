"""Training-mode dropout in every model family (GPT, BERT, seq2seq, ViT), both implementations.

The JAX models draw their masks from ``dropout_key``; ``dropout_masks(config, key, ...)`` gives the
same tree, which (as NumPy arrays) drives the reference's hand-written backward. Checked here:

* same explicit masks: reference logits and every gradient leaf == JAX (``jax.vjp``, random
  cotangent), float64 normwise <= 1e-9; the training logits differ from the evaluation ones;
* ``loss_and_grad(dropout_key=key)`` (masks drawn inside, per layer inside the scan) == the
  reference ``loss_and_grad(masks=dropout_masks(key))``: so the in-scan draw is exactly the tree;
  the same key is bit-identical, another key or evaluation gives other gradients;
* the reference backward with masks against central finite differences (independent of JAX);
* evaluation unchanged: no key / masks ignores config.dropout, and rate 0 with a key or masks
  is bit-identical to that;
* each mask zeroes a fraction ~p (binomial bound), per layer and per site independently, for
  the JAX draw and the NumPy draw;
* the sites are HF's: GPT2LMHeadModel, BertForSequenceClassification, MarianMTModel and
  ViTForImageClassification in train mode, with our masks injected into every ``dropout`` call
  in call order (shapes checked, all consumed), give the reference's training logits;
* bad arguments raise clear errors naming the mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

from bigmodel_jax.models import bert as jbert
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.models import vit as jvit
from bigmodel_apps.parity.cases.bert import bert_batch, bert_labels, perturb_bert_params
from bigmodel_apps.parity.cases.seq2seq import perturb_params, seq2seq_batch
from bigmodel_apps.parity.cases.vit import image_batch, perturb_vit_params
from bigmodel_apps.parity.harness import CaseData, compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_jax, to_numpy
from reference_numpy.configs import preset
from reference_numpy.models import bert as rbert
from reference_numpy.models import gpt as rgpt
from reference_numpy.models import seq2seq as rs2s
from reference_numpy.models import vit as rvit
from reference_numpy.tolerances import MODEL_PARITY, normwise_error
from reference_numpy.tree import tree_leaves_with_path, tree_map

RATE = 0.3
TOL = MODEL_PARITY["float64"]


@dataclasses.dataclass
class Family:
    """One model family at one config, both sides behind one signature. ``masks`` is a NumPy
    tree for the reference and a JAX tree (or None) for JAX; ``dims`` are ``dropout_masks``'
    batch arguments after the key / rng."""

    name: str
    config: Any
    params: dict  # NumPy, float64
    batch: dict  # NumPy
    dims: tuple
    ref_forward: Callable[[dict, Any], tuple[Any, Any]]  # (params, masks) -> (y, cache)
    ref_backward: Callable[[dict, Any, Any], dict]  # (params, cache, dy) -> grads
    ref_loss_and_grad: Callable[[dict, Any], tuple[Any, dict]]  # (params, masks)
    jax_module: Any
    ref_module: Any
    head: tuple = ()  # BERT's head, passed after config

    def jax_forward(self, params: dict, *, dropout_key: Any = None, masks: Any = None) -> Any:
        return self.jax_module.forward(params, self.batch, self.config, *self.head, dropout_key=dropout_key,
                                       masks=masks)

    def jax_loss_and_grad(self, params: dict, key: Any) -> tuple[Any, dict]:
        return self.jax_module.loss_and_grad(to_jax(params), to_jax(self.batch), self.config, *self.head,
                                             dropout_key=key)

    def jax_masks(self, key: Any) -> dict:
        return self.jax_module.dropout_masks(self.config, key, *self.dims, *self.head)

    def ref_masks(self, rng: np.random.Generator) -> dict:
        return self.ref_module.dropout_masks(self.config, rng, *self.dims, *self.head)


def make_family(name: str, rate: float = RATE, *, seed: int = 0, **overrides: Any) -> Family:
    """A tiny float64 model with random inputs (and, for gradient checks, perturbed parameters
    so that every path carries a signal above the finite-difference noise floor)."""
    rng = np.random.default_rng(seed)
    if name == "gpt":
        config = preset(overrides.pop("preset", "gpt2-tiny"), dropout=rate, dtype="float64", **overrides)
        params = rgpt.init(config, rng)
        batch = {"input_ids": rng.integers(0, config.vocab_size, (2, 5)),
                 "attention_mask": np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}  # left padding
        return Family(
            name, config, params, batch, (2, 5),
            lambda p, m: rgpt.forward_with_cache(p, batch, config, masks=m),
            lambda p, c, dy: rgpt.backward(p, c, dy, config),
            lambda p, m: rgpt.loss_and_grad(p, batch, config, masks=m),
            jgpt, rgpt,
        )
    if name.startswith("bert"):
        head = name.split(":")[1] if ":" in name else "sequence_classification"
        config = preset("bert-tiny", dropout=rate, dtype="float64", **overrides)
        params = perturb_bert_params(rbert.init(config, rng, head), rng, config.d_model)
        batch = bert_labels(rng, config, bert_batch(rng, config, 2, 5, pad=True), head)
        return Family(
            name, config, params, batch, (2, 5),
            lambda p, m: rbert.forward_with_cache(p, batch, config, head, masks=m),
            lambda p, c, dy: rbert.backward(p, c, dy, config, head),
            lambda p, m: rbert.loss_and_grad(p, batch, config, head, masks=m),
            jbert, rbert, head=(head,),
        )
    if name == "seq2seq":
        config = preset("seq2seq-tiny", dropout=rate, dtype="float64", **overrides)
        params = perturb_params(rs2s.init(config, rng), rng)
        batch = seq2seq_batch(rng, config, 2, 4, 5, pad=True, decoder_pad=True)
        return Family(
            name, config, params, batch, (2, 4, 5),
            lambda p, m: rs2s.forward_with_cache(p, batch, config, masks=m),
            lambda p, c, dy: rs2s.backward(p, c, dy, config),
            lambda p, m: rs2s.loss_and_grad(p, batch, config, masks=m),
            js2s, rs2s,
        )
    if name == "vit":
        config = preset("vit-tiny", dropout=rate, dtype="float64", **overrides)
        params = perturb_vit_params(rvit.init(config, rng), rng)
        batch = {"pixel_values": image_batch(rng, config, 2, np.float64),
                 "labels": rng.integers(0, config.num_labels, (2,))}
        return Family(
            name, config, params, batch, (2,),
            lambda p, m: rvit.forward_with_cache(p, batch, config, masks=m),
            lambda p, c, dy: rvit.backward(p, c, dy, config),
            lambda p, m: rvit.loss_and_grad(p, batch, config, masks=m),
            jvit, rvit,
        )
    raise ValueError(name)


FAMILIES = ["gpt", "bert", "seq2seq", "vit"]


def _np(tree: Any) -> Any:
    return tree_map(np.asarray, tree)


# --------------------------------------------------------------------------------------------
# parity: same masks on both sides


# Each case compiles a JAX forward + vjp (~5-10 s on 2 busy cores), so one config per family:
# GPT-2 (learned positions, left padding); BERT's token-classification head (dropout on the
# hidden states before the classifier; the sequence head's dropout on the pooled output is in
# the loss_and_grad test below); seq2seq post-norm with shared embeddings and padded source and
# target; ViT with the classifier. Llama's RoPE / GQA path is in the finite-difference test.
PARITY = ["gpt", "bert:token_classification", "seq2seq", "vit"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY)
def test_same_masks_reference_matches_jax_logits_and_every_gradient(name):
    """Explicit masks on both sides (the NumPy draw here: the JAX draw is matched to the reference
    in the loss_and_grad test); a random cotangent on the logits."""
    fam = make_family(name)
    masks_np = fam.ref_masks(np.random.default_rng(7))
    masks = to_jax(masks_np)
    data = CaseData(
        params=fam.params, inputs={},
        ref_forward=lambda p, i: fam.ref_forward(p, masks_np),
        ref_backward=lambda p, c, dy: ({}, fam.ref_backward(p, c, dy)),
        jax_forward=lambda p, i: fam.jax_forward(p, masks=masks),
        tolerances=MODEL_PARITY,
    )
    rows = compare(data, np.float64, seed=1)
    assert len(rows) > 10
    train, evaluation = fam.ref_forward(fam.params, masks_np)[0], fam.ref_forward(fam.params, None)[0]
    assert np.abs(train - evaluation).max() > 1e-3  # dropout is really on
    assert all(r.passed for r in rows), format_rows(f"{name} dropout={RATE}", rows)


def _flat(loss: Any, grads: dict) -> dict[str, np.ndarray]:
    return {"loss": np.asarray(loss), **{f"d/{p}": np.asarray(g) for p, g in tree_leaves_with_path(to_numpy(grads))}}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_loss_and_grad_with_key_matches_reference_and_is_deterministic(name):
    """JAX draws its masks inside (per-layer keys scanned with the layers); the reference gets
    ``dropout_masks(key)``: equal loss and gradients prove the two draws are the same masks.
    The same key gives bit-identical results; another key, or evaluation, different ones."""
    fam = make_family(name)
    key = jax.random.key(11)
    want = _flat(*fam.ref_loss_and_grad(fam.params, _np(fam.jax_masks(key))))
    got = _flat(*fam.jax_loss_and_grad(fam.params, key))
    assert got.keys() == want.keys()
    errors = {q: normwise_error(got[q], want[q]) for q in sorted(want)}
    bad = {q: e for q, e in errors.items() if not TOL.passes(*e)}
    assert not bad, "\n".join(f"{q:<40} max abs {a:.2e} rel {r:.2e}" for q, (a, r) in bad.items())

    again = _flat(*fam.jax_loss_and_grad(fam.params, jax.random.key(11)))
    for q in got:
        np.testing.assert_array_equal(again[q], got[q], err_msg=q)

    def moved(other: dict) -> float:  # the largest normwise change over loss and gradients
        return max(normwise_error(other[q], got[q])[1] for q in got)

    assert moved(_flat(*fam.jax_loss_and_grad(fam.params, jax.random.key(12)))) > 1e-2
    assert moved(_flat(*fam.ref_loss_and_grad(fam.params, None))) > 1e-2  # evaluation


# --------------------------------------------------------------------------------------------
# the reference backward alone, against finite differences


@pytest.mark.parametrize(("name", "overrides"), [
    ("gpt", {"n_layers": 1}),
    ("gpt", {"preset": "llama-tiny", "n_layers": 1}),
    ("bert:sequence_classification", {"n_layers": 1, "d_model": 16, "d_ff": 32, "vocab_size": 23}),
    ("bert:token_classification", {"n_layers": 1, "d_model": 16, "d_ff": 32, "vocab_size": 23}),
    ("seq2seq", {"n_layers": 1, "n_decoder_layers": 1, "d_model": 16, "d_ff": 24, "vocab_size": 29}),
    ("vit", {"n_layers": 1}),
])
def test_reference_backward_with_masks_matches_finite_differences(name, overrides):
    fam = make_family(name, **overrides)
    masks = fam.ref_masks(np.random.default_rng(5))  # the NumPy side's own draw
    assert any(not m.all() for _, m in tree_leaves_with_path(masks))
    data = CaseData(
        params=fam.params, inputs={},
        ref_forward=lambda p, i: fam.ref_forward(p, masks),
        ref_backward=lambda p, c, dy: ({}, fam.ref_backward(p, c, dy)),
        jax_forward=None,
    )
    report = gradcheck_case(data, seed=2)
    assert report.ok, f"{name} {overrides}\n{report}"


# --------------------------------------------------------------------------------------------
# evaluation is unchanged


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_is_bit_identical_to_a_dropout_free_model(name):
    """No key / masks ignores config.dropout; with rate 0 a key or masks change nothing."""
    fam, free = make_family(name), make_family(name, rate=0.0)  # same seed: same params and batch
    masks_np = fam.ref_masks(np.random.default_rng(3))  # drawn at p = 0.3: has zeros
    # reference
    want = fam.ref_forward(fam.params, None)[0]
    np.testing.assert_array_equal(free.ref_forward(fam.params, None)[0], want)
    np.testing.assert_array_equal(free.ref_forward(fam.params, masks_np)[0], want)  # rate 0: masks ignored
    # JAX (eager, so both run the same op sequence): no key == a dropout-free config given a key
    p = to_jax(fam.params)
    got = np.asarray(fam.jax_forward(p))
    np.testing.assert_array_equal(np.asarray(free.jax_forward(p, dropout_key=jax.random.key(3))), got)
    assert normwise_error(got, want)[1] <= TOL.rel


# --------------------------------------------------------------------------------------------
# training mode: the masks, determinism


def _binomial_ok(mask: np.ndarray, p: float) -> bool:
    """The dropped fraction is within 5 standard deviations of p."""
    n = mask.size
    return abs((~mask).mean() - p) <= 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("name", FAMILIES)
def test_masks_drop_about_p_independently_per_layer_and_site(name):
    """Both draws: every leaf boolean of the documented shape, dropping ~p (5-sigma binomial
    bound, per leaf and over all leaves pooled); each layer and each site its own mask. The JAX
    tree is the one the loss_and_grad test drew (same shapes and rate: no new compile); the
    NumPy tree is drawn larger, so its per-leaf bound is tight."""
    small = make_family(name)
    big = make_family(name)
    big.dims = {"gpt": (8, 32), "bert": (64, 32), "seq2seq": (8, 24, 32), "vit": (64,)}[name]
    for fam, tree in ((small, _np(small.jax_masks(jax.random.key(11)))),
                      (big, big.ref_masks(np.random.default_rng(0)))):
        shapes = fam.ref_module.dropout_mask_shapes(fam.config, *fam.dims, *fam.head)
        leaves = dict(tree_leaves_with_path(tree))
        assert {p: m.shape for p, m in leaves.items()} == dict(tree_leaves_with_path(shapes))
        for path, m in leaves.items():
            assert m.dtype == bool, path
            assert _binomial_ok(m, RATE), f"{path}: dropped {(~m).mean():.4f}, want ~{RATE}"
            if "layers/" in path:  # each layer its own mask
                assert not np.array_equal(m[0], m[1]), path
        assert _binomial_ok(np.concatenate([m.ravel() for m in leaves.values()]), RATE)
        # two sites with the same shape get different masks (distinct key streams)
        outs = [m for p, m in leaves.items() if p.endswith("_out")]
        assert not np.array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# bad arguments


def test_bad_dropout_arguments_raise_clear_errors():
    fam = make_family("gpt")
    p = to_jax(fam.params)
    masks = to_jax(fam.ref_masks(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="not both"):
        fam.jax_forward(p, dropout_key=jax.random.key(0), masks=masks)
    with pytest.raises(ValueError, match="dropout_key must be"):
        fam.jax_forward(p, dropout_key=np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="dropout_key must be"):
        fam.jax_forward(p, dropout_key=0)
    wrong = rgpt.dropout_masks(fam.config, np.random.default_rng(0), 2, 4)  # T = 4, batch has 5
    for run in (lambda m: fam.jax_forward(p, masks=m), lambda m: fam.ref_forward(fam.params, _np(m))):
        with pytest.raises(ValueError, match=r"masks/embed must have shape \(2, 5, 32\), got \(2, 4, 32\)"):
            run(wrong)
        with pytest.raises(ValueError, match=r"masks must have the keys \['embed', 'layers'\]"):
            run({"embed": masks["embed"]})
        with pytest.raises(ValueError, match="masks/layers/mlp_out must be a boolean array"):
            run({**masks, "layers": {**masks["layers"], "mlp_out": masks["layers"]["mlp_out"].astype(np.float64)}})
    s2s = make_family("seq2seq")
    m = s2s.ref_masks(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"masks/decoder/layers/cross_probs must have shape \(2, 2, 4, 5, 4\)"):
        s2s.ref_forward(s2s.params, {**m, "decoder": {**m["decoder"], "layers": {
            **m["decoder"]["layers"], "cross_probs": m["decoder"]["layers"]["cross_probs"][..., :3]}}})


# --------------------------------------------------------------------------------------------
# the sites are HF's: HF in train mode with our masks injected == the reference with them


def _hf_model(family: str, p: float) -> tuple[Any, str]:
    """A tiny random HF model (float64, eager attention, so the attention-prob dropout is a
    ``dropout`` call) with every dropout we model at ``p`` and the others at 0; and its class name."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    eager = {"attn_implementation": "eager"}
    if family == "gpt":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=16, resid_pdrop=p,
                            embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0, **eager)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=16, num_labels=3,
                            hidden_dropout_prob=p, attention_probs_dropout_prob=p, **eager)
        model = tf.BertForSequenceClassification(cfg)
    elif family == "seq2seq":
        cfg = tf.MarianConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                              decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=58,
                              decoder_start_token_id=58, eos_token_id=0, dropout=p, attention_dropout=p,
                              activation_dropout=0.0, **eager)
        model = tf.MarianMTModel(cfg)
    else:  # HF ViT's attention-prob dropout is a separate field, which we do not model: 0
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=8, patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=p,
                           attention_probs_dropout_prob=0.0, **eager)
        model = tf.ViTForImageClassification(cfg)
    with torch.no_grad():  # every tensor off its init value, attention far from uniform
        for name, w in model.named_parameters():
            if "embed_positions" not in name:  # Marian's fixed sinusoid table
                w.add_(0.15 * torch.randn_like(w))
    return model, type(model).__name__


def _hf_call_order(family: str, masks: dict, n_layers: int) -> list[np.ndarray]:
    """Our masks in the order HF's forward calls ``dropout`` (encoder before decoder; inside a
    layer: self-attention probs, its output, [cross probs, cross output], MLP output)."""
    def stack(tree: dict, names: tuple[str, ...]) -> list[np.ndarray]:
        return [tree["embed"]] + [tree["layers"][n][i] for i in range(n_layers) for n in names]

    self_names = ("attn_probs", "attn_out", "mlp_out")
    if family == "gpt":
        return stack(masks, self_names)
    if family == "bert":
        return stack(masks, self_names) + [masks["classifier"]]
    if family == "seq2seq":
        return (stack(masks["encoder"], self_names)
                + stack(masks["decoder"], ("attn_probs", "attn_out", "cross_probs", "cross_out", "mlp_out")))
    return stack(masks, ("attn_out", "mlp_out"))


# Both sides in float64, but HF keeps two float32 pieces: ViT's eager attention takes its softmax
# in float32, and Marian's sinusoid table is built in float32 (a frozen parameter). Either gives
# a normwise error ~1e-8 in evaluation mode already (measured: ViT 4.6e-8, Marian 1.8e-8; GPT-2
# and BERT ~1e-15). 1e-6 is float32 rounding with margin; a mask at the wrong site, in the wrong
# order or scaled wrongly moves the logits by > 1e-2.
HF_TRAIN_REL = 1e-6


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.hf
def test_dropout_sites_match_hf_in_train_mode(name, tmp_path, monkeypatch):
    """Every ``dropout`` call with p > 0 in HF's train-mode forward takes the next of our masks
    (shape checked): equal outputs mean our sites, order and scaling are HF's."""
    import torch

    from bigmodel_port.hf.checkpoint import load_pretrained

    model, arch = _hf_model(name, RATE)
    model.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path, dtype="float64")
    config, params = pre.config, pre.params
    assert config.dropout == RATE
    rng = np.random.default_rng(4)
    B, S, T = 2, 5, 4
    if name == "vit":
        batch = {"pixel_values": rng.standard_normal((B, 3, 8, 8))}
        masks = rvit.dropout_masks(config, rng, B)
        ref = rvit.forward(params, batch, config, masks=masks)
    elif name == "gpt":
        batch = {"input_ids": rng.integers(0, config.vocab_size, (B, T))}
        masks = rgpt.dropout_masks(config, rng, B, T)
        ref = rgpt.forward(params, batch, config, masks=masks)
    elif name == "bert":
        batch = {"input_ids": rng.integers(0, config.vocab_size, (B, T)),
                 "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]])}
        masks = rbert.dropout_masks(config, rng, B, T, pre.task)
        ref = rbert.forward(params, batch, config, pre.task, masks=masks)
    else:
        batch = {"input_ids": rng.integers(1, 58, (B, S)), "attention_mask": np.array([[1] * S, [1, 1, 1, 0, 0]]),
                 "decoder_input_ids": rng.integers(0, 60, (B, T))}
        masks = rs2s.dropout_masks(config, rng, B, S, T)
        ref = rs2s.forward(params, batch, config, masks=masks)

    queue = _hf_call_order(name, masks, config.n_layers)
    real_dropout = torch.nn.functional.dropout

    def injected(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return real_dropout(x, p, training, inplace)
        assert p == RATE
        mask = queue.pop(0)
        assert tuple(x.shape) == mask.shape, f"HF dropout on {tuple(x.shape)}, our next mask is {mask.shape}"
        return x * torch.from_numpy(mask).to(x.dtype) / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", injected)
    model.double().train()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}).logits.numpy()
    assert not queue, f"{len(queue)} of our masks were not used by HF"
    max_abs, rel = normwise_error(out, ref)
    print(f"{arch}: max|logits| {np.abs(ref).max():.3g}, vs reference max abs {max_abs:.2e} rel {rel:.2e}")
    assert rel <= HF_TRAIN_REL, f"{arch} train-mode logits: rel {rel:.2e}"
