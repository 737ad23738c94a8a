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


def test_seq2seq_module():
    config = preset("seq2seq-tiny")
    rng = np.random.default_rng(2)
    src, tgt = rng.integers(0, config.vocab_size, (2, 6)), rng.integers(0, config.vocab_size, (2, 4))
    model = Seq2Seq(config)
    variables = model.init(jax.random.key(0), src, tgt)
    assert _shapes(variables["params"]) == _want(param_shapes(config))
    want = js2s.forward(to_numpy(variables["params"]), {"input_ids": src, "decoder_input_ids": tgt}, config)
    np.testing.assert_array_equal(model.apply(variables, src, tgt), want)
