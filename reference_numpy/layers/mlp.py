"""The Transformer feed-forward block: plain MLP and gated MLP (SwiGLU / GeGLU).

Dims: D model width, F hidden width; ``...`` any leading axes.

    MLP        (GPT-2, BERT):   y = down(act(up(x)))
    gated MLP  (Llama, PaLM):   y = down(act(gate(x)) * up(x))      (SwiGLU when act = silu)

``up``, ``gate``: linear (D, F); ``down``: linear (F, D); each built on
``reference_numpy.layers.linear``, so biases are optional per the linear tree. In the gated
block the product's backward is the product rule: ``d gate_out = dh * u`` and ``d up_out =
dh * act(g)``, and ``x`` feeds both branches, so its gradient is the sum of the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference_numpy.checks import check_array
from reference_numpy.layers.linear import init_linear, linear_backward, linear_forward

Params = dict[str, Any]


def init_mlp(
    rng: np.random.Generator, d_model: int, d_ff: int, *, gated: bool = False, bias: bool = True,
    dtype: Any = np.float32,
) -> Params:
    """``{up: (D, F), down: (F, D)}``, plus ``gate: (D, F)`` when gated; ``init_linear`` each."""
    params = {}
    if gated:
        params["gate"] = init_linear(rng, d_model, d_ff, bias=bias, dtype=dtype)
    params["up"] = init_linear(rng, d_model, d_ff, bias=bias, dtype=dtype)
    params["down"] = init_linear(rng, d_ff, d_model, bias=bias, dtype=dtype)
    return params


def check_mlp_params(params: Params, gated: bool) -> None:
    """The kernels chain: up/gate (D, F) and down (F, D). Shared by both implementations."""
    keys = ("gate", "up", "down") if gated else ("up", "down")
    if set(params) != set(keys):
        kind = "gated MLP" if gated else "MLP"
        raise ValueError(f"{kind} params must have keys {list(keys)}, got {sorted(params)}")
    check_array("up/kernel", params["up"]["kernel"], ("D", "F"))
    D, F = params["up"]["kernel"].shape
    check_array("down/kernel", params["down"]["kernel"], (F, D))
    if gated:
        check_array("gate/kernel", params["gate"]["kernel"], (D, F))


def mlp_forward(params: Params, x: np.ndarray, activation: str = "gelu") -> tuple[np.ndarray, Any]:
    """x: (..., D) -> y: (..., D) = down(act(up(x))); params {up: (D, F), down: (F, D)}."""
    check_mlp_params(params, gated=False)
    h, c_up = linear_forward(params["up"], x, activation)  # (..., F)
    y, c_down = linear_forward(params["down"], h)  # (..., D)
    return y, (c_up, c_down)


def mlp_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    """dy: (..., D) -> dx: (..., D), grads {up, down}."""
    c_up, c_down = cache
    dh, g_down = linear_backward(params["down"], c_down, dy)
    dx, g_up = linear_backward(params["up"], c_up, dh)
    return dx, {"up": g_up, "down": g_down}


def gated_mlp_forward(params: Params, x: np.ndarray, activation: str = "silu") -> tuple[np.ndarray, Any]:
    """x: (..., D) -> y: (..., D) = down(act(gate(x)) * up(x)); params {gate, up: (D, F), down: (F, D)}."""
    check_mlp_params(params, gated=True)
    a, c_gate = linear_forward(params["gate"], x, activation)  # (..., F) act(gate(x))
    u, c_up = linear_forward(params["up"], x)  # (..., F)
    y, c_down = linear_forward(params["down"], a * u)  # (..., D)
    return y, (a, u, c_gate, c_up, c_down)


def gated_mlp_backward(params: Params, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
    """dy: (..., D) -> dx: (..., D), grads {gate, up, down}."""
    a, u, c_gate, c_up, c_down = cache
    dh, g_down = linear_backward(params["down"], c_down, dy)  # (..., F)
    dx_gate, g_gate = linear_backward(params["gate"], c_gate, dh * u)
    dx_up, g_up = linear_backward(params["up"], c_up, dh * a)
    return dx_gate + dx_up, {"gate": g_gate, "up": g_up, "down": g_down}
