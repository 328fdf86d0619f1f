# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Lazy (touched-rows) Adam, fused and in place.

The numpy path gathers the touched rows of p, m, v and g, updates the copies and scatters
them back: about twenty passes over the rows. This does one pass, row by row in parallel,
with the same float operations in the same order as moe.optim.Adam._update, so the two
paths give the same bits. The row update is plain C with `restrict` pointers, so the
compiler vectorises it (IEEE division and square root are exact in SIMD too; setup.py turns
off FMA contraction, so the bits do not change).

Rows are addressed through three index arrays, because the moments live in a compact store
(only rows that were ever updated have moments; see moe.optim.Adam) and gradients may be
packed (only the touched rows): row i of the update is p[rows[i]], m/v[places[i]],
g[g_rows[i]], with step count t[i].

`adam_lowrank` takes the gradient as a sum of a few outer products instead (moe.optim.LowRank:
row i's gradient is sum_r outer(u[r], v[r]) over its rows r): it rebuilds each [b] line of
the gradient in a per-thread buffer, in cache, right before updating it, so the gradient is
never written to or read from memory. `lowrank_rows` builds the same gradient in memory with
the same float operations in the same order (u[r0] v[r0], then + u[r] v[r] in row order).

`row_sq_norms` and `lowrank_sq_norms` give each row's squared norm in float64 for the global
clipping norm (a low-rank row's from the Gram identity, unbuilt), in a fixed order of
additions, so the bits do not depend on threads. numpy's einsum with a float64 result took
1.6 ms of a 10.5 ms default step for this (converting every element through a buffer, and
one call per group of rows of one count; bench/RESULTS.md, the step breakdown).
"""

cimport openmp
from cython.parallel cimport prange, threadid
from libc.math cimport pow

import math

import numpy as np

from moe.bindings._dispatch import _claim_threads

# Below this many elements (rows x row size; ~2 ms on one core) an update runs on one thread:
# the default job's tables and experts are far below, and on a busy machine a parallel region
# can wait milliseconds for its second thread (bench/RESULTS.md, the busy-machine section).
cdef Py_ssize_t _parallel_min_elements = 1 << 20


def _configure(parallel_min_elements=None) -> dict:
    """Override the size above which updates go parallel (tests use 0 to force the parallel
    path on small inputs). Returns the previous settings so callers can restore them."""
    global _parallel_min_elements
    old = {"parallel_min_elements": _parallel_min_elements}
    if parallel_min_elements is not None:
        if int(parallel_min_elements) < 0:
            raise ValueError(f"parallel_min_elements must be >= 0, got {parallel_min_elements}")
        _parallel_min_elements = int(parallel_min_elements)
    return old
cdef extern from *:
    """
    #include <math.h>
    /* one clone per vector width, picked at load time (ifunc): the same IEEE operations, so
       the same bits, in 4, 8 or 16 lanes */
    #if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
    #define MOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define MOE_CLONES
    #endif
    #define MOE_ADAM_ROW(NAME, T, SQRT)                                                        \\
    MOE_CLONES static void NAME(T *restrict p, T *restrict m, T *restrict v, const T *restrict g, \\
                            Py_ssize_t n, T scale, int scaled, T b1, T c1, T b2, T c2,        \\
                            T bc1, T bc2, T eps, T lr, T wd, int decay) {                     \\
        for (Py_ssize_t j = 0; j < n; j++) {                                                  \\
            T gj = scaled ? g[j] * scale : g[j];                                              \\
            T mj = m[j] * b1;                                                                 \\
            mj = mj + c1 * gj;                                                                \\
            T vj = v[j] * b2;                                                                 \\
            vj = vj + c2 * (gj * gj);                                                         \\
            T upd = (mj / bc1) / (SQRT(vj / bc2) + eps);                                      \\
            if (decay) upd = upd + wd * p[j];                                                 \\
            m[j] = mj;                                                                        \\
            v[j] = vj;                                                                        \\
            p[j] = p[j] - lr * upd;                                                           \\
        }                                                                                     \\
    }
    MOE_ADAM_ROW(moe_adam_row_f, float, sqrtf)
    MOE_ADAM_ROW(moe_adam_row_d, double, sqrt)
    /* out[j] = sum over r < n of u[r * us] * v[r * vs + j] (u NULL: ones), r in order */
    #define MOE_OUTER_SUM(NAME, T)                                                             \\
    MOE_CLONES static void NAME(T *restrict out, const T *restrict u, Py_ssize_t us,              \\
                            const T *restrict v, Py_ssize_t vs, Py_ssize_t n, Py_ssize_t b) { \\
        if (u) {                                                                              \\
            T u0 = u[0];                                                                      \\
            for (Py_ssize_t j = 0; j < b; j++) out[j] = u0 * v[j];                            \\
            for (Py_ssize_t r = 1; r < n; r++) {                                              \\
                T ur = u[r * us];                                                             \\
                const T *restrict vr = v + r * vs;                                            \\
                for (Py_ssize_t j = 0; j < b; j++) out[j] = out[j] + ur * vr[j];              \\
            }                                                                                 \\
        } else {                                                                              \\
            for (Py_ssize_t j = 0; j < b; j++) out[j] = v[j];                                 \\
            for (Py_ssize_t r = 1; r < n; r++) {                                              \\
                const T *restrict vr = v + r * vs;                                            \\
                for (Py_ssize_t j = 0; j < b; j++) out[j] = out[j] + vr[j];                   \\
            }                                                                                 \\
        }                                                                                     \\
    }
    MOE_OUTER_SUM(moe_outer_sum_f, float)
    MOE_OUTER_SUM(moe_outer_sum_d, double)
    /* sum over j < n of x[j] * y[j] in double: eight lanes (lane l takes j = l mod 8, in
       order), the lanes added pairwise, then the tail in order. Every lane is its own chain,
       so the compiler vectorises it without reassociating: the same bits in any clone. */
    #define MOE_DOT64(NAME, T)                                                                 \
    MOE_CLONES static double NAME(const T *restrict x, const T *restrict y, Py_ssize_t n) {    \
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                             \
        Py_ssize_t j = 0;                                                                     \
        for (; j + 8 <= n; j += 8)                                                            \
            for (int l = 0; l < 8; l++) acc[l] = acc[l] + (double)x[j + l] * (double)y[j + l]; \
        double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])); \
        for (; j < n; j++) s = s + (double)x[j] * (double)y[j];                               \
        return s;                                                                             \
    }
    MOE_DOT64(moe_dot64_f, float)
    MOE_DOT64(moe_dot64_d, double)
    """
    void moe_adam_row_f(float* p, float* m, float* v, const float* g, Py_ssize_t n, float scale,
                        int scaled, float b1, float c1, float b2, float c2, float bc1, float bc2,
                        float eps, float lr, float wd, int decay) noexcept nogil
    void moe_adam_row_d(double* p, double* m, double* v, const double* g, Py_ssize_t n,
                        double scale, int scaled, double b1, double c1, double b2, double c2,
                        double bc1, double bc2, double eps, double lr, double wd,
                        int decay) noexcept nogil
    void moe_outer_sum_f(float* out, const float* u, Py_ssize_t us, const float* v, Py_ssize_t vs,
                         Py_ssize_t n, Py_ssize_t b) noexcept nogil
    void moe_outer_sum_d(double* out, const double* u, Py_ssize_t us, const double* v, Py_ssize_t vs,
                         Py_ssize_t n, Py_ssize_t b) noexcept nogil
    double moe_dot64_f(const float* x, const float* y, Py_ssize_t n) noexcept nogil
    double moe_dot64_d(const double* x, const double* y, Py_ssize_t n) noexcept nogil

ctypedef fused floating:
    float
    double


cdef void _adam_rows(
    floating[:, ::1] p, floating[:, ::1] m, floating[:, ::1] v, const floating[:, ::1] g,
    const long long[::1] rows, const long long[::1] places, const long long[::1] g_rows,
    const long long[::1] t, double lr, double scale, double b1, double b2, double eps, double wd,
    int threads,
) noexcept nogil:
    cdef Py_ssize_t i, n = p.shape[1]
    cdef floating bc1, bc2
    cdef int scaled = scale != 1.0, decay = wd != 0.0
    for i in prange(rows.shape[0], schedule="static", num_threads=threads):
        bc1 = <floating>(1.0 - pow(b1, <double>t[i]))
        bc2 = <floating>(1.0 - pow(b2, <double>t[i]))
        if floating is float:
            moe_adam_row_f(&p[rows[i], 0], &m[places[i], 0], &v[places[i], 0], &g[g_rows[i], 0], n,
                           <float>scale, scaled, <float>b1, <float>(1.0 - b1), <float>b2,
                           <float>(1.0 - b2), bc1, bc2, <float>eps, <float>lr, <float>wd, decay)
        else:
            moe_adam_row_d(&p[rows[i], 0], &m[places[i], 0], &v[places[i], 0], &g[g_rows[i], 0], n,
                           scale, scaled, b1, 1.0 - b1, b2, 1.0 - b2, bc1, bc2, eps, lr, wd, decay)


cdef bint _in_range(const long long[::1] a, long long bound) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(a.shape[0]):
        if a[i] < 0 or a[i] >= bound:
            return False
    return True


def _index(a, str name, Py_ssize_t n, Py_ssize_t bound):
    """a as C-contiguous int64 [n] with every entry in [0, bound), checked in one C pass (a
    lazy update of a small table is a few dozen rows: two numpy reductions per index array
    cost more than the update)."""
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.shape != (n,):
        raise ValueError(f"adam_rows: {name} must be int64 [{n}], got shape {list(a.shape)}")
    if n and not _in_range(a, bound):
        raise ValueError(f"adam_rows: {name} must be in [0, {bound})")
    return a


def adam_rows(p, m, v, g, rows, places, g_rows, t, double lr, double scale, double b1, double b2,
              double eps, double wd):
    """Update p[rows[i]], m/v[places[i]] from g[g_rows[i]] with step count t[i] (already
    incremented). p, m, v and g share the trailing shape and dtype; p, m, v are C-contiguous."""
    if p.dtype not in (np.float32, np.float64):
        raise ValueError(f"adam_rows: params must be float32 or float64, got {p.dtype}")
    for name, a in (("m", m), ("v", v), ("g", g)):
        if a.shape[1:] != p.shape[1:] or a.dtype != p.dtype:
            raise ValueError(f"adam_rows: {name} must be {p.dtype}[*, {list(p.shape[1:])}], "
                             f"got {a.dtype}{list(a.shape)}")
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"adam_rows: {name} must be C-contiguous and writeable")
    rows = np.asarray(rows)
    n = rows.shape[0] if rows.ndim == 1 else -1
    if n < 0:
        raise ValueError(f"adam_rows: rows must be 1-D, got shape {list(rows.shape)}")
    rows = _index(rows, "rows", n, p.shape[0])
    places = _index(places, "places", n, m.shape[0])
    g_rows = _index(g_rows, "g_rows", n, g.shape[0])
    t = _index(t, "t", n, np.iinfo(np.int64).max)
    if n == 0:
        return
    width = math.prod(p.shape[1:])
    p2, m2, v2 = p.reshape(p.shape[0], width), m.reshape(m.shape[0], width), v.reshape(v.shape[0], width)
    g2 = np.ascontiguousarray(g).reshape(g.shape[0], width)
    # OpenMP in a child forked after the parent used it can hang (GNU libgomp): the guard in
    # _dispatch says whether this process may start a team; otherwise run on one thread.
    cdef bint big = n * width >= _parallel_min_elements
    cdef int threads = openmp.omp_get_max_threads() if big and _claim_threads() else 1
    if p.dtype == np.float32:
        _adam_rows[float](p2, m2, v2, g2, rows, places, g_rows, t, lr, scale, b1, b2, eps, wd, threads)
    else:
        _adam_rows[double](p2, m2, v2, g2, rows, places, g_rows, t, lr, scale, b1, b2, eps, wd, threads)


# ----------------------------------------------------------------------------- low-rank gradients
cdef inline void _outer_sum(floating* out, const floating* u, Py_ssize_t us, const floating* v,
                            Py_ssize_t vs, Py_ssize_t n, Py_ssize_t b) noexcept nogil:
    if floating is float:
        moe_outer_sum_f(out, u, us, v, vs, n, b)
    else:
        moe_outer_sum_d(out, u, us, v, vs, n, b)


cdef void _adam_lowrank(
    floating[:, ::1] p, floating[:, ::1] m, floating[:, ::1] v, const floating* u,
    const floating[:, ::1] w, const long long[::1] rows, const long long[::1] places,
    const long long[::1] starts, const long long[::1] counts, const long long[::1] t,
    Py_ssize_t a, double lr, double scale, double b1, double b2, double eps, double wd, int threads,
    floating[:, ::1] scratch,
) noexcept nogil:
    """p/m/v rows are [a * b]; line ia of row i's gradient is sum_r u[s + r, ia] * w[s + r, :].

    Each thread builds a whole row's gradient in its own line of scratch [threads, a * b] (an
    expert's W1 at d = 64, h = 128 is 32 KB: it stays in L1/L2), then updates the row in one
    pass."""
    cdef Py_ssize_t i, ia, b = w.shape[1], s, n = a * b
    cdef floating bc1, bc2
    cdef floating* buf
    cdef int scaled = scale != 1.0, decay = wd != 0.0
    for i in prange(rows.shape[0], schedule="static", num_threads=threads):
        buf = &scratch[threadid(), 0]  # [a * b] one row of the gradient, this thread's
        bc1 = <floating>(1.0 - pow(b1, <double>t[i]))
        bc2 = <floating>(1.0 - pow(b2, <double>t[i]))
        s = starts[i]
        for ia in range(a):
            _outer_sum(buf + ia * b, NULL if u == NULL else u + s * a + ia, a, &w[s, 0], b, counts[i], b)
        if floating is float:
            moe_adam_row_f(&p[rows[i], 0], &m[places[i], 0], &v[places[i], 0], buf, n,
                           <float>scale, scaled, <float>b1, <float>(1.0 - b1), <float>b2,
                           <float>(1.0 - b2), bc1, bc2, <float>eps, <float>lr, <float>wd, decay)
        else:
            moe_adam_row_d(&p[rows[i], 0], &m[places[i], 0], &v[places[i], 0], buf, n,
                           scale, scaled, b1, 1.0 - b1, b2, 1.0 - b2, bc1, bc2, eps, lr, wd, decay)


def _factors(p, u, w, starts, counts, str who):
    """Check a low-rank gradient against params p [R, ...]; returns (u2 or None, w, starts, counts, a)."""
    if w.ndim != 2 or w.dtype != p.dtype or not w.flags.c_contiguous:
        raise ValueError(f"{who}: v must be C-contiguous {p.dtype} [N, b], got {w.dtype}{list(w.shape)}")
    a = 1 if u is None else u.shape[1]
    if u is not None and (u.ndim != 2 or u.dtype != p.dtype or not u.flags.c_contiguous or u.shape[0] != w.shape[0]):
        raise ValueError(f"{who}: u must be C-contiguous {p.dtype} [N, a] with N = {w.shape[0]}, "
                         f"got {u.dtype}{list(u.shape)}")
    width = math.prod(p.shape[1:])
    if a * w.shape[1] != width:
        raise ValueError(f"{who}: outer products of u [N, {a}] and v [N, {w.shape[1]}] do not give "
                         f"rows of {list(p.shape[1:])}")
    n = starts.shape[0] if starts.ndim == 1 else -1
    if n < 0 or counts.shape != (n,):
        raise ValueError(f"{who}: starts and counts must be 1-D of one length")
    starts = _index(starts, "starts", n, max(w.shape[0], 1))
    counts = _index(counts, "counts", n, w.shape[0] + 1)
    if n and ((counts < 1).any() or (starts + counts > w.shape[0]).any()):
        raise ValueError(f"{who}: each row needs 1 <= count and start + count <= N = {w.shape[0]}")
    return u, w, starts, counts, a


def adam_lowrank(p, m, v, u, w, rows, places, starts, counts, t, double lr, double scale,
                 double b1, double b2, double eps, double wd):
    """Update p[rows[i]], m/v[places[i]] with step count t[i] from the gradient
    sum_{r < counts[i]} outer(u[starts[i] + r], w[starts[i] + r]) (u None: ones)."""
    if p.dtype not in (np.float32, np.float64):
        raise ValueError(f"adam_lowrank: params must be float32 or float64, got {p.dtype}")
    for name, arr in (("p", p), ("m", m), ("v", v)):
        if arr.shape[1:] != p.shape[1:] or arr.dtype != p.dtype or not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"adam_lowrank: {name} must be writeable C-contiguous {p.dtype}[*, {list(p.shape[1:])}]")
    u, w, starts, counts, a = _factors(p, u, w, np.asarray(starts), np.asarray(counts), "adam_lowrank")
    n = starts.shape[0]
    rows = _index(rows, "rows", n, p.shape[0])
    places = _index(places, "places", n, m.shape[0])
    t = _index(t, "t", n, np.iinfo(np.int64).max)
    if n == 0:
        return
    width = a * w.shape[1]
    p2, m2, v2 = p.reshape(p.shape[0], width), m.reshape(m.shape[0], width), v.reshape(v.shape[0], width)
    cdef bint big = n * width >= _parallel_min_elements
    cdef int threads = openmp.omp_get_max_threads() if big and _claim_threads() else 1
    cdef const float[:, ::1] uf
    cdef const double[:, ::1] ud
    scratch = np.empty((threads, width), dtype=p.dtype)  # [threads, a * b]
    if p.dtype == np.float32:
        uf = u if u is not None else np.zeros((1, 1), np.float32)
        _adam_lowrank[float](p2, m2, v2, NULL if u is None else &uf[0, 0], w, rows, places, starts,
                             counts, t, a, lr, scale, b1, b2, eps, wd, threads, scratch)
    else:
        ud = u if u is not None else np.zeros((1, 1), np.float64)
        _adam_lowrank[double](p2, m2, v2, NULL if u is None else &ud[0, 0], w, rows, places, starts,
                              counts, t, a, lr, scale, b1, b2, eps, wd, threads, scratch)


cdef void _lowrank_rows(floating[:, ::1] out, const floating* u, const floating[:, ::1] w,
                        const long long[::1] starts, const long long[::1] counts, Py_ssize_t a) noexcept nogil:
    cdef Py_ssize_t i, ia, b = w.shape[1], s
    for i in range(starts.shape[0]):
        s = starts[i]
        for ia in range(a):
            _outer_sum(&out[i, ia * b], NULL if u == NULL else u + s * a + ia, a, &w[s, 0], b, counts[i], b)


def lowrank_rows(u, w, starts, counts, out):
    """out[i] = sum_{r < counts[i]} outer(u[starts[i] + r], w[starts[i] + r]) (u None: ones), with
    the float operations of adam_lowrank; out [n, ...] C-contiguous, rows of a * b elements."""
    if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("lowrank_rows: out must be a writeable C-contiguous array")
    u, w, starts, counts, a = _factors(out, u, w, np.asarray(starts), np.asarray(counts), "lowrank_rows")
    if starts.shape[0] != out.shape[0]:
        raise ValueError(f"lowrank_rows: out must have {starts.shape[0]} rows, got {out.shape[0]}")
    if out.shape[0] == 0:
        return out
    out2 = out.reshape(out.shape[0], -1)
    cdef const float[:, ::1] uf
    cdef const double[:, ::1] ud
    if out.dtype == np.float32:
        uf = u if u is not None else np.zeros((1, 1), np.float32)
        _lowrank_rows[float](out2, NULL if u is None else &uf[0, 0], w, starts, counts, a)
    else:
        ud = u if u is not None else np.zeros((1, 1), np.float64)
        _lowrank_rows[double](out2, NULL if u is None else &ud[0, 0], w, starts, counts, a)
    return out


# ---------------------------------------------------------------------- squared norms
cdef inline double _dot64(const floating* x, const floating* y, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return moe_dot64_f(x, y, n)
    else:
        return moe_dot64_d(x, y, n)


cdef void _row_sq_norms(const floating[:, ::1] g, double[::1] out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(g.shape[0]):
        out[i] = _dot64(&g[i, 0], &g[i, 0], g.shape[1])


def row_sq_norms(g, out):
    """out[i] = sum_j g[i, j]^2 in float64 (g float32/float64 [n, size] C-contiguous, out
    float64 [n]), a fixed order per row (moe_dot64): the bits do not depend on threads."""
    if not isinstance(g, np.ndarray) or g.ndim != 2 or g.dtype not in (np.float32, np.float64) \
            or not g.flags.c_contiguous:
        raise ValueError(f"row_sq_norms: g must be C-contiguous float32/float64 [n, size], got "
                         f"{getattr(g, 'dtype', type(g).__name__)}{list(getattr(g, 'shape', []))}")
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != (g.shape[0],) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"row_sq_norms: out must be writeable float64 [{g.shape[0]}]")
    if g.shape[0] == 0 or g.shape[1] == 0:
        out[...] = 0.0
        return out
    if g.dtype == np.float32:
        _row_sq_norms[float](g, out)
    else:
        _row_sq_norms[double](g, out)
    return out


cdef void _lowrank_sq_norms(const floating* u, const floating[:, ::1] w, const long long[::1] starts,
                            const long long[::1] counts, Py_ssize_t a, double[::1] out) noexcept nogil:
    """|sum_r u_r w_r^T|^2 = sum_r |u_r|^2 |w_r|^2 + 2 sum_{r < q} (u_r . u_q)(w_r . w_q)."""
    cdef Py_ssize_t i, r, q, s, c, b = w.shape[1]
    cdef double diag, off, uu
    for i in range(starts.shape[0]):
        s, c = starts[i], counts[i]
        diag = 0.0
        off = 0.0
        for r in range(c):
            uu = 1.0 if u == NULL else _dot64(u + (s + r) * a, u + (s + r) * a, a)
            diag = diag + uu * _dot64(&w[s + r, 0], &w[s + r, 0], b)
            for q in range(r + 1, c):
                uu = 1.0 if u == NULL else _dot64(u + (s + r) * a, u + (s + q) * a, a)
                off = off + uu * _dot64(&w[s + r, 0], &w[s + q, 0], b)
        out[i] = diag + 2.0 * off


def lowrank_sq_norms(u, w, starts, counts, out):
    """out[i] = |sum_{r < counts[i]} outer(u[starts[i] + r], w[starts[i] + r])|^2 in float64
    (u None: ones) from the Gram identity, without building the rows; out float64 [n]."""
    if not isinstance(w, np.ndarray) or w.ndim != 2 or w.dtype not in (np.float32, np.float64):
        raise ValueError(f"lowrank_sq_norms: v must be float32/float64 [N, b], got "
                         f"{getattr(w, 'dtype', type(w).__name__)}{list(getattr(w, 'shape', []))}")
    a = 1 if u is None else u.shape[1]
    proto = np.empty((0, a * w.shape[1]), dtype=w.dtype)
    u, w, starts, counts, a = _factors(proto, u, w, np.asarray(starts), np.asarray(counts), "lowrank_sq_norms")
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != (starts.shape[0],) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"lowrank_sq_norms: out must be writeable float64 [{starts.shape[0]}]")
    if starts.shape[0] == 0:
        return out
    cdef const float[:, ::1] uf
    cdef const double[:, ::1] ud
    if w.dtype == np.float32:
        uf = u if u is not None else np.zeros((1, 1), np.float32)
        _lowrank_sq_norms[float](NULL if u is None else &uf[0, 0], w, starts, counts, a, out)
    else:
        ud = u if u is not None else np.zeros((1, 1), np.float64)
        _lowrank_sq_norms[double](NULL if u is None else &ud[0, 0], w, starts, counts, a, out)
    return out
