"""Task ``translation``: an encoder-decoder (``Seq2SeqConfig``) on word-level sentence pairs, by
default number words EN -> DE / FR, or a user's JSONL. Metrics: teacher-forced loss / perplexity
/ token accuracy, and exact match and BLEU of greedy decoding.

Dims: B batch, S source time, T target time, V vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.atomic import atomic_write_text
from bigmodel_train import metrics as M
from bigmodel_train.config import ConfigError, RunConfig
from bigmodel_train.data.builtin import translation_numbers
from bigmodel_train.data.packing import pad_batch, split_items
from bigmodel_train.data.stream import JsonlStream
from bigmodel_train.data.text import WordVocab
from bigmodel_train.extras import missing_extra
from bigmodel_train.tasks.splits import ArraySplit, Split, eval_batches
from bigmodel_train.tasks.task import Task, fit_max_len, model_base, with_model_overrides
from reference_numpy import generation as ref_generation
from reference_numpy.configs import Seq2SeqConfig
from reference_numpy.losses import IGNORE_INDEX
from reference_numpy.tree import Tree

__all__ = ["TranslationTask"]


class TranslationTask(Task):
    """Sequence to sequence on word-level sentences: source + ``</s>`` in, ``<s>`` + target as
    decoder input, target + ``</s>`` as labels (-100 on padding). One shared vocabulary."""

    unit = "tokens"

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> None:
        if importlib.util.find_spec("sacrebleu") is None:  # fail before training, not at its evaluation
            raise missing_extra("sacrebleu", "BLEU (the translation task's evaluation)",
                                ImportError("No module named 'sacrebleu'", name="sacrebleu"))
        super().__init__(cfg, run_dir)
        self._pairs: dict[str, list[tuple[str, str]]] | None = None
        saved = None if run_dir is None else Path(run_dir) / "vocab.json"
        if saved is not None and saved.exists():
            self.vocab = WordVocab.from_json(saved.read_text(encoding="utf-8"))
        else:
            train = self.pairs()["train"]
            self.vocab = WordVocab.build([s for pair in train for s in pair])
        base = model_base(cfg, Seq2SeqConfig)
        self.model_config = with_model_overrides(base, cfg, vocab_size=len(self.vocab),
                                                  max_len=fit_max_len(base, cfg))

    def pairs(self) -> dict[str, list[tuple[str, str]]]:
        if self._pairs is None:
            self._pairs = _translation_pairs(self.cfg)
        return self._pairs

    def save_artifacts(self) -> None:
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "vocab.json", self.vocab.to_json())

    def encode_sources(self, sources: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = pad_batch([self.vocab.encode(s, add_eos=True) for s in sources], self.vocab.pad_id,
                              self.cfg.seq_len, truncate=True)
        return {"input_ids": ids, "attention_mask": mask}

    def build_splits(self) -> dict[str, Split]:
        out = {}
        L = self.cfg.seq_len
        for name, pairs in self.pairs().items():
            src = self.encode_sources([s for s, _ in pairs])
            tgt = [self.vocab.encode(t) for _, t in pairs]
            dec, dec_mask = pad_batch([[self.vocab.bos_id] + t for t in tgt], self.vocab.pad_id, L, truncate=True)
            lab, _ = pad_batch([t + [self.vocab.eos_id] for t in tgt], self.vocab.pad_id, L, truncate=True)
            labels = np.where(dec_mask.astype(bool), lab, IGNORE_INDEX).astype(np.int32)
            out[name] = ArraySplit({**src, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask,
                                    "labels": labels})
        return out

    def units(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.sum(batch["attention_mask"]) + np.sum(batch["decoder_attention_mask"]))

    def translate(self, params: Tree, sources: Sequence[str], backend: str = "jax", *, num_beams: int = 1,
                  max_new_tokens: int | None = None) -> list[str]:
        """Greedy (or beam) translations of ``sources``, decoded in batches of ``eval_batch_size``
        (the last one padded, so one compiled decoder serves any number of sentences)."""
        n = max_new_tokens or min(self.cfg.seq_len, self.model_config.max_len - 1)
        kw = dict(max_new_tokens=n, decoder_start_token_id=self.vocab.bos_id, num_beams=num_beams,
                  eos_token_id=self.vocab.eos_id, pad_token_id=self.vocab.pad_id)
        if backend == "numpy":
            gen = ref_generation.seq2seq_generate
        else:  # imported on first use, like Task.jax_module: the NumPy backend needs no jax
            from bigmodel_jax.generation import seq2seq_generate as gen
        out: list[str] = []
        bs = self.cfg.eval_batch_size
        for start in range(0, len(sources), bs):
            chunk = list(sources[start:start + bs])
            valid = len(chunk)
            chunk += [chunk[0]] * (bs - valid)
            ids = np.asarray(gen(params, self.encode_sources(chunk), self.model_config, **kw))
            out += [self.vocab.decode(row) for row in ids[:valid]]
        return out

    def evaluate(self, params: Tree, split: str = "val", backend: str = "jax", *, max_examples: int | None = None
                 ) -> dict[str, Any]:
        """Teacher-forced token loss / perplexity / accuracy, and exact match + BLEU of greedy
        translations."""
        cap = self.cfg.max_eval_examples if max_examples is None else max_examples
        nll, count, correct = 0.0, 0, 0.0
        hyps: list[str] = []
        pairs = self.pairs()[split]
        bs = self.cfg.eval_batch_size
        for i, (batch, valid) in enumerate(eval_batches(self.splits[split], bs, cap)):
            logits = self.forward(params, batch, backend)[:valid]
            labels = batch["labels"][:valid]
            s, c = M.nll_sum_and_count(logits, labels, ignore_index=IGNORE_INDEX)
            nll, count = nll + s, count + c
            correct += M.accuracy(labels, np.argmax(logits, -1), ignore_index=IGNORE_INDEX) * c
            hyps += self.translate(params, [src for src, _ in pairs[i * bs: i * bs + valid]], backend)
        refs = [t for _, t in pairs[: len(hyps)]]
        bleu = M.corpus_bleu(hyps, refs)
        return {"loss": nll / count, "perplexity": M.perplexity_from_nll(nll, count),
                "token_accuracy": correct / count, "exact_match": M.exact_match(hyps, refs),
                "bleu": bleu.score, "bleu_signature": bleu.signature, "n": len(hyps),
                "examples": [{"source": s, "reference": r, "hypothesis": h}
                             for (s, r), h in list(zip(pairs, hyps))[:5]]}

    def sample(self, params: Tree, backend: str = "jax", **kw: Any) -> str | None:
        pairs = self.pairs()["val"][:3]
        hyps = self.translate(params, [s for s, _ in pairs], backend)
        return "\n".join(f"{s}  ->  {h}   (reference: {t})" for (s, t), h in zip(pairs, hyps))


def _translation_pairs(cfg: RunConfig) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source, target), ...]} from the built-in numbers task or a user's JSONL with
    ``source`` / ``target`` fields."""
    fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    if cfg.data in ("numbers", "numbers-de", "numbers-fr"):
        language = "fr" if cfg.data == "numbers-fr" else "de"
        ds = translation_numbers(language=language, fractions=fractions, seed=cfg.seed)
        out = {"train": list(ds.train), "val": list(ds.val)}
        if cfg.test_fraction:
            out["test"] = list(ds.test)
        return out
    else:
        path = Path(cfg.data)
        if not path.is_file() or path.suffix != ".jsonl":
            raise ConfigError(f"data={cfg.data!r}: translation needs 'numbers' or a .jsonl file with "
                              f"'source' and 'target' fields")
        pairs = [(str(a), str(b)) for a, b in JsonlStream(path, field=("source", "target"))]
    parts = split_items(pairs, fractions, cfg.seed)
    out = {"train": parts[0], "val": parts[1]}
    if cfg.test_fraction:
        out["test"] = parts[2]
    return out
