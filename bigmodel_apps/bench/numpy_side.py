"""Our NumPy reference side: the hand-written backward (``reference_numpy.models.<family>
.loss_and_grad``) plus the reference AdamW (``reference_numpy.optim``), and the reference forward.
fp32 only (NumPy has no bf16 matmul); BLAS does the matmuls, so its speed is the BLAS NumPy was
built with (OpenBLAS in the PyPI wheels) plus the reference's einsum / elementwise overhead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigmodel_apps.bench.hardware import PeakMemory
from bigmodel_apps.bench.timing import Prepared, Stopwatch, timed
from bigmodel_apps.bench.workloads import head, inputs_only, model_module
from reference_numpy import generation, optim
from reference_numpy.speed.allocator import keep_freed_memory
from reference_numpy.configs import BertConfig, Config

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01


class NumpySide:
    """The reference model of ``config`` with the shared weights (fp32 NumPy tree); ``prepare_*``
    run a step once and return it for ``timing.time_interleaved``."""

    name = "numpy"

    def __init__(self, config: Config, params: dict[str, Any]) -> None:
        # freed activations are reused instead of page-faulted in again every step; this is
        # process-wide, so the torch side (same glibc heap) runs with it too
        self.allocator_tuned = keep_freed_memory()
        self.config = config
        self.params = params
        self.m = model_module(config, "reference_numpy.models")

    def _args(self) -> tuple[Any, ...]:
        return (head(self.config),) if isinstance(self.config, BertConfig) else ()

    def prepare_train(self, batch: dict[str, np.ndarray], name: str = "numpy train") -> Prepared:
        """``loss_and_grad`` (hand-written backward) + a reference AdamW update, run once."""
        opt = optim.make_optimizer("adamw", LEARNING_RATE, weight_decay=WEIGHT_DECAY, decay_mask=False)
        state = {"params": self.params, "opt": opt.init(self.params)}
        losses: list[float] = []

        def call() -> None:
            loss, grads = self.m.loss_and_grad(state["params"], batch, self.config, *self._args())
            updates, state["opt"] = opt.update(grads, state["opt"], state["params"])
            state["params"] = optim.apply_updates(state["params"], updates)
            losses.append(float(loss))

        with PeakMemory() as mem:
            call()
        return Prepared(name, call, {"memory": mem.as_dict(), "first_loss": losses[0]})

    def train(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 20) -> dict[str, Any]:
        return timed(self.prepare_train(batch), min_time=min_time, max_reps=max_reps)

    def prepare_forward(self, batch: dict[str, np.ndarray], name: str = "numpy forward") -> Prepared:
        """The reference forward (logits), run once."""
        inputs = inputs_only(batch)

        def call() -> None:
            self.m.forward(self.params, inputs, self.config, *self._args())

        with PeakMemory() as mem:
            call()
        return Prepared(name, call, {"memory": mem.as_dict()})

    def forward(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 20) -> dict[str, Any]:
        return timed(self.prepare_forward(batch), min_time=min_time, max_reps=max_reps)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.m.forward(self.params, inputs_only(batch), self.config, *self._args()), np.float32)

    def prepare_decode(self, prompt: np.ndarray, new_tokens: int, name: str = "numpy decode") -> Prepared:
        """Greedy decoding with the reference KV cache (``reference_numpy.generation.greedy``)."""
        out: dict[str, np.ndarray] = {}

        def call() -> None:
            out["ids"] = np.asarray(generation.greedy(self.params, prompt, self.config, max_new_tokens=new_tokens))

        with Stopwatch() as first, PeakMemory() as mem:
            call()
        return Prepared(name, call, {"first_call_s": first.seconds, "memory": mem.as_dict(),
                                     "tokens": out["ids"][:, prompt.shape[1]:]})

    def decode(self, prompt: np.ndarray, new_tokens: int, *, min_time: float, max_reps: int = 5) -> dict[str, Any]:
        return timed(self.prepare_decode(prompt, new_tokens), min_time=min_time, max_reps=max_reps)
