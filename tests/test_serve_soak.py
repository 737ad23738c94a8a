"""A soak of ``bigmodel serve`` (issue #16: "a soak of >= 2,000 requests with resident memory
flat"): the CLI as a real process on a free 127.0.0.1 port, serving a tiny random-init HF GPT-2
directory, driven by a bounded asyncio client through a mixed workload, with the server's
resident memory (VmRSS from ``/proc/<pid>/status``) read between waves of requests.

Every request has a timeout, the server is killed if it outlives the test, and the whole test
stops by itself (about 30 s on 2 shared cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_util import tiny_gpt_hf_dir  # noqa: E402  (after the skips: it imports uvicorn)

TIMEOUT = 30.0  # every client call; a hung server fails the test instead of hanging it
CONCURRENCY = 8  # requests in flight at once (the server has 4 slots, so some also queue)
WARMUP = 500  # requests before the first RSS reading (lazy imports, caches, allocator pools settle)
WAVE = 250  # requests between RSS readings
WAVES = 8  # 500 + 8 x 250 = 2,500 requests, 2,000 of them after the first reading
MAX_TOKENS = 4  # small: the soak is about the server's bookkeeping, not decode speed

# the RSS bounds (justified in the test's docstring)
MAX_GROWTH_MIB = 2.0  # first reading to last
MAX_SLOPE_BYTES_PER_REQUEST = 1000.0  # least-squares slope over all readings

BAD_BODIES: list[tuple[str, Any]] = [  # (path, body); raw bytes are sent as they are
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"model": "soak", "prompt": ""}),
    ("/v1/completions", {"model": "soak", "prompt": "a", "max_tokens": 10_000}),
    ("/v1/completions", {"model": "nope", "prompt": "a"}),
    ("/v1/completions", {"model": "soak", "prompt": "a", "temperature": -1}),
    ("/v1/chat/completions", {"model": "soak", "messages": []}),
    ("/v1/chat/completions", {"model": "soak", "messages": [{"role": "wizard", "content": "x"}]}),
]
PROMPTS = ["def f(x):", "import os", "return x + 1", "sys", "def main():\n    return"]


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS, which /proc reports in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def _request(i: int) -> tuple[str, str, Any]:
    """Request ``i`` of the soak: (kind, path, body). A fixed cycle of 40: 34 good requests
    (completions and chat, plain and streamed, greedy and seeded sampling), 3 bad ones (400)
    and 3 streams the client drops after the first chunk."""
    k = i % 40
    prompt = PROMPTS[i % len(PROMPTS)]
    sampling = {"temperature": 0} if i % 3 else {"temperature": 0.8, "top_p": 0.9, "seed": i}
    if k in (5, 18, 31):
        path, body = BAD_BODIES[(i // 40 + k) % len(BAD_BODIES)]
        return "bad", path, body
    if k in (11, 24, 37):  # enough tokens that the stream is still running when the client leaves
        return "drop", "/v1/completions", {"model": "soak", "prompt": prompt, "max_tokens": 40, "stream": True,
                                           "temperature": 0}
    stream = k % 2 == 1
    if k % 4 < 2:
        return ("stream" if stream else "plain"), "/v1/completions", {
            "model": "soak", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": stream, **sampling}
    messages = [{"role": "user", "content": prompt}]
    return ("chat_stream" if stream else "chat"), "/v1/chat/completions", {
        "model": "soak", "messages": messages, "max_tokens": MAX_TOKENS, "stream": stream, **sampling}


async def _send(client: Any, kind: str, path: str, body: Any) -> int:
    """Send one request; its HTTP status (a dropped stream: 200 if it started). Streams are read
    to their ``[DONE]``, which must come."""
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        return r.status_code
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        return r.status_code
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        done = False
        async for line in r.aiter_lines():
            if kind == "drop" and line.startswith("data: "):
                return 200  # leaving the block closes the connection mid-stream
            done = done or line == "data: [DONE]"
        assert done, f"{kind} stream ended without [DONE]"
        return 200


async def _wave(client: Any, first: int, count: int, statuses: dict[str, list[int]]) -> None:
    """Requests ``first .. first + count - 1``, CONCURRENCY at a time (a bounded pool of workers)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(first, first + count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            kind, path, body = _request(i)
            statuses.setdefault(kind, []).append(await _send(client, kind, path, body))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _quiet(client: Any) -> dict[str, Any]:
    """Wait until no request is decoding or queued (a dropped stream frees its slot at the next
    step), so every RSS reading is taken in the same idle state."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        health = (await client.get("/health")).json()
        if health["active"] == 0 and health["queue"] == 0:
            await asyncio.sleep(0.2)
            return health
        assert time.monotonic() < deadline, f"the server did not go idle: {health}"
        await asyncio.sleep(0.05)


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample (0 when absent, as for an unused label set)."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _soak(url: str, pid: int) -> tuple[list[tuple[int, int]], dict[str, list[int]], str]:
    statuses: dict[str, list[int]] = {}
    readings: list[tuple[int, int]] = []  # (requests sent so far, RSS bytes)
    limits = httpx.Limits(max_connections=CONCURRENCY + 1, max_keepalive_connections=CONCURRENCY + 1)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        await _wave(client, 0, WARMUP, statuses)
        await _quiet(client)
        readings.append((WARMUP, rss_bytes(pid)))
        for w in range(WAVES):
            await _wave(client, WARMUP + w * WAVE, WAVE, statuses)
            await _quiet(client)
            readings.append((WARMUP + (w + 1) * WAVE, rss_bytes(pid)))
        metrics = (await client.get("/metrics")).text
    return readings, statuses, metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_soak_2000_mixed_requests_resident_memory_flat(tmp_path):
    """2,500 requests, 8 at a time, against ``bigmodel serve`` on a 4-slot engine: plain and
    streamed completions and chat (greedy and seeded sampling), 3 in 40 bad requests (bad
    JSON, empty prompt, max_tokens beyond the context, unknown model, bad temperature, bad chat
    messages) and 3 in 40 streams dropped by the client after the first chunk.

    Asserts: no 5xx and no transport error; every good request answered 200 (streams with their
    ``[DONE]``), every bad one 400; every accepted request counted; at the end no slot busy and
    nothing queued (``/metrics``), and dropped streams finished as "cancelled".

    Resident memory is read after a 500-request warm-up, then after every 250 requests, each
    time once the server is idle. What it looks like (2-core dev machine, 2026-12-03): not
    perfectly flat. RSS rises by a shrinking amount per wave, ~0.8-1.1 MiB over the first 2,000
    requests after the warm-up (1.4 MiB with dropped streams only), and levels off ~2 MiB above
    the warm-up reading after ~6,000 requests (flat to 0.03 MiB from 6,200 to 10,200). That is
    the allocator settling, not a leak: over the same waves tracemalloc shows the Python heap
    flat (a few KB), and the engine alone (no HTTP) is flat to 0.1 MiB over 8,000 requests.

    Bounds, with that settling inside them: growth from the first reading to the last below
    MAX_GROWTH_MIB (2 MiB) and a least-squares slope below MAX_SLOPE_BYTES_PER_REQUEST (1,000 B
    per request; the settling gives ~400-550). A leak of 1 KiB per request adds 2 MiB over the
    2,000 measured requests (and ~1 KiB to the slope) on top of the settling, and fails both.
    Checked: the same test against a server patched to keep 1 KiB per accepted request read
    +2.9 MiB and 1,540 B per request, and failed. A leak much below ~0.5 KiB per request cannot
    be told from the settling by a 2,000-request RSS soak on this machine (it would take the
    ~6,000 requests after which RSS is flat, too long for the test suite).
    """
    model_dir = tiny_gpt_hf_dir(tmp_path / "soak")
    port = _free_port()
    log = tmp_path / "server.log"
    # the server as a user runs it: one CPU device (not the 8 simulated ones of the test process)
    xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla}
    with log.open("w") as err:  # a file, not a pipe nobody reads while the server runs
        proc = subprocess.Popen([sys.executable, "-m", "bigmodel_apps", "serve", str(model_dir), "--port",
                                 str(port), "--slots", "4", "--max-queue", "64"], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        t0 = time.monotonic()
        readings, statuses, metrics = asyncio.run(asyncio.wait_for(_soak(url, proc.pid), 300))
        wall = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    n, rss = np.asarray([r for r, _ in readings], float), np.asarray([b for _, b in readings], float)
    growth_mib = (rss[-1] - rss[0]) / 2**20
    slope = float(np.polyfit(n, rss, 1)[0])  # bytes per request
    sent = sum(len(v) for v in statuses.values())
    print(json.dumps({"requests": sent, "wall_s": round(wall, 1), "requests_per_s": round(sent / wall, 1),
                      "rss_mib": [round(b / 2**20, 2) for b in rss], "growth_mib": round(growth_mib, 2),
                      "slope_bytes_per_request": round(slope, 1),
                      "kinds": {k: len(v) for k, v in sorted(statuses.items())}}))

    assert sent == WARMUP + WAVES * WAVE >= 2000
    codes = [c for v in statuses.values() for c in v]
    assert not [c for c in codes if c >= 500], "5xx answers"
    for kind, got in statuses.items():
        want = 400 if kind == "bad" else 200
        assert got.count(want) == len(got), f"{kind}: {sorted(set(got))}"
    assert _metric(metrics, "bigmodel_active_slots") == 0
    assert _metric(metrics, "bigmodel_queue_depth") == 0
    assert _metric(metrics, "bigmodel_slots") == 4
    assert _metric(metrics, "bigmodel_requests_finished_total", '{reason="cancelled"}') >= 1
    assert not re.search(r'status="5\d\d"', metrics)
    accepted = sum(len(v) for k, v in statuses.items() if k != "bad")
    assert sum(_metric(metrics, "bigmodel_requests_total", f'{{endpoint="{e}"}}') for e in ("completions", "chat")) \
        == accepted
    assert growth_mib < MAX_GROWTH_MIB, f"RSS grew {growth_mib:.2f} MiB: {rss / 2**20}"
    assert slope < MAX_SLOPE_BYTES_PER_REQUEST, f"RSS climbs {slope:.0f} B per request: {rss / 2**20}"
