"""Tokenizers with transformers' API, built on HuggingFace ``tokenizers`` (Rust).

User code written against transformers ports by changing the import::

    from bigmodel_port.tokenization import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("./bert-base-uncased")      # a local directory
    batch = tok(["a sentence", "another"], padding=True, return_tensors="np")

The tokenization algorithms (WordPiece, byte-level BPE, byte-fallback BPE, ...) are the Rust
library's; this module only reads HuggingFace-layout directories, assembles the Rust pipeline the
way transformers does, and reproduces transformers' (v5) call / decode / save semantics on top.
Nothing here imports numpy-incompatible frameworks (no torch, no jax), and models are never
downloaded: every path goes through :func:`bigmodel_port.paths.local_model_dir`.

Classes: :class:`PreTrainedTokenizerFast` (the shared base, also the generic ``tokenizer.json``
loader), :class:`BertTokenizer`, :class:`GPT2Tokenizer`, :class:`LlamaTokenizer`,
:class:`AutoTokenizer`; outputs are :class:`BatchEncoding`; :func:`train_bpe_tokenizer` trains a
byte-level BPE vocabulary on a user corpus.

Not thread-safe, like transformers' fast tokenizers: a call sets the Rust tokenizer's padding and
truncation for its own duration, so share one instance between threads only with a lock.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self, Union

import numpy as np
from tokenizers import AddedToken, Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from bigmodel_port.paths import local_model_dir

__all__ = [
    "AutoTokenizer",
    "BatchEncoding",
    "BertTokenizer",
    "BertTokenizerFast",
    "GPT2Tokenizer",
    "GPT2TokenizerFast",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "PreTrainedTokenizerFast",
    "train_bpe_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# transformers' "no limit" model_max_length, and the threshold above which a length counts as
# "not set" (then truncation=True truncates nothing, as in transformers).
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

# Named special tokens, in transformers' order (the order matters: special tokens missing from the
# vocabulary get new ids in this order, so ours and transformers' ids agree).
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")

TokenLike = Union[str, AddedToken]
TextInput = Union[str, Sequence[str]]

_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")
_SIDES = ("right", "left")

# from_pretrained keywords that only mean something for the Hub; accepted so that transformers code
# ports unchanged, and ignored because we never download.
_HUB_ONLY_KWARGS = frozenset({
    "use_fast", "local_files_only", "trust_remote_code", "revision", "cache_dir", "token", "force_download",
    "proxies", "subfolder", "_commit_hash", "resume_download",
})
# tokenizer_config.json keys that name files or loading state: never taken from the config (a
# config could point them anywhere) and not written back on save.
_FILE_KEYS = frozenset({"vocab", "merges", "vocab_file", "merges_file", "tokenizer_file", "tokenizer_object"})
_NOT_SAVED_KEYS = _FILE_KEYS | {
    "name_or_path", "special_tokens_map_file", "added_tokens_decoder", "additional_special_tokens",
    "is_local", "local_files_only", "files_loaded", "backend", "add_bos_token", "add_eos_token",
    "auto_map", "init_inputs", "tokenizer_class",
}


# --------------------------------------------------------------------------------------------
# BatchEncoding


class BatchEncoding(dict):
    """What a tokenizer call returns: a ``dict`` of model inputs that also allows attribute access.

    ``enc["input_ids"]`` and ``enc.input_ids`` are the same. The Rust ``tokenizers.Encoding`` of each
    sequence stays available as :attr:`encodings` (tokens, word ids, offsets).
    """

    def __init__(self, data: Mapping[str, Any] | None = None, encodings: Sequence[Encoding] | None = None) -> None:
        super().__init__(data or {})
        self._encodings = list(encodings) if encodings is not None else None

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; dunder names must fail so pickle/copy work.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r}; keys: {list(self)}") from None

    @property
    def encodings(self) -> list[Encoding] | None:
        """The Rust ``Encoding`` of each sequence in the batch."""
        return self._encodings

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of sequence ``batch_index`` (special and pad tokens included)."""
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of sequence ``batch_index``, the index of the word it came from (None for
        special tokens)."""
        return self._encoding(batch_index).word_ids

    def _encoding(self, batch_index: int) -> Encoding:
        if not self._encodings:
            raise ValueError("this BatchEncoding carries no Rust encodings")
        return self._encodings[batch_index]


# --------------------------------------------------------------------------------------------
# Small helpers


def _as_added_token(value: Any, *, special: bool = True) -> TokenLike:
    """A special token value from a config: a string, an AddedToken, or its JSON form
    (``{"content": ..., "lstrip": ..., "__type": "AddedToken"}``, what transformers writes)."""
    if isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **fields)
    raise ValueError(f"a special token must be a string or an AddedToken, got {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _listing(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names) if names else "(the directory is empty)"


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, completed by special_tokens_map.json like transformers v5 does: the map
    is read only when the config has no ``added_tokens_decoder`` and then its values win."""
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    map_path = directory / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and map_path.is_file():
        for key, value in _read_json(map_path).items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                existing = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
                config["extra_special_tokens"] = existing + [v for v in value if v not in existing]
            else:
                config[key] = value
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        # Model-specific named tokens ({"image_token": "<img>"}): registered as extra special tokens.
        config["extra_special_tokens"] = list(extra.values())
    return config


def _load_backend(tokenizer_object: Tokenizer | None, tokenizer_file: str | os.PathLike[str] | None) -> Tokenizer | None:
    """The Rust tokenizer from an object (copied: we modify ours) or a tokenizer.json, or None."""
    if tokenizer_object is not None and tokenizer_file is not None:
        raise ValueError("pass either tokenizer_object or tokenizer_file, not both")
    if tokenizer_object is not None:
        if not isinstance(tokenizer_object, Tokenizer):
            raise ValueError(f"tokenizer_object must be a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}")
        return Tokenizer.from_str(tokenizer_object.to_str())
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer file {str(tokenizer_file)!r} does not exist")
        return Tokenizer.from_file(str(tokenizer_file))
    return None


def _check_side(value: str, what: str) -> str:
    if value not in _SIDES:
        raise ValueError(f"{what} must be 'right' or 'left', got {value!r}")
    return value


def _padding_strategy(padding: bool | str | None) -> str:
    if padding is None or padding is False:
        return "do_not_pad"
    if padding is True:
        return "longest"
    if isinstance(padding, str) and padding in _PADDING_STRATEGIES:
        return str(padding)  # str(): transformers' PaddingStrategy enum members are str subclasses
    raise ValueError(f"unknown padding strategy {padding!r}: use False / 'do_not_pad', True / 'longest' "
                     "(pad to the longest sequence in the batch) or 'max_length'")


def _truncation_strategy(truncation: bool | str | None) -> str:
    if truncation is None or truncation is False:
        return "do_not_truncate"
    if truncation is True:
        return "longest_first"
    if isinstance(truncation, str) and truncation in _TRUNCATION_STRATEGIES:
        return str(truncation)
    raise ValueError(f"unknown truncation strategy {truncation!r}: use False / 'do_not_truncate', "
                     "True / 'longest_first', 'only_first' or 'only_second'")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _to_id_list(token_ids: Any) -> Any:
    """Token ids as plain Python ints (nested lists for a batch); accepts ints, lists, tuples and
    array-likes with ``tolist`` (numpy, jax, torch) without importing those frameworks."""
    if isinstance(token_ids, (int, np.integer)) and not isinstance(token_ids, bool):
        return _check_id(int(token_ids))
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            return _check_id(token_ids)
    if isinstance(token_ids, (list, tuple)):
        return [_to_id_list(t) for t in token_ids]
    raise ValueError(f"token ids must be integers (or lists / arrays of integers), got {token_ids!r}")


def _check_id(token_id: int) -> int:
    if token_id < 0:
        # -100 is the usual "ignore" label value; decoding it is almost always a bug in the caller.
        raise ValueError(f"token id {token_id} is negative; ids to decode must be >= 0 (replace label "
                         "padding such as -100 with the pad token id first)")
    return token_id


# --------------------------------------------------------------------------------------------
# Special-token attributes


class _SpecialTokenAttribute:
    """``tokenizer.pad_token`` etc.: the token string or None; assignable (``tok.pad_token =
    tok.eos_token``), like transformers v5, without adding the token to the vocabulary."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: PreTrainedTokenizerFast | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj._special_tokens.get(self._name)
        return None if value is None else str(value)

    def __set__(self, obj: PreTrainedTokenizerFast, value: TokenLike | None) -> None:
        obj._set_special_token(self._name, value)


class _SpecialTokenIdAttribute:
    """``tokenizer.pad_token_id`` etc.: the token's id (unk's id for a token not in the vocabulary,
    as in transformers), or None when the token is not set; assigning an id sets the token."""

    def __init__(self, token_name: str) -> None:
        self._token_name = token_name

    def __get__(self, obj: PreTrainedTokenizerFast | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        token = obj._special_tokens.get(self._token_name)
        return None if token is None else obj.convert_tokens_to_ids(str(token))

    def __set__(self, obj: PreTrainedTokenizerFast, value: int | None) -> None:
        if value is None:
            obj._set_special_token(self._token_name, None)
            return
        token = obj._tokenizer.id_to_token(_check_id(int(value)))
        if token is None:
            raise ValueError(f"id {value} is not in the vocabulary (size {len(obj)})")
        obj._set_special_token(self._token_name, token)


# --------------------------------------------------------------------------------------------
# The shared base class


class PreTrainedTokenizerFast:
    """A tokenizer over a Rust ``tokenizers.Tokenizer``, with transformers' API.

    Used directly for any ``tokenizer.json`` (Llama-style byte-fallback BPE, Llama-3-style
    byte-level BPE, ...): the file's own normalizer / pre-tokenizer / model / post-processor /
    decoder are used as they are, and ``tokenizer_config.json`` supplies special tokens,
    ``model_max_length``, ``padding_side`` and ``clean_up_tokenization_spaces``.

    Args:
        tokenizer_object: a Rust tokenizer to wrap (copied, since special tokens are added to it).
        tokenizer_file: path of a ``tokenizer.json`` to load instead.
        bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token: special tokens;
            those missing from the vocabulary are added as new special tokens.
        extra_special_tokens: further special tokens (``additional_special_tokens`` is an alias).
        add_bos_token, add_eos_token: when given, replace the post-processor with one that adds
            bos / eos around each sequence (transformers' ``update_post_processor``).
        model_max_length: the model's maximum sequence length (``truncation=True`` truncates to it).
        padding_side, truncation_side: "right" or "left".
        clean_up_tokenization_spaces: whether ``decode`` removes spaces before punctuation; ignored
            for BPE models, as in transformers v5 (it corrupts their output).
        model_input_names: keys returned by a call; ``token_type_ids`` is returned when listed.
        added_tokens_decoder: ``{id: token}`` from a config; tokens missing from the vocabulary are
            added.
        name_or_path: where the tokenizer was loaded from (informational).
    """

    padding_side_default: ClassVar[str] = "right"
    model_input_names_default: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

    bos_token = _SpecialTokenAttribute()
    eos_token = _SpecialTokenAttribute()
    unk_token = _SpecialTokenAttribute()
    sep_token = _SpecialTokenAttribute()
    pad_token = _SpecialTokenAttribute()
    cls_token = _SpecialTokenAttribute()
    mask_token = _SpecialTokenAttribute()
    bos_token_id = _SpecialTokenIdAttribute("bos_token")
    eos_token_id = _SpecialTokenIdAttribute("eos_token")
    unk_token_id = _SpecialTokenIdAttribute("unk_token")
    sep_token_id = _SpecialTokenIdAttribute("sep_token")
    pad_token_id = _SpecialTokenIdAttribute("pad_token")
    cls_token_id = _SpecialTokenIdAttribute("cls_token")
    mask_token_id = _SpecialTokenIdAttribute("mask_token")

    def __init__(self, tokenizer_object: Tokenizer | None = None, *,
                 tokenizer_file: str | os.PathLike[str] | None = None, **options: Any) -> None:
        backend = _load_backend(tokenizer_object, tokenizer_file)
        if backend is None:
            raise ValueError(f"{type(self).__name__} needs tokenizer_object (a tokenizers.Tokenizer) or "
                             "tokenizer_file (a tokenizer.json path); to load a directory use from_pretrained")
        self._setup(backend, **options)

    # -- construction ------------------------------------------------------------------------

    def _setup(
        self,
        backend: Tokenizer,
        *,
        bos_token: TokenLike | None = None,
        eos_token: TokenLike | None = None,
        unk_token: TokenLike | None = None,
        sep_token: TokenLike | None = None,
        pad_token: TokenLike | None = None,
        cls_token: TokenLike | None = None,
        mask_token: TokenLike | None = None,
        extra_special_tokens: Sequence[TokenLike] | None = None,
        additional_special_tokens: Sequence[TokenLike] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        model_max_length: int | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output: bool = False,
        model_input_names: Sequence[str] | None = None,
        added_tokens_decoder: Mapping[Any, Any] | None = None,
        name_or_path: str | os.PathLike[str] = "",
    ) -> None:
        """Common set-up once a subclass has assembled the Rust pipeline ``backend``."""
        self._tokenizer = backend
        self.name_or_path = str(name_or_path)
        self._config_passthrough: dict[str, Any] = {}

        # A tokenizer.json may carry fixed padding / truncation (sentence-transformers writes
        # "pad to 128"). transformers v5 takes only their pad token and sides as defaults and decides
        # padding / truncation per call; so do we, and clear them so a call starts from nothing.
        json_padding, json_truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        if pad_token is None and json_padding is not None:
            pad_token = json_padding.get("pad_token")
        if padding_side is None and json_padding is not None:
            padding_side = json_padding.get("direction")
        if truncation_side is None and json_truncation is not None:
            truncation_side = json_truncation.get("direction")

        self.padding_side = padding_side if padding_side is not None else self.padding_side_default
        self.truncation_side = truncation_side if truncation_side is not None else "right"
        if model_max_length is not None and (isinstance(model_max_length, bool) or int(model_max_length) <= 0):
            raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
        self.model_max_length = int(model_max_length) if model_max_length is not None else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = bool(
            clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output)
        self.model_input_names = list(model_input_names if model_input_names is not None
                                      else self.model_input_names_default)

        named = dict(zip(SPECIAL_TOKENS_ATTRIBUTES,
                         (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token)))
        self._special_tokens: dict[str, TokenLike | None] = {
            name: None if value is None else _as_added_token(value) for name, value in named.items()}
        extras = extra_special_tokens if extra_special_tokens is not None else additional_special_tokens
        self._extra_special_tokens: list[TokenLike] = [_as_added_token(t) for t in (extras or [])]

        # Tokens a (v4-saved) config lists by id, then the special tokens: those not yet known to the
        # Rust tokenizer are added, so "[CLS]" in the text is one token and skip_special_tokens works.
        if added_tokens_decoder:
            known = set(self._tokenizer.get_vocab(with_added_tokens=True))
            for _, token in sorted(((int(i), t) for i, t in added_tokens_decoder.items()), key=lambda item: item[0]):
                token = _as_added_token(token, special=False)
                if str(token) not in known:
                    self._tokenizer.add_tokens([token])
        self._register_special_tokens()

        # transformers v5 rebuilds the post-processor only when asked (add_bos/eos_token given) or
        # when there is none; otherwise the stored one (e.g. Llama's "<s> $A") is authoritative.
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        if add_bos_token is not None or add_eos_token is not None or self._tokenizer.post_processor is None:
            self.update_post_processor()

    def _register_special_tokens(self) -> None:
        added = {str(t) for t in self._tokenizer.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        for token in [*self._special_tokens.values(), *self._extra_special_tokens]:
            if token is None or str(token) in added:
                continue
            if isinstance(token, str):
                token = AddedToken(token, special=True, normalized=False)
            added.add(str(token))
            to_add.append(token)
        if to_add:
            self._tokenizer.add_special_tokens(to_add)

    @classmethod
    def _tokenizer_files(cls, directory: Path) -> dict[str, Path]:
        """The files ``from_pretrained`` passes to ``__init__``; subclasses accept vocab files too."""
        path = directory / TOKENIZER_FILE
        if path.is_file():
            return {"tokenizer_file": path}
        hint = ""
        if (directory / "tokenizer.model").is_file():
            hint = (" It has a SentencePiece tokenizer.model, which is read only through a tokenizer.json:"
                    " convert it once where transformers and sentencepiece are installed, with"
                    " `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`.")
        raise FileNotFoundError(f"{cls.__name__} needs {TOKENIZER_FILE} in {str(directory)!r}; found: "
                                f"{_listing(directory)}.{hint}")

    @classmethod
    def _option_names(cls) -> set[str]:
        """Keyword options ``from_pretrained`` may pass to ``cls(...)``."""
        names = set()
        for function in (cls.__init__, PreTrainedTokenizerFast._setup):
            for parameter in inspect.signature(function).parameters.values():
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                    names.add(parameter.name)
        return names - {"self", "backend"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """Load the tokenizer stored in a local directory (HuggingFace layout).

        Reads ``tokenizer.json`` (or the class's vocabulary files), ``tokenizer_config.json`` and
        ``special_tokens_map.json``. Keyword arguments override config values (``pad_token="<pad>"``,
        ``padding_side="left"``, ...). A Hub repo id raises :class:`ModelNotFoundError`: nothing is
        downloaded. As in transformers v5, ``add_bos_token`` / ``add_eos_token`` in the config are
        ignored when a ``tokenizer.json`` exists (its post-processor decides) but honoured as kwargs.
        """
        directory = local_model_dir(pretrained_model_name_or_path)
        for key in _HUB_ONLY_KWARGS:
            kwargs.pop(key, None)
        allowed = cls._option_names() - _FILE_KEYS
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown keyword arguments {unknown}; "
                            f"accepted: {sorted(allowed)}")
        files = cls._tokenizer_files(directory)
        config = _read_tokenizer_config(directory)
        if "tokenizer_file" in files:
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
        options = {k: v for k, v in config.items() if k in allowed and k != "name_or_path"}
        options["name_or_path"] = str(directory)
        options.update(kwargs)
        options.update(files)
        tokenizer = cls(**options)
        # Config keys we do not interpret (chat_template, ...) are written back by save_pretrained.
        tokenizer._config_passthrough = {k: v for k, v in config.items()
                                         if k not in allowed and k not in _NOT_SAVED_KEYS}
        return tokenizer

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The Rust ``tokenizers.Tokenizer`` doing the work."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without tokens added on top of it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included (the embedding rows a model needs)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the full vocabulary."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def get_added_vocab(self) -> dict[str, int]:
        """Token -> id for the added tokens (special tokens included)."""
        return {str(t): i for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Id of a token (or list of ids); unknown tokens map to ``unk_token_id`` (None without one)."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None:
                # Not via self.unk_token_id: that property calls back here (endless for an unk token
                # that is itself missing from the vocabulary).
                unk = self._special_tokens.get("unk_token")
                index = self._tokenizer.token_to_id(str(unk)) if unk is not None else None
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Token string of an id (or list of ids); None for an id outside the vocabulary."""
        ids = _to_id_list(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in skip]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join tokens into text with the pipeline's decoder (no special-token skipping)."""
        decoder = self._tokenizer.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def add_tokens(self, new_tokens: TokenLike | Sequence[TokenLike], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (kept whole, never split); returns how many are new."""
        tokens = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        if special_tokens:
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any],
                           replace_extra_special_tokens: bool = True) -> int:
        """Set named special tokens (``{"pad_token": "[PAD]"}``) and/or extra ones
        (``{"additional_special_tokens": [...]}``), adding them to the vocabulary if needed; returns
        how many tokens are new to the vocabulary."""
        allowed = (*SPECIAL_TOKENS_ATTRIBUTES, "additional_special_tokens", "extra_special_tokens")
        before = len(self)
        for key, value in special_tokens_dict.items():
            if key not in allowed:
                raise ValueError(f"{key!r} is not a special token name; use one of {list(allowed)}")
            if key in SPECIAL_TOKENS_ATTRIBUTES:
                self._set_special_token(key, value)
                if value is not None:
                    token = _as_added_token(value)
                    self._tokenizer.add_special_tokens(
                        [token if isinstance(token, AddedToken) else AddedToken(token, special=True, normalized=False)])
            else:
                if isinstance(value, (str, AddedToken)) or not isinstance(value, Iterable):
                    raise ValueError(f"{key} must be a list of tokens, got {value!r}")
                tokens = [_as_added_token(t) for t in value]
                current = [] if replace_extra_special_tokens else self._extra_special_tokens
                self._extra_special_tokens = current + [t for t in tokens if str(t) not in map(str, current)]
                self._register_special_tokens()
        return len(self) - before

    # -- special tokens ----------------------------------------------------------------------

    def _set_special_token(self, name: str, value: TokenLike | None) -> None:
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise ValueError(f"{name} must be a string, an AddedToken or None, got {value!r}")
        self._special_tokens[name] = value

    @property
    def extra_special_tokens(self) -> list[str]:
        """Special tokens beyond the named ones (transformers v4: ``additional_special_tokens``)."""
        return [str(t) for t in self._extra_special_tokens]

    @property
    def additional_special_tokens(self) -> list[str]:
        return self.extra_special_tokens

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Name -> token for the special tokens that are set."""
        result: dict[str, Any] = {name: str(tok) for name, tok in self._special_tokens.items() if tok is not None}
        if self._extra_special_tokens:
            result["additional_special_tokens"] = self.extra_special_tokens
        return result

    @property
    def all_special_tokens(self) -> list[str]:
        """Every special token, named and extra, without duplicates."""
        tokens = [str(t) for t in self._special_tokens.values() if t is not None] + self.extra_special_tokens
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in self.convert_tokens_to_ids(self.all_special_tokens) if i is not None]

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Rebuild the post-processor from ``add_bos_token`` / ``add_eos_token`` (transformers v5:
        ``[bos] A [eos]``, pairs ``[bos] A [eos] [bos] B [eos]`` with type ids 0 / 1)."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = self._add_bos_token and bos is not None
        add_eos = self._add_eos_token and eos is not None
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special: dict[str, int] = {}  # a dict: GPT-2's bos and eos are the same token
        if add_bos:
            special[str(bos)] = self.bos_token_id
        if add_eos:
            special[str(eos)] = self.eos_token_id
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(special.items()))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens the post-processor adds to one sequence (or a pair)."""
        return self._tokenizer.num_special_tokens_to_add(pair)

    # -- sides ---------------------------------------------------------------------------------

    @property
    def padding_side(self) -> str:
        """Where padding goes: "right", or "left" (batched generation with decoder-only models)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        self._padding_side = _check_side(value, "padding_side")

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        self._truncation_side = _check_side(value, "truncation_side")

    # -- encoding ------------------------------------------------------------------------------

    def __call__(
        self,
        text: TextInput | Sequence[Sequence[str]],
        text_pair: TextInput | Sequence[Sequence[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        is_split_into_words: bool = False,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Tokenize one text or a batch (a list), optionally with second sequences ``text_pair``.

        Semantics are transformers v5's: ``padding`` is False / True ("longest") / "max_length";
        ``truncation`` is True ("longest_first") / "only_first" / "only_second"; ``max_length``
        alone implies truncation; truncation without ``max_length`` uses ``model_max_length``.
        ``return_tensors="np"`` gives int64 arrays of shape (batch, length) (a single text gets a
        batch axis); otherwise lists (nested for a batch; ragged when not padded).
        """
        batch, is_batched = self._as_batch(text, text_pair, is_split_into_words)
        is_pair = text_pair is not None
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported: use None (lists) or 'np' "
                             "(numpy int64 arrays, convert with jnp.asarray / torch.from_numpy)")
        side = self.padding_side if padding_side is None else _check_side(padding_side, "padding_side")
        pad, trunc, max_length = self._resolve_lengths(padding, truncation, max_length, pad_to_multiple_of,
                                                       is_pair=is_pair, add_special_tokens=add_special_tokens)
        encodings = self._encode_batch(batch, add_special_tokens=add_special_tokens,
                                       is_pretokenized=is_split_into_words, pad=pad, trunc=trunc,
                                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, side=side)

        want_type_ids = ("token_type_ids" in self.model_input_names if return_token_type_ids is None
                         else return_token_type_ids)
        want_mask = "attention_mask" in self.model_input_names if return_attention_mask is None else return_attention_mask
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if want_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if want_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in encodings]
        if return_length:
            data["length"] = [len(e.ids) for e in encodings]

        if return_tensors == "np":
            data = {key: self._as_array(key, value) for key, value in data.items()}
        elif not is_batched:
            # A single text loses the batch axis; like transformers, "length" stays a one-item list.
            data = {key: (value[0] if value and isinstance(value[0], list) else value) for key, value in data.items()}
        return BatchEncoding(data, encodings)

    def _as_batch(self, text: Any, text_pair: Any, is_split_into_words: bool) -> tuple[list[Any], bool]:
        """The inputs as the list ``encode_batch`` wants, and whether the caller passed a batch."""

        def kind(value: Any) -> str | None:
            # "single", "batch" or None (not a valid input). Pre-tokenized: an example is a list of
            # words and a batch a list of such lists.
            if is_split_into_words:
                if isinstance(value, (list, tuple)):
                    if all(isinstance(v, str) for v in value):
                        return "single"
                    if all(isinstance(v, (list, tuple)) and all(isinstance(w, str) for w in v) for v in value):
                        return "batch"
                return None
            if isinstance(value, str):
                return "single"
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return "batch"
            return None

        expected = ("a list of words, or a batch (list) of lists of words" if is_split_into_words
                    else "a string or a list of strings")
        text_kind = kind(text)
        if text_kind is None:
            raise ValueError(f"text must be {expected}, got {type(text).__name__}: {str(text)[:80]!r}")
        if text_pair is not None:
            pair_kind = kind(text_pair)
            if pair_kind is None:
                raise ValueError(f"text_pair must be {expected}, got {type(text_pair).__name__}: "
                                 f"{str(text_pair)[:80]!r}")
            if pair_kind != text_kind:
                raise ValueError("text and text_pair must both be single examples or both be batches")
            if text_kind == "batch" and len(text) != len(text_pair):
                raise ValueError(f"text has {len(text)} examples but text_pair has {len(text_pair)}")
        if text_kind == "single":
            return ([(text, text_pair)] if text_pair is not None else [text]), False
        if text_pair is not None:
            return list(zip(text, text_pair)), True
        return list(text), True

    def _resolve_lengths(self, padding: Any, truncation: Any, max_length: int | None,
                         pad_to_multiple_of: int | None, *, is_pair: bool,
                         add_special_tokens: bool) -> tuple[str, str, int | None]:
        """Padding / truncation strategies and the effective max_length, as transformers v5 decides
        them (``_get_padding_truncation_strategies``), with clear errors for impossible requests."""
        pad = _padding_strategy(padding)
        trunc = _truncation_strategy(truncation)
        if max_length is not None:
            _check_positive_int(max_length, "max_length")
            max_length = int(max_length)
        if pad_to_multiple_of is not None:
            _check_positive_int(pad_to_multiple_of, "pad_to_multiple_of")
        if max_length is not None and pad == "do_not_pad" and truncation is None:
            trunc = "longest_first"  # transformers: max_length alone means "truncate to it"
        if max_length is not None and pad == "longest" and trunc == "do_not_truncate":
            warnings.warn("max_length is ignored when padding=True and truncation is off; to pad to "
                          "max_length use padding='max_length'", stacklevel=3)
        has_model_limit = self.model_max_length <= LARGE_INTEGER
        if max_length is None:
            if pad == "max_length":
                if not has_model_limit:
                    # transformers silently skips padding here; an explicit error is kinder.
                    raise ValueError("padding='max_length' needs max_length: this tokenizer has no "
                                     "model_max_length to pad to")
                max_length = self.model_max_length
            if trunc != "do_not_truncate":
                if has_model_limit:
                    max_length = self.model_max_length
                else:
                    trunc = "do_not_truncate"  # as transformers: nothing to truncate to
        if pad != "do_not_pad" and (self.pad_token is None or self.pad_token_id is None):
            raise ValueError("Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
                             "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
                             "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.")
        if trunc != "do_not_truncate":
            assert max_length is not None
            needed = self.num_special_tokens_to_add(pair=is_pair) if add_special_tokens else 0
            if max_length < needed:
                raise ValueError(f"max_length={max_length} is smaller than the {needed} special tokens added to "
                                 f"each {'pair of sequences' if is_pair else 'sequence'}")
            if trunc == "only_second" and not is_pair:
                raise ValueError("truncation='only_second' needs text_pair")
            if pad != "do_not_pad" and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
                raise ValueError(f"truncation length {max_length} is not a multiple of pad_to_multiple_of="
                                 f"{pad_to_multiple_of}")
        return pad, trunc, max_length

    def _encode_batch(self, batch: list[Any], *, add_special_tokens: bool, is_pretokenized: bool, pad: str,
                      trunc: str, max_length: int | None, pad_to_multiple_of: int | None,
                      side: str) -> list[Encoding]:
        """Run the Rust tokenizer with this call's padding / truncation, then clear them again."""
        if not batch:
            return []
        backend = self._tokenizer
        try:
            if trunc != "do_not_truncate":
                backend.enable_truncation(max_length, stride=0, strategy=trunc, direction=self.truncation_side)
            if pad != "do_not_pad":
                backend.enable_padding(direction=side, pad_id=self.pad_token_id, pad_type_id=0,
                                       pad_token=self.pad_token,
                                       length=max_length if pad == "max_length" else None,
                                       pad_to_multiple_of=pad_to_multiple_of)
            return backend.encode_batch(batch, add_special_tokens=add_special_tokens,
                                        is_pretokenized=is_pretokenized)
        except Exception as err:  # tokenizers raises a bare Exception for truncation errors
            if "Truncation error" in str(err):
                raise ValueError(f"cannot truncate to max_length={max_length} with strategy {trunc!r}: {err}") from err
            raise
        finally:
            backend.no_truncation()
            backend.no_padding()

    @staticmethod
    def _as_array(key: str, rows: list[Any]) -> np.ndarray:
        lengths = {len(row) for row in rows if isinstance(row, list)}
        if len(lengths) > 1:
            raise ValueError(f"cannot make a numpy array of {key!r}: the sequences have different lengths "
                             f"({sorted(lengths)}); pass padding=True (and truncation=True if needed)")
        if not rows:
            return np.zeros((0, 0), dtype=np.int64)
        return np.asarray(rows, dtype=np.int64)

    def encode(self, text: TextInput, text_pair: TextInput | None = None, *, add_special_tokens: bool = True,
               padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
               padding_side: str | None = None, return_tensors: str | None = None) -> Any:
        """The ``input_ids`` of ``self(text, text_pair, ...)``: a list of ids (lists for a batch), or an
        int64 array with ``return_tensors="np"``."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding,
                    truncation=truncation, max_length=max_length, padding_side=padding_side,
                    return_tensors=return_tensors, return_token_type_ids=False,
                    return_attention_mask=False)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text`` (by default without special tokens)."""
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise ValueError("tokenize takes one string (and optionally one pair string)")
        return self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> Any:
        """Text of a sequence of ids (int, list, numpy / jax / torch array). A batch (list of lists, 2-D
        array) gives a list of texts, as in transformers v5."""
        ids = _to_id_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Texts of a batch of id sequences."""
        ids = _to_id_list(sequences)
        if isinstance(ids, int) or (ids and not isinstance(ids[0], list)):
            raise ValueError("batch_decode takes a batch (list of id lists or a 2-D array); use decode for one sequence")
        return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]

    def _decode_one(self, ids: list[Any], skip_special_tokens: bool, clean_up: bool | None) -> str:
        if any(not isinstance(i, int) for i in ids):
            raise ValueError("decode takes one sequence of ids (or a batch of sequences), not deeper nesting")
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # transformers v5 skips the clean-up for BPE models: it was written for WordPiece and deletes
        # real spaces before punctuation in BPE output.
        is_bpe = isinstance(self._tokenizer.model, models.BPE)
        if clean_up and (not is_bpe or self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output):
            text = self.clean_up_tokenization(text)
        return text

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """transformers' clean-up: remove the spaces WordPiece decoding leaves before punctuation."""
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    # -- saving --------------------------------------------------------------------------------

    saved_class_name: ClassVar[str] = "PreTrainedTokenizerFast"

    def _class_config(self) -> dict[str, Any]:
        """Class-specific tokenizer_config.json entries (what a transformers class rebuilds from)."""
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` so that this
        module's and transformers' ``AutoTokenizer.from_pretrained`` load the same tokenizer back.
        Returns the written paths."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"{str(directory)!r} is a file; save_pretrained needs a directory")
        directory.mkdir(parents=True, exist_ok=True)

        config: dict[str, Any] = dict(self._config_passthrough)
        config.update({
            "tokenizer_class": self.saved_class_name,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        })
        for name, token in self._special_tokens.items():
            config[name] = None if token is None else str(token)
        if self._extra_special_tokens:
            config["extra_special_tokens"] = self.extra_special_tokens
        if list(self.model_input_names) != list(self.model_input_names_default):
            config["model_input_names"] = list(self.model_input_names)
        config.update(self._class_config())

        paths = (directory / TOKENIZER_CONFIG_FILE, directory / SPECIAL_TOKENS_MAP_FILE, directory / TOKENIZER_FILE)
        paths[0].write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        paths[1].write_text(json.dumps(self.special_tokens_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                            encoding="utf-8")
        # Padding / truncation are cleared after every call, so none end up in the file.
        self._tokenizer.save(str(paths[2]))
        return tuple(str(p) for p in paths)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"len={len(self)}, model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


# --------------------------------------------------------------------------------------------
# BERT


class BertTokenizer(PreTrainedTokenizerFast):
    """BERT's WordPiece tokenizer (transformers' ``BertTokenizer`` / ``BertTokenizerFast``).

    Built from ``vocab.txt`` with the Rust BertNormalizer, BertPreTokenizer, WordPiece model,
    ``[CLS] A [SEP] B [SEP]`` template (token type ids 0 / 1) and WordPiece decoder; from a
    ``tokenizer.json`` only the WordPiece model (vocabulary) is taken and the rest is rebuilt from
    these options, as transformers v5 does.

    Args:
        vocab: path of ``vocab.txt`` (one token per line, the line number is the id) or a
            token -> id dict.
        do_lower_case, strip_accents, tokenize_chinese_chars: BertNormalizer options; None means
            "as in the tokenizer.json's BertNormalizer", else transformers' defaults (True, None
            (= follow lowercasing), True).
    """

    model_input_names_default = ("input_ids", "token_type_ids", "attention_mask")
    saved_class_name = "BertTokenizer"

    def __init__(self, vocab: str | os.PathLike[str] | Mapping[str, int] | None = None, *,
                 tokenizer_object: Tokenizer | None = None, tokenizer_file: str | os.PathLike[str] | None = None,
                 do_lower_case: bool | None = None, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool | None = None,
                 unk_token: TokenLike | None = "[UNK]", sep_token: TokenLike | None = "[SEP]",
                 pad_token: TokenLike | None = "[PAD]", cls_token: TokenLike | None = "[CLS]",
                 mask_token: TokenLike | None = "[MASK]", **options: Any) -> None:
        backend = _load_backend(tokenizer_object, tokenizer_file)
        if backend is not None and vocab is not None:
            raise ValueError("pass vocab, tokenizer_object or tokenizer_file, not several")
        if backend is None:
            if vocab is None:
                raise ValueError("BertTokenizer needs vocab (a vocab.txt path or a token -> id dict), "
                                 "tokenizer_file or tokenizer_object")
            vocab_dict = self._read_vocab(vocab) if not isinstance(vocab, Mapping) else dict(vocab)
            if str(unk_token) not in vocab_dict:
                raise ValueError(f"the unknown token {str(unk_token)!r} is not in the vocabulary")
            backend = Tokenizer(models.WordPiece(vocab_dict, unk_token=str(unk_token)))
        elif not isinstance(backend.model, models.WordPiece):
            raise ValueError(f"BertTokenizer needs a WordPiece model, the tokenizer has {type(backend.model).__name__}")

        # Options not given follow the file's normalizer, so a cased tokenizer.json stays cased.
        current = backend.normalizer if isinstance(backend.normalizer, normalizers.BertNormalizer) else None
        self.do_lower_case = do_lower_case if do_lower_case is not None else (current.lowercase if current else True)
        if strip_accents is None and current is not None:
            strip_accents = current.strip_accents
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = (tokenize_chinese_chars if tokenize_chinese_chars is not None
                                       else (current.handle_chinese_chars if current else True))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=self.tokenize_chinese_chars, strip_accents=self.strip_accents,
            lowercase=self.do_lower_case)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        self._setup(backend, unk_token=unk_token, sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                    mask_token=mask_token, **options)
        self.update_post_processor()

    @staticmethod
    def _read_vocab(path: str | os.PathLike[str]) -> dict[str, int]:
        # Exactly transformers' load_vocab: the id is the line number, only "\n" is stripped (a token
        # may end in other whitespace), and a repeated token keeps its last line.
        with open(path, encoding="utf-8") as handle:
            return {line.rstrip("\n"): index for index, line in enumerate(handle.readlines())}

    @classmethod
    def _tokenizer_files(cls, directory: Path) -> dict[str, Path]:
        if (directory / TOKENIZER_FILE).is_file():
            return {"tokenizer_file": directory / TOKENIZER_FILE}
        if (directory / "vocab.txt").is_file():
            return {"vocab": directory / "vocab.txt"}
        raise FileNotFoundError(f"BertTokenizer needs {TOKENIZER_FILE} or vocab.txt in {str(directory)!r}; "
                                f"found: {_listing(directory)}")

    def update_post_processor(self) -> None:
        """``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with token type ids 0 for A, 1 for B."""
        cls, sep = self.cls_token, self.sep_token
        if cls is None or sep is None:
            super().update_post_processor()
            return
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, self.cls_token_id), (sep, self.sep_token_id)],
        )

    def _class_config(self) -> dict[str, Any]:
        return {"do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars}


# --------------------------------------------------------------------------------------------
# GPT-2


class GPT2Tokenizer(PreTrainedTokenizerFast):
    """GPT-2's byte-level BPE (transformers' ``GPT2Tokenizer`` / ``GPT2TokenizerFast``).

    Built from ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``'s BPE model) with a
    ByteLevel pre-tokenizer and decoder and no normalizer, as transformers v5 does. No BOS / EOS is
    added by default; ``<|endoftext|>`` is bos, eos and unk; there is no pad token.

    Args:
        vocab, merges: paths of ``vocab.json`` / ``merges.txt``, or a token -> id dict and a list of
            merge pairs.
        add_prefix_space: treat the first word like any other (a space is prepended); None means "as
            in the tokenizer.json's ByteLevel pre-tokenizer", else False.
    """

    saved_class_name = "GPT2Tokenizer"

    def __init__(self, vocab: str | os.PathLike[str] | Mapping[str, int] | None = None,
                 merges: str | os.PathLike[str] | Sequence[tuple[str, str]] | None = None, *,
                 tokenizer_object: Tokenizer | None = None, tokenizer_file: str | os.PathLike[str] | None = None,
                 add_prefix_space: bool | None = None, unk_token: TokenLike | None = "<|endoftext|>",
                 bos_token: TokenLike | None = "<|endoftext|>", eos_token: TokenLike | None = "<|endoftext|>",
                 pad_token: TokenLike | None = None, **options: Any) -> None:
        backend = _load_backend(tokenizer_object, tokenizer_file)
        if backend is not None and (vocab is not None or merges is not None):
            raise ValueError("pass vocab + merges, tokenizer_object or tokenizer_file, not several")
        if backend is None:
            if vocab is None or merges is None:
                raise ValueError("GPT2Tokenizer needs vocab and merges (vocab.json / merges.txt paths, or a dict "
                                 "and a list of pairs), tokenizer_file or tokenizer_object")
            if isinstance(vocab, Mapping) != (not isinstance(merges, (str, os.PathLike))):
                raise ValueError("vocab and merges must both be paths or both be in-memory values")
            if isinstance(vocab, Mapping):
                vocab_dict, merge_list = dict(vocab), [tuple(m) for m in merges]  # type: ignore[union-attr]
            else:
                vocab_dict, merge_list = models.BPE.read_file(str(vocab), str(merges))
            backend = Tokenizer(models.BPE(vocab_dict, merge_list, dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
        elif not isinstance(backend.model, models.BPE):
            raise ValueError(f"GPT2Tokenizer needs a BPE model, the tokenizer has {type(backend.model).__name__}")

        if add_prefix_space is None:
            current = backend.pre_tokenizer
            add_prefix_space = current.add_prefix_space if isinstance(current, pre_tokenizers.ByteLevel) else False
        self.add_prefix_space = bool(add_prefix_space)
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=self.add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        self._setup(backend, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                    **options)

    @classmethod
    def _tokenizer_files(cls, directory: Path) -> dict[str, Path]:
        if (directory / TOKENIZER_FILE).is_file():
            return {"tokenizer_file": directory / TOKENIZER_FILE}
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return {"vocab": directory / "vocab.json", "merges": directory / "merges.txt"}
        raise FileNotFoundError(f"GPT2Tokenizer needs {TOKENIZER_FILE}, or vocab.json and merges.txt, in "
                                f"{str(directory)!r}; found: {_listing(directory)}")

    def _class_config(self) -> dict[str, Any]:
        return {"add_prefix_space": self.add_prefix_space}


# --------------------------------------------------------------------------------------------
# Llama


class LlamaTokenizer(PreTrainedTokenizerFast):
    """A Llama ``tokenizer.json`` (byte-fallback BPE) used as stored; transformers' defaults for the
    Llama class: ``<s>`` / ``</s>`` / ``<unk>`` and left padding (batched generation).

    ``legacy`` is accepted (and saved) so that transformers code passing it ports unchanged; it has no
    effect here because the stored pipeline is used, not rebuilt (transformers v5 rebuilds it with
    a Metaspace pre-tokenizer, which gives the same ids for standard Llama files).
    """

    padding_side_default = "left"
    saved_class_name = "LlamaTokenizer"

    def __init__(self, tokenizer_object: Tokenizer | None = None, *,
                 tokenizer_file: str | os.PathLike[str] | None = None, unk_token: TokenLike | None = "<unk>",
                 bos_token: TokenLike | None = "<s>", eos_token: TokenLike | None = "</s>",
                 legacy: bool | None = None, **options: Any) -> None:
        self.legacy = legacy
        super().__init__(tokenizer_object, tokenizer_file=tokenizer_file, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, **options)

    def _class_config(self) -> dict[str, Any]:
        return {} if self.legacy is None else {"legacy": self.legacy}


# transformers' names for the same classes ("Fast" meant "Rust-backed"; all of ours are).
BertTokenizerFast = BertTokenizer
GPT2TokenizerFast = GPT2Tokenizer
LlamaTokenizerFast = LlamaTokenizer


# --------------------------------------------------------------------------------------------
# AutoTokenizer


_CLASS_BY_NAME: dict[str, type[PreTrainedTokenizerFast]] = {
    "BertTokenizer": BertTokenizer,
    "GPT2Tokenizer": GPT2Tokenizer,
    "LlamaTokenizer": LlamaTokenizer,
    "PreTrainedTokenizer": PreTrainedTokenizerFast,  # "PreTrainedTokenizerFast" with "Fast" removed
    "TokenizersBackend": PreTrainedTokenizerFast,    # what transformers v5 writes for generic tokenizers
}
_CLASS_BY_MODEL_TYPE: dict[str, type[PreTrainedTokenizerFast]] = {
    "bert": BertTokenizer,
    "gpt2": GPT2Tokenizer,
    "llama": LlamaTokenizer,
}


def _is_byte_level(tokenizer_json: Path) -> bool:
    """Whether a tokenizer.json uses a ByteLevel pre-tokenizer or decoder (Llama-3 style)."""
    data = _read_json(tokenizer_json)

    def has(component: Any) -> bool:
        if isinstance(component, dict):
            return component.get("type") == "ByteLevel" or any(has(v) for v in component.values())
        if isinstance(component, list):
            return any(has(v) for v in component)
        return False

    return has(data.get("pre_tokenizer")) or has(data.get("decoder"))


class AutoTokenizer:
    """Pick the tokenizer class for a local directory, as transformers' ``AutoTokenizer`` does."""

    def __init__(self) -> None:
        raise TypeError("AutoTokenizer is not instantiated; use AutoTokenizer.from_pretrained(directory)")

    @staticmethod
    def resolve_class(pretrained_model_name_or_path: str | os.PathLike[str]) -> type[PreTrainedTokenizerFast]:
        """The class ``from_pretrained`` would use for this directory.

        Order: ``tokenizer_config.json``'s ``tokenizer_class`` ("Fast" suffix ignored), then
        ``config.json``'s ``model_type``, then the files present. A Llama class over a byte-level
        tokenizer.json (Llama 3) and unknown classes with a tokenizer.json use the generic
        :class:`PreTrainedTokenizerFast`, which follows the tokenizer.json as stored.
        """
        directory = local_model_dir(pretrained_model_name_or_path)
        has_json = (directory / TOKENIZER_FILE).is_file()
        config_path = directory / TOKENIZER_CONFIG_FILE
        class_name = _read_json(config_path).get("tokenizer_class") if config_path.is_file() else None
        chosen: type[PreTrainedTokenizerFast] | None = None
        if isinstance(class_name, str) and class_name:
            chosen = _CLASS_BY_NAME.get(class_name.removesuffix("Fast"))
            if chosen is None and not has_json:
                raise FileNotFoundError(
                    f"tokenizer_class {class_name!r} in {str(config_path)!r} is not supported without a "
                    f"{TOKENIZER_FILE} (supported: BertTokenizer, GPT2Tokenizer, LlamaTokenizer, or any "
                    f"{TOKENIZER_FILE}); found: {_listing(directory)}")
        if chosen is None:
            model_config = directory / "config.json"
            model_type = _read_json(model_config).get("model_type") if model_config.is_file() else None
            chosen = _CLASS_BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
        if chosen is None:
            if has_json:
                chosen = PreTrainedTokenizerFast
            elif (directory / "vocab.txt").is_file():
                chosen = BertTokenizer
            elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
                chosen = GPT2Tokenizer
            else:
                raise FileNotFoundError(
                    f"no tokenizer files in {str(directory)!r}: expected {TOKENIZER_FILE}, vocab.txt (BERT "
                    f"WordPiece) or vocab.json + merges.txt (GPT-2 BPE); found: {_listing(directory)}")
        if chosen is LlamaTokenizer and has_json and _is_byte_level(directory / TOKENIZER_FILE):
            chosen = PreTrainedTokenizerFast  # transformers v5 does the same for Llama-3-style files
        return chosen

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        **kwargs: Any) -> PreTrainedTokenizerFast:
        """Load the tokenizer in a local directory with the class :meth:`resolve_class` picks; keyword
        arguments go to that class's ``from_pretrained``."""
        tokenizer_class = cls.resolve_class(pretrained_model_name_or_path)
        return tokenizer_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


# --------------------------------------------------------------------------------------------
# Training


def train_bpe_tokenizer(
    files_or_iterator: str | os.PathLike[str] | Sequence[os.PathLike[str]] | Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
    bos_token: str | None = "<|endoftext|>",
    eos_token: str | None = "<|endoftext|>",
    unk_token: str | None = None,
    pad_token: str | None = None,
    add_prefix_space: bool = False,
    add_bos_token: bool = False,
    add_eos_token: bool = False,
    model_max_length: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on a corpus with the Rust trainer.

    Args:
        files_or_iterator: a text file path (str or Path), a list of ``pathlib.Path`` files, or any
            iterable of training texts (a list of strings is read as texts, not paths).
        vocab_size: final vocabulary size, including the 256 byte tokens and the special tokens.
        min_frequency: a pair must occur this often to be merged.
        special_tokens: further special tokens; the named ones below are included automatically and
            take the first ids.
        bos_token, eos_token, unk_token, pad_token: named special tokens (unk is never produced by a
            byte-level model, but some model code expects one).
        add_prefix_space: prepend a space so the first word tokenizes like the others.
        add_bos_token, add_eos_token: whether calls add bos / eos around each sequence.
        model_max_length: the model's maximum sequence length, if known.
    """
    _check_positive_int(vocab_size, "vocab_size")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if isinstance(special_tokens, str):
        raise ValueError("special_tokens must be a list of strings, not one string")
    specials = list(dict.fromkeys(t for t in (pad_token, bos_token, eos_token, unk_token, *special_tokens) if t))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs the {len(alphabet)} byte "
                         f"tokens plus {len(specials)} special tokens")

    tokenizer = Tokenizer(models.BPE(dropout=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files: list[str] | None = [str(files_or_iterator)]
    elif isinstance(files_or_iterator, (list, tuple)) and files_or_iterator and all(
            isinstance(f, os.PathLike) for f in files_or_iterator):
        files = [str(f) for f in files_or_iterator]
    else:
        files = None
    if files is not None:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"training files not found: {missing}")
        tokenizer.train(files, trainer)
    else:
        tokenizer.train_from_iterator(files_or_iterator, trainer)
    return PreTrainedTokenizerFast(tokenizer, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                                   pad_token=pad_token, extra_special_tokens=[t for t in special_tokens if t],
                                   add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                                   model_max_length=model_max_length)
