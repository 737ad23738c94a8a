"""Switchable performance options of the JAX models: one frozen dataclass, threaded through the
forwards as a keyword argument (``perf=PerfOptions(...)``), static under ``jit``.

Every option changes how the computation is laid out, never what it computes (up to rounding;
bf16 compute is the exception and its distance to fp32 is reported by the benchmark suite).
``PerfOptions()`` is exactly the behaviour the models had before the options existed, so the
parity tests run the default path.

=================  ==========================================================================
option             what it does
=================  ==========================================================================
scan_layers        ``True``: the L stacked blocks run as one ``jax.lax.scan`` (the block is
                   traced and compiled once, so compile time is ~flat in depth). ``False``: a
                   Python loop over the layers (unrolled: XLA sees L copies, compile time grows
                   ~linearly with L, and it may schedule across layers).
remat              ``jax.checkpoint`` around each block with a ``jax.checkpoint_policies``
                   policy: "none" (save every residual: fastest, most memory), "full"
                   (``nothing_saveable``: recompute the block in the backward, memory ~ one
                   block's activations), "dots" (``dots_saveable``: keep matmul outputs,
                   recompute the elementwise rest), "dots_no_batch"
                   (``dots_with_no_batch_dims_saveable``: keep the weight matmuls, recompute
                   the attention score matmuls, which carry batch dims).
compute_dtype      None: compute in the parameters' dtype. "bfloat16": mixed precision: the
                   fp32 master parameters are cast to bf16 at the top of the forward (their
                   gradients flow back in fp32 through the cast), every matmul runs
                   bf16 x bf16 with fp32 accumulation (``preferred_element_type=float32``,
                   rounded to bf16 after), norms keep fp32 statistics (``layers.norms``) and the
                   loss reads fp32 logits.
attention          "einsum": our masked-softmax attention (``layers.attention``).
                   "dot_product_attention": ``jax.nn.dot_product_attention`` (cuDNN flash
                   attention on GPUs for bf16 / fp16, XLA elsewhere; see ``attention_impl``).
                   Falls back to "einsum" where it cannot apply (dropout on the attention
                   probabilities; float64 inputs, since its softmax runs in float32). One
                   semantic difference: a query row whose keys are *all*
                   masked gets zeros from "einsum" and a uniform row from
                   ``dot_product_attention``; only fully padded sequences have such rows.
attention_impl     ``implementation=`` for ``dot_product_attention``: None = "cudnn" on a GPU
                   with bf16 / fp16 inputs, else "xla"; or force "cudnn" / "xla".
fused_qkv          one (D, H + 2K, E) projection for query, key and value (their kernels
                   concatenated inside the step: the parameter tree is unchanged) instead of
                   three matmuls: one larger GEMM, x read once.
mlm_capacity       BERT masked-LM loss only: None = the vocabulary head at every position (as HF).
                   A fraction c: the head (transform, norm, tied D x V decoder) runs only at the
                   labelled positions, gathered into ceil(c * B * T) rows, as Google's BERT
                   pre-training does (``masked_lm_positions``). Same loss and gradients; at the
                   usual 15% masking and c = 0.25 the head costs a quarter. A batch with more
                   labelled positions than rows gives NaN under jit (``loss_and_grad`` raises
                   before tracing).
donate             the training step donates its parameter and optimizer-state buffers
                   (``jax.jit(..., donate_argnums)``), so XLA updates them in place instead of
                   holding the old and the new copy at once. Read by the step builders
                   (``bigmodel_apps.bench``), not by the forwards.
=================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from bigmodel_jax.quant import dense

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION = ("einsum", "dot_product_attention")
ATTENTION_IMPLS = (None, "cudnn", "xla")
COMPUTE_DTYPES = (None, "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class PerfOptions:
    """How the JAX models lay out their computation (module docstring); hashable, so it can be a
    static argument of ``jax.jit``. The default is the plain path."""

    scan_layers: bool = True  # lax.scan over the L axis (False: unrolled Python loop)
    remat: str = "none"  # jax.checkpoint policy per block: none | full | dots | dots_no_batch
    compute_dtype: str | None = None  # None = parameters' dtype; "bfloat16" = mixed precision
    attention: str = "einsum"  # einsum | dot_product_attention
    attention_impl: str | None = None  # dot_product_attention's implementation (None = auto)
    fused_qkv: bool = False  # one (D, H + 2K, E) projection instead of three
    mlm_capacity: float | None = None  # BERT MLM head only at labelled positions: share of B*T rows
    donate: bool = False  # training step donates params / optimizer state (step builders)

    def __post_init__(self) -> None:
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"PerfOptions.scan_layers must be a bool, got {self.scan_layers!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"PerfOptions.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"PerfOptions.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"PerfOptions.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.mlm_capacity is not None and not 0 < self.mlm_capacity <= 1:
            raise ValueError(f"PerfOptions.mlm_capacity must be in (0, 1] or None, got {self.mlm_capacity!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"PerfOptions.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the default (for labels and reports)."""
        base = PerfOptions()
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) != getattr(base, k)}

    def label(self) -> str:
        """A short name: "default" or "remat=full,fused_qkv=True"."""
        ch = self.changed()
        return ",".join(f"{k}={v}" for k, v in ch.items()) if ch else "default"


DEFAULT = PerfOptions()


def resolve(perf: PerfOptions | None) -> PerfOptions:
    """``perf`` or the default; a clear error for anything else."""
    if perf is None:
        return DEFAULT
    if not isinstance(perf, PerfOptions):
        raise TypeError(f"perf must be a bigmodel_jax.perf.PerfOptions or None, got {type(perf).__name__}")
    return perf


def mlm_rows(perf: PerfOptions, batch: int, length: int) -> int:
    """Rows of the gathered masked-LM head: ceil(mlm_capacity * B * T), at least 1, at most B * T."""
    if perf.mlm_capacity is None:
        return batch * length
    return max(1, min(batch * length, math.ceil(perf.mlm_capacity * batch * length)))


# --------------------------------------------------------------------------------------------
# mixed precision


def cast_params(params: Any, perf: PerfOptions | None, *, keep_tables_fp32: bool = True) -> Any:
    """The parameter tree in ``perf.compute_dtype`` (floating leaves only); unchanged when unset.
    Called at the top of a forward, so under ``jax.grad`` the cast's transpose hands fp32
    gradients back to the fp32 master parameters.

    ``keep_tables_fp32``: lookup tables (leaves named ``embedding``) stay in fp32. A lookup's
    gradient is a scatter-add of every position's row into its table row (BERT's token-type row
    0 sums all B x T rows): in bf16 that sum keeps ~3 significant digits, too few for a sum of
    thousands of rows (``benchmarks/results/README.md``), in fp32 it is exact enough. The model casts the looked-up rows to the
    compute dtype (``cast_input``), and ``einsum`` casts a table used as a matmul weight (the
    tied output head) inside the product. Decoding, which has no gradient and wants the fewest
    bytes, passes False."""
    perf = resolve(perf)
    if perf.compute_dtype is None:
        return params
    dt = jnp.dtype(perf.compute_dtype)

    def cast(path: Any, a: Any) -> Any:
        name = getattr(path[-1], "key", None) if path else None
        if not jnp.issubdtype(a.dtype, jnp.floating) or (keep_tables_fp32 and name == "embedding"):
            return a
        return a.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def cast_input(x: jax.Array, perf: PerfOptions | None) -> jax.Array:
    """A floating input (pixels) in the compute dtype; unchanged when unset."""
    perf = resolve(perf)
    if perf.compute_dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(perf.compute_dtype)


def loss_logits(logits: jax.Array, perf: PerfOptions | None) -> jax.Array:
    """Logits as the loss should read them: fp32 under mixed precision (a bf16 log-softmax over
    30k classes keeps ~3 significant digits), unchanged otherwise."""
    perf = resolve(perf)
    if perf.compute_dtype is None or logits.dtype == jnp.float32:
        return logits
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def einsum(spec: str, a: jax.Array, b: jax.Array, perf: PerfOptions | None = None, *,
           keep_fp32: bool = False) -> jax.Array:
    """``jnp.einsum(spec, a, b)``; under mixed precision (half-precision operands) the product
    accumulates in fp32 (``preferred_element_type``) and is rounded back to the operands' dtype
    (``keep_fp32``: returned in fp32, for logits and attention scores that a softmax reads), so a
    long contraction (D = 4096, F = 11008) does not lose digits in its running sum. A quantised
    weight ``b`` (``bigmodel_jax.quant``) is dequantised here, at use."""
    b = dense(b)
    if perf is None or perf.compute_dtype is None or a.dtype not in (jnp.bfloat16, jnp.float16):
        return jnp.einsum(spec, a, b)
    b = b.astype(a.dtype)  # an fp32 table (cast_params keeps them) enters the half-precision GEMM
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return out if keep_fp32 else out.astype(a.dtype)


# --------------------------------------------------------------------------------------------
# the layer loop


def layer_loop(
    body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, perf: PerfOptions | None
) -> tuple[Any, Any]:
    """``jax.lax.scan(body, carry, xs)`` over the stacked L axis of ``xs``, or the same as an
    unrolled Python loop (``scan_layers=False``), with ``body`` wrapped in ``jax.checkpoint`` under
    ``perf.remat``. ``xs`` leaves share the leading axis L (None entries are skipped); the
    per-layer outputs are stacked on L as scan does (None stays None)."""
    perf = resolve(perf)
    fn = body
    policy_name = perf.remat
    if policy_name != "none":
        # prevent_cse only matters outside scan (scan already keeps the recomputation separate)
        fn = jax.checkpoint(body, policy=REMAT_POLICIES[policy_name], prevent_cse=not perf.scan_layers)
    if perf.scan_layers:
        return jax.lax.scan(fn, carry, xs)
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("layer_loop needs at least one stacked array in xs")
    L = leaves[0].shape[0]
    # Unstack each leaf with one split, not L index ops: the transpose of a[i] is a full-size
    # zero tensor with one slice filled (L of them, summed: O(L^2) memory traffic in the
    # backward); the transpose of a split is one concatenate.
    per_layer = jax.tree.map(lambda a: [s[0] for s in jnp.split(a, L, axis=0)], xs)
    ys = []
    for i in range(L):
        carry, y = fn(carry, jax.tree.map(lambda parts, i=i: parts[i], per_layer,
                                          is_leaf=lambda v: isinstance(v, list)))
        ys.append(y)
    if all(y is None for y in ys):
        return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
