"""Built-in data sets that work offline, deterministic from a seed, small enough for a 2-core CPU.

* ``stdlib_corpus``: the running interpreter's standard-library source, a language-modelling corpus.
* ``digits``: the 8x8 handwritten digits scikit-learn bundles, shipped here as ``digits.npz``
  (licence and provenance in ``digits.LICENSE.txt``), image classification.
* ``translation_numbers``: integers in English words -> German or French number words, a generated
  translation task for the encoder-decoder (with ``WordVocab`` and ``encode_translation_batch``).
* ``docstring_classification``: standard-library docstrings labelled by their package, a real-text
  classification task for fine-tuning a pretrained BERT.

The two standard-library sets depend on the Python version (they read its files); everything
else about them is fixed by the seed.
"""

from __future__ import annotations

import ast
import importlib.resources
import sysconfig
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_train.data.packing import pad_batch, split_indices, split_items, stratified_split
from bigmodel_train.data.text import WordVocab, clean_text
from reference_numpy.losses import IGNORE_INDEX

# Parts of the standard library that are not ordinary hand-written modules: tests, the IDLE and
# turtle demos, third-party installs, generated tables (encodings, pydoc topics), the 2to3 fixers'
# test data, bundled wheels, the build configuration, bytecode caches.
STDLIB_EXCLUDE = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
    "ensurepip", "pydoc_data", "encodings", "__pycache__", "__phello__",
})


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (``sysconfig.get_paths()["stdlib"]``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    return root


def stdlib_files(root: Path | None = None, *, exclude: frozenset[str] = STDLIB_EXCLUDE) -> list[Path]:
    """Sorted ``*.py`` files under the standard library, skipping any path with a component in
    ``exclude`` (or starting with ``config-``, the build configuration)."""
    root = stdlib_root() if root is None else Path(root)
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in exclude or p.startswith("config-") for p in parts[:-1]) or parts[-1] in exclude:
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: this Python ships without its library source")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_source(path: Path) -> str | None:
    """A source file's text, decoded by its PEP 263 coding cookie; None if it cannot be decoded."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (UnicodeDecodeError, SyntaxError, OSError):
        return None


@dataclass
class TextCorpus:
    """Documents for language modelling, split by document."""

    train: list[str]  # one document per source file
    val: list[str]
    train_names: list[str]  # the documents' file paths relative to the library root
    val_names: list[str]
    root: str  # where the files came from
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded


def stdlib_corpus(
    *,
    max_files: int = 300,
    max_bytes: int = 2_000_000,
    max_file_bytes: int = 60_000,
    min_file_bytes: int = 200,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TextCorpus:
    """The Python standard library's own source code as a language-modelling corpus.

    Source: the ``*.py`` files of the running interpreter's library (``stdlib_files``: sorted,
    without tests, IDLE, site-packages, generated tables), nothing downloaded. One document per
    file. The seed shuffles the sorted file list; files are taken in that order, skipping those
    outside [``min_file_bytes``, ``max_file_bytes``], until ``max_files`` or ``max_bytes`` (UTF-8
    bytes of text) is reached; then the chosen documents are split into train / validation by
    document (``val_fraction``). Texts are NFC-normalised with control characters removed
    (``clean_text``), keeping indentation and newlines.

    With the defaults on Python 3.11: ~2 MB of text in ~143 files, 129 train / 14 val documents
    (the byte cap binds first; the counts depend on the Python version).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if max_files < 2:
        raise ValueError(f"max_files must be >= 2 (one train and one validation document), got {max_files}")
    root = stdlib_root()
    files = stdlib_files(root)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x57D])).permutation(len(files))
    chosen: list[tuple[str, str]] = []
    skipped: list[str] = []
    total = 0
    for i in order:
        if len(chosen) >= max_files:
            break
        path = files[i]
        size = path.stat().st_size
        if not min_file_bytes <= size <= max_file_bytes or total + size > max_bytes:
            continue  # (cleaning only removes characters, so the size on disk bounds the text's)
        text = _read_source(path)
        name = path.relative_to(root).as_posix()
        if text is None:
            skipped.append(name)
            continue
        text = clean_text(text, normalization="NFC", remove_control=True)
        n_bytes = len(text.encode("utf-8"))
        if total + n_bytes > max_bytes:
            continue  # a smaller file later may still fit
        chosen.append((name, text))
        total += n_bytes
    chosen.sort()  # documents in library order inside each split
    train, val = split_items(chosen, (1.0 - val_fraction, val_fraction), seed)
    return TextCorpus(train=[t for _, t in train], val=[t for _, t in val], train_names=[n for n, _ in train],
                      val_names=[n for n, _ in val], root=str(root), skipped=skipped)


# --------------------------------------------------------------------------------------------
# digits


@dataclass
class ImageClassificationData:
    """Images (N, C, H, W) float32 and labels (N,) int64 for train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]


# The digits ship inside this package (about 45 kB), so the built-in image task needs no
# scikit-learn at run time; tests/test_install.py checks the file against load_digits().
DIGITS_FILE = "digits.npz"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits exactly as ``sklearn.datasets.load_digits`` gives them: ``images``
    uint8 (1797, 8, 8) with pixel counts 0..16 and ``target`` uint8 (1797,) with the digit 0..9.
    Read from ``bigmodel_train/data/digits.npz`` (no pickles)."""
    with importlib.resources.files(__package__).joinpath(DIGITS_FILE).open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            images, target = z["images"], z["target"]
    if images.shape != (1797, 8, 8) or target.shape != (1797,):
        raise ValueError(f"{DIGITS_FILE}: expected images (1797, 8, 8) and target (1797,), got "
                         f"{images.shape} and {target.shape}; reinstall bigmodel-jax")
    return images, target


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageClassificationData:
    """The 8x8 handwritten digits (UCI optical recognition data set, test part) that scikit-learn
    bundles, shipped in this package (``load_digits_arrays``; no scikit-learn needed).

    1797 grayscale 8x8 images of the digits 0-9 (about 180 per class), pixel values 0..16.
    Returned as NCHW float32 (B, 1, 8, 8) scaled to [0, 1] (divided by 16), labels int64, with a
    stratified split deterministic in ``seed``: by default 1438 train / 359 test, every class split
    80 / 20 (rounded per class).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, target = load_digits_arrays()
    x = (images.astype(np.float64) / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = target.astype(np.int64)
    train, test = stratified_split(y, (1.0 - test_fraction, test_fraction), seed)
    return ImageClassificationData(x[train], y[train], x[test], y[test], [str(c) for c in range(10)])


# --------------------------------------------------------------------------------------------
# number translation

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = ("_ _ twenty thirty forty fifty sixty seventy eighty ninety").split()


def english_number(n: int) -> str:
    """0..9999 in English words, American style, no hyphens or "and": 21 -> "twenty one",
    1005 -> "one thousand five"."""
    _check_number(n)
    if n == 0:
        return "zero"
    words = []
    if n >= 1000:
        words += [_EN_ONES[n // 1000], "thousand"]
    if (n // 100) % 10:
        words += [_EN_ONES[(n // 100) % 10], "hundred"]
    rest = n % 100
    if 0 < rest < 20:
        words.append(_EN_ONES[rest])
    elif rest >= 20:
        words.append(_EN_TENS[rest // 10])
        if rest % 10:
            words.append(_EN_ONES[rest % 10])
    return " ".join(words)


_DE_ONES = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn "
            "fünfzehn sechzehn siebzehn achtzehn neunzehn").split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


def german_number(n: int) -> str:
    """0..9999 in German number words written as separate words, the unit before the ten:
    21 -> "ein und zwanzig" (einundzwanzig), 101 -> "ein hundert eins"; "eins" stands alone
    at the end, "ein" inside a compound (as in "einhundert", "eintausend")."""
    _check_number(n)
    if n == 0:
        return "null"

    def lead(d: int) -> str:  # the multiplier of hundert / tausend
        return "ein" if d == 1 else _DE_ONES[d]

    words = []
    if n >= 1000:
        words += [lead(n // 1000), "tausend"]
    if (n // 100) % 10:
        words += [lead((n // 100) % 10), "hundert"]
    rest = n % 100
    if 0 < rest < 20:
        words.append(_DE_ONES[rest])
    elif rest >= 20:
        if rest % 10:
            words += [lead(rest % 10), "und"]
        words.append(_DE_TENS[rest // 10])
    return " ".join(words)


_FR_ONES = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze "
            "seize").split()
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def _french_below_100(r: int) -> list[str]:
    if r < 17:
        return [_FR_ONES[r]]
    if r < 20:
        return ["dix", _FR_ONES[r - 10]]
    if r < 70:
        t, u = divmod(r, 10)
        if u == 0:
            return [_FR_TENS[t]]
        return [_FR_TENS[t], "et", "un"] if u == 1 else [_FR_TENS[t], _FR_ONES[u]]
    if r < 80:  # 70-79: sixty-ten .. sixty-nineteen
        return ["soixante", "et", "onze"] if r == 71 else ["soixante", *_french_below_100(r - 60)]
    if r == 80:
        return ["quatre", "vingts"]
    return ["quatre", "vingt", *_french_below_100(r - 80)]  # 81-99: four-twenty-one .. four-twenty-nineteen


def french_number(n: int) -> str:
    """0..9999 in French number words written as separate words (the traditional spelling without
    hyphens), with the vigesimal seventies to nineties: 71 -> "soixante et onze", 80 -> "quatre
    vingts", 95 -> "quatre vingt quinze", 200 -> "deux cents", 1000 -> "mille"."""
    _check_number(n)
    if n == 0:
        return "zéro"
    words: list[str] = []
    thousands, hundreds, rest = n // 1000, (n // 100) % 10, n % 100
    if thousands:
        words += ["mille"] if thousands == 1 else [_FR_ONES[thousands], "mille"]
    if hundreds:
        if hundreds == 1:
            words.append("cent")
        else:  # "cents" takes its plural s only at the end of the number
            words += [_FR_ONES[hundreds], "cents" if rest == 0 else "cent"]
    if rest:
        words += _french_below_100(rest)
    return " ".join(words)


def _check_number(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= 9999:
        raise ValueError(f"number words are defined for integers 0..9999, got {n!r}")


TARGET_LANGUAGES = {"de": german_number, "fr": french_number}


@dataclass
class TranslationData:
    """(source, target) sentence pairs per split; ``*_numbers`` are the integers they spell."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    train_numbers: np.ndarray
    val_numbers: np.ndarray
    test_numbers: np.ndarray
    language: str

    def vocab(self) -> WordVocab:
        """The shared source + target word vocabulary of the training pairs (the seq2seq model has
        one vocabulary for both sides)."""
        return WordVocab.build(s for pair in self.train for s in pair)


def translation_numbers(
    *,
    language: str = "de",
    max_number: int = 9999,
    n: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> TranslationData:
    """A generated translation task: integers in English words -> the same number in German
    ("de", unit-before-ten order: "twenty one" -> "ein und zwanzig") or French ("fr", vigesimal:
    "ninety" -> "quatre vingt dix").

    Source: generated here by ``english_number`` / ``german_number`` / ``french_number`` (no
    data files). The numbers 0..``max_number`` (or ``n`` of them drawn without replacement by
    ``seed``) are split train / val / test by number, so no number is in two splits. Defaults:
    10000 pairs, 8000 / 1000 / 1000, sentences of at most 8 words, a shared vocabulary of ~70 words.
    """
    if language not in TARGET_LANGUAGES:
        raise ValueError(f"language must be one of {sorted(TARGET_LANGUAGES)}, got {language!r}")
    _check_number(max_number)
    numbers = np.arange(max_number + 1)
    if n is not None:
        if not 3 <= n <= numbers.size:
            raise ValueError(f"n must lie in [3, {numbers.size}], got {n}")
        numbers = np.sort(np.random.default_rng(np.random.SeedSequence([seed, 0xA11])).choice(
            numbers, size=n, replace=False))
    target = TARGET_LANGUAGES[language]
    parts = split_indices(numbers.size, fractions, seed)
    if len(parts) != 3:
        raise ValueError(f"fractions must give three parts (train, val, test), got {list(fractions)}")
    # Ordered by a seeded shuffle, not by number, so that a prefix of train is a fair sample.
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0DE]))
    split_numbers = [numbers[p][rng.permutation(p.size)] for p in parts]
    pairs = [[(english_number(int(k)), target(int(k))) for k in nums] for nums in split_numbers]
    return TranslationData(*pairs, *split_numbers, language=language)


def encode_translation_batch(
    pairs: Sequence[tuple[str, str]], vocab: WordVocab, *, max_len: int | None = None
) -> dict[str, np.ndarray]:
    """A seq2seq batch from (source, target) pairs, padded on the right to the longest.

    Returns ``input_ids`` / ``attention_mask`` (B, S): source words + ``</s>``;
    ``decoder_input_ids`` / ``decoder_attention_mask`` (B, T): ``<s>`` + target words (teacher
    forcing); ``labels`` (B, T): target words + ``</s>``, -100 on padding. ``max_len`` bounds S
    and T (longer sequences are an error).
    """
    if not pairs:
        raise ValueError("encode_translation_batch needs at least one pair")
    src = [vocab.encode(s, add_eos=True) for s, _ in pairs]
    tgt = [vocab.encode(t) for _, t in pairs]
    ids, mask = pad_batch(src, vocab.pad_id, max_len)
    dec, dec_mask = pad_batch([[vocab.bos_id] + t for t in tgt], vocab.pad_id, max_len)
    labels, _ = pad_batch([t + [vocab.eos_id] for t in tgt], vocab.pad_id, max_len)
    labels = np.where(dec_mask.astype(bool), labels, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# docstring classification

# Top-level packages with many distinct docstrings (>= 135 each on Python 3.11) and clearly
# different topics.
DOCSTRING_GROUPS = ("asyncio", "email", "http", "logging", "unittest", "xml")


@dataclass
class LabeledTexts:
    """Texts with integer labels; ``sources`` says where each text came from (file:line)."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    sources: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TextClassificationData:
    """Train / val / test texts and the class names (label k is ``label_names[k]``)."""

    train: LabeledTexts
    val: LabeledTexts
    test: LabeledTexts
    label_names: list[str]


def _group_files(root: Path, group: str) -> list[Path]:
    package = root / group
    if package.is_dir():
        return stdlib_files(package)  # its test directories are excluded like the library's
    module = root / f"{group}.py"
    if module.is_file():
        return [module]
    raise FileNotFoundError(f"no standard-library package or module {group!r} under {root}")


def _docstrings(path: Path, root: Path, min_words: int, max_words: int) -> list[tuple[str, str]]:
    """(text, source) of each module / class / function docstring: the first paragraph, whitespace
    collapsed, at least ``min_words`` words, cut to ``max_words``."""
    text = _read_source(path)
    if text is None:
        return []
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        first = clean_text(doc.split("\n\n")[0], normalization="NFC", collapse_whitespace=True, strip=True)
        words = first.split()
        if len(words) < min_words:
            continue
        line = getattr(node, "lineno", 1)
        out.append((" ".join(words[:max_words]), f"{path.relative_to(root).as_posix()}:{line}"))
    return out


def docstring_classification(
    *,
    groups: Sequence[str] = DOCSTRING_GROUPS,
    per_class: int = 120,
    min_words: int = 4,
    max_words: int = 48,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> TextClassificationData:
    """Real-text classification: a standard-library docstring -> the top-level package it is from.

    Source: the running interpreter's library source, parsed with ``ast`` (nothing is imported).
    For each group (default ``asyncio, email, http, logging, unittest, xml``; test directories
    excluded) every module, class and function docstring gives its first paragraph, whitespace
    collapsed, cut to ``max_words`` words (short enough for MiniLM at 64-128 tokens), keeping
    those of at least ``min_words``. Texts are deduplicated (one found in two groups is dropped
    as ambiguous). Each class then keeps the same number of texts, ``min(per_class, smallest
    class)``, drawn by ``seed``, and a stratified split gives train / val / test. Defaults:
    6 classes x 120 = 720 texts, 504 / 108 / 108.
    """
    if len(set(groups)) != len(groups) or len(groups) < 2:
        raise ValueError(f"groups must be at least two distinct names, got {list(groups)}")
    if per_class < 3:
        raise ValueError(f"per_class must be >= 3 (one text per split), got {per_class}")
    root = stdlib_root()
    found: dict[str, dict[str, str]] = {}  # group -> text -> source (first occurrence)
    for group in groups:
        texts: dict[str, str] = {}
        for path in _group_files(root, group):
            for text, source in _docstrings(path, root, min_words, max_words):
                texts.setdefault(text, source)
        found[group] = texts
    owners: dict[str, int] = {}
    for texts in found.values():
        for text in texts:
            owners[text] = owners.get(text, 0) + 1
    per_group = {g: sorted(t for t in texts if owners[t] == 1) for g, texts in found.items()}
    size = min(per_class, *(len(t) for t in per_group.values()))
    if size < 3:
        thin = min(per_group, key=lambda g: len(per_group[g]))
        raise ValueError(f"group {thin!r} has only {len(per_group[thin])} usable docstrings")
    texts_all: list[str] = []
    labels_all: list[int] = []
    sources_all: list[str] = []
    for k, group in enumerate(groups):
        candidates = per_group[group]
        pick = np.sort(np.random.default_rng(np.random.SeedSequence([seed, 0xD0C, k])).choice(
            len(candidates), size=size, replace=False))
        texts_all += [candidates[i] for i in pick]
        sources_all += [found[group][candidates[i]] for i in pick]
        labels_all += [k] * size
    y = np.asarray(labels_all, np.int64)
    parts = stratified_split(y, fractions, seed)
    if len(parts) != 3:
        raise ValueError(f"fractions must give three parts (train, val, test), got {list(fractions)}")
    # Shuffled inside each split so that classes are interleaved for a plain sequential reader.
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5F1]))
    splits = []
    for part in parts:
        part = part[rng.permutation(part.size)]
        splits.append(LabeledTexts([texts_all[i] for i in part], y[part], [sources_all[i] for i in part]))
    return TextClassificationData(*splits, label_names=list(groups))


def describe(data: Any) -> str:
    """A one-line summary of a built-in data set's sizes (for logs)."""
    if isinstance(data, TextCorpus):
        chars = sum(len(t) for t in data.train) + sum(len(t) for t in data.val)
        return f"text corpus: {len(data.train)} train / {len(data.val)} val documents, {chars} characters"
    if isinstance(data, ImageClassificationData):
        return (f"images {data.x_train.shape[1:]}: {len(data.x_train)} train / {len(data.x_test)} test, "
                f"{len(data.class_names)} classes")
    if isinstance(data, TranslationData):
        return f"translation en->{data.language}: {len(data.train)} / {len(data.val)} / {len(data.test)} pairs"
    if isinstance(data, TextClassificationData):
        return (f"text classification, {len(data.label_names)} classes: {len(data.train)} / {len(data.val)} / "
                f"{len(data.test)} texts")
    raise TypeError(f"not a built-in data set: {type(data).__name__}")
