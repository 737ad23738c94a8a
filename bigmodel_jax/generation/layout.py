"""The decoding layout: the weights as a cached decoding step reads them fastest.

At batch 1 decoding is a chain of matrix-vector products bound by memory traffic, so how the
weights lie in memory decides the speed. ``decode_params`` prepares them ONCE per generate
call, outside the token loop (XLA does not hoist such copies out of a while loop by itself);
the model's own ``forward`` then reads them (``layers.linear`` / ``layers.attention`` accept
either layout). ``DECODE_LAYOUT`` is the fastest measured layout and the default of
``generate``; numbers in ``benchmarks/results/README.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax import quant
from bigmodel_jax.perf import PerfOptions
from reference_numpy.configs import GPTConfig
from reference_numpy.layers.attention import key_bias_matters

Tree = dict[str, Any]

# unrolled layers (each weight read in place, per-layer heads-major caches), one fused q/k/v
# projection, (Out, In) weight rows
DECODE_LAYOUT = PerfOptions(scan_layers=False, fused_qkv=True)


def decode_params(params: Tree, config: GPTConfig, perf: PerfOptions | None) -> Tree:
    """The weights as ``forward(..., cache=)`` reads them under ``perf``:

    * ``scan_layers=False``: ``params["layers"]`` becomes a list of L per-layer trees, so the
      unrolled step reads each weight in place (under scan every token's step dynamic-slices,
      i.e. copies, every layer's weights out of the stack), and every projection is stored as
      ``rows`` (*Out, *In) (``_layer_rows``): each output is then a dot product along contiguous
      memory and XLA needs no transpose copy of a kernel inside the token loop. These weights
      take the per-layer caches of ``models.gpt.init_layer_caches``.
    * ``fused_qkv``: each layer's q / k / v kernels (and biases) concatenated into one
      ``attn["qkv"]`` (D, H + 2K, E) projection (a key bias that does not matter, i.e. without
      RoPE, enters as zeros, as in ``layers.attention.project_qkv``).

    None, or a layout with neither, returns ``params`` unchanged; so do already prepared params.
    Call it once yourself (outside ``jit``) to keep the preparation out of every ``generate``
    call: it copies every layer weight once."""
    if perf is None or (perf.scan_layers and not perf.fused_qkv) or isinstance(params["layers"], list):
        return params
    layers = params["layers"]
    a = layers["attn"]
    if perf.fused_qkv:
        kernel = quant.concatenate([a["query"]["kernel"], a["key"]["kernel"], a["value"]["kernel"]], axis=2)
        fused = {"kernel": kernel}  # (L, D, H + 2K, E)
        if any("bias" in a[n] for n in ("query", "key", "value")):
            def bias(name: str, used: bool = True) -> jax.Array:
                b = a[name].get("bias")
                shape = a[name]["kernel"].shape[:1] + a[name]["kernel"].shape[2:]  # (L, heads, E)
                return b if used and b is not None else jnp.zeros(shape, kernel.dtype)
            rope_on = config.positions == "rope"
            fused["bias"] = jnp.concatenate(  # (L, H + 2K, E)
                [bias("query"), bias("key", key_bias_matters(config.rope_theta if rope_on else None)),
                 bias("value")], axis=1)
        a = {**a, "qkv": fused}
    layers = {**layers, "attn": a}
    if not perf.scan_layers:
        L = a["out"]["kernel"].shape[0]
        layers = [_layer_rows(jax.tree.map(lambda x, i=i: x[i], layers)) for i in range(L)]
    return {**params, "layers": layers}


def _rows(p: Tree, n_in: int) -> Tree:
    """A projection's kernel (*In, *Out), its first ``n_in`` axes the input, as ``rows``
    (*Out, *In)."""
    k = p["kernel"]
    order = tuple(range(n_in, k.ndim)) + tuple(range(n_in))
    return {**{name: v for name, v in p.items() if name != "kernel"}, "rows": quant.transpose(k, order)}  # (quantised weights too)


def _layer_rows(p: Tree) -> Tree:
    """One layer's projections as ``rows``; q / k / v are read through the fused ``qkv`` when
    there is one, so the separate kernels are dropped then."""
    a = dict(p["attn"])
    names = ["qkv"] if "qkv" in a else ["query", "key", "value"]
    for name in names:
        a[name] = _rows(a[name], 1)  # (D, M, E) -> (M, E, D)
    if "qkv" in a:
        a = {k: v for k, v in a.items() if k not in ("query", "key", "value")}
    a["out"] = _rows(a["out"], 2)  # (H, E, D) -> (D, H, E)
    mlp = {name: _rows(w, 1) for name, w in p["mlp"].items()}  # (D, F) -> (F, D) and back
    return {**p, "attn": a, "mlp": mlp}
