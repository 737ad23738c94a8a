"""``bigmodel diff``: the per-layer divergence report (``bigmodel_port.diff``) and its traces.

Tiny random-init transformers models are saved to a tmp directory and traced three ways
(``reference_numpy.trace``, ``bigmodel_jax.trace``, ``bigmodel_port.trace_torch``). A clean
checkpoint passes every row; a planted porting bug on ONE side must be reported at exactly the
layer where it enters.

The HF models use ``initializer_range`` 0.2, not the default 0.02: with 0.02 the MLP
pre-activations are ~0.1, where erf-GELU and tanh-GELU differ by ~1e-7 (the difference grows like
x^4), i.e. by float32 rounding; at 0.2 they are O(1) and the variants differ by ~1e-4.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from bigmodel_apps.cli import main  # noqa: E402
from bigmodel_port.diff import (  # noqa: E402
    DIFF_TOLERANCE,
    compare,
    compare_row,
    make_inputs,
    parse_overrides,
    run_diff,
    trace_side,
)
from bigmodel_port.hf.checkpoint import load_pretrained  # noqa: E402
from reference_numpy.tolerances import Tolerance  # noqa: E402

INIT = 0.2  # see the module docstring


def _bert(cls_name: str):
    labels = 2 if cls_name == "BertForQuestionAnswering" else 3  # HF's QA head has num_labels outputs
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=32, initializer_range=INIT,
                                  num_labels=labels)
    return getattr(transformers, cls_name)(cfg)


def _gpt2(cls_name: str = "GPT2LMHeadModel"):
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                  initializer_range=INIT, bos_token_id=0, eos_token_id=0)
    return getattr(transformers, cls_name)(cfg)


def _llama():
    # intermediate_size == hidden_size: the MLP kernels are square, so one can be transposed
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   initializer_range=INIT, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _vit(cls_name: str):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=32, num_labels=3, initializer_range=INIT)
    return getattr(transformers, cls_name)(cfg)


def _marian():
    cfg = transformers.MarianConfig(vocab_size=60, d_model=16, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                    decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=59,
                                    eos_token_id=0, decoder_start_token_id=59, init_std=INIT, scale_embedding=True)
    return transformers.MarianMTModel(cfg)


BUILDERS = {
    "bert": lambda: _bert("BertForMaskedLM"),
    "bert_base": lambda: _bert("BertModel"),
    "bert_seq": lambda: _bert("BertForSequenceClassification"),
    "bert_qa": lambda: _bert("BertForQuestionAnswering"),
    "gpt2": _gpt2,
    "gpt2_base": lambda: _gpt2("GPT2Model"),
    "llama": _llama,
    "vit": lambda: _vit("ViTForImageClassification"),
    "vit_base": lambda: _vit("ViTModel"),
    "marian": _marian,
}

L2 = ["layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"]
ROWS = {
    "bert": ["embeddings", *L2, "logits"],
    "bert_base": ["embeddings", *L2, "last_hidden_state", "pooler_output"],
    "bert_seq": ["embeddings", *L2, "pooler_output", "logits"],
    "bert_qa": ["embeddings", *L2, "logits"],
    "gpt2": ["embeddings", *L2, "final_norm", "logits"],
    "gpt2_base": ["embeddings", *L2, "final_norm", "last_hidden_state"],
    "llama": ["embeddings", *L2, "final_norm", "logits"],
    "vit": ["embeddings", *L2, "final_norm", "logits"],
    "vit_base": ["embeddings", *L2, "final_norm", "last_hidden_state", "pooler_output"],
    "marian": ["encoder.embeddings", *(f"encoder.{r}" for r in L2), "decoder.embeddings",
               *(f"decoder.layer{i}.{s}" for i in range(2) for s in ("attention", "cross_attention", "mlp")),
               "logits"],
}


class Model:
    """One saved tiny HF model, loaded by us, with its torch trace computed once per dtype."""

    def __init__(self, directory, dtype: str = "float32"):
        self.dir = directory
        self.dtype = dtype
        self.pre = load_pretrained(directory, dtype=dtype)
        self.batch = make_inputs(self.pre.config, seed=0, batch_size=2, length=6, hf_config=self.pre.hf_config,
                                 dtype=dtype)
        self.torch = self.trace("torch")

    def trace(self, side: str, config=None, params=None):
        return trace_side(side, config or self.pre.config, params or self.pre.params, self.batch, self.pre.task,
                          model_dir=self.dir, architecture=self.pre.architecture, dtype=self.dtype)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """``model(name)``: the saved and loaded tiny model ``name`` of ``BUILDERS`` (cached)."""
    cache: dict[str, Model] = {}

    def get(name: str) -> Model:
        if name not in cache:
            torch.manual_seed(0)
            d = tmp_path_factory.mktemp(name)
            BUILDERS[name]().eval().save_pretrained(d)
            cache[name] = Model(d)
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# clean checkpoints: every row within tolerance, the same row names on every side


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "marian"])
def test_clean_checkpoint_passes_every_row_on_all_three_pairs(model, name):
    m = model(name)
    ref, jx = m.trace("reference"), m.trace("jax")
    for a, b, (ta, tb) in (("reference", "torch", (ref, m.torch)), ("jax", "torch", (jx, m.torch)),
                           ("reference", "jax", (ref, jx))):
        report = compare(ta, tb, "float32", a=a, b=b)
        assert [r.name for r in report.rows] == ROWS[name], (a, b)
        assert report.passed, f"{a} vs {b}\n{report.format()}"
        assert report.first_failure is None
        # the clean float32 error is rounding only: far below the tolerance the bugs are held to
        assert max(r.rel for r in report.rows) < 5e-6, report.format()


@pytest.mark.parametrize("name", ["bert_base", "bert_seq", "bert_qa", "gpt2_base", "vit_base"])
def test_clean_report_for_other_heads(model, name):
    """Base models end with last_hidden_state [+ pooler_output]; QA logits are (B, T, 2)."""
    m = model(name)
    report = compare(m.trace("reference"), m.torch, "float32", a="reference", b="torch")
    assert [r.name for r in report.rows] == ROWS[name]
    assert report.passed, report.format()
    if name == "bert_qa":
        assert report.rows[-1].shape == (2, 6, 2)


def test_float64_reference_vs_jax_agree_to_rounding(tmp_path):
    torch.manual_seed(0)
    _bert("BertForMaskedLM").save_pretrained(tmp_path)
    report = run_diff(tmp_path, "reference", "jax", dtype="float64", seed=3)
    assert report.passed and report.tolerance == DIFF_TOLERANCE["float64"]
    assert max(r.rel for r in report.rows) < 1e-13, report.format()
    # BERT's torch side computes everything in the model dtype: float64 rows pass at 1e-9
    report = run_diff(tmp_path, "jax", "torch", dtype="float64", seed=3)
    assert report.passed and "note" not in report.meta, report.format()


def test_float64_llama_vs_torch_is_held_to_float32_and_says_why(model):
    """transformers runs Llama's RMSNorm, softmax and RoPE tables in float32 even in float64."""
    report = run_diff(model("llama").dir, "reference", "torch", dtype="float64")
    assert report.passed, report.format()
    assert report.tolerance == DIFF_TOLERANCE["float32"]
    assert "RMSNorm" in report.meta["note"]


# --------------------------------------------------------------------------------------------
# the trace is the model


def _forward(side: str, config, params, batch, task):
    """The family's own ``forward`` on ``side`` (``reference_numpy.models`` / ``bigmodel_jax.models``)."""
    import importlib

    package = "reference_numpy" if side == "reference" else "bigmodel_jax"
    family = importlib.import_module(f"{package}.models.{config.family}")
    if side == "jax":
        from bigmodel_jax.tree import to_jax

        params = to_jax(params)
    out = (family.forward(params, batch, config, task) if config.family == "bert"
           else family.forward(params, batch, config))
    return np.asarray(out)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "marian"])
@pytest.mark.parametrize("side", ["reference", "jax"])
def test_trace_ends_with_the_models_own_forward_bit_for_bit(model, name, side):
    m = model(name)
    rows = m.trace(side)
    expected = _forward(side, m.pre.config, m.pre.params, m.batch, m.pre.task)
    assert rows[-1][0] == "logits"
    np.testing.assert_array_equal(rows[-1][1], expected)
    assert rows[-1][1].dtype == expected.dtype


# --------------------------------------------------------------------------------------------
# planted porting bugs, each on one side: the first row past tolerance names the layer


def _square(a: np.ndarray, out_kernel: bool) -> np.ndarray:
    """Transpose a kernel as its (In, Out) matrix: the forgotten ``weight.T`` of a port.
    (D, H, E) and (D, F) kernels are (D, rest); attention out kernels (H, E, D) are (H E, D)."""
    m = a.reshape(-1, a.shape[-1]) if out_kernel else a.reshape(a.shape[0], -1)
    assert m.shape[0] == m.shape[1], f"kernel {a.shape} is not square"
    return m.T.reshape(a.shape).copy()


def _transposed(params, path: str, layer: int):
    """A copy of ``params`` with layer ``layer`` of the stacked kernel at ``path`` transposed."""
    out = _copy(params)  # the loaded tree is shared between tests: never edit it in place
    node = out
    *parents, leaf = path.split("/")
    for k in parents:
        node = node[k]
    k = node[leaf].copy()
    k[layer] = _square(k[layer], out_kernel=path.endswith("out/kernel"))
    node[leaf] = k
    return out


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


PLANTED = [
    # (model, our side, config overrides, kernel to transpose (path, layer), expected first bad row)
    ("bert", "reference", {"norm_eps": 1e-3}, None, "embeddings"),  # the embedding LayerNorm is first
    ("gpt2", "jax", {"norm_eps": 1e-3}, None, "layer0.attention"),  # pre-norm: first norm is ln_1
    ("bert", "reference", {"activation": "gelu_tanh"}, None, "layer0.mlp"),
    ("bert", "jax", {"activation": "gelu_tanh"}, None, "layer0.mlp"),
    ("marian", "reference", {"activation": "gelu_tanh"}, None, "encoder.layer0.mlp"),
    ("bert", "reference", {}, ("layers/attn/query/kernel", 1), "layer1.attention"),
    ("gpt2", "jax", {}, ("layers/attn/out/kernel", 1), "layer1.attention"),
    ("llama", "reference", {}, ("layers/mlp/up/kernel", 1), "layer1.mlp"),
    ("marian", "jax", {}, ("decoder/layers/cross_attn/value/kernel", 0), "decoder.layer0.cross_attention"),
    ("llama", "reference", {"rope_layout": "interleaved"}, None, "layer0.attention"),
    ("llama", "jax", {"rope_layout": "interleaved"}, None, "layer0.attention"),
]


@pytest.mark.parametrize("name,side,overrides,kernel,expected", PLANTED,
                         ids=[f"{p[0]}-{p[1]}-{p[4]}" for p in PLANTED])
def test_planted_mismatch_is_reported_at_its_layer(model, name, side, overrides, kernel, expected):
    m = model(name)
    config = dataclasses.replace(m.pre.config, **overrides)
    params = _transposed(m.pre.params, *kernel) if kernel else m.pre.params
    report = compare(m.trace(side, config, params), m.torch, "float32", a=side, b="torch")
    assert report.first_failure == expected, report.format()
    first = report.rows[[r.name for r in report.rows].index(expected)]
    # clearly past the tolerance (the other GELU is the subtlest: ~1e-4, 5x the tolerance and
    # ~500x the clean rounding error), not a marginal call
    assert first.rel > 3 * DIFF_TOLERANCE["float32"].rel, report.format()
    assert "<- first past tolerance" in next(ln for ln in report.format().splitlines() if ln.startswith(expected + " "))
    # everything before the bug still agrees
    assert all(r.passed for r in report.rows[:report.rows.index(first)])


def test_planted_mismatch_between_our_two_sides(model):
    """reference vs jax with the other GELU on the JAX side only."""
    m = model("bert")
    bad = m.trace("jax", dataclasses.replace(m.pre.config, activation="gelu_tanh"))
    report = compare(m.trace("reference"), bad, "float32", a="reference", b="jax")
    assert report.first_failure == "layer0.mlp", report.format()


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_clean_report(model, capsys):
    d = model("gpt2").dir
    assert main(["diff", str(d), "--a", "jax", "--b", "torch", "--ids", "1,2,3,4,5"]) == 0
    out = capsys.readouterr().out
    assert "a = jax, b = torch, float32" in out and "input_ids (1, 5)" in out
    for row in ROWS["gpt2"]:
        assert f"\n{row} " in out
    assert "every row within tolerance" in out and "FAIL" not in out


def test_cli_set_plants_a_bug_and_writes_json(model, capsys, tmp_path):
    d = model("bert").dir
    js = tmp_path / "report.json"
    rc = main(["diff", str(d), "--a", "reference", "--b", "torch", "--seed", "4", "--set", "norm_eps=1e-3",
               "--json", str(js)])
    assert rc == 1
    out = capsys.readouterr().out
    assert "overrides (our side): norm_eps=0.001" in out
    marked = [ln for ln in out.splitlines() if "<- first past tolerance" in ln]
    assert len(marked) == 1 and marked[0].startswith("embeddings ")
    assert "first past tolerance: embeddings" in out
    data = json.loads(js.read_text())
    assert data["first_failure"] == "embeddings" and data["passed"] is False
    assert [r["name"] for r in data["rows"]] == ROWS["bert"]
    assert data["rows"][0]["first_failure"] and not data["rows"][0]["passed"]
    assert data["tolerance"] == {"rel": DIFF_TOLERANCE["float32"].rel, "abs": DIFF_TOLERANCE["float32"].abs}


def test_cli_text_input_uses_the_directorys_tokenizer(tmp_path, capsys):
    torch.manual_seed(0)
    _bert("BertForMaskedLM").save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "port", "##ing"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path)
    n = len(tok("hello porting world")["input_ids"])  # special tokens included, as transformers adds them
    capsys.readouterr()
    assert main(["diff", str(tmp_path), "--a", "reference", "--b", "torch", "--text", "hello porting world"]) == 0
    assert f"input_ids (1, {n})" in capsys.readouterr().out


def test_cli_rtol_override_and_bad_arguments(model, capsys):
    d = str(model("bert").dir)
    # a tolerance below float32 rounding fails a clean checkpoint: the flags reach the report
    assert main(["diff", d, "--a", "reference", "--b", "jax", "--rtol", "1e-12", "--atol", "0"]) == 1
    assert "max rel <= 1e-12" in capsys.readouterr().out
    assert main(["diff", d, "--set", "norm_epsilon=1e-5"]) == 2  # bad input: one line, exit 2
    assert "error: " in (err := capsys.readouterr().err) and "has no field 'norm_epsilon'" in err
    assert main(["diff", d, "--a", "jax", "--b", "jax"]) == 2
    assert "two different sides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diff", d, "--ids", "1,2", "--seed", "3"])  # one input source only


# --------------------------------------------------------------------------------------------
# report logic


def test_compare_rows_shapes_nonfinite_and_missing_rows():
    tol = Tolerance(rel=1e-5, abs=0.0)
    a = [("embeddings", np.ones((1, 2, 3))), ("layer0.mlp", np.array([1.0, np.nan])), ("extra", np.zeros(1)),
         ("logits", np.ones((2, 2)))]
    b = [("embeddings", np.ones((1, 2, 3))), ("layer0.mlp", np.array([1.0, 2.0])), ("logits", np.ones((2, 3))),
         ("only_b", np.zeros(1))]
    report = compare(a, b, "float64", tolerance=tol)
    assert [r.name for r in report.rows] == ["embeddings", "layer0.mlp", "logits"]
    assert report.first_failure == "layer0.mlp"
    nan_row = report.rows[1]
    assert nan_row.at == (1,) and "non-finite values in a" in nan_row.note
    assert "shapes differ" in report.rows[2].note
    assert report.only_a == ["extra"] and report.only_b == ["only_b"] and not report.passed
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON even with NaN rows
    text = report.format()
    assert "rows only a has: extra" in text and "rows only b has: only_b" in text


def test_compare_row_reports_normwise_error_and_where():
    b = np.zeros((2, 3, 4))
    b[1, 2, 3] = 4.0
    a = b.copy()
    a[0, 1, 2] = 0.02
    row = compare_row("x", a, b, Tolerance(rel=1e-3, abs=0.0))
    assert row.at == (0, 1, 2) and row.max_abs == pytest.approx(0.02) and row.rel == pytest.approx(0.005)
    assert not row.passed


def test_parse_overrides_types_and_errors(model):
    config = model("llama").pre.config
    got = parse_overrides(config, ["norm_eps=1e-5", "rope_layout=interleaved", "n_kv_heads=4", "bias=true",
                                   "head_dim=None"])
    assert got == {"norm_eps": 1e-5, "rope_layout": "interleaved", "n_kv_heads": 4, "bias": True, "head_dim": None}
    assert isinstance(got["norm_eps"], float)
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(config, ["norm_eps"])
    with pytest.raises(ValueError, match="cannot read as float"):
        parse_overrides(config, ["norm_eps=small"])
    with pytest.raises(ValueError, match="use --dtype"):
        parse_overrides(config, ["dtype=float64"])


def test_inputs_are_checked(model):
    config = model("bert").pre.config
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        make_inputs(config, ids=[1, 50])
    with pytest.raises(ValueError, match="at most one"):
        make_inputs(config, ids=[1], seed=0)
    with pytest.raises(ValueError, match="ViT takes images"):
        make_inputs(model("vit").pre.config, ids=[1, 2])
