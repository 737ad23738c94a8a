"""Data for training: text cleaning and tokenization, MLM masking, causal-LM packing, padding,
deterministic shuffles and splits, resumable file streams, and built-in offline data sets.

NumPy + standard library only (plus ``tokenizers`` through ``bigmodel_port.tokenization`` and
scikit-learn for ``digits``, both imported lazily); never jax, so the NumPy-reference trainer
can use it.
"""

from bigmodel_train.data.builtin import (
    DOCSTRING_GROUPS,
    ImageClassificationData,
    LabeledTexts,
    TextClassificationData,
    TextCorpus,
    TranslationData,
    describe,
    digits,
    docstring_classification,
    encode_translation_batch,
    english_number,
    french_number,
    german_number,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
    translation_numbers,
)
from bigmodel_train.data.mlm import mask_tokens, special_tokens_mask
from bigmodel_train.data.packing import (
    BlockPacker,
    PackedBlocks,
    batch_indices,
    causal_lm_batch,
    document_attention_mask,
    epoch_permutation,
    pack_documents,
    pad_batch,
    split_indices,
    split_items,
    stratified_split,
    unpack_blocks,
)
from bigmodel_train.data.stream import DataError, ImageArrays, JsonlStream, StreamPosition, TextLineStream
from bigmodel_train.data.text import WordVocab, clean_text, tokenize_documents, train_tokenizer
from reference_numpy.losses import IGNORE_INDEX

__all__ = [
    "DOCSTRING_GROUPS", "IGNORE_INDEX", "BlockPacker", "DataError", "ImageArrays", "ImageClassificationData",
    "JsonlStream", "LabeledTexts", "PackedBlocks", "StreamPosition", "TextClassificationData", "TextCorpus",
    "TextLineStream", "TranslationData", "WordVocab", "batch_indices", "causal_lm_batch", "clean_text",
    "describe", "digits", "docstring_classification", "document_attention_mask", "encode_translation_batch",
    "english_number", "epoch_permutation", "french_number", "german_number", "mask_tokens", "pack_documents",
    "pad_batch", "special_tokens_mask", "split_indices", "split_items", "stdlib_corpus", "stdlib_files",
    "stdlib_root", "stratified_split", "tokenize_documents", "train_tokenizer", "translation_numbers",
    "unpack_blocks",
]
