# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Lazy (touched-rows) Adam, fused and in place.

The numpy path gathers the touched rows of p, m, v and g, updates the copies and scatters
them back: about twenty passes over the rows. This does one pass, row by row in parallel,
with the same float operations in the same order as moe.optim.Adam._update, so the two
paths give the same bits.
"""

cimport openmp
from cython.parallel import prange
from libc.math cimport pow, sqrt

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

ctypedef fused floating:
    float
    double


cdef void _adam_rows(
    floating[:, ::1] p, floating[:, ::1] m, floating[:, ::1] v, const floating[:, ::1] g,
    const long long[::1] rows, const long long[::1] t,
    double lr, double scale, double b1, double b2, double eps, double wd, bint scaled, int threads,
) noexcept nogil:
    cdef Py_ssize_t i, j, r, n = p.shape[1]
    cdef floating gj, bc1, bc2, upd
    cdef floating fb1 = <floating>b1, fb2 = <floating>b2
    cdef floating c1 = <floating>(1.0 - b1), c2 = <floating>(1.0 - b2)
    cdef floating fscale = <floating>scale, flr = <floating>lr, feps = <floating>eps, fwd = <floating>wd
    for i in prange(rows.shape[0], schedule="static", num_threads=threads):
        r = rows[i]
        bc1 = <floating>(1.0 - pow(b1, <double>t[r]))
        bc2 = <floating>(1.0 - pow(b2, <double>t[r]))
        for j in range(n):
            gj = g[r, j] * fscale if scaled else g[r, j]
            m[r, j] = m[r, j] * fb1
            m[r, j] = m[r, j] + c1 * gj
            v[r, j] = v[r, j] * fb2
            v[r, j] = v[r, j] + c2 * (gj * gj)
            upd = (m[r, j] / bc1) / (<floating>sqrt(v[r, j] / bc2) + feps)
            if wd != 0.0:
                upd = upd + fwd * p[r, j]
            p[r, j] = p[r, j] - flr * upd


def adam_rows(p, m, v, g, rows, t, double lr, double scale, double b1, double b2, double eps, double wd):
    """Update rows `rows` of p (and moments m, v) from gradient g; t holds each row's step count
    (already incremented). All four arrays share one leading axis and a C-contiguous layout."""
    for name, a in (("m", m), ("v", v), ("g", g)):
        if a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(f"adam_rows: {name} must be {p.dtype}{list(p.shape)}, got {a.dtype}{list(a.shape)}")
    if p.dtype not in (np.float32, np.float64):
        raise ValueError(f"adam_rows: params must be float32 or float64, got {p.dtype}")
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"adam_rows: {name} must be C-contiguous and writeable")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    t = np.ascontiguousarray(t, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= p.shape[0]):
        raise ValueError(f"adam_rows: rows must be in [0, {p.shape[0]})")
    E = p.shape[0]
    shape2 = (E, p.size // E if E else 0)
    p2, m2, v2 = p.reshape(shape2), m.reshape(shape2), v.reshape(shape2)
    g2 = np.ascontiguousarray(g).reshape(shape2)
    # OpenMP in a child forked after the parent used it can hang (GNU libgomp): the guard in
    # _dispatch says whether this process may start a team; otherwise run on one thread.
    cdef bint big = rows.shape[0] * shape2[1] >= _parallel_min_elements
    cdef int threads = openmp.omp_get_max_threads() if big and _claim_threads() else 1
    if p.dtype == np.float32:
        _adam_rows[float](p2, m2, v2, g2, rows, t, lr, scale, b1, b2, eps, wd, scale != 1.0, threads)
    else:
        _adam_rows[double](p2, m2, v2, g2, rows, t, lr, scale, b1, b2, eps, wd, scale != 1.0, threads)
