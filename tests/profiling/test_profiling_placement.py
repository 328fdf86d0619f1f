"""Placement advice: LPT against hand-computed and brute-force optima, files on disk."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from moe.profiling.placement import (
    contiguous_placement,
    load_placement,
    lpt_placement,
    placement_stats,
    save_placement,
)

pytestmark = pytest.mark.unit


def max_bin(loads, assignment, n_bins):
    """Busiest bin's load, by a Python loop (independent of placement_stats)."""
    totals = [0.0] * n_bins
    for w, b in zip(loads, assignment, strict=True):
        totals[int(b)] += float(w)
    return max(totals)


def brute_force_opt(loads, n_bins):
    """Optimal makespan over all n_bins ** E assignments."""
    w = np.asarray(loads, dtype=np.float64)
    every = np.array(list(itertools.product(range(n_bins), repeat=w.size)))  # [n_bins**E, E]
    per_bin = np.stack([(every == b) @ w for b in range(n_bins)], axis=1)  # [n_bins**E, n_bins]
    return float(per_bin.max(axis=1).min())


# ---- contiguous -------------------------------------------------------------------------


def test_contiguous_hand_examples():
    np.testing.assert_array_equal(contiguous_placement(10, 3), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(contiguous_placement(4, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(contiguous_placement(5, 1), [0] * 5)
    assert contiguous_placement(10, 3).dtype == np.int32


def test_contiguous_ranges_are_balanced():
    for E, n in [(65_536, 48), (7, 3), (100, 100), (1000, 7)]:
        a = contiguous_placement(E, n)
        sizes = np.bincount(a, minlength=n)
        assert a.shape == (E,) and sizes.sum() == E
        assert sizes.max() - sizes.min() <= 1
        assert np.all(np.diff(a) >= 0)  # contiguous, in order


# ---- LPT --------------------------------------------------------------------------------


def test_lpt_known_case_equals_hand_computed_optimum():
    # heaviest first: 10 (id1) -> bin0, 7 (id3) -> bin1, 6 (id4) -> bin1 (7 < 10) = 13,
    # 4 (id2) -> bin1? no: bin1 = 13 > bin0 = 10 -> bin0 = 14, 3 (id0) -> bin1 (13 < 14) = 16.
    # No subset of {10, 7, 6, 4, 3} sums to 15, and {10, 4} / {7, 6, 3} gives 14 / 16: OPT = 16.
    loads = np.array([3, 10, 4, 7, 6], dtype=np.float32)
    a = lpt_placement(loads, 2)
    np.testing.assert_array_equal(a, [1, 0, 0, 1, 1])
    assert a.dtype == np.int32
    assert max_bin(loads, a, 2) == 16.0 == brute_force_opt(loads, 2)


def test_lpt_ties_go_to_the_lowest_bin_and_equal_loads_keep_id_order():
    # all equal: e0 -> b0, e1 -> b1 (0 < 1), e2 -> tie 1/1 -> b0, e3 -> b1
    np.testing.assert_array_equal(lpt_placement(np.ones(4), 2), [0, 1, 0, 1])
    # zero loads never change a bin, so every expert ties into bin 0 (documented) ...
    np.testing.assert_array_equal(lpt_placement(np.zeros(4), 2), [0, 0, 0, 0])
    # ... unless capacity caps it: e0, e1 fill b0, then e2, e3 go to b1
    np.testing.assert_array_equal(lpt_placement(np.zeros(4), 2, capacity=2), [0, 0, 1, 1])
    # three bins, loads 5,5,5,1,1,1: each 5 gets its own bin, then each 1 in bin order
    np.testing.assert_array_equal(lpt_placement(np.array([1, 5, 1, 5, 1, 5.0]), 3), [0, 0, 1, 1, 2, 2])


def reference_lpt(loads, n_bins, capacity=None):
    """The LPT rule written out literally: a linear scan for the least-loaded open bin."""
    totals, filled, out = [0.0] * n_bins, [0] * n_bins, [0] * len(loads)
    for e in sorted(range(len(loads)), key=lambda i: (-float(loads[i]), i)):
        open_bins = [b for b in range(n_bins) if capacity is None or filled[b] < capacity]
        b = min(open_bins, key=lambda j: (totals[j], j))
        out[e] = b
        totals[b] += float(loads[e])
        filled[b] += 1
    return out


def test_lpt_matches_the_literal_rule_with_many_ties():
    rng = np.random.default_rng(5)
    for trial in range(30):
        E = int(rng.integers(20, 120))
        n = int(rng.integers(1, 12))
        loads = rng.integers(0, 4, size=E).astype(np.float64)  # heavy ties, zeros included
        capacity = None if trial % 2 else int(math.ceil(E / n)) + int(rng.integers(0, 3))
        np.testing.assert_array_equal(lpt_placement(loads, n, capacity), reference_lpt(loads, n, capacity))


def test_lpt_is_deterministic():
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 5, size=300).astype(np.float64)  # many ties
    first = lpt_placement(loads, 7)
    for _ in range(3):
        np.testing.assert_array_equal(lpt_placement(loads.copy(), 7), first)


def test_lpt_never_worse_than_contiguous_on_random_loads():
    # Not a theorem (see the next test), but on realistic skewed loads it always holds.
    rng = np.random.default_rng(1)
    for _ in range(50):
        E = int(rng.integers(16, 200))
        n = int(rng.integers(2, min(E, 32) + 1))
        loads = rng.lognormal(0.0, 1.0, size=E)
        lpt, cont = lpt_placement(loads, n), contiguous_placement(E, n)
        assert max_bin(loads, lpt, n) <= max_bin(loads, cont, n) + 1e-9


def test_contiguous_can_beat_lpt_on_an_adversarial_case():
    # LPT on {3,3,2,2,2}: 3|3, then 2->b0 (5), 2->b1 (5), 2->b0 (7). The contiguous split
    # [2,2,2 | 3,3] is the optimum 6 — why the random-loads test above is not a theorem.
    loads = np.array([2, 2, 2, 3, 3], dtype=np.float64)
    assert max_bin(loads, lpt_placement(loads, 2), 2) == 7.0
    assert max_bin(loads, contiguous_placement(5, 2), 2) == 6.0 == brute_force_opt(loads, 2)


def test_lpt_within_graham_bound_of_brute_force_optimum():
    rng = np.random.default_rng(2)
    worst_ratio = 0.0
    for trial in range(40):
        m = 2 if trial % 2 else 3
        E = int(rng.integers(m, 9))
        loads = rng.integers(1, 20, size=E).astype(np.float64) if trial % 4 < 2 else rng.random(E)
        opt = brute_force_opt(loads, m)
        got = max_bin(loads, lpt_placement(loads, m), m)
        assert opt - 1e-12 <= got <= (4 / 3 - 1 / (3 * m)) * opt * (1 + 1e-12)
        worst_ratio = max(worst_ratio, got / opt)
    assert worst_ratio >= 1.0


def test_lpt_capacity_limits_experts_per_bin():
    rng = np.random.default_rng(3)
    loads = rng.lognormal(size=50)
    a = lpt_placement(loads, 8, capacity=7)
    assert np.bincount(a, minlength=8).max() <= 7
    assert np.bincount(a, minlength=8).min() >= 1
    # a tight capacity forces an exactly even split
    assert np.all(np.bincount(lpt_placement(loads, 5, capacity=10), minlength=5) == 10)


@pytest.mark.parametrize(
    ("loads", "n_bins", "capacity", "exc", "match"),
    [
        (np.array([1.0, -1.0]), 2, None, ValueError, "finite and >= 0"),
        (np.array([1.0, np.nan]), 2, None, ValueError, "finite and >= 0"),
        (np.ones((2, 2)), 2, None, ValueError, "1-D"),
        (np.array([], dtype=np.float64), 1, None, ValueError, "non-empty"),
        (np.array(["a", "b"]), 1, None, TypeError, "real numbers"),
        (np.ones(3), 0, None, ValueError, "n_bins must be >= 1, got 0"),
        (np.ones(3), 4, None, ValueError, "cannot spread 3 experts over 4 bins"),
        (np.ones(3), 2.0, None, TypeError, "n_bins must be an int, got float"),
        (np.ones(10), 3, 3, ValueError, "capacity 3 per bin over 3 bins holds 9 experts, need 10"),
        (np.ones(10), 3, 0, ValueError, "capacity must be >= 1"),
    ],
)
def test_lpt_rejects_bad_input(loads, n_bins, capacity, exc, match):
    with pytest.raises(exc, match=match):
        lpt_placement(loads, n_bins, capacity)


def test_lpt_handles_sixty_five_thousand_experts():
    rng = np.random.default_rng(4)
    loads = rng.lognormal(size=65_536).astype(np.float32)
    a = lpt_placement(loads, 64)
    s = placement_stats(loads, a, 64)
    assert a.shape == (65_536,) and s["empty_bins"] == []
    # LPT's list-scheduling bound: max bin <= mean bin + the largest single load
    assert s["max_bin_load"] <= s["mean_bin_load"] + float(loads.max()) + 1e-6


# ---- placement_stats --------------------------------------------------------------------


def test_placement_stats_hand_example():
    s = placement_stats(np.array([1.0, 2.0, 3.0, 6.0]), np.array([0, 0, 1, 2]), 4)
    assert s["bin_load"] == [3.0, 3.0, 6.0, 0.0]
    assert s["bin_experts"] == [2, 1, 1, 0]
    assert s["max_bin_load"] == 6.0 and s["mean_bin_load"] == 3.0 and s["max_mean_bin_load"] == 2.0
    assert s["empty_bins"] == [3] and s["n_bins"] == 4 and s["n_experts"] == 4
    json.dumps(s, allow_nan=False)
    assert placement_stats(np.zeros(3), np.array([0, 1, 1]), 2)["max_mean_bin_load"] == 0.0
    with pytest.raises(ValueError, match=r"bin ids must be in \[0, 2\), got values in \[0, 2\]"):
        placement_stats(np.ones(3), np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="must place 3 experts, got 2"):
        placement_stats(np.ones(3), np.array([0, 1]), 2)
    with pytest.raises(TypeError, match="integer array"):
        placement_stats(np.ones(2), np.array([0.0, 1.0]), 2)


# ---- files ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    loads = np.array([3, 10, 4, 7, 6], dtype=np.float32)
    a = lpt_placement(loads, 2)
    path = save_placement(tmp_path / "placement.json", a, loads)
    doc = json.loads(path.read_text())
    assert doc["format"] == "moe.placement/1" and doc["n_experts"] == 5 and doc["n_bins"] == 2
    assert doc["assignment"] == [1, 0, 0, 1, 1] and doc["bin_load"] == [14.0, 16.0]
    back = load_placement(path, n_experts=5)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, a)
    np.testing.assert_array_equal(load_placement(save_placement(tmp_path / "c.json", contiguous_placement(9, 4))),
                                  contiguous_placement(9, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "placement.json"]  # no temp files left


def _write(tmp_path, doc):
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


GOOD = {"format": "moe.placement/1", "n_experts": 4, "n_bins": 2, "assignment": [0, 1, 1, 0]}


@pytest.mark.parametrize(
    ("doc", "n_experts", "match"),
    [
        ("{not json", None, "is not valid JSON"),
        ("[1, 2]", None, "must hold a JSON object, got list"),
        ({**GOOD, "format": "moe.placement/0"}, None, "format must be 'moe.placement/1'"),
        (GOOD, 8, "places 4 experts, expected 8"),
        ({**GOOD, "assignment": [0, 1, 2, 0]}, None, r"bin ids must be in \[0, 2\), got values in \[0, 2\]"),
        ({**GOOD, "assignment": [0, -1, 1, 0]}, None, r"bin ids must be in \[0, 2\)"),
        ({**GOOD, "assignment": [0, 0, 0, 0]}, None, r"bins \[1\] of 2 are empty"),
        ({**GOOD, "assignment": [0, 1, 1]}, None, "has 3 entries, n_experts says 4"),
        ({**GOOD, "assignment": [0, 1, True, 0]}, None, "list of int bin ids"),
        ({**GOOD, "assignment": [0, 1, 1.0, 0]}, None, "list of int bin ids"),
        ({**GOOD, "n_bins": 0}, None, "'n_bins' must be a positive int, got 0"),
        ({k: v for k, v in GOOD.items() if k != "n_experts"}, None, "'n_experts' must be a positive int, got None"),
        ({**GOOD, "loads": [1.0, 2.0]}, None, "'loads' must be 4 finite numbers >= 0"),
    ],
)
def test_load_placement_rejects_bad_files(tmp_path, doc, n_experts, match):
    path = _write(tmp_path, doc)
    with pytest.raises(ValueError, match=match) as info:
        load_placement(path, n_experts=n_experts)
    assert str(path) in str(info.value)  # the message names the file


def test_save_placement_rejects_what_cannot_be_read_back(tmp_path):
    with pytest.raises(ValueError, match=r"bins \[1\] of 3 are empty"):
        save_placement(tmp_path / "p.json", np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="one entry per expert"):
        save_placement(tmp_path / "p.json", np.array([0, 1]), loads=np.ones(3))
    with pytest.raises(ValueError, match="bin ids must be >= 0"):
        save_placement(tmp_path / "p.json", np.array([0, -1]))
    with pytest.raises(ValueError, match="1-D integer array"):
        save_placement(tmp_path / "p.json", np.array([0.0, 1.0]))
    assert list(tmp_path.iterdir()) == []
