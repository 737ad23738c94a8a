"""BERT (Devlin et al. 2018): post-norm encoder with five heads; forward and the hand-written
backward of the whole model.

Dims: B batch, T time, D model width, V vocabulary, C = num_labels, L layers.

    x      = LN_emb(W_word[input_ids] + W_pos[0..T-1] + W_type[token_type_ids])   (B, T, D)
    x      = block_l(x; key_padding_mask = attention_mask)   l = 1..L
             (post-norm, bidirectional, LayerNorm eps = config.norm_eps, MLP act = config.activation)
    h      = x                                      last_hidden_state  (B, T, D)
    pooled = tanh(h[:, 0] W_pool + b_pool)          pooler_output      (B, D)

Heads (the ``head`` argument; ``HEADS``), and what ``forward`` returns:

    "base"                     (h, pooled)                                  ((B, T, D), (B, D))
    "mlm"                      LN_mlm(act(h W_t + b_t)) W_word^T + b_mlm    (B, T, V)
                               (HF's BertLMPredictionHead: the decoder is tied to the word
                               embeddings, plus its own output bias (V,))
    "sequence_classification"  pooled W_cls + b_cls                         (B, C)
    "token_classification"     h W_cls + b_cls                              (B, T, C)
    "question_answering"       h W_qa + b_qa                                (B, T, 2)
                               ``[..., 0]`` are the start logits, ``[..., 1]`` the end logits
                               (HF's ``qa_outputs`` output split along its last axis)

Losses (``loss_and_grad``; batches use HF's key names):

    "mlm"                      CE(logits, labels (B, T)), label -100 ignored
    "sequence_classification"  CE(logits, labels (B,)), label -100 ignored (num_labels >= 2;
                               HF's num_labels == 1 regression is not supported)
    "token_classification"     CE(logits, labels (B, T)), label -100 ignored
    "question_answering"       (CE(start, start_positions) + CE(end, end_positions)) / 2,
                               positions (B,) in [0, T]; T means "answer not in this window" and
                               is ignored (HF clamps out-of-window positions to T and ignores T;
                               we raise on anything outside [0, T] instead of clamping)
    "base"                     no loss: use ``forward_with_cache`` + ``backward`` with your own
                               cotangent pair ``(d last_hidden_state, d pooler_output)``

Parameter tree: ``configs.param_shapes(config)`` (embeddings, L-stacked post-norm blocks,
pooler; exactly HF's ``BertModel``) plus the head's leaves from ``head_shapes``:
``mlm: {transform: linear (D, D), norm: layer norm (D,), bias: (V,)}``,
``classifier: linear (D, C)`` (both classification heads), ``qa: linear (D, 2)``.
The pooler is in the tree when ``config.pooler`` (the default, as HF's ``BertModel``); HF's
masked-LM, token-classification and QA models have none (``pooler=False``; "base" then returns
``pooler_output=None``). Heads that do not read a present pooler give it an exact zero gradient.

* ``token_type_ids`` default to zeros; ``attention_mask`` (B, T), 1 = attend, defaults to all
  ones. A query row whose keys are all padding gets zero attention weights (HF gives it a
  uniform row); only fully padded sequences differ, and their outputs are meaningless anyway.
* Training-mode dropout (HF BERT's sites, one rate ``config.dropout`` for hidden and attention
  dropout) when ``masks`` is given, a tree shaped by ``dropout_mask_shapes`` (keep-masks,
  True = keep, kept entries scaled by 1 / (1 - p)); no masks = evaluation:

      x = drop(LN_emb(...); masks["embed"] (B, T, D))             after the embedding LayerNorm
      in block l: attention probs masks["layers"]["attn_probs"][l] (B, H, T, T)
                  attention output / MLP output, before the residual add and the norm:
                  masks["layers"]["attn_out"][l], masks["layers"]["mlp_out"][l]   (B, T, D)
      "sequence_classification": logits = drop(pooled; masks["classifier"] (B, D)) W_cls + b_cls
      "token_classification":    logits = drop(h; masks["classifier"] (B, T, D)) W_cls + b_cls
      (HF's ``BertFor*Classification`` dropout before the classifier; MLM / QA heads have none)

  The JAX model draws the same tree from a key (``bigmodel_jax.models.bert.dropout_masks``).
* Initialisation: ``models.common.init_rule`` (norm scales 1, biases 0, other leaves N(0, 0.02),
  residual-writing projections N(0, 0.02 / sqrt(2 L))). The encoder leaves are drawn first, then
  the head's, so one seed gives the same encoder for every head.

Backward: the blocks run in reverse with ``block_backward``; the MLM decoder's gradient is
*added* to the word-embedding gradient of the lookup (tied weights); the pooler's input
gradient lands on token 0 only; the position gradient sums over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from reference_numpy.checks import is_tracer, check_array, check_ids
from reference_numpy.configs import BertConfig, param_shapes as _encoder_shapes
from reference_numpy.layers.block import BlockSpec, block_backward, block_forward
from reference_numpy.layers.dropout import (
    dropout_backward,
    dropout_mask_tree,
    optional_dropout_forward,
    resolve_mask_tree,
)
from reference_numpy.layers.embeddings import (
    embedding_attend,
    embedding_attend_backward,
    embedding_backward,
    embedding_forward,
    position_embedding_backward,
    position_embedding_forward,
)
from reference_numpy.layers.linear import linear_backward, linear_forward
from reference_numpy.layers.norms import layer_norm_backward, layer_norm_forward
from reference_numpy.losses import IGNORE_INDEX, check_labels, cross_entropy_backward, cross_entropy_forward
from reference_numpy.models.common import check_token_batch, collect_blocks, init_params, layer, require_keys, stack
from reference_numpy.tree import Tree, tree_zeros_like

HEADS = ("base", "mlm", "sequence_classification", "token_classification", "question_answering")

# Top-level parameter key each head adds to the encoder tree (None: the head adds nothing).
HEAD_PARAM_KEY = {
    "base": None,
    "mlm": "mlm",
    "sequence_classification": "classifier",
    "token_classification": "classifier",
    "question_answering": "qa",
}

# Batch keys the loss of each head needs, besides input_ids.
LABEL_KEYS = {
    "base": (),
    "mlm": ("labels",),
    "sequence_classification": ("labels",),
    "token_classification": ("labels",),
    "question_answering": ("start_positions", "end_positions"),
}

# Every batch key the model reads (anything else in a batch is ignored).
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


# --------------------------------------------------------------------------------------------
# shared with the JAX model: heads, parameter shapes, block spec, batch checks


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown BERT head {head!r}; known: {list(HEADS)}")


def head_shapes(config: BertConfig, head: str) -> dict[str, Any]:
    """The leaves ``head`` adds to the encoder tree, as nested dicts of shape tuples."""
    check_head(head)
    d, v, c = config.d_model, config.vocab_size, config.num_labels
    if head == "mlm":
        return {"mlm": {"transform": {"kernel": (d, d), "bias": (d,)},
                        "norm": {"scale": (d,), "bias": (d,)},
                        "bias": (v,)}}
    if head in ("sequence_classification", "token_classification"):
        return {"classifier": {"kernel": (d, c), "bias": (c,)}}
    if head == "question_answering":
        return {"qa": {"kernel": (d, 2), "bias": (2,)}}
    return {}


def param_shapes(config: BertConfig, head: str = "mlm") -> dict[str, Any]:
    """Every leaf's shape: ``configs.param_shapes(config)`` (the encoder) plus ``head_shapes``."""
    return {**_encoder_shapes(config), **head_shapes(config, head)}


def param_count(config: BertConfig, head: str = "mlm") -> int:
    """Scalars in the tree of ``config`` with ``head`` (``configs.param_count`` is the "base" count)."""

    def count(node: Any) -> int:
        return sum(count(x) for x in node.values()) if isinstance(node, dict) else math.prod(node)

    return count(param_shapes(config, head))


def block_spec(config: BertConfig) -> BlockSpec:
    """The encoder block: post-norm, bidirectional self-attention, LayerNorm, plain MLP."""
    return BlockSpec(prenorm=False, norm="layer", norm_eps=config.norm_eps, activation=config.activation,
                     causal=False)


def dropout_mask_shapes(config: BertConfig, batch_size: int, length: int, head: str = "mlm") -> dict[str, Any]:
    """Shapes of the training masks for a (B, T) batch and ``head`` (shared with the JAX model):
    ``{"embed": (B, T, D), "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D),
    "mlp_out": (L, B, T, D)}}`` plus ``"classifier"`` ((B, D) for sequence classification,
    (B, T, D) for token classification)."""
    check_head(head)
    B, T, D, H, L = batch_size, length, config.d_model, config.n_heads, config.n_layers
    shapes: dict[str, Any] = {
        "embed": (B, T, D),
        "layers": {"attn_probs": (L, B, H, T, T), "attn_out": (L, B, T, D), "mlp_out": (L, B, T, D)},
    }
    if head == "sequence_classification":
        shapes["classifier"] = (B, D)
    elif head == "token_classification":
        shapes["classifier"] = (B, T, D)
    return shapes


def check_params(params: Tree, head: str, config: BertConfig | None = None) -> None:
    """The tree holds the encoder and the head's subtree (keys only; works on JAX tracers).
    The pooler is required when ``config.pooler`` (and for sequence classification, which reads it)."""
    check_head(head)
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict tree, got {type(params).__name__}")
    if head == "sequence_classification" and config is not None and not config.pooler:
        raise ValueError("the sequence-classification head reads the pooler: set BertConfig(pooler=True)")
    pooler = ["pooler"] if config is None or config.pooler else []
    need = ["embeddings", "layers", *pooler] + ([HEAD_PARAM_KEY[head]] if HEAD_PARAM_KEY[head] else [])
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(
            f"params for head {head!r} are missing {missing} (got {sorted(params)}); "
            f"build them with init(config, seed, head={head!r})"
        )


def check_batch(
    batch: dict[str, Any], config: BertConfig, head: str = "mlm", *, with_labels: bool = False
) -> None:
    """Check a BERT batch: required keys, input_ids (B, T) in [0, V) with T <= max_len,
    attention_mask / token_type_ids (B, T) (type ids in [0, type_vocab_size)), and with
    ``with_labels`` the head's targets. Values are checked when known (not under ``jit``)."""
    check_head(head)
    if with_labels and head == "base":
        raise ValueError("head 'base' has no loss; use forward_with_cache + backward with your own "
                         "cotangents")
    require_keys(batch, ["input_ids", *(LABEL_KEYS[head] if with_labels else ())], "bert")
    ids = batch["input_ids"]
    if is_tracer(ids):  # under jit: shapes only (loss_and_grad checked the values before tracing)
        check_array("input_ids", ids, ("B", "T"), kind="int")
        if ids.shape[1] > config.max_len:
            raise ValueError(f"input_ids has length {ids.shape[1]}, longer than the model supports "
                             f"(max_len={config.max_len})")
        if batch.get("attention_mask") is not None:
            check_array("attention_mask", batch["attention_mask"], ids.shape)
    else:
        check_token_batch(batch, "input_ids", config.vocab_size, config.max_len)
    B, T = ids.shape
    if batch.get("token_type_ids") is not None:
        check_ids("token_type_ids", batch["token_type_ids"], config.type_vocab_size, (B, T))
    if with_labels:
        check_loss_labels(batch, config, head)


def check_loss_labels(batch: dict[str, Any], config: BertConfig, head: str = "mlm") -> None:
    """The head's targets (``LABEL_KEYS[head]``), shaped by ``input_ids`` (B, T): ``labels``
    (B, T) in [0, V) (mlm) or [0, C) (token classification), (B,) in [0, C) (sequence
    classification), -100 ignored; ``start_positions`` / ``end_positions`` (B,) in [0, T], T
    ignored (the answer is outside this window). Values by ``losses.check_labels``, when
    concrete (under ``jit`` the caller checks on the host)."""
    check_head(head)
    if head == "base":
        raise ValueError("head 'base' has no loss; use forward_with_cache + backward with your own "
                         "cotangents")
    require_keys(batch, ["input_ids", *LABEL_KEYS[head]], "bert")
    B, T = np.shape(batch["input_ids"])
    if head in ("mlm", "token_classification"):
        n = config.vocab_size if head == "mlm" else config.num_labels
        check_labels(batch["labels"], n, "labels", shape=(B, T))
    elif head == "sequence_classification":
        if config.num_labels < 2:
            raise ValueError(f"sequence_classification needs num_labels >= 2, got {config.num_labels} "
                             "(HF's num_labels == 1 regression is not supported)")
        check_labels(batch["labels"], config.num_labels, "labels", shape=(B,))
    else:  # question_answering: position T = answer outside this window, ignored
        for key in ("start_positions", "end_positions"):
            check_labels(batch[key], T, key, ignore_index=T, shape=(B,))


# --------------------------------------------------------------------------------------------
# model


def init(config: BertConfig, rng: np.random.Generator | int, head: str = "mlm") -> Tree:
    """Fresh parameters for ``config`` and ``head`` (same rules as ``bigmodel_jax.models.bert.init``,
    NumPy random stream). ``rng``: a Generator or an int seed. The encoder is drawn first."""
    check_head(head)
    rng = np.random.default_rng(rng)
    dtype = np.dtype(config.dtype)
    params = init_params(_encoder_shapes(config), config.n_layers, rng, dtype)
    params.update(init_params(head_shapes(config, head), config.n_layers, rng, dtype))
    return params


def dropout_masks(
    config: BertConfig, rng: np.random.Generator, batch_size: int, length: int, head: str = "mlm"
) -> Tree:
    """A fresh tree of keep-masks (``dropout_mask_shapes``) drawn with P(keep) = 1 - config.dropout."""
    return dropout_mask_tree(rng, dropout_mask_shapes(config, batch_size, length, head), config.dropout)


def _head_forward(
    params: Tree, h: np.ndarray, config: BertConfig, head: str, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[Any, Any, Any]:
    """last_hidden_state (B, T, D) -> the head's output (see the module docstring), its cache and
    the cache of the dropout before the classifier (None in evaluation / for other heads).
    ``collect``: the trace list, which gets "base"'s ``last_hidden_state`` row and the
    ``pooler_output`` row of the heads that pool."""
    cls_mask = None if masks is None else masks.get("classifier")
    if head == "mlm":
        p = params["mlm"]
        t, c_t = linear_forward(p["transform"], h, config.activation)  # (B, T, D)
        n, c_n = layer_norm_forward(p["norm"], t, eps=config.norm_eps)  # (B, T, D)
        logits, c_dec = embedding_attend(params["embeddings"]["word"], n)  # (B, T, V), tied decoder
        return logits + p["bias"], (c_t, c_n, c_dec), None
    if head == "token_classification":
        hd, c_drop = optional_dropout_forward(h, cls_mask, config.dropout)
        return (*linear_forward(params["classifier"], hd), c_drop)  # (B, T, C)
    if head == "question_answering":
        return (*linear_forward(params["qa"], h), None)  # (B, T, 2)
    if head == "base" and collect is not None:
        collect.append(("last_hidden_state", h))
    if head == "base" and not config.pooler:
        return (h, None), (None, None), None
    pooled, c_pool = linear_forward(params["pooler"], h[:, 0], "tanh")  # (B, D)
    if collect is not None:
        collect.append(("pooler_output", pooled))
    if head == "base":
        return (h, pooled), (c_pool, None), None
    pooled, c_drop = optional_dropout_forward(pooled, cls_mask, config.dropout)
    logits, c_cls = linear_forward(params["classifier"], pooled)  # (B, C)
    return logits, (c_pool, c_cls), c_drop


def forward_with_cache(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *, masks: Tree | None = None,
    collect: list | None = None,
) -> tuple[Any, Any]:
    """The head's output (see the module docstring) and everything backward needs. ``masks``:
    training dropout masks (``dropout_mask_shapes``; e.g. ``np.asarray`` of the JAX
    ``dropout_masks``), None = evaluation. ``collect``: a list this call appends the trace rows
    to (``reference_numpy.trace``): ``embeddings``, each block's, ``pooler_output``."""
    check_params(params, head, config)
    check_batch(batch, config, head)
    ids = np.asarray(batch["input_ids"])
    mask = batch.get("attention_mask")
    mask = None if mask is None else np.asarray(mask).astype(bool)  # (B, T), True = attend
    B, T = ids.shape
    masks = resolve_mask_tree(masks, dropout_mask_shapes(config, B, T, head), config.dropout)
    types = batch.get("token_type_ids")
    types = np.zeros_like(ids) if types is None else np.asarray(types)
    emb = params["embeddings"]
    w, c_word = embedding_forward(emb["word"], ids)  # (B, T, D)
    p, c_pos = position_embedding_forward(emb["position"], np.arange(T))  # (T, D)
    s, c_type = embedding_forward(emb["token_type"], types)  # (B, T, D)
    x, c_emb_norm = layer_norm_forward(emb["norm"], w + p + s, eps=config.norm_eps)
    x, c_emb_drop = optional_dropout_forward(x, None if masks is None else masks["embed"], config.dropout)
    if collect is not None:
        collect.append(("embeddings", x))
    spec = block_spec(config)
    if masks is not None:
        spec = dataclasses.replace(spec, dropout_rate=config.dropout)
    c_blocks = []
    for i in range(config.n_layers):  # a loop over layers, not tokens
        m = None if masks is None else layer(masks["layers"], i)
        inter: dict[str, np.ndarray] | None = None if collect is None else {}
        x, c = block_forward(layer(params["layers"], i), x, spec, key_padding_mask=mask, masks=m,
                             intermediates=inter)
        collect_blocks(collect, "", i, inter)
        c_blocks.append(c)
    out, c_head, c_cls_drop = _head_forward(params, x, config, head, masks, collect)
    cache = {"head": head, "h_shape": x.shape, "word": c_word, "pos": c_pos, "type": c_type,
             "emb_norm": c_emb_norm, "emb_drop": c_emb_drop, "blocks": c_blocks, "out": c_head,
             "cls_drop": c_cls_drop}
    return out, cache


def forward(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *, masks: Tree | None = None,
    collect: list | None = None,
) -> Any:
    """Logits of ``head`` ((B, T, V) for "mlm"), or ``(last_hidden_state, pooler_output)`` for "base"
    (``masks``, ``collect``: see ``forward_with_cache``)."""
    return forward_with_cache(params, batch, config, head, masks=masks, collect=collect)[0]


def output_shape(config: BertConfig, head: str, B: int, T: int) -> tuple[int, ...]:
    """Shape of ``forward``'s logits for ``head`` ("base": of last_hidden_state)."""
    return {
        "base": (B, T, config.d_model),
        "mlm": (B, T, config.vocab_size),
        "sequence_classification": (B, config.num_labels),
        "token_classification": (B, T, config.num_labels),
        "question_answering": (B, T, 2),
    }[head]


def backward(params: Tree, cache: Any, dlogits: Any, config: BertConfig, head: str = "mlm") -> Tree:
    """Hand-written backward from the head's output cotangent to a gradient tree shaped like params.

    ``dlogits`` has the shape of ``forward``'s output; for "base" it is the pair
    ``(d last_hidden_state (B, T, D), d pooler_output (B, D))`` (either may be None).
    """
    check_head(head)
    if cache["head"] != head:
        raise ValueError(f"cache was made for head {cache['head']!r}, not {head!r}")
    B, T, D = cache["h_shape"]
    dtype = params["embeddings"]["word"]["embedding"].dtype
    grads = tree_zeros_like(params)  # start from zeros: a leaf the head never reads (the pooler) stays 0
    g_decoder = None
    dpooled = None
    if head == "base":
        dh, dpooled = dlogits
        dh = np.zeros((B, T, D), dtype) if dh is None else dh
        check_array("d last_hidden_state", dh, (B, T, D), kind="float")
        if dpooled is not None:
            check_array("d pooler_output", dpooled, (B, D), kind="float")
    else:
        check_array("dlogits", dlogits, output_shape(config, head, B, T), kind="float")
    c_head = cache["out"]
    if head == "mlm":
        c_t, c_n, c_dec = c_head
        p = params["mlm"]
        grads["mlm"]["bias"] = dlogits.reshape(-1, config.vocab_size).sum(axis=0)
        dn, g_decoder = embedding_attend_backward(params["embeddings"]["word"], c_dec, dlogits)
        dt, grads["mlm"]["norm"] = layer_norm_backward(p["norm"], c_n, dn)
        dh, grads["mlm"]["transform"] = linear_backward(p["transform"], c_t, dt)
    elif head == "token_classification":
        dh, grads["classifier"] = linear_backward(params["classifier"], c_head, dlogits)
        dh = dropout_backward(cache["cls_drop"], dh)
    elif head == "question_answering":
        dh, grads["qa"] = linear_backward(params["qa"], c_head, dlogits)
    elif head == "sequence_classification":
        _, c_cls = c_head
        dpooled, grads["classifier"] = linear_backward(params["classifier"], c_cls, dlogits)
        dpooled = dropout_backward(cache["cls_drop"], dpooled)
        dh = np.zeros((B, T, D), dtype)
    if dpooled is not None and config.pooler:  # pooler reads token 0 only
        c_pool, _ = c_head
        dcls, grads["pooler"] = linear_backward(params["pooler"], c_pool, dpooled)
        dh = dh.copy()
        dh[:, 0] += dcls

    dx = dh
    layer_grads = []
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(layer(params["layers"], i), cache["blocks"][i], dx)
        layer_grads.append(g)
    grads["layers"] = stack(layer_grads[::-1])

    emb = params["embeddings"]
    g_emb = grads["embeddings"]
    dx = dropout_backward(cache["emb_drop"], dx)  # the embedding dropout (identity in evaluation)
    de, g_emb["norm"] = layer_norm_backward(emb["norm"], cache["emb_norm"], dx)  # d(word + pos + type)
    _, g_emb["word"] = embedding_backward(emb["word"], cache["word"], de)
    _, g_emb["position"] = position_embedding_backward(emb["position"], cache["pos"], de)  # sums over B
    _, g_emb["token_type"] = embedding_backward(emb["token_type"], cache["type"], de)
    if g_decoder is not None:  # tied MLM decoder: both uses of W_word add up
        g_emb["word"]["embedding"] = g_emb["word"]["embedding"] + g_decoder["embedding"]
    return grads


def loss_from_logits(logits: np.ndarray, batch: dict[str, Any], head: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's loss (0-d) and dloss/dlogits, by the hand-written cross-entropy backward."""
    one = np.ones((), logits.dtype)
    if head == "question_answering":
        T = logits.shape[1]
        dlogits = np.zeros_like(logits)
        losses = []
        for j, key in enumerate(("start_positions", "end_positions")):  # mean of the two CEs
            loss_j, c = cross_entropy_forward(logits[..., j], np.asarray(batch[key]), ignore_index=T)
            dlogits[..., j] = cross_entropy_backward(c, 0.5 * one)
            losses.append(loss_j)
        return np.asarray(0.5 * (losses[0] + losses[1]), logits.dtype), dlogits
    loss, c = cross_entropy_forward(logits, np.asarray(batch["labels"]), ignore_index=IGNORE_INDEX)
    return loss, cross_entropy_backward(c, one)


def loss_and_grad(
    params: Tree, batch: dict[str, Any], config: BertConfig, head: str = "mlm", *, masks: Tree | None = None
) -> tuple[np.ndarray, Tree]:
    """The head's mean loss (module docstring) and its gradient, by the hand-written backward
    (``masks``: training dropout masks, see ``forward_with_cache``; None = evaluation)."""
    check_batch(batch, config, head, with_labels=True)
    logits, cache = forward_with_cache(params, batch, config, head, masks=masks)
    loss, dlogits = loss_from_logits(logits, batch, head)
    return loss, backward(params, cache, dlogits, config, head)
