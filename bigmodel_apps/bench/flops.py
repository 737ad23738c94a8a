"""Analytic FLOP and byte counts of one step, from the config alone (imports no jax / torch).

Dims: B batch, T (target) time, S source time, D model width, H query heads, K kv heads,
E head dim, F MLP width, V vocabulary, L layers, P pixels per patch, N patches.

Convention (PaLM appendix B, nanoGPT's ``estimate_mfu``): only matrix multiplications count, at
2 FLOPs per multiply-add; a training step costs 3x the forward (the backward computes the input
gradient and the weight gradient of every matmul, each as large as the forward product):

    forward  = 2 * N_matmul * T          per sequence, N_matmul = parameters that multiply
             + 4 * L * T * S * H * E     attention scores QK^T and the weighted sum P V
    training = 3 * forward               ("6N per token plus the attention term")

``N_matmul`` counts every kernel of the blocks plus the output head (a tied embedding counts
once, as the head: the input lookup is a gather, not a matmul); biases, norms, position tables
and the input embedding lookup do no matmul FLOPs and are left out. The attention term counts
the **full** T x S score matrix, also for causal models, as PaLM and nanoGPT do: with causal
masking only half of it (T(T+1)/2 entries) is needed, and a kernel that skips masked blocks
(flash attention) does about half that term's work; our XLA path and HF's eager path compute the
whole masked matrix, so the full count is what they execute. ``causal_fraction`` below gives the
useful share for the record.

Elementwise work (softmax, norms, GELU, the optimizer update) is not counted: it is a few percent
of the FLOPs at bert-base / GPT-2 widths, which is why XLA's own ``cost_analysis`` (which counts
every elementwise op as well) comes out a few percent above this count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from reference_numpy.configs import BertConfig, Config, GPTConfig, Seq2SeqConfig, ViTConfig


@dataclass(frozen=True)
class FlopCount:
    """Forward matmul FLOPs of one example (one sequence / image), split by where they come from.

    ``dense`` is 2 * N_matmul per token summed over the tokens that pass through each weight,
    ``attention`` the QK^T and PV products (full, unmasked count), ``tokens`` the tokens (or, for
    ViT, patches + class token) one example carries, ``n_matmul`` the parameters that multiply.
    """

    dense: float
    attention: float
    tokens: int
    n_matmul: int
    causal: bool

    @property
    def forward(self) -> float:
        """Forward FLOPs of one example."""
        return self.dense + self.attention

    @property
    def train(self) -> float:
        """Training-step FLOPs of one example: forward + backward = 3 x forward."""
        return 3.0 * self.forward

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forward": self.forward, "train": self.train}


def causal_fraction(T: int) -> float:
    """Share of a T x T score matrix a causal mask keeps: T (T + 1) / 2 / T^2."""
    return (T + 1) / (2.0 * T)


def _block_kernels(D: int, H: int, K: int, E: int, F: int, gated: bool) -> int:
    """Kernel parameters of one self-attention block: q (D, H, E), k / v (D, K, E), out (H, E, D),
    MLP up (+ gate) (D, F) and down (F, D)."""
    return D * H * E + 2 * D * K * E + H * E * D + (3 if gated else 2) * D * F


def forward_flops(config: Config, T: int, *, head: str = "mlm", source_len: int | None = None,
                  mlm_positions: float | None = None) -> FlopCount:
    """Forward matmul FLOPs of one example of ``config`` at sequence length ``T``.

    ``head``: the BERT head (the masked-LM head adds its D x D transform and the tied D x V
    decoder at every position, as HF's ``BertForMaskedLM`` computes them; ``mlm_positions``:
    at that many positions per example instead, the gathered head of
    ``PerfOptions.mlm_capacity``). ViT ignores ``T`` (its length is N + 1 from the image size);
    seq2seq reads ``source_len`` (default T) for S.
    """
    c = config
    if isinstance(c, BertConfig):
        D, H = c.d_model, c.n_heads
        E = D // H
        per_token = c.n_layers * _block_kernels(D, H, H, E, c.d_ff, False)
        per_example = D * D + D * c.num_labels if head == "sequence_classification" else 0
        mlm = D * D + D * c.vocab_size  # transform + tied decoder
        if head == "mlm" and mlm_positions is None:
            per_token += mlm  # at every position
        elif head == "mlm":
            per_example += mlm * mlm_positions
        elif head in ("token_classification", "question_answering"):
            per_token += D * (c.num_labels if head == "token_classification" else 2)
        attn = 4.0 * c.n_layers * T * T * H * E
        n_matmul = per_token + (mlm if head == "mlm" and mlm_positions is not None else 0)
        return FlopCount(2.0 * (per_token * T + per_example), attn, T, n_matmul, False)
    if isinstance(c, GPTConfig):
        D, H, K, E = c.d_model, c.n_heads, c.kv_heads, c.e
        per_token = c.n_layers * _block_kernels(D, H, K, E, c.d_ff, c.gated_mlp) + D * c.vocab_size
        attn = 4.0 * c.n_layers * T * T * H * E
        return FlopCount(2.0 * per_token * T, attn, T, per_token, True)
    if isinstance(c, ViTConfig):
        D, H = c.d_model, c.n_heads
        E = D // H
        N = c.n_patches
        T_vit = N + 1
        per_token = c.n_layers * _block_kernels(D, H, H, E, c.d_ff, False)
        patch = c.n_channels * c.patch_size**2 * D  # per patch (the class token is not projected)
        per_example = (D * c.num_labels if c.classifier else 0) + (D * D if c.pooler else 0)
        dense = 2.0 * (per_token * T_vit + patch * N + per_example)
        attn = 4.0 * c.n_layers * T_vit * T_vit * H * E
        return FlopCount(dense, attn, T_vit, per_token + patch + per_example, False)
    if isinstance(c, Seq2SeqConfig):
        D, H = c.d_model, c.n_heads
        E = D // H
        S = T if source_len is None else source_len
        Kd = c.n_kv_heads or H
        enc_token = c.n_layers * _block_kernels(D, H, H, E, c.d_ff, False)
        # decoder block: self-attention + cross-attention q / out on target tokens, MLP;
        # cross-attention k / v run on the S encoder tokens (per decoder layer)
        dec_token = c.decoder_layers * (_block_kernels(D, H, Kd, E, c.d_ff, False) + 2 * D * H * E) + D * c.vocab_size
        cross_kv = c.decoder_layers * 2 * D * H * E
        dense = 2.0 * (enc_token * S + cross_kv * S + dec_token * T)
        attn = 4.0 * H * E * (c.n_layers * S * S + c.decoder_layers * (T * T + T * S))
        return FlopCount(dense, attn, T, enc_token + dec_token + cross_kv, True)
    raise TypeError(f"not a model config: {type(config).__name__}")


def decode_bytes_per_token(
    config: GPTConfig, param_bytes: int, *, batch: int, prompt_len: int, new_tokens: int, kv_itemsize: int
) -> dict[str, float]:
    """Bytes one greedy decoding step must read from memory, averaged over the new tokens.

    Every weight is read once per step (``param_bytes``: the whole tree, the tied embedding is
    read whole by the output head; the position table and the input lookup read one row, counted
    whole, < 1% at GPT-2 size), plus the key/value cache of every layer up to the current length:
    2 * L * s * K * E * itemsize per sequence at length s, averaged over s = prompt_len ..
    prompt_len + new_tokens - 1. That is the least any implementation must move: our cache and
    HF's may read more (ours reads every slot of its fixed-size buffer, masked). The bandwidth
    bound is then ``batch * bandwidth / bytes_per_step`` tokens per second.
    """
    s_mean = prompt_len + (new_tokens - 1) / 2.0
    kv = 2.0 * config.n_layers * s_mean * config.kv_heads * config.e * kv_itemsize * batch
    return {"weights": float(param_bytes), "kv_cache": kv, "total": float(param_bytes) + kv}
