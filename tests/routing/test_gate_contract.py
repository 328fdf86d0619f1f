"""The gates' contract beyond their arithmetic: which gates have noise, argument checks at the
gate itself, defaults shared with MoELayer, numerically safe softmax, immutable records."""

import dataclasses
import inspect
import math

import numpy as np
import pytest

from moe.layer import MoELayer
from moe.routing.balance import cv_squared
from moe.routing.capacity import expert_capacity, validate_capacity_factor
from moe.routing.gates import GateOutput, TopKGate, TopKRows, make_gate, softmax
from moe.routing.gates import logsumexp_rows as logsumexp
from moe.routing.types import Routing

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name,k", [("softmax_topk", 2), ("softmax_topk", 1), ("top1", 1)])
def test_only_noisy_topk_has_noise(name, k):
    """softmax_topk and top1 route the same way whatever the generator, also in training."""
    gate = make_gate(name, 5, 6, k, rng=np.random.default_rng(0), dtype=np.float64)
    assert list(gate.params) == ["w_gate"]
    x = np.random.default_rng(1).normal(size=(40, 5))
    a = gate.forward(x, train=True, rng=np.random.default_rng(2))
    b = gate.forward(x, train=True, rng=np.random.default_rng(3))
    assert np.array_equal(a.expert_index, b.expert_index) and np.array_equal(a.gates, b.gates)
    np.testing.assert_array_equal(a.load, np.bincount(a.expert_index.ravel(), minlength=6))


def test_noisy_topk_has_noise_weights_starting_at_zero():
    gate = make_gate("noisy_topk", 5, 6, 2, rng=np.random.default_rng(0))
    assert sorted(gate.params) == ["w_gate", "w_noise"]
    assert not gate.params["w_gate"].any() and not gate.params["w_noise"].any()


@pytest.mark.parametrize(
    "args,match",
    [
        ((4, 0, 1), "n_experts must be >= 1, got 0"),
        ((4, 3, 0), r"k must be in \[1, n_experts=3\], got 0"),
        ((4, 3, 4), r"k must be in \[1, n_experts=3\], got 4"),
        ((0, 3, 1), "gate input width must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("name", ["noisy_topk", "softmax_topk"])
def test_a_gate_checks_its_own_arguments(name, args, match):
    with pytest.raises(ValueError, match=match):
        make_gate(name, *args, rng=np.random.default_rng(0))


@pytest.mark.parametrize("weight", ["w_importance", "w_load", "w_z"])
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_balance_weights_must_be_finite_and_non_negative(weight, bad):
    with pytest.raises(ValueError) as e:
        make_gate("noisy_topk", 4, 3, 1, rng=np.random.default_rng(0), **{weight: bad})
    assert str(e.value) == f"{weight} must be a finite number >= 0, got {bad}"
    make_gate("noisy_topk", 4, 3, 1, rng=np.random.default_rng(0), **{weight: 0.0})  # zero: term off


@pytest.mark.parametrize("d_in", [4, 400])
def test_gate_weights_start_small_with_std_a_tenth_over_root_d(d_in):
    """A small random start breaks the tie of equal zero logits, scaled so the logits' spread
    does not grow with the input width. 200k draws: the sample std is within 1% (over 6 sigma)."""
    w = make_gate("softmax_topk", d_in, 200_000 // d_in, 1, rng=np.random.default_rng(1)).params["w_gate"]
    assert w.std() == pytest.approx(0.1 / np.sqrt(d_in), rel=0.01)
    assert abs(w.mean()) < 5 * 0.1 / np.sqrt(d_in) / np.sqrt(w.size)


def test_smallest_gate_works():
    """One input feature, one expert, k = 1: the bounds are inclusive."""
    for name in ("noisy_topk", "softmax_topk", "top1"):
        gate = make_gate(name, 1, 1, 1, rng=np.random.default_rng(0), dtype=np.float64)
        out = gate.forward(np.ones((3, 1)), train=True, rng=np.random.default_rng(1))
        assert out.expert_index.tolist() == [[0], [0], [0]]
        np.testing.assert_array_equal(out.gates, np.ones((3, 1)))


def test_gate_defaults_are_the_layer_s():
    gate_defaults = inspect.signature(TopKGate.__init__).parameters
    layer_defaults = inspect.signature(MoELayer.__init__).parameters
    for name in ("w_importance", "w_load", "w_z"):
        assert gate_defaults[name].default == layer_defaults[name].default, name
    g = make_gate("softmax_topk", 3, 4, 2, rng=np.random.default_rng(0))
    assert (g.w_importance, g.w_load, g.w_z) == (0.1, 0.1, 0.0)  # README: w = 0.1, no z-loss


def test_softmax_and_logsumexp_take_huge_logits():
    """Shifted by the row max, so logits of +-1000 do not overflow (tests raise on overflow)."""
    z = np.array([[1000.0, 1001.0, -1000.0], [-5.0, -6.0, -7.0]])
    p = softmax(z.copy())
    e = np.exp(z - z.max(axis=1, keepdims=True), where=z > -500, out=np.zeros_like(z))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(logsumexp(z), [1001.0 + math.log1p(math.exp(-1.0)), -5.0 + math.log1p(math.exp(-1) + math.exp(-2))],
                               rtol=1e-12)
    gate = make_gate("top1", 2, 3, 1, w_z=0.1, rng=np.random.default_rng(0), dtype=np.float64)
    gate.params["w_gate"][...] = [[500.0, -500.0, 0.0], [0.0, 0.0, 0.0]]
    out = gate.forward(np.array([[2.0, 0.0]]), train=True, rng=None)
    assert np.isfinite(out.gates).all() and np.isfinite(out.aux_loss)


def test_cv_squared_of_two_experts():
    value, grad = cv_squared(np.array([1.0, 3.0]))
    assert value == pytest.approx(0.25, rel=1e-12)  # var 1, mean 2
    np.testing.assert_allclose(grad, [-0.375, 0.125], rtol=1e-12)  # 2/(E m^2) (v - m - var/m) = 1/4 (-1.5, 0.5)


def test_rows_backward_before_forward_is_refused():
    with pytest.raises(ValueError, match="gate backward called before forward"):
        TopKRows(2, 4).backward(np.zeros((3, 2)), None)


def test_routing_records_are_frozen_and_know_their_shape():
    r = Routing(expert_index=np.zeros((5, 2), np.int32), gates=np.zeros((5, 2), np.float32),
                importance=np.zeros(7, np.float32), load=np.zeros(7, np.float32),
                counts=np.zeros(7, np.int32), dropped=0, aux_loss=0.0)
    assert (r.batch_size, r.k, r.n_experts) == (5, 2, 7)
    g = GateOutput(r.expert_index, r.gates, r.importance, r.load, 0.0)
    for record in (r, g):
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.aux_loss = 1.0


def test_capacity_is_ceil_and_none_is_dropless():
    assert expert_capacity(None, 100, 2, 8) == -1  # the documented "no limit"
    assert expert_capacity(1.0, 10, 2, 4) == 5 and expert_capacity(1.25, 10, 2, 4) == 7  # ceil(6.25)
    assert expert_capacity(0.01, 10, 1, 4) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", [1.0]])
def test_capacity_factor_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0 or None"):
        validate_capacity_factor(bad)


def test_capacity_factor_accepts_none_and_positive_numbers():
    for ok in (None, 1, 0.5, 2.0):
        validate_capacity_factor(ok)


def test_an_allowed_mask_of_the_wrong_shape_or_dtype_is_refused():
    from moe.routing.gates import mask_logits

    clean = np.zeros((2, 3), np.float32)
    assert mask_logits(clean, None) is clean
    for bad in (np.ones((2, 4), bool), np.ones((2, 3), np.int8), np.ones((3, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"allowed must be bool \[2, 3\]"):
            mask_logits(clean, bad)


def test_a_grouped_gate_backward_needs_its_forward():
    from moe.routing.gates import GroupedTopK

    g = GroupedTopK(2, 4)
    with pytest.raises(ValueError, match="gate backward called before forward"):
        g.backward(np.zeros((3, 2), np.float32), dw_gate=np.zeros((1, 5, 4), np.float32))


def test_gate_construction_and_use_refuse_what_they_cannot_do():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"gate must be one of .*, got 'nope'"):
        make_gate("nope", 4, 3, 2, rng=rng)
    with pytest.raises(ValueError, match="top1 gate routes to exactly one expert, got k=2"):
        make_gate("top1", 4, 3, 2, rng=rng)
    assert make_gate("top1", 4, 3, 1, rng=rng).k == 1
    noisy = make_gate("noisy_topk", 4, 3, 2, rng=rng)
    with pytest.raises(ValueError, match="a noisy gate needs an rng for its noise while training"):
        noisy.forward(np.zeros((2, 4), np.float32), train=True, rng=None)
    noisy.forward(np.zeros((2, 4), np.float32), train=False, rng=None)  # no noise at inference: no rng needed
    with pytest.raises(ValueError, match="gate backward called before forward"):
        make_gate("softmax_topk", 4, 3, 2, rng=rng).backward(np.zeros((2, 2), np.float32))


def test_a_top1_gate_built_without_k_routes_to_one_expert():
    from moe.routing.gates import Top1Gate

    assert Top1Gate(4, 3, rng=np.random.default_rng(0)).k == 1
