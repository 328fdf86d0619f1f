"""MoELayer against the dense oracle (every expert on every example), plus its gradients,
capacity semantics, dtypes and input errors."""

import math

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad
from scipy import special

from moe.layer import MoELayer

pytestmark = pytest.mark.unit


def dense_oracle(layer: MoELayer, x: np.ndarray, noise_seed: int, train: bool = True):
    """Route independently (full sort, explicit capacity loop) and run every expert on every example."""
    B, E, k = x.shape[0], layer.n_experts, layer.k
    gp = {n[5:]: p for n, p in layer.params.items() if n.startswith("gate.")}
    clean = x @ gp["w_gate"]
    if "w_noise" in gp and train:
        std = np.logaddexp(0, x @ gp["w_noise"])
        h = clean + np.random.default_rng(noise_seed).standard_normal((B, E), dtype=x.dtype) * std
    else:
        h = clean
    idx = np.argsort(-h, axis=1, kind="stable")[:, :k]
    if k > 1:
        top = np.take_along_axis(h, idx, axis=1)
        gates = special.softmax(top, axis=1)
    else:
        gates = np.take_along_axis(special.softmax(h, axis=1), idx, axis=1)
    keep = np.ones((B, k), dtype=bool)
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * B * k / E)
        used = np.zeros(E, dtype=int)
        for j in range(k):  # first choices before second choices, then example order
            for b in range(B):
                e = idx[b, j]
                keep[b, j] = used[e] < cap
                used[e] += keep[b, j]
    mask = np.zeros((B, E))
    for b in range(B):
        for j in range(k):
            if keep[b, j]:
                mask[b, idx[b, j]] = gates[b, j]
    ep = {n[8:]: p for n, p in layer.params.items() if n.startswith("experts.")}
    y = np.zeros_like(x)
    for e in range(E):  # every expert on every example
        out = np.maximum(x @ ep["w1"][e] + ep["b1"][e], 0) @ ep["w2"][e] + ep["b2"][e]
        y += mask[:, e : e + 1] * out
    return y, idx, keep


def _layer(gate="noisy_topk", k=2, E=6, cf=None, dtype=np.float64, seed=0, **kw):
    rng = np.random.default_rng(seed)
    layer = MoELayer(5, E, 7, k=k, gate=gate, capacity_factor=cf, rng=rng, dtype=dtype, **kw)
    for n in layer.gate_param_names:
        layer.params[n][...] = rng.normal(size=layer.params[n].shape) * 0.6
    return layer, rng


@pytest.mark.parametrize("gate,k", [("noisy_topk", 2), ("noisy_topk", 1), ("softmax_topk", 3), ("top1", 1)])
@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 1.25])
def test_layer_equals_dense_oracle(gate, k, cf):
    layer, rng = _layer(gate, k, cf=cf)
    x = rng.normal(size=(23, 5))
    y, routing = layer.forward(x, rng=np.random.default_rng(9))
    y_ref, idx, keep = dense_oracle(layer, x, 9)
    np.testing.assert_array_equal(routing.expert_index, idx)
    np.testing.assert_array_equal(routing.gates > 0, keep)
    assert routing.dropped == int((~keep).sum())
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    if cf is not None and cf < 1:
        assert routing.dropped > 0, "this case must exercise drops"


def test_eval_mode_has_no_noise_and_hard_load():
    layer, rng = _layer("noisy_topk", 2)
    x = rng.normal(size=(15, 5))
    y1, r1 = layer.forward(x, train=False, rng=np.random.default_rng(1))
    y2, r2 = layer.forward(x, train=False, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(y1, y2)
    y_ref, _, _ = dense_oracle(layer, x, 0, train=False)
    np.testing.assert_allclose(y1, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(r1.load, np.bincount(r1.expert_index.ravel(), minlength=6))
    _, r_train = layer.forward(x, train=True, rng=np.random.default_rng(1))
    assert not np.allclose(r_train.load, np.round(r_train.load)), "training load is the smooth estimate"


@pytest.mark.parametrize("gate,k", [("noisy_topk", 2), ("noisy_topk", 1), ("softmax_topk", 2), ("top1", 1)])
@pytest.mark.parametrize("cf", [None, 0.75])
def test_layer_gradients_match_finite_differences(gate, k, cf):
    layer, rng = _layer(gate, k, E=5, cf=cf, w_importance=0.3, w_load=0.2, w_z=0.05, d_gate_extra=3)
    x, te = rng.normal(size=(9, 5)), rng.normal(size=(9, 3))
    up = rng.normal(size=(9, 5))

    def loss():
        y, r = layer.forward(x, te, rng=np.random.default_rng(4))
        return float(np.sum(y * up) + r.aux_loss)

    loss()
    dx = layer.backward(up.copy())
    d_te = layer.grad_task_emb.copy()
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert_close(dx, numerical_grad(loss, x), name="dx")
    assert_close(d_te, numerical_grad(loss, te), name="task_emb")
    for n, p in layer.params.items():
        assert_close(grads[n], numerical_grad(loss, p), name=n)


def test_gelu_experts_gradients():
    layer, rng = _layer("softmax_topk", 2, E=4, activation="gelu")
    x, up = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))

    def loss():
        y, r = layer.forward(x, rng=np.random.default_rng(0))
        return float(np.sum(y * up) + r.aux_loss)

    loss()
    dx = layer.backward(up.copy())
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert_close(dx, numerical_grad(loss, x), name="dx")
    for n in ("experts.w1", "experts.b1", "experts.w2"):
        assert_close(grads[n], numerical_grad(loss, layer.params[n]), name=n)


def test_expert_grads_are_exact_after_a_step_with_other_experts():
    """Weight grads are cleared lazily: an expert idle this step must show zero grad."""
    layer, rng = _layer("softmax_topk", 1, E=6)
    x = rng.normal(size=(8, 5))
    y, r_many = layer.forward(x)
    layer.backward(np.ones_like(y))
    y1, r_one = layer.forward(x[:1])
    layer.backward(np.ones_like(y1))
    busy_before = set(np.flatnonzero(r_many.counts))
    busy_now = set(np.flatnonzero(r_one.counts))
    assert busy_before - busy_now, "the first step must have used experts the second does not"
    for e in range(6):
        assert layer.grads["experts.w1"][e].any() == (e in busy_now)


# ----------------------------------------------------------------------------- capacity semantics
def test_capacity_formula_and_counts():
    layer, rng = _layer("noisy_topk", 2, E=4, cf=1.0)
    x = rng.normal(size=(10, 5))
    _, r = layer.forward(x, rng=np.random.default_rng(0))
    cap = math.ceil(1.0 * 10 * 2 / 4)
    assert r.counts.max() <= cap
    assigned = np.bincount(r.expert_index.ravel(), minlength=4)
    np.testing.assert_array_equal(r.counts, np.minimum(assigned, cap))
    assert r.dropped == int(assigned.sum() - r.counts.sum())
    assert r.counts.dtype == np.int32


def test_balance_losses_use_gates_before_the_capacity_mask():
    a, rng = _layer("noisy_topk", 2, E=4, cf=None, seed=3)
    b, _ = _layer("noisy_topk", 2, E=4, cf=0.3, seed=3)
    x = rng.normal(size=(12, 5))
    _, ra = a.forward(x, rng=np.random.default_rng(5))
    _, rb = b.forward(x, rng=np.random.default_rng(5))
    assert rb.dropped > 0
    np.testing.assert_array_equal(ra.importance, rb.importance)
    np.testing.assert_array_equal(ra.load, rb.load)
    assert ra.aux_loss == rb.aux_loss
    assert not np.array_equal(ra.gates, rb.gates)


def test_first_choices_win_capacity():
    layer, _ = _layer("softmax_topk", 2, E=2, cf=0.5)  # C = ceil(0.5 * B * 2 / 2) = ceil(B / 2)
    layer.params["gate.w_gate"][...] = 0
    layer.params["gate.w_gate"][0, 0] = 1.0  # positive x0 prefers expert 0, negative prefers 1
    x = np.zeros((4, 5))
    x[:, 0] = [1.0, 1.0, -1.0, -1.0]
    _, r = layer.forward(x)
    # each expert has 2 slots; all first choices fit, every second choice is dropped
    assert (r.gates[:, 0] > 0).all() and (r.gates[:, 1] == 0).all()
    assert r.dropped == 4


@pytest.mark.parametrize(
    "B,E,k", [(1, 5, 2), (3, 64, 2), (6, 4, 4), (5, 1, 1), (2, 3, 3)]
)
def test_edge_shapes_match_the_oracle(B, E, k):
    layer, rng = _layer("noisy_topk", k, E=E, cf=None)
    x = rng.normal(size=(B, 5))
    y, r = layer.forward(x, rng=np.random.default_rng(2))
    np.testing.assert_allclose(y, dense_oracle(layer, x, 2)[0], rtol=1e-12, atol=1e-12)
    assert r.counts.sum() == B * k
    if E > B * k:
        assert (r.counts == 0).any(), "some experts must be empty here"
    if k == E:
        np.testing.assert_allclose(r.load, np.full(E, float(B)))
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape and np.isfinite(dx).all()


# ----------------------------------------------------------------------------- dtypes and errors
@pytest.mark.parametrize("gate,k", [("noisy_topk", 2), ("softmax_topk", 2), ("top1", 1)])
def test_float32_in_float32_out(gate, k):
    layer = MoELayer(8, 6, 16, k=k, gate=gate, capacity_factor=1.0, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((32, 8), dtype=np.float32)
    y, r = layer.forward(x)
    assert y.dtype == np.float32 and r.gates.dtype == np.float32
    assert r.importance.dtype == np.float32 and r.load.dtype == np.float32
    assert r.expert_index.dtype == np.int32 and r.counts.dtype == np.int32
    dx = layer.backward(np.ones_like(y))
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())


def test_same_seed_same_bits():
    outs = []
    for _ in range(2):
        layer = MoELayer(8, 6, 16, rng=np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal((32, 8), dtype=np.float32)
        y, _ = layer.forward(x, rng=np.random.default_rng(5))
        outs.append((y, layer.backward(y)))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_experts=4, k=5), "k must be in"),
        (dict(n_experts=0, k=1), "n_experts must be >= 1"),
        (dict(n_experts=4, k=2, capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(n_experts=4, k=2, capacity_factor=-1.0), "capacity_factor must be > 0"),
        (dict(n_experts=4, k=2, gate="bogus"), "gate must be one of"),
        (dict(n_experts=4, k=2, gate="top1"), "top1"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(8, d_hidden=4, rng=np.random.default_rng(0), **kwargs)


def test_bad_inputs_name_expected_and_received():
    layer = MoELayer(8, 4, 4, rng=np.random.default_rng(0))
    good = np.zeros((3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"2-D .* got shape \[8\]"):
        layer.forward(good[0])
    with pytest.raises(ValueError, match="width 8, got 7"):
        layer.forward(good[:, :7])
    with pytest.raises(ValueError, match="float32, got float64"):
        layer.forward(good.astype(np.float64))
    for bad in (np.nan, np.inf):
        x = good.copy()
        x[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer.forward(x)
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.backward(good)
    with pytest.raises(ValueError, match="d_gate_extra=0"):
        layer.forward(good, task_emb=good)
    y, _ = layer.forward(good)
    with pytest.raises(ValueError, match=r"dy must be float32 \[3, 8\]"):
        layer.backward(y[:2])
