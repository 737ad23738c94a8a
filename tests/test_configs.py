"""Configs: presets exist, counts are analytic and close to the published figures."""

from __future__ import annotations

import dataclasses
import time

import pytest

from reference_numpy.configs import PRESETS, PUBLISHED_COUNTS, GPTConfig, param_count, param_shapes, preset

_COUNT_CASES = [
    pytest.param(
        name, pub,
        marks=pytest.mark.xfail(strict=True, reason="paper's 65M vs 63.08M from its own stated sizes (-2.95%)"),
    ) if name == "transformer-base" else pytest.param(name, pub)
    for name, pub in sorted(PUBLISHED_COUNTS.items())
]


@pytest.mark.parametrize(("name", "published"), _COUNT_CASES)
def test_param_count_within_2_percent_of_published(name, published):
    count = param_count(preset(name))
    assert abs(count - published) / published <= 0.02, f"{name}: {count:,} vs {published:,.0f}"


def test_exact_known_counts():
    # Independent figures: HF's BertModel (with pooler) and GPT2LMHeadModel parameter counts.
    assert param_count(preset("bert-base")) == 109_482_240
    assert param_count(preset("gpt2")) == 124_439_808


def test_count_is_instant_for_7b():
    t0 = time.perf_counter()
    n = param_count(preset("llama-2-7b"))
    assert time.perf_counter() - t0 < 0.05
    assert n == 6_738_415_616  # Llama-2-7B as released


def test_every_family_has_tiny_and_published_presets():
    names = set(PRESETS)
    for required in ["bert-base", "bert-large", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
                     "llama-3.2-1b", "llama-2-7b", "transformer-base", "transformer-big",
                     "vit-base-16", "vit-large-16", "bert-tiny", "gpt2-tiny", "llama-tiny",
                     "seq2seq-tiny", "vit-tiny"]:
        assert required in names


def test_common_field_names_are_shared():
    for cfg in PRESETS.values():
        for field in ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_len", "dropout", "dtype"]:
            assert hasattr(cfg, field), (type(cfg).__name__, field)


def test_layers_are_stacked_on_a_leading_axis():
    cfg = preset("llama-tiny")
    shapes = param_shapes(cfg)
    assert shapes["layers"]["attn"]["query"]["kernel"] == (2, 32, 4, 8)
    assert shapes["layers"]["attn"]["key"]["kernel"] == (2, 32, 2, 8)  # GQA: K = 2
    assert "lm_head" in shapes and "position" not in shapes


def test_variants_by_replace_and_unknown_preset():
    cfg = dataclasses.replace(preset("gpt2-tiny"), n_layers=5)
    assert isinstance(cfg, GPTConfig) and cfg.n_layers == 5
    assert preset("gpt2-tiny", n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        preset("gpt3")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_parameter_has_logical_axis_names_of_its_rank(name):
    from reference_numpy.configs import param_axes
    from reference_numpy.tree import tree_leaves_with_path

    shapes = dict(tree_leaves_with_path(param_shapes(preset(name))))
    axes = dict(tree_leaves_with_path(param_axes(preset(name))))
    assert shapes.keys() == axes.keys()
    for path, names in axes.items():
        assert len(names) == len(shapes[path]), path
        assert ("layers" in names) == path.startswith(("layers/", "encoder/layers/", "decoder/layers/"))
    if name == "llama-tiny":
        assert axes["layers/attn/key/kernel"] == ("layers", "embed", "kv_heads", "head_dim")
        assert axes["lm_head/kernel"] == ("embed", "vocab")
