"""``bigmodel serve``: an OpenAI-compatible HTTP server with continuous batching
(``bigmodel_apps.serve``)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from bigmodel_apps.cli.parsing import nonnegative_int, positive_int


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a causal LM, encoder, classifier or translation model over an OpenAI-compatible API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Serve MODEL (a `bigmodel train` run directory, or a local HF GPT-2 / Llama / BERT
            directory) on FastAPI + uvicorn: for a causal LM, POST /v1/completions and
            /v1/chat/completions (with "stream": true for server-sent events), GET /v1/models,
            /health and /metrics (Prometheus). Concurrent requests share decode steps in a
            batch of --slots rows (continuous batching). SIGTERM / Ctrl-C stop accepting, let
            running requests finish, and exit.

            A BERT encoder directory (e.g. all-MiniLM-L6-v2) serves POST /v1/embeddings; a
            classification run or an HF BertForSequenceClassification directory POST
            /v1/classify; a translation run POST /v1/translate. Each request runs as padded
            batches of at most --max-batch rows (sizes and lengths bucketed, so nothing compiles
            per request).

            examples:
              bigmodel serve runs/gpt-stdlib --port 8000
              bigmodel serve runs/gpt-stdlib --quantize int8
              curl localhost:8000/v1/completions -H 'content-type: application/json' \\
                   -d '{"model": "gpt-stdlib", "prompt": "import os", "max_tokens": 20, "temperature": 0}'
              bigmodel serve path/to/all-MiniLM-L6-v2 --model-name minilm
              curl localhost:8000/v1/embeddings -H 'content-type: application/json' \\
                   -d '{"model": "minilm", "input": ["A man is eating food."]}'"""),
    )
    p.add_argument("model", metavar="MODEL", help="run directory or HF model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--slots", type=positive_int, default=8,
                   help="requests decoded together, each with its own KV-cache row (default 8)")
    p.add_argument("--context", type=positive_int,
                   help="cache slots per row: prompt + max_tokens must fit (default: the model's max_len)")
    p.add_argument("--max-queue", type=nonnegative_int, default=64,
                   help="requests that may wait for a slot before the server answers 429 (default 64)")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="embeddings / classify / translate: inputs per forward at most (default 32)")
    p.add_argument("--model-name", help="the model id clients send (default: MODEL's directory name)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file of the run (default: the latest)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="causal LMs: quantise the weights at load (weight-only; int8 per output channel, int4 "
                        "groups of 128 with the LM head kept int8; norms stay float) and decode on them")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every prefill bucket and the decode step before serving")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from bigmodel_train.extras import missing_extra

    try:
        import uvicorn

        from bigmodel_apps.serve.app import create_app
    except ImportError as err:
        raise missing_extra(err.name or "fastapi", "bigmodel serve", err, extra="deploy") from err
    from bigmodel_apps.serve.engine import Engine
    from bigmodel_apps.serve.model import QUANTIZE_CHOICES, load_model

    model = load_model(args.model, checkpoint=args.checkpoint, name=args.model_name, max_batch=args.max_batch,
                       quantize=QUANTIZE_CHOICES[args.quantize] if args.quantize else None)
    if model.kind != "lm":  # embeddings / classify / translate: batched forwards, no engine
        if not args.no_warmup:
            print(f"compiling the {model.kind} model's batch buckets ...", file=sys.stderr, flush=True)
            model.warmup()
        uvicorn.run(create_app(model, max_queue=args.max_queue), host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=None)
        return 0
    engine = Engine(model.params, model.config, slots=args.slots, context=args.context, max_queue=args.max_queue,
                    eos_ids=model.eos_ids)
    if not args.no_warmup:
        print(f"compiling {len(engine.buckets)} prefill buckets and the decode step ...", file=sys.stderr, flush=True)
        engine.warmup()
    app = create_app(model, engine)
    # uvicorn handles SIGINT / SIGTERM: stop accepting, wait for open requests (streams
    # included), then the app's lifespan drains the engine
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    return 0
