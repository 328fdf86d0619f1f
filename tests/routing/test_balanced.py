"""Balanced inference routing: seats, the unconstrained case equals top-k, and the layer's output
against every expert on every example with the same assignment."""

import math

import numpy as np
import pytest
from scipy import special

from moe.layer import MoELayer
from moe.routing.balanced import balanced_capacity, balanced_topk

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("B,E,k,factor", [(256, 64, 2, 1.0), (256, 64, 2, 1.25), (37, 5, 3, 1.0), (10, 10, 1, 1.0)])
def test_every_example_gets_k_distinct_experts_and_no_expert_exceeds_its_seats(B, E, k, factor):
    rng = np.random.default_rng(B + E)
    logits = rng.normal(size=(B, E)) + 3 * rng.normal(size=E)  # skewed: some experts popular
    C = balanced_capacity(factor, B, k, E)
    idx = balanced_topk(logits, k, C)
    assert idx.dtype == np.int32 and idx.shape == (B, k)
    assert all(len(set(row)) == k for row in idx.tolist())
    counts = np.bincount(idx.ravel(), minlength=E)
    assert counts.max() <= C == math.ceil(factor * B * k / E)
    plain = np.bincount(np.argsort(-logits, axis=1)[:, :k].ravel(), minlength=E)
    assert plain.max() > C  # the skew would overfill experts without balancing


def test_with_enough_seats_it_is_plain_topk():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 8))
    idx = balanced_topk(logits, 3, capacity=50)
    np.testing.assert_array_equal(idx, np.argsort(-logits, axis=1, kind="stable")[:, :3])


def test_k_equal_to_the_number_of_experts_gives_every_row_every_expert_best_first():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4))
    idx = balanced_topk(logits, 4, capacity=6)
    np.testing.assert_array_equal(idx, np.argsort(-logits, axis=1, kind="stable"))


@pytest.mark.parametrize("k", [0, 5])
def test_k_outside_one_to_the_number_of_experts_is_refused(k):
    with pytest.raises(ValueError) as e:
        balanced_topk(np.zeros((3, 4)), k, capacity=10)
    assert str(e.value) == f"k must be in [1, 4], got {k}"


def test_oversubscribed_expert_keeps_the_examples_that_want_it_most():
    # everyone prefers expert 0, which has one seat: the example with the highest logit gets it
    logits = np.array([[3.0, 1.0, 0.0], [5.0, 0.0, 1.0], [4.0, 2.0, 0.5]])
    idx = balanced_topk(logits, 1, capacity=1)
    # 1 takes expert 0; then 2 (2.0) beats 0 (1.0) for expert 1; 0 ends on expert 2
    np.testing.assert_array_equal(idx[:, 0], [2, 0, 1])


def test_refuses_too_few_seats_and_bad_factors():
    with pytest.raises(ValueError, match="cannot seat 10 x 2"):
        balanced_topk(np.zeros((10, 4)), 2, capacity=4)
    with pytest.raises(ValueError, match="capacity factor >= 1, got 0.5"):
        balanced_capacity(0.5, 10, 2, 4)


def test_layer_balanced_forward_equals_every_expert_on_every_example():
    rng = np.random.default_rng(4)
    layer = MoELayer(5, 8, 7, k=2, gate="noisy_topk", rng=rng, dtype=np.float64)
    layer.params["gate.w_gate"][...] = rng.normal(size=layer.params["gate.w_gate"].shape)
    layer.params["gate.w_gate"][:, 0] += 3.0  # make expert 0 hot
    x = rng.normal(size=(64, 5))
    y, r = layer.forward(x, train=False, routing="balanced", balance_factor=1.25)
    clean = x @ layer.params["gate.w_gate"]
    idx = balanced_topk(clean, 2, math.ceil(1.25 * 64 * 2 / 8))
    np.testing.assert_array_equal(r.expert_index, idx)
    gates = special.softmax(np.take_along_axis(clean, idx, axis=1), axis=1)
    ep = {n[8:]: p for n, p in layer.params.items() if n.startswith("experts.")}
    ref = np.zeros_like(x)
    for b in range(64):
        for j in range(2):
            e = idx[b, j]
            ref[b] += gates[b, j] * (np.maximum(x[b] @ ep["w1"][e] + ep["b1"][e], 0) @ ep["w2"][e] + ep["b2"][e])
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert r.counts.max() <= 20 and r.dropped == 0 and r.counts.sum() == 128
    _, plain = layer.forward(x, train=False)
    assert plain.counts.max() > 20
    y_train, _ = layer.forward(x, train=True, rng=rng, routing="balanced", grad=False)  # seats by clean logits
    np.testing.assert_array_equal(y_train, y)
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.forward(x, train=False, routing="balanced")
        layer.backward(np.zeros_like(x))


@pytest.mark.parametrize("k", [2, 3])
def test_exact_capacity_seats_everyone_even_when_rows_must_swap(k):
    """C * E == B * k: every seat is taken, so late rows often find only experts they already
    hold and must swap with another row (_swap_in). Ties (rows of one task share logits)
    make that common. Every row still gets k distinct experts and every expert exactly C."""
    rng = np.random.default_rng(8)
    swapped = 0
    for trial in range(40):
        tasks = rng.standard_normal((5, 8)) * 3
        logits = tasks[rng.integers(0, 5, 16)]  # [16, 8] rows of 5 tasks
        idx = balanced_topk(logits, k, 2 * k)  # 16 x k = 8 experts x 2k seats
        assert (idx >= 0).all() and all(len(set(r)) == k for r in idx.tolist()), trial
        assert np.bincount(idx.ravel(), minlength=8).tolist() == [2 * k] * 8, trial
        greedy = np.argsort(-logits, axis=1)[:, :k]
        swapped += int((np.sort(idx, axis=1) != np.sort(greedy, axis=1)).any())
    assert swapped > 10  # the capacity did bind


@pytest.mark.parametrize("row1, row2, want", [
    # row 2 holds expert 2, the only one with a free seat: another row moves to expert 2 and
    # row 2 takes its seat. Costs (b2, e2): L[b2,e2] - L[b2,2] - L[2,e2]; the least is taken.
    ([4, 5, -2], [-9, -7, 5], [[0, 1], [2, 0], [2, 1]]),  # (1, 1) costs 14, (1, 0) 15, (0, 1) 20
    # a tie (22 for (0, 1) and (1, 0)): the first move found stands, row 0 before row 1
    ([4, 5, -9], [-9, -9, 5], [[0, 2], [1, 0], [2, 1]]),
])
def test_a_stuck_row_takes_the_seat_whose_move_loses_least(row1, row2, want):
    logits = np.array([[5.0, 4.0, -9.0], row1, row2])
    idx = balanced_topk(logits, 2, 2)  # 3 rows x 2 = 3 experts x 2 seats: row 2 gets stuck
    assert idx.tolist() == want


def test_a_stuck_row_looks_for_a_partner_among_all_rows():
    """k = 2, 4 rows, 4 experts x 2 seats. Round 1: 0->2, 1->1, 2->2, 3->0 (expert 2 is full).
    Round 2: rows 0, 2, 3 bid 2, 4, 4 for expert 1's last seat, row 2 wins the tie; row 1 -> 3.
    Round 3: rows 0 and 3 bid -2 for expert 3's last seat, row 0 wins. Row 3 holds 0, the only
    expert left with a seat: stuck. Moves (b2, e2) with b2 going to 0 cost
    L[b2,e2] - L[b2,0] - L[3,e2]: (0, 2) 6, (0, 3) 5, (1, 1) 6, (1, 3) 12, (2, 2) 7, (2, 1) 2.
    The least is row 2's, past the first k rows."""
    logits = np.array([[-5.0, 2, 5, -2], [-1, 9, 6, 9], [-2, 4, 9, 3], [6, 4, 4, -2]])
    assert balanced_topk(logits, 2, 2).tolist() == [[2, 3], [1, 3], [2, 0], [0, 1]]
