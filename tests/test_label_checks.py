"""Every loss checks its labels, on both sides and in every family (issue #14).

A label outside [0, n_classes) other than the ignore index raises ``ValueError`` naming the
argument, the bad value and the allowed range: from the NumPy reference's ``loss_and_grad``, the
JAX ``loss`` called eagerly, the JAX ``loss_and_grad`` (jit-compiled: checked on the host before
tracing) and the JAX training step (``JaxStepper``: checked on the host before dispatch). The
ignore index (-100; T for question answering) gives the mean over the other positions, computed
here by hand from the reference logits.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from bigmodel_jax.models import bert as jbert
from bigmodel_jax.models import gpt as jgpt
from bigmodel_jax.models import seq2seq as jseq2seq
from bigmodel_jax.models import vit as jvit
from bigmodel_jax.tree import to_jax
from bigmodel_train.steps import check_micro_batch_labels, task_label_check
from reference_numpy.configs import preset
from reference_numpy.losses import check_labels
from reference_numpy.models import bert as rbert
from reference_numpy.models import gpt as rgpt
from reference_numpy.models import seq2seq as rseq2seq
from reference_numpy.models import vit as rvit

B, T = 3, 5  # batch, time (the target time for seq2seq)
MODULES = {"gpt": (rgpt, jgpt), "bert": (rbert, jbert), "seq2seq": (rseq2seq, jseq2seq), "vit": (rvit, jvit)}
PRESETS = {"gpt": "gpt2-tiny", "bert": "bert-tiny", "seq2seq": "seq2seq-tiny", "vit": "vit-tiny"}


def _config(family: str):
    extra = {"label_smoothing": 0.0} if family == "seq2seq" else {}
    return preset(PRESETS[family], n_layers=1, dtype="float64", **extra)


def _setup(family: str, head: str | None):
    """(config, NumPy params, JAX params, a batch with valid labels, the head as extra args)."""
    config = _config(family)
    rng = np.random.default_rng(0)
    extra = () if head is None else (head,)
    params = MODULES[family][0].init(config, rng, *extra)
    ids = rng.integers(0, config.vocab_size, (B, T))
    if family == "gpt":
        batch = {"input_ids": ids, "labels": ids.copy()}
    elif family == "seq2seq":
        batch = {"input_ids": rng.integers(0, config.vocab_size, (B, 4)), "decoder_input_ids": ids,
                 "labels": rng.integers(0, config.vocab_size, (B, T))}
    elif family == "vit":
        s, c = config.image_size, config.n_channels
        batch = {"pixel_values": rng.standard_normal((B, c, s, s)), "labels": rng.integers(0, config.num_labels, B)}
    elif head == "mlm":
        batch = {"input_ids": ids, "labels": rng.integers(0, config.vocab_size, (B, T))}
    elif head == "token_classification":
        batch = {"input_ids": ids, "labels": rng.integers(0, config.num_labels, (B, T))}
    elif head == "sequence_classification":
        batch = {"input_ids": ids, "labels": rng.integers(0, config.num_labels, B)}
    else:  # question_answering
        batch = {"input_ids": ids, "start_positions": np.array([1, 3, 0]), "end_positions": np.array([2, 4, 4])}
    return config, params, to_jax(params), batch, extra


def _entry_points(family: str, head: str | None):
    """name -> loss(batch) for each public loss entry point of both sides."""
    config, params, jparams, _, extra = _setup(family, head)
    rmod, jmod = MODULES[family]
    return {
        "reference loss_and_grad": lambda b: rmod.loss_and_grad(params, b, config, *extra),
        "jax loss (eager)": lambda b: jmod.loss(jparams, b, config, *extra),
        "jax loss_and_grad (jit)": lambda b: jmod.loss_and_grad(jparams, b, config, *extra),
    }


def _n_classes(family: str, head: str | None) -> int:
    config = _config(family)
    if family in ("gpt", "seq2seq") or head == "mlm":
        return config.vocab_size
    return T if head == "question_answering" else config.num_labels


def _bad_value(bad: str | int, family: str, head: str | None) -> int:
    """"n": the first value past the range (T + 1 for question answering, where T is ignored)."""
    n = _n_classes(family, head)
    first = n + 1 if head == "question_answering" else n
    return {"n": first, "n+7": n + 7}.get(bad, bad)


# (family, head, key, bad value, where to plant it): >= n_classes and stray negatives everywhere;
# -100 too for question answering, whose ignore index is T (HF clamps; we refuse instead).
BAD = [
    (fam, head, key, bad, where)
    for fam, head, key, where in [
        ("gpt", None, "labels", (1, 2)),
        ("bert", "mlm", "labels", (0, 3)),
        ("bert", "token_classification", "labels", (1, 0)),
        ("bert", "sequence_classification", "labels", (1,)),
        ("bert", "question_answering", "start_positions", (0,)),
        ("bert", "question_answering", "end_positions", (1,)),
        ("seq2seq", None, "labels", (0, 4)),
        ("vit", None, "labels", (1,)),
    ]
    for bad in ("n", -5, "n+7")
] + [("bert", "question_answering", "start_positions", -100, (1,))]


@pytest.mark.parametrize("family,head,key,bad,where", BAD)
def test_a_bad_label_raises_naming_it_from_every_loss_entry_point(family, head, key, bad, where):
    n, value = _n_classes(family, head), _bad_value(bad, family, head)
    _, _, _, batch, _ = _setup(family, head)
    batch[key] = np.array(batch[key])
    batch[key][where] = value
    ignore = T if head == "question_answering" else -100
    pattern = (rf"{key} must lie in \[0, {n}\) or equal ignore_index \({ignore}\), found label {value} "
               rf"at {key}\[{', '.join(map(str, where))}\]")
    for name, loss in _entry_points(family, head).items():
        with pytest.raises(ValueError, match=pattern):
            loss(batch)
            pytest.fail(f"{name} accepted {key}={value}")


def _nll(logits: np.ndarray, labels: np.ndarray, ignore: int = -100) -> np.ndarray:
    """-log softmax(logits)[label] per row, by hand (float64); logits (..., V), labels (...);
    rows whose label is ``ignore`` read class 0 (the caller drops them)."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    safe = np.where(labels == ignore, 0, labels)
    return lse - np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]


def _masked_mean(logits: np.ndarray, labels: np.ndarray, ignore: int) -> float:
    keep = labels != ignore
    assert 0 < keep.sum() < keep.size  # some positions ignored, some not: the test can tell
    return float(_nll(logits, labels, ignore)[keep].mean())


# Each case compiles a JAX loss_and_grad (several seconds): the causal LM, the case, runs
# by default, the others with the slow tests.
IGNORED = [("gpt", None)] + [pytest.param(*case, marks=pytest.mark.slow) for case in [
    ("bert", "mlm"), ("bert", "token_classification"), ("bert", "sequence_classification"),
    ("bert", "question_answering"), ("seq2seq", None), ("vit", None)]]


@pytest.mark.parametrize("family,head", IGNORED)
def test_the_ignore_index_gives_the_mean_over_the_other_positions(family, head):
    """Both sides' loss_and_grad (the JAX one compiled, as training runs it) against the masked
    mean of the reference logits' per-position NLL, computed here by hand."""
    config, params, _, batch, extra = _setup(family, head)
    rmod = MODULES[family][0]
    logits = np.asarray(rmod.forward(params, {k: v for k, v in batch.items()}, config, *extra), np.float64)
    if head == "question_answering":
        batch["start_positions"] = np.array([T, 3, 0])  # row 0's answer is outside the window
        expected = 0.5 * (_masked_mean(logits[..., 0].copy(), batch["start_positions"], T)
                          + float(_nll(logits[..., 1], batch["end_positions"]).mean()))
    else:
        labels = np.array(batch["labels"])
        labels.reshape(-1)[[1, -2]] = -100  # ignored: two positions (2-D labels), or row 1 (1-D)
        batch["labels"] = labels
        if family == "gpt":  # position t predicts labels[t + 1]
            expected = _masked_mean(logits[:, :-1], labels[:, 1:], -100)
        else:
            expected = _masked_mean(logits, labels, -100)
    for name, loss in _entry_points(family, head).items():
        if name == "jax loss (eager)":
            continue  # the same function as the compiled one; eager dispatch only costs time here
        np.testing.assert_allclose(float(loss(batch)[0]), expected, rtol=1e-10, err_msg=name)


# --------------------------------------------------------------------------------------------
# the shared check itself, and the training step's host-side check


def test_check_labels_accepts_the_edges_and_skips_values_of_tracers():
    check_labels(np.array([0, 9, -100]), 10)  # both ends of [0, 10) and the ignore index
    check_labels(np.array([3, 7], np.uint8), 10)
    check_labels(np.zeros((0,), np.int32), 10)  # nothing to check
    with pytest.raises(ValueError, match=r"found label -100 at y\[1\]"):
        check_labels(np.array([1, -100]), 10, "y", ignore_index=None)
    with pytest.raises(ValueError, match="labels must be an integer array"):
        check_labels(np.array([1.0]), 10)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\), got \(3,\)"):
        check_labels(np.array([1, 2, 3]), 10, shape=(2, 3))

    import jax
    import jax.numpy as jnp

    # under jit the values are unknown: the check passes (the caller checks on the host) ...
    jax.jit(lambda y: check_labels(y, 10) or jnp.sum(y))(jnp.array([99]))
    # ... but the shape and dtype are still checked at trace time
    with pytest.raises(ValueError, match="integer array"):
        jax.jit(lambda y: check_labels(y, 10) or jnp.sum(y))(jnp.array([1.0]))


@pytest.mark.parametrize("family,head,key,bad,where", [c for c in BAD if c[3] == "n"])
def test_the_training_steps_host_check_names_update_micro_batch_and_label(family, head, key, bad, where):
    class Owner:  # the parts of a Task that task_label_check reads
        model_config = _config(family)

        def __init__(self):
            self.head = head

        def ref_module(self):
            return MODULES[family][0]

        def jax_loss(self, params, batch, *, dropout_key=None, masks=None):
            raise AssertionError("never traced in this test")

    check = task_label_check(Owner().jax_loss)
    assert check is not None
    assert task_label_check(lambda p, b, **kw: 0.0) is None  # a plain function: nothing to check against
    _, _, _, good, _ = _setup(family, head)
    n = _n_classes(family, head)
    bad_batch = {k: np.array(v) for k, v in good.items()}
    bad_batch[key][where] = _bad_value(bad, family, head)
    check_micro_batch_labels(check, 3, [good, good])  # valid labels pass
    with pytest.raises(ValueError, match=re.escape(f"training batch of update 3 (micro-batch 1): {key} must lie in "
                                                   f"[0, {n})")):
        check_micro_batch_labels(check, 3, [good, bad_batch])


def test_jax_stepper_refuses_a_bad_label_batch_before_dispatch():
    """Integration: a real LM task's ``JaxStepper`` raises on a label >= V in the second
    micro-batch before anything is compiled or dispatched, and its parameters stay as they were."""
    from bigmodel_train.config import build_config
    from bigmodel_train.steps import JaxStepper
    from bigmodel_train.tasks import build_task

    cfg = build_config(None, None, ["task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte",
                                    "max_chars=20000", "seq_len=8", "batch_size=4", "accumulate_steps=2",
                                    "progress=false", "plots=false", "tensorboard=false"])
    task = build_task(cfg)
    split = task.splits["train"]
    batch = task.model_batch(split.batch(np.arange(4)))
    V = task.model_config.vocab_size
    micro = [{k: np.array(v[i * 2:(i + 1) * 2]) for k, v in batch.items()} for i in range(2)]
    micro[1]["labels"][0, 3] = V
    params = task.init_params()
    stepper = JaxStepper(task.jax_loss, cfg, params, donate=False)
    with pytest.raises(ValueError, match=re.escape(f"update 0 (micro-batch 1): labels must lie in [0, {V}) or equal "
                                                   f"ignore_index (-100), found label {V} at labels[0, 3]")):
        stepper.step(0, micro)
    for (path, p), (_, q) in zip(sorted(_leaves(params)), sorted(_leaves(stepper.params_numpy()))):
        assert np.array_equal(p, q), path


def _leaves(tree):
    from reference_numpy.tree import tree_leaves_with_path

    return [(path, np.asarray(x)) for path, x in tree_leaves_with_path(tree)]
