"""Integer tensors loaded into float parameters are refused unless asked for (issue #14).

An HF directory whose tensor for one of our (floating-point) parameters is int32 / int64 / uint8
/ bool is a corrupt, mislabelled or hand-built checkpoint: the HF import path raises
``CheckpointError`` naming the tensor and its dtype, and ``allow_int_cast=True`` (keyword-only,
threaded through ``load_pretrained`` and every ``from_pretrained``) is the opt-in that casts it.
Float-to-float casts (float16 -> float32) stay allowed.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bigmodel_port import CheckpointError
from bigmodel_port.hf.checkpoint import load_pretrained
from bigmodel_port.hf.mapping import check_float_source
from bigmodel_port.hub import jax as bj
from bigmodel_port.hub import numpy as rn
from reference_numpy.configs import preset

# the HF name and our leaf of one BERT tensor (a per-layer one: our leaf stacks the L layers)
NAME, LAYER, LEAF = "bert.encoder.layer.1.attention.self.query.bias", 1, ("layers", "attn", "query", "bias")


def _leaf(params: dict, path: tuple[str, ...]) -> np.ndarray:
    for k in path:
        params = params[k]
    return np.asarray(params)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A BertForMaskedLM directory of our own (config.json + model.safetensors)."""
    rn.BertForMaskedLM(preset("bert-tiny"), seed=3).save_pretrained(tmp_path)
    return tmp_path


def _replace(directory: Path, name: str, value: np.ndarray) -> None:
    state = load_file(directory / "model.safetensors")
    assert name in state and state[name].shape == value.shape
    state[name] = value
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


INT_VALUES = {
    "int32": np.array([-3, 0, 7, 1, 2, 5, -1, 4] * 4, np.int32),
    "int64": np.arange(-16, 16, dtype=np.int64),
    "uint8": np.arange(32, dtype=np.uint8) * 7,
    "bool": np.arange(32) % 3 == 0,
}


@pytest.mark.parametrize("dtype", sorted(INT_VALUES))
def test_integer_tensor_is_refused_by_name_and_loads_when_asked(saved, dtype):
    value = INT_VALUES[dtype]
    _replace(saved, NAME, value)
    for cls in (rn.BertForMaskedLM, bj.BertForMaskedLM, rn.AutoModelForMaskedLM):
        with pytest.raises(CheckpointError, match=rf"tensor '{NAME}' has dtype {dtype}.*allow_int_cast=True"):
            cls.from_pretrained(saved)
    with pytest.raises(CheckpointError, match=rf"'{NAME}' has dtype {dtype}"):
        load_pretrained(saved)
    for cls in (rn.BertForMaskedLM, bj.BertForMaskedLM, bj.AutoModelForMaskedLM):
        model = cls.from_pretrained(saved, allow_int_cast=True)
        leaf = _leaf(model.backend.to_numpy(model.params), LEAF)
        assert leaf.dtype == np.float32
        # (H, E) per layer in ours, (H E,) in HF: the same elements in the same order
        np.testing.assert_array_equal(leaf[LAYER].reshape(-1), value.astype(np.float32))
    got = load_pretrained(saved, allow_int_cast=True, dtype="float64")
    assert _leaf(got.params, LEAF).dtype == np.float64


def test_float16_tensor_still_loads_exactly(saved):
    value = (np.arange(32, dtype=np.float32) / 8 - 2).astype(np.float16)
    _replace(saved, NAME, value)
    model = rn.BertForMaskedLM.from_pretrained(saved)
    np.testing.assert_array_equal(_leaf(model.params, LEAF)[LAYER].reshape(-1), value.astype(np.float32))


def test_an_ignored_integer_buffer_is_not_a_parameter(saved):
    """HF BERT checkpoints carry int64 ``position_ids``: a buffer we ignore, not a float weight."""
    state = load_file(saved / "model.safetensors")
    state["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    rn.BertForMaskedLM.from_pretrained(saved)


def test_integer_tied_copy_is_refused(saved):
    """The MLM decoder is a tied copy of the word embedding; an integer copy is refused too."""
    state = load_file(saved / "model.safetensors")
    emb = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.weight"] = emb.astype(np.int32)
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'cls\.predictions\.decoder\.weight' has dtype int32"):
        rn.BertForMaskedLM.from_pretrained(saved)


def test_check_float_source_contract():
    for dt in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        check_float_source("w", np.zeros(3, dt))
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.bool_):
        with pytest.raises(CheckpointError, match=rf"tensor 'w' has dtype {np.dtype(dt)}, but it fills our x"):
            check_float_source("w", np.zeros(3, dt), target="our x")
        check_float_source("w", np.zeros(3, dt), allow_int_cast=True)
    # not a real number at all: no option makes it a weight
    with pytest.raises(CheckpointError, match="complex128"):
        check_float_source("w", np.zeros(3, np.complex128), allow_int_cast=True)
