"""Compiled dispatch kernels (moe.bindings._dispatch) against the numpy oracle.

Integer outputs must be identical. topk values, gather, combine and combine_backward's d_out
must be bit-identical (same operations, same order). combine_backward's d_weights is a dot
product, checked norm-wise: max|ours - ref| <= rtol * max|ref| with rtol 1e-5 (float32) and
1e-12 (float64).
"""

import math

import numpy as np
import pytest

from moe.bindings import reference as ref

_dispatch = pytest.importorskip("moe.bindings._dispatch")

pytestmark = pytest.mark.kernels

FLOATS = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture(params=["one thread", "parallel"])
def threads(request):
    """Run a test with the default size cut-off and with every loop forced parallel."""
    saved = _dispatch._configure()
    if request.param == "parallel":
        _dispatch._configure(parallel_min_work=0)
    yield request.param
    _dispatch._configure(**saved)


def assert_scaled_close(ours: np.ndarray, want: np.ndarray, name: str = "") -> None:
    """Norm-wise check: the worst error relative to the largest reference magnitude."""
    assert ours.dtype == want.dtype and ours.shape == want.shape, name
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    err = float(np.abs(ours.astype(np.float64) - want).max(initial=0.0))
    assert err <= RTOL[want.dtype] * scale, f"{name}: max error {err:.3e} vs scale {scale:.3e}"


def assert_identical(ours, want, name: str = "") -> None:
    assert ours.dtype == want.dtype, f"{name}: dtype {ours.dtype} != {want.dtype}"
    assert ours.shape == want.shape, f"{name}: shape {ours.shape} != {want.shape}"
    assert np.array_equal(ours, want, equal_nan=ours.dtype.kind == "f"), name


def random_routing(rng: np.random.Generator, B: int, E: int, k: int) -> np.ndarray:
    """k distinct experts per row, skewed so some experts are popular and some empty."""
    scores = rng.standard_normal((B, E)) + np.linspace(0, 3 * rng.random(), E)
    return np.argsort(-scores, axis=1)[:, :k].astype(np.int32)


def routed_case(rng: np.random.Generator, B: int, E: int, k: int, drop: float, dtype):
    ei = random_routing(rng, B, E, k)
    keep = rng.random((B, k)) >= drop
    src, slot, offsets = ref.counting_sort(ei, keep, E)
    N = src.shape[0]
    d = int(rng.integers(1, 9))
    out = rng.standard_normal((N, d)).astype(dtype)
    weights = rng.random((B, k)).astype(dtype)
    dy = rng.standard_normal((B, d)).astype(dtype)
    return ei, keep, slot, out, weights, dy


# ----------------------------------------------------------------------------- topk_rows
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_rows_matches_reference_with_ties(dtype, threads):
    rng = np.random.default_rng(1)
    for case in range(30):
        B, E = int(rng.integers(0, 40)), int(rng.integers(1, 30))
        k = int(rng.integers(0, E + 1)) if case % 5 else E
        # small integers make many ties, which must keep the lower index first
        h = rng.integers(-3, 4, size=(B, E)).astype(dtype)
        if case % 3 == 0:
            h = rng.standard_normal((B, E)).astype(dtype)
        idx, val = _dispatch.topk_rows(h, k)
        want_idx, want_val = ref.topk_rows(h, k)
        assert_identical(idx, want_idx, f"case {case} index")
        assert_identical(val, want_val, f"case {case} value")


def test_topk_rows_hand_example_and_specials():
    h = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0], [np.nan, 0.0, -0.0, np.nan, 5.0]], np.float32)
    idx, val = _dispatch.topk_rows(h, 4)
    # row 0: 3 (index 1), 3 (index 2), 2, 1; row 1: 5, then the zeros in index order, NaN last
    assert idx.tolist() == [[1, 2, 4, 0], [4, 1, 2, 0]]
    assert_identical(idx, ref.topk_rows(h, 4)[0])
    assert_identical(val, ref.topk_rows(h, 4)[1])
    idx5, _ = _dispatch.topk_rows(h, 5)
    assert idx5[1].tolist() == [4, 1, 2, 0, 3]


def test_topk_rows_noncontiguous(threads):
    rng = np.random.default_rng(2)
    big = rng.standard_normal((600, 256)).astype(np.float32)
    h = big[::2, ::2]  # [300, 128], strided
    for k in (1, 2, 7):
        idx, val = _dispatch.topk_rows(h, k)
        want_idx, want_val = ref.topk_rows(np.ascontiguousarray(h), k)
        assert_identical(idx, want_idx)
        assert_identical(val, want_val)


def test_topk_rows_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"h must be float32 or float64 \[B, E\], got int64 \[2, 3\]"
    ):
        _dispatch.topk_rows(np.zeros((2, 3), np.int64), 1)
    with pytest.raises(ValueError, match="got float32 \\[3\\]"):
        _dispatch.topk_rows(np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="k must be <= the number of columns of h \\(3\\), got 4"):
        _dispatch.topk_rows(np.zeros((2, 3), np.float32), 4)
    with pytest.raises(ValueError, match="k must be >= 0"):
        _dispatch.topk_rows(np.zeros((2, 3), np.float32), -1)


# ----------------------------------------------------------------------------- capacity_keep
def test_capacity_keep_matches_reference():
    rng = np.random.default_rng(3)
    for case in range(40):
        B, E = int(rng.integers(0, 50)), int(rng.integers(1, 12))
        k = int(rng.integers(1, E + 1)) if case % 4 else E
        ei = random_routing(rng, B, E, k)
        for cap in (-1, 0, 1, int(rng.integers(0, B * k + 2)), B * k, 10**9):
            got = _dispatch.capacity_keep(ei, E, cap)
            assert_identical(got, ref.capacity_keep(ei, E, cap), f"case {case} capacity {cap}")


def test_capacity_keep_hand_example():
    # two examples both pick expert 0 first and expert 1 second, capacity 1:
    # example 0's first choice wins expert 0, example 0's second choice wins expert 1.
    ei = np.array([[0, 1], [0, 1]], np.int32)
    assert _dispatch.capacity_keep(ei, 2, 1).tolist() == [[True, True], [False, False]]
    # GShard priority: all first choices before any second choice
    ei = np.array([[1, 0], [0, 1]], np.int32)
    assert _dispatch.capacity_keep(ei, 2, 1).tolist() == [[True, False], [True, False]]


def test_capacity_keep_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"expert_index must be int32 \[B, k\], got float64 \[3, 2\]"
    ):
        _dispatch.capacity_keep(np.zeros((3, 2)), 4, 1)
    with pytest.raises(
        ValueError, match=r"expert_index\[1, 0\] = 4 is outside the expert range \[0, 4\)"
    ):
        _dispatch.capacity_keep(np.array([[0, 1], [4, 2]], np.int32), 4, 1)
    with pytest.raises(ValueError, match="outside"):
        _dispatch.capacity_keep(np.array([[0, -1]], np.int32), 4, -1)
    with pytest.raises(ValueError, match="n_experts must be >= 1"):
        _dispatch.capacity_keep(np.zeros((1, 1), np.int32), 0, 1)
    with pytest.raises(ValueError, match="capacity must be an integer"):
        _dispatch.capacity_keep(np.zeros((1, 1), np.int32), 1, 1.5)


# ----------------------------------------------------------------------------- counting_sort
def test_counting_sort_matches_reference():
    rng = np.random.default_rng(4)
    for case in range(40):
        B, E = int(rng.integers(0, 60)), int(rng.integers(1, 20))
        k = int(rng.integers(1, E + 1)) if case % 4 else E
        ei = random_routing(rng, B, E, k)
        drop = (0.0, 1.0, rng.random())[case % 3]  # none dropped, all dropped, some dropped
        keep = rng.random((B, k)) >= drop
        got = _dispatch.counting_sort(ei, keep, E)
        want = ref.counting_sort(ei, keep, E)
        for name, a, b in zip(("src_row", "slot", "offsets"), got, want, strict=True):
            assert_identical(a, b, f"case {case} {name}")


def test_counting_sort_hand_example():
    ei = np.array([[2, 0], [0, 2], [1, 0]], np.int32)
    keep = np.array([[True, True], [True, False], [True, True]])
    src, slot, offsets = _dispatch.counting_sort(ei, keep, 4)
    # expert 0 gets flat ids 1, 2, 5; expert 1 gets 4; expert 2 gets 0; expert 3 nothing
    assert offsets.tolist() == [0, 3, 4, 5, 5]
    assert src.tolist() == [0, 1, 2, 2, 0]
    assert slot.tolist() == [[4, 0], [1, -1], [3, 2]]


def test_counting_sort_ignores_ids_of_dropped_assignments():
    ei = np.array([[0, 9], [1, 0]], np.int32)  # 9 is out of range but dropped
    keep = np.array([[True, False], [True, True]])
    got = _dispatch.counting_sort(ei, keep, 2)
    for a, b in zip(got, ref.counting_sort(ei, keep, 2), strict=True):
        assert_identical(a, b)


def test_counting_sort_rejects_bad_input():
    ei = np.array([[0, 1]], np.int32)
    with pytest.raises(
        ValueError, match=r"keep must be bool \[1, 2\] like expert_index, got int64 \[1, 2\]"
    ):
        _dispatch.counting_sort(ei, np.ones((1, 2), np.int64), 2)
    with pytest.raises(ValueError, match=r"got bool \[2, 1\]"):
        _dispatch.counting_sort(ei, np.ones((2, 1), bool), 2)
    with pytest.raises(ValueError, match=r"expert_index\[0, 1\] = 1 is outside"):
        _dispatch.counting_sort(ei, np.ones((1, 2), bool), 1)
    with pytest.raises(ValueError, match="int32"):
        _dispatch.counting_sort(ei.astype(np.int64), np.ones((1, 2), bool), 2)


# ----------------------------------------------------------------------------- gather_rows
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_rows_matches_reference(dtype, threads):
    rng = np.random.default_rng(5)
    for case in range(20):
        B, d, N = int(rng.integers(1, 40)), int(rng.integers(0, 10)), int(rng.integers(0, 80))
        x = rng.standard_normal((B, d)).astype(dtype)
        src = rng.integers(0, B, size=N).astype(np.int32 if case % 2 else np.int64)
        assert_identical(_dispatch.gather_rows(x, src), ref.gather_rows(x, src), f"case {case}")
    big = rng.standard_normal((500, 60)).astype(dtype)[:, ::2]  # strided
    src = rng.integers(0, 500, size=700).astype(np.int32)
    assert_identical(_dispatch.gather_rows(big, src), ref.gather_rows(big, src))


def test_gather_rows_rejects_bad_input():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"src_row\[1\] = 3 is outside the rows of x \[0, 3\)"):
        _dispatch.gather_rows(x, np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="outside"):
        _dispatch.gather_rows(x, np.array([-1], np.int32))
    with pytest.raises(
        ValueError, match=r"src_row must be a 1-D integer array \[N\], got float64 \[2\]"
    ):
        _dispatch.gather_rows(x, np.array([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"x must be float32 or float64 \[B, d\], got float16 \[3, 2\]"
    ):
        _dispatch.gather_rows(x.astype(np.float16), np.array([0], np.int32))


# ----------------------------------------------------------------------------- combine
@pytest.mark.parametrize("dtype", FLOATS)
def test_combine_matches_reference_bitwise(dtype, threads):
    rng = np.random.default_rng(6)
    for case in range(30):
        B, E = int(rng.integers(0, 50)), int(rng.integers(1, 10))
        k = int(rng.integers(1, E + 1))
        _, _, slot, out, weights, _ = routed_case(rng, B, E, k, (0.0, 1.0, 0.3)[case % 3], dtype)
        assert_identical(
            _dispatch.combine(out, slot, weights), ref.combine(out, slot, weights), f"case {case}"
        )


def test_combine_hand_example_and_noncontiguous(threads):
    out = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], np.float64)
    slot = np.array([[2, 0], [-1, 1], [-1, -1]], np.int32)
    w = np.array([[0.5, 2.0], [3.0, 0.25], [1.0, 1.0]])
    y = _dispatch.combine(out, slot, w)
    assert y.tolist() == [[52.0, 104.0], [2.5, 5.0], [0.0, 0.0]]
    rng = np.random.default_rng(7)
    _, _, slot, out, weights, _ = routed_case(rng, 400, 16, 2, 0.2, np.float32)
    out = rng.standard_normal((out.shape[0], 32)).astype(np.float32)
    out_f = np.asfortranarray(out)
    w_view = np.repeat(weights, 2, axis=1)[:, ::2]
    assert_identical(_dispatch.combine(out_f, slot, w_view), ref.combine(out, slot, weights))


@pytest.mark.parametrize("dtype", FLOATS)
def test_combine_backward_matches_reference(dtype, threads):
    rng = np.random.default_rng(8)
    for case in range(30):
        B, E = int(rng.integers(0, 50)), int(rng.integers(1, 10))
        k = int(rng.integers(1, E + 1))
        _, _, slot, out, weights, dy = routed_case(rng, B, E, k, (0.0, 1.0, 0.3)[case % 3], dtype)
        d_out, d_w = _dispatch.combine_backward(dy, out, slot, weights)
        want_out, want_w = ref.combine_backward(dy, out, slot, weights)
        assert_identical(d_out, want_out, f"case {case} d_out")
        assert_scaled_close(d_w, want_w, f"case {case} d_weights")
        assert np.all(d_w[slot < 0] == 0)
        # packed rows that no assignment points to get a zero gradient
        padded = np.concatenate([out, rng.standard_normal((3, out.shape[1])).astype(dtype)])
        d_pad, _ = _dispatch.combine_backward(dy, padded, slot, weights)
        assert_identical(d_pad, ref.combine_backward(dy, padded, slot, weights)[0])
        assert np.all(d_pad[out.shape[0] :] == 0)


def test_combine_backward_against_brute_force(threads):
    rng = np.random.default_rng(9)
    _, _, slot, out, weights, dy = routed_case(rng, 1000, 32, 2, 0.1, np.float64)
    out = rng.standard_normal((out.shape[0], 64))
    dy = rng.standard_normal((1000, 64))
    d_out, d_w = _dispatch.combine_backward(dy, out, slot, weights)
    want_out = np.zeros_like(out)
    want_w = np.zeros_like(weights)
    for b, j in zip(*np.nonzero(slot >= 0), strict=True):
        want_out[slot[b, j]] = weights[b, j] * dy[b]
        want_w[b, j] = math.fsum(out[slot[b, j]] * dy[b])
    assert_identical(d_out, want_out)
    assert_scaled_close(d_w, want_w)


def test_combine_rejects_bad_input():
    out = np.zeros((3, 2), np.float32)
    slot = np.array([[0, 1]], np.int32)
    w = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"slot\[0, 1\] = 3 is outside \[-1, 3\)"):
        _dispatch.combine(out, np.array([[0, 3]], np.int32), w)
    with pytest.raises(
        ValueError, match=r"weights must have the dtype of out \(float32\), got float64"
    ):
        _dispatch.combine(out, slot, w.astype(np.float64))
    with pytest.raises(ValueError, match=r"weights must be \[B, k\] = \[1, 2\] like slot"):
        _dispatch.combine(out, slot, np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match=r"slot must be int32 \[B, k\], got int64"):
        _dispatch.combine(out, slot.astype(np.int64), w)
    with pytest.raises(ValueError, match="claims a packed row another assignment already has"):
        _dispatch.combine_backward(
            np.zeros((1, 2), np.float32), out, np.array([[1, 1]], np.int32), w
        )
    with pytest.raises(ValueError, match=r"dy must be \[B, d\] = \[1, 2\]"):
        _dispatch.combine_backward(np.zeros((2, 2), np.float32), out, slot, w)
