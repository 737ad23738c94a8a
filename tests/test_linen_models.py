"""The linen model modules declare exactly the reference trees and run the pure forwards."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bigmodel_jax.models import bert as jbert
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.models import seq2seq as js2s
from bigmodel_jax.models.linen import GPT, Bert, Seq2Seq
from bigmodel_jax.tree import to_numpy
from reference_numpy.configs import param_shapes, preset
from reference_numpy.models import bert as rbert
from reference_numpy.tree import tree_leaves_with_path


def _shapes(tree):
    return {p: tuple(a.shape) for p, a in tree_leaves_with_path(to_numpy(tree))}


def _want(shapes):
    return dict(tree_leaves_with_path(shapes))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_gpt_module(name):
    config = preset(name)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 5))
    model = GPT(config)
    variables = model.init(jax.random.key(0), ids)
    params = variables["params"]
    assert _shapes(params) == _want(param_shapes(config))
    assert all(a.dtype == np.float32 for _, a in tree_leaves_with_path(to_numpy(params)))
    np.testing.assert_array_equal(model.apply(variables, ids), jgpt.forward(to_numpy(params), {"input_ids": ids}, config))


@pytest.mark.parametrize("head", ["mlm", "sequence_classification"])
def test_bert_module(head):
    config = preset("bert-tiny")
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 5))
    model = Bert(config, head)
    variables = model.init(jax.random.key(0), method=Bert.params)
    assert _shapes(variables["params"]) == _want(rbert.param_shapes(config, head))
    got = model.apply(variables, ids)
    np.testing.assert_array_equal(got, jbert.forward(to_numpy(variables["params"]), {"input_ids": ids}, config, head))


@pytest.mark.slow
def test_seq2seq_module():
    config = preset("seq2seq-tiny")
    rng = np.random.default_rng(2)
    src, tgt = rng.integers(0, config.vocab_size, (2, 6)), rng.integers(0, config.vocab_size, (2, 4))
    model = Seq2Seq(config)
    variables = model.init(jax.random.key(0), src, tgt)
    assert _shapes(variables["params"]) == _want(param_shapes(config))
    want = js2s.forward(to_numpy(variables["params"]), {"input_ids": src, "decoder_input_ids": tgt}, config)
    np.testing.assert_array_equal(model.apply(variables, src, tgt), want)


def _family_calls():
    """(module, positional inputs, pure forward with a dropout key) per family, dropout 0.1."""
    import dataclasses

    from bigmodel_jax.models import vit as jvit
    from bigmodel_jax.models.vit import ViT

    rng = np.random.default_rng(3)
    gpt = dataclasses.replace(preset("gpt2-tiny"), dropout=0.1)
    bert = dataclasses.replace(preset("bert-tiny"), dropout=0.1)
    s2s = dataclasses.replace(preset("seq2seq-tiny"), dropout=0.1)
    vit = dataclasses.replace(preset("vit-tiny"), dropout=0.1)
    ids = rng.integers(0, 100, (2, 6))
    px = rng.standard_normal((2, vit.n_channels, vit.image_size, vit.image_size)).astype(np.float32)
    return [
        (GPT(gpt), (ids,), lambda p, k: jgpt.forward(p, {"input_ids": ids}, gpt, dropout_key=k)),
        (Bert(bert), (ids,), lambda p, k: jbert.forward(p, {"input_ids": ids}, bert, "mlm", dropout_key=k)),
        (Seq2Seq(s2s), (ids, ids[:, :4]), lambda p, k: js2s.forward(
            p, {"input_ids": ids, "decoder_input_ids": ids[:, :4]}, s2s, dropout_key=k)),
        (ViT(vit), (px,), lambda p, k: jvit.forward(p, {"pixel_values": px}, vit, dropout_key=k)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(4), ids=["gpt", "bert", "seq2seq", "vit"])
def test_modules_train_with_dropout(i):
    """``dropout_key=k`` is the pure forward's dropout; ``deterministic=False`` draws from the
    ``"dropout"`` RNG stream (same stream, same masks; another stream, other masks); the default
    is evaluation; training mode without a key or a stream is refused."""
    model, inputs, pure = _family_calls()[i]
    variables = model.init(jax.random.key(0), *inputs)
    params = to_numpy(variables["params"])
    k = jax.random.key(7)
    np.testing.assert_array_equal(model.apply(variables, *inputs, dropout_key=k), pure(params, k))
    evaluation = model.apply(variables, *inputs)
    np.testing.assert_array_equal(evaluation, pure(params, None))
    a = model.apply(variables, *inputs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, *inputs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = model.apply(variables, *inputs, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, evaluation)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, *inputs, deterministic=False)
