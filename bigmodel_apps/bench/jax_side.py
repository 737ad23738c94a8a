"""Our JAX side: a jit-compiled training step (loss, ``jax.grad``, AdamW from
``bigmodel_jax.optim``), a jit-compiled forward, and KV-cache greedy decoding
(``bigmodel_jax.generation.generate``), each timed with its compile time and memory.

The step is compiled ahead of time (``jit(...).lower(...).compile()``) so compile time is
measured on its own and ``cost_analysis`` / ``memory_analysis`` read the exact executable that
is then timed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigmodel_apps.bench.hardware import PeakMemory, jax_device_memory
from bigmodel_apps.bench.timing import Prepared, Stopwatch, timed
from bigmodel_apps.bench.workloads import head, inputs_only, model_module
from bigmodel_jax import optim
from bigmodel_jax.generation import DECODE_LAYOUT, decode_params, generate
from bigmodel_jax.perf import PerfOptions, cast_params, resolve
from reference_numpy.configs import BertConfig, Config, GPTConfig

Tree = dict[str, Any]
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01


def _model_fn(config: Config, perf: PerfOptions, name: str) -> Callable[[Tree, dict[str, Any]], jax.Array]:
    """``(params, batch) -> model.<name>(...)`` of the benchmarked model with ``perf``; BERT
    gets its benchmarked head (masked LM)."""
    fn = getattr(model_module(config, "bigmodel_jax.models"), name)
    args = (head(config),) if isinstance(config, BertConfig) else ()

    def f(params: Tree, batch: dict[str, Any]) -> jax.Array:
        return fn(params, batch, config, *args, perf=perf)

    return f


def loss_fn(config: Config, perf: PerfOptions) -> Callable[[Tree, dict[str, Any]], jax.Array]:
    """``(params, batch) -> scalar loss`` of the benchmarked model (BERT: masked LM), with the
    model's ``perf`` options (fp32 master parameters in, mixed precision inside if asked)."""
    return _model_fn(config, perf, "loss")


def forward_fn(config: Config, perf: PerfOptions) -> Callable[[Tree, dict[str, Any]], jax.Array]:
    """``(params, inputs) -> logits`` of the benchmarked model."""
    return _model_fn(config, perf, "forward")


def make_optimizer():
    """AdamW, no decay mask (torch's ``AdamW`` decays every parameter; so do we, here)."""
    return optim.make_optimizer("adamw", LEARNING_RATE, weight_decay=WEIGHT_DECAY, decay_mask=False)


def train_step_fn(config: Config, perf: PerfOptions) -> Callable[..., Any]:
    """``(params, opt_state, batch) -> (params, opt_state, loss)``: one AdamW step, not jitted."""
    loss = loss_fn(config, perf)
    opt = make_optimizer()

    def step(params: Tree, opt_state: Any, batch: dict[str, Any]) -> tuple[Tree, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def cost_of(compiled: Any) -> dict[str, float | None]:
    """XLA's own counts for a compiled executable: ``flops`` (every op, matmuls at 2 per MAC),
    ``transcendentals`` and ``bytes accessed``; None entries where the backend gives none.
    A ``while`` loop (``lax.scan``) is counted once, not times its trip count: compare against an
    unrolled (``scan_layers=False``) step."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {"flops": None, "transcendentals": None, "bytes_accessed": None}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": ca.get("flops"), "transcendentals": ca.get("transcendentals"),
            "bytes_accessed": ca.get("bytes accessed")}


def memory_of(compiled: Any) -> dict[str, int | None]:
    """XLA's static memory plan of an executable: arguments, outputs, temporaries, aliased
    (donated) bytes; ``peak_estimate`` = arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    if m is None:
        return {"peak_estimate": None}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


class JaxSide:
    """The JAX model of ``config`` on the default device with the shared weights ``params_np``.

    ``prepare_*`` compile a step and run it once (its peak memory measured on that call) and
    return a ``Prepared`` for ``timing.time_interleaved``; ``train`` / ``forward`` / ``decode``
    prepare and time one step on its own."""

    name = "jax"

    def __init__(self, config: Config, params_np: Tree, perf: PerfOptions | None = None,
                 params: Tree | None = None, opt_state: Any = None) -> None:
        self.config = config
        self.perf = resolve(perf)
        # ``params`` / ``opt_state``: already on the device, shared by several variants (a
        # donating step copies them, since it consumes its inputs)
        self.params = params if params is not None else jax.tree.map(jnp.asarray, params_np)
        self.opt_state = opt_state
        self._forwards: dict[Any, tuple[Any, float]] = {}

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v) for k, v in batch.items()}

    def compile_train(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Lower and compile the training step; returns the executable, timings, XLA's cost and
        memory analyses. Does not run it."""
        step = train_step_fn(self.config, self.perf)
        jitted = jax.jit(step, donate_argnums=(0, 1) if self.perf.donate else ())
        opt_state = self.opt_state if self.opt_state is not None else make_optimizer().init(self.params)
        b = self._device_batch(batch)
        with Stopwatch() as lower:
            lowered = jitted.lower(self.params, opt_state, b)
        with Stopwatch() as comp:
            compiled = lowered.compile()
        return {"compiled": compiled, "opt_state": opt_state, "batch": b, "lower_s": lower.seconds,
                "compile_s": comp.seconds, "xla_cost": cost_of(compiled), "xla_memory": memory_of(compiled)}

    def prepare_train(self, batch: dict[str, np.ndarray], name: str = "jax train") -> Prepared:
        """Compile the training step (ahead of time) and run it once. Without donation every call
        starts from the same parameters and optimizer state (the outputs are dropped: the same
        work, and variants can share one copy of the inputs); with donation the step consumes its
        inputs, so it gets its own copy and is fed its outputs."""
        c = self.compile_train(batch)
        compiled, b = c["compiled"], c["batch"]
        donate = self.perf.donate
        own = (lambda t: jax.tree.map(jnp.copy, t)) if donate else (lambda t: t)
        state = {"params": own(self.params), "opt": own(c["opt_state"])}
        losses: list[float] = []

        def call() -> None:
            p, o, loss = compiled(state["params"], state["opt"], b)
            if donate:
                state["params"], state["opt"] = p, o
            loss.block_until_ready()
            losses.append(float(loss))

        with PeakMemory() as mem:
            call()
        info = {"lower_s": c["lower_s"], "compile_s": c["compile_s"], "xla_cost": c["xla_cost"],
                "xla_memory": c["xla_memory"], "memory": mem.as_dict(), "device_memory": jax_device_memory(),
                "first_loss": losses[0], "perf": self.perf.label()}
        return Prepared(name, call, info)

    def train(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 50) -> dict[str, Any]:
        """Time the training step on its own."""
        return timed(self.prepare_train(batch), min_time=min_time, max_reps=max_reps)

    def _compiled_forward(self, b: dict[str, jax.Array]) -> tuple[Any, float]:
        """The forward compiled for this batch's shapes (cached: the agreement check, the timed
        forward and the batch sweep share one executable per shape) and its compile seconds."""
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in b.items()))
        if key not in self._forwards:
            with Stopwatch() as comp:
                compiled = jax.jit(forward_fn(self.config, self.perf)).lower(self.params, b).compile()
            self._forwards[key] = (compiled, comp.seconds)
        return self._forwards[key]

    def prepare_forward(self, batch: dict[str, np.ndarray], name: str = "jax forward") -> Prepared:
        """Compile the forward (logits only, no loss) and run it once."""
        b = self._device_batch(inputs_only(batch))
        compiled, compile_s = self._compiled_forward(b)

        def call() -> None:
            jax.block_until_ready(compiled(self.params, b))

        with PeakMemory() as mem:
            call()
        return Prepared(name, call, {"compile_s": compile_s, "xla_cost": cost_of(compiled),
                                     "xla_memory": memory_of(compiled), "memory": mem.as_dict(),
                                     "device_memory": jax_device_memory(), "perf": self.perf.label()})

    def forward(self, batch: dict[str, np.ndarray], *, min_time: float, max_reps: int = 50) -> dict[str, Any]:
        """Time the forward on its own."""
        return timed(self.prepare_forward(batch), min_time=min_time, max_reps=max_reps)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Forward logits as NumPy (fp32), for the cross-side agreement check."""
        b = self._device_batch(inputs_only(batch))
        return np.asarray(self._compiled_forward(b)[0](self.params, b), np.float32)

    def loss_and_grads(self, batch: dict[str, np.ndarray]) -> tuple[float, Tree]:
        """Loss and gradients (fp32 NumPy), for the mixed-precision parity report."""
        f = jax.jit(jax.value_and_grad(loss_fn(self.config, self.perf)))
        loss, grads = f(self.params, self._device_batch(batch))
        return float(loss), jax.tree.map(lambda a: np.asarray(a, np.float32), grads)

    def prepare_decode(self, prompt: np.ndarray, new_tokens: int, name: str = "jax decode", *,
                       layout: PerfOptions | None = None) -> Prepared:
        """Greedy decoding with the KV cache (``generation.generate``: prefill + new tokens as one
        compiled program); the first call (trace + compile + run) is ``first_call_s``.

        ``layout``: the decoding layout (``generation.decode_params``: unrolled layers, fused
        q/k/v), prepared once here like any inference deployment converts its weights once
        (``prepare_s``), not in every call; None = ``generate``'s default,
        ``generation.DECODE_LAYOUT``; ``PerfOptions()`` = the scanned, stacked layout."""
        if not isinstance(self.config, GPTConfig):
            raise ValueError("decoding is measured for the gpt family only")
        # bf16 decoding holds bf16 weights and cache (half the bytes per token); fp32 otherwise
        with Stopwatch() as prep:
            layout = DECODE_LAYOUT if layout is None else layout
            params = decode_params(cast_params(self.params, self.perf, keep_tables_fp32=False), self.config, layout)
            jax.block_until_ready(params)
        ids = jnp.asarray(prompt)
        out: dict[str, np.ndarray] = {}

        def call() -> None:
            out["ids"] = np.asarray(generate(params, ids, self.config, max_new_tokens=new_tokens, perf=layout))

        with Stopwatch() as first, PeakMemory() as mem:
            call()
        return Prepared(name, call, {"first_call_s": first.seconds, "prepare_s": prep.seconds,
                                     "layout": layout.label(),
                                     "memory": mem.as_dict(), "device_memory": jax_device_memory(),
                                     "weights_dtype": str(jax.tree.leaves(params)[0].dtype),
                                     "tokens": out["ids"][:, prompt.shape[1]:]})

    def decode(self, prompt: np.ndarray, new_tokens: int, *, min_time: float, max_reps: int = 20,
               layout: PerfOptions | None = None) -> dict[str, Any]:
        """Time greedy decoding on its own."""
        return timed(self.prepare_decode(prompt, new_tokens, layout=layout), min_time=min_time, max_reps=max_reps)
