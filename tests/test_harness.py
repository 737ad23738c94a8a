"""The harness itself must catch planted mistakes, or every green parity test means nothing."""

from __future__ import annotations

import numpy as np

from bigmodel_jax.layers.activations import activation as jax_activation
from bigmodel_apps.parity.harness import CaseData, compare, gradcheck_case
from reference_numpy.gradcheck import gradcheck_layer
from reference_numpy.layers import activations as ract
from reference_numpy.layers.linear import init_linear, linear_backward, linear_forward


def _gelu_case(dtype, ref_approximate: bool, jax_name: str) -> CaseData:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(dtype) * 2
    return CaseData(
        params={},
        inputs={"x": x},
        ref_forward=lambda p, i: ract.gelu_forward(i["x"], approximate=ref_approximate),
        ref_backward=lambda p, c, dy: ({"x": ract.gelu_backward(c, dy)}, {}),
        jax_forward=lambda p, i: jax_activation(jax_name)(i["x"]),
    )


def test_compare_catches_the_other_gelu_variant():
    rows = compare(_gelu_case(np.float64, ref_approximate=False, jax_name="gelu_tanh"), np.float64)
    assert not rows[0].passed and rows[0].quantity == "output"
    assert rows[0].max_abs > 1e-5  # erf vs tanh GELU differ by ~1e-4..1e-3 at |x|~2


def test_compare_passes_the_matching_gelu_variant():
    rows = compare(_gelu_case(np.float64, ref_approximate=True, jax_name="gelu_tanh"), np.float64)
    assert all(r.passed for r in rows)


def test_gradcheck_catches_a_wrong_backward():
    rng = np.random.default_rng(1)
    params = init_linear(rng, 4, 3, dtype=np.float64)
    x = rng.standard_normal((2, 4))

    def bad_backward(p, cache, dy):
        dx, grads = linear_backward(p, cache, dy)
        grads["bias"] = grads["bias"] * 1.01  # a 1% error in one leaf
        return dx, grads

    report = gradcheck_layer(linear_forward, bad_backward, params, x, rng=rng)
    failing = [r.name for r in report.rows if not r.passed]
    assert failing == ["params/bias"], str(report)
    good = gradcheck_layer(linear_forward, linear_backward, params, x, rng=rng)
    assert good.ok, str(good)


def test_gradcheck_directional_mode_catches_a_wrong_backward():
    rng = np.random.default_rng(2)
    params = init_linear(rng, 16, 12, dtype=np.float64)  # 192 kernel entries -> directions
    x = rng.standard_normal((3, 16))

    def bad_backward(p, cache, dy):
        dx, grads = linear_backward(p, cache, dy)
        grads["kernel"] = grads["kernel"].T.reshape(grads["kernel"].shape)  # transposed-kernel bug
        return dx, grads

    report = gradcheck_layer(linear_forward, bad_backward, params, x, rng=rng)
    assert not report.ok
    kernel_row = next(r for r in report.rows if r.name == "params/kernel")
    assert "directions" in kernel_row.method and not kernel_row.passed


def test_gradcheck_case_reports_every_leaf():
    rng = np.random.default_rng(3)
    params = init_linear(rng, 3, 2, dtype=np.float64)
    data = CaseData(
        params=params,
        inputs={"x": rng.standard_normal((2, 3))},
        ref_forward=lambda p, i: linear_forward(p, i["x"]),
        ref_backward=lambda p, c, dy: (lambda dx, g: ({"x": dx}, g))(*linear_backward(p, c, dy)),
        jax_forward=None,  # not used by gradcheck
    )
    report = gradcheck_case(data)
    assert sorted(r.name for r in report.rows) == ["inputs/x", "params/bias", "params/kernel"]
    assert report.ok
