"""The parity report command: prints a table, exits 0 when all pass and 1 on any failure."""

from __future__ import annotations

import pytest

from bigmodel_apps.cli import main
from bigmodel_apps.parity import harness
from bigmodel_apps.parity.cases.basic import activation_case
from bigmodel_apps.parity.harness import Case, CaseData


def test_check_passes_and_prints_the_table(capsys):
    assert main(["check", "--only", "linear", "softmax"]) == 0
    out = capsys.readouterr().out
    assert "matmul precision 'highest'" in out
    assert "d/params/kernel" in out and "finite-diff" in out
    assert " 0 failed" in out


def test_check_exits_1_on_a_planted_mismatch(capsys, monkeypatch):
    def wrong_gelu(rng, dtype, **_):
        good = activation_case(rng, dtype, name="gelu")
        # the JAX side uses the other GELU variant: a classic porting bug
        from bigmodel_jax.layers.activations import activation

        return CaseData(good.params, good.inputs, good.ref_forward, good.ref_backward,
                        lambda p, i: activation("gelu_tanh")(i["x"]))

    monkeypatch.setitem(harness.REGISTRY, "planted", Case("planted", wrong_gelu, ({},)))
    assert main(["check", "--only", "planted", "--no-gradcheck"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out


def test_check_rejects_unknown_case(capsys):
    assert main(["check", "--only", "no-such-layer"]) == 2
    assert "unknown case" in capsys.readouterr().err


@pytest.mark.slow
def test_model_trajectories_are_in_the_report(capsys):
    assert main(["check", "--only", "vit", "--dtype", "float64", "--no-gradcheck"]) == 0
    assert "5 AdamW steps" in capsys.readouterr().out
