"""The numpy dispatch path on its own: sort/slot invariants, and combine/gather gradients."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.bindings import reference as ref
from moe.bindings.plan import plan_dispatch

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("B,E,k,cap", [(13, 5, 2, -1), (13, 5, 2, 3), (1, 4, 1, -1), (9, 1, 1, 4), (6, 3, 3, 0)])
def test_plan_invariants(B, E, k, cap):
    rng = np.random.default_rng(B * E + k)
    idx = np.stack([rng.permutation(E)[:k] for _ in range(B)]).astype(np.int32)
    plan = plan_dispatch(idx, E, cap)
    N = plan.src_row.shape[0]
    assert plan.offsets[0] == 0 and plan.offsets[-1] == N
    assert plan.slot.shape == (B, k) and plan.slot.dtype == np.int32
    # each kept assignment owns exactly one packed row, of its expert, from its example
    kept = np.argwhere(plan.slot >= 0)
    assert sorted(plan.slot[plan.slot >= 0]) == list(range(N))
    for b, j in kept:
        n = plan.slot[b, j]
        e = idx[b, j]
        assert plan.offsets[e] <= n < plan.offsets[e + 1] and plan.src_row[n] == b
    # stable: inside an expert, packed rows follow flat assignment order b*k + j
    flat_of_row = np.empty(N, dtype=int)
    for b, j in kept:
        flat_of_row[plan.slot[b, j]] = b * k + j
    for e in range(E):
        seg = flat_of_row[plan.offsets[e] : plan.offsets[e + 1]]
        assert np.all(np.diff(seg) > 0)
    if cap >= 0:
        assert plan.counts.max(initial=0) <= cap
    assert plan.dropped == B * k - N


def _random_plan(rng, B=7, E=4, k=2, cap=3):
    idx = np.stack([rng.permutation(E)[:k] for _ in range(B)]).astype(np.int32)
    return plan_dispatch(idx, E, cap)


def test_combine_gradients():
    rng = np.random.default_rng(0)
    plan = _random_plan(rng)
    assert plan.dropped > 0
    N, B = plan.src_row.shape[0], plan.slot.shape[0]
    out, w, up = rng.normal(size=(N, 3)), rng.normal(size=(B, 2)), rng.normal(size=(B, 3))
    loss = lambda: float(np.sum(ref.combine(out, plan.slot, w) * up))  # noqa: E731
    d_out, d_w = ref.combine_backward(up, out, plan.slot, w)
    assert_close(d_out, numerical_grad(loss, out), name="d_out")
    assert_close(d_w, numerical_grad(loss, w), name="d_gates")
    assert not d_w[plan.slot < 0].any(), "dropped assignments get no gate gradient"


def test_gather_backward_is_combine_with_unit_weights():
    rng = np.random.default_rng(1)
    plan = _random_plan(rng)
    x = rng.normal(size=(plan.slot.shape[0], 3))
    up = rng.normal(size=(plan.src_row.shape[0], 3))
    loss = lambda: float(np.sum(ref.gather_rows(x, plan.src_row) * up))  # noqa: E731
    dx = ref.combine(up, plan.slot, plan.keep.astype(np.float64))
    assert_close(dx, numerical_grad(loss, x), name="dx")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ffn_gradients(activation):
    rng = np.random.default_rng(2)
    E, d, h = 4, 3, 5
    offsets = np.array([0, 3, 3, 7, 8])  # expert 1 is empty
    x = rng.normal(size=(8, d))
    w1, b1 = rng.normal(size=(E, d, h)), rng.normal(size=(E, h))
    w2, b2 = rng.normal(size=(E, h, d)), rng.normal(size=(E, d))
    up = rng.normal(size=(8, d))

    def loss():
        return float(np.sum(ref.ffn_forward(x, offsets, w1, b1, w2, b2, activation)[0] * up))

    _, pre, act = ref.ffn_forward(x, offsets, w1, b1, w2, b2, activation)
    live = [0, 2, 3]
    grads = [np.full((len(live),) + a.shape[1:], 7.0) for a in (w1, b1, w2, b2)]  # packed: live experts only
    dx = ref.ffn_backward(up, x, offsets, w1, w2, pre, act, activation, *grads)
    assert_close(dx, numerical_grad(loss, x), name="dx")
    for g, p, n in zip(grads, (w1, b1, w2, b2), ("w1", "b1", "w2", "b2"), strict=True):
        fd = numerical_grad(loss, p)
        assert_close(g, fd[live], name=n)  # row q is the q-th expert with rows
        assert not fd[1].any(), "an expert with no rows has no gradient"
    with pytest.raises(ValueError, match=r"dw1 must be \[A, d, h\] = \[3, 3, 5\]"):
        ref.ffn_backward(up, x, offsets, w1, w2, pre, act, activation, np.zeros_like(w1), *grads[1:])
