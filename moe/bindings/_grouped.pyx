"""Compiled grouped FFN: every expert's two-layer MLP on its own slice of the packed rows.

Twins of `ffn_forward` / `ffn_backward` in `moe.bindings.reference` (same arguments, same
outputs, the same packed weight gradients: one row per expert that got rows). The loop
over experts is a C loop; each expert calls BLAS (sgemm/dgemm, sgemv/dgemv from
scipy.linalg.cython_blas) directly, and the bias add and activation are fused C loops.

Schedule (chosen by measurement on 2 cores; see bench/kernels.py):
- Experts run in parallel, one per thread (`prange`, dynamic schedule, biggest experts first),
  and BLAS is switched to one thread for that phase. A serial loop over experts with OpenBLAS's
  own threads was 2x slower at E = 8 and up to 30x slower at E = 64 on a busy machine (its
  spinning pool and the other work fight over the two cores); one single-threaded call per
  expert needs no synchronisation at all.
- An expert too big to share (it holds more than 1/T of the remaining rows, T = OpenMP threads)
  runs first, alone, with multi-threaded BLAS and row-parallel elementwise loops.
- A call below `_parallel_min_flops` (forward FLOPs, ~1 ms on one core) runs every expert in a
  serial loop on one thread: on a busy machine each parallel region can wait milliseconds
  for a thread to be scheduled (measured in bench/RESULTS.md, the busy-machine section).
- Without a way to set the BLAS thread count (a BLAS other than OpenBLAS), with one OpenMP
  thread, or in a child forked after this process ran OpenMP (GNU OpenMP would hang there),
  every expert runs in a serial loop with BLAS's own threading.
- An expert with at most GEMV_MAX_ROWS rows multiplies by its weights with one matrix-vector
  product per row: OpenBLAS's gemm packs the whole weight matrix on every call (~60 us for
  256 x 512 floats), which dominates at a few rows, while gemv streams it. The weight
  gradients (small operands, big output) always use gemm, which beat a C rank-n loop 2-3x.
The BLAS thread count is set through moe.bindings._blas and restored after each call.
GELU: act = x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2 from libm; the backward reads Phi back
from act (see `_act_grad_row`). `schedule_info()` reports the live choices; `_configure()`
overrides them for benchmarks and tests.
"""

import numpy as np

cimport openmp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport M_SQRT1_2, erfc, exp, expf, fabs
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from moe.bindings._blas cimport _gemm, _gemv, blas_single_enter, blas_single_exit, blas_threads_controllable

from moe.bindings._blas import blas_thread_info
from moe.bindings._dispatch import _claim_threads, _describe, _float_array

cdef enum:
    RELU = 0
    GELU = 1
    # Below this many elements an elementwise pass of a big expert stays on one thread.
    PARALLEL_MIN_WORK = 65536
    SCHEDULE_AUTO = 0
    SCHEDULE_EXPERTS = 1
    SCHEDULE_SERIAL = 2

cdef double INV_SQRT_2PI = 0.39894228040143267794
cdef int GEMV_MAX_ROWS = 8
# Below this many forward FLOPs (rows x 4 d h, about 1 ms on one core) the "auto" schedule runs
# the experts in a serial loop: a parallel region waits for every thread of the team, and on
# a machine shared with other work a thread can wait a scheduler time slice (milliseconds)
# to run, which small calls (the default job's: 16 MFLOP) cannot amortise. See
# bench/RESULTS.md, "The whole step on a busy machine".
cdef double _parallel_min_flops = 1 << 26
cdef int _schedule = SCHEDULE_AUTO
_SCHEDULES = {"auto": SCHEDULE_AUTO, "experts": SCHEDULE_EXPERTS, "serial": SCHEDULE_SERIAL}
_ACTIVATIONS = {"relu": RELU, "gelu": GELU}
_INT_MAX = np.iinfo(np.int32).max


def schedule_info() -> dict:
    """How the expert loop is scheduled here: for benchmarks and bug reports."""
    name = {v: k for k, v in _SCHEDULES.items()}[_schedule]
    return {
        "schedule": name,
        "threads": openmp.omp_get_max_threads(),
        **blas_thread_info(),
        "gemv_max_rows": GEMV_MAX_ROWS,
        "parallel_min_flops": _parallel_min_flops,
    }


def _configure(schedule=None, gemv_max_rows=None, parallel_min_flops=None) -> dict:
    """Override the schedule ("auto" | "experts" | "serial"), the matrix-vector cut-off or the
    size below which "auto" runs serially (tests use 0 to reach the parallel paths).

    For benchmarks and tests only; returns the previous settings so callers can restore them.
    """
    global _schedule, GEMV_MAX_ROWS, _parallel_min_flops
    old = {"schedule": schedule_info()["schedule"], "gemv_max_rows": GEMV_MAX_ROWS,
           "parallel_min_flops": _parallel_min_flops}
    if schedule is not None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}")
        _schedule = _SCHEDULES[schedule]
    if gemv_max_rows is not None:
        if int(gemv_max_rows) < 0:
            raise ValueError(f"gemv_max_rows must be >= 0, got {gemv_max_rows}")
        GEMV_MAX_ROWS = int(gemv_max_rows)
    if parallel_min_flops is not None:
        if not parallel_min_flops >= 0:
            raise ValueError(f"parallel_min_flops must be >= 0, got {parallel_min_flops}")
        _parallel_min_flops = float(parallel_min_flops)
    return old


# ----------------------------------------------------------------------------- C loops
cdef inline void _bias_act_row(
    floating* p, floating* a, const floating* b, Py_ssize_t h, int kind
) noexcept nogil:
    """pre += b1; act = f(pre) on one row."""
    cdef Py_ssize_t j
    cdef floating v
    if kind == RELU:
        for j in range(h):
            v = p[j] + b[j]
            p[j] = v
            a[j] = v if not (v < 0) else 0  # np.maximum(v, 0): NaN and -0.0 pass through
    else:
        for j in range(h):
            v = p[j] + b[j]
            p[j] = v
            a[j] = v * <floating>(0.5 * erfc(-<double>v * M_SQRT1_2))  # x * Phi(x)


cdef inline void _act_grad_row(
    floating* g, const floating* p, const floating* a, Py_ssize_t h, int kind
) noexcept nogil:
    """d_pre = d_act * f'(pre) on one row; f'(x) = Phi(x) + x phi(x) for GELU.

    Phi(x) is read back from the forward's act = x * Phi(x) instead of a second erfc (erfc
    costs ~30 ns, four times the exp). The error stays at the rounding of act (one ulp of
    Phi), the same size as the reference's float32 Phi; |x| < 1e-20 uses Phi = 1/2.
    """
    cdef Py_ssize_t j
    cdef floating v
    cdef double phi_cdf, pdf
    if kind == RELU:
        for j in range(h):
            g[j] = g[j] * (<floating>1 if p[j] > 0 else <floating>0)
    else:
        for j in range(h):
            v = p[j]
            phi_cdf = <double>a[j] / v if fabs(v) >= 1e-20 else 0.5
            if floating is float:
                pdf = expf(<float>-0.5 * v * v) * INV_SQRT_2PI  # float32 exp, like the reference
            else:
                pdf = exp(-0.5 * v * v) * INV_SQRT_2PI
            g[j] = g[j] * <floating>(phi_cdf + v * pdf)


cdef inline void _add_row(floating* o, const floating* b, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(d):
        o[j] = o[j] + b[j]


cdef void _bias_act_rows(
    floating* p, floating* a, const floating* b, Py_ssize_t n, Py_ssize_t h, int kind, bint par
) noexcept nogil:
    cdef Py_ssize_t r
    if par and n > 1 and n * h >= PARALLEL_MIN_WORK:
        for r in prange(n, schedule="static"):
            _bias_act_row(p + r * h, a + r * h, b, h, kind)
    else:
        for r in range(n):
            _bias_act_row(p + r * h, a + r * h, b, h, kind)


cdef void _act_grad_rows(
    floating* g, const floating* p, const floating* a, Py_ssize_t n, Py_ssize_t h, int kind,
    bint par,
) noexcept nogil:
    cdef Py_ssize_t r
    if par and n > 1 and n * h >= PARALLEL_MIN_WORK:
        for r in prange(n, schedule="static"):
            _act_grad_row(g + r * h, p + r * h, a + r * h, h, kind)
    else:
        for r in range(n):
            _act_grad_row(g + r * h, p + r * h, a + r * h, h, kind)


cdef void _bias_rows(floating* o, const floating* b, Py_ssize_t n, Py_ssize_t d, bint par) noexcept nogil:
    cdef Py_ssize_t r
    if par and n > 1 and n * d >= PARALLEL_MIN_WORK:
        for r in prange(n, schedule="static"):
            _add_row(o + r * d, b, d)
    else:
        for r in range(n):
            _add_row(o + r * d, b, d)


cdef inline void _colsum(const floating* g, Py_ssize_t n, Py_ssize_t q, floating* out) noexcept nogil:
    """out[q] = g[0] + g[1] + ... + g[n-1], rows in order (numpy's axis-0 sum order)."""
    cdef Py_ssize_t r
    memcpy(out, g, q * sizeof(floating))
    for r in range(1, n):
        _add_row(out, g + r * q, q)


# ----------------------------------------------------------------------------- one expert
cdef void _forward_expert(
    Py_ssize_t e, const int64_t* offsets, const floating* x,
    const floating* w1, const floating* b1, const floating* w2, const floating* b2,
    floating* pre, floating* act, floating* out, int d, int h, int kind, bint par, bint scratch,
) noexcept nogil:
    """Rows s..t of expert e: pre = x W1 + b1, act = f(pre), out = act W2 + b2.

    scratch: pre and act are one [n, h] block of this thread (act written over pre), not the
    kept [N, h] arrays; for forwards that no backward follows."""
    cdef Py_ssize_t s = offsets[e], n = offsets[e + 1] - offsets[e], r
    cdef Py_ssize_t dh = <Py_ssize_t>d * h
    cdef const floating* w1e = w1 + e * dh
    cdef const floating* w2e = w2 + e * dh
    x += s * d
    if not scratch:
        pre += s * h
        act += s * h
    out += s * d
    if n <= GEMV_MAX_ROWS:
        for r in range(n):
            _gemv(c"N", h, d, w1e, h, x + r * d, pre + r * h)  # pre[r] = x[r] @ w1   [h]
    else:
        _gemm(c"N", c"N", h, <int>n, d, w1e, h, x, d, pre, h)  # [n, h]
    _bias_act_rows(pre, act, b1 + e * h, n, h, kind, par)  # [n, h]
    if n <= GEMV_MAX_ROWS:
        for r in range(n):
            _gemv(c"N", d, h, w2e, d, act + r * h, out + r * d)  # out[r] = act[r] @ w2   [d]
    else:
        _gemm(c"N", c"N", d, <int>n, h, w2e, d, act, h, out, d)  # [n, d]
    _bias_rows(out, b2 + e * d, n, d, par)  # [n, d]


cdef void _backward_expert(
    Py_ssize_t e, const int64_t* offsets, const int64_t* gslot, const floating* g,
    const floating* x, const floating* w1, const floating* w2, const floating* pre,
    const floating* act, floating* d_pre, floating* d_x, floating* dw1, floating* db1,
    floating* dw2, floating* db2, int d, int h, int kind, bint par, bint kept_pre,
) noexcept nogil:
    """Gradients of expert e from its rows s..t; writes dw1/db1/dw2/db2[gslot[e]] (the packed
    gradient row of e; gslot[e] < 0: none, the gradient stays as factors) and d_x rows.

    d_pre is this expert's [n, h] block: of the kept [N, h] array (kept_pre) or else scratch
    (a per-thread buffer, reused across the experts a thread runs, so it stays in cache)."""
    cdef Py_ssize_t s = offsets[e], n = offsets[e + 1] - offsets[e], r
    cdef Py_ssize_t dh = <Py_ssize_t>d * h, q = gslot[e]
    cdef bint few = n <= GEMV_MAX_ROWS
    cdef const floating* w1e = w1 + e * dh
    cdef const floating* w2e = w2 + e * dh
    cdef floating* dw1e = dw1 + q * dh if q >= 0 else NULL
    cdef floating* dw2e = dw2 + q * dh if q >= 0 else NULL
    g += s * d
    x += s * d
    pre += s * h
    act += s * h
    d_x += s * d
    if kept_pre:
        d_pre += s * h
    if q >= 0:
        _gemm(c"N", c"T", d, h, <int>n, g, d, act, h, dw2e, d)  # dw2 [h, d] = act^T g
        _colsum(g, n, d, db2 + q * d)  # [d]
    if few:  # d_pre [n, h] = g w2^T
        for r in range(n):
            _gemv(c"T", d, h, w2e, d, g + r * d, d_pre + r * h)  # [h]
    else:
        _gemm(c"T", c"N", h, <int>n, d, w2e, d, g, d, d_pre, h)
    _act_grad_rows(d_pre, pre, act, n, h, kind, par)  # [n, h]
    if q >= 0:
        _gemm(c"N", c"T", h, d, <int>n, d_pre, h, x, d, dw1e, h)  # dw1 [d, h] = x^T d_pre
        _colsum(d_pre, n, h, db1 + q * h)  # [h]
    if few:  # d_x [n, d] = d_pre w1^T
        for r in range(n):
            _gemv(c"T", h, d, w1e, h, d_pre + r * h, d_x + r * d)  # [d]
    else:
        _gemm(c"T", c"N", d, <int>n, h, w1e, h, d_pre, h, d_x, d)


# ----------------------------------------------------------------------------- schedule
cdef inline bint _worth_threads(const int64_t[::1] offsets, int d, int h):
    """Whether this call is big enough for the OpenMP team (always, when forced to "experts")."""
    cdef Py_ssize_t E = offsets.shape[0] - 1
    if _schedule == SCHEDULE_EXPERTS:
        return True
    return <double>(offsets[E] - offsets[0]) * 4.0 * d * h >= _parallel_min_flops


cdef tuple _plan(const int64_t[::1] offsets, int d, int h):
    """Split the experts that got rows into (alone, shared): see the module docstring."""
    cdef Py_ssize_t E = offsets.shape[0] - 1, e, i, n_alone = 0, n_shared = 0, n_front = 0
    cdef int T = openmp.omp_get_max_threads()
    cdef int64_t rows, remaining = offsets[E] - offsets[0], best_rows
    cdef bint share = T > 1 and _schedule != SCHEDULE_SERIAL and _worth_threads(offsets, d, h) and (
        blas_threads_controllable() or _schedule == SCHEDULE_EXPERTS
    ) and _claim_threads()
    cdef Py_ssize_t best
    alone_arr = np.empty(E, dtype=np.int64)
    shared_arr = np.empty(E, dtype=np.int64)
    cdef int64_t[::1] alone = alone_arr
    cdef int64_t[::1] shared = shared_arr
    with nogil:
        for e in range(E):
            if offsets[e + 1] > offsets[e]:
                shared[n_shared] = e
                n_shared += 1
        if not share:
            for i in range(n_shared):
                alone[i] = shared[i]
            n_alone, n_shared = n_shared, 0
        elif _schedule == SCHEDULE_AUTO:
            while n_shared > 0:  # peel off experts bigger than a thread's fair share
                best, best_rows = 0, -1
                for i in range(n_shared):
                    rows = offsets[shared[i] + 1] - offsets[shared[i]]
                    if rows > best_rows:
                        best, best_rows = i, rows
                if best_rows * T <= remaining or best_rows <= GEMV_MAX_ROWS:
                    break
                alone[n_alone] = shared[best]
                n_alone += 1
                remaining -= best_rows
                for i in range(best, n_shared - 1):
                    shared[i] = shared[i + 1]
                n_shared -= 1
            for i in range(n_shared):  # large experts first, so the dynamic schedule ends even
                rows = offsets[shared[i] + 1] - offsets[shared[i]]
                if rows * 4 * T >= remaining:
                    e = shared[i]
                    shared[i] = shared[n_front]
                    shared[n_front] = e
                    n_front += 1
    return alone_arr[:n_alone], shared_arr[:n_shared]


def _forward_impl(
    const floating[:, ::1] x, const int64_t[::1] offsets,
    const floating[:, :, ::1] w1, const floating[:, ::1] b1,
    const floating[:, :, ::1] w2, const floating[:, ::1] b2, int kind,
    floating[:, ::1] pre, floating[:, ::1] act, floating[:, ::1] out, bint keep,
) -> None:
    """keep=False: pre and act are per-thread scratch [T * most, h] (see _forward_expert)."""
    cdef int d = w1.shape[1], h = w1.shape[2]
    cdef Py_ssize_t i, most = 0
    alone_arr, shared_arr = _plan(offsets, d, h)
    cdef const int64_t[::1] alone = alone_arr
    cdef const int64_t[::1] shared = shared_arr
    cdef Py_ssize_t n_alone = alone.shape[0], n_shared = shared.shape[0]
    if x.shape[0] == 0:
        return
    if not keep:
        most = pre.shape[0] // openmp.omp_get_max_threads()
    cdef Py_ssize_t block = most * h
    cdef const int64_t* off = &offsets[0]
    cdef const floating* xp = &x[0, 0]
    cdef const floating* w1p = &w1[0, 0, 0]
    cdef const floating* b1p = &b1[0, 0]
    cdef const floating* w2p = &w2[0, 0, 0]
    cdef const floating* b2p = &b2[0, 0]
    cdef floating* prep = &pre[0, 0]
    cdef floating* actp = &act[0, 0]
    cdef floating* outp = &out[0, 0]
    cdef bint rows_par = (
        n_alone > 0 and openmp.omp_get_max_threads() > 1 and _worth_threads(offsets, d, h) and _claim_threads()
    )
    with nogil:
        for i in range(n_alone):
            _forward_expert(
                alone[i], off, xp, w1p, b1p, w2p, b2p, prep, actp, outp, d, h, kind, rows_par, not keep
            )
    if n_shared == 0:
        return
    cdef bint single = blas_single_enter()
    try:
        with nogil:
            for i in prange(n_shared, schedule="dynamic", chunksize=1):
                _forward_expert(
                    shared[i], off, xp, w1p, b1p, w2p, b2p, prep + threadid() * block,
                    actp + threadid() * block, outp, d, h, kind, False, not keep,
                )
    finally:
        if single:
            blas_single_exit()


def _backward_impl(
    const floating[:, ::1] g, const floating[:, ::1] x, const int64_t[::1] offsets,
    const floating[:, :, ::1] w1, const floating[:, :, ::1] w2,
    const floating[:, ::1] pre, const floating[:, ::1] act, int kind,
    floating[:, :, ::1] dw1, floating[:, ::1] db1, floating[:, :, ::1] dw2, floating[:, ::1] db2,
    floating[:, ::1] d_x, floating[:, ::1] kept, Py_ssize_t implicit,
) -> None:
    """kept: d_pre [N, h] output, or [0, h] (scratch only). Experts with at most `implicit`
    rows get no packed gradient row."""
    cdef int d = w1.shape[1], h = w1.shape[2]
    cdef Py_ssize_t i, e, most = 0
    cdef bint kept_pre = kept.shape[0] > 0
    alone_arr, shared_arr = _plan(offsets, d, h)
    cdef const int64_t[::1] alone = alone_arr
    cdef const int64_t[::1] shared = shared_arr
    cdef Py_ssize_t n_alone = alone.shape[0], n_shared = shared.shape[0]
    if x.shape[0] == 0:
        return
    cdef int T = openmp.omp_get_max_threads()
    gslot_arr = np.empty(offsets.shape[0] - 1, dtype=np.int64)  # expert -> packed gradient row
    cdef int64_t[::1] gslot = gslot_arr
    cdef int64_t q = 0
    for e in range(offsets.shape[0] - 1):
        most = max(most, offsets[e + 1] - offsets[e])
        if offsets[e + 1] - offsets[e] > implicit:
            gslot[e] = q
            q += 1
        else:
            gslot[e] = -1
    # d_pre scratch: one [most, h] block per thread  # [T, most, h]
    scratch = np.empty((T, 0 if kept_pre else most, h), dtype=np.float32 if floating is float else np.float64)
    cdef floating[:, :, ::1] d_pre = scratch
    cdef const int64_t* off = &offsets[0]
    cdef const int64_t* gs = &gslot[0]
    cdef const floating* gp = &g[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef const floating* w1p = &w1[0, 0, 0]
    cdef const floating* w2p = &w2[0, 0, 0]
    cdef const floating* prep = &pre[0, 0]
    cdef const floating* actp = &act[0, 0]
    cdef floating* dw1p = &dw1[0, 0, 0]
    cdef floating* db1p = &db1[0, 0]
    cdef floating* dw2p = &dw2[0, 0, 0]
    cdef floating* db2p = &db2[0, 0]
    cdef floating* dpp = &kept[0, 0] if kept_pre else &d_pre[0, 0, 0]
    cdef floating* dxp = &d_x[0, 0]
    cdef Py_ssize_t block = 0 if kept_pre else most * h
    cdef bint rows_par = n_alone > 0 and T > 1 and _worth_threads(offsets, d, h) and _claim_threads()
    with nogil:
        for i in range(n_alone):
            _backward_expert(
                alone[i], off, gs, gp, xp, w1p, w2p, prep, actp, dpp, dxp,
                dw1p, db1p, dw2p, db2p, d, h, kind, rows_par, kept_pre,
            )
    if n_shared == 0:
        return
    cdef bint single = blas_single_enter()
    try:
        with nogil:
            for i in prange(n_shared, schedule="dynamic", chunksize=1):
                _backward_expert(
                    shared[i], off, gs, gp, xp, w1p, w2p, prep, actp, dpp + threadid() * block, dxp,
                    dw1p, db1p, dw2p, db2p, d, h, kind, False, kept_pre,
                )
    finally:
        if single:
            blas_single_exit()


# ----------------------------------------------------------------------------- checks
def _activation_kind(activation) -> int:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    return _ACTIVATIONS[activation]


def _check_offsets(offsets, Py_ssize_t E, Py_ssize_t N):
    """int64 [E+1] from 0 to N, never decreasing."""
    o = np.asarray(offsets)
    if o.ndim != 1 or o.shape[0] != E + 1 or o.dtype.kind not in "iu":
        raise ValueError(f"offsets must be an integer array [E+1] = [{E + 1}], got {_describe(o)}")
    o = np.ascontiguousarray(o, dtype=np.int64)
    cdef const int64_t[::1] ov = o
    cdef Py_ssize_t e, bad = -1
    with nogil:
        for e in range(E):
            if ov[e + 1] < ov[e]:
                bad = e
                break
    if ov[0] != 0 or ov[E] != N:
        raise ValueError(f"offsets must run from 0 to N = {N} packed rows, got {ov[0]} .. {ov[E]}")
    if bad >= 0:
        raise ValueError(f"offsets must not decrease, got offsets[{bad}] = {ov[bad]} > offsets[{bad + 1}] = {ov[bad + 1]}")
    return o


def _check_bank(x, offsets, w1, w2, name_x="packed"):
    """Shared checks: x [N, d], w1 [E, d, h], w2 [E, h, d], offsets [E+1]; all one dtype."""
    x = _float_array(x, name_x, 2, "[N, d]")
    w1 = _float_array(w1, "w1", 3, "[E, d, h]")
    w2 = _float_array(w2, "w2", 3, "[E, h, d]")
    E, d, h = w1.shape
    for a, name in ((w1, "w1"), (w2, "w2")):
        if a.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of {name_x} ({x.dtype}), got {a.dtype}")
    if d < 1 or h < 1 or E < 1:
        raise ValueError(f"w1 must be [E, d, h] with E, d, h >= 1, got {_describe(w1)}")
    if x.shape[1] != d:
        raise ValueError(f"{name_x} rows have {x.shape[1]} features, but w1 expects d = {d}")
    if w2.shape != (E, h, d):
        raise ValueError(f"w2 must be [E, h, d] = {[E, h, d]}, got {_describe(w2)}")
    if x.shape[0] > _INT_MAX or d * h > _INT_MAX:
        raise ValueError(f"BLAS takes 32-bit sizes: N = {x.shape[0]} and d*h = {d * h} must fit")
    return x, _check_offsets(offsets, E, x.shape[0]), w1, w2


def _check_vector_bank(b, str name, int E, int width, str shape_text, dtype):
    b = _float_array(b, name, 2, shape_text)
    if b.shape != (E, width) or b.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {shape_text} = {[E, width]}, got {_describe(b)}")
    return b


def _check_rows(a, str name, Py_ssize_t N, Py_ssize_t width, dtype):
    a = _float_array(a, name, 2, f"[N, {width}]")
    if a.shape != (N, width) or a.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} [N, {width}] = {[N, width]}, got {_describe(a)}")
    return a


def _grad_buffer(a, str name, tuple shape, dtype):
    """A writable output; a non-contiguous one is computed in a copy and written back."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
        got = _describe(a) if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a {dtype} array {list(shape)}, got {got}")
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writable, got a read-only array")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- public
def ffn_forward(packed, offsets, w1, b1, w2, b2, activation, keep=True):
    """Every expert on its own slice of packed rows: out = act(x W1 + b1) W2 + b2.

    Returns (out [N, d], pre [N, h], act [N, h]); pre and act are kept for the backward.
    keep=False (no backward follows) returns (out, None, None) and holds the hidden layer
    only for the experts being computed, one [rows, h] block per thread.
    """
    kind = _activation_kind(activation)
    x, off, w1, w2 = _check_bank(packed, offsets, w1, w2)
    E, d, h = w1.shape
    b1 = _check_vector_bank(b1, "b1", E, h, "[E, h]", x.dtype)
    b2 = _check_vector_bank(b2, "b2", E, d, "[E, d]", x.dtype)
    N = x.shape[0]
    out = np.empty((N, d), dtype=x.dtype)
    if keep:
        pre = np.empty((N, h), dtype=x.dtype)
        act = np.empty((N, h), dtype=x.dtype)
    else:
        most = int(np.diff(off).max(initial=0))
        pre = act = np.empty((openmp.omp_get_max_threads() * max(most, 1), h), dtype=x.dtype)  # [T * most, h]
    _forward_impl(x, off, w1, b1, w2, b2, kind, pre, act, out, keep)
    return (out, pre, act) if keep else (out, None, None)


def ffn_backward(d_out, packed, offsets, w1, w2, pre, act, activation, dw1, db1, dw2, db2,
                 d_pre=None, implicit=0):
    """Backward of `ffn_forward`. Returns d_packed [N, d].

    Weight gradients are packed: dw1 [A, d, h], db1 [A, h], dw2 [A, h, d], db2 [A, d] hold
    the A experts that received more than `implicit` rows, in ascending expert order, and
    are written (not accumulated); experts without rows have no gradient rows at all, and
    neither do those with 1..implicit rows: their gradients stay as factors (x and d_pre
    for W1, b1; act and d_out for W2, b2; see moe.optim.LowRank). d_pre [N, h], if given,
    receives the hidden layer's gradient of every row (required when implicit > 0).
    """
    kind = _activation_kind(activation)
    x, off, w1, w2 = _check_bank(packed, offsets, w1, w2)
    E, d, h = w1.shape
    N, dt = x.shape[0], x.dtype
    g = _check_rows(d_out, "d_out", N, d, dt)
    pre = _check_rows(pre, "pre", N, h, dt)
    act = _check_rows(act, "act", N, h, dt)
    if implicit < 0:
        raise ValueError(f"implicit must be >= 0, got {implicit}")
    if implicit > 0 and d_pre is None:
        raise ValueError("implicit > 0 leaves gradients as factors: pass d_pre [N, h] to keep them")
    kept = np.empty((0, h), dtype=dt) if d_pre is None else _grad_buffer(d_pre, "d_pre", (N, h), dt)
    A = int(np.count_nonzero(np.diff(off) > implicit))
    grads = [
        _grad_buffer(dw1, "dw1", (A, d, h), dt),
        _grad_buffer(db1, "db1", (A, h), dt),
        _grad_buffer(dw2, "dw2", (A, h, d), dt),
        _grad_buffer(db2, "db2", (A, d), dt),
    ]
    d_x = np.empty((N, d), dtype=dt)
    _backward_impl(g, x, off, w1, w2, pre, act, kind, *grads, d_x, kept, implicit)
    for given, used in zip((dw1, db1, dw2, db2, d_pre), (*grads, kept), strict=True):
        if given is not None and used is not given:
            given[...] = used
    return d_x
