"""Compiled sparse dispatch: top-k selection, capacity, counting sort, gather and combine.

Twins of the functions of the same name in `moe.bindings.reference` (same arguments, same
outputs and dtypes). Each public `def` checks shapes, dtypes and index ranges and raises
ValueError naming what it expected and what came (non-contiguous inputs are copied); the work
runs in fused float/double cores without the GIL. Loops go parallel over rows (`prange`) only
above ~8M scalar operations (top-k at large E): see `_parallel_min_work`.

Exactness: integer outputs are identical to the reference; `topk_rows`, `gather_rows`,
`combine` and the `d_out` of `combine_backward` are bit-identical (same operations in the same
order, no FMA contraction). `d_weights` of `combine_backward` is a dot product accumulated in
double, so it can differ from numpy's einsum in the last bits.
"""

import operator
import os

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy

from moe.bindings._select cimport _topk_row

# Below this many scalar operations (a few ms on one core) a loop runs on one thread. At the
# target sizes (T = 8192, k = 2, d = 256) a second thread saves under a millisecond (combine:
# 1.2 ms -> 0.4 ms on an idle machine), but on a machine shared with other work a parallel
# region waits for every thread to be scheduled (combine: 13 ms on two threads at load
# average 4). `_configure(parallel_min_work=...)` changes it; tests use 0.
cdef Py_ssize_t _parallel_min_work = 1 << 23

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT32 = np.dtype(np.int32)

# GNU OpenMP cannot run a parallel region in a child forked after the parent started its
# thread team (the child hangs). After such a fork, every kernel here and in _grouped runs on
# one thread; a child forked before any parallel kernel ran keeps its threads.
cdef bint _threads_ok = True
cdef bint _threads_used = False


def _after_fork_in_child() -> None:
    global _threads_ok
    if _threads_used:
        _threads_ok = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _claim_threads() -> bool:
    """True if OpenMP regions may run in this process; records that they did."""
    global _threads_used
    if _threads_ok:
        _threads_used = True
    return _threads_ok


cdef inline bint _parallel(Py_ssize_t work):
    """Whether a loop of `work` scalar operations should use the OpenMP team."""
    return work >= _parallel_min_work and _claim_threads()


def _configure(parallel_min_work=None) -> dict:
    """Override the size above which loops go parallel (tests use 0 to force the parallel
    paths on small inputs). Returns the previous settings so callers can restore them."""
    global _parallel_min_work
    old = {"parallel_min_work": _parallel_min_work}
    if parallel_min_work is not None:
        if int(parallel_min_work) < 0:
            raise ValueError(f"parallel_min_work must be >= 0, got {parallel_min_work}")
        _parallel_min_work = int(parallel_min_work)
    return old


# ----------------------------------------------------------------------------- checks
def _describe(a) -> str:
    """'float64 [3, 2]': the dtype and shape an error message reports."""
    return f"{a.dtype} {list(a.shape)}"


def _float_array(x, str name, int ndim, str shape_text):
    """A C-contiguous float32/float64 array of rank `ndim` (copied only when needed)."""
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32 or float64 {shape_text}, got {_describe(a)}")
    return np.ascontiguousarray(a)


def _int32_array(x, str name, int ndim, str shape_text):
    """A C-contiguous int32 array of rank `ndim`."""
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype != _INT32:
        raise ValueError(f"{name} must be int32 {shape_text}, got {_describe(a)}")
    return np.ascontiguousarray(a)


def _same_dtype(a, str name, ref, str ref_name) -> None:
    if a.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {a.dtype}")


def _count(x, str name, int64_t low) -> int:
    """An integer argument >= low."""
    try:
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(x).__name__}") from None
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_expert_ids(ei, int64_t n_experts, keep=None) -> None:
    """Every (kept) expert id lies in [0, n_experts)."""
    cdef const int32_t[:, ::1] e = ei
    cdef const uint8_t[:, ::1] kp
    cdef bint masked = keep is not None
    cdef Py_ssize_t B = e.shape[0], k = e.shape[1], b, j, bad = -1
    if masked:
        kp = keep.view(np.uint8)
    with nogil:
        for b in range(B):
            for j in range(k):
                if (e[b, j] < 0 or e[b, j] >= n_experts) and (not masked or kp[b, j]):
                    bad = b * k + j
                    break
            if bad >= 0:
                break
    if bad >= 0:
        b, j = bad // k, bad % k
        raise ValueError(
            f"expert_index[{b}, {j}] = {ei[b, j]} is outside the expert range [0, {n_experts})"
        )


def _check_slots(slot, Py_ssize_t n_rows, bint unique):
    """slot values lie in [-1, n_rows). With `unique`, no packed row is claimed twice, and the
    inverse map is returned: owner[n] = flat assignment id b*k + j of row n, or -1."""
    cdef const int32_t[:, ::1] s = slot
    cdef Py_ssize_t B = s.shape[0], k = s.shape[1], b, j, bad = -1, dup = -1
    cdef int32_t r
    owner_arr = np.full(n_rows if unique else 0, -1, dtype=np.int64)
    cdef int64_t[::1] owner = owner_arr
    with nogil:
        for b in range(B):
            for j in range(k):
                r = s[b, j]
                if r < -1 or r >= n_rows:
                    bad = b * k + j
                    break
                if unique and r >= 0:
                    if owner[r] >= 0:
                        dup = b * k + j
                        break
                    owner[r] = b * k + j
            if bad >= 0 or dup >= 0:
                break
    if bad >= 0:
        b, j = bad // k, bad % k
        raise ValueError(f"slot[{b}, {j}] = {slot[b, j]} is outside [-1, {n_rows})")
    if dup >= 0:
        b, j = dup // k, dup % k
        raise ValueError(
            f"slot[{b}, {j}] = {slot[b, j]} claims a packed row another assignment already has"
        )
    return owner_arr


# ----------------------------------------------------------------------------- top-k
def _topk_impl(const floating[:, ::1] h, int32_t[:, ::1] idx, floating[:, ::1] val) -> None:
    cdef Py_ssize_t B = h.shape[0], E = h.shape[1], k = idx.shape[1], b
    if B == 0 or k == 0:
        return
    cdef bint par = B > 1 and _parallel(B * E)
    with nogil:
        if par:
            for b in prange(B, schedule="static"):
                _topk_row(&h[b, 0], E, k, &idx[b, 0], &val[b, 0])
        else:
            for b in range(B):
                _topk_row(&h[b, 0], E, k, &idx[b, 0], &val[b, 0])


def topk_rows(h, k):
    """Top-k of each row, best first; ties keep the lower index first; NaN ranks last.

    Returns (index int32 [B, k], value [B, k] in h's dtype). O(E) per row for typical data.
    """
    h = _float_array(h, "h", 2, "[B, E]")
    B, E = h.shape
    k = _count(k, "k", 0)
    if k > E:
        raise ValueError(f"k must be <= the number of columns of h ({E}), got {k}")
    if E > np.iinfo(np.int32).max:
        raise ValueError(f"h may have at most {np.iinfo(np.int32).max} columns, got {E}")
    idx = np.empty((B, k), dtype=np.int32)
    val = np.empty((B, k), dtype=h.dtype)
    _topk_impl(h, idx, val)
    return idx, val


# ----------------------------------------------------------------------------- capacity
def capacity_keep(expert_index, n_experts, capacity):
    """Which assignments fit in their expert's `capacity` rows (bool [B, k]).

    Ranks are served in order (all first choices, then all second choices, ...), lower
    example first within a rank; capacity < 0 keeps everything. O(B*k + E).
    """
    ei = _int32_array(expert_index, "expert_index", 2, "[B, k]")
    cdef int64_t E = _count(n_experts, "n_experts", 1)
    try:
        cap_obj = operator.index(capacity)
    except TypeError:
        raise ValueError(f"capacity must be an integer, got {type(capacity).__name__}") from None
    _check_expert_ids(ei, E)
    cdef Py_ssize_t B = ei.shape[0], k = ei.shape[1], b, j
    if cap_obj < 0 or cap_obj >= B * k:
        return np.ones((B, k), dtype=bool)
    cdef int64_t cap = cap_obj
    keep = np.empty((B, k), dtype=np.uint8)
    fill = np.zeros(E, dtype=np.int64)
    cdef const int32_t[:, ::1] e = ei
    cdef uint8_t[:, ::1] kp = keep
    cdef int64_t[::1] used = fill
    cdef int32_t x
    with nogil:
        for j in range(k):  # rank-major: GShard's priority
            for b in range(B):
                x = e[b, j]
                kp[b, j] = used[x] < cap
                used[x] += 1
    return keep.view(bool)


# ----------------------------------------------------------------------------- counting sort
def counting_sort(expert_index, keep, n_experts):
    """Stable sort of the kept assignments by expert. O(B*k + E).

    Returns (src_row int32 [N], slot int32 [B, k] with -1 where dropped, offsets int64 [E+1]).
    Expert ids are checked only where keep is True (a dropped assignment's id is not used).
    """
    ei = _int32_array(expert_index, "expert_index", 2, "[B, k]")
    kp_arr = np.asarray(keep)
    if kp_arr.dtype != np.bool_ or kp_arr.shape != ei.shape:
        raise ValueError(
            f"keep must be bool {list(ei.shape)} like expert_index, got {_describe(kp_arr)}"
        )
    kp_arr = np.ascontiguousarray(kp_arr)
    cdef int64_t E = _count(n_experts, "n_experts", 1)
    cdef Py_ssize_t B = ei.shape[0], k = ei.shape[1], a, n_kept = 0
    if B * k > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} assignments fit int32 slots, got {B * k}")
    _check_expert_ids(ei, E, kp_arr)
    offsets = np.zeros(E + 1, dtype=np.int64)
    slot = np.empty((B, k), dtype=np.int32)
    cdef const int32_t[::1] ev = ei.reshape(-1)
    cdef const uint8_t[::1] kv = kp_arr.reshape(-1).view(np.uint8)
    cdef int64_t[::1] off = offsets
    cdef int32_t[::1] sv = slot.reshape(-1)
    with nogil:
        for a in range(B * k):
            if kv[a]:
                off[ev[a] + 1] += 1
        for a in range(E):
            off[a + 1] += off[a]
    n_kept = offsets[E]
    src_row = np.empty(n_kept, dtype=np.int32)
    cursor_arr = offsets[:E].copy()
    cdef int64_t[::1] cursor = cursor_arr
    cdef int32_t[::1] src = src_row
    cdef int64_t s
    with nogil:
        for a in range(B * k):  # ascending flat id: stable within each expert
            if kv[a]:
                s = cursor[ev[a]]
                cursor[ev[a]] = s + 1
                sv[a] = <int32_t>s
                src[s] = <int32_t>(a // k)
            else:
                sv[a] = -1
    return src_row, slot, offsets


# ----------------------------------------------------------------------------- gather
def _gather_impl(const floating[:, ::1] x, const int64_t[::1] src, floating[:, ::1] out) -> None:
    cdef Py_ssize_t N = out.shape[0], d = out.shape[1], n
    cdef size_t row_bytes = d * sizeof(floating)
    if N == 0 or d == 0:
        return
    cdef bint par = _parallel(N * d)
    with nogil:
        if par:
            for n in prange(N, schedule="static"):
                memcpy(&out[n, 0], &x[src[n], 0], row_bytes)
        else:
            for n in range(N):
                memcpy(&out[n, 0], &x[src[n], 0], row_bytes)


def gather_rows(x, src_row):
    """Packed rows: packed[n] = x[src_row[n]] ([N, d] in x's dtype); indices must be in [0, B)."""
    x = _float_array(x, "x", 2, "[B, d]")
    s = np.asarray(src_row)
    if s.ndim != 1 or s.dtype.kind not in "iu" or not np.can_cast(s.dtype, np.int64):
        raise ValueError(f"src_row must be a 1-D integer array [N], got {_describe(s)}")
    s = np.ascontiguousarray(s, dtype=np.int64)
    B = x.shape[0]
    if s.shape[0] and (s.min() < 0 or s.max() >= B):
        bad = int(np.flatnonzero((s < 0) | (s >= B))[0])
        raise ValueError(f"src_row[{bad}] = {s[bad]} is outside the rows of x [0, {B})")
    out = np.empty((s.shape[0], x.shape[1]), dtype=x.dtype)
    _gather_impl(x, s, out)
    return out


# ----------------------------------------------------------------------------- combine
cdef inline void _combine_row(
    const floating* out, const int32_t* slot_b, const floating* w_b,
    Py_ssize_t k, Py_ssize_t d, floating* y_b
) noexcept nogil:
    """y_b = sum_j w_b[j] * out[slot_b[j]] over live j, in order j = 0..k-1 from zero."""
    cdef Py_ssize_t j, c
    cdef const floating* o
    cdef floating w
    for c in range(d):
        y_b[c] = 0
    for j in range(k):
        if slot_b[j] < 0:
            continue
        o = out + <Py_ssize_t>slot_b[j] * d
        w = w_b[j]
        for c in range(d):
            y_b[c] = y_b[c] + w * o[c]


def _combine_impl(
    const floating[:, ::1] out, const int32_t[:, ::1] slot, const floating[:, ::1] w,
    floating[:, ::1] y,
) -> None:
    cdef Py_ssize_t B = y.shape[0], d = y.shape[1], k = slot.shape[1], b
    if B == 0 or d == 0:
        return
    cdef const floating* o = &out[0, 0] if out.shape[0] else NULL
    cdef bint par = _parallel(B * k * d)
    with nogil:
        if par:
            for b in prange(B, schedule="static"):
                _combine_row(o, &slot[b, 0] if k else NULL, &w[b, 0] if k else NULL, k, d, &y[b, 0])
        else:
            for b in range(B):
                _combine_row(o, &slot[b, 0] if k else NULL, &w[b, 0] if k else NULL, k, d, &y[b, 0])


def _check_combine_args(out, slot, weights, bint unique):
    out = _float_array(out, "out", 2, "[N, d]")
    slot = _int32_array(slot, "slot", 2, "[B, k]")
    weights = _float_array(weights, "weights", 2, "[B, k]")
    _same_dtype(weights, "weights", out, "out")
    if weights.shape != slot.shape:
        raise ValueError(f"weights must be [B, k] = {list(slot.shape)} like slot, got {_describe(weights)}")
    owner = _check_slots(slot, out.shape[0], unique)
    return out, slot, weights, owner


def combine(out, slot, weights):
    """y[b] = sum_j weights[b, j] * out[slot[b, j]] over kept assignments ([B, d], out's dtype)."""
    out, slot, weights, _ = _check_combine_args(out, slot, weights, False)
    y = np.empty((slot.shape[0], out.shape[1]), dtype=out.dtype)
    _combine_impl(out, slot, weights, y)
    return y


cdef inline double _dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    """Dot product accumulated in double over 8 lanes in a fixed order (vectorisable without
    reassociation, and independent of the thread count)."""
    cdef double acc[8]
    cdef Py_ssize_t i = 0, lane
    cdef double s
    for lane in range(8):
        acc[lane] = 0
    while i + 8 <= n:
        for lane in range(8):
            acc[lane] += <double>a[i + lane] * <double>b[i + lane]
        i += 8
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    while i < n:
        s += <double>a[i] * <double>b[i]
        i += 1
    return s


cdef inline void _combine_backward_row(
    const floating* dy, const floating* out_n, int64_t a, const floating* w, Py_ssize_t k,
    Py_ssize_t d, floating* d_out_n, floating* d_w
) noexcept nogil:
    """Packed row n, owned by flat assignment a = b*k + j (or -1): its d_out row and d_w[a]."""
    cdef Py_ssize_t c
    cdef const floating* dy_b
    cdef floating wa
    if a < 0:  # a row no assignment points to
        for c in range(d):
            d_out_n[c] = 0
        return
    dy_b = dy + (a // k) * d
    wa = w[a]
    for c in range(d):
        d_out_n[c] = wa * dy_b[c]
    d_w[a] = <floating>_dot(out_n, dy_b, d)


def _combine_backward_impl(
    const floating[:, ::1] dy, const floating[:, ::1] out, const int64_t[::1] owner,
    const floating[:, ::1] w, floating[:, ::1] d_out, floating[:, ::1] d_w,
) -> None:
    cdef Py_ssize_t N = out.shape[0], d = out.shape[1], k = w.shape[1], n
    if N == 0:
        return
    cdef const floating* dyp = &dy[0, 0] if dy.shape[0] else NULL
    cdef const floating* wp = &w[0, 0] if w.shape[0] and k else NULL
    cdef floating* dwp = &d_w[0, 0] if d_w.shape[0] and k else NULL
    cdef bint par = _parallel(N * d)
    with nogil:  # walk packed rows in order: d_out is written front to back, once
        if par:
            for n in prange(N, schedule="static"):
                _combine_backward_row(dyp, &out[n, 0], owner[n], wp, k, d, &d_out[n, 0], dwp)
        else:
            for n in range(N):
                _combine_backward_row(dyp, &out[n, 0], owner[n], wp, k, d, &d_out[n, 0], dwp)


def combine_backward(dy, out, slot, weights):
    """Backward of `combine`: (d_out [N, d], d_weights [B, k]); dropped assignments get 0.

    Every live slot must name a different packed row (as counting_sort produces).
    """
    out, slot, weights, owner = _check_combine_args(out, slot, weights, True)
    dy = _float_array(dy, "dy", 2, "[B, d]")
    _same_dtype(dy, "dy", out, "out")
    if dy.shape != (slot.shape[0], out.shape[1]):
        raise ValueError(
            f"dy must be [B, d] = {[slot.shape[0], out.shape[1]]}, got {_describe(dy)}"
        )
    d_out = np.empty_like(out)  # every row is written
    d_w = np.zeros(slot.shape, dtype=out.dtype)  # dropped assignments stay 0
    _combine_backward_impl(dy, out, owner, weights, d_out, d_w)
    return d_out, d_w
