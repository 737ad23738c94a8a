"""What the serving tests share: a uvicorn server on a free loopback port in a thread, and a tiny
random GPT-2 HF directory with a trained BPE tokenizer and a chat template."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

TIMEOUT = 60.0  # every client call; a hung server fails the test instead of hanging it


class Server:
    """uvicorn on a free 127.0.0.1 port in a thread; ``stop`` ends it (graceful shutdown)."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any) -> httpx.Response:
        """POST ``body`` (JSON-encoded unless already a string / bytes) to ``path``."""
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers={"content-type": "application/json"},
                          timeout=TIMEOUT)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"


def tiny_gpt_hf_dir(tmp: Path) -> Path:
    """A tiny GPT-2 HF directory (random init) with a trained BPE tokenizer and a chat template."""
    from bigmodel_port.hub import jax as hub
    from bigmodel_port.tokenization import train_bpe_tokenizer
    from reference_numpy.configs import GPTConfig

    tok = train_bpe_tokenizer(["def f(x):\n    return x + 1\n" * 20, "import os, sys\n" * 20], vocab_size=300)
    tok.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    cfg_path.write_text(json.dumps(cfg))
    config = GPTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=len(tok), max_len=64, dropout=0.0)
    hub.GPT2LMHeadModel(config).save_pretrained(tmp)
    return tmp
