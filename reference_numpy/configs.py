"""One frozen config dataclass per model family, shared by both packages (imports no jax).

Common fields carry the same names in every family: ``n_layers``, ``d_model``, ``n_heads``,
``d_ff``, ``vocab_size``, ``max_len``, ``dropout``, ``dtype``; decoders add ``n_kv_heads``.
Every config validates itself on construction (and so on every ``dataclasses.replace``): a bad
size, ratio, probability, epsilon, name or flag raises ``ConfigFieldError`` (a ``ValueError``)
naming the field, its value and what is allowed. Variants are made with ``dataclasses.replace``.
``preset(name)`` returns the published sizes and tiny test sizes; ``param_count(config)`` derives
the parameter count from the config alone (no allocation, so a 7B count is instant) and
``param_shapes(config)`` gives every leaf's shape in the shared parameter tree (per-layer leaves
stacked on a leading ``L`` axis).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from reference_numpy.layers.activations import ACTIVATIONS
from reference_numpy.layers.embeddings import LAYOUTS as SINUSOID_LAYOUTS
from reference_numpy.layers.rope import LAYOUTS as ROPE_LAYOUTS

# --------------------------------------------------------------------------------------------
# validation: every config checks itself in __post_init__, so a bad value is refused where it is
# made (a preset override, a config.json, a model.X= option), not as a ZeroDivisionError or a
# wrong shape deep inside a model. The checks read each field's annotation, so one table serves
# all four families; the relations between fields (divisibility) are stated per family.


class ConfigFieldError(ValueError):
    """A model config field holds a value its family does not allow.

    ``fields`` names the fields involved, the one at fault first: callers that know where the
    value came from re-raise naming their own key (``config.json``'s ``num_attention_heads``, the
    command line's ``model.n_heads``).
    """

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


# str field -> the names it accepts (the models' own tables where they have one)
_CHOICES: dict[str, tuple[str, ...]] = {
    "activation": tuple(sorted(ACTIVATIONS)),
    "norm": ("layer", "rms"),
    "positions": ("learned", "rope"),
    "rope_layout": ROPE_LAYOUTS,
    "position_layout": SINUSOID_LAYOUTS,
    # parameter dtypes NumPy can hold; bf16 compute is a PerfOptions setting, not a config one
    "dtype": ("float32", "float64"),
}
_PROBABILITIES = ("dropout", "label_smoothing")  # float fields in [0, 1); other floats: finite, > 0


def _fail(config: Any, fields: tuple[str, ...], allowed: str) -> None:
    name = fields[0]
    raise ConfigFieldError(f"{type(config).__name__}.{name}={getattr(config, name)!r}: {allowed}", fields)


def _check_fields(config: Any) -> None:
    """Type and range of every field, by its annotation: sizes are ints > 0 (``int | None``: or
    None), floats are real numbers (probabilities in [0, 1), the others finite and > 0), flags
    are bools and names come from ``_CHOICES``. Integral and real values of other types (NumPy
    scalars, a JSON ``0`` for a float) are stored as plain ``int`` / ``float``."""
    for f in dataclasses.fields(config):
        name, value, kind = f.name, getattr(config, f.name), f.type
        if kind in ("int", "int | None"):
            if value is None and kind == "int | None":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                _fail(config, (name,), "must be an int > 0" + (" or None" if kind == "int | None" else ""))
            object.__setattr__(config, name, int(value))
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                _fail(config, (name,), "must be a real number")
            if name in _PROBABILITIES:
                if not 0.0 <= value < 1.0:  # NaN fails too
                    _fail(config, (name,), "must be a probability in [0, 1)")
            elif not (math.isfinite(value) and value > 0):
                _fail(config, (name,), "must be finite and > 0")
            object.__setattr__(config, name, float(value))
        elif kind == "bool":
            if not isinstance(value, bool):
                _fail(config, (name,), "must be True or False")
        elif kind == "str":
            if value not in _CHOICES[name]:
                _fail(config, (name,), f"must be one of {list(_CHOICES[name])}")
        else:  # a new field needs a rule here before it can be used
            raise TypeError(f"no validation rule for {type(config).__name__}.{name}: {kind}")


def _check_divides(config: Any, divisor: str, dividend: str, why: str = "") -> None:
    """``config.<divisor>`` divides ``config.<dividend>`` (both already checked to be ints > 0)."""
    if getattr(config, dividend) % getattr(config, divisor):
        _fail(config, (divisor, dividend), f"must divide {dividend}={getattr(config, dividend)}{why}")


# --------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class BertConfig:
    """BERT: post-norm Transformer encoder with token-type and learned position embeddings."""

    n_layers: int = 12  # encoder blocks
    d_model: int = 768  # hidden width D
    n_heads: int = 12  # attention heads H (head dim E = D / H)
    d_ff: int = 3072  # MLP hidden width F
    vocab_size: int = 30522  # WordPiece vocabulary V
    max_len: int = 512  # learned position table size (longest supported input)
    type_vocab_size: int = 2  # token-type (segment) ids
    dropout: float = 0.1  # hidden and attention dropout during training
    norm_eps: float = 1e-12  # LayerNorm epsilon (HF BERT uses 1e-12, not 1e-5)
    activation: str = "gelu"  # erf GELU (HF "gelu"); "gelu_tanh" is a different function
    num_labels: int = 2  # classes for the sequence / token classification heads
    pooler: bool = True  # tanh pooler on token 0 (HF's masked-LM / token / QA models have none)
    dtype: str = "float32"  # parameter dtype

    family = "bert"

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_divides(self, "n_heads", "d_model", " (head width E = d_model / n_heads)")


@dataclass(frozen=True)
class GPTConfig:
    """Pre-norm causal decoder: GPT-2 style or Llama style by the switches below."""

    n_layers: int = 12  # decoder blocks
    d_model: int = 768  # hidden width D
    n_heads: int = 12  # query heads H
    n_kv_heads: int | None = None  # key/value heads K (None = H: MHA; 1 = MQA; else GQA)
    d_ff: int = 3072  # MLP hidden width F
    vocab_size: int = 50257  # vocabulary V
    max_len: int = 1024  # longest supported sequence (learned table size / RoPE range)
    dropout: float = 0.1  # residual, embedding and attention dropout during training
    norm: str = "layer"  # "layer" (GPT-2) or "rms" (Llama)
    norm_eps: float = 1e-5  # epsilon of every norm
    activation: str = "gelu_tanh"  # GPT-2 uses the tanh GELU ("gelu_new"); Llama "silu"
    gated_mlp: bool = False  # SwiGLU-style gate (Llama) instead of a plain 2-layer MLP
    positions: str = "learned"  # "learned" (GPT-2) or "rope" (Llama)
    rope_theta: float = 10000.0  # RoPE base (Llama-3 uses 500000)
    rope_layout: str = "half"  # which channels RoPE pairs: "half" (HF Llama) or "interleaved" (Meta)
    bias: bool = True  # biases in attention and MLP projections (GPT-2 yes, Llama no)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    head_dim: int | None = None  # E; None = D / H
    dtype: str = "float32"  # parameter dtype

    family = "gpt"

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.head_dim is None:
            _check_divides(self, "n_heads", "d_model", " (head width E = d_model / n_heads; or set head_dim)")
        if self.n_kv_heads is not None:
            _check_divides(self, "n_kv_heads", "n_heads", " (each key/value head serves n_heads / n_kv_heads "
                           "query heads)")
        if self.positions == "rope" and self.e % 2:
            which = ("head_dim",) if self.head_dim is not None else ("n_heads", "d_model")
            _fail(self, which, f"gives head width E={self.e}; rotary positions need an even E")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def e(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Encoder-decoder Transformer (Vaswani et al. 2017) with sinusoidal positions."""

    n_layers: int = 6  # encoder blocks
    n_decoder_layers: int | None = None  # decoder blocks (None = n_layers)
    d_model: int = 512  # hidden width D
    n_heads: int = 8  # attention heads H
    n_kv_heads: int | None = None  # decoder self-attention kv heads (None = H)
    d_ff: int = 2048  # MLP hidden width F
    vocab_size: int = 37000  # shared source/target vocabulary V (BPE, EN-DE in the paper)
    max_len: int = 1024  # longest supported source or target sequence
    dropout: float = 0.1  # residual dropout (P_drop in the paper)
    label_smoothing: float = 0.1  # epsilon_ls in the paper
    norm_eps: float = 1e-5  # LayerNorm epsilon
    prenorm: bool = False  # the paper is post-norm; pre-norm trains more stably when deep
    activation: str = "relu"  # the paper's FFN uses ReLU
    share_embeddings: bool = True  # one matrix for source, target and pre-softmax weights
    scale_embeddings: bool = True  # multiply embeddings by sqrt(D) (paper, section 3.4)
    position_layout: str = "interleaved"  # sinusoid channels: paper's sin/cos "interleaved" or
    #                                       Marian's "concat" (all sines, then all cosines)
    final_logits_bias: bool = False  # a learned (V,) bias added to the logits (Marian)
    dtype: str = "float32"  # parameter dtype

    family = "seq2seq"

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_divides(self, "n_heads", "d_model", " (head width E = d_model / n_heads)")
        if self.n_kv_heads is not None:
            _check_divides(self, "n_kv_heads", "n_heads", " (each key/value head serves n_heads / n_kv_heads "
                           "query heads)")

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers


@dataclass(frozen=True)
class ViTConfig:
    """Vision Transformer: patch embedding, class token, learned positions, pre-norm encoder."""

    n_layers: int = 12  # encoder blocks
    d_model: int = 768  # hidden width D
    n_heads: int = 12  # attention heads H
    d_ff: int = 3072  # MLP hidden width F
    image_size: int = 224  # square input images, pixels
    patch_size: int = 16  # square patches; image_size must be divisible by it
    n_channels: int = 3  # input channels (images are NCHW as in HF)
    num_labels: int = 1000  # classes of the classification head
    dropout: float = 0.0  # hidden dropout
    norm_eps: float = 1e-12  # LayerNorm epsilon (HF ViT uses 1e-12)
    activation: str = "gelu"  # erf GELU
    qkv_bias: bool = True  # biases on the query / key / value projections
    classifier: bool = True  # classification head on the class token (HF ViTForImageClassification)
    pooler: bool = False  # tanh pooler on the class token (HF ViTModel's pooler_output)
    dtype: str = "float32"  # parameter dtype

    family = "vit"

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_divides(self, "n_heads", "d_model", " (head width E = d_model / n_heads)")
        _check_divides(self, "patch_size", "image_size", " (the patches tile the image)")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_len(self) -> int:
        """Sequence length: one class token plus the patches."""
        return self.n_patches + 1

    @property
    def vocab_size(self) -> int:
        """Images have no vocabulary; the common field reads as the number of classes."""
        return self.num_labels


Config = BertConfig | GPTConfig | Seq2SeqConfig | ViTConfig

# --------------------------------------------------------------------------------------------
# presets

_GPT2 = GPTConfig()
_LLAMA = dict(norm="rms", activation="silu", gated_mlp=True, positions="rope", bias=False,
              tie_embeddings=False, dropout=0.0)

PRESETS: dict[str, Config] = {
    # BERT (Devlin et al. 2018)
    "bert-base": BertConfig(),
    "bert-large": BertConfig(n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "bert-tiny": BertConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=97, max_len=64),
    # GPT-2 (Radford et al. 2019)
    "gpt2": _GPT2,
    "gpt2-medium": dataclasses.replace(_GPT2, n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "gpt2-large": dataclasses.replace(_GPT2, n_layers=36, d_model=1280, n_heads=20, d_ff=5120),
    "gpt2-xl": dataclasses.replace(_GPT2, n_layers=48, d_model=1600, n_heads=25, d_ff=6400),
    "gpt2-tiny": dataclasses.replace(_GPT2, n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                     vocab_size=101, max_len=64),
    # Llama-style shapes
    "llama-3.2-1b": GPTConfig(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192,
                              vocab_size=128256, max_len=131072, rope_theta=500000.0,
                              norm_eps=1e-5, **{**_LLAMA, "tie_embeddings": True}),
    "llama-2-7b": GPTConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008,
                            vocab_size=32000, max_len=4096, norm_eps=1e-5, **_LLAMA),
    "llama-tiny": GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                            vocab_size=103, max_len=64, norm_eps=1e-6, **_LLAMA),
    # Transformer (Vaswani et al. 2017), EN-DE shared 37k BPE vocabulary
    "transformer-base": Seq2SeqConfig(),
    "transformer-big": Seq2SeqConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    "seq2seq-tiny": Seq2SeqConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=89,
                                  max_len=64),
    # ViT (Dosovitskiy et al. 2020), ImageNet-1k head
    "vit-base-16": ViTConfig(),
    "vit-large-16": ViTConfig(n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "vit-tiny": ViTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, image_size=8, patch_size=4,
                          n_channels=1, num_labels=10),
}

# Published parameter counts the presets are checked against (the papers' / model cards' figures).
PUBLISHED_COUNTS: dict[str, float] = {
    "bert-base": 110e6,
    "bert-large": 340e6,
    "gpt2": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    # "1.5B" is the model card's rounded label; the released checkpoint has 1,557,611,200.
    "gpt2-xl": 1.5576e9,
    # The paper's Table 3 says 65M; its own formulas with the stated sizes (6+6 layers, D=512,
    # F=2048, shared 37k vocabulary) give 63.08M. transformer-big (213M) matches to 0.6%.
    "transformer-base": 65e6,
    "transformer-big": 213e6,
    "vit-base-16": 86e6,
    "vit-large-16": 304e6,
    "llama-2-7b": 6.74e9,
    "llama-3.2-1b": 1.24e9,
}


def preset(name: str, **overrides: Any) -> Config:
    """The config called ``name``, with optional field overrides."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# parameter shapes and counts, derived from the config alone


def _linear(d_in: int, d_out: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {"kernel": (d_in, d_out), **({"bias": (d_out,)} if bias else {})}


def _norm(d: int, rms: bool = False) -> dict[str, tuple[int, ...]]:
    return {"scale": (d,)} if rms else {"scale": (d,), "bias": (d,)}


def _attention(d: int, h: int, k: int, e: int, bias: bool = True) -> dict[str, Any]:
    def proj(heads: int) -> dict[str, tuple[int, ...]]:
        return {"kernel": (d, heads, e), **({"bias": (heads, e)} if bias else {})}

    out = {"kernel": (h, e, d), **({"bias": (d,)} if bias else {})}
    return {"query": proj(h), "key": proj(k), "value": proj(k), "out": out}


def _mlp(d: int, f: int, gated: bool = False, bias: bool = True) -> dict[str, Any]:
    if gated:
        return {"gate": _linear(d, f, bias), "up": _linear(d, f, bias), "down": _linear(f, d, bias)}
    return {"up": _linear(d, f, bias), "down": _linear(f, d, bias)}


def _stack(n: int, tree: dict[str, Any]) -> dict[str, Any]:
    """Prefix every leaf shape with the layer axis L = n."""
    return {k: _stack(n, v) if isinstance(v, dict) else (n, *v) for k, v in tree.items()}


def param_shapes(config: Config) -> dict[str, Any]:
    """Every leaf's shape in the shared parameter tree, as nested dicts of tuples."""
    c = config
    if isinstance(c, BertConfig):
        d, e = c.d_model, c.d_model // c.n_heads
        block = {"attn": _attention(d, c.n_heads, c.n_heads, e), "attn_norm": _norm(d),
                 "mlp": _mlp(d, c.d_ff), "mlp_norm": _norm(d)}
        return {
            "embeddings": {"word": {"embedding": (c.vocab_size, d)},
                           "position": {"embedding": (c.max_len, d)},
                           "token_type": {"embedding": (c.type_vocab_size, d)},
                           "norm": _norm(d)},
            "layers": _stack(c.n_layers, block),
            **({"pooler": _linear(d, d)} if c.pooler else {}),
        }
    if isinstance(c, GPTConfig):
        d, rms = c.d_model, c.norm == "rms"
        block = {"attn_norm": _norm(d, rms), "attn": _attention(d, c.n_heads, c.kv_heads, c.e, c.bias),
                 "mlp_norm": _norm(d, rms), "mlp": _mlp(d, c.d_ff, c.gated_mlp, c.bias)}
        tree: dict[str, Any] = {"embed": {"embedding": (c.vocab_size, d)}}
        if c.positions == "learned":
            tree["position"] = {"embedding": (c.max_len, d)}
        tree["layers"] = _stack(c.n_layers, block)
        tree["final_norm"] = _norm(d, rms)
        if not c.tie_embeddings:
            tree["lm_head"] = {"kernel": (d, c.vocab_size)}
        return tree
    if isinstance(c, Seq2SeqConfig):
        d, e = c.d_model, c.d_model // c.n_heads
        enc = {"attn": _attention(d, c.n_heads, c.n_heads, e), "attn_norm": _norm(d),
               "mlp": _mlp(d, c.d_ff), "mlp_norm": _norm(d)}
        dec = {"attn": _attention(d, c.n_heads, c.n_kv_heads or c.n_heads, e), "attn_norm": _norm(d),
               "cross_attn": _attention(d, c.n_heads, c.n_heads, e), "cross_norm": _norm(d),
               "mlp": _mlp(d, c.d_ff), "mlp_norm": _norm(d)}
        tree = {"embed": {"embedding": (c.vocab_size, d)}}
        if not c.share_embeddings:
            tree["target_embed"] = {"embedding": (c.vocab_size, d)}
            tree["lm_head"] = {"kernel": (d, c.vocab_size)}
        if c.final_logits_bias:
            tree["final_logits_bias"] = (c.vocab_size,)
        tree["encoder"] = {"layers": _stack(c.n_layers, enc)}
        tree["decoder"] = {"layers": _stack(c.decoder_layers, dec)}
        if c.prenorm:  # pre-norm stacks need a norm after the last block
            tree["encoder"]["final_norm"] = _norm(d)
            tree["decoder"]["final_norm"] = _norm(d)
        return tree
    if isinstance(c, ViTConfig):
        d, e = c.d_model, c.d_model // c.n_heads
        attn = _attention(d, c.n_heads, c.n_heads, e)
        if not c.qkv_bias:
            for name in ("query", "key", "value"):
                del attn[name]["bias"]
        block = {"attn_norm": _norm(d), "attn": attn, "mlp_norm": _norm(d), "mlp": _mlp(d, c.d_ff)}
        tree = {
            "patch_embed": _linear(c.n_channels * c.patch_size**2, d),
            "cls_token": (d,),
            "position": {"embedding": (c.max_len, d)},
            "layers": _stack(c.n_layers, block),
            "final_norm": _norm(d),
        }
        if c.pooler:
            tree["pooler"] = _linear(d, d)
        if c.classifier:
            tree["head"] = _linear(d, c.num_labels)
        return tree
    raise TypeError(f"not a model config: {type(config).__name__}")


def param_count(config: Config) -> int:
    """Number of scalars in the model's parameter tree, computed from shapes only."""

    def count(node: Any) -> int:
        if isinstance(node, dict):
            return sum(count(v) for v in node.values())
        return math.prod(node)

    return count(param_shapes(config))


# --------------------------------------------------------------------------------------------
# logical axis names (mapped to mesh axes by one rules table on the JAX side when sharding)

# (leaf-path suffix, axis names of the unstacked leaf); the first match wins.
_AXIS_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("attn/query/kernel", ("embed", "heads", "head_dim")),
    ("attn/query/bias", ("heads", "head_dim")),
    ("attn/key/kernel", ("embed", "kv_heads", "head_dim")),
    ("attn/key/bias", ("kv_heads", "head_dim")),
    ("attn/value/kernel", ("embed", "kv_heads", "head_dim")),
    ("attn/value/bias", ("kv_heads", "head_dim")),
    ("attn/out/kernel", ("heads", "head_dim", "embed")),
    ("mlp/down/kernel", ("mlp", "embed")),
    ("mlp/up/kernel", ("embed", "mlp")),
    ("mlp/gate/kernel", ("embed", "mlp")),
    ("mlp/up/bias", ("mlp",)),
    ("mlp/gate/bias", ("mlp",)),
    ("position/embedding", ("position", "embed")),
    ("token_type/embedding", (None, "embed")),
    ("embedding", ("vocab", "embed")),
    ("lm_head/kernel", ("embed", "vocab")),
    ("patch_embed/kernel", ("patch", "embed")),
    ("head/kernel", ("embed", "classes")),
    ("head/bias", ("classes",)),
    ("pooler/kernel", ("embed", None)),
    ("pooler/bias", (None,)),
    ("final_logits_bias", ("vocab",)),
    # BERT heads (reference_numpy.models.bert.head_shapes; not in param_shapes(config), which is
    # the encoder): listed before the generic "bias" so their V / C / 2 axes are not called embed
    ("mlm/transform/kernel", ("embed", None)),
    ("mlm/bias", ("vocab",)),
    ("classifier/kernel", ("embed", "classes")),
    ("classifier/bias", ("classes",)),
    ("qa/kernel", ("embed", None)),
    ("qa/bias", (None,)),
    ("scale", ("embed",)),
    ("bias", ("embed",)),
    ("cls_token", ("embed",)),
)


def _rule_names(path: str) -> tuple[str | None, ...] | None:
    """The first ``_AXIS_RULES`` entry whose suffix ends ``path`` (unstacked names), or None."""
    return next((n for suffix, n in _AXIS_RULES if path.endswith(suffix)), None)


def axes_for_path(path: str, ndim: int, stacked: bool) -> tuple[str | None, ...] | None:
    """Logical axis names of the leaf at ``path`` ("layers/attn/query/kernel"; keys joined by
    "/") with ``ndim`` dimensions, or None when no rule names it or the rule's rank (plus the
    leading ``"layers"`` axis when ``stacked``) is not ``ndim``. Serves any tree with our leaf
    names, e.g. one with a BERT head, which ``param_axes(config)`` does not list."""
    names = _rule_names(path)
    if names is None:
        return None
    names = (("layers",) if stacked else ()) + names
    return names if len(names) == ndim else None


def param_axes(config: Config) -> dict[str, Any]:
    """Logical axis names of every leaf (same tree as ``param_shapes``); stacked per-layer leaves
    get ``"layers"`` first. Names, not mesh axes: a sharding rules table maps them later."""

    def walk(node: dict[str, Any], path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, dict):
                out[k] = walk(v, p)
                continue
            if _rule_names(p) is None:
                raise KeyError(f"no logical axis rule for parameter {p}")
            stacked = "layers/" in p
            names = axes_for_path(p, len(v), stacked)
            if names is None:
                raise AssertionError(f"axis rule for {p} gives {(('layers',) if stacked else ()) + _rule_names(p)} "
                                     f"for shape {v}")
            out[k] = names
        return out

    return walk(param_shapes(config), "")
