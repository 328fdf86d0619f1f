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
"""

cimport openmp
from cython.parallel import prange
from libc.math cimport pow

import numpy as np

from moe.bindings._dispatch import _claim_threads

cdef extern from *:
    """
    #include <math.h>
    #define MOE_ADAM_ROW(NAME, T, SQRT)                                                        \\
    static inline void NAME(T *restrict p, T *restrict m, T *restrict v, const T *restrict g, \\
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
    """
    void moe_adam_row_f(float* p, float* m, float* v, const float* g, Py_ssize_t n, float scale,
                        int scaled, float b1, float c1, float b2, float c2, float bc1, float bc2,
                        float eps, float lr, float wd, int decay) noexcept nogil
    void moe_adam_row_d(double* p, double* m, double* v, const double* g, Py_ssize_t n,
                        double scale, int scaled, double b1, double c1, double b2, double c2,
                        double bc1, double bc2, double eps, double lr, double wd,
                        int decay) noexcept nogil

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


def _index(a, str name, Py_ssize_t n, Py_ssize_t bound):
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.shape != (n,):
        raise ValueError(f"adam_rows: {name} must be int64 [{n}], got shape {list(a.shape)}")
    if n and (a.min() < 0 or a.max() >= bound):
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
    width = int(np.prod(p.shape[1:], dtype=np.int64))
    p2, m2, v2 = p.reshape(p.shape[0], width), m.reshape(m.shape[0], width), v.reshape(v.shape[0], width)
    g2 = np.ascontiguousarray(g).reshape(g.shape[0], width)
    # OpenMP in a child forked after the parent used it can hang (GNU libgomp): the guard in
    # _dispatch says whether this process may start a team; otherwise run on one thread.
    cdef int threads = openmp.omp_get_max_threads() if _claim_threads() else 1
    if p.dtype == np.float32:
        _adam_rows[float](p2, m2, v2, g2, rows, places, g_rows, t, lr, scale, b1, b2, eps, wd, threads)
    else:
        _adam_rows[double](p2, m2, v2, g2, rows, places, g_rows, t, lr, scale, b1, b2, eps, wd, threads)
