"""Row-wise top-k selection shared by the dispatch and gate kernels (inline, no module state)."""

from cython cimport floating
from libc.stdint cimport int32_t


cdef inline bint _ranks_before(floating a, floating b) noexcept nogil:
    """a comes before b in a descending stable sort that puts NaN last (argsort of -h)."""
    return a > b or (b != b and a == a)


cdef inline void _topk_row(
    const floating* row, Py_ssize_t E, Py_ssize_t k, int32_t* out_i, floating* out_v
) noexcept nogil:
    """Keep a sorted buffer of the k best seen so far; most values fail the first compare."""
    cdef Py_ssize_t i, p, filled = 0
    cdef floating v
    if k == 0:
        return
    for i in range(E):
        v = row[i]
        if filled < k:
            p = filled
            filled += 1
        elif _ranks_before(v, out_v[k - 1]):
            p = k - 1
        else:
            continue
        while p > 0 and _ranks_before(v, out_v[p - 1]):  # equal values stay behind: lower index first
            out_v[p] = out_v[p - 1]
            out_i[p] = out_i[p - 1]
            p -= 1
        out_v[p] = v
        out_i[p] = <int32_t>i
