"""Compiled gates: noisy top-k, softmax top-k and top-1, forward and backward, fused by row blocks.

The twin of `moe.routing.gates.GroupedTopK`'s numpy path (per-group GEMMs + `TopKRows`), which
is the oracle. One call routes P rows of gate inputs x [P, d], sorted into G groups that each
have their own gate weights (`offsets[g]:offsets[g+1]` are group g's rows): the flat gate is
G = 1, the hierarchical layer's secondary gates are G = a groups.

Forward, per block of rows (prange over blocks): the block's logits clean = x W_g[g] and
raw = x W_noise[g] through sgemm/dgemm into a per-thread buffer, then per row, while the row is
in cache: std = s * softplus(raw), H = clean + eps * std, the top-(k+1) of H, the gate values
(softmax over the k kept, or the full-softmax probability when k = 1), Shazeer's
P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i) summed into the load, and, when asked,
softmax(clean) (Switch surrogate) and logsumexp(clean) (z-loss). What the backward needs is
kept per element in the form it is used: a = phi(z) / std and b = z * s * sigmoid(raw), so the
backward reads two arrays and evaluates no transcendental at all.

Backward, per block: d_clean and d_raw of every row in one pass (the balance terms dense, the
main-loss terms on the k kept logits and the two thresholds), then dx for the block's rows by
GEMM; finally dW = x^T d_clean per (group, column chunk), one single-threaded GEMM each.

Exactness: the logits are GEMMs of a fixed shape (blocks of BLOCK_ROWS rows, tiles of LOGIT_TILE
experts, the last tile zero-padded), so an expert's logit for a row is the same bits whatever
the number of experts (experts grown by add-task leave the others' routing untouched). Blocks
and column chunks depend only on the shapes, never on the thread count, and
sums over rows (load, softmax sums) are accumulated per block and then added in block order,
so the bits do not depend on how many threads ran. Integer outputs equal the oracle's for the
same logits; softplus uses the same libm calls as numpy's logaddexp. The noise scale s
(H = clean + s * eps * softplus(raw)) is a parameter; s = 1 gives today's formula exactly.
"""

import operator

import numpy as np

cimport openmp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.float cimport DBL_MIN, FLT_MIN
from libc.math cimport M_SQRT1_2, erfc, exp, expf, log, log1p, log1pf, logf
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memset

from moe.bindings._blas cimport _gemm, _gemm_beta, blas_single_enter, blas_single_exit
from moe.bindings._select cimport _topk_row

from moe.bindings._dispatch import _claim_threads, _describe

cdef double INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi), as the numpy path rounds it
cdef double LN2 = 0.6931471805599453
# Rows of a block, and experts per logits GEMM: both fixed, never a function of the number of
# experts n. BLAS results depend on the GEMM's shape, so with shapes that follow n an expert's
# logit would change in its last bits when experts are added (add-task's grown experts) and a
# task that never uses them would see its outputs move. 128 rows: the sgemm amortises packing
# its weights; at n = 4096 the block's clean and raw buffers are 2 MiB each.
cdef Py_ssize_t BLOCK_ROWS = 128
cdef Py_ssize_t LOGIT_TILE = 64
cdef Py_ssize_t DW_COLUMNS = 256  # column chunk of one weight-gradient GEMM
# Below this many logits (P * n) a call runs on one thread: a parallel region on a machine
# shared with other work waits for every thread to be scheduled. `_configure` changes it.
cdef Py_ssize_t _parallel_min_logits = 1 << 17

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# The clean logit of an expert a row may not use: moe.routing.gates.MASKED_LOGIT (tested equal).
MASKED_LOGIT = -1e4
cdef double _MASKED = MASKED_LOGIT


def _configure(parallel_min_logits=None) -> dict:
    """Override the size above which calls go parallel (tests use 0 to force the parallel
    paths on small inputs). Returns the previous settings so callers can restore them."""
    global _parallel_min_logits
    old = {"parallel_min_logits": _parallel_min_logits}
    if parallel_min_logits is not None:
        if int(parallel_min_logits) < 0:
            raise ValueError(f"parallel_min_logits must be >= 0, got {parallel_min_logits}")
        _parallel_min_logits = int(parallel_min_logits)
    return old


cdef struct Spec:
    Py_ssize_t n, k, kk, d
    bint noisy      # noise this forward (training a noisy gate)
    bint smooth     # the smooth load P(x, i) exists (noisy and k < n)
    bint want_p     # softmax(clean) kept (Switch surrogate, z-loss)
    bint want_lse   # logsumexp(clean) kept (z-loss)
    bint p_is_probs # k = 1 without noise: softmax(clean) is the gate's own probs
    double scale    # noise std multiplier s
    const uint8_t* allowed  # [P, n], 0: the row may not use that expert (NULL: every expert)


# ----------------------------------------------------------------------------- scalar math
cdef inline floating _exp(floating v) noexcept nogil:
    if floating is float:
        return expf(v)
    else:
        return exp(v)


cdef inline floating _log(floating v) noexcept nogil:
    if floating is float:
        return logf(v)
    else:
        return log(v)


cdef inline floating _softplus(floating r, floating* sig) noexcept nogil:
    """log(1 + e^r) exactly as numpy's logaddexp(0, r) computes it (the same libm calls), and
    sigmoid(r) = softplus'(r) from the same exponential."""
    cdef floating e
    if r == 0:
        sig[0] = <floating>0.5
        return <floating>LN2
    if r > 0:
        if floating is float:
            e = expf(-r)
            sig[0] = 1 / (1 + e)
            return r + log1pf(e)
        else:
            e = exp(-r)
            sig[0] = 1 / (1 + e)
            return r + log1p(e)
    if r < 0:
        if floating is float:
            e = expf(r)
            sig[0] = e / (1 + e)
            return log1pf(e)
        else:
            e = exp(r)
            sig[0] = e / (1 + e)
            return log1p(e)
    sig[0] = r  # NaN
    return r


cdef inline double _ndtr(double z) noexcept nogil:
    """Phi(z), the standard normal CDF."""
    return 0.5 * erfc(-z * M_SQRT1_2)


# ----------------------------------------------------------------------------- one row
cdef void _row_forward(
    const Spec* s, const floating* clean, const floating* raw, const floating* eps,
    floating* h, floating* sd, floating* sg, uint8_t* mask, floating* topv,
    int32_t* idx, floating* gates, floating* a, floating* b, floating* es, floating* c,
    floating* probs, floating* pc, floating* lse, double* load, double* psum,
) noexcept nogil:
    """One row: noise, top-(k+1), gate values, P(x, i) into `load`, softmax(clean) into `psum`."""
    cdef Py_ssize_t n = s.n, k = s.k, kk = s.kk, i, j
    cdef floating scale = <floating>s.scale, tiny, sig, z, pdf, m, thr_in, thr_out, sdi, ai
    cdef double tot
    cdef const floating* sel = clean
    if floating is float:
        tiny = FLT_MIN
    else:
        tiny = DBL_MIN
    if s.noisy:
        for i in range(n):  # std = s * softplus(raw); H = clean + eps * std
            sd[i] = scale * _softplus(raw[i], &sig)
            sg[i] = sig
            h[i] = clean[i] + eps[i] * sd[i]
            if k == 1:
                c[i] = eps[i] * sig * scale  # dH/draw per unit dH, for the dense k = 1 gradient
        sel = h
    _topk_row(sel, n, kk, idx, topv)
    if k > 1:  # softmax over the k kept logits
        m = topv[0]
        tot = 0
        for j in range(k):
            gates[j] = _exp(topv[j] - m)
            tot += gates[j]
        for j in range(k):
            gates[j] = gates[j] / <floating>tot
    else:  # k = 1: the chosen expert's probability under the full softmax of H
        m = topv[0]
        tot = 0
        for i in range(n):
            probs[i] = _exp(sel[i] - m)
            tot += probs[i]
        for i in range(n):
            probs[i] = probs[i] / <floating>tot
        gates[0] = probs[idx[0]]
        if s.p_is_probs:
            if s.want_lse:
                lse[0] = m + _log(<floating>tot)
            if s.want_p:
                for i in range(n):
                    psum[i] += probs[i]
    if s.noisy:
        for j in range(kk):
            es[j] = eps[idx[j]] * sg[idx[j]] * scale
    if s.smooth:  # P(x, i) with the threshold kth_excluding(H, k, i)
        thr_out = topv[k - 1]
        thr_in = topv[k]
        for j in range(k):
            mask[idx[j]] = 1
        for i in range(n):
            sdi = tiny if sd[i] < tiny else sd[i]  # np.maximum(std, tiny): NaN stays NaN
            z = (clean[i] - (thr_in if mask[i] else thr_out)) / sdi
            load[i] += _ndtr(z)
            pdf = _exp(<floating>-0.5 * z * z) * <floating>INV_SQRT_2PI
            ai = pdf / sdi
            a[i] = ai
            b[i] = z * sg[i] * scale if ai != 0 else 0  # 0 * inf would be NaN; the term is 0
        for j in range(k):
            mask[idx[j]] = 0
    if (s.want_p or s.want_lse) and not s.p_is_probs:  # softmax / logsumexp of the clean logits
        m = clean[0]
        for i in range(1, n):
            if clean[i] > m:
                m = clean[i]
        tot = 0
        for i in range(n):
            pc[i] = _exp(clean[i] - m)
            tot += pc[i]
        if s.want_lse:
            lse[0] = m + _log(<floating>tot)
        for i in range(n):
            pc[i] = pc[i] / <floating>tot
        if s.want_p:
            for i in range(n):
                psum[i] += pc[i]


cdef void _row_backward(
    const Spec* s, const floating* dg_in, const floating* dimp, const floating* dload,
    const floating* gsw, floating dlse, const int32_t* idx, const floating* gates,
    const floating* a, const floating* b, const floating* es, const floating* c,
    const floating* probs, const floating* pc, floating* dh, floating* dcl, floating* drw,
) noexcept nogil:
    """One row's d_clean and d_raw from dL/dgates (+ d importance), dL/dP and the softmax terms."""
    cdef Py_ssize_t n = s.n, k = s.k, kk = s.kk, i, j, p
    cdef floating gd = 0, t, v, r, dc, tot_g
    cdef double dot = 0, tot_dc = 0, in_dc = 0
    cdef bint balance = s.smooth and dload != NULL
    for j in range(kk):
        dh[j] = 0
    if k > 1:  # d softmax over the kept logits, on those k positions
        for j in range(k):
            dh[j] = dg_in[j] + dimp[idx[j]] if dimp != NULL else dg_in[j]
        tot_g = 0
        for j in range(k):
            tot_g = tot_g + gates[j] * dh[j]
        for j in range(k):
            dh[j] = gates[j] * (dh[j] - tot_g)
    else:  # gate = softmax(H)_i*: dH = gate * d_gate * (onehot_i* - probs)
        gd = gates[0] * (dg_in[0] + dimp[idx[0]] if dimp != NULL else dg_in[0])
        dh[0] = gd
    if gsw != NULL:
        for i in range(n):
            dot += <double>pc[i] * gsw[i]
    for i in range(n):
        v = 0
        r = 0
        if k == 1:
            t = -(probs[i] * gd)
            v = t
            if s.noisy:
                r = t * c[i]
        if balance:
            dc = dload[i] * a[i]
            v = v + dc
            r = r - dc * b[i]
            tot_dc += dc
        if gsw != NULL:
            v = v + pc[i] * (gsw[i] - <floating>dot)
        if dlse != 0:
            v = v + dlse * pc[i]
        dcl[i] = v
        if s.noisy:
            drw[i] = r
    if balance:  # the thresholds: the (k+1)-th of H for the kept, the k-th for the others
        for j in range(k):
            in_dc += dload[idx[j]] * a[idx[j]]
        dh[k] = dh[k] - <floating>in_dc
        dh[k - 1] = dh[k - 1] - <floating>(tot_dc - in_dc)
    for j in range(kk):
        p = idx[j]
        dcl[p] = dcl[p] + dh[j]
        if s.noisy:
            drw[p] = drw[p] + dh[j] * es[j]


# ----------------------------------------------------------------------------- blocks
cdef void _logits(
    Py_ssize_t n, Py_ssize_t R, Py_ssize_t d, const floating* w, const floating* xr,
    floating* out, floating* pad, floating* tmp,
) noexcept nogil:
    """out [R, n] = xr [R, d] w [d, n] in GEMMs of LOGIT_TILE experts each, the last, partial
    tile through a zero-padded copy of its columns (pad [d, LOGIT_TILE], tmp [R, LOGIT_TILE]):
    every GEMM has the shape (LOGIT_TILE, R, d) whatever n is, so an expert's logit does not
    depend on how many experts follow it."""
    cdef Py_ssize_t T = LOGIT_TILE, tiles = n // T, full = tiles * T, rest = n - full, t, r, j
    for t in range(tiles):
        _gemm(c"N", c"N", <int>T, <int>R, <int>d, w + t * T, <int>n, xr, <int>d, out + t * T, <int>n)
    if rest:
        for j in range(d):
            for r in range(T):
                pad[j * T + r] = w[j * n + full + r] if r < rest else <floating>0
        _gemm(c"N", c"N", <int>T, <int>R, <int>d, pad, <int>T, xr, <int>d, tmp, <int>T)
        for r in range(R):
            for j in range(rest):
                out[r * n + full + j] = tmp[r * T + j]


cdef void _forward_block(
    const Spec* s, Py_ssize_t bi, const int64_t* blk, Py_ssize_t rmax,
    const floating* x, const floating* wg, const floating* wn, const floating* eps,
    floating* buf, uint8_t* mask,
    int32_t* idx, floating* gates, floating* a, floating* b, floating* es, floating* c,
    floating* probs, floating* pc, floating* lse, double* load_part, double* psum_part,
) noexcept nogil:
    cdef Py_ssize_t n = s.n, d = s.d, k = s.k, kk = s.kk
    cdef Py_ssize_t r0 = blk[3 * bi], r1 = blk[3 * bi + 1], g = blk[3 * bi + 2], R = r1 - r0, r, row, i
    cdef floating* cl = buf  # [R, n]
    cdef floating* rw = buf + rmax * n  # [R, n]
    cdef floating* h = rw + rmax * n  # [n]
    cdef floating* sd = h + n
    cdef floating* sg = sd + n
    cdef floating* topv = sg + n  # [kk]
    cdef floating* pad = topv + kk  # [d, LOGIT_TILE]
    cdef floating* tmp = pad + d * LOGIT_TILE  # [rmax, LOGIT_TILE]
    cdef double* lp = load_part + bi * n if s.smooth else NULL
    cdef double* pp = psum_part + bi * n if s.want_p else NULL
    _logits(n, R, d, wg + g * d * n, x + r0 * d, cl, pad, tmp)  # [R, n]
    if s.noisy:
        _logits(n, R, d, wn + g * d * n, x + r0 * d, rw, pad, tmp)  # [R, n]
    if s.allowed != NULL:  # masked experts: the constant MASKED_LOGIT as their clean logit
        for r in range(R):
            for i in range(n):
                if s.allowed[(r0 + r) * n + i] == 0:
                    cl[r * n + i] = <floating>_MASKED
    if lp != NULL:
        memset(lp, 0, n * sizeof(double))
    if pp != NULL:
        memset(pp, 0, n * sizeof(double))
    for r in range(R):
        row = r0 + r
        _row_forward(
            s, cl + r * n, rw + r * n, eps + row * n if s.noisy else NULL, h, sd, sg, mask, topv,
            idx + row * kk, gates + row * k,
            a + row * n if s.smooth else NULL, b + row * n if s.smooth else NULL,
            es + row * kk if s.noisy else NULL, c + row * n if (s.noisy and k == 1) else NULL,
            probs + row * n if k == 1 else NULL,
            pc + row * n if pc != NULL else NULL,
            lse + row if s.want_lse else NULL, lp, pp,
        )


cdef void _backward_block(
    const Spec* s, Py_ssize_t bi, const int64_t* blk,
    const floating* wg, const floating* wn, const floating* d_gates, const floating* dimp,
    const floating* dload, const floating* gsw, const floating* dlse,
    const int32_t* idx, const floating* gates, const floating* a, const floating* b,
    const floating* es, const floating* c, const floating* probs, const floating* pc,
    floating* dh, floating* d_clean, floating* d_raw, floating* dx,
) noexcept nogil:
    cdef Py_ssize_t n = s.n, d = s.d, k = s.k, kk = s.kk
    cdef Py_ssize_t r0 = blk[3 * bi], r1 = blk[3 * bi + 1], g = blk[3 * bi + 2], R = r1 - r0, r, row, i
    cdef const floating* p_row = probs if s.p_is_probs else pc
    for r in range(R):
        row = r0 + r
        _row_backward(
            s, d_gates + row * k, dimp + g * n if dimp != NULL else NULL,
            dload + g * n if dload != NULL else NULL, gsw + g * n if gsw != NULL else NULL,
            dlse[row] if dlse != NULL else 0, idx + row * kk, gates + row * k,
            a + row * n if s.smooth else NULL, b + row * n if s.smooth else NULL,
            es + row * kk if s.noisy else NULL, c + row * n if (s.noisy and k == 1) else NULL,
            probs + row * n if k == 1 else NULL, p_row + row * n if p_row != NULL else NULL,
            dh, d_clean + row * n, d_raw + row * n if s.noisy else NULL,
        )
        if s.allowed != NULL:  # a masked logit is a constant: no gradient reaches W_g or x
            for i in range(n):
                if s.allowed[row * n + i] == 0:
                    d_clean[row * n + i] = 0
    # dx [R, d] = d_clean W_g^T (+ d_raw W_noise^T)
    _gemm(c"T", c"N", <int>d, <int>R, <int>n, wg + g * d * n, <int>n, d_clean + r0 * n, <int>n,
          dx + r0 * d, <int>d)
    if s.noisy:
        _gemm_beta(c"T", c"N", <int>d, <int>R, <int>n, wn + g * d * n, <int>n, d_raw + r0 * n,
                   <int>n, <floating>1, dx + r0 * d, <int>d)


cdef void _weight_grad_task(
    const Spec* s, Py_ssize_t ti, const int64_t* tasks, const int64_t* offsets,
    const floating* x, const floating* d_clean, const floating* d_raw,
    floating* dwg, floating* dwn, bint zero_noise,
) noexcept nogil:
    """dW[g][:, c0:c1] = x_g^T d[g rows, c0:c1] for one (group, column chunk)."""
    cdef Py_ssize_t n = s.n, d = s.d, g = tasks[3 * ti], c0 = tasks[3 * ti + 1], c1 = tasks[3 * ti + 2]
    cdef Py_ssize_t o = offsets[g], rows = offsets[g + 1] - offsets[g], q
    _gemm(c"N", c"T", <int>(c1 - c0), <int>d, <int>rows, d_clean + o * n + c0, <int>n, x + o * d, <int>d,
          dwg + g * d * n + c0, <int>n)
    if s.noisy:
        _gemm(c"N", c"T", <int>(c1 - c0), <int>d, <int>rows, d_raw + o * n + c0, <int>n, x + o * d,
              <int>d, dwn + g * d * n + c0, <int>n)
    elif zero_noise:  # a noisy gate after an eval forward: no noise path, zero gradient
        for q in range(d):
            memset(dwn + g * d * n + q * n + c0, 0, (c1 - c0) * sizeof(floating))


# ----------------------------------------------------------------------------- drivers
def _forward_impl(
    GateForward st, const floating[:, ::1] x, const floating[:, :, ::1] wg, wn_arr, eps_arr,
    floating[:, ::1] scratch, uint8_t[:, ::1] masks,
) -> None:
    cdef Spec s = st.spec
    cdef Py_ssize_t nb = st.n_blocks, bi, rmax = st.rmax, stride = scratch.shape[1]
    cdef const int64_t[::1] blocks = st.blocks
    cdef const int64_t* blk = &blocks[0] if nb else NULL
    cdef const floating[:, :, ::1] wn
    cdef const floating[:, ::1] eps
    cdef const floating* wnp = NULL
    cdef const floating* epsp = NULL
    if s.noisy:
        wn = wn_arr
        eps = eps_arr
        wnp = &wn[0, 0, 0]
        epsp = &eps[0, 0] if eps.shape[0] else NULL
    cdef floating[:, ::1] gates = st.gates
    cdef int32_t[:, ::1] idx = st.idx_full
    cdef floating* ap = _ptr2(st.a, <floating>0)
    cdef floating* bp = _ptr2(st.b, <floating>0)
    cdef floating* esp = _ptr2(st.es, <floating>0)
    cdef floating* cp = _ptr2(st.c, <floating>0)
    cdef floating* prp = _ptr2(st.probs, <floating>0)
    cdef floating* pcp = _ptr2(st.pc, <floating>0)
    cdef floating* lsep = _ptr1(st.lse, <floating>0)
    cdef double* lpart = _dptr2(st.load_part)
    cdef double* ppart = _dptr2(st.psum_part)
    if nb == 0:
        return
    cdef const floating* xp = &x[0, 0]
    cdef const floating* wgp = &wg[0, 0, 0]
    cdef floating* sp = &scratch[0, 0]
    cdef uint8_t* mp = &masks[0, 0]
    cdef int32_t* ip = &idx[0, 0]
    cdef floating* gp = &gates[0, 0]
    cdef int nthreads = st.nthreads
    with nogil:
        if nthreads > 1:
            for bi in prange(nb, schedule="dynamic", chunksize=1, num_threads=nthreads):
                _forward_block(
                    &s, bi, blk, rmax, xp, wgp, wnp, epsp, sp + threadid() * stride,
                    mp + threadid() * s.n, ip, gp, ap, bp, esp, cp, prp, pcp, lsep, lpart, ppart,
                )
        else:
            for bi in range(nb):
                _forward_block(
                    &s, bi, blk, rmax, xp, wgp, wnp, epsp, sp, mp, ip, gp, ap, bp, esp, cp, prp,
                    pcp, lsep, lpart, ppart,
                )


def _backward_impl(
    GateForward st, const floating[:, ::1] x, const floating[:, :, ::1] wg, wn_arr,
    const floating[:, ::1] d_gates, dimp_arr, dload_arr, gsw_arr, dlse_arr,
    floating[:, ::1] d_clean, d_raw_arr, floating[:, ::1] dx, floating[:, :, ::1] dwg, dwn_arr,
    floating[:, ::1] dh_scratch,
) -> None:
    cdef Spec s = st.spec
    cdef Py_ssize_t nb = st.n_blocks, bi, ti
    cdef const int64_t[::1] blocks = st.blocks
    cdef const int64_t[::1] tasks = st.dw_tasks
    cdef const int64_t[::1] offsets = st.offsets
    cdef Py_ssize_t nt = tasks.shape[0] // 3
    if nb == 0:
        return
    cdef const int64_t* blk = &blocks[0]
    cdef const int64_t* tk = &tasks[0] if nt else NULL
    cdef const int64_t* off = &offsets[0]
    cdef const floating* wnp = NULL
    cdef floating* drp = NULL
    cdef floating* dwnp = NULL
    cdef const floating[:, :, ::1] wn
    cdef floating[:, ::1] d_raw
    cdef floating[:, :, ::1] dwn
    if s.noisy:
        wn = wn_arr
        wnp = &wn[0, 0, 0]
        d_raw = d_raw_arr
        drp = &d_raw[0, 0]
    if dwn_arr is not None:
        dwn = dwn_arr
        dwnp = &dwn[0, 0, 0]
    cdef bint zero_noise = dwn_arr is not None and not s.noisy
    cdef const floating* dimp = _cptr2(dimp_arr, <floating>0)
    cdef const floating* dload = _cptr2(dload_arr, <floating>0)
    cdef const floating* gsw = _cptr2(gsw_arr, <floating>0)
    cdef const floating* dlse = _cptr1(dlse_arr, <floating>0)
    cdef const floating* ap = _ptr2(st.a, <floating>0)
    cdef const floating* bp = _ptr2(st.b, <floating>0)
    cdef const floating* esp = _ptr2(st.es, <floating>0)
    cdef const floating* cp = _ptr2(st.c, <floating>0)
    cdef const floating* prp = _ptr2(st.probs, <floating>0)
    cdef const floating* pcp = _ptr2(st.pc, <floating>0)
    cdef const int32_t[:, ::1] idx = st.idx_full
    cdef const floating[:, ::1] gates = st.gates
    cdef const int32_t* ip = &idx[0, 0]
    cdef const floating* gp = &gates[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef const floating* wgp = &wg[0, 0, 0]
    cdef const floating* dgp = &d_gates[0, 0]
    cdef floating* dcp = &d_clean[0, 0]
    cdef floating* dxp = &dx[0, 0]
    cdef floating* dwgp = &dwg[0, 0, 0]
    cdef floating* dhp = &dh_scratch[0, 0]
    cdef Py_ssize_t dh_stride = dh_scratch.shape[1]
    cdef int nthreads = st.nthreads
    with nogil:
        if nthreads > 1:
            for bi in prange(nb, schedule="dynamic", chunksize=1, num_threads=nthreads):
                _backward_block(
                    &s, bi, blk, wgp, wnp, dgp, dimp, dload, gsw, dlse, ip, gp, ap, bp, esp, cp,
                    prp, pcp, dhp + threadid() * dh_stride, dcp, drp, dxp,
                )
            for ti in prange(nt, schedule="dynamic", chunksize=1, num_threads=nthreads):
                _weight_grad_task(&s, ti, tk, off, xp, dcp, drp, dwgp, dwnp, zero_noise)
        else:
            for bi in range(nb):
                _backward_block(
                    &s, bi, blk, wgp, wnp, dgp, dimp, dload, gsw, dlse, ip, gp, ap, bp, esp, cp,
                    prp, pcp, dhp, dcp, drp, dxp,
                )
            for ti in range(nt):
                _weight_grad_task(&s, ti, tk, off, xp, dcp, drp, dwgp, dwnp, zero_noise)


cdef floating* _ptr2(arr, floating kind):
    """Data pointer of an optional C-contiguous 2-D array of this float type (NULL for None)."""
    cdef floating[:, ::1] v
    if arr is None or arr.size == 0:
        return NULL
    v = arr
    return &v[0, 0]


cdef floating* _ptr1(arr, floating kind):
    cdef floating[::1] v
    if arr is None or arr.size == 0:
        return NULL
    v = arr
    return &v[0]


cdef const floating* _cptr2(arr, floating kind):
    cdef const floating[:, ::1] v
    if arr is None or arr.size == 0:
        return NULL
    v = arr
    return &v[0, 0]


cdef const floating* _cptr1(arr, floating kind):
    cdef const floating[::1] v
    if arr is None or arr.size == 0:
        return NULL
    v = arr
    return &v[0]


cdef double* _dptr2(arr):
    cdef double[:, ::1] v
    if arr is None or arr.size == 0:
        return NULL
    v = arr
    return &v[0, 0]


def _finish_forward(GateForward st, const floating[:, ::1] gates) -> None:
    """Sums over each group's rows: importance and counts in row order (numpy's bincount order),
    the load and softmax partials of the blocks in block order."""
    cdef Py_ssize_t G = st.G, n = st.spec.n, k = st.spec.k, kk = st.spec.kk, g, r, j
    cdef const int64_t[::1] off = st.offsets
    cdef const int64_t[::1] blk = st.blocks
    cdef const int32_t[:, ::1] idx = st.idx_full
    cdef double[:, ::1] imp = st.importance
    cdef int64_t[:, ::1] cnt = st.counts
    cdef int32_t e
    with nogil:
        for g in range(G):
            for r in range(off[g], off[g + 1]):
                for j in range(k):
                    e = idx[r, j]
                    imp[g, e] += gates[r, j]
                    cnt[g, e] += 1
    if st.spec.smooth:
        _add_block_parts(st.load, st.load_part, blk, st.n_blocks, n)
    if st.spec.want_p:
        _add_block_parts(st.p_sum, st.psum_part, blk, st.n_blocks, n)


cdef void _add_block_parts(double[:, ::1] out, const double[:, ::1] parts, const int64_t[::1] blk,
                           Py_ssize_t n_blocks, Py_ssize_t n):
    """out[g] += parts[b] for each block b of group g, in block order (bits independent of threads)."""
    cdef Py_ssize_t bi, i, g
    with nogil:
        for bi in range(n_blocks):
            g = blk[3 * bi + 2]
            for i in range(n):
                out[g, i] += parts[bi, i]


# ----------------------------------------------------------------------------- state
cdef class GateForward:
    """What one forward decided (index, gates, group sums) and what its backward needs."""

    cdef Spec spec
    cdef public Py_ssize_t G, n_blocks, rmax, nthreads
    cdef public object blocks, dw_tasks, offsets, x, w_gate, w_noise
    cdef public object idx_full, gates, a, b, es, c, probs, pc, lse, load_part, psum_part
    cdef public object index, importance, counts, load, p_sum, allowed
    cdef public bint done, blas_one  # blas_one: this call's GEMMs run BLAS on one thread

    @property
    def noisy(self) -> bool:
        return self.spec.noisy

    @property
    def smooth(self) -> bool:
        return self.spec.smooth


def _float_input(x, str name, int ndim, str shape_text, dtype=None):
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype not in _FLOATS or (dtype is not None and a.dtype != dtype):
        want = dtype if dtype is not None else "float32 or float64"
        raise ValueError(f"{name} must be {want} {shape_text}, got {_describe(a)}")
    return np.ascontiguousarray(a)


def _check_offsets(offsets, Py_ssize_t G, Py_ssize_t P):
    o = np.asarray(offsets)
    if o.ndim != 1 or o.shape[0] != G + 1 or o.dtype.kind not in "iu":
        raise ValueError(f"offsets must be an integer array [G+1] = [{G + 1}], got {_describe(o)}")
    o = np.ascontiguousarray(o, dtype=np.int64)
    if o[0] != 0 or o[G] != P:
        raise ValueError(f"offsets must run from 0 to P = {P} rows, got {o[0]} .. {o[G]}")
    steps = np.diff(o)
    if (steps < 0).any():
        bad = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(f"offsets must not decrease, got offsets[{bad}] = {o[bad]} > offsets[{bad + 1}] = {o[bad + 1]}")
    return o


def block_rows(Py_ssize_t n) -> int:
    """Rows per block for n logits per row: the same for every n (see BLOCK_ROWS)."""
    return int(BLOCK_ROWS)


def logit_tile() -> int:
    """Experts per logits GEMM (the numpy path tiles the same way)."""
    return int(LOGIT_TILE)


def _plan_blocks(o, Py_ssize_t R):
    """[(r0, r1, g)] blocks of at most R rows that never straddle a group, flattened."""
    starts, ends, groups = [], [], []
    for g in np.flatnonzero(np.diff(o)):
        s0, s1 = int(o[g]), int(o[g + 1])
        cuts = np.arange(s0, s1, R)
        starts.append(cuts)
        ends.append(np.minimum(cuts + R, s1))
        groups.append(np.full(cuts.shape[0], g))
    if not starts:
        return np.zeros(0, dtype=np.int64)
    return np.stack([np.concatenate(starts), np.concatenate(ends), np.concatenate(groups)], axis=1).astype(np.int64).ravel()


def _plan_dw_tasks(o, Py_ssize_t n):
    """[(g, c0, c1)] weight-gradient GEMMs: every group with rows, in column chunks."""
    active = np.flatnonzero(np.diff(o))
    c0 = np.arange(0, n, DW_COLUMNS)
    g = np.repeat(active, c0.shape[0])
    cs = np.tile(c0, active.shape[0])
    return np.stack([g, cs, np.minimum(cs + DW_COLUMNS, n)], axis=1).astype(np.int64).ravel()


def forward(x, w_gate, w_noise, offsets, eps, k, *, noise_scale=1.0, softmax_clean=False, logsumexp=False,
            allowed=None):
    """Route P rows of gate inputs x [P, d] (sorted into G groups by `offsets` [G+1]) with
    per-group gate weights w_gate [G, d, n] (and w_noise [G, d, n] for a noisy gate).

    eps [P, n] is the noise (None: no noise this forward, e.g. a noisy gate in eval mode);
    the noise std is noise_scale * softplus(x W_noise). softmax_clean keeps softmax(x W_g)
    (its per-group sum is returned and its gradient taken), logsumexp the z-loss's
    logsumexp(x W_g) per row. allowed (bool [P, n], optional): the experts each row may use;
    the others' clean logits are MASKED_LOGIT and get no gradient. Returns a GateForward: index int32 [P, k], gates [P, k],
    importance and counts [G, n] (float64, int64), load [G, n] float64 (the smooth estimator,
    None without it), p_sum [G, n] float64 (or None), lse [P] (or None).
    """
    x = _float_input(x, "x", 2, "[P, d]")
    dt = x.dtype
    P, d = x.shape
    w_gate = _float_input(w_gate, "w_gate", 3, "[G, d, n]", dt)
    G, dg, n = w_gate.shape
    if dg != d or G < 1 or n < 1:
        raise ValueError(f"w_gate must be [G, d = {d}, n] with G, n >= 1, got {_describe(w_gate)}")
    if w_noise is not None:
        w_noise = _float_input(w_noise, "w_noise", 3, "[G, d, n]", dt)
        if w_noise.shape != w_gate.shape:
            raise ValueError(f"w_noise must be {list(w_gate.shape)} like w_gate, got {_describe(w_noise)}")
    noisy = eps is not None
    if noisy:
        if w_noise is None:
            raise ValueError("eps given, but this gate has no w_noise")
        eps = _float_input(eps, "eps", 2, "[P, n]", dt)
        if eps.shape != (P, n):
            raise ValueError(f"eps must be [P, n] = {[P, n]}, got {_describe(eps)}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer, got {type(k).__name__}") from None
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n = {n}], got {k}")
    scale = float(noise_scale)
    if not (np.isfinite(scale) and scale >= 0):
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale}")
    imax = np.iinfo(np.int32).max
    if n > imax or d > imax or P > imax:
        raise ValueError(f"BLAS takes 32-bit sizes: P = {P}, d = {d} and n = {n} must fit")
    o = _check_offsets(offsets, G, P)
    cdef const uint8_t[:, ::1] alw
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.dtype != np.bool_ or allowed.shape != (P, n):
            raise ValueError(f"allowed must be bool [P, n] = {[P, n]}, got {_describe(allowed)}")
        allowed = np.ascontiguousarray(allowed).view(np.uint8)

    st = GateForward()
    st.allowed = allowed
    st.spec.allowed = NULL
    if allowed is not None and P:
        alw = allowed
        st.spec.allowed = &alw[0, 0]
    st.spec.n, st.spec.k, st.spec.d = n, k, d
    st.spec.noisy = noisy
    st.spec.smooth = noisy and k < n
    st.spec.kk = k + 1 if st.spec.smooth else k
    st.spec.want_p = bool(softmax_clean)
    st.spec.want_lse = bool(logsumexp)
    st.spec.p_is_probs = k == 1 and not noisy
    st.spec.scale = scale
    kk = st.spec.kk
    st.G, st.offsets, st.x, st.w_gate, st.w_noise = G, o, x, w_gate, w_noise
    R = block_rows(n)
    st.rmax = R
    st.blocks = _plan_blocks(o, R)
    st.n_blocks = st.blocks.shape[0] // 3
    st.dw_tasks = _plan_dw_tasks(o, n)
    par = st.n_blocks > 1 and P * n >= _parallel_min_logits and _claim_threads()
    st.nthreads = openmp.omp_get_max_threads() if par else 1

    st.idx_full = np.empty((P, kk), dtype=np.int32)
    st.gates = np.empty((P, k), dtype=dt)
    st.a = np.empty((P, n), dtype=dt) if st.spec.smooth else None
    st.b = np.empty((P, n), dtype=dt) if st.spec.smooth else None
    st.es = np.empty((P, kk), dtype=dt) if noisy else None
    st.c = np.empty((P, n), dtype=dt) if noisy and k == 1 else None
    st.probs = np.empty((P, n), dtype=dt) if k == 1 else None
    keep_p = (softmax_clean or logsumexp) and not st.spec.p_is_probs
    st.pc = np.empty((P, n), dtype=dt) if keep_p else None
    st.lse = np.empty(P, dtype=dt) if logsumexp else None
    st.load_part = np.empty((st.n_blocks, n)) if st.spec.smooth else None
    st.psum_part = np.empty((st.n_blocks, n)) if softmax_clean else None
    st.importance = np.zeros((G, n))
    st.counts = np.zeros((G, n), dtype=np.int64)
    st.load = np.zeros((G, n)) if st.spec.smooth else None
    st.p_sum = np.zeros((G, n)) if softmax_clean else None
    T = st.nthreads
    scratch = np.empty((T, 2 * R * n + 3 * n + kk + d * LOGIT_TILE + R * LOGIT_TILE), dtype=dt)
    masks = np.zeros((T, n), dtype=np.uint8)
    # BLAS on one thread: in parallel blocks (the team is the parallelism), and for small calls,
    # whose GEMMs are too short to pay for waking BLAS's own threads on a busy machine
    st.blas_one = T > 1 or P * n < _parallel_min_logits
    single = st.blas_one and blas_single_enter()
    if T > 1 and not single:  # BLAS threads cannot be limited: keep its calls serial
        st.nthreads = T = 1
    try:
        _forward_impl(st, x, w_gate, w_noise, eps, scratch, masks)
    finally:
        if single:
            blas_single_exit()
    _finish_forward(st, st.gates)
    st.index = np.ascontiguousarray(st.idx_full[:, :k])
    st.done = False
    return st


def _optional_rows(a, str name, tuple shape, dtype, bint allowed, str why):
    if a is None:
        return None
    if not allowed:
        raise ValueError(f"{name} given, but {why}")
    a = _float_input(a, name, len(shape), str(list(shape)), dtype)
    if a.shape != shape:
        raise ValueError(f"{name} must be {dtype} {list(shape)}, got {_describe(a)}")
    return a


def _grad_out(a, str name, tuple shape, dtype):
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
        got = _describe(a) if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a {dtype} array {list(shape)}, got {got}")
    if not a.flags.writeable or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a writable C-contiguous array")
    return a


def backward(GateForward st, d_gates, *, d_importance=None, d_load=None, d_psum=None, d_lse=None,
             dw_gate, dw_noise=None):
    """Backward of one `forward`: returns dx [P, d]; writes dw_gate [G, d, n] (and dw_noise)
    for every group that had rows, leaving the other groups untouched.

    d_gates [P, k] is dL/dgates; d_importance, d_load, d_psum [G, n] are dL/d of the group
    sums forward returned (d_load is ignored where the smooth load has no gradient: no noise,
    or k = n); d_lse [P] is dL/dlse. A noisy gate's dw_noise is zeroed after an eval forward.
    """
    if st.done:
        raise ValueError("gate backward called twice for one forward")
    x = st.x
    dt = x.dtype
    cdef Py_ssize_t P = x.shape[0], n = st.spec.n, k = st.spec.k, d = st.spec.d, G = st.G
    d_gates = _float_input(d_gates, "d_gates", 2, "[P, k]", dt)
    if d_gates.shape != (P, k):
        raise ValueError(f"d_gates must be {dt} [P, k] = {[P, k]}, got {_describe(d_gates)}")
    d_importance = _optional_rows(d_importance, "d_importance", (G, n), dt, True, "")
    d_load = _optional_rows(d_load, "d_load", (G, n), dt, True, "")
    if not st.spec.smooth:
        d_load = None
    d_psum = _optional_rows(d_psum, "d_psum", (G, n), dt, st.spec.want_p, "forward did not keep softmax(clean)")
    d_lse = _optional_rows(d_lse, "d_lse", (P,), dt, st.spec.want_lse, "forward did not keep logsumexp(clean)")
    dw_gate = _grad_out(dw_gate, "dw_gate", (G, d, n), dt)
    if st.w_noise is not None:
        if dw_noise is None:
            raise ValueError("this gate has w_noise: dw_noise is required")
        dw_noise = _grad_out(dw_noise, "dw_noise", (G, d, n), dt)
    elif dw_noise is not None:
        raise ValueError("dw_noise given, but this gate has no w_noise")
    d_clean = np.empty((P, n), dtype=dt)
    d_raw = np.empty((P, n), dtype=dt) if st.spec.noisy else None
    dx = np.empty((P, d), dtype=dt)
    dh = np.empty((st.nthreads, st.spec.kk), dtype=dt)
    single = st.blas_one and blas_single_enter()
    try:
        _backward_impl(
            st, x, st.w_gate, st.w_noise, d_gates, d_importance, d_load, d_psum, d_lse,
            d_clean, d_raw, dx, dw_gate, dw_noise, dh,
        )
    finally:
        if single:
            blas_single_exit()
    st.done = True
    return dx
