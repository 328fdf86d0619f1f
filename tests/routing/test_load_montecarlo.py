"""Monte Carlo oracle for Shazeer's smooth load estimator P(x, i).

P(x, i) must equal the probability that expert i lands in the top k when only its own noise
is redrawn, the other experts' noise held at the sampled values.
"""

import numpy as np
import pytest

from moe.routing.gates import NoisyTopKGate, softplus

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_matches_monte_carlo(k, gate_backend):
    E, d, draws = 7, 5, 20_000
    rng = np.random.default_rng(100 + k)
    worst = 0.0
    for trial in range(4):
        gate = NoisyTopKGate(d, E, k, w_importance=0.0, w_load=0.0, rng=rng, dtype=np.float64)
        gate.params["w_gate"][...] = rng.normal(size=(d, E)) * 0.5
        gate.params["w_noise"][...] = rng.normal(size=(d, E)) * 0.5
        x = rng.normal(size=(1, d))
        seed = 1000 + trial
        p_layer = gate.forward(x, train=True, rng=np.random.default_rng(seed)).load  # B = 1: load = P(x, .)

        clean = (x @ gate.params["w_gate"])[0]
        std = softplus(x @ gate.params["w_noise"])[0]
        eps = np.random.default_rng(seed).standard_normal((1, E))[0]  # the noise the gate drew
        h = clean + eps * std
        mc_rng = np.random.default_rng(seed + 7)
        for i in range(E):
            others = np.delete(h, i)
            kth = np.sort(others)[::-1][k - 1]  # k-th largest with i left out
            redrawn = clean[i] + mc_rng.standard_normal(draws) * std[i]
            freq = np.mean(redrawn > kth)
            worst = max(worst, abs(freq - p_layer[i]))
            assert abs(freq - p_layer[i]) <= 0.02, (trial, i, freq, p_layer[i])
    assert worst > 0  # the comparison really ran against sampled values


def test_a_load_below_float32_range_is_zero_not_an_error(gate_backend):
    # expert 0's clean logit sits ~30 noise stds under the others: P(x, 0) = Phi(-30) ~ 1e-198
    # in double, summed in float64 and cast to float32 (np.seterr(all="raise") in tests)
    E, d = 6, 3
    gate = NoisyTopKGate(d, E, 2, rng=np.random.default_rng(0), dtype=np.float32)
    gate.params["w_gate"][...] = 0.0
    gate.params["w_gate"][0, 0] = -20.0  # std = softplus(0) = ln 2
    x = np.zeros((8, d), dtype=np.float32)
    x[:, 0] = 1.0
    out = gate.forward(x, train=True, rng=np.random.default_rng(1))
    assert out.load.dtype == np.float32 and out.load[0] == 0.0 and (out.load[1:] > 0).all()
    assert np.isfinite(out.aux_loss)
    gate.backward(np.ones((8, 2), dtype=np.float32))
    assert all(np.isfinite(g).all() for g in gate.grads.values())
