"""HF GPT-2 and Llama checkpoints: tiny random transformers models saved to disk, loaded with
``bigmodel_port.hf.checkpoint.load_pretrained``, run on both of our sides and compared to torch;
export back to HF format bit-exactly; strict-loading errors; sharded and ``.bin`` files.

No network: every model is built here from a small config (``torch.manual_seed``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model,
                          LlamaConfig, LlamaForCausalLM, LlamaModel)

from bigmodel_jax.models import gpt as jax_gpt
from bigmodel_port.errors import CheckpointError
from bigmodel_port.hf import gpt2 as hf_gpt2
from bigmodel_port.hf import llama as hf_llama
from bigmodel_port.hf.checkpoint import Pretrained, load_pretrained, save_pretrained
from reference_numpy.models import gpt as ref_gpt
from reference_numpy.tolerances import MODEL_PARITY, normwise_error

pytestmark = pytest.mark.hf

# Our float32 outputs vs torch's float32 outputs, max abs error. Both sides round every op to
# float32 (eps 1.2e-7) in a different order; with the weights drawn below (std 0.2) the outputs
# are O(3-5), so a few ulps of them is ~1e-6; measured <= 3.5e-6 over seeds (Llama is the
# larger: HF builds its RoPE cos/sin table in float32 from float32 frequencies, ours rounds the
# float64 frequencies once). 1e-5 keeps ~3x margin, while any real mismatch (a transposed
# kernel, the wrong RoPE layout, the erf GELU for the tanh one) gives >= 1e-2 on these outputs.
TORCH_F32_ATOL = 1e-5
WEIGHT_STD = 0.2  # see _randomise; larger weights grow the float32 error with the outputs

# One batch: two sequences of T = 9, the second right-padded after 6 tokens.
B, T, N_REAL = 2, 9, 6
VOCAB = 101


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, N_REAL:] = 0
    return ids, mask


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter with O(1) scale (HF's init std of 0.02 makes every output ~0,
    which would let a wrong mapping pass an absolute tolerance). Norm scales stay near 1. Tied
    parameters are one object, so they stay tied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm = any(k in name for k in ("ln_", "norm")) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else WEIGHT_STD * noise)
    return model.eval()


# name -> (builder, HF task output: "logits" or "last_hidden_state")
def _gpt2_cfg(**kw: Any) -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                      bos_token_id=0, eos_token_id=0, **kw)


def _llama_cfg(**kw: Any) -> LlamaConfig:
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                bos_token_id=0, eos_token_id=0)
    return LlamaConfig(**{**base, **kw})


CASES: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2_lm": lambda: GPT2LMHeadModel(_gpt2_cfg()),
    "gpt2_lm_untied": lambda: GPT2LMHeadModel(_gpt2_cfg(tie_word_embeddings=False)),
    "gpt2_base": lambda: GPT2Model(_gpt2_cfg()),
    "gpt2_relu_inner": lambda: GPT2LMHeadModel(_gpt2_cfg(n_inner=40, activation_function="relu")),
    "llama_gqa_untied": lambda: LlamaForCausalLM(_llama_cfg()),
    "llama_gqa_tied": lambda: LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True)),
    # E = 16 while D / H = 8: the head width is its own field
    "llama_head_dim": lambda: LlamaForCausalLM(_llama_cfg(head_dim=16)),
    # biases everywhere, Llama-3's RoPE base
    "llama_bias_theta": lambda: LlamaForCausalLM(_llama_cfg(
        attention_bias=True, mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama_base": lambda: LlamaModel(_llama_cfg()),
}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomise(CASES[name]().float(), seed)


def _torch_out(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _ours(pt: Pretrained, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reference, JAX) outputs: logits (B, T, V) for a causal LM, hidden states (B, T, D) for a base."""
    batch = {"input_ids": ids, "attention_mask": mask}
    jparams = jax.tree.map(jax.numpy.asarray, pt.params)
    if pt.task == "base":
        return (ref_gpt.hidden_states(pt.params, batch, pt.config),
                np.asarray(jax_gpt.hidden_states(jparams, batch, pt.config)))
    return ref_gpt.forward(pt.params, batch, pt.config), np.asarray(jax_gpt.forward(jparams, batch, pt.config))


def _real(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Non-padded positions of x (B, T, ...) -> (N, ...)."""
    return x[mask.astype(bool)]


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_torch(name: str, tmp_path: Path) -> None:
    model = _build(name)
    model.save_pretrained(tmp_path)
    ids, mask = _batch()
    want = _torch_out(model, ids, mask)

    pt = load_pretrained(tmp_path)
    assert pt.report.ok and pt.architecture == type(model).__name__
    assert pt.config.dtype == "float32"
    ref, jx = _ours(pt, ids.numpy(), mask.numpy())
    assert ref.dtype == jx.dtype == np.float32 and ref.shape == want.shape
    m = mask.numpy()
    err_ref = float(np.abs(_real(ref, m) - _real(want, m)).max())
    err_jax = float(np.abs(_real(jx, m) - _real(want, m)).max())
    scale = float(np.abs(want).max())
    print(f"{name}: max|out| {scale:.3g}; max abs err vs torch: reference {err_ref:.3g}, JAX {err_jax:.3g}")
    assert scale > 0.5  # the outputs are not ~0 (see _randomise)
    assert err_ref <= TORCH_F32_ATOL and err_jax <= TORCH_F32_ATOL

    # our two sides in float64, same checkpoint: like-for-like math
    pt64 = load_pretrained(tmp_path, dtype="float64")
    ref64, jx64 = _ours(pt64, ids.numpy(), mask.numpy())
    assert ref64.dtype == jx64.dtype == np.float64
    max_abs, rel = normwise_error(_real(jx64, m), _real(ref64, m))
    print(f"{name}: float64 reference vs JAX rel {rel:.3g}")
    assert MODEL_PARITY["float64"].passes(max_abs, rel)


def test_rope_layout_matters(tmp_path: Path) -> None:
    """Negative control: the same Llama checkpoint run with the other RoPE pairing is far off, so
    the match above really checks the "half" layout and the un-permuted q/k kernels."""
    model = _build("llama_gqa_untied")
    model.save_pretrained(tmp_path)
    ids, mask = _batch()
    want = _torch_out(model, ids, mask)
    pt = load_pretrained(tmp_path, config_overrides={"rope_layout": "interleaved"})
    ref = ref_gpt.forward(pt.params, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, pt.config)
    m = mask.numpy()
    assert np.abs(_real(ref, m) - _real(want, m)).max() > 1e-2


def _auto(task: str) -> Any:
    return AutoModel if task == "base" else AutoModelForCausalLM


@pytest.mark.parametrize("name", ["gpt2_lm", "gpt2_lm_untied", "gpt2_base", "llama_gqa_untied",
                                  "llama_gqa_tied", "llama_head_dim", "llama_bias_theta", "llama_base"])
def test_export_round_trip(name: str, tmp_path: Path) -> None:
    """Our loaded tree saved in HF format reloads in transformers with every tensor bit-equal
    and the same outputs."""
    model = _build(name)
    model.save_pretrained(tmp_path / "hf")
    pt = load_pretrained(tmp_path / "hf")
    save_pretrained(tmp_path / "ours", pt.config, pt.params, pt.architecture, pt.hf_config)

    back = _auto(pt.task).from_pretrained(tmp_path / "ours").float().eval()
    assert type(back) is type(model)
    want, got = model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    ids, mask = _batch()
    assert np.array_equal(_torch_out(back, ids, mask), _torch_out(model, ids, mask))
    # and our reader agrees with our writer
    again = load_pretrained(tmp_path / "ours")
    assert again.config == pt.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again.params, pt.params)


def _gpt2_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A writable copy of the state dict (cloned: safetensors refuses shared storage)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_config(d: Path, model: torch.nn.Module) -> None:
    """config.json as save_pretrained writes it (which fills in ``architectures``)."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(d / "config.json")


def _write(d: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    _write_config(d, model)
    save_file(state, str(d / "model.safetensors"))


def test_bad_gpt2_checkpoint_lists_names(tmp_path: Path) -> None:
    model = _build("gpt2_lm")
    state = _gpt2_state(model)
    del state["lm_head.weight"]  # tied: absent in real checkpoints too
    del state["transformer.h.1.mlp.c_fc.bias"]  # missing
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 64)  # should be (32, 96)
    _write(tmp_path, model, state)

    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.bias" in msg
    assert "transformer.h.0.attn.c_attn.weight: checkpoint (32, 64) vs model (32, 96)" in msg
    assert "strict=False" in msg

    pt = load_pretrained(tmp_path, strict=False)
    assert pt.report.missing == ["transformer.h.1.mlp.c_fc.bias"]
    assert pt.report.mismatched == ["transformer.h.0.attn.c_attn.weight: checkpoint (32, 64) vs model (32, 96)"]
    assert sorted(pt.report.initialised) == sorted(
        ["layers/attn/query/kernel", "layers/attn/key/kernel", "layers/attn/value/kernel", "layers/mlp/up/bias"])
    # everything else came from the file
    np.testing.assert_array_equal(pt.params["embed"]["embedding"], state["transformer.wte.weight"].numpy())
    np.testing.assert_array_equal(pt.params["layers"]["attn"]["query"]["bias"][0],
                                  state["transformer.h.0.attn.c_attn.bias"][:32].numpy().reshape(4, 8))
    assert pt.params["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)


def test_untied_values_under_tied_config_refused(tmp_path: Path) -> None:
    model = _build("gpt2_lm")
    state = _gpt2_state(model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    _write(tmp_path, model, state)
    with pytest.raises(CheckpointError, match="tied copy of transformer.wte.weight"):
        load_pretrained(tmp_path)


def test_sharded_safetensors(tmp_path: Path) -> None:
    model = _build("llama_gqa_untied")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, sharded = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "sharded")
    assert sharded.report.ok and sharded.config == one.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded.params, one.params)


def test_pytorch_bin_with_old_buffers(tmp_path: Path) -> None:
    """transformers v5 ignores ``safe_serialization=False``, so the ``.bin`` is written with
    torch.save, as older transformers did — including the causal-mask buffers old GPT-2
    checkpoints carry, which are not weights and are skipped."""
    model = _build("gpt2_lm")
    model.save_pretrained(tmp_path / "st")
    state = dict(model.state_dict())  # lm_head.weight included, sharing wte's storage
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    d = tmp_path / "bin"
    _write_config(d, model)
    torch.save(state, d / "pytorch_model.bin")
    got, want = load_pretrained(d), load_pretrained(tmp_path / "st")
    assert got.report.ok and not got.report.unexpected
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got.params, want.params)


def test_base_checkpoint_into_lm_head(tmp_path: Path) -> None:
    """A bare GPT2Model checkpoint loads into GPT2LMHeadModel (tied head = wte), as in transformers."""
    model = _build("gpt2_base")
    model.save_pretrained(tmp_path)
    pt = load_pretrained(tmp_path, "GPT2LMHeadModel")
    assert pt.report.ok and pt.task == "causal_lm"
    ids, mask = _batch()
    h = _torch_out(model, ids, mask)
    logits = ref_gpt.forward(pt.params, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, pt.config)
    m = mask.numpy()
    want = h @ model.wte.weight.detach().numpy().T
    assert np.abs(_real(logits, m) - _real(want, m)).max() <= TORCH_F32_ATOL


# ---- config translation: refusals by name, v4 spellings ---------------------------------------


def _gpt2_json() -> dict[str, Any]:
    return _gpt2_cfg().to_dict()


def _llama_json() -> dict[str, Any]:
    return _llama_cfg().to_dict()


@pytest.mark.parametrize("field,value", [
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
    ("scale_attn_weights", False), ("add_cross_attention", True), ("activation_function", "gelu_10"),
])
def test_gpt2_refuses_unsupported(field: str, value: Any) -> None:
    hf = {**_gpt2_json(), field: value}
    with pytest.raises(ValueError, match=field):
        hf_gpt2.config_from_hf(hf, "GPT2LMHeadModel")


def test_gpt2_config_fields() -> None:
    c = hf_gpt2.config_from_hf({**_gpt2_json(), "n_inner": None, "layer_norm_epsilon": 1e-6,
                                "resid_pdrop": 0.2}, "GPT2LMHeadModel")
    assert (c.d_ff, c.norm_eps, c.dropout, c.activation, c.tie_embeddings) == (128, 1e-6, 0.2, "gelu_tanh", True)
    assert (c.max_len, c.vocab_size, c.positions, c.norm) == (16, VOCAB, "learned", "layer")


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "rope_type='llama3'"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"hidden_act": "gelu_10"}, "hidden_act"),
])
def test_llama_refuses_unsupported(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hf_llama.config_from_hf({**_llama_json(), **change}, "LlamaForCausalLM")


def test_llama_config_fields_v4_and_v5() -> None:
    v5 = hf_llama.config_from_hf(_llama_json(), "LlamaForCausalLM")
    assert (v5.kv_heads, v5.e, v5.head_dim, v5.rope_theta, v5.rope_layout) == (2, 8, None, 10000.0, "half")
    assert (v5.norm, v5.gated_mlp, v5.bias, v5.tie_embeddings, v5.norm_eps) == ("rms", True, False, False, 1e-6)
    # transformers v4 config.json: top-level rope_theta, rope_scaling null, no head_dim
    v4 = {k: v for k, v in _llama_json().items() if k not in ("rope_parameters", "head_dim")}
    v4.update(rope_theta=500000.0, rope_scaling=None)
    c4 = hf_llama.config_from_hf(v4, "LlamaForCausalLM")
    assert c4.rope_theta == 500000.0 and c4.e == 8
    out = hf_llama.config_to_hf(c4, "LlamaForCausalLM", v4)
    assert out["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert "rope_theta" not in out and "rope_scaling" not in out
    assert LlamaConfig(**out).rope_parameters["rope_theta"] == 500000.0
    json.dumps(out)  # writable as config.json


@pytest.mark.parametrize("name", ["gpt2_lm", "llama_gqa_tied"])
def test_export_without_original_config(name: str, tmp_path: Path) -> None:
    """A tree with no config.json to start from (hf_config=None) still writes a directory that
    transformers builds into the same model."""
    model = _build(name)
    model.save_pretrained(tmp_path / "hf")
    pt = load_pretrained(tmp_path / "hf")
    save_pretrained(tmp_path / "ours", pt.config, pt.params, pt.architecture)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    ids, mask = _batch()
    assert np.array_equal(_torch_out(back, ids, mask), _torch_out(model, ids, mask))
