"""HF transformers on PyTorch: the same weights (the shared HF directory), the same batch, the
same loss; a training step with ``torch.optim.AdamW``, a forward under ``inference_mode``, and
``model.generate`` greedy decoding. bf16 compute is ``torch.autocast`` (what HF's Trainer does
with ``--bf16``): fp32 master weights, bf16 matmuls.

``torch.compile`` runs in a **subprocess** (``python -m bigmodel_apps.bench.torch_side``) with a
wall-clock timeout: its first call compiles with Inductor (a C++ / Triton toolchain), which can
take minutes or fail, and a stuck compile cannot be interrupted from inside the process. The
worker rebuilds the batch from the workload's seed and loads the same directory.

Run as a module: ``python -m bigmodel_apps.bench.torch_side --spec spec.json --out result.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_apps.bench.hardware import PeakMemory
from bigmodel_apps.bench.timing import Prepared, Stopwatch, timed
from bigmodel_apps.bench.workloads import Workload, inputs_only, make_batch

# torch and transformers are optional (the ``test`` extra), imported where they are used: the
# suite imports this module, and runs its other sides without them.

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _device_memory(device: str) -> dict[str, Any] | None:
    import torch

    if device != "cuda":
        return None
    return {"peak_bytes_in_use": int(torch.cuda.max_memory_allocated())}


class TorchSide:
    """A transformers model loaded from the shared directory ``hf_dir``."""

    def __init__(self, hf_dir: str | Path, architecture: str, *, dtype: str = "float32", compile: bool = False,
                 device: str | None = None) -> None:
        import torch
        import transformers

        self.torch = torch
        self.hf_dir, self.architecture = str(hf_dir), architecture
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = getattr(transformers, architecture).from_pretrained(str(hf_dir)).to(self.device)
        self.dtype = dtype
        self.compiled = compile
        self.name = "torch.compile" if compile else "torch"
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self._fn = torch.compile(self.model) if compile else self.model

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()}

    def _autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return self.torch.autocast(self.device, dtype=getattr(self.torch, self.dtype))

    def _reset_peak(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def prepare_train(self, batch: dict[str, np.ndarray], name: str | None = None) -> Prepared:
        """``zero_grad; loss = model(**batch).loss; loss.backward(); AdamW.step()``, run once (with
        torch.compile that first call compiles: ``compile_s``; its peak memory is recorded)."""
        torch = self.torch
        opt = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        t = self._tensors(batch)
        losses: list[float] = []

        def call() -> None:
            self.model.train()  # dropout is 0 in the config: train mode changes nothing else here
            opt.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self._fn(**t).loss
            loss.backward()
            opt.step()
            _sync(self.device)
            losses.append(float(loss.detach()))

        self._reset_peak()
        with Stopwatch() as first, PeakMemory() as mem:
            call()
        return Prepared(name or f"{self.name} train", call, {
            "compile_s": first.seconds if self.compiled else None, "first_call_s": first.seconds,
            "memory": mem.as_dict(), "device_memory": _device_memory(self.device), "first_loss": losses[0],
            "attn_implementation": self.attn_implementation})

    def train(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 50) -> dict[str, Any]:
        return timed(self.prepare_train(batch), min_time=min_time, max_reps=max_reps)

    def prepare_forward(self, batch: dict[str, np.ndarray], name: str | None = None) -> Prepared:
        """The logits of a forward under ``inference_mode``, run once."""
        torch = self.torch
        t = self._tensors(inputs_only(batch))

        def call() -> None:
            self.model.eval()
            with torch.inference_mode(), self._autocast():
                self._fn(**t).logits
            _sync(self.device)

        self._reset_peak()
        with Stopwatch() as first, PeakMemory() as mem:
            call()
        return Prepared(name or f"{self.name} forward", call, {
            "compile_s": first.seconds if self.compiled else None, "first_call_s": first.seconds,
            "memory": mem.as_dict(), "device_memory": _device_memory(self.device),
            "attn_implementation": self.attn_implementation})

    def forward(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 50) -> dict[str, Any]:
        return timed(self.prepare_forward(batch), min_time=min_time, max_reps=max_reps)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Forward logits as fp32 NumPy, for the cross-side agreement check."""
        self.model.eval()
        with self.torch.inference_mode(), self._autocast():
            out = self.model(**self._tensors(inputs_only(batch))).logits
        return out.float().cpu().numpy()

    def prepare_decode(self, prompt: np.ndarray, new_tokens: int, name: str | None = None) -> Prepared:
        """``model.generate`` greedy (``do_sample=False``, one beam) with the KV cache, no EOS
        stopping (the generation config's EOS is cleared, so every call makes ``new_tokens``),
        run once. bf16 decodes a bf16 copy of the model (half the bytes per token, like our bf16
        weights), not fp32 weights under autocast."""
        import transformers

        torch = self.torch
        model = self.model
        if self.dtype != "float32":
            model = getattr(transformers, self.architecture).from_pretrained(
                self.hf_dir, dtype=getattr(torch, self.dtype)).to(self.device)
        model.eval()
        gc = model.generation_config
        gc.eos_token_id = None
        gc.pad_token_id = 0
        ids = self._tensors({"ids": prompt})["ids"]
        mask = torch.ones_like(ids)
        out: dict[str, np.ndarray] = {}

        def call() -> None:
            with torch.inference_mode():
                o = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, num_beams=1)
            _sync(self.device)
            out["ids"] = o.cpu().numpy()

        self._reset_peak()
        with Stopwatch() as first, PeakMemory() as mem:
            call()
        return Prepared(name or f"{self.name} decode", call, {
            "first_call_s": first.seconds, "memory": mem.as_dict(), "device_memory": _device_memory(self.device),
            "tokens": out["ids"][:, prompt.shape[1]:]})

    def decode(self, prompt: np.ndarray, new_tokens: int, *, min_time: float, max_reps: int = 20) -> dict[str, Any]:
        return timed(self.prepare_decode(prompt, new_tokens), min_time=min_time, max_reps=max_reps)


# --------------------------------------------------------------------------------------------
# torch.compile in a subprocess


def run_compiled(spec: dict[str, Any], *, timeout: float, workdir: str | Path) -> dict[str, Any]:
    """Run ``kinds`` (``"train"``, ``"forward"``) with ``torch.compile`` in a subprocess; a
    failure or a timeout comes back as ``{"error": ...}`` per kind, never as an exception."""
    workdir = Path(workdir)
    spec_path = workdir / "torch_compile_spec.json"
    out_path = workdir / "torch_compile_result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bigmodel_apps.bench.torch_side", "--spec", str(spec_path), "--out", str(out_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
        missing = f"worker exited {proc.returncode}: {(proc.stderr or proc.stdout or '')[-800:]}"
    except subprocess.TimeoutExpired:
        missing = f"torch.compile run exceeded {timeout:.0f} s (killed)"
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    for k in spec["kinds"]:  # kinds the worker did not finish (it writes after each one)
        result.setdefault(k, {"error": missing})
    result["_wall_s"] = time.perf_counter() - t0
    return result


def _worker(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    w = Workload(**{**spec["workload"], "overrides": tuple(tuple(x) for x in spec["workload"]["overrides"])})
    config = w.config()
    batch = make_batch(config, w.batch, w.seq_len, w.seed)
    result: dict[str, Any] = {}
    try:
        side = TorchSide(spec["hf_dir"], spec["architecture"], dtype=w.dtype, compile=True)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        Path(out_path).write_text(json.dumps({k: {"error": f"{type(e).__name__}: {e}"} for k in spec["kinds"]}))
        return 0
    for kind in spec["kinds"]:
        try:
            r = getattr(side, kind)(batch, min_time=spec["min_time"], max_reps=spec.get("max_reps", 50))
            result[kind] = {k: v for k, v in r.items() if k != "tokens"}
        except Exception as e:  # noqa: BLE001 - torch.compile failures are data, not crashes
            result[kind] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        Path(out_path).write_text(json.dumps(result))  # partial results survive a later timeout
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="torch.compile benchmark worker (run by the suite)")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return _worker(a.spec, a.out)


if __name__ == "__main__":
    sys.exit(main())
