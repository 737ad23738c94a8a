"""bigmodel-jax: Transformer models in JAX + Flax, checked against the NumPy reference."""

from bigmodel_jax.tree import to_jax, to_numpy

__all__ = ["to_jax", "to_numpy"]
__version__ = "0.1.0"

# transformers-style API (``bigmodel_jax.BertModel.from_pretrained(dir)`` ...), loaded on first use so
# that importing the package stays light.
HUB_NAMES = ('BertModel', 'BertForMaskedLM', 'BertForSequenceClassification', 'BertForTokenClassification', 'BertForQuestionAnswering', 'GPT2Model', 'GPT2LMHeadModel', 'LlamaModel', 'LlamaForCausalLM', 'ViTModel', 'ViTForImageClassification', 'MarianMTModel', 'AutoModel', 'AutoModelForCausalLM', 'AutoModelForMaskedLM', 'AutoModelForSeq2SeqLM', 'AutoModelForSequenceClassification', 'AutoModelForTokenClassification', 'AutoModelForQuestionAnswering', 'AutoModelForImageClassification')
TOKENIZER_NAMES = ('AutoTokenizer', 'BertTokenizer', 'GPT2Tokenizer', 'PreTrainedTokenizerFast', 'LlamaTokenizer')


def __getattr__(name: str):
    if name in HUB_NAMES:
        from bigmodel_jax import hub
        return getattr(hub, name)
    if name in TOKENIZER_NAMES:
        from bigmodel_port import tokenization
        return getattr(tokenization, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
