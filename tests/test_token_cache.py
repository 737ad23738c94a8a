"""Streaming a user's LM corpus into a memory-mapped block cache (``bigmodel_train.data.token_cache``):
the same blocks as the in-memory packer, bounded memory, cache reuse / invalidation, clear errors,
and ``bigmodel train`` on a user's file end to end."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from bigmodel_apps.cli import main
from bigmodel_train.data.packing import pack_documents
from bigmodel_train.data.stream import DataError
from bigmodel_train.data.token_cache import (
    BlockFile,
    assign_splits,
    build_block_cache,
    stream_documents,
)

EOS = 256


def _bytes(docs):
    return [np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) for d in docs]


def _corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "日本", "x = 1", "def f():"]
    paras = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(rng.integers(1, 4))]
        paras.append("\n".join(lines))
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("T", [5, 16, 64])
def test_streamed_blocks_equal_in_memory_packing(tmp_path, T):
    src = _corpus(tmp_path / "c.txt", 300)
    meta = build_block_cache(src, tmp_path / "cache", _bytes, block_size=T, eos_id=EOS, val_fraction=0.2, seed=3,
                             chunk_docs=7)
    pairs = list(assign_splits(stream_documents(src), 0.2, 3))
    for split in ("train", "val"):
        docs = [d for s, d in pairs if s == split]
        want = pack_documents(_bytes(docs), T - 1, EOS)
        got = BlockFile(tmp_path / "cache", split, meta)
        assert len(got) == len(want.tokens) == meta["splits"][split]["blocks"]
        idx = np.arange(len(got))[::-1]  # any order: rows come back in the order asked
        b = got.batch(idx)
        np.testing.assert_array_equal(b["input_ids"], want.tokens[idx])
        owner = want.document_ids[idx]
        np.testing.assert_array_equal(b["attention_mask"], (owner >= 0).astype(np.int32))
        np.testing.assert_array_equal(b["labels"], np.where(owner < 0, -100, want.tokens[idx]))
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == 300
    assert 0.1 < meta["splits"]["val"]["documents"] / 300 < 0.3  # Bernoulli(0.2) per document


def test_memory_stays_bounded_by_the_chunk_not_the_corpus(tmp_path):
    """A 6 MB corpus (24 MB of int32 tokens): the build's peak Python/NumPy allocation stays a
    small fraction of it (observed 7%; holding the tokens would be >= 100%), because documents are tokenized and written a chunk at a time."""
    src = tmp_path / "big.txt"
    para = ("the quick brown fox jumps over the lazy dog " * 10).strip()
    with src.open("w") as f:
        for i in range(14_000):
            f.write(f"{i} {para}\n\n")
    size = src.stat().st_size
    assert size > 6e6
    tracemalloc.start()
    meta = build_block_cache(src, tmp_path / "cache", _bytes, block_size=128, eos_id=EOS, val_fraction=0.1, seed=0,
                             chunk_docs=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tokens = sum(meta["splits"][s]["blocks"] for s in ("train", "val")) * 128
    assert tokens > size  # every byte is a token (plus EOS and the overlap)
    assert peak < 0.2 * 4 * tokens, f"peak {peak / 1e6:.1f} MB for {4 * tokens / 1e6:.1f} MB of tokens"


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    src = _corpus(tmp_path / "c.txt", 50)
    kw = dict(block_size=16, eos_id=EOS, val_fraction=0.2, seed=0)
    cache = tmp_path / "cache"
    first = build_block_cache(src, cache, _bytes, **kw)
    stamp = (cache / "train.tokens").stat().st_mtime_ns

    def refuse(docs):
        raise AssertionError("a matching cache must not be rebuilt")

    assert build_block_cache(src, cache, refuse, **kw) == first
    assert (cache / "train.tokens").stat().st_mtime_ns == stamp
    _corpus(src, 80, seed=1)  # the file changes: rebuilt
    second = build_block_cache(src, cache, _bytes, **kw)
    assert second["splits"]["train"]["documents"] + second["splits"]["val"]["documents"] == 80
    third = build_block_cache(src, cache, _bytes, **{**kw, "block_size": 8})  # settings change: rebuilt
    assert third["block_size"] == 8


def test_bad_corpus_errors_name_the_file(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph\n")
    with pytest.raises(DataError, match=r"one\.txt: no val blocks"):
        build_block_cache(one, tmp_path / "c1", _bytes, block_size=8, eos_id=EOS, val_fraction=0.1, seed=0)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\nalso fine\n\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 5"):
        build_block_cache(bad, tmp_path / "c2", _bytes, block_size=8, eos_id=EOS, val_fraction=0.5, seed=0)
    js = tmp_path / "x.jsonl"
    js.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: record has a non-string 'text'"):
        list(stream_documents(js))
    cache = tmp_path / "c3"
    src = _corpus(tmp_path / "ok.txt", 40)
    meta = build_block_cache(src, cache, _bytes, block_size=8, eos_id=EOS, val_fraction=0.2, seed=0)
    with open(cache / "train.tokens", "r+b") as f:  # truncated behind our back
        f.truncate(12)
    with pytest.raises(DataError, match=r"train\.tokens.*delete the cache"):
        BlockFile(cache, "train", meta)


@pytest.mark.slow
def test_train_on_a_user_text_file_streams_and_resumes(tmp_path, capsys):
    """Training on a user's file: the corpus becomes ``<run>/data`` blocks; BPE is trained on the
    streamed training documents; k steps + resume (reusing the cache) + N - k steps give the
    same parameters bit for bit as N steps straight; ``bigmodel eval`` reads the cache."""
    from bigmodel_train.checkpoint import latest_checkpoint, load_checkpoint
    from bigmodel_train.config import build_config
    from bigmodel_train.trainer import train
    from reference_numpy.tree import tree_leaves_with_path

    src = _corpus(tmp_path / "notes.txt", 400)
    cfg = build_config(None, None, [
        "task=lm", "model=gpt2-tiny", f"data={src}", "tokenizer=bpe", "vocab_size=300", "seq_len=16",
        "batch_size=8", "eval_batch_size=16", "max_eval_examples=16", "warmup_steps=1", "progress=false",
        "plots=false", "tensorboard=false", "log_every=1", "sample_tokens=0", "max_chars=0", "steps=4",
        "checkpoint_every=2"])
    quiet = lambda *_: None  # noqa: E731
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(cfg, straight, out=quiet)
    meta = json.loads((straight / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["blocks"] > 8 and meta["key"]["source"]["path"] == str(src.resolve())
    train(cfg, resumed, stop_after=3, out=quiet)
    stamp = (resumed / "data" / "train.tokens").stat().st_mtime_ns
    train(cfg, resumed, resume=True, out=quiet)
    assert (resumed / "data" / "train.tokens").stat().st_mtime_ns == stamp  # the cache was reused
    a, b = (load_checkpoint(latest_checkpoint(r), as_numpy=True)["params"] for r in (straight, resumed))
    la, lb = dict(tree_leaves_with_path(a)), dict(tree_leaves_with_path(b))
    assert la.keys() == lb.keys()
    for path in la:
        assert np.array_equal(la[path], lb[path]), path
    assert main(["eval", str(straight), "--max-examples", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
