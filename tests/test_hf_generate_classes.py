"""``model.generate`` of the transformers-style classes (both packages) against transformers'
``generate``: same tokens for greedy and beam search, with the ids and rules each model takes
from its config.json (EOS / pad / decoder start; Marian's forced EOS and banned pad).

Tiny random-init models, weights drawn with std 0.3 (not HF's 0.02) so logits are well separated
and rows end early; float32 on every side and tokens compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from bigmodel_port.hub import jax as bj
from bigmodel_port.hub import numpy as rn

pytestmark = pytest.mark.hf

STD = 0.3
N = 8
torch.set_num_threads(1)  # tiny models: threads only add overhead and noise under load


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(STD * torch.randn(p.shape, generator=g))
    return model.eval()


def _gpt2(eos: int) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=53, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                  eos_token_id=eos, bos_token_id=eos, pad_token_id=None)
    return _perturb(transformers.GPT2LMHeadModel(cfg), 0)


def _llama(eos: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                                   eos_token_id=eos, bos_token_id=1, pad_token_id=None)
    return _perturb(transformers.LlamaForCausalLM(cfg), 1)


def _eos_that_occurs(model: torch.nn.Module, ids: np.ndarray) -> int:
    """A token greedy decoding emits early in some row, so EOS handling is exercised."""
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    return int(out[0, ids.shape[1] + 1])


@pytest.mark.slow
@pytest.mark.parametrize("arch,build", [("GPT2LMHeadModel", _gpt2), ("LlamaForCausalLM", _llama)])
def test_causal_lm_generate_matches_transformers(arch, build, tmp_path):
    ids = np.random.default_rng(3).integers(2, 53, (3, 5))
    eos = _eos_that_occurs(build(0), ids)
    model = build(eos)
    model.save_pretrained(tmp_path)
    mask = torch.ones(ids.shape, dtype=torch.long)
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)):
        with torch.no_grad():
            want = model.generate(torch.tensor(ids), attention_mask=mask, do_sample=False, max_new_tokens=N,
                                  **kw).numpy()
        for pkg in (rn, bj):
            got = getattr(pkg, arch).from_pretrained(tmp_path).generate(ids, max_new_tokens=N, **kw)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{pkg.__name__} {arch} {kw}")
        auto = bj.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(auto).__name__ == arch


@pytest.mark.slow
def test_marian_generate_uses_its_config_rules(tmp_path):
    """MarianConfig forces EOS at the last step and real checkpoints ban the pad id
    (``bad_words_ids`` in generation_config.json); the pad logit is raised here so the ban
    changes the output."""
    pad, eos, V = 58, 0, 60
    cfg = transformers.MarianConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=eos, forced_eos_token_id=eos,
        activation_function="swish", scale_embedding=True)
    model = _perturb(transformers.MarianMTModel(cfg), 2)
    model.generation_config.bad_words_ids = [[pad]]  # as opus-mt's generation_config.json
    with torch.no_grad():
        model.final_logits_bias[0, pad] += 3.0
    model.save_pretrained(tmp_path)
    # reload: _perturb also drew the sinusoidal position tables, which are not saved (derived)
    model = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(4)
    ids = rng.integers(1, pad, (3, 6))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = pad
    banned_mattered = False
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=3)):
        with torch.no_grad():
            want = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N,
                                  **kw).numpy()
            free = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N,
                                  bad_words_ids=None, **kw).numpy()
        banned_mattered |= (free[:, 1:] == pad).any() and not np.array_equal(free, want)
        for pkg in (rn, bj):
            got = pkg.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).generate(ids, attention_mask=mask,
                                                                              max_new_tokens=N, **kw)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{pkg.__name__} {kw}")
    assert banned_mattered, "the pad ban never changed HF's output: the test would not catch a missing rule"


def test_generate_refuses_what_it_cannot_do(tmp_path):
    _gpt2(5).save_pretrained(tmp_path)
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="sample with bigmodel_jax"):
        rn.GPT2LMHeadModel.from_pretrained(tmp_path).generate(ids, do_sample=True)
    sampled = bj.GPT2LMHeadModel.from_pretrained(tmp_path).generate(ids, do_sample=True, top_k=5, seed=1,
                                                                     max_new_tokens=4)
    assert np.asarray(sampled).shape[0] == 1
    with pytest.raises(TypeError, match="does not generate"):
        rn.GPT2Model.from_pretrained(tmp_path, strict=False).generate(ids)
