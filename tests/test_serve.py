"""``bigmodel serve``: the continuous-batching engine and the OpenAI-compatible HTTP API, driven
by real clients (the official ``openai`` package, httpx) over 127.0.0.1.

The model is a tiny random GPT with a character tokenizer (token i <-> one printable character,
so text and ids map one to one and the server's text can be compared with ``generate``'s ids).
Every server binds a free loopback port, every request has a timeout, and every server stops
by itself at the end of its test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import jax
import numpy as np
import openai
import pytest

from bigmodel_apps.serve.app import create_app
from bigmodel_apps.serve.engine import Engine, QueueFull, Request, SamplingParams, compiled_shapes, sample_token
from bigmodel_apps.serve.model import DEFAULT_CHAT_TEMPLATE, ServedModel, render_chat
from bigmodel_jax.generation import generate
from bigmodel_jax.models import gpt as jgpt
from reference_numpy.configs import GPTConfig
from serve_util import TIMEOUT, Server, tiny_gpt_hf_dir

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # ids 0..95; EOS = 96
EOS = len(CHARS)
CONFIG = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=EOS + 1, max_len=128, dropout=0.0)


def _encode(text: str, chat: bool = False) -> list[int]:
    return [EOS] + [CHARS.index(c) if c in CHARS else 0 for c in text]  # a document starts after EOS


def _decode(ids: Sequence[int]) -> str:
    return "".join(CHARS[i] for i in ids if 0 <= i < EOS)


@pytest.fixture(scope="module")
def params():
    # weights scaled up from GPT-2's small init, so greedy continuations vary from token to token
    # (a plain random init repeats one token) and equality tests compare varied sequences
    return jax.tree.map(lambda w: w * 6.0, jgpt.init(CONFIG, seed=3))


def _model(params, eos: bool = True) -> ServedModel:
    return ServedModel("tiny", CONFIG, params, _encode, _decode, (EOS,) if eos else ())


def _serve(params, *, slots: int = 4, max_queue: int = 16, context: int | None = None, eos: bool = True,
           start_engine: bool = True) -> tuple[Server, Engine]:
    engine = Engine(params, CONFIG, slots=slots, context=context, max_queue=max_queue, eos_ids=(EOS,) if eos else ())
    app = create_app(_model(params, eos), engine, manage_engine=start_engine)
    return Server(app), engine


@pytest.fixture(scope="module")
def server(params) -> Iterator[Server]:
    srv, engine = _serve(params)
    yield srv
    srv.stop()
    engine.stop()


def _client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _greedy_text(params, prompt: str, n: int) -> tuple[str, str]:
    """``generate``'s greedy continuation of ``prompt`` as text, and why it stopped."""
    ids = np.asarray([_encode(prompt)], np.int32)
    out = np.asarray(generate(params, ids, CONFIG, max_new_tokens=n, eos_token_id=EOS))[0, ids.shape[1]:].tolist()
    if EOS in out:
        return _decode(out[:out.index(EOS)]), "stop"
    return _decode(out), "length"


# -- engine ----------------------------------------------------------------------------------------


def _collect(engine: Engine, prompt: list[int], sampling: SamplingParams) -> tuple[list[int], threading.Event, list]:
    toks: list[int] = []
    done = threading.Event()
    reason: list[str] = []
    engine.submit(Request(prompt, sampling, toks.append, lambda r: (reason.append(r), done.set())))
    return toks, done, reason


def test_engine_greedy_rows_equal_generate_and_nothing_recompiles(params):
    """Requests of different lengths joining and leaving a 3-slot batch (more requests than
    slots) each get exactly ``generate``'s greedy tokens; after warmup no request compiles."""
    engine = Engine(params, CONFIG, slots=3, context=96, eos_ids=())
    engine.warmup()
    before = compiled_shapes()
    engine.start()
    rng = np.random.default_rng(0)
    prompts = [[EOS] + rng.integers(0, EOS, size=int(n)).tolist() for n in rng.integers(1, 40, size=5)]
    lengths = [int(n) for n in rng.integers(1, 30, size=5)]
    runs = [_collect(engine, p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths)]
    for (toks, done, reason), p, n in zip(runs, prompts, lengths):
        assert done.wait(TIMEOUT)
        want = np.asarray(generate(params, np.asarray([p], np.int32), CONFIG, max_new_tokens=n))[0, len(p):]
        assert toks == want.tolist(), f"prompt of {len(p)} tokens"
        assert reason == ["length"]
    engine.stop()
    assert compiled_shapes() == before, "a request compiled a new shape"
    assert engine.active() == 0


def test_engine_queue_bound_and_cancel(params):
    engine = Engine(params, CONFIG, slots=1, context=64, max_queue=2)  # not started: requests wait
    waiting = [_collect(engine, [EOS, 1], SamplingParams(max_tokens=5)) for _ in range(2)]
    with pytest.raises(QueueFull):
        _collect(engine, [EOS, 1], SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.check(10, SamplingParams(max_tokens=60))
    with pytest.raises(ValueError, match="temperature"):
        engine.check(10, SamplingParams(max_tokens=1, temperature=-1.0))
    engine.cancel(Request([EOS], SamplingParams(1), print, print))  # unknown requests are harmless
    engine.start()
    for toks, done, reason in waiting:
        assert done.wait(TIMEOUT) and reason == ["length"] and len(toks) == 5
    engine.stop()


def test_sample_token_respects_top_k_and_top_p():
    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample_token(logits, SamplingParams(1, temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {0, 1}
    # the mass before token 2 is 0.8: it goes at top_p = 0.75, stays at 0.85
    draws = {sample_token(logits, SamplingParams(1, temperature=1.0, top_p=0.75), rng) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_token(logits, SamplingParams(1, temperature=1.0, top_p=0.85), rng) for _ in range(400)}
    assert draws == {0, 1, 2}


# -- HTTP with the openai client ----------------------------------------------------------------


def test_completions_greedy_equals_generate_plain_and_streamed(server, params):
    client = _client(server)
    for prompt, n in [("def f(x):", 20), ("import os\n", 7), ("a", 40)]:
        want, why = _greedy_text(params, prompt, n)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
        assert got.choices[0].text == want
        assert got.choices[0].finish_reason == why
        assert got.usage.prompt_tokens == len(_encode(prompt))
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == why


def test_chat_plain_and_streamed(server, params):
    client = _client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = render_chat(None, messages, {})
    want, _ = _greedy_text(params, prompt, 12)
    want = want.split("<|im_end|>")[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sampling_is_seeded(server):
    client = _client(server)
    a = client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_stop_strings(server, params):
    full, _ = _greedy_text(params, "q", 30)
    stop = full[5:7]
    want = full[:full.index(stop)]
    client = _client(server)
    got = client.completions.create(model="tiny", prompt="q", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="q", max_tokens=30, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_models_health_metrics(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    client.completions.create(model="tiny", prompt="m", max_tokens=3, temperature=0)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert http.get("/health").json()["status"] == "ok"
        text = http.get("/metrics").text
    for name in ("bigmodel_requests_total", "bigmodel_generation_tokens_total", "bigmodel_queue_depth",
                 "bigmodel_time_to_first_token_seconds_bucket", "bigmodel_inter_token_latency_seconds_bucket",
                 "bigmodel_request_latency_seconds_bucket", 'bigmodel_http_responses_total{path="/v1/completions"'):
        assert name in text, name


# -- bad requests -----------------------------------------------------------------------------------

BAD = [
    ({"model": "tiny", "prompt": ""}, "empty"),
    ({"model": "other", "prompt": "a"}, "unknown model"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 500}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "a", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": "a", "top_k": 0}, "top_k"),
    ({"model": "tiny", "prompt": "a", "n": 2}, "n"),
    ({"model": "tiny", "prompt": "a", "bogus": 1}, "bogus"),
    ({"model": "tiny", "prompt": [1, 2, 999]}, "token ids"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "one prompt"),
    ({"prompt": "a"}, "model"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_completion_requests_answer_400(server, body, needle):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_bad_json_and_bad_chat_answer_400(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 400
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a", "temperature": NaN}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):  # what the official client raises
        _client(server).completions.create(model="tiny", prompt="a", top_p=2.0)


def _slow(engine: Engine, seconds: float) -> None:
    """Make every decode step take at least ``seconds`` (a slow model), so a test can act while
    a request is still decoding."""
    step = engine._step

    def slow_step() -> None:
        time.sleep(seconds)
        step()

    engine._step = slow_step


def test_full_queue_answers_429_with_retry_after(params):
    srv, engine = _serve(params, slots=1, max_queue=1)
    _slow(engine, 0.02)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 100, "stream": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as http:
            async with http.stream("POST", "/v1/completions", json=body) as first:  # takes the slot
                await first.aiter_lines().__anext__()
                async with http.stream("POST", "/v1/completions", json=body) as second:  # waits in the queue
                    assert second.status_code == 200
                    await asyncio.sleep(0.1)
                    r = await http.post("/v1/completions", json={**body, "stream": False})
                    assert r.status_code == 429
                    assert r.headers["retry-after"] == "1"
                    assert r.json()["error"]["type"] == "rate_limit_error"
                    client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                                                timeout=TIMEOUT)
                    with pytest.raises(openai.RateLimitError):
                        await client.completions.create(model="tiny", prompt="a", max_tokens=3)
                    await client.close()
    try:
        asyncio.run(scenario())
    finally:
        srv.stop()
        engine.stop(drain=False)


def test_client_disconnect_frees_the_slot(params):
    srv, engine = _serve(params, slots=1, max_queue=4)
    _slow(engine, 0.02)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http:
            with http.stream("POST", "/v1/completions",
                             json={"model": "tiny", "prompt": "a", "max_tokens": 120, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines)
                assert engine.active() == 1
            # closed after the first chunk: the slot must be free long before 120 steps (2.4 s)
            deadline = time.monotonic() + 2.0
            while engine.active() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.active() == 0
            assert engine.steps < 60
            # a non-streaming request whose client gives up also frees its slot
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 120}, timeout=0.3)
            deadline = time.monotonic() + 2.0
            while engine.active() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.active() == 0
            assert 'reason="cancelled"} 2.0' in http.get("/metrics").text
            # and the freed slot serves the next request
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3})
            assert r.status_code == 200
    finally:
        srv.stop()
        engine.stop(drain=False)


# -- chat templates -----------------------------------------------------------------------------------


def test_render_chat_default_and_tokenizer_template():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(None, msgs, {}) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, msgs, {}) == render_chat(None, msgs, {})
    llama = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
             "{% else %}{{ raise_exception('only user turns') }}{% endif %}\n{% endfor %}")
    assert render_chat(llama, msgs, {"bos_token": "<s>"}) == "<s>[INST] hi [/INST]"
    with pytest.raises(ValueError, match="only user turns"):
        render_chat(llama, [{"role": "assistant", "content": "x"}], {"bos_token": "<s>"})


# -- the command: a real process, SIGTERM -----------------------------------------------------------


@pytest.mark.slow
def test_cli_serves_an_hf_dir_and_sigterm_finishes_in_flight_requests(tmp_path):
    model_dir = tiny_gpt_hf_dir(tmp_path / "tinygpt")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "bigmodel_apps", "serve", str(model_dir), "--port", str(port),
                             "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        assert client.models.list().data[0].id == "tinygpt"
        chat = client.chat.completions.create(model="tinygpt", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.usage.completion_tokens >= 1
        # SIGTERM while a stream is running: the stream completes, then the process exits 0
        stream = client.completions.create(model="tinygpt", prompt="def", max_tokens=40, temperature=0, stream=True)
        it = iter(stream)
        first = next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert (rest or [first])[-1].choices[0].finish_reason in ("stop", "length")
        # uvicorn re-raises the captured SIGTERM once its graceful shutdown is done, so the
        # process ends by that signal (exit status 143 in a shell), after the stream finished
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_load_16_concurrent_streaming_clients_no_5xx(params):
    """A bounded load test: 16 concurrent streaming clients x 3 requests each on an 8-slot
    engine (so requests also queue); every request answers 200 with tokens, none 5xx."""
    from bigmodel_apps.serve.load import run_load

    srv, engine = _serve(params, slots=8, max_queue=64, eos=False)
    try:
        engine.warmup()
        report = run_load(srv.url, "tiny", clients=16, requests_per_client=3, max_tokens=16, prompt="def f():",
                          timeout=TIMEOUT)
    finally:
        srv.stop()
        engine.stop(drain=False)
    print(json.dumps(report))
    assert report["5xx"] == 0 and report["transport_errors"] == 0, report
    assert report["ok"] == 48
    assert report["ttft_p50_ms"] > 0 and report["itl_p99_ms"] >= report["itl_p50_ms"]


@pytest.mark.slow
def test_a_trained_lm_run_is_served_like_generate(tmp_path):
    """``bigmodel serve RUN_DIR``'s model: a run's prompt is encoded as the task's generation
    encodes it (after an EOS, byte tokens), its EOS ends a request, and the engine's greedy
    tokens equal ``generate``'s on the run's weights."""
    from bigmodel_apps.cli import main
    from bigmodel_apps.serve.model import load_model
    from bigmodel_train.trainer import load_run

    run = tmp_path / "run"
    args = ["task=lm", "model=gpt2-tiny", "data=stdlib", "tokenizer=byte", "max_chars=20000", "seq_len=16",
            "batch_size=4", "steps=2", "warmup_steps=0", "eval_every=0", "sample_tokens=0", "progress=false",
            "plots=false", "tensorboard=false"]
    assert main(["train", *args, "--run-dir", str(run)]) == 0
    model = load_model(run)
    _, task, _, _ = load_run(run)
    prompt = model.encode("def f(x):")
    assert prompt == [int(i) for i in task.encode_prompt("def f(x):")[0]]
    assert prompt[0] == task.eos_id and prompt[1:] == list(b"def f(x):")
    assert model.eos_ids == (task.eos_id,)
    engine = Engine(model.params, model.config, slots=2, context=64, eos_ids=())
    engine.start()
    toks, done, _ = _collect(engine, prompt, SamplingParams(max_tokens=12))
    assert done.wait(TIMEOUT)
    engine.stop()
    want = np.asarray(generate(jax.tree.map(np.asarray, model.params), np.asarray([prompt], np.int32),
                               model.config, max_new_tokens=12))[0, len(prompt):]
    assert toks == want.tolist()
