"""bigmodel_train.metrics against independent implementations.

Classification metrics and top-k accuracy are compared with scikit-learn on hypothesis-drawn
labels (including classes missing from the predictions or from the targets, and labels lists
naming classes absent from both); perplexity with torch's ``cross_entropy`` and a plain Python
loop; BLEU with sacrebleu's other entry point and with n-gram counts written out in this file.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from bigmodel_train import metrics as M

ZERO_DIVISIONS = (0.0, 1.0, np.nan)


@st.composite
def label_pairs(draw: st.DrawFn, max_classes: int = 7) -> tuple[np.ndarray, np.ndarray, int]:
    """``(y_true, y_pred, C)`` with values in [0, C); each side draws from its own random subset
    of the classes, so some classes are missing from the targets, the predictions, or both."""
    c = draw(st.integers(2, max_classes))
    true_classes = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    pred_classes = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    n = draw(st.integers(1, 40))
    y_true = draw(st.lists(st.sampled_from(true_classes), min_size=n, max_size=n))
    y_pred = draw(st.lists(st.sampled_from(pred_classes), min_size=n, max_size=n))
    return np.array(y_true), np.array(y_pred), c


def assert_same(ours, theirs, what: str) -> None:
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64),
                               rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=what)


# --------------------------------------------------------------------------------------------
# classification vs scikit-learn


@given(label_pairs())
def test_accuracy_matches_sklearn(data):
    y_true, y_pred, _ = data
    assert M.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=0)


def test_accuracy_ignore_index_drops_positions():
    y_true = np.array([[1, 2, -100], [0, -100, -100]])  # (B, T) token labels with padding
    y_pred = np.array([[1, 0, 5], [0, 7, 7]])
    keep = y_true != -100
    expected = skm.accuracy_score(y_true[keep], y_pred[keep])
    assert M.accuracy(y_true, y_pred, ignore_index=-100) == expected == 2 / 3


@given(label_pairs(), st.sampled_from(M.AVERAGES), st.sampled_from(ZERO_DIVISIONS),
       st.sampled_from(["num_classes", "inferred", "subset"]))
def test_prf_matches_sklearn(data, average, zero_division, label_mode):
    y_true, y_pred, c = data
    if label_mode == "num_classes":
        ours_kw, sk_labels = {"num_classes": c}, np.arange(c)
    elif label_mode == "inferred":
        ours_kw, sk_labels = {}, None
    else:  # a reordered subset that also names a class that never occurs (c + 3)
        sk_labels = np.array([c + 3, *range(c - 1, -1, -2)])
        ours_kw = {"labels": sk_labels}
    ours = M.precision_recall_fscore_support(y_true, y_pred, average=average,
                                             zero_division=zero_division, **ours_kw)
    theirs = skm.precision_recall_fscore_support(y_true, y_pred, average=average,
                                                 labels=sk_labels, zero_division=zero_division)
    for name, a, b in zip(("precision", "recall", "f1", "support"), ours, theirs):
        if b is None:
            assert a is None, name
        else:
            assert_same(a, b, f"{name} average={average} zero_division={zero_division}")
    if average is not None:
        assert all(isinstance(x, float) for x in ours[:3])


@given(label_pairs(), st.sampled_from(M.AVERAGES), st.sampled_from([0.0, 0.5, 2.0]))
def test_fbeta_matches_sklearn(data, average, beta):
    y_true, y_pred, c = data
    ours = M.precision_recall_fscore_support(y_true, y_pred, average=average, num_classes=c,
                                             beta=beta, zero_division=1.0)[2]
    theirs = skm.fbeta_score(y_true, y_pred, beta=beta, average=average, labels=np.arange(c),
                             zero_division=1.0)
    assert_same(ours, theirs, f"F{beta} average={average}")


@given(label_pairs(), st.sampled_from(M.AVERAGES))
def test_default_zero_division_is_sklearn_warn_value_without_warnings(data, average):
    """Our default (0.0, silent) gives what scikit-learn's default ("warn") returns."""
    y_true, y_pred, c = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = {
            "precision": skm.precision_score(y_true, y_pred, average=average, labels=np.arange(c)),
            "recall": skm.recall_score(y_true, y_pred, average=average, labels=np.arange(c)),
            "f1": skm.f1_score(y_true, y_pred, average=average, labels=np.arange(c)),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        got = {
            "precision": M.precision(y_true, y_pred, average=average, num_classes=c),
            "recall": M.recall(y_true, y_pred, average=average, num_classes=c),
            "f1": M.f1_score(y_true, y_pred, average=average, num_classes=c),
        }
    for name in expect:
        assert_same(got[name], expect[name], f"{name} average={average}")


@given(label_pairs())
def test_confusion_matrix_matches_sklearn(data):
    y_true, y_pred, c = data
    ours = M.confusion_matrix(y_true, y_pred, num_classes=c)
    np.testing.assert_array_equal(ours, skm.confusion_matrix(y_true, y_pred, labels=np.arange(c)))
    assert ours.dtype == np.int64 and ours.shape == (c, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when only one label occurs
        inferred = skm.confusion_matrix(y_true, y_pred)
    np.testing.assert_array_equal(M.confusion_matrix(y_true, y_pred), inferred)
    # a label list in another order, with one label left out: those samples are dropped
    labels = np.arange(c)[::-1][: max(1, c - 1)]
    if np.isin(y_true, labels).any():  # sklearn refuses a labels list with no label in y_true
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            subset = skm.confusion_matrix(y_true, y_pred, labels=labels)
        np.testing.assert_array_equal(M.confusion_matrix(y_true, y_pred, labels=labels), subset)


@given(label_pairs())
def test_classification_report_matches_sklearn(data):
    y_true, y_pred, c = data
    names = [f"class_{i}" for i in range(c)]
    ours = M.classification_report(y_true, y_pred, num_classes=c, target_names=names)
    theirs = skm.classification_report(y_true, y_pred, labels=np.arange(c), target_names=names,
                                       output_dict=True, zero_division=0.0)
    for key in [*names, "macro avg", "weighted avg"]:
        for field in ("precision", "recall", "f1-score", "support"):
            assert_same(ours[key][field], theirs[key][field], f"{key}/{field}")
    micro = skm.precision_recall_fscore_support(y_true, y_pred, average="micro",
                                                labels=np.arange(c), zero_division=0.0)
    assert_same([ours["micro avg"][f] for f in ("precision", "recall", "f1-score")], micro[:3],
                "micro avg")
    assert ours["accuracy"] == skm.accuracy_score(y_true, y_pred)
    text = M.format_classification_report(ours, digits=3)
    for key in [*names, "accuracy", "micro avg", "macro avg", "weighted avg"]:
        assert key in text
    assert f"{ours['weighted avg']['f1-score']:.3f}" in text


def test_classification_errors_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        M.accuracy([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="y_pred has class id 5"):
        M.f1_score([0, 1], [0, 5], num_classes=3)
    with pytest.raises(ValueError, match="labels or num_classes"):
        M.f1_score([0, 1], [0, 1], labels=[0, 1], num_classes=2)
    with pytest.raises(ValueError, match="zero_division"):
        M.f1_score([0, 1], [0, 1], zero_division=0.5)
    with pytest.raises(ValueError, match="average"):
        M.f1_score([0, 1], [0, 1], average="binary")
    with pytest.raises(ValueError, match="labels must be unique"):
        M.confusion_matrix([0, 1], [0, 1], labels=[0, 0])
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])


# --------------------------------------------------------------------------------------------
# top-k


@st.composite
def scores_and_targets(draw: st.DrawFn, min_classes: int = 3):
    c = draw(st.integers(min_classes, 8))
    n = draw(st.integers(1, 30))
    # scores from a small grid, so ties (which need a tie-breaking rule) are common
    grid = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0])
    scores = np.array(draw(st.lists(st.lists(grid, min_size=c, max_size=c), min_size=n,
                                    max_size=n)))
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    k = draw(st.integers(1, c + 1))
    return y, scores, k


def brute_force_top_k(y, scores, k):
    """Rank by a stable ascending sort, reversed (ties: higher class index first)."""
    hits = 0
    for yi, row in zip(y, scores):
        order = sorted(range(len(row)), key=lambda j: (row[j], j), reverse=True)
        hits += yi in order[:k]
    return hits / len(y)


@given(scores_and_targets())
def test_top_k_accuracy_matches_sklearn(data):
    y, scores, k = data
    c = scores.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when k >= C
        expected = skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(c))
    assert M.top_k_accuracy(y, scores, k) == pytest.approx(expected, abs=1e-15)
    assert M.top_k_accuracy(y, scores, k) == pytest.approx(brute_force_top_k(y, scores, k))


@given(scores_and_targets(min_classes=2))
def test_top_k_accuracy_leading_dims_and_ignore_index(data):
    y, scores, k = data
    n = len(y)
    y_masked = y.copy()
    y_masked[::3] = -100
    keep = y_masked != -100
    if not keep.any():
        return
    # (1, N, C) scores with (1, N) labels: flattened, ignored positions dropped
    ours = M.top_k_accuracy(y_masked[None], scores[None], k, ignore_index=-100)
    assert ours == pytest.approx(brute_force_top_k(y[keep], scores[keep], k))
    assert 0 <= ours <= 1 and n > 0


def test_top_k_errors():
    with pytest.raises(ValueError, match="outside"):
        M.top_k_accuracy([3], np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="shape"):
        M.top_k_accuracy([0, 1], np.zeros((3, 3)), 1)
    with pytest.raises(ValueError, match="k must be"):
        M.top_k_accuracy([0], np.zeros((1, 3)), 0)


# --------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.hf
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9), st.sampled_from([1.0, 30.0, 1e4]),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_perplexity_matches_torch_cross_entropy(b, t, v, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((b, t, v)) * scale).astype(dtype)  # 1e4: naive softmax overflows
    labels = rng.integers(0, v, (b, t))
    labels[rng.random((b, t)) < 0.3] = -100
    if (labels == -100).all():
        labels[0, 0] = 0
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)).reshape(-1, v),
        torch.from_numpy(labels).reshape(-1), ignore_index=-100, reduction="sum")
    count = int((labels != -100).sum())
    total, n = M.nll_sum_and_count(logits, labels)
    assert n == count
    assert total == pytest.approx(float(ref), rel=1e-12, abs=1e-9)
    mean_nll = float(ref) / count
    ppl = M.perplexity_from_logits(logits, labels)
    if mean_nll < 700:
        assert ppl == pytest.approx(math.exp(mean_nll), rel=1e-11)
    elif mean_nll > 710:  # beyond float64's exp range
        assert ppl == math.inf


def test_perplexity_brute_force_loop_and_helpers():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7))
    labels = rng.integers(0, 7, (2, 5))
    labels[1, 3:] = -100
    total, count = 0.0, 0
    for i in range(2):
        for j in range(5):
            if labels[i, j] == -100:
                continue
            row = [float(x) for x in logits[i, j]]
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[labels[i, j]]
            count += 1
    assert M.perplexity_from_logits(logits, labels) == pytest.approx(math.exp(total / count),
                                                                     rel=1e-12)
    assert M.perplexity(total / count) == pytest.approx(math.exp(total / count), rel=1e-15)
    assert M.perplexity_from_nll(total, count) == pytest.approx(math.exp(total / count), rel=1e-15)
    assert M.perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="num_tokens"):
        M.perplexity_from_nll(1.0, 0)
    with pytest.raises(ValueError, match="ignore_index"):
        M.perplexity_from_logits(logits, np.full((2, 5), -100))
    with pytest.raises(ValueError, match="outside"):
        M.perplexity_from_logits(logits, np.full((2, 5), 7))


# --------------------------------------------------------------------------------------------
# BLEU


def test_bleu_identical_and_disjoint():
    hyps = ["the quick brown fox jumps over the lazy dog", "a b c d e f"]
    assert M.corpus_bleu(hyps, hyps).score == pytest.approx(100.0)
    disjoint = ["one two three four five six seven eight nine", "g h i j k l"]
    res = M.corpus_bleu(hyps, disjoint)
    assert res.score == 0.0
    assert res.precisions[0] == 0.0


@given(st.lists(st.lists(st.sampled_from("a b c d e the cat dog , .".split()), min_size=1,
                         max_size=12), min_size=1, max_size=5),
       st.integers(0, 2**31 - 1), st.sampled_from(["13a", "none", "char"]),
       st.sampled_from(["exp", "floor", "none"]), st.booleans())
def test_bleu_matches_sacrebleu_functional_api(sentences, seed, tokenize, smooth, two_refs):
    rng = np.random.default_rng(seed)
    hyps = [" ".join(s) for s in sentences]
    refs1 = [" ".join(rng.permutation(s)[: max(1, len(s) - 1)]) for s in sentences]
    refs2 = [" ".join(s[::-1]) for s in sentences]
    per_hyp = [[r1, r2] for r1, r2 in zip(refs1, refs2)] if two_refs else refs1
    ours = M.corpus_bleu(hyps, per_hyp, tokenize=tokenize, smooth_method=smooth)
    streams = [refs1, refs2] if two_refs else [refs1]
    theirs = sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize, smooth_method=smooth)
    assert ours.score == pytest.approx(theirs.score, rel=1e-12, abs=1e-12)
    assert ours.brevity_penalty == pytest.approx(theirs.bp)
    assert (ours.hyp_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert f"tok:{tokenize}" in ours.signature and f"nrefs:{len(streams)}" in ours.signature
    assert f"smooth:{smooth}" in ours.signature


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def test_bleu_hand_computed():
    hyp = "the cat sat on the mat today"
    ref = "the cat sat on a mat today please"
    h, r = hyp.split(), ref.split()
    # clipped n-gram matches / hypothesis n-grams, counted here without sacrebleu:
    #   1: the(1 clipped of 2) cat sat on mat today -> 6/7
    #   2: "the cat" "cat sat" "sat on" "mat today" -> 4/6
    #   3: "the cat sat" "cat sat on" -> 2/5;   4: "the cat sat on" -> 1/4
    precisions = []
    for n in range(1, 5):
        hc, rc = _ngrams(h, n), _ngrams(r, n)
        matched = sum(min(c, rc[g]) for g, c in hc.items())
        precisions.append(matched / sum(hc.values()))
    assert precisions == [6 / 7, 4 / 6, 2 / 5, 1 / 4]
    bp = math.exp(1 - len(r) / len(h))  # hypothesis (7) shorter than reference (8)
    expected = 100 * bp * math.exp(sum(math.log(p) for p in precisions) / 4)
    res = M.corpus_bleu([hyp], [ref], tokenize="none", smooth_method="none")
    assert res.score == pytest.approx(expected, rel=1e-12)
    assert res.brevity_penalty == pytest.approx(bp, rel=1e-12)
    assert res.precisions == pytest.approx([100 * p for p in precisions], rel=1e-12)
    assert (res.hyp_len, res.ref_len) == (7, 8)


def test_bleu_rejects_misaligned_references():
    with pytest.raises(ValueError, match="one entry per hypothesis"):
        M.corpus_bleu(["a b"], ["a b", "c d"])
    with pytest.raises(ValueError, match="same number"):
        M.corpus_bleu(["a", "b"], [["a", "x"], ["b"]])
    with pytest.raises(ValueError, match=r"hypotheses\[1\]"):
        M.corpus_bleu(["a", 3], ["a", "b"])


# --------------------------------------------------------------------------------------------
# exact match


def test_exact_match_strings_and_token_ids():
    assert M.exact_match(["a b", "c", "d "], ["a b", "x", "d"]) == pytest.approx(1 / 3)
    assert M.exact_match(["a b", "c", "d "], ["a b", "x", "d"], normalize=str.strip) == \
        pytest.approx(2 / 3)
    generated = np.array([[5, 6, 0, 0], [5, 7, 8, 0], [1, 0, 0, 0]])  # (N, T) padded with 0
    refs = [[5, 6], [5, 7], np.array([1])]
    assert M.exact_match(generated, refs, pad_id=0) == pytest.approx(2 / 3)
    assert M.exact_match(generated, refs) == 0.0  # padding counts without pad_id
    with pytest.raises(ValueError, match="both be strings"):
        M.exact_match(["a"], [[1]])
    with pytest.raises(ValueError, match="items"):
        M.exact_match(["a"], ["a", "b"])
