"""BERT, every head: reference (hand-written backward) vs JAX, finite differences, AdamW steps,
parameter counts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmodel_jax.models import bert as jbert
from bigmodel_apps.parity.cases.bert import bert_batch, bert_case, bert_labels, bert_trajectory
from bigmodel_apps.parity.harness import adamw_trajectory, compare, format_rows, gradcheck_case
from bigmodel_jax.tree import to_numpy
from reference_numpy import configs
from reference_numpy.configs import preset
from reference_numpy.models import bert as rbert
from reference_numpy.tree import tree_leaves_with_path, tree_size

HEADS = rbert.HEADS
LOSS_HEADS = [h for h in HEADS if h != "base"]

variants = st.fixed_dictionaries({
    "n_layers": st.integers(1, 2),
    "n_heads": st.sampled_from([2, 4]),
    "d_model": st.sampled_from([8, 16, 24]),
    "d_ff": st.sampled_from([8, 32]),
    "activation": st.sampled_from(["gelu", "gelu_tanh"]),
    "num_labels": st.integers(2, 4),
    "type_vocab_size": st.integers(1, 3),
})


def _mask(pattern: str, batch: int, length: int, seed: int) -> np.ndarray | None:
    """None, or a (B, T) 0/1 mask: right / left padding of the first row, or random (rows may
    be fully padded, which must not give NaN)."""
    if pattern == "none":
        return None
    mask = np.ones((batch, length), np.int64)
    if pattern == "right":
        mask[0, length // 2 + 1:] = 0
    elif pattern == "left":
        mask[0, : length // 2] = 0
    else:
        mask = (np.random.default_rng(seed).random((batch, length)) < 0.6).astype(np.int64)
    return mask


@pytest.mark.slow
@settings(max_examples=max(6, settings.default.max_examples // 2))  # each example traces a new model variant op by op (~5 s on 2 cores)
@given(v=variants, head=st.sampled_from(HEADS), dtype=st.sampled_from([np.float64, np.float32]),
       pad=st.sampled_from(["none", "right", "left", "random"]), length=st.integers(1, 6),
       batch=st.integers(1, 2), seed=st.integers(0, 50))
def test_reference_matches_jax_logits_and_every_gradient(v, head, dtype, pad, length, batch, seed):
    mask = _mask(pad, batch, length, seed)
    data = bert_case(np.random.default_rng(seed), dtype, head=head, length=length, batch=batch,
                     attention_mask=mask, **v)
    rows = compare(data, dtype, seed=seed)
    assert all(r.passed for r in rows), format_rows(f"bert {head} {v} pad={pad} {np.dtype(dtype).name}", rows)


@pytest.mark.parametrize("head", HEADS)
def test_whole_model_backward_matches_finite_differences(head):
    data = bert_case(np.random.default_rng(0), np.float64, head=head, n_layers=1, d_model=16, d_ff=32,
                     vocab_size=23, length=4, pad=True)
    report = gradcheck_case(data, seed=1)
    assert report.ok, f"{head}\n{report}"


# Each (head, dtype) jit-compiles its own loss_and_grad (~5 s on 2 cores), so: the MLM head in
# both dtypes, sequence classification for its (B,) labels; token classification's loss is the
# MLM's CE over (B, T) with -100, and question answering has its own test below.
@pytest.mark.slow
@pytest.mark.parametrize(("head", "dtype"), [
    ("mlm", np.float64), ("mlm", np.float32), ("sequence_classification", np.float64),
])
def test_loss_and_grad_agree_and_five_adamw_steps_stay_together(head, dtype):
    params, ref_lg, jax_lg = bert_trajectory(dtype, head=head)
    rows = adamw_trajectory(params, ref_lg, jax_lg, dtype, steps=5)
    assert all(r.passed for r in rows), format_rows(f"bert {head} {np.dtype(dtype).name}", rows)


def test_question_answering_adamw_steps_and_its_shift_invariant_leaves():
    """The QA loss is a softmax over *positions*, so adding one constant to every position's
    logit changes nothing: ``qa/bias`` and the last block's output-norm bias (which shifts every
    token's hidden state, hence every position's logit, alike) have an exact-zero loss gradient.
    Both sides return rounding noise there (checked ~0), which Adam then normalises into
    arbitrary +-lr steps, so those two leaves are left out of the trajectory comparison."""
    params, ref_lg, jax_lg = bert_trajectory(np.float64, head="question_answering")
    for loss_grad in (ref_lg, jax_lg):
        _, grads = loss_grad(params)
        grads = to_numpy(grads) if loss_grad is jax_lg else grads
        scale = max(np.abs(leaf).max() for _, leaf in tree_leaves_with_path(grads))
        assert np.abs(grads["qa"]["bias"]).max() <= 1e-12 * scale
        assert np.abs(grads["layers"]["mlp_norm"]["bias"][-1]).max() <= 1e-12 * scale
    rows = adamw_trajectory(params, ref_lg, jax_lg, np.float64, steps=5)
    kept = [r for r in rows if not r.quantity.endswith(("qa/bias", "layers/mlp_norm/bias"))]
    assert len(kept) == len(rows) - 2
    assert all(r.passed for r in kept), format_rows("bert question_answering float64", kept)


@pytest.mark.parametrize("head", HEADS)
def test_param_count_equals_built_tree(head):
    config = preset("bert-tiny")
    n = rbert.param_count(config, head)
    assert tree_size(rbert.init(config, np.random.default_rng(0), head)) == n
    assert tree_size(jbert.init(config, 0, head)) == n
    if head == "base":
        assert n == configs.param_count(config)  # the encoder tree of configs.param_shapes
    for tree in (rbert.init(config, 0, head), jbert.init(config, 0, head)):
        assert {str(leaf.dtype) for _, leaf in tree_leaves_with_path(tree)} == {"float32"}


def test_param_counts_match_hf_bert_base():
    """HF counts (bert-base-uncased): BertModel 109,482,240 (with pooler);
    BertForMaskedLM 109,514,298 and BertForTokenClassification / QuestionAnswering 108,893,186
    (no pooler: ours always keeps it, 590,592 more); BertForSequenceClassification 109,483,778."""
    config = preset("bert-base")
    pooler = 768 * 768 + 768
    assert rbert.param_count(config, "base") == 109_482_240
    assert rbert.param_count(config, "mlm") - pooler == 109_514_298
    assert rbert.param_count(config, "sequence_classification") == 109_483_778
    assert rbert.param_count(config, "token_classification") - pooler == 108_893_186
    assert rbert.param_count(config, "question_answering") - pooler == 108_893_186


def test_one_seed_gives_one_encoder_for_every_head():
    config = preset("bert-tiny")
    for init in (lambda h: rbert.init(config, 7, h), lambda h: to_numpy(jbert.init(config, 7, h))):
        a, b = init("mlm"), init("question_answering")
        for key in ("embeddings", "layers", "pooler"):
            for (path, x), (_, y) in zip(tree_leaves_with_path(a[key]), tree_leaves_with_path(b[key])):
                np.testing.assert_array_equal(x, y, err_msg=f"{key}/{path}")


def test_outputs_at_real_tokens_ignore_padded_tokens_and_default_type_ids_are_zeros():
    config = preset("bert-tiny", n_layers=1)
    params = rbert.init(config, 0, "token_classification")
    rng = np.random.default_rng(1)
    batch = bert_batch(rng, config, 2, 6, pad=True, token_types=False)
    other = dict(batch, input_ids=batch["input_ids"].copy())
    other["input_ids"][0, 4:] = (other["input_ids"][0, 4:] + 1) % config.vocab_size  # padded slots
    a = rbert.forward(params, batch, config, "token_classification")
    b = rbert.forward(params, other, config, "token_classification")
    np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a[1], b[1])
    zeros = dict(batch, token_type_ids=np.zeros_like(batch["input_ids"]))
    np.testing.assert_array_equal(rbert.forward(params, zeros, config, "token_classification"), a)


@pytest.mark.parametrize("impl", ["reference", "jax"])
def test_bad_inputs_raise_clear_errors(impl):
    config = preset("bert-tiny")  # V = 97, max_len = 64, type_vocab_size = 2
    mod = rbert if impl == "reference" else jbert
    init = lambda h: mod.init(config, 0, h)  # noqa: E731
    params = init("mlm")
    run = lambda b, head="mlm", p=params: mod.forward(p, b, config, head)  # noqa: E731
    ids = np.array([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="longer than the model supports"):
        run({"input_ids": np.zeros((1, config.max_len + 1), np.int64)})
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\)"):
        run({"input_ids": np.array([[1, 97]])})
    with pytest.raises(ValueError, match=r"missing \['input_ids'\]"):
        run({"ids": ids})
    with pytest.raises(ValueError, match="integer"):
        run({"input_ids": ids.astype(float)})
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        run({"input_ids": ids, "attention_mask": np.ones((1, 3), np.int64)})
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 2\), found id 2"):
        run({"input_ids": ids, "token_type_ids": np.array([[0, 1, 2, 0]])})
    with pytest.raises(ValueError, match="token_type_ids must have shape"):
        run({"input_ids": ids, "token_type_ids": np.array([[0, 1]])})
    with pytest.raises(ValueError, match="unknown BERT head 'nsp'"):
        run({"input_ids": ids}, "nsp")
    with pytest.raises(ValueError, match=r"missing \['classifier'\].*head='sequence_classification'"):
        run({"input_ids": ids}, "sequence_classification")

    lg = lambda b, head="mlm", p=params: mod.loss_and_grad(p, b, config, head)  # noqa: E731
    with pytest.raises(ValueError, match=r"missing \['labels'\]"):
        lg({"input_ids": ids})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\) or equal ignore_index \(-100\)"):
        lg({"input_ids": ids, "labels": np.array([[-100, 5, 97, -100]])})
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 4\)"):
        lg({"input_ids": ids, "labels": np.array([5])})
    with pytest.raises(ValueError, match="head 'base' has no loss"):
        lg({"input_ids": ids}, "base")
    p_seq = init("sequence_classification")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        lg({"input_ids": ids, "labels": np.array([2])}, "sequence_classification", p_seq)
    p_qa = init("question_answering")
    with pytest.raises(ValueError, match=r"missing \['start_positions', 'end_positions'\]"):
        lg({"input_ids": ids}, "question_answering", p_qa)
    with pytest.raises(ValueError, match=r"end_positions must lie in \[0, 4\) or equal ignore_index \(4\), found label 5"):
        lg({"input_ids": ids, "start_positions": np.array([0]), "end_positions": np.array([5])},
           "question_answering", p_qa)


@pytest.mark.parametrize("head", LOSS_HEADS)
def test_loss_is_finite_and_positive_with_padding_and_ignored_labels(head):
    config = preset("bert-tiny", n_layers=1)
    rng = np.random.default_rng(0)
    params = rbert.init(config, rng, head)
    batch = bert_labels(rng, config, bert_batch(rng, config, 2, 5, pad=True), head)
    loss, grads = rbert.loss_and_grad(params, batch, config, head)
    assert np.isfinite(loss) and loss > 0
    assert all(np.isfinite(g).all() for _, g in tree_leaves_with_path(grads))
