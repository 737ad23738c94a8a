"""The per-layer divergence report (``bigmodel diff``): run one checkpoint on one input in two
implementations and show, layer by layer, where they part.

Dims: B batch, T time, D model width, V vocabulary.

Sides: ``reference`` (``reference_numpy``), ``jax`` (``bigmodel_jax``), ``torch`` (HF
transformers). Each produces a *trace*, the ordered rows ``embeddings``, ``layer{i}.attention``,
``layer{i}.mlp``, ..., ``final_norm``, ``logits`` defined in ``reference_numpy.trace``. ``compare``
lines two traces up by name and gives each row

* ``max abs`` = ``max|a - b|`` and ``max rel`` = ``max|a - b| / max|b|`` (normwise, as every
  parity check in this project: an elementwise relative error is unbounded on entries near 0),
* ``at``: the index of the largest ``|a - b|`` (which batch row, token and channel),
* pass / FAIL against the dtype's tolerance (``DIFF_TOLERANCE``),

and marks the *first* row past tolerance: the layer where a porting bug enters. Rows after it
usually fail too (the error propagates), which says nothing new.

Why per-layer rows find bugs: a wrong LayerNorm epsilon shows at the first norm (``embeddings``
for BERT, ``layer0.attention`` for a pre-norm model), the other GELU variant at ``layer0.mlp``, a
transposed square kernel in the block that owns it, a wrong RoPE pairing at ``layer0.attention``.

This module imports no autograd framework; each side's tracer is imported when it runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bigmodel_port.hf.checkpoint import load_pretrained
from bigmodel_port.tokenization import AutoTokenizer
from bigmodel_port.trace_torch import FLOAT32_INSIDE, effective_dtype, trace_torch
from reference_numpy import trace as ref_trace
from reference_numpy.tolerances import TINY, Tolerance, tolerance_for

Trace = list[tuple[str, np.ndarray]]

SIDES = ("reference", "jax", "torch")

# Per-row tolerance of a diff, by the dtype both sides ran in. A row passes when
# ``max rel <= rel`` or ``max abs <= abs``.
#  float32: two correct float32 implementations differ by rounding only: eps = 1.2e-7 per op,
#    grown by reductions over D / F terms and by composing layers. Measured, worst clean row
#    against torch: ~4e-7 relative on the 2-layer test models; 1.0e-6 (reference) / 1.9e-6 (jax)
#    on a random BERT-base-sized model (12 layers, D = 768, T = 64); 1.6e-6 / 2.6e-6 on a random
#    16-layer Llama (D = 1024, GQA). 2e-5 keeps ~8x over the deepest of those, while the porting
#    bugs this report exists for are larger: the other GELU variant moves an MLP output by
#    ~1e-4 relative (O(1) activations), a wrong epsilon, a transposed kernel or a wrong RoPE
#    pairing by >= 1e-3. The absolute floor 1e-6 only rescues rows that are ~0 everywhere.
#  float64: the same arithmetic in another order: a few ulps (2.2e-16) times the condition
#    number -> ~1e-14; 1e-9 (MODEL_PARITY's whole-model bound) is far below any formula bug.
#  Run with ``--dtype float64`` to hunt a subtle bug: rounding noise drops by 8 orders of
#  magnitude and a wrong formula stands out even where it only moves the output by 1e-7.
DIFF_TOLERANCE = {
    "float32": Tolerance(rel=2e-5, abs=1e-6),
    "float64": Tolerance(rel=1e-9, abs=1e-12),
}


# --------------------------------------------------------------------------------------------
# comparing two traces


@dataclass(frozen=True)
class DiffRow:
    """One row of the report: a named tensor in both traces."""

    name: str
    shape: tuple[int, ...]  # the tensor's shape (b's, when the shapes differ)
    max_abs: float  # max|a - b| (inf when the shapes differ; nan when a value is not finite)
    rel: float  # max|a - b| / max|b|
    at: tuple[int, ...]  # index of the largest |a - b|
    passed: bool
    note: str = ""  # why a row failed without numbers (shape mismatch, non-finite values)


@dataclass
class DiffReport:
    """Two traces compared row by row (see the module docstring)."""

    a: str  # side names, e.g. "reference" and "torch"
    b: str
    dtype: str
    tolerance: Tolerance
    rows: list[DiffRow]
    only_a: list[str] = field(default_factory=list)  # rows one trace has and the other lacks
    only_b: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # model dir, architecture, input shape...

    @property
    def first_failure(self) -> str | None:
        """Name of the first row past tolerance, or None when every row passes."""
        return next((r.name for r in self.rows if not r.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None and not self.only_a and not self.only_b

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {
            "a": self.a, "b": self.b, "dtype": self.dtype,
            "tolerance": {"rel": self.tolerance.rel, "abs": self.tolerance.abs},
            "first_failure": self.first_failure, "passed": self.passed,
            "only_a": self.only_a, "only_b": self.only_b, "meta": self.meta,
            "rows": [{**dataclasses.asdict(r), "shape": list(r.shape), "at": list(r.at),
                      "max_abs": _finite_or_none(r.max_abs), "rel": _finite_or_none(r.rel),
                      "first_failure": r.name == self.first_failure} for r in self.rows],
        }

    def format(self) -> str:
        """The report as a text table, first row past tolerance marked."""
        t = self.tolerance
        lines = [f"bigmodel diff: a = {self.a}, b = {self.b}, {self.dtype}"]
        lines += [f"  {k}: {v}" for k, v in self.meta.items()]
        lines.append(f"errors are normwise: max abs = max|a - b|, max rel = max|a - b| / max|b|; a row "
                     f"passes when max rel <= {t.rel:.0e} or max abs <= {t.abs:.0e}")
        lines.append("")
        width = max([len(r.name) for r in self.rows] + [5])
        header = (f"{'row':<{width}}  {'shape':<16} {'max abs':>9} {'max rel':>9}  {'at (index)':<16} result")
        lines += [header, "-" * (len(header) + 26)]
        first = self.first_failure
        for r in self.rows:
            result = "ok" if r.passed else "FAIL"
            if r.name == first:
                result += "  <- first past tolerance"
            if r.note:
                result += f"  ({r.note})"
            lines.append(f"{r.name:<{width}}  {str(r.shape):<16} {r.max_abs:9.2e} {r.rel:9.2e}  "
                         f"{str(r.at):<16} {result}")
        lines.append("")
        for side, names in ((self.a, self.only_a), (self.b, self.only_b)):
            if names:
                lines.append(f"rows only {side} has: {', '.join(names)}")
        n_fail = sum(not r.passed for r in self.rows)
        verdict = (f"first past tolerance: {first}" if first else
                   "the traces differ in their rows" if not self.passed else "every row within tolerance")
        lines.append(f"{len(self.rows) - n_fail} passed, {n_fail} failed; {verdict}")
        return "\n".join(lines) + "\n"


def _finite_or_none(x: float) -> float | None:
    """Strict JSON has no NaN / inf: a row without a finite error writes null (its note says why)."""
    return x if np.isfinite(x) else None


def compare_row(name: str, a: Any, b: Any, tolerance: Tolerance) -> DiffRow:
    """One row: ``a`` against ``b`` (b is the scale of the relative error), in float64."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        return DiffRow(name, b64.shape, float("inf"), float("inf"), (), False,
                       f"shapes differ: a {a64.shape}, b {b64.shape}")
    if a64.size == 0:
        return DiffRow(name, b64.shape, 0.0, 0.0, (), True)
    d = np.abs(a64 - b64)
    finite = np.isfinite(d)
    if not finite.all():  # point at the first non-finite entry: where a NaN / inf enters
        at = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), d.shape))
        side = "a" if not np.isfinite(a64).all() else "b"
        return DiffRow(name, b64.shape, float("nan"), float("nan"), at, False, f"non-finite values in {side}")
    flat = int(np.argmax(d))
    max_abs = float(d.flat[flat])
    rel = max_abs / max(float(np.max(np.abs(b64))), TINY)
    return DiffRow(name, b64.shape, max_abs, rel, tuple(int(i) for i in np.unravel_index(flat, d.shape)),
                   tolerance.passes(max_abs, rel))


def compare(trace_a: Trace, trace_b: Trace, dtype: str = "float32", *, a: str = "a", b: str = "b",
            tolerance: Tolerance | None = None, meta: dict[str, Any] | None = None) -> DiffReport:
    """Compare two traces row by row, in ``trace_a``'s order; rows only one side has are listed
    (and fail the report). ``tolerance`` defaults to ``DIFF_TOLERANCE[dtype]``."""
    tol = tolerance if tolerance is not None else tolerance_for(DIFF_TOLERANCE, dtype)
    names_a = [n for n, _ in trace_a]
    dict_b = dict(trace_b)
    if len(dict_b) != len(trace_b) or len(set(names_a)) != len(names_a):
        raise ValueError("a trace has duplicate row names")
    rows = [compare_row(n, x, dict_b[n], tol) for n, x in trace_a if n in dict_b]
    return DiffReport(a, b, str(dtype), tol, rows,
                      only_a=[n for n in names_a if n not in dict_b],
                      only_b=[n for n, _ in trace_b if n not in set(names_a)], meta=dict(meta or {}))


# --------------------------------------------------------------------------------------------
# inputs, config overrides and the sides


def parse_overrides(config: Any, assignments: Sequence[str]) -> dict[str, Any]:
    """``["norm_eps=1e-5", "activation=gelu_tanh"]`` -> typed field values of ``config``'s
    dataclass (the type is the field's current value's: int, float, bool, str or None)."""
    fields = {f.name for f in dataclasses.fields(config)}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"--set {key}: {type(config).__name__} has no field {key!r}; fields: {sorted(fields)}")
        if key == "dtype":
            raise ValueError("--set dtype: use --dtype (it sets both sides)")
        cur = getattr(config, key)
        text = text.strip()
        try:
            if text.lower() in ("none", "null"):
                value: Any = None
            elif isinstance(cur, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(cur, int):
                value = int(text)
            elif isinstance(cur, float):
                value = float(text)
            elif cur is None:  # an optional field that is unset: a number if it reads as one
                value = int(text) if text.lstrip("-").isdigit() else text
            else:
                value = text
        except ValueError as e:
            raise ValueError(f"--set {key}={text!r}: cannot read as {type(cur).__name__} ({e})") from None
        out[key] = value
    return out


def make_inputs(config: Any, *, ids: Sequence[int] | None = None, text: str | None = None,
                seed: int | None = None, length: int = 8, batch_size: int = 1,
                model_dir: str | os.PathLike[str] | None = None,
                hf_config: dict[str, Any] | None = None, dtype: str = "float32") -> dict[str, np.ndarray]:
    """One batch for ``config``'s family, from exactly one of ``ids`` (one sequence), ``text``
    (tokenised with ``model_dir``'s ``tokenizer.json``) or ``seed`` (random ids (B, T) in [0, V),
    or random N(0, 1) pixels (B, C, H, W) for ViT). Default: ``seed=0``.

    Encoder-decoder models get ``decoder_input_ids`` = the same ids shifted right behind
    ``decoder_start_token_id`` (any target exercises every layer; this one needs no second input).
    """
    given = [x is not None for x in (ids, text, seed)]
    if sum(given) > 1:
        raise ValueError("give at most one of --ids, --text, --seed")
    if config.family == "vit":
        if ids is not None or text is not None:
            raise ValueError("a ViT takes images: use --seed N for random pixels")
        rng = np.random.default_rng(0 if seed is None else seed)
        shape = (batch_size, config.n_channels, config.image_size, config.image_size)
        return {"pixel_values": rng.standard_normal(shape).astype(dtype)}
    if ids is not None:
        arr = np.asarray([list(ids)], dtype=np.int64)  # (1, T)
    elif text is not None:
        arr = np.asarray([_tokenize(model_dir, text)], dtype=np.int64)
    else:
        rng = np.random.default_rng(0 if seed is None else seed)
        arr = rng.integers(0, config.vocab_size, (batch_size, length), dtype=np.int64)  # (B, T)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError("the input has no tokens")
    if arr.min() < 0 or arr.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got {arr.min()}..{arr.max()}")
    if arr.shape[1] > config.max_len:
        raise ValueError(f"{arr.shape[1]} tokens is longer than the model supports (max_len={config.max_len})")
    out = {"input_ids": arr}
    if config.family == "seq2seq":
        start = int((hf_config or {}).get("decoder_start_token_id") or 0)
        out["decoder_input_ids"] = np.concatenate([np.full((arr.shape[0], 1), start, np.int64), arr[:, :-1]], 1)
    return out


def _tokenize(model_dir: str | os.PathLike[str] | None, text: str) -> list[int]:
    """``text`` -> ids with the model directory's own tokenizer (special tokens added, as
    transformers' tokenizer call does)."""
    if model_dir is None:
        raise ValueError("--text needs the model directory's tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--text needs a tokenizer in {model_dir} ({e}); pass --ids 1,2,3 or --seed N "
                         "instead") from None
    return [int(i) for i in tok(text)["input_ids"]]


def trace_side(side: str, config: Any, params: Any, batch: dict[str, Any], task: str, *,
               model_dir: str | os.PathLike[str] | None = None, architecture: str | None = None,
               dtype: str = "float32") -> Trace:
    """The trace of one side: ours run ``config`` + ``params``; torch loads ``architecture``
    from ``model_dir`` (its own config: overrides of ours do not reach it)."""
    if side == "reference":
        return ref_trace.trace(config, params, batch, task)
    if side == "jax":  # jax imported on first use: bigmodel_port loads no autograd framework
        import jax

        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise RuntimeError("a float64 JAX trace needs jax_enable_x64 set before any JAX work")
        from bigmodel_jax.trace import trace

        return trace(config, params, batch, task)
    if side == "torch":
        if model_dir is None or architecture is None:
            raise ValueError("the torch side needs model_dir and architecture")
        return trace_torch(model_dir, architecture, batch, task, dtype)
    raise ValueError(f"unknown side {side!r}; sides: {list(SIDES)}")


def run_diff(model_dir: str | os.PathLike[str], a: str = "reference", b: str = "torch", *,
             dtype: str = "float32", overrides: Sequence[str] = (), ids: Sequence[int] | None = None,
             text: str | None = None, seed: int | None = None, length: int = 8, batch_size: int = 1,
             tolerance: Tolerance | None = None) -> DiffReport:
    """Load ``model_dir`` (HF layout), trace it on one input in sides ``a`` and ``b`` and compare.

    ``overrides``: ``key=value`` fields of OUR config, applied after the weights are loaded with
    the checkpoint's own config (so they change how our side computes, not how weights are
    read), on our side(s) only; torch always runs the checkpoint as saved.
    """
    for side in (a, b):
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}; sides: {list(SIDES)}")
    if a == b:
        raise ValueError(f"compare two different sides, got {a!r} twice")
    if dtype not in DIFF_TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(DIFF_TOLERANCE)}, got {dtype!r}")
    pre = load_pretrained(model_dir, dtype=dtype)
    changed = parse_overrides(pre.config, overrides)
    config = dataclasses.replace(pre.config, **changed) if changed else pre.config
    batch = make_inputs(config, ids=ids, text=text, seed=seed, length=length, batch_size=batch_size,
                        model_dir=model_dir, hf_config=pre.hf_config, dtype=dtype)
    traces = [trace_side(s, config, pre.params, batch, pre.task, model_dir=model_dir,
                         architecture=pre.architecture, dtype=dtype) for s in (a, b)]
    meta = {"model": str(model_dir), "architecture": f"{pre.architecture} (task {pre.task})",
            "input": ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())}
    if changed:
        meta["overrides (our side)"] = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    tol_dtype = dtype
    if "torch" in (a, b):
        model_type = pre.hf_config["model_type"]
        tol_dtype = effective_dtype(model_type, dtype)
        if tol_dtype != dtype:
            meta["note"] = (f"transformers computes {FLOAT32_INSIDE[model_type]} of {model_type} in float32 "
                            f"even in a {dtype} run, so rows are held to the {tol_dtype} tolerance")
    if tolerance is None:
        tolerance = tolerance_for(DIFF_TOLERANCE, tol_dtype)
    return compare(traces[0], traces[1], dtype, a=a, b=b, tolerance=tolerance, meta=meta)


def write_json(report: DiffReport, path: str | os.PathLike[str]) -> None:
    """Write ``report.to_dict()`` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=1)
        f.write("\n")
