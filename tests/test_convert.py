"""`bigmodel convert`: HF directory <-> native .safetensors <-> .npz, both directions, lossless."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from bigmodel_port.convert import convert, format_of, read_any
from bigmodel_port.errors import CheckpointError
from bigmodel_port.native import load_native, save_npz
from reference_numpy.tree import tree_leaves_with_path

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=20)
    model = transformers.BertForMaskedLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d, model


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_formats_from_paths(tmp_path):
    assert format_of(tmp_path) == "hf"
    assert format_of(tmp_path / "m.safetensors") == "native"
    assert format_of(tmp_path / "m.npz") == "npz"
    with pytest.raises(ValueError, match="cannot tell the format"):
        format_of(tmp_path / "m.pt")


def test_hf_native_npz_hf_round_trip_is_bit_exact(hf_dir, tmp_path):
    d, model = hf_dir
    convert(d, tmp_path / "m.safetensors")
    tree, config, meta = load_native(tmp_path / "m.safetensors")
    assert meta["architecture"] == "BertForMaskedLM" and config.n_layers == 2
    convert(tmp_path / "m.safetensors", tmp_path / "m.npz")
    summary = convert(tmp_path / "m.npz", tmp_path / "back")
    assert "BertConfig" in summary
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "back")
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # fields of config.json we do not model survive the trip
    assert json.loads((tmp_path / "back" / "config.json").read_text())["initializer_range"] == 0.02


def test_dtype_conversion_and_back(hf_dir, tmp_path):
    d, _ = hf_dir
    convert(d, tmp_path / "m64.npz", dtype="float64")
    config, tree, _ = read_any(tmp_path / "m64.npz")
    assert config.dtype == "float64"
    assert all(a.dtype == np.float64 for _, a in tree_leaves_with_path(tree))
    convert(tmp_path / "m64.npz", tmp_path / "m32.safetensors", dtype="float32")
    c32, t32, _ = read_any(tmp_path / "m32.safetensors")
    c0, t0, _ = read_any(d)
    for (p, a), (_, b) in zip(tree_leaves_with_path(t32), tree_leaves_with_path(t0)):
        np.testing.assert_array_equal(a, b, err_msg=p)  # float32 -> float64 -> float32 is exact


def test_file_without_architecture_needs_one(hf_dir, tmp_path):
    d, model = hf_dir
    config, tree, _ = read_any(d)
    save_npz(tmp_path / "bare.npz", tree, config)
    with pytest.raises(ValueError, match="pass architecture="):
        convert(tmp_path / "bare.npz", tmp_path / "out")
    convert(tmp_path / "bare.npz", tmp_path / "out", architecture="BertForMaskedLM")
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_npz_without_config_is_refused(tmp_path):
    save_npz(tmp_path / "noconf.npz", {"a": np.zeros(3)})
    with pytest.raises(CheckpointError, match="holds no config"):
        convert(tmp_path / "noconf.npz", tmp_path / "x.safetensors")


def test_cli_convert(hf_dir, tmp_path, capsys):
    from bigmodel_apps.cli import main
    d, model = hf_dir
    assert main(["convert", str(d), str(tmp_path / "m.safetensors")]) == 0
    assert "-> " in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "hf")]) == 0
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
