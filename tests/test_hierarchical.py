"""HierarchicalMoELayer against an independent dense oracle (every group's gate and every expert
on every example), brute-force balance statistics, finite differences, router cost, dtypes and
input errors. The routing tests run on the numpy gates and on the compiled ones (`gate_backend`)."""

import math

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad
from scipy import special

from moe.experts.local import LocalExperts
from moe.hierarchical import HierarchicalMoELayer

pytestmark = pytest.mark.unit


def _layer(a=3, b=4, kp=2, ks=2, cf=None, d=4, h=5, dtype=np.float64, seed=0, **kw):
    rng = np.random.default_rng(seed)
    layer = HierarchicalMoELayer(d, a, b, h, kp, ks, cf, rng=rng, dtype=dtype, **kw)
    for n in layer.gate_param_names:  # W starts at zero; move off the tie point
        layer.params[n][...] = rng.normal(size=layer.params[n].shape) * 0.6
    return layer, rng


def _kth_excluding(h, k, i):
    """k-th largest of the row h with element i left out, by a plain sort."""
    return np.sort(np.delete(h, i))[::-1][k - 1]


def _top_gates(h, k):
    """Full [n] gate vector: softmax over the kept k (k > 1) or full-softmax prob (k = 1)."""
    idx = np.argsort(-h, kind="stable")[:k]
    g = np.zeros_like(h)
    g[idx] = special.softmax(h[idx]) if k > 1 else special.softmax(h)[idx]
    return g, idx


def _smooth_load_row(clean, h, std, k):
    """P(x, i) for one row by the definition; 1 when every entry is always chosen."""
    n = h.shape[0]
    if k >= n:
        return np.ones(n)
    thr = np.array([_kth_excluding(h, k, i) for i in range(n)])
    return special.ndtr((clean - thr) / std)


def oracle(layer, xg, noise_seed, train=True):
    """Route the two levels from scratch, evaluating every group's gate on every example.

    Noise replays the documented order: standard_normal((B, a)), then standard_normal((B*kp, b))
    whose row x*kp + r belongs to example x and its r-th chosen group.
    """
    B = xg.shape[0]
    a, b, kp, ks = layer.n_groups, layer.experts_per_group, layer.k_primary, layer.k_secondary
    p = layer.params
    clean_p = xg @ p["primary.w_gate"]
    std_p = np.logaddexp(0, xg @ p["primary.w_noise"])
    if train:
        g = np.random.default_rng(noise_seed)
        eps_p = g.standard_normal((B, a), dtype=xg.dtype)
        eps_s = g.standard_normal((B * kp, b), dtype=xg.dtype)
        h_p = clean_p + eps_p * std_p
    else:
        h_p = clean_p
    Gp = np.zeros((B, a))
    idx_p = np.zeros((B, kp), dtype=int)
    for x in range(B):
        Gp[x], idx_p[x] = _top_gates(h_p[x], kp)
    eps_full = np.zeros((B, a, b))
    if train:
        for x in range(B):
            for r in range(kp):
                eps_full[x, idx_p[x, r]] = eps_s[x * kp + r]
    Gs = np.zeros((B, a, b))
    idx_s = np.zeros((B, a, ks), dtype=int)
    clean_s = np.stack([xg @ p["secondary.w_gate"][i] for i in range(a)], axis=1)  # [B, a, b]
    std_s = np.logaddexp(0, np.stack([xg @ p["secondary.w_noise"][i] for i in range(a)], axis=1))
    h_s = clean_s + eps_full * std_s if train else clean_s
    for x in range(B):
        for i in range(a):
            Gs[x, i], idx_s[x, i] = _top_gates(h_s[x, i], ks)
    expert_index = np.array(
        [[idx_p[x, r] * b + idx_s[x, idx_p[x, r], s] for r in range(kp) for s in range(ks)] for x in range(B)]
    )
    return dict(Gp=Gp, Gs=Gs, idx_p=idx_p, expert_index=expert_index, clean_p=clean_p, h_p=h_p,
                std_p=std_p, clean_s=clean_s, h_s=h_s, std_s=std_s)


def dense_output(layer, x, o):
    """Every expert on every example, masked by G_primary * G_secondary and the capacity loop."""
    B, E, k, b = x.shape[0], layer.n_experts, layer.k, layer.experts_per_group
    idx = o["expert_index"]
    keep = np.ones((B, k), dtype=bool)
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * B * k / E)
        used = np.zeros(E, dtype=int)
        for j in range(k):  # column 0 of every example first, then column 1, ...
            for x_ in range(B):
                e = idx[x_, j]
                keep[x_, j] = used[e] < cap
                used[e] += keep[x_, j]
    mask = np.zeros((B, E))
    gates = np.zeros((B, k))
    for x_ in range(B):
        for j in range(k):
            i, jj = divmod(idx[x_, j], b)
            gates[x_, j] = o["Gp"][x_, i] * o["Gs"][x_, i, jj]
            if keep[x_, j]:
                mask[x_, idx[x_, j]] = gates[x_, j]
    ep = {n[8:]: q for n, q in layer.params.items() if n.startswith("experts.")}
    y = np.zeros_like(x)
    for e in range(E):
        out = np.maximum(x @ ep["w1"][e] + ep["b1"][e], 0) @ ep["w2"][e] + ep["b2"][e]
        y += mask[:, e : e + 1] * out
    return y, gates * keep, keep


def brute_balance(layer, o, train=True):
    """Importance_H and Load_H straight from the appendix-B definitions ([a*b] each)."""
    a, b, kp, ks = layer.n_groups, layer.experts_per_group, layer.k_primary, layer.k_secondary
    B = o["Gp"].shape[0]
    importance = np.einsum("xi,xij->ij", o["Gp"], o["Gs"])
    chosen = np.zeros((B, a), dtype=bool)
    for x in range(B):
        chosen[x, o["idx_p"][x]] = True
    if not train:
        counts = np.bincount(o["expert_index"].ravel(), minlength=a * b)
        return importance.ravel(), counts.astype(float)
    load_p = sum(_smooth_load_row(o["clean_p"][x], o["h_p"][x], o["std_p"][x], kp) for x in range(B))
    load = np.zeros((a, b))
    for i in range(a):
        members = np.flatnonzero(chosen[:, i])  # X^(i)
        if members.size == 0:
            continue  # 0/0 := 0
        load_i = sum(
            _smooth_load_row(o["clean_s"][x, i], o["h_s"][x, i], o["std_s"][x, i], ks) for x in members
        )
        load[i] = load_p[i] * load_i / members.size
    return importance.ravel(), load.ravel()


def _cv2(v):
    return np.var(v) / np.mean(v) ** 2 if np.mean(v) != 0 else 0.0


# ----------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("kp,ks", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 4)])
@pytest.mark.parametrize("cf", [None, 0.5, 1.25])
def test_layer_equals_dense_oracle(kp, ks, cf, gate_backend):
    layer, rng = _layer(a=3, b=4, kp=kp, ks=ks, cf=cf)
    x = rng.normal(size=(17, 4))
    y, r = layer.forward(x, rng=np.random.default_rng(9))
    o = oracle(layer, x, 9)
    y_ref, gates_ref, keep = dense_output(layer, x, o)
    np.testing.assert_array_equal(r.expert_index, o["expert_index"])
    np.testing.assert_allclose(r.gates, gates_ref, rtol=1e-12, atol=1e-14)
    assert r.dropped == int((~keep).sum())
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert r.n_experts == 12 and r.k == kp * ks
    if cf == 0.5:
        assert r.dropped > 0, "this case must exercise drops"


@pytest.mark.parametrize("kp,ks,a,B", [(2, 2, 3, 17), (1, 2, 4, 9), (2, 1, 3, 13), (1, 1, 7, 3), (3, 4, 3, 5)])
def test_balance_statistics_match_definitions(kp, ks, a, B, gate_backend):
    layer, rng = _layer(a=a, b=4, kp=kp, ks=ks, w_importance=0.3, w_load=0.2)
    x = rng.normal(size=(B, 4))
    _, r = layer.forward(x, rng=np.random.default_rng(3))
    o = oracle(layer, x, 3)
    imp, load = brute_balance(layer, o)
    np.testing.assert_allclose(r.importance, imp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.load, load, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.aux_loss, 0.3 * _cv2(imp) + 0.2 * _cv2(load), rtol=1e-10)
    if a > B * kp:
        assert (load.reshape(a, 4) == 0).all(axis=1).any(), "this case must have an empty group"


def test_eval_mode_has_no_noise_and_hard_load(gate_backend):
    layer, rng = _layer(a=3, b=4, kp=2, ks=2, w_importance=0.3, w_load=0.2)
    x = rng.normal(size=(15, 4))
    y1, r1 = layer.forward(x, train=False, rng=np.random.default_rng(1))
    y2, _ = layer.forward(x, train=False, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(y1, y2)
    o = oracle(layer, x, 0, train=False)
    np.testing.assert_allclose(y1, dense_output(layer, x, o)[0], rtol=1e-12, atol=1e-12)
    imp, counts = brute_balance(layer, o, train=False)
    np.testing.assert_array_equal(r1.load, counts)
    np.testing.assert_allclose(r1.importance, imp, rtol=1e-12)
    np.testing.assert_allclose(r1.aux_loss, 0.3 * _cv2(imp), rtol=1e-10)  # no load term in eval
    _, r_train = layer.forward(x, train=True, rng=np.random.default_rng(1))
    assert not np.allclose(r_train.load, np.round(r_train.load)), "training load is the smooth estimate"


def test_noise_comes_from_the_passed_rng():
    layer, rng = _layer()
    x = rng.normal(size=(12, 4))
    a1, ra = layer.forward(x, rng=np.random.default_rng(5))
    a2, _ = layer.forward(x, rng=np.random.default_rng(5))
    _, rb = layer.forward(x, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(ra.expert_index, rb.expert_index)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kp,ks", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("cf", [None, 0.6])
def test_gradients_match_finite_differences(kp, ks, cf, gate_backend):
    layer, rng = _layer(a=3, b=3, kp=kp, ks=ks, cf=cf, w_importance=0.3, w_load=0.2, d_gate_extra=2)
    x, te = rng.normal(size=(9, 4)), rng.normal(size=(9, 2))
    up = rng.normal(size=(9, 4))

    def loss():
        y, r = layer.forward(x, te, rng=np.random.default_rng(4))
        return float(np.sum(y * up) + r.aux_loss)

    loss()
    _, r = layer.forward(x, te, rng=np.random.default_rng(4))
    if cf is not None:
        assert r.dropped > 0, "the capacity case must drop something"
    dx = layer.backward(up.copy())
    d_te = layer.grad_task_emb.copy()
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert_close(dx, numerical_grad(loss, x), name="dx")
    assert_close(d_te, numerical_grad(loss, te), name="task_emb")
    for n, p in layer.params.items():
        if n.startswith("experts."):
            picks = rng.choice(p.size, size=min(25, p.size), replace=False)  # the larger expert tensors
            assert_close(grads[n].reshape(-1)[picks], numerical_grad(loss, p, at=picks), name=n)
        else:
            assert grads[n].any(), f"{n} must receive a gradient here"
            assert_close(grads[n], numerical_grad(loss, p), name=n)


def test_balance_loss_gradient_alone_with_an_empty_group(gate_backend):
    """Only the aux loss (no main loss), with an empty group whose Load_H row is 0/0 := 0."""
    layer, rng = _layer(a=5, b=3, kp=1, ks=2, w_importance=0.4, w_load=0.7)
    x = rng.normal(size=(4, 4))

    def loss():
        return layer.forward(x, rng=np.random.default_rng(8))[1].aux_loss

    _, r = layer.forward(x, rng=np.random.default_rng(8))
    assert (r.load.reshape(5, 3) == 0).all(axis=1).any()
    layer.backward(np.zeros_like(x))
    for n in layer.gate_param_names:
        assert_close(layer.grads[n].copy(), numerical_grad(loss, layer.params[n]), name=n)


def test_idle_groups_get_zero_secondary_gradient(gate_backend):
    """Secondary grads are cleared lazily: a group idle this step must show zero grad."""
    layer, rng = _layer(a=6, b=3, kp=1, ks=1)
    x = rng.normal(size=(20, 4))
    y, r_many = layer.forward(x, rng=np.random.default_rng(0))
    layer.backward(np.ones_like(y))
    y1, r_one = layer.forward(x[:1], rng=np.random.default_rng(0))
    layer.backward(np.ones_like(y1))
    before = set(r_many.expert_index[:, 0] // 3)
    now = set(r_one.expert_index[:, 0] // 3)
    assert before - now, "the first step must use groups the second does not"
    for i in range(6):
        assert layer.grads["secondary.w_gate"][i].any() == (i in now)
        assert layer.grads["secondary.w_noise"][i].any() == (i in now)


# ----------------------------------------------------------------------------- cost and scale
@pytest.mark.parametrize("kp", [1, 2])
def test_secondary_gate_work_scales_with_k_primary_not_groups(kp):
    rows = {}
    for a in (4, 32):
        layer = HierarchicalMoELayer(8, a, 8, 4, kp, 2, rng=np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal((64, 8), dtype=np.float32)
        layer.forward(x)
        rows[a] = layer.secondary_gate_rows
    # every row is multiplied by one group's [d_in, b] weights, so the work is rows * d_in * b
    assert rows == {4: 64 * kp, 32: 64 * kp}


def test_smoke_4096_experts():
    layer = HierarchicalMoELayer(16, 64, 64, 8, 1, 2, capacity_factor=1.0, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((512, 16), dtype=np.float32)
    y, r = layer.forward(x, rng=np.random.default_rng(2))
    assert y.shape == (512, 16) and np.isfinite(y).all()
    assert r.n_experts == 4096 and r.expert_index.shape == (512, 2)
    assert (r.expert_index[:, 0] // 64 == r.expert_index[:, 1] // 64).all(), "kp=1: one group per example"
    assert layer.secondary_gate_rows == 512
    assert r.counts.sum() + r.dropped == 1024
    dx = layer.backward(np.ones_like(y))
    assert np.isfinite(dx).all() and layer.grads["secondary.w_gate"].any()
    layer.experts.apply_update(1e-3)


# ----------------------------------------------------------------------------- dtypes and errors
@pytest.mark.parametrize("kp,ks", [(1, 1), (2, 2)])
def test_float32_in_float32_out(kp, ks):
    layer = HierarchicalMoELayer(8, 4, 3, 16, kp, ks, 1.0, rng=np.random.default_rng(0), d_gate_extra=2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 8), dtype=np.float32)
    te = rng.standard_normal((32, 2), dtype=np.float32)
    y, r = layer.forward(x, te)
    assert y.dtype == np.float32 and r.gates.dtype == np.float32
    assert r.importance.dtype == np.float32 and r.load.dtype == np.float32
    assert r.expert_index.dtype == np.int32 and r.counts.dtype == np.int32
    dx = layer.backward(np.ones_like(y))
    assert dx.dtype == np.float32 and layer.grad_task_emb.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert set(layer.grads) == set(layer.params)
    assert layer.params["secondary.w_gate"].shape == (4, 10, 3)


def test_same_seed_same_bits():
    outs = []
    for _ in range(2):
        layer = HierarchicalMoELayer(8, 4, 4, 16, rng=np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal((32, 8), dtype=np.float32)
        y, _ = layer.forward(x, rng=np.random.default_rng(5))
        outs.append((y, layer.backward(y)))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_groups=2, experts_per_group=4, k_primary=3), "k_primary must be in"),
        (dict(n_groups=2, experts_per_group=4, k_secondary=5), "k_secondary must be in"),
        (dict(n_groups=0, experts_per_group=4), "n_groups and experts_per_group must be >= 1"),
        (dict(n_groups=2, experts_per_group=2, capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(n_groups=2, experts_per_group=2, w_load=-1.0), "w_load must be"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalMoELayer(8, d_hidden=4, rng=np.random.default_rng(0), **kwargs)


def test_mismatched_expert_group_is_refused():
    bank = LocalExperts(6, 8, 4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="layer expects 8 of width 8"):
        HierarchicalMoELayer(8, 2, 4, 4, experts=bank, rng=np.random.default_rng(0))
    layer = HierarchicalMoELayer(8, 2, 3, 4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="6 experts of width 7, layer expects 6 of width 8"):
        layer.set_experts(LocalExperts(6, 7, 4, rng=np.random.default_rng(0)))


def test_set_experts_swaps_the_bank():
    layer, rng = _layer(a=3, b=4)
    x = rng.normal(size=(10, 4))
    bank = LocalExperts(12, 4, 5, rng=np.random.default_rng(7), dtype=np.float64)
    layer.set_experts(bank)
    assert layer.params["experts.w1"] is bank.params["w1"] and layer.grads["experts.w1"] is bank.grads["w1"]
    y, _ = layer.forward(x, rng=np.random.default_rng(1))
    np.testing.assert_allclose(y, dense_output(layer, x, oracle(layer, x, 1))[0], rtol=1e-12, atol=1e-12)
    layer.backward(np.ones_like(y))
    assert bank.grads["w1"].any()


def test_bad_inputs_name_expected_and_received():
    layer = HierarchicalMoELayer(8, 2, 2, 4, rng=np.random.default_rng(0))
    good = np.zeros((3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"2-D .* got shape \[8\]"):
        layer.forward(good[0])
    with pytest.raises(ValueError, match="width 8, got 7"):
        layer.forward(good[:, :7])
    with pytest.raises(ValueError, match="float32, got float64"):
        layer.forward(good.astype(np.float64))
    x = good.copy()
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.forward(x)
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.backward(good)
    with pytest.raises(ValueError, match="d_gate_extra=0"):
        layer.forward(good, task_emb=good)
    y, _ = layer.forward(good)
    with pytest.raises(ValueError, match=r"dy must be float32 \[3, 8\]"):
        layer.backward(y[:2])
    routed = HierarchicalMoELayer(8, 2, 2, 4, rng=np.random.default_rng(0), d_gate_extra=3)
    with pytest.raises(ValueError, match="task embedding of width 3; got none"):
        routed.forward(good)
    with pytest.raises(ValueError, match="task_emb must have 3 rows like x, got 2"):
        routed.forward(good, np.zeros((2, 3), dtype=np.float32))
