"""A bounded asyncio load client for ``bigmodel serve``, and the engine's decode throughput.

``run_load``: C concurrent streaming clients, each sending R requests one after another (C x R
in all, then it stops), over httpx to a server's ``/v1/completions``. Reports requests/s,
generated tokens/s, time to first token and inter-token latency (p50 / p99, from the SSE
chunks' arrival times), and the count of 5xx / other failures. Used by
``benchmarks/serve_load.py`` and the slow load test.

``decode_throughput``: aggregate decode tokens/s of the engine with S streams decoding together
(prefill excluded), the number behind "16 streams vs 1".
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import numpy as np

from bigmodel_apps.serve.engine import Engine, Request, SamplingParams

__all__ = ["decode_throughput", "run_load"]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _one(client: Any, url: str, body: dict[str, Any], ttft: list[float], itl: list[float]) -> tuple[int, int]:
    """One streaming request -> (status, chunks with text)."""
    start = time.perf_counter()
    last = None
    chunks = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not json.loads(line[6:])["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                ttft.append(now - start)
            else:
                itl.append(now - last)
            last = now
            chunks += 1
    return 200, chunks


async def _load(base_url: str, model: str, clients: int, requests_per_client: int, max_tokens: int,
                prompt: str, timeout: float) -> dict[str, Any]:
    import httpx

    ttft: list[float] = []
    itl: list[float] = []
    statuses: list[int] = []
    tokens = [0]
    errors: list[str] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            for _ in range(requests_per_client):
                try:
                    status, n = await _one(client, "/v1/completions", body, ttft, itl)
                except Exception as err:  # a transport failure is a failed request, not a crash of the test
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                statuses.append(status)
                tokens[0] += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests_per_client, "ok": statuses.count(200),
            "5xx": sum(s >= 500 for s in statuses), "other_status": sum(s != 200 and s < 500 for s in statuses),
            "transport_errors": len(errors), "wall_s": wall, "requests_per_s": len(statuses) / wall,
            "stream_chunks_per_s": tokens[0] / wall,
            "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
            "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p99_ms": 1e3 * _pct(itl, 99), "errors": errors[:3]}


def run_load(base_url: str, model: str, *, clients: int = 16, requests_per_client: int = 4, max_tokens: int = 32,
             prompt: str = "def main():", timeout: float = 120.0) -> dict[str, Any]:
    """``clients`` x ``requests_per_client`` streaming completions against ``base_url``; the
    report described in the module docstring (stream chunks stand in for tokens: one chunk per
    token except where text is held back, e.g. an incomplete UTF-8 character)."""
    return asyncio.run(_load(base_url, model, clients, requests_per_client, max_tokens, prompt, timeout))


def decode_throughput(engine: Engine, streams: int, *, prompt_len: int = 8, new_tokens: int = 64) -> dict[str, float]:
    """Aggregate decode tokens/s with ``streams`` requests decoding together in a started
    ``engine`` (``streams`` <= its slots): every request is admitted before timing starts, and
    the count covers the decode steps only (the first token of each comes from its prefill)."""
    if not 1 <= streams <= engine.slots:
        raise ValueError(f"streams must be in [1, slots={engine.slots}], got {streams}")
    done = threading.Event()
    lock = threading.Lock()
    state = {"first": 0, "remaining": streams, "t0": 0.0, "steps0": 0, "tokens": 0}

    def on_token(_: int) -> None:  # engine thread
        state["tokens"] += 1
        if state["tokens"] <= streams:  # each stream's first token comes from its prefill
            if state["tokens"] == streams:  # all admitted (in one pass): decoding starts now
                state["t0"], state["steps0"] = time.perf_counter(), engine.steps
            return

    def on_finish(_: str) -> None:
        with lock:
            state["remaining"] -= 1
            if state["remaining"] == 0:
                done.set()

    # queued at once, so the engine admits them all in one pass and they decode together
    engine.submit_many([Request([0] * prompt_len, SamplingParams(max_tokens=new_tokens + 1), on_token, on_finish)
                        for _ in range(streams)])
    if not done.wait(600):
        raise RuntimeError("decode_throughput: the requests did not finish in 600 s")
    wall = time.perf_counter() - state["t0"]
    steps = engine.steps - state["steps0"]
    tokens = state["tokens"] - streams
    return {"streams": streams, "decode_steps": steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "step_ms": 1e3 * wall / max(steps, 1)}
