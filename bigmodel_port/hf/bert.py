"""BERT: HF ``BertModel`` / ``BertFor{MaskedLM,SequenceClassification,TokenClassification,
QuestionAnswering}`` <-> our BERT tree. The one place BERT's HF names are translated."""

from __future__ import annotations

from typing import Any

from bigmodel_port.hf.common import ACTIVATIONS_TO_HF, activation_from_hf, build_config, dtype_from_hf, merge_hf
from bigmodel_port.hf.common import num_labels_from_hf, require, unsupported
from bigmodel_port.hf.mapping import Mapping, Rule, linear_rules, norm_rules
from reference_numpy.configs import BertConfig

MODEL_TYPE = "bert"
FAMILY = "bert"

# HF class -> our task (the BERT head of reference_numpy.models.bert)
ARCHITECTURES = {
    "BertModel": "base",
    "BertForMaskedLM": "mlm",
    "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
    "BertForQuestionAnswering": "question_answering",
}
# transformers builds these two heads with a pooler (add_pooling_layer=True), the others without
_WITH_POOLER = ("BertModel", "BertForSequenceClassification")

# our config field -> the config.json key it is read from (names the key when a value is refused)
HF_KEYS = {
    "n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size", "vocab_size": "vocab_size", "max_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size", "dropout": "hidden_dropout_prob", "norm_eps": "layer_norm_eps",
    "activation": "hidden_act", "num_labels": "num_labels",
}


def head_of(architecture: str) -> str:
    return ARCHITECTURES[architecture]


def config_from_hf(hf: dict[str, Any], architecture: str) -> BertConfig:
    """Our config for an HF BERT ``config.json`` dict; features we do not implement are refused."""
    mt = MODEL_TYPE
    unsupported(hf, "position_embedding_type", ("absolute",), "absolute", mt)
    unsupported(hf, "is_decoder", (False,), False, mt)
    unsupported(hf, "add_cross_attention", (False,), False, mt)
    if ARCHITECTURES[architecture] == "question_answering" and num_labels_from_hf(hf) != 2:
        raise ValueError(f"BertForQuestionAnswering needs num_labels=2 (start and end logits), "
                         f"config.json has {num_labels_from_hf(hf)}")
    return build_config(BertConfig, dict(
        n_layers=require(hf, "num_hidden_layers", model_type=mt),
        d_model=require(hf, "hidden_size", model_type=mt),
        n_heads=require(hf, "num_attention_heads", model_type=mt),
        d_ff=require(hf, "intermediate_size", model_type=mt),
        vocab_size=require(hf, "vocab_size", model_type=mt),
        max_len=require(hf, "max_position_embeddings", 512, model_type=mt),
        type_vocab_size=require(hf, "type_vocab_size", 2, model_type=mt),
        dropout=require(hf, "hidden_dropout_prob", 0.1, model_type=mt),
        norm_eps=require(hf, "layer_norm_eps", 1e-12, model_type=mt),
        activation=activation_from_hf(require(hf, "hidden_act", "gelu", model_type=mt), "hidden_act"),
        num_labels=num_labels_from_hf(hf),
        pooler=architecture in _WITH_POOLER,
        dtype=dtype_from_hf(hf),
    ), hf, HF_KEYS, mt)


def config_to_hf(config: BertConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config`` (fields of ``base`` we do not model are kept)."""
    c = config
    out = merge_hf(base, {
        "model_type": MODEL_TYPE, "architectures": [architecture],
        "num_hidden_layers": c.n_layers, "hidden_size": c.d_model, "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_len,
        "type_vocab_size": c.type_vocab_size, "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": (base or {}).get("attention_probs_dropout_prob", c.dropout),
        "layer_norm_eps": c.norm_eps, "hidden_act": ACTIVATIONS_TO_HF[c.activation],
        "position_embedding_type": "absolute", "dtype": c.dtype,
    })
    if ARCHITECTURES[architecture] in ("sequence_classification", "token_classification"):
        labels = (base or {}).get("id2label")
        if not labels or len(labels) != c.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    return out


def mapping(config: BertConfig, architecture: str) -> Mapping:
    """The name table of ``architecture`` for ``config``."""
    head = ARCHITECTURES[architecture]
    p = "" if architecture == "BertModel" else "bert."
    layer = f"{p}encoder.layer.{{i}}"
    rules = [
        Rule("embeddings/word/embedding", f"{p}embeddings.word_embeddings.weight"),
        Rule("embeddings/position/embedding", f"{p}embeddings.position_embeddings.weight"),
        Rule("embeddings/token_type/embedding", f"{p}embeddings.token_type_embeddings.weight"),
        *norm_rules("embeddings/norm", f"{p}embeddings.LayerNorm"),
        *linear_rules("layers/attn/query", f"{layer}.attention.self.query"),
        *linear_rules("layers/attn/key", f"{layer}.attention.self.key"),
        *linear_rules("layers/attn/value", f"{layer}.attention.self.value"),
        *linear_rules("layers/attn/out", f"{layer}.attention.output.dense", kind="linear_out"),
        *norm_rules("layers/attn_norm", f"{layer}.attention.output.LayerNorm"),
        *linear_rules("layers/mlp/up", f"{layer}.intermediate.dense"),
        *linear_rules("layers/mlp/down", f"{layer}.output.dense"),
        *norm_rules("layers/mlp_norm", f"{layer}.output.LayerNorm"),
    ]
    if config.pooler:
        rules += linear_rules("pooler", f"{p}pooler.dense")
    if head == "mlm":
        rules += [
            *linear_rules("mlm/transform", "cls.predictions.transform.dense"),
            *norm_rules("mlm/norm", "cls.predictions.transform.LayerNorm"),
            Rule("mlm/bias", "cls.predictions.bias"),
            # the decoder is the word embedding (tied) and its bias is cls.predictions.bias
            Rule("embeddings/word/embedding", "cls.predictions.decoder.weight",
                 tied_to=f"{p}embeddings.word_embeddings.weight"),
            Rule("mlm/bias", "cls.predictions.decoder.bias", tied_to="cls.predictions.bias"),
        ]
    elif head in ("sequence_classification", "token_classification"):
        rules += linear_rules("classifier", "classifier")
    elif head == "question_answering":
        rules += linear_rules("qa", "qa_outputs")
    return Mapping(rules, ignore=(r"(bert\.)?embeddings\.position_ids",), prefix="bert.")
