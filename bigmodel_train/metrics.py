"""Evaluation metrics in NumPy, shared by the JAX trainer and the NumPy-reference trainer.

Dimension letters: N examples (or flattened tokens), C classes, V vocabulary.

Classification (``accuracy``, ``precision_recall_fscore_support``, ``precision``, ``recall``,
``f1_score``, ``confusion_matrix``, ``classification_report``) follows scikit-learn's
definitions for multiclass targets, so numbers can be checked against ``sklearn.metrics``:

* ``labels`` picks the classes scored, in that order; samples whose true (or predicted) label
  is outside ``labels`` do not count for any class (as in scikit-learn).
  ``num_classes=C`` means ``labels = 0..C-1`` and also checks every value is in that range.
  With neither, the labels are the sorted union of the values in ``y_true`` and ``y_pred``.
* ``average``: ``None`` (one value per label), ``"micro"`` (pool the counts of all labels),
  ``"macro"`` (unweighted mean over labels), ``"weighted"`` (mean weighted by each label's
  support, i.e. its count in ``y_true``).
* ``zero_division``: the value of a ratio whose denominator is 0 -- precision of a class never
  predicted, recall of a class absent from ``y_true``, F of a class absent from both. It is
  ``0.0`` by default, which is what scikit-learn's default (``"warn"``) returns, but no warning is
  emitted: in an evaluation loop a class missing from one batch is normal, not an event. ``1.0``
  and ``nan`` are also accepted; with ``nan`` the undefined classes are left out of the macro and
  weighted means (scikit-learn's behaviour).
* F-beta is computed from counts, ``F = (1 + β²) tp / (β² (tp + fn) + (tp + fp))``, so it is 0
  (not ``zero_division``) when only precision or only recall is undefined, as in scikit-learn.

Scores (``top_k_accuracy``), language modelling (``nll_sum_and_count``, ``perplexity``,
``perplexity_from_nll``, ``perplexity_from_logits``), generation (``corpus_bleu`` via sacrebleu,
``exact_match``) complete the set. Everything returns plain Python floats / NumPy arrays; nothing
here imports jax (pass ``np.asarray(jax_array)`` or the jax array itself, which NumPy converts).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigmodel_train.extras import missing_extra
from reference_numpy.losses import IGNORE_INDEX

__all__ = [
    "AVERAGES",
    "BleuScore",
    "accuracy",
    "classification_report",
    "confusion_matrix",
    "corpus_bleu",
    "exact_match",
    "f1_score",
    "format_classification_report",
    "nll_sum_and_count",
    "perplexity",
    "perplexity_from_logits",
    "perplexity_from_nll",
    "precision",
    "precision_recall_fscore_support",
    "recall",
    "top_k_accuracy",
]

AVERAGES = (None, "micro", "macro", "weighted")

# Rows per chunk in the (N, C) / (N, V) reductions, chosen so a chunk's float64 temporaries stay
# around 32 MB even for a 50k vocabulary (an eval batch of 8k tokens x 50k logits would otherwise
# allocate several GB of float64 and bool scratch at once).
_CHUNK_ELEMENTS = 1 << 22

# math.exp overflows (OverflowError) above this; perplexity is +inf there.
_MAX_EXP_ARG = math.log(np.finfo(np.float64).max)


# --------------------------------------------------------------------------------------------
# input checks


def _paired(y_true: Any, y_pred: Any, names: tuple[str, str] = ("y_true", "y_pred")
            ) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays flattened to (N,), after checking they have the same shape."""
    a, b = np.asarray(y_true), np.asarray(y_pred)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty: nothing to score")
    for name, x in zip(names, (a, b)):
        if x.dtype.kind not in "biufUSO":
            raise ValueError(f"{name} must hold class labels, got dtype {x.dtype}")
    return a.reshape(-1), b.reshape(-1)


def _check_zero_division(zero_division: float) -> float:
    if isinstance(zero_division, numbers.Real) and not isinstance(zero_division, bool):
        z = float(zero_division)
        if z in (0.0, 1.0) or math.isnan(z):
            return z
    raise ValueError(f"zero_division must be 0.0, 1.0 or nan, got {zero_division!r}")


def _check_average(average: str | None) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {list(AVERAGES)}, got {average!r}")


def _integer_labels(name: str, y: np.ndarray, num_classes: int) -> None:
    """Every value of ``y`` is an integer in [0, num_classes)."""
    if y.dtype.kind not in "biu":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must hold integer class ids when num_classes is given, "
                             f"got dtype {y.dtype}")
    lo, hi = y.min(), y.max()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} has class id {bad}, outside [0, num_classes={num_classes})")


def _resolve_labels(y_true: np.ndarray, y_pred: np.ndarray, labels: Any, num_classes: Any
                    ) -> np.ndarray:
    """The (C,) array of labels scored, in output order."""
    if labels is not None and num_classes is not None:
        raise ValueError("pass labels or num_classes, not both")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        _integer_labels("y_true", y_true, int(num_classes))
        _integer_labels("y_pred", y_pred, int(num_classes))
        return np.arange(int(num_classes))
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {lab.shape}")
        if np.unique(lab).size != lab.size:
            raise ValueError(f"labels must be unique, got {lab.tolist()}")
        return lab
    return np.union1d(y_true, y_pred)


def _encode(y: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) index of each value of ``y`` in ``labels``, or -1 where it is not one of them."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    pos = np.clip(np.searchsorted(sorted_labels, y), 0, labels.size - 1)
    found = sorted_labels[pos] == y
    return np.where(found, order[pos], -1)


def _class_counts(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label (C,): true positives, predicted count (tp + fp), true count (tp + fn)."""
    c = labels.size
    t, p = _encode(y_true, labels), _encode(y_pred, labels)
    tp = np.bincount(t[(t == p) & (t >= 0)], minlength=c)
    pred_sum = np.bincount(p[p >= 0], minlength=c)
    true_sum = np.bincount(t[t >= 0], minlength=c)
    return tp, pred_sum, true_sum


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """``num / den`` in float64, ``zero_division`` where ``den == 0``."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.shape(num), zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nan_average(values: np.ndarray, weights: np.ndarray | None) -> float:
    """Mean of ``values`` ignoring NaNs (weighted if ``weights``); all-zero weights fall back to
    the plain mean, all-NaN gives NaN (scikit-learn's ``_nanaverage``)."""
    keep = ~np.isnan(values)
    if not keep.any():
        return math.nan
    v = values[keep]
    if weights is not None:
        w = np.asarray(weights, np.float64)[keep]
        if w.sum() > 0:
            return float(np.sum(v * w) / w.sum())
    return float(v.mean())


# --------------------------------------------------------------------------------------------
# classification


def accuracy(y_true: Any, y_pred: Any, *, ignore_index: int | None = None) -> float:
    """Fraction of positions where ``y_pred == y_true``.

    ``y_true``, ``y_pred``: same shape, any number of dims (e.g. (N,) or (B, T) token labels).
    ``ignore_index``: positions whose ``y_true`` equals it are not counted (e.g. -100 padding).
    """
    t, p = _paired(y_true, y_pred)
    if ignore_index is not None:
        keep = t != ignore_index
        if not keep.any():
            raise ValueError(f"every y_true entry equals ignore_index={ignore_index}: "
                             "nothing to score")
        t, p = t[keep], p[keep]
    return float(np.mean(t == p))


def precision_recall_fscore_support(
    y_true: Any,
    y_pred: Any,
    *,
    average: str | None = None,
    labels: Sequence[Any] | np.ndarray | None = None,
    num_classes: int | None = None,
    beta: float = 1.0,
    zero_division: float = 0.0,
) -> tuple[Any, Any, Any, np.ndarray | None]:
    """Precision, recall, F-beta and support for multiclass labels (scikit-learn's definitions).

    ``y_true``, ``y_pred``: (N,) (or any equal shapes, flattened) class labels.
    Returns ``(precision, recall, f_beta, support)``: with ``average=None`` each is a (C,) array
    in ``labels`` order (support: int64 counts of each label in ``y_true``); otherwise three
    floats and ``support=None``, as scikit-learn returns. See the module docstring for
    ``labels`` / ``num_classes`` / ``average`` / ``zero_division``.
    """
    _check_average(average)
    zd = _check_zero_division(zero_division)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
        raise ValueError(f"beta must be a real number >= 0, got {beta!r}")
    t, p = _paired(y_true, y_pred)
    lab = _resolve_labels(t, p, labels, num_classes)
    tp, pred_sum, true_sum = _class_counts(t, p, lab)
    support = true_sum
    if average == "micro":
        tp, pred_sum, true_sum = (np.array([x.sum()]) for x in (tp, pred_sum, true_sum))
    prec = _divide(tp, pred_sum, zd)
    rec = _divide(tp, true_sum, zd)
    b2 = float(beta) ** 2
    if math.isinf(b2):
        f = rec
    else:
        f = _divide((1.0 + b2) * tp, b2 * true_sum + pred_sum, zd)
    if average is None:
        return prec, rec, f, support
    weights = support if average == "weighted" else None
    return (_nan_average(prec, weights), _nan_average(rec, weights), _nan_average(f, weights),
            None)


def precision(y_true: Any, y_pred: Any, *, average: str | None = "macro",
              labels: Sequence[Any] | np.ndarray | None = None, num_classes: int | None = None,
              zero_division: float = 0.0) -> Any:
    """Precision ``tp / (tp + fp)``; a float, or a (C,) array with ``average=None``.

    Note the default ``average="macro"`` (scikit-learn's is ``"binary"``, which is not offered:
    use ``labels=[positive]`` with ``average="micro"`` for a one-class score)."""
    return precision_recall_fscore_support(y_true, y_pred, average=average, labels=labels,
                                           num_classes=num_classes, zero_division=zero_division)[0]


def recall(y_true: Any, y_pred: Any, *, average: str | None = "macro",
           labels: Sequence[Any] | np.ndarray | None = None, num_classes: int | None = None,
           zero_division: float = 0.0) -> Any:
    """Recall ``tp / (tp + fn)``; a float, or a (C,) array with ``average=None``."""
    return precision_recall_fscore_support(y_true, y_pred, average=average, labels=labels,
                                           num_classes=num_classes, zero_division=zero_division)[1]


def f1_score(y_true: Any, y_pred: Any, *, average: str | None = "macro",
             labels: Sequence[Any] | np.ndarray | None = None, num_classes: int | None = None,
             zero_division: float = 0.0) -> Any:
    """F1 ``2 tp / (2 tp + fp + fn)``; a float, or a (C,) array with ``average=None``."""
    return precision_recall_fscore_support(y_true, y_pred, average=average, labels=labels,
                                           num_classes=num_classes, zero_division=zero_division)[2]


def confusion_matrix(y_true: Any, y_pred: Any, *,
                     labels: Sequence[Any] | np.ndarray | None = None,
                     num_classes: int | None = None) -> np.ndarray:
    """(C, C) int64 counts; entry ``[i, j]`` is the number of samples of true label ``labels[i]``
    predicted as ``labels[j]`` (rows true, columns predicted, as in scikit-learn). Samples whose
    true or predicted label is not in ``labels`` are left out."""
    t, p = _paired(y_true, y_pred)
    lab = _resolve_labels(t, p, labels, num_classes)
    c = lab.size
    ti, pi = _encode(t, lab), _encode(p, lab)
    keep = (ti >= 0) & (pi >= 0)
    flat = np.bincount(ti[keep] * c + pi[keep], minlength=c * c)
    return flat.reshape(c, c).astype(np.int64, copy=False)


_REPORT_AVERAGES = ("micro avg", "macro avg", "weighted avg")


def classification_report(
    y_true: Any,
    y_pred: Any,
    *,
    labels: Sequence[Any] | np.ndarray | None = None,
    num_classes: int | None = None,
    target_names: Sequence[str] | None = None,
    zero_division: float = 0.0,
) -> dict[str, Any]:
    """Per-class and averaged scores as a dict (scikit-learn's ``output_dict`` layout)::

        {"<class name>": {"precision": p, "recall": r, "f1-score": f, "support": n}, ...,
         "accuracy": a,
         "micro avg": {...}, "macro avg": {...}, "weighted avg": {...}}

    Class names are ``target_names`` (one per label) or ``str(label)``. An average's
    ``support`` is the total support of the labels scored. ``accuracy`` is over all samples.
    Render it with :func:`format_classification_report`.
    """
    t, p = _paired(y_true, y_pred)
    lab = _resolve_labels(t, p, labels, num_classes)
    if target_names is None:
        names = [str(x) for x in lab.tolist()]
    else:
        names = [str(x) for x in target_names]
        if len(names) != lab.size:
            raise ValueError(f"target_names has {len(names)} names for {lab.size} labels")
    clash = sorted({*names} & {"accuracy", *_REPORT_AVERAGES})
    if clash or len(set(names)) != len(names):
        raise ValueError(f"class names must be unique and not one of 'accuracy', "
                         f"{', '.join(map(repr, _REPORT_AVERAGES))}; got {names}")
    kw = dict(labels=lab, zero_division=zero_division)
    prec, rec, f, support = precision_recall_fscore_support(t, p, average=None, **kw)
    report: dict[str, Any] = {}
    for i, name in enumerate(names):
        report[name] = {"precision": float(prec[i]), "recall": float(rec[i]),
                        "f1-score": float(f[i]), "support": int(support[i])}
    report["accuracy"] = accuracy(t, p)
    total = int(support.sum())
    for key, avg in zip(_REPORT_AVERAGES, ("micro", "macro", "weighted")):
        pa, ra, fa, _ = precision_recall_fscore_support(t, p, average=avg, **kw)
        report[key] = {"precision": pa, "recall": ra, "f1-score": fa, "support": total}
    return report


def format_classification_report(report: dict[str, Any], *, digits: int = 4) -> str:
    """A fixed-width text table of a :func:`classification_report` dict."""
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict)]
    width = max([len(k) for k, _ in rows] + [len("weighted avg")])
    head = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"
    lines = [head, ""]

    def row(name: str, d: dict[str, Any]) -> str:
        return (f"{name:>{width}}  {d['precision']:>9.{digits}f}  {d['recall']:>9.{digits}f}  "
                f"{d['f1-score']:>9.{digits}f}  {d['support']:>9d}")

    lines += [row(k, v) for k, v in rows if k not in _REPORT_AVERAGES]
    lines.append("")
    if "accuracy" in report:
        n = report.get("macro avg", {}).get("support")
        lines.append(f"{'accuracy':>{width}}  {'':>9}  {'':>9}  "
                     f"{report['accuracy']:>9.{digits}f}  {'' if n is None else n:>9}")
    lines += [row(k, report[k]) for k in _REPORT_AVERAGES if k in report]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# scores


def _scores_and_targets(scores: Any, y_true: Any, ignore_index: int | None, what: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` (..., C) -> (N, C) and ``y_true`` (...) -> (N,) int64, with ignored positions
    dropped and class ids checked against C."""
    s = np.asarray(scores)
    y = np.asarray(y_true)
    if s.ndim < 1 or s.shape[:-1] != y.shape:
        raise ValueError(f"{what} must have shape labels.shape + (C,) = {y.shape} + (C,), "
                         f"got {s.shape}")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be real numbers, got dtype {s.dtype}")
    if y.dtype.kind not in "biu":
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    c = s.shape[-1]
    s, y = s.reshape(-1, c), y.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = y != ignore_index
        s, y = s[keep], y[keep]
    if y.size == 0:
        raise ValueError("no positions to score (empty input, or every label is ignore_index)")
    bad = (y < 0) | (y >= c)
    if bad.any():
        raise ValueError(f"label {y[bad][0]} is outside [0, C={c}) (the last axis of {what})")
    return s, y


def top_k_accuracy(y_true: Any, scores: Any, k: int = 5, *,
                   ignore_index: int | None = None) -> float:
    """Fraction of positions whose true class is among the ``k`` highest ``scores``.

    ``scores``: (..., C) logits, probabilities or any scores; ``y_true``: (...) ints in [0, C).
    Ties are broken as scikit-learn's ``top_k_accuracy_score`` does (a stable ascending sort,
    reversed): among equal scores the *higher* class index ranks first. ``k >= C`` gives 1.0.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    s, y = _scores_and_targets(scores, y_true, ignore_index, "scores")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("scores contain NaN; a rank is undefined")
    n, c = s.shape
    cls = np.arange(c)
    hits = 0
    step = max(1, _CHUNK_ELEMENTS // max(c, 1))
    for i in range(0, n, step):
        sc, yc = s[i:i + step], y[i:i + step]
        st = np.take_along_axis(sc, yc[:, None], axis=1)  # (n, 1) score of the true class
        # rank of the true class = classes strictly above it + equal ones with a larger index
        rank = (sc > st).sum(1) + ((sc == st) & (cls[None, :] > yc[:, None])).sum(1)
        hits += int(np.count_nonzero(rank < k))
    return hits / n


# --------------------------------------------------------------------------------------------
# language modelling


def nll_sum_and_count(logits: Any, labels: Any, *, ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """Summed token negative log-likelihood (nats) and the number of tokens scored.

    ``logits``: (..., V) unnormalised scores, e.g. (B, T, V); ``labels``: (...) token ids, e.g.
    (B, T), already aligned with ``logits`` (for a causal LM shift them first: the logits at
    position t score ``labels[t + 1]``). Positions whose label is ``ignore_index`` are skipped.
    The log-softmax is the stable ``x - max(x) - log Σ exp(x - max(x))``, in float64 whatever the
    logits' dtype. Sum several batches' results and call :func:`perplexity_from_nll`.
    """
    x, y = _scores_and_targets(logits, labels, ignore_index, "logits")
    total = 0.0
    step = max(1, _CHUNK_ELEMENTS // max(x.shape[1], 1))
    for i in range(0, x.shape[0], step):
        xc = x[i:i + step].astype(np.float64)
        yc = y[i:i + step]
        m = xc.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # a row of -inf: keep exp() at 0, not nan
        lse = m[:, 0] + np.log(np.exp(xc - m).sum(axis=1))
        total += float(np.sum(lse - np.take_along_axis(xc, yc[:, None], axis=1)[:, 0]))
    return total, int(y.size)


def perplexity(mean_nll: float) -> float:
    """``exp(mean token NLL)`` (nats); +inf instead of an overflow."""
    v = float(mean_nll)
    if math.isnan(v):
        return math.nan
    return math.inf if v > _MAX_EXP_ARG else math.exp(v)


def perplexity_from_nll(nll_sum: float, num_tokens: int) -> float:
    """``exp(nll_sum / num_tokens)``: perplexity of a corpus from its summed NLL."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) \
            or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    return perplexity(float(nll_sum) / int(num_tokens))


def perplexity_from_logits(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> float:
    """Perplexity of ``labels`` (...) under ``logits`` (..., V); see :func:`nll_sum_and_count`."""
    total, count = nll_sum_and_count(logits, labels, ignore_index=ignore_index)
    return perplexity_from_nll(total, count)


# --------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class BleuScore:
    """Corpus BLEU as sacrebleu computes it."""

    score: float  # 0..100
    signature: str  # sacrebleu's reproducibility signature: "nrefs:1|case:mixed|...|tok:13a|..."
    precisions: tuple[float, ...]  # modified n-gram precisions, n = 1..4, in percent
    brevity_penalty: float
    hyp_len: int  # tokens in the hypotheses
    ref_len: int  # effective reference length (closest reference per sentence)


def _reference_streams(references: Sequence[Any], n_hyp: int) -> list[list[str]]:
    """Per-hypothesis references -> sacrebleu's reference streams (one list per reference slot)."""
    if isinstance(references, str) or len(references) != n_hyp:
        n = "a string" if isinstance(references, str) else f"{len(references)} entries"
        raise ValueError(f"references must have one entry per hypothesis ({n_hyp}), got {n}")
    per_hyp: list[list[str]] = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else list(r)
        if not refs or not all(isinstance(x, str) for x in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty sequence of "
                             f"strings, got {r!r:.100}")
        per_hyp.append(refs)
    n_refs = len(per_hyp[0]) if per_hyp else 1
    for i, refs in enumerate(per_hyp):
        if len(refs) != n_refs:
            raise ValueError(f"references[{i}] has {len(refs)} references but references[0] has "
                             f"{n_refs}; every hypothesis needs the same number")
    return [[refs[j] for refs in per_hyp] for j in range(n_refs)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *,
                tokenize: str = "13a", lowercase: bool = False,
                smooth_method: str = "exp") -> BleuScore:
    """Corpus BLEU of ``hypotheses`` (N strings) against ``references`` (N entries, each a string
    or a sequence of R strings, the same R for every hypothesis), computed by sacrebleu.

    ``tokenize``: a sacrebleu tokenizer name ("13a" default, "intl", "char", "none", "zh",
    "ja-mecab", ...); ``lowercase`` and ``smooth_method`` ("exp", "floor", "add-k", "none") are
    passed through. The signature records these settings and the sacrebleu version, so report it
    with the score.
    """
    try:
        from sacrebleu.metrics import BLEU  # lazy: only generation evaluation needs sacrebleu
    except ImportError as err:
        raise missing_extra("sacrebleu", "BLEU (corpus_bleu)", err) from err

    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a sequence of strings, not one string")
    hyps = list(hypotheses)
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise ValueError(f"hypotheses[{i}] must be a string, got {type(h).__name__}")
    streams = _reference_streams(references, len(hyps))
    metric = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method)
    res = metric.corpus_score(hyps, streams)
    return BleuScore(score=float(res.score), signature=str(metric.get_signature()),
                     precisions=tuple(float(x) for x in res.precisions),
                     brevity_penalty=float(res.bp), hyp_len=int(res.sys_len),
                     ref_len=int(res.ref_len))


def _as_sequence(x: Any, name: str, pad_id: int | None) -> str | np.ndarray:
    """A string, or a 1-D int array with trailing ``pad_id`` removed."""
    if isinstance(x, str):
        return x
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "biu"):
        raise ValueError(f"{name} must be a string or a 1-D sequence of token ids, got "
                         f"shape {a.shape} dtype {a.dtype}")
    if pad_id is not None and a.size:
        keep = np.flatnonzero(a != pad_id)
        a = a[:keep[-1] + 1] if keep.size else a[:0]
    return a.astype(np.int64)


def exact_match(predictions: Sequence[Any], references: Sequence[Any], *,
                pad_id: int | None = None,
                normalize: Callable[[str], str] | None = None) -> float:
    """Fraction of generated sequences equal to their reference.

    Each item is a string, or a sequence of token ids (a list, a 1-D array, or a row of an
    (N, T) array). ``pad_id``: trailing padding stripped from id sequences before comparing
    (so a generation padded to T matches its unpadded reference). ``normalize``: applied to both
    strings before comparing (e.g. ``str.strip`` or a lowercasing / punctuation filter).
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be sequences of items, not one string")
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} items but references has "
                         f"{len(references)}")
    if len(predictions) == 0:
        raise ValueError("predictions is empty: nothing to score")
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        a = _as_sequence(p, f"predictions[{i}]", pad_id)
        b = _as_sequence(r, f"references[{i}]", pad_id)
        if isinstance(a, str) != isinstance(b, str):
            raise ValueError(f"predictions[{i}] and references[{i}] must both be strings or both "
                             "token-id sequences")
        if isinstance(a, str):
            if normalize is not None:
                a, b = normalize(a), normalize(b)
            hits += a == b
        else:
            hits += bool(a.shape == b.shape and np.array_equal(a, b))
    return hits / len(predictions)
