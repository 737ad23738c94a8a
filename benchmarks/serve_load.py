"""``bigmodel serve`` measurements (issue #16): decode throughput with continuous batching, an
HTTP load test, and a soak.

  python benchmarks/serve_load.py decode [--preset gpt2] [--streams 1 16] [--context 256]
      aggregate decode tokens/s of the engine at each stream count (GPT-2 124M, random init:
      the speed does not depend on the weights' values), and the ratio to 1 stream;
  python benchmarks/serve_load.py load [--clients 16] [--requests 4] [--max-tokens 32]
      a server on 127.0.0.1 (a free port) with a small GPT, 16 concurrent streaming clients,
      a fixed number of requests: throughput, p50/p99 time to first token and inter-token
      latency, 5xx count;
  python benchmarks/serve_load.py soak [--requests 2000]
      the same server, >= 2000 requests in waves, resident memory (RSS) sampled per wave.

Everything binds loopback only and stops by itself. Prints one JSON object per measurement
and the CPU flags line, so a result names the machine it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bigmodel_apps.serve.engine import Engine  # noqa: E402
from bigmodel_apps.serve.load import decode_throughput, run_load  # noqa: E402
from bigmodel_apps.serve.model import ServedModel  # noqa: E402
from bigmodel_jax.models import gpt as jgpt  # noqa: E402
from reference_numpy.configs import GPTConfig, preset  # noqa: E402


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cmd_decode(args: argparse.Namespace) -> None:
    """Each stream count on an engine of that many slots (1 stream = batch-1 decoding), plus one
    stream on the largest engine (what a lone request costs in a busy server's batch)."""
    config = dataclasses.replace(preset(args.preset), dropout=0.0)
    params = jgpt.init(config, seed=0)
    runs = [(s, s) for s in args.streams] + [(max(args.streams), 1)]
    results = {}
    for slots, streams in runs:
        engine = Engine(params, config, slots=slots, context=args.context, max_queue=slots)
        t = time.perf_counter()
        engine.warmup()
        warm = time.perf_counter() - t
        engine.start()
        decode_throughput(engine, streams, new_tokens=4)  # settle
        r = decode_throughput(engine, streams, new_tokens=args.new_tokens)
        engine.stop()
        results[(slots, streams)] = r
        print(json.dumps({"preset": args.preset, "slots": slots, "context": args.context, "warmup_s": round(warm, 1),
                          **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)
    base = results[(1, 1)]["tokens_per_s"] if (1, 1) in results else None
    for (slots, streams), r in results.items():
        if base:
            print(json.dumps({"slots": slots, "streams": streams,
                              "tokens_per_s_vs_1_stream_1_slot": round(r["tokens_per_s"] / base, 2)}))


class _ByteModel:
    """A small GPT over bytes for the load and soak servers."""

    @staticmethod
    def make(max_len: int) -> ServedModel:
        config = GPTConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=257, max_len=max_len, dropout=0.0)
        params = jgpt.init(config, seed=0)
        return ServedModel("bench", config, params, lambda t, chat=False: [256] + list(t.encode()),
                           lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace"), (256,))


def _server(model: ServedModel, slots: int):
    import uvicorn

    from bigmodel_apps.serve.app import create_app

    engine = Engine(model.params, model.config, slots=slots, max_queue=256, eos_ids=())
    engine.warmup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(60)
        sock.close()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def cmd_load(args: argparse.Namespace) -> None:
    url, stop = _server(_ByteModel.make(128), args.slots)
    try:
        report = run_load(url, "bench", clients=args.clients, requests_per_client=args.requests,
                          max_tokens=args.max_tokens)
    finally:
        stop()
    print(json.dumps({"slots": args.slots, **{k: (round(v, 2) if isinstance(v, float) else v)
                                               for k, v in report.items()}}))


def cmd_soak(args: argparse.Namespace) -> None:
    url, stop = _server(_ByteModel.make(64), args.slots)
    samples = []
    done = 0
    try:
        while done < args.requests:
            run_load(url, "bench", clients=16, requests_per_client=max(1, min(args.wave, args.requests - done) // 16),
                     max_tokens=8)
            done += 16 * max(1, min(args.wave, args.requests - done) // 16)
            samples.append(round(rss_mb(), 1))
            print(json.dumps({"requests": done, "rss_mb": samples[-1]}), flush=True)
    finally:
        stop()
    tail = samples[len(samples) // 2:]
    print(json.dumps({"requests": done, "rss_first_mb": samples[0], "rss_last_mb": samples[-1],
                      "rss_growth_second_half_mb": round(max(tail) - min(tail), 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--preset", default="gpt2")
    d.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    d.add_argument("--context", type=int, default=256)
    d.add_argument("--new-tokens", type=int, default=32)
    ld = sub.add_parser("load")
    ld.add_argument("--clients", type=int, default=16)
    ld.add_argument("--requests", type=int, default=4)
    ld.add_argument("--max-tokens", type=int, default=32)
    ld.add_argument("--slots", type=int, default=16)
    sk = sub.add_parser("soak")
    sk.add_argument("--requests", type=int, default=2000)
    sk.add_argument("--wave", type=int, default=160)
    sk.add_argument("--slots", type=int, default=16)
    args = p.parse_args()
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "cpu_flags": cpu_flags()}))
    {"decode": cmd_decode, "load": cmd_load, "soak": cmd_soak}[args.cmd](args)


if __name__ == "__main__":
    main()
