"""The VALUE of every gate's balance loss against its formula, computed here from scratch.

Finite differences only show that a loss and its gradient agree with each other: a loss
scaled by k in forward and backward passes them. These tests recompute Importance, Load,
CV^2 (population variance), Shazeer's P(x, i), the Switch surrogate E * sum_i f_i P_i and the
z-loss with plain numpy loops and scipy, sharing no code with moe.routing.
"""

import numpy as np
import pytest
from scipy import special, stats

from moe.layer import MoELayer
from moe.routing.gates import make_gate

pytestmark = pytest.mark.unit

E, D, B = 6, 5, 13


def cv2(v):
    v = np.asarray(v, dtype=np.float64)
    return float(np.var(v) / np.mean(v) ** 2)  # np.var divides by E: the population variance


def oracle(name, gate, x, noise_seed, train):
    """(importance, load, aux) by the paper's definitions (Shazeer 2017 eq. 6-10; Switch eq. 4).

    Which terms apply follows from the gate's NAME (only noisy_topk has noise), never from
    the object under test."""
    k, wg = gate.k, gate.params["w_gate"]
    clean = x @ wg
    noisy = name == "noisy_topk" and train
    if noisy:
        std = np.log1p(np.exp(x @ gate.params["w_noise"]))  # softplus
        h = clean + np.random.default_rng(noise_seed).standard_normal(clean.shape) * std
    else:
        h = clean
    importance, counts, load = np.zeros(E), np.zeros(E), np.zeros(E)
    for b in range(x.shape[0]):
        top = sorted(range(E), key=lambda i: (-h[b, i], i))[:k]
        if k > 1:
            g = special.softmax(h[b, top])
        else:
            g = special.softmax(h[b])[top]
        for i, gi in zip(top, g, strict=True):
            importance[i] += gi
            counts[i] += 1
        if noisy:
            for i in range(E):
                kth_excluding = sorted(np.delete(h[b], i), reverse=True)[k - 1]
                load[i] += stats.norm.cdf((clean[b, i] - kth_excluding) / std[b, i])
    aux = gate.w_importance * cv2(importance)
    if noisy:
        aux += gate.w_load * cv2(load)
    else:
        load = counts
        if name != "noisy_topk":  # the Switch surrogate, for the gates without noise
            f = counts / counts.sum()  # fraction of the B*k assignments
            p = special.softmax(clean, axis=1).mean(axis=0)  # mean router probability
            aux += gate.w_load * E * float(np.dot(f, p))
    lse = special.logsumexp(clean, axis=1)
    aux += gate.w_z * float(np.mean(lse**2))
    return importance, load, aux


CASES = [("noisy_topk", 2), ("noisy_topk", 1), ("noisy_topk", 3), ("softmax_topk", 2),
         ("softmax_topk", 1), ("softmax_topk", 3), ("top1", 1)]
WEIGHTS = [(0.7, 0.0, 0.0), (0.0, 0.7, 0.0), (0.0, 0.0, 0.3), (0.4, 0.3, 0.2)]


def _gate(name, k, w, seed=0):
    rng = np.random.default_rng(seed)
    gate = make_gate(name, D, E, k, w_importance=w[0], w_load=w[1], w_z=w[2], rng=rng, dtype=np.float64)
    for p in gate.params.values():
        p[...] = rng.normal(size=p.shape) * 0.7
    return gate, rng.normal(size=(B, D))


@pytest.mark.parametrize("name,k", CASES)
@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("train", [True, False])
def test_aux_loss_importance_and_load_equal_the_formulas(name, k, w, train):
    gate, x = _gate(name, k, w)
    out = gate.forward(x, train=train, rng=np.random.default_rng(7))
    importance, load, aux = oracle(name, gate, x, 7, train)
    np.testing.assert_allclose(out.importance, importance, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.load, load, rtol=1e-10, atol=1e-12)
    assert out.aux_loss == pytest.approx(aux, rel=1e-10, abs=1e-14)
    # the comparison is not against zero, except for the one case that is zero by design:
    # without noise (eval) the noisy gate has no smooth load, and no Switch term stands in
    no_term = name == "noisy_topk" and not train and w[0] == w[2] == 0
    assert (aux == 0) == no_term, aux


def test_switch_term_is_k_times_smaller_than_a_count_over_batch_would_give():
    """f_i divides by the B*k assignments, not by B: with k = 3 the two differ by 3x."""
    gate, x = _gate("softmax_topk", 3, (0.0, 1.0, 0.0))
    out = gate.forward(x, train=True, rng=None)
    counts = np.bincount(out.expert_index.ravel(), minlength=E)
    p = special.softmax(x @ gate.params["w_gate"], axis=1).mean(axis=0)
    assert out.aux_loss == pytest.approx(E * np.dot(counts / (B * 3), p), rel=1e-12)
    assert out.aux_loss != pytest.approx(E * np.dot(counts / B, p), rel=1e-3)


def test_switch_loss_of_a_uniform_router_is_one_whatever_the_counts():
    """Zero router weights: P_i = 1/E, so E * sum_i f_i P_i = sum_i f_i = 1 even when every
    row goes to one expert (the surrogate only pushes through P, never through f)."""
    gate = make_gate("top1", D, E, 1, w_importance=0.0, w_load=1.0, rng=np.random.default_rng(0), dtype=np.float64)
    gate.params["w_gate"][...] = 0
    out = gate.forward(np.random.default_rng(1).normal(size=(E, D)), train=True, rng=None)
    assert np.all(out.expert_index[:, 0] == 0)  # ties go to expert 0: maximal imbalance
    assert out.aux_loss == pytest.approx(1.0, rel=1e-12)  # f = (1, 0, ...), P = 1/E


@pytest.mark.parametrize("gate_name,k", [("noisy_topk", 2), ("softmax_topk", 2), ("top1", 1)])
def test_the_layer_reports_its_gate_s_aux_loss(gate_name, k):
    rng = np.random.default_rng(3)
    layer = MoELayer(D, E, 4, k=k, gate=gate_name, capacity_factor=0.5, w_importance=0.3, w_load=0.2,
                     w_z=0.1, rng=rng, dtype=np.float64)
    for n in layer.gate_param_names:
        layer.params[n][...] = rng.normal(size=layer.params[n].shape) * 0.7
    x = rng.normal(size=(B, D))
    _, routing = layer.forward(x, rng=np.random.default_rng(5))
    assert routing.dropped > 0  # the balance losses are computed before the capacity mask
    gate, _ = _gate(gate_name, k, (0.3, 0.2, 0.1))
    for n, p in gate.params.items():
        p[...] = layer.params[f"gate.{n}"]
    _, load, aux = oracle(gate_name, gate, x, 5, True)
    np.testing.assert_allclose(routing.load, load, rtol=1e-10, atol=1e-12)
    assert routing.aux_loss == pytest.approx(aux, rel=1e-10)
