"""Finite-difference checks (float64) for every gate, each balance loss alone, and z-loss, on
the numpy path and on the compiled kernels (the `gate_backend` fixture).

Noise is held fixed by giving every forward the same seeded generator.
"""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.routing.gates import make_gate

pytestmark = pytest.mark.unit

CASES = [
    ("noisy_topk", 2), ("noisy_topk", 1), ("noisy_topk", 3), ("noisy_topk", 6),
    ("softmax_topk", 2), ("softmax_topk", 1), ("top1", 1),
]
WEIGHTS = [  # (w_importance, w_load, w_z): each loss alone, then all together
    (0.0, 0.0, 0.0), (0.7, 0.0, 0.0), (0.0, 0.7, 0.0), (0.0, 0.0, 0.3), (0.4, 0.3, 0.2),
]


def _gate(name, k, w, seed=0, E=6, d=5):
    rng = np.random.default_rng(seed)
    gate = make_gate(name, d, E, k, w_importance=w[0], w_load=w[1], w_z=w[2], rng=rng, dtype=np.float64)
    for p in gate.params.values():  # W starts at zero for noisy gating; move off the tie point
        p[...] = rng.normal(size=p.shape) * 0.7
    x = rng.normal(size=(11, d))
    upstream = rng.normal(size=(11, k))
    return gate, x, upstream


@pytest.mark.parametrize("name,k", CASES)
@pytest.mark.parametrize("w", WEIGHTS)
def test_gate_backward_matches_finite_differences(name, k, w, gate_backend):
    gate, x, up = _gate(name, k, w)
    _check_gradients(gate, x, up)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scale", [0.4, 2.5])
def test_noise_scale_gradients_match_finite_differences(k, scale, gate_backend):
    """H = clean + s * eps * softplus(raw), and P(x, i) over the std s * softplus(raw)."""
    gate, x, up = _gate("noisy_topk", k, (0.4, 0.7, 0.2))
    gate.noise_scale = scale
    _check_gradients(gate, x, up)


def _check_gradients(gate, x, up):

    def loss():
        out = gate.forward(x, train=True, rng=np.random.default_rng(3))
        return float(np.sum(out.gates * up) + out.aux_loss)

    loss()
    dx = gate.backward(up.copy())
    analytic = {n: g.copy() for n, g in gate.grads.items()}
    assert_close(dx, numerical_grad(loss, x), name="dx")
    for n, p in gate.params.items():
        assert_close(analytic[n], numerical_grad(loss, p), name=n)


def test_noise_scale_scales_the_noise():
    gate, x, _ = _gate("noisy_topk", 2, (0.4, 0.3, 0.0))
    a = gate.forward(x, train=True, rng=np.random.default_rng(3))
    gate.noise_scale = 0.0
    quiet = gate.forward(x, train=True, rng=np.random.default_rng(3))
    clean = gate.forward(x, train=False, rng=None)
    np.testing.assert_array_equal(quiet.expert_index, clean.expert_index)
    assert not np.array_equal(a.expert_index, clean.expert_index)


def test_routing_is_piecewise_constant_so_the_check_is_not_trivial():
    gate, x, up = _gate("noisy_topk", 2, (0.4, 0.3, 0.0))
    a = gate.forward(x, train=True, rng=np.random.default_rng(3))
    b = gate.forward(x, train=True, rng=np.random.default_rng(4))
    assert not np.array_equal(a.expert_index, b.expert_index), "the noise must change routing"
    assert a.aux_loss > 0


def test_k1_gate_value_has_a_gradient(gate_backend):
    """A softmax over one kept logit is 1 with zero gradient; our k=1 gate must not be."""
    for name in ("noisy_topk", "softmax_topk", "top1"):
        gate, x, up = _gate(name, 1, (0.0, 0.0, 0.0))
        out = gate.forward(x, train=True, rng=np.random.default_rng(3))
        assert np.all(out.gates < 1.0) and np.all(out.gates > 0.0)
        gate.backward(np.ones_like(out.gates))
        assert np.abs(gate.grads["w_gate"]).max() > 1e-3
