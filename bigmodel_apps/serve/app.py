"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` answers
server-sent events, ``data: {json}\\n\\n`` chunks ending with ``data: [DONE]``), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). A model of ``encoders`` (no
engine) serves instead ``POST /v1/embeddings`` (OpenAI's schema), ``POST /v1/classify`` or ``POST
/v1/translate``, each request one padded forward run in a worker thread (the event loop is never
blocked); a generation endpoint asked of it, or its endpoint asked of a causal LM, answers 400
naming the endpoints the model serves.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (bad JSON, a field out of range, an empty prompt, prompt + max_tokens beyond the
context, an unknown model, an unsupported option such as n > 1), 429 with ``Retry-After`` when
the engine's waiting queue is full, 503 while shutting down. A client that disconnects cancels
its request, which frees its slot at the next step. Shutdown (uvicorn's SIGTERM handling) stops
accepting connections, lets the open streams finish, then drains and stops the engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, Literal

from bigmodel_train.extras import missing_extra

# This module is the [deploy] extra's: without it, importing the module (which `bigmodel serve`
# does when it runs, never before) raises MissingExtraError naming the extra.
try:
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
except ModuleNotFoundError as _err:
    raise missing_extra(_err.name or "fastapi", "bigmodel serve", _err, extra="deploy") from _err

from bigmodel_apps.serve.encoders import InputError
from bigmodel_apps.serve.engine import Engine, EngineStopped, QueueFull, Request, SamplingParams
from bigmodel_apps.serve.model import EncoderServed, ServedModel, render_chat

__all__ = ["create_app"]

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/translate",
               "/v1/models", "/health", "/metrics")
# what each kind of model serves (ServedModel.kind and the encoders' models' kind)
SERVED_ENDPOINTS = {"lm": "POST /v1/completions and POST /v1/chat/completions", "embedding": "POST /v1/embeddings",
                    "classification": "POST /v1/classify", "translation": "POST /v1/translate"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Sampling(BaseModel):
    """The fields both endpoints share. Unknown fields are refused (a typo is not ignored);
    OpenAI fields we do not implement are accepted only at their neutral value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = Field(False, description="not supported")
    logprobs: None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("message content parts must be {'type': 'text', 'text': ...}")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None  # not supported


class EmbeddingBody(BaseModel):
    """OpenAI's embeddings request: ``input`` a string, a list of strings, a list of token ids or
    a list of token-id lists (used as given: no special tokens are added to ids)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own width")
    user: str | None = None


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str]


class TranslateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str]
    max_tokens: int | None = Field(None, ge=1)  # new tokens per translation; None: the model's default


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in err.errors())
    return msgs, param


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self, engine: Engine | None) -> None:
        r = self.registry = CollectorRegistry()
        self.responses = Counter("bigmodel_http_responses", "HTTP responses by path and status",
                                 ["path", "status"], registry=r)
        self.requests = Counter("bigmodel_requests", "generation requests accepted", ["endpoint"], registry=r)
        self.finished = Counter("bigmodel_requests_finished", "generation requests finished, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("bigmodel_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("bigmodel_generation_tokens", "tokens generated", registry=r)
        if engine is not None:  # the encoders' models run without one
            Gauge("bigmodel_queue_depth", "requests waiting for a slot", registry=r).set_function(engine.queue_depth)
            Gauge("bigmodel_active_slots", "slots decoding a request", registry=r).set_function(engine.active)
            Gauge("bigmodel_slots", "slots of the batch", registry=r).set(engine.slots)
            Gauge("bigmodel_decode_steps", "decode steps run", registry=r).set_function(lambda: engine.steps)
        fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.ttft = Histogram("bigmodel_time_to_first_token_seconds", "request arrival to first token",
                              buckets=fast, registry=r)
        self.itl = Histogram("bigmodel_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=fast, registry=r)
        self.latency = Histogram("bigmodel_request_latency_seconds", "request arrival to last token", ["endpoint"],
                                 buckets=fast + (30.0, 60.0, 120.0), registry=r)


class _StatusCounter:
    """ASGI middleware counting responses by path and status (streaming ones included)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _Generation:
    """One request's tokens as they come from the engine's thread, turned into text deltas
    with stop strings applied (text that could start a stop string is held back)."""

    def __init__(self, app_state: _State, prompt: list[int], sampling: SamplingParams, stops: list[str],
                 endpoint: str) -> None:
        self.s, self.prompt, self.stops, self.endpoint = app_state, prompt, stops, endpoint
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.ids: list[int] = []
        self.sent = 0  # characters of text handed out
        self.finish_reason: str | None = None
        self.start = time.monotonic()
        self.last_token_at: float | None = None
        self.request = Request(prompt, sampling, self._on_token, self._on_finish)

    def _on_token(self, tok: int) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("token", tok))

    def _on_finish(self, reason: str) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("end", reason))

    def submit(self) -> None:
        try:
            self.s.engine.submit(self.request)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry after {RETRY_AFTER_S} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped as err:
            raise APIError(503, str(err), type="server_error", code="shutting_down") from None
        self.s.metrics.requests.labels(self.endpoint).inc()
        self.s.metrics.prompt_tokens.inc(len(self.prompt))

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.s.engine.cancel(self.request)

    async def deltas(self, http: HTTPRequest | None = None) -> AsyncIterator[str]:
        """Text deltas until the request finishes (``finish_reason`` set); with ``http``, a
        client that went away cancels the request."""
        hold = max((len(s) for s in self.stops), default=1) - 1
        checked = time.monotonic()
        try:
            while self.finish_reason is None:
                if http is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        self.cancel()
                        self.finish_reason = "cancelled"
                        break
                try:
                    kind, value = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if kind == "end":
                    self.finish_reason = "stop" if value == "stop" else value
                    if value.startswith("error"):
                        raise RuntimeError(value)
                else:
                    self._timing()
                    self.ids.append(value)
                text = self.s.model.decode(self.ids)
                if self.finish_reason is None and text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for its next byte
                cut = self._stop_at(text)
                if cut is not None:
                    text = text[:cut]
                    self.cancel()
                    self.finish_reason = "stop"
                end = len(text) if self.finish_reason is not None else max(self.sent, len(text) - hold)
                if end > self.sent:
                    yield text[self.sent:end]
                    self.sent = end
        finally:
            self.cancel()  # no-op when finished; a client gone or an error frees the slot
            if self.finish_reason in ("stop", "length"):
                self.s.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.start)
            self.s.metrics.finished.labels(self.finish_reason or "cancelled").inc()

    def _timing(self) -> None:
        now = time.monotonic()
        if self.last_token_at is None:
            self.s.metrics.ttft.observe(now - self.start)
        else:
            self.s.metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        self.s.metrics.generation_tokens.inc()

    def _stop_at(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.ids),
                "total_tokens": len(self.prompt) + len(self.ids)}


class _State:
    def __init__(self, model: ServedModel | EncoderServed, engine: Engine | None) -> None:
        self.model, self.engine = model, engine
        self.metrics = _Metrics(engine)
        self.pending = 0  # an encoder model's requests at or waiting for the forward
        if engine is None:
            Gauge("bigmodel_queue_depth", "requests waiting for the forward", registry=self.metrics.registry
                  ).set_function(lambda: max(self.pending - 1, 0))
        self.created = int(time.time())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(model: ServedModel | EncoderServed, engine: Engine | None = None, *,
               manage_engine: bool = True, max_queue: int = 64) -> FastAPI:
    """The FastAPI app serving ``model``: a causal LM through ``engine``, or one of the
    encoders' models, which take no engine (None). ``manage_engine``: start the engine on
    startup and drain it on shutdown (uvicorn's lifespan). ``max_queue``: an encoder model's
    requests that may wait for the running forward before the server answers 429 (a causal
    LM's limit is its engine's)."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
    if (engine is None) != (model.kind != "lm"):
        raise ValueError(f"a {model.kind} model is served {'with' if model.kind == 'lm' else 'without'} an engine")
    manage_engine = manage_engine and engine is not None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop, True)

    app = FastAPI(title="bigmodel serve", lifespan=lifespan)
    state = _State(model, engine)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    async def body_of(http: HTTPRequest, schema: type[BaseModel]) -> Any:
        raw = await http.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param) from None
        if body.model is not None and body.model != model.name:
            raise APIError(400, f"unknown model {body.model!r}; this server serves {model.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        return body

    def sampling_of(body: _Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = engine.context - prompt_len
        if max_tokens is None:
            max_tokens = max(1, min(256, room))  # chat's default: the rest of the context, capped
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                  top_k=body.top_k, top_p=None if body.top_p == 1 else body.top_p, seed=body.seed)
        try:
            engine.check(prompt_len, sampling)
        except ValueError as err:
            param = "max_tokens" if "max_tokens" in str(err) else None
            raise APIError(400, str(err), param=param) from None
        return sampling

    def stops_of(body: _Sampling, extra: list[str]) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return stops + [s for s in extra if s not in stops]

    def prompt_ids(prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            V = model.config.vocab_size
            bad = [p for p in prompt if not 0 <= p < V]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {V}), got {bad[0]}", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise APIError(400, "one prompt per request: a string, a list of one string, or a list of token ids",
                               param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return model.encode(prompt)

    async def run(http: HTTPRequest, gen: _Generation, body: _Sampling, chunk: Any, final: Any) -> Any:
        gen.submit()
        if body.stream:
            async def events() -> AsyncIterator[str]:
                async for delta in gen.deltas():
                    yield _sse(chunk(delta, None))
                yield _sse(chunk("", gen.finish_reason))
                if body.stream_options and body.stream_options.get("include_usage"):
                    yield _sse({**chunk("", None), "choices": [], "usage": gen.usage()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = "".join([d async for d in gen.deltas(http)])
        if gen.finish_reason == "cancelled":
            return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled"}}, 499)
        return final(text, gen.finish_reason)

    def require(kind: str, path: str) -> None:
        """400 unless the model is of ``kind`` (before the body is read: the endpoint is the error)."""
        if model.kind != kind:
            raise APIError(400, f"model {model.name!r} is a {model.kind} model and does not serve POST {path}; "
                           f"it serves {SERVED_ENDPOINTS[model.kind]}", code="unsupported_endpoint")

    async def in_worker(fn: Any, *args: Any, timed: str | None = None) -> Any:
        """``fn(*args)`` in a worker thread (tokenising and the jitted forward block); an
        InputError is the client's 400; with ``timed``, its latency is recorded under that endpoint."""
        start = time.monotonic()
        try:
            out = await asyncio.to_thread(fn, *args)
        except InputError as err:
            raise APIError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else "input") from None
        if timed is not None:
            state.metrics.latency.labels(timed).observe(time.monotonic() - start)
        return out

    @contextlib.asynccontextmanager
    async def queued() -> AsyncIterator[None]:
        """An encoder request's turn at the forward: 429 with ``Retry-After`` when ``max_queue``
        requests already wait behind the running one (the event loop is one thread, so the
        count needs no lock)."""
        if state.pending > max_queue:
            raise APIError(429, f"the server is busy: {state.pending - 1} requests are waiting (max_queue="
                           f"{max_queue}); retry after {RETRY_AFTER_S} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        state.pending += 1
        try:
            yield
        finally:
            state.pending -= 1

    def accepted(endpoint: str, ids: list[list[int]]) -> int:
        n = sum(map(len, ids))
        state.metrics.requests.labels(endpoint).inc()
        state.metrics.prompt_tokens.inc(n)
        return n

    @app.post("/v1/embeddings")
    async def embeddings(http: HTTPRequest) -> Any:
        require("embedding", "/v1/embeddings")
        body: EmbeddingBody = await body_of(http, EmbeddingBody)
        D = model.config.d_model
        if body.dimensions is not None and body.dimensions != D:
            raise APIError(400, f"dimensions must be {D}, this model's width (no reduced sizes)", param="dimensions")
        ids = await in_worker(partial(model.ids_of, allow_ids=True), body.input)
        n = accepted("embeddings", ids)
        async with queued():
            vectors = await in_worker(model.embed, ids, timed="embeddings")  # (N, D) float32
        if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        return {"object": "list", "model": model.name, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}

    @app.post("/v1/classify")
    async def classify(http: HTTPRequest) -> Any:
        require("classification", "/v1/classify")
        body: ClassifyBody = await body_of(http, ClassifyBody)
        ids = await in_worker(model.ids_of, body.input)
        n = accepted("classify", ids)
        async with queued():
            probs = await in_worker(model.classify, ids, timed="classify")  # (N, C)
        data = [{"index": i, "label": model.labels[k], "label_index": k, "probs": p.tolist(),
                 "num_classes": len(model.labels)} for i, (k, p) in enumerate(zip(probs.argmax(-1).tolist(), probs))]
        return {"object": "list", "model": model.name, "labels": list(model.labels), "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/translate")
    async def translate(http: HTTPRequest) -> Any:
        require("translation", "/v1/translate")
        body: TranslateBody = await body_of(http, TranslateBody)
        ids = await in_worker(model.ids_of, body.input)
        max_tokens = await in_worker(model.check_max_tokens, body.max_tokens)
        n = accepted("translate", ids)
        texts = [body.input] if isinstance(body.input, str) else body.input
        async with queued():
            out, generated = await in_worker(model.translate, texts, max_tokens, timed="translate")
        state.metrics.generation_tokens.inc(generated)
        return {"object": "list", "model": model.name,
                "data": [{"index": i, "translation": t} for i, t in enumerate(out)],
                "usage": {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        require("lm", "/v1/completions")
        body: CompletionBody = await body_of(http, CompletionBody)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        ids = prompt_ids(body.prompt)
        gen = _Generation(state, ids, sampling_of(body, len(ids), body.max_tokens), stops_of(body, []), "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        def final(text: str, reason: str) -> dict:
            return {**chunk(text, reason), "usage": gen.usage()}

        return await run(http, gen, body, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest) -> Any:
        require("lm", "/v1/chat/completions")
        body: ChatBody = await body_of(http, ChatBody)
        try:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
            text = render_chat(model.chat_template, messages, model.special_tokens)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = model.encode(text, chat=True)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = _Generation(state, ids, sampling_of(body, len(ids), max_tokens), stops_of(body, model.chat_stop), "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def chunk(text: str, reason: str | None) -> dict:
            delta: dict[str, Any] = {"content": text} if text or reason is None else {}
            if first[0]:
                delta["role"] = "assistant"
                first[0] = False
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def final(text: str, reason: str) -> dict:
            return {"id": rid, "object": "chat.completion", "created": created, "model": model.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": reason}], "usage": gen.usage()}

        return await run(http, gen, body, chunk, final)

    @app.get("/v1/models")
    async def models() -> dict:
        context = model.max_len if engine is None else engine.context
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": state.created,
                                            "owned_by": "bigmodel", "max_model_len": context,
                                            **({"quantization": model.quantization}
                                               if getattr(model, "quantization", None) else {})}]}

    @app.get("/health")
    async def health() -> dict:
        if engine is None:
            return {"status": "ok", "kind": model.kind}
        return {"status": "ok", "slots": engine.slots, "active": engine.active(), "queue": engine.queue_depth()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_StatusCounter, metrics=state.metrics)
    return app

