"""Compiled grouped FFN (moe.bindings._grouped) against the numpy oracle and finite differences.

Float checks are norm-wise: max|ours - ref| <= rtol * max|ref| per output array, with rtol
1e-5 for float32 and 1e-12 for float64. Every schedule (parallel over experts, serial, auto) and
both per-expert paths (matrix-vector for few rows, gemm for many) are exercised.
"""

import numpy as np
import pytest
from gradcheck import numerical_grad

from moe.bindings import reference as ref

_grouped = pytest.importorskip("moe.bindings._grouped")

pytestmark = pytest.mark.kernels

FLOATS = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
SETTINGS = [  # (schedule, gemv_max_rows)
    ("auto", 8),
    ("auto", 0),
    ("experts", 1000),
    ("serial", 8),
    ("serial", 0),
]


@pytest.fixture
def schedule():
    """Set the kernel schedule for one test and restore it afterwards."""
    saved = _grouped._configure(parallel_min_flops=0)  # small shapes still reach the team
    yield lambda name, rows: _grouped._configure(schedule=name, gemv_max_rows=rows)
    _grouped._configure(**saved)


def assert_scaled_close(ours: np.ndarray, want: np.ndarray, name: str = "") -> None:
    assert ours.dtype == want.dtype, f"{name}: dtype {ours.dtype} != {want.dtype}"
    assert ours.shape == want.shape, f"{name}: shape {ours.shape} != {want.shape}"
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    err = float(np.abs(ours.astype(np.float64) - want).max(initial=0.0))
    assert err <= RTOL[want.dtype] * scale, f"{name}: max error {err:.3e} vs scale {scale:.3e}"


def make_bank(rng, E, d, h, dtype):
    w1 = (rng.standard_normal((E, d, h)) / np.sqrt(d)).astype(dtype)
    b1 = rng.standard_normal((E, h)).astype(dtype) * dtype(0.1)
    w2 = (rng.standard_normal((E, h, d)) / np.sqrt(h)).astype(dtype)
    b2 = rng.standard_normal((E, d)).astype(dtype) * dtype(0.1)
    return w1, b1, w2, b2


def make_offsets(rng, E, N, skew=False):
    """Random expert slices summing to N, with empty experts; skew puts most rows on one."""
    if skew:
        counts = rng.multinomial(N, np.r_[0.9, np.full(E - 1, 0.1 / max(E - 1, 1))][:E])
    else:
        p = rng.random(E) * (rng.random(E) < 0.7)
        p = p / p.sum() if p.sum() > 0 else np.full(E, 1.0 / E)
        counts = rng.multinomial(N, p)
    return np.r_[0, np.cumsum(counts)].astype(np.int64)


def packed_grads(offsets, bank, fill=0.0):
    """Gradient buffers for ffn_backward: one row per expert with rows (ascending)."""
    A = int(np.count_nonzero(np.diff(offsets)))
    return [np.full((A,) + a.shape[1:], fill, a.dtype) for a in bank]


def check_forward_backward(rng, E, d, h, N, dtype, activation, skew=False):
    w1, b1, w2, b2 = make_bank(rng, E, d, h, dtype)
    offsets = make_offsets(rng, E, N, skew)
    packed = rng.standard_normal((N, d)).astype(dtype)
    got = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, activation)
    want = ref.ffn_forward(packed, offsets, w1, b1, w2, b2, activation)
    for name, a, b in zip(("out", "pre", "act"), got, want, strict=True):
        assert_scaled_close(a, b, f"forward {name} E={E} d={d} h={h} N={N}")
    out_only = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, activation, keep=False)
    assert out_only[1] is None and out_only[2] is None
    np.testing.assert_array_equal(out_only[0], got[0])  # per-thread scratch: the same bits
    _, pre, act = want
    d_out = rng.standard_normal((N, d)).astype(dtype)
    ours = packed_grads(offsets, (w1, b1, w2, b2), 7.0)
    theirs = [a.copy() for a in ours]
    d_packed = _grouped.ffn_backward(d_out, packed, offsets, w1, w2, pre, act, activation, *ours)
    want_packed = ref.ffn_backward(d_out, packed, offsets, w1, w2, pre, act, activation, *theirs)
    assert_scaled_close(d_packed, want_packed, f"d_packed E={E} N={N}")
    for name, a, b in zip(("dw1", "db1", "dw2", "db2"), ours, theirs, strict=True):
        assert_scaled_close(a, b, f"{name} E={E} N={N}")
        assert not np.any(a == 7.0), f"{name}: a packed gradient row was not written"
    check_implicit(d_out, packed, offsets, w1, w2, pre, act, activation, ours, d_packed)


def check_implicit(d_out, packed, offsets, w1, w2, pre, act, activation, full, d_full):
    """implicit=2: experts with 1-2 rows get no gradient rows but d_pre; the others the rows
    of the full run (the same bits), and the factors give the full run's gradients."""
    from moe.optim import LowRank

    counts = np.diff(offsets)
    touched = np.flatnonzero(counts)
    many, few = touched[counts[touched] > 2], touched[counts[touched] <= 2]
    N, h = pre.shape
    got = {}
    for name, impl in (("compiled", _grouped), ("reference", ref)):
        bufs = [np.full((many.size,) + a.shape[1:], 7.0, a.dtype) for a in full]
        d_pre = np.full((N, h), 7.0, pre.dtype)
        d_x = impl.ffn_backward(d_out, packed, offsets, w1, w2, pre, act, activation, *bufs, d_pre, 2)
        got[name] = (d_x, bufs, d_pre)
    d_x, bufs, d_pre = got["compiled"]
    np.testing.assert_array_equal(d_x, d_full)
    at = np.searchsorted(touched, many)
    for a, b in zip(bufs, full, strict=True):
        np.testing.assert_array_equal(a, b[at])
    assert_scaled_close(d_pre, got["reference"][2], "d_pre")
    for a, b in zip(bufs, got["reference"][1], strict=True):
        assert_scaled_close(a, b, "implicit packed rows")
    s, c = offsets[few], counts[few]
    at = np.searchsorted(touched, few)
    d, hh = w1.shape[1:]
    for u, v, shape, want in ((packed, d_pre, (d, hh), full[0]), (None, d_pre, (hh,), full[1]),
                              (act, d_out, (hh, d), full[2]), (None, d_out, (d,), full[3])):
        assert_scaled_close(LowRank(u, v, s, c, shape).materialize(), want[at], "factors")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ffn_matches_reference_on_random_shapes(dtype, activation, schedule):
    rng = np.random.default_rng(11 if dtype is np.float32 else 12)
    for case in range(12):
        schedule(*SETTINGS[case % len(SETTINGS)])
        E = int(rng.choice([1, 2, 3, 7, 16]))
        d, h = int(rng.integers(1, 12)), int(rng.integers(1, 20))
        N = int(rng.choice([0, 1, 5, 40, 90]))
        check_forward_backward(rng, E, d, h, N, dtype, activation, skew=case % 4 == 3)


@pytest.mark.parametrize("setting", SETTINGS)
def test_ffn_big_expert_runs_alone_with_row_parallel_loops(setting, schedule):
    # ~360 rows x h=192 on one dominant expert: the "alone" path with row-parallel elementwise loops
    schedule(*setting)
    rng = np.random.default_rng(13)
    check_forward_backward(rng, 3, 16, 192, 400, np.float32, "gelu", skew=True)
    check_forward_backward(rng, 1, 8, 128, 600, np.float64, "relu")


def test_ffn_single_row_and_k_equals_all_experts(schedule):
    rng = np.random.default_rng(14)
    for setting in SETTINGS:
        schedule(*setting)
        check_forward_backward(rng, 1, 5, 7, 1, np.float64, "gelu")
        # every expert gets exactly one row (top-k with k = E on a single example)
        w1, b1, w2, b2 = make_bank(rng, 4, 3, 6, np.float32)
        offsets = np.arange(5, dtype=np.int64)
        packed = rng.standard_normal((4, 3)).astype(np.float32)
        got = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, "relu")
        want = ref.ffn_forward(packed, offsets, w1, b1, w2, b2, "relu")
        for a, b in zip(got, want, strict=True):
            assert_scaled_close(a, b)


def test_ffn_hand_computed_relu():
    # one expert, d = h = 1: out = relu(x * 2 - 1) * 3 + 0.5
    w1, b1 = np.array([[[2.0]]]), np.array([[-1.0]])
    w2, b2 = np.array([[[3.0]]]), np.array([[0.5]])
    x = np.array([[0.25], [2.0]])
    out, pre, act = _grouped.ffn_forward(x, np.array([0, 2]), w1, b1, w2, b2, "relu")
    assert pre.ravel().tolist() == [-0.5, 3.0]
    assert act.ravel().tolist() == [0.0, 3.0]
    assert out.ravel().tolist() == [0.5, 9.5]
    grads = [np.zeros((1, 1, 1)), np.zeros((1, 1)), np.zeros((1, 1, 1)), np.zeros((1, 1))]
    d_x = _grouped.ffn_backward(
        np.ones((2, 1)), x, np.array([0, 2]), w1, w2, pre, act, "relu", *grads
    )
    assert d_x.ravel().tolist() == [0.0, 6.0]  # only the live row: 3 * 2
    assert grads[2].item() == 3.0  # dw2 = sum of act
    assert grads[1].item() == 3.0  # db1 = 3 on the live row
    assert grads[0].item() == 6.0  # dw1 = x * 3 on the live row


@pytest.mark.parametrize("impl", [_grouped, ref], ids=["compiled", "numpy"])
def test_relu_slope_at_exactly_zero_is_zero_on_both_paths(impl):
    """pre = 0.5 * 2 - 1 = 0 exactly: the subgradient both paths use there is 0 (relu'(0) = 0)."""
    w1, b1 = np.array([[[2.0]]]), np.array([[-1.0]])
    w2, b2 = np.array([[[3.0]]]), np.array([[0.5]])
    x = np.array([[0.5], [2.0]])
    out, pre, act = impl.ffn_forward(x, np.array([0, 2]), w1, b1, w2, b2, "relu")
    assert pre.ravel().tolist() == [0.0, 3.0]
    grads = [np.zeros((1, 1, 1)), np.zeros((1, 1)), np.zeros((1, 1, 1)), np.zeros((1, 1))]
    d_x = impl.ffn_backward(np.ones((2, 1)), x, np.array([0, 2]), w1, w2, pre, act, "relu", *grads)
    assert d_x.ravel().tolist() == [0.0, 6.0]
    assert grads[1].item() == 3.0  # db1: the row at zero adds nothing


def test_ffn_gelu_matches_the_normal_cdf_formula():
    from scipy.stats import norm

    rng = np.random.default_rng(15)
    x = rng.standard_normal((9, 1)) * 3
    one = np.ones((1, 1, 1))
    _, pre, act = _grouped.ffn_forward(
        x, np.array([0, 9]), one, np.zeros((1, 1)), one, np.zeros((1, 1)), "gelu"
    )
    np.testing.assert_allclose(
        act.ravel(), x.ravel() * norm.cdf(x.ravel()), rtol=1e-14, atol=1e-300
    )


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_derivative_at_edge_values(dtype):
    """d/dx x Phi(x) = Phi(x) + x phi(x) near 0, at the GELU minimum and deep in the tails."""
    from scipy.special import ndtr

    x = np.array(
        [0.0, -0.0, 1e-30, -1e-30, 1e-10, -0.7517916, -5, -13, -20, -40, 0.5, 3, 10], dtype
    )[:, None]
    n = x.shape[0]
    one, zero = np.ones((1, 1, 1), dtype), np.zeros((1, 1), dtype)
    offsets = np.array([0, n])
    _, pre, act = _grouped.ffn_forward(x, offsets, one, zero, one, zero, "gelu")
    grads = packed_grads(offsets, (one, zero, one, zero))
    d_x = _grouped.ffn_backward(np.ones_like(x), x, offsets, one, one, pre, act, "gelu", *grads)
    xd = x.astype(np.float64).ravel()
    with np.errstate(under="ignore"):
        want = ndtr(xd) + xd * np.exp(-0.5 * xd * xd) / np.sqrt(2 * np.pi)
    err = np.abs(d_x.ravel().astype(np.float64) - want)
    assert err.max() <= (2.5e-7 if dtype is np.float32 else 1e-15), err


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("setting", [("auto", 8), ("auto", 0)])
def test_ffn_backward_against_finite_differences(activation, setting, schedule):
    schedule(*setting)
    rng = np.random.default_rng(16)
    E, d, h, N = 3, 3, 4, 7
    w1, b1, w2, b2 = make_bank(rng, E, d, h, np.float64)
    offsets = np.array([0, 3, 3, 7], np.int64)
    packed = rng.standard_normal((N, d))
    probe = rng.standard_normal((N, d))

    def loss() -> float:
        out, _, _ = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, activation)
        return float(np.sum(out * probe))

    _, pre, act = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, activation)
    grads = packed_grads(offsets, (w1, b1, w2, b2))
    d_packed = _grouped.ffn_backward(probe, packed, offsets, w1, w2, pre, act, activation, *grads)
    live = np.flatnonzero(np.diff(offsets))  # expert 1 has no rows and no gradient row
    for analytic, arr, rows in zip([d_packed, *grads], [packed, w1, b1, w2, b2], [slice(None)] + [live] * 4, strict=True):
        numeric = numerical_grad(loss, arr)
        err = np.abs(analytic - numeric[rows]).max()
        assert err <= 1e-6 * max(1.0, np.abs(numeric).max()), err


def test_ffn_accepts_noncontiguous_inputs_and_gradient_buffers():
    rng = np.random.default_rng(17)
    E, d, h, N = 4, 5, 6, 30
    w1, b1, w2, b2 = make_bank(rng, E, d, h, np.float32)
    offsets = make_offsets(rng, E, N)
    packed = rng.standard_normal((N, 2 * d)).astype(np.float32)[:, ::2]
    w1_t = np.ascontiguousarray(w1.transpose(0, 2, 1)).transpose(0, 2, 1)  # same values, strided
    got = _grouped.ffn_forward(packed, offsets, w1_t, b1, np.asfortranarray(w2), b2, "gelu")
    want = ref.ffn_forward(np.ascontiguousarray(packed), offsets, w1, b1, w2, b2, "gelu")
    for a, b in zip(got, want, strict=True):
        assert_scaled_close(a, b)
    _, pre, act = want
    d_out = rng.standard_normal((N, d)).astype(np.float32)
    A = int(np.count_nonzero(np.diff(offsets)))
    ours = [
        np.full((A, h, d), 7, np.float32).transpose(0, 2, 1),  # dw1 [A, d, h], not contiguous
        np.full((h, A), 7, np.float32).T,
        np.full((A, h, d), 7, np.float32),
        np.full((A, 2 * d), 7, np.float32)[:, ::2],
    ]
    theirs = [np.array(a) for a in ours]
    d1 = _grouped.ffn_backward(d_out, packed, offsets, w1_t, w2, pre, act, "gelu", *ours)
    d2 = ref.ffn_backward(
        d_out, np.ascontiguousarray(packed), offsets, w1, w2, pre, act, "gelu", *theirs
    )
    assert_scaled_close(d1, d2)
    for a, b in zip(ours, theirs, strict=True):
        assert_scaled_close(np.ascontiguousarray(a), b)


def test_ffn_rejects_bad_input():
    rng = np.random.default_rng(18)
    w1, b1, w2, b2 = make_bank(rng, 2, 3, 4, np.float32)
    x = np.zeros((5, 3), np.float32)
    off = np.array([0, 2, 5])
    fwd = _grouped.ffn_forward
    with pytest.raises(
        ValueError, match=r"activation must be one of \('relu', 'gelu'\), got 'tanh'"
    ):
        fwd(x, off, w1, b1, w2, b2, "tanh")
    with pytest.raises(
        ValueError, match=r"packed must be float32 or float64 \[N, d\], got int64 \[5, 3\]"
    ):
        fwd(x.astype(np.int64), off, w1, b1, w2, b2, "relu")
    with pytest.raises(
        ValueError, match=r"w1 must have the dtype of packed \(float64\), got float32"
    ):
        fwd(x.astype(np.float64), off, w1, b1, w2, b2, "relu")
    with pytest.raises(ValueError, match="packed rows have 4 features, but w1 expects d = 3"):
        fwd(np.zeros((5, 4), np.float32), off, w1, b1, w2, b2, "relu")
    with pytest.raises(
        ValueError, match=r"w1 must be float32 or float64 \[E, d, h\], got float32 \[3, 4\]"
    ):
        fwd(x, off, w1[0], b1, w2, b2, "relu")
    with pytest.raises(
        ValueError, match=r"b1 must be float32 \[E, h\] = \[2, 4\], got float32 \[2, 3\]"
    ):
        fwd(x, off, w1, b2, w2, b2, "relu")
    with pytest.raises(
        ValueError, match="offsets must run from 0 to N = 5 packed rows, got 0 .. 4"
    ):
        fwd(x, np.array([0, 2, 4]), w1, b1, w2, b2, "relu")
    with pytest.raises(
        ValueError, match=r"offsets must not decrease, got offsets\[0\] = 0 > offsets\[1\] = -1"
    ):
        fwd(x, np.array([0, -1, 5]), w1, b1, w2, b2, "relu")
    with pytest.raises(
        ValueError, match=r"offsets must be an integer array \[E\+1\] = \[3\], got float64 \[3\]"
    ):
        fwd(x, np.array([0.0, 2.0, 5.0]), w1, b1, w2, b2, "relu")
    out, pre, act = fwd(x, off, w1, b1, w2, b2, "relu")
    grads = packed_grads(off, (w1, b1, w2, b2))
    bwd = _grouped.ffn_backward
    with pytest.raises(
        ValueError, match=r"d_out must be float32 \[N, 3\] = \[5, 3\], got float32 \[4, 3\]"
    ):
        bwd(out[:4], x, off, w1, w2, pre, act, "relu", *grads)
    with pytest.raises(
        ValueError, match=r"dw1 must be a float32 array \[2, 3, 4\], got float64 \[2, 3, 4\]"
    ):
        bwd(out, x, off, w1, w2, pre, act, "relu", grads[0].astype(np.float64), *grads[1:])
    with pytest.raises(  # one gradient row per expert with rows: [1, ...] when only one has rows
        ValueError, match=r"dw1 must be a float32 array \[1, 3, 4\], got float32 \[2, 3, 4\]"
    ):
        bwd(out, x, np.array([0, 0, 5]), w1, w2, pre, act, "relu", *grads)
    frozen = grads[3].copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="db2 must be writable"):
        bwd(out, x, off, w1, w2, pre, act, "relu", *grads[:3], frozen)


def test_schedule_info_and_configure_round_trip():
    info = _grouped.schedule_info()
    assert info["schedule"] in ("auto", "experts", "serial") and info["threads"] >= 1
    saved = _grouped._configure(schedule="serial", gemv_max_rows=3)
    try:
        assert _grouped.schedule_info()["schedule"] == "serial"
        assert _grouped.schedule_info()["gemv_max_rows"] == 3
        with pytest.raises(ValueError, match="schedule must be one of"):
            _grouped._configure(schedule="fast")
    finally:
        _grouped._configure(**saved)
    assert _grouped.schedule_info()["schedule"] == info["schedule"]
    if info["blas_thread_control"] is not None:  # the kernels restore BLAS's own thread count
        assert _grouped.schedule_info()["blas_threads"] == info["blas_threads"]
