"""NumPy reference implementation: the readable specification of the math.

Imports nothing but NumPy and the standard library. Every layer is a ``*_forward`` /
``*_backward`` pair with a hand-written backward; see ``docs/DESIGN.md``.
"""

from reference_numpy import checks, configs, gradcheck, optim, schedules, tolerances, tree

__all__ = ["checks", "configs", "gradcheck", "optim", "schedules", "tolerances", "tree"]
__version__ = "0.1.0"

# transformers-style API (``reference_numpy.BertModel.from_pretrained(dir)`` ...), loaded on first use so
# that importing the package stays light (NumPy and the standard library only).
HUB_NAMES = ('BertModel', 'BertForMaskedLM', 'BertForSequenceClassification', 'BertForTokenClassification', 'BertForQuestionAnswering', 'GPT2Model', 'GPT2LMHeadModel', 'LlamaModel', 'LlamaForCausalLM', 'ViTModel', 'ViTForImageClassification', 'MarianMTModel', 'AutoModel', 'AutoModelForCausalLM', 'AutoModelForMaskedLM', 'AutoModelForSeq2SeqLM', 'AutoModelForSequenceClassification', 'AutoModelForTokenClassification', 'AutoModelForQuestionAnswering', 'AutoModelForImageClassification')
TOKENIZER_NAMES = ('AutoTokenizer', 'BertTokenizer', 'GPT2Tokenizer', 'PreTrainedTokenizerFast', 'LlamaTokenizer')


def __getattr__(name: str):
    if name in HUB_NAMES:
        from reference_numpy import hub
        return getattr(hub, name)
    if name in TOKENIZER_NAMES:
        from bigmodel_port import tokenization
        return getattr(tokenization, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
