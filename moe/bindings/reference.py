"""The numpy path for sparse dispatch and the grouped FFN: the oracle the compiled kernels must match.

Every function here has a twin of the same name and signature in the Cython modules
`_dispatch` and `_grouped`. This file is kept forever: it is what tests compare against,
and it runs wherever the compiled path cannot be built.

Conventions shared with the kernels:
- B examples, k choices each, E experts, N <= B*k dispatched rows, d model width, h hidden width.
- An *assignment* is the pair (b, j); its flat id is a = b*k + j.
- `slot[b, j]` is the packed row that carries assignment (b, j), or -1 when it was dropped.
- Packed rows are grouped by expert (a stable counting sort: within an expert, rows keep the
  order of their flat assignment id), and `offsets[e]:offsets[e+1]` is expert e's slice.
- Sums over an example's k choices run in the order j = 0..k-1, starting from zero, so both
  paths accumulate in the same order.
"""

from __future__ import annotations

import numpy as np
from scipy import special

ACTIVATIONS = ("relu", "gelu")


# ----------------------------------------------------------------------------- selection
def topk_rows(h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row, best first; equal values keep the lower expert index first."""
    B, E = h.shape
    # A stable sort of the negated row puts larger values first and keeps index order on ties.
    order = np.argsort(-h, axis=1, kind="stable")[:, :k].astype(np.int32)  # [B, k]
    return order, np.take_along_axis(h, order, axis=1)  # [B, k], [B, k]


def capacity_keep(expert_index: np.ndarray, n_experts: int, capacity: int) -> np.ndarray:
    """Which assignments fit in their expert's `capacity` rows.

    Priority: every example's first choice before any second choice (GShard's order),
    and within a choice rank, lower example index first. capacity < 0 means dropless.
    """
    B, k = expert_index.shape
    keep = np.ones((B, k), dtype=bool)
    if capacity < 0:
        return keep
    # Walk choice ranks in order; the rank-major flat order is expert_index.T.ravel().
    flat = expert_index.T.ravel()  # [k*B]  rank-major
    order = np.argsort(flat, kind="stable")  # [k*B]
    sorted_e = flat[order]
    starts = np.searchsorted(sorted_e, np.arange(n_experts))  # [E]
    position = np.empty(flat.shape[0], dtype=np.int64)
    position[order] = np.arange(flat.shape[0]) - starts[sorted_e]  # rank within its expert
    keep_rank_major = position < capacity  # [k*B]
    return keep_rank_major.reshape(k, B).T.copy()  # [B, k]


def counting_sort(
    expert_index: np.ndarray, keep: np.ndarray, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable sort of the kept assignments by expert.

    Returns (src_row int32[N], slot int32[B, k], offsets int64[E+1]): the example each packed
    row comes from, the packed row of each assignment (-1 if dropped), and expert slices.
    """
    B, k = expert_index.shape
    flat_e = expert_index.ravel()  # [B*k]
    flat_keep = keep.ravel()  # [B*k]
    kept = np.flatnonzero(flat_keep)  # [N]  flat assignment ids, ascending
    order = kept[np.argsort(flat_e[kept], kind="stable")]  # [N]
    counts = np.bincount(flat_e[kept], minlength=n_experts)  # [E]
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    slot = np.full(B * k, -1, dtype=np.int32)
    slot[order] = np.arange(order.shape[0], dtype=np.int32)
    return (order // k).astype(np.int32), slot.reshape(B, k), offsets


# ----------------------------------------------------------------------------- gather / combine
def gather_rows(x: np.ndarray, src_row: np.ndarray) -> np.ndarray:
    """Packed rows: packed[n] = x[src_row[n]]."""
    return x[src_row]  # [N, d]


def combine(out: np.ndarray, slot: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """y[b] = sum_j weights[b, j] * out[slot[b, j]] over kept assignments (the weighted scatter-add).

    Written as a gather over the k choices so the summation order is fixed.
    With weights = 1 it is also the backward of `gather_rows`.
    """
    B, k = slot.shape
    y = np.zeros((B, out.shape[1]), dtype=out.dtype)  # [B, d]
    for j in range(k):
        rows = slot[:, j]
        live = rows >= 0
        y[live] += weights[live, j, None] * out[rows[live]]  # [b_live, d]
    return y


def combine_backward(
    dy: np.ndarray, out: np.ndarray, slot: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of `combine`: (d_out [N, d], d_weights [B, k]); dropped assignments get 0."""
    B, k = slot.shape
    d_out = np.zeros_like(out)  # [N, d]
    d_w = np.zeros((B, k), dtype=out.dtype)  # [B, k]
    for j in range(k):
        rows = slot[:, j]
        live = np.flatnonzero(rows >= 0)
        d_out[rows[live]] = weights[live, j, None] * dy[live]  # [b_live, d]
        d_w[live, j] = np.einsum("nd,nd->n", out[rows[live]], dy[live])  # <out, dy>
    return d_out, d_w


# ----------------------------------------------------------------------------- grouped FFN
def activation_forward(pre: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(pre, 0)
    # exact GELU: x * Phi(x)
    with np.errstate(under="ignore"):
        return (pre * special.ndtr(pre)).astype(pre.dtype, copy=False)


def activation_backward(pre: np.ndarray, activation: str) -> np.ndarray:
    """d act / d pre, elementwise."""
    if activation == "relu":
        return (pre > 0).astype(pre.dtype)
    with np.errstate(under="ignore"):
        pdf = np.exp(-0.5 * pre * pre) / np.sqrt(2 * np.pi)
        return (special.ndtr(pre) + pre * pdf).astype(pre.dtype, copy=False)


def ffn_forward(
    packed: np.ndarray,
    offsets: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    activation: str,
    keep: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Every expert on its own slice of packed rows: out = act(x W1 + b1) W2 + b2.

    Returns (out [N, d], pre [N, h], act [N, h]); pre and act are kept for the backward.
    keep=False (no backward follows) returns (out, None, None).
    """
    N, d = packed.shape
    h = w1.shape[2]
    pre = np.empty((N, h), dtype=packed.dtype)
    act = np.empty((N, h), dtype=packed.dtype)
    out = np.empty((N, d), dtype=packed.dtype)
    for e in np.flatnonzero(np.diff(offsets)):
        s, t = offsets[e], offsets[e + 1]
        pre[s:t] = packed[s:t] @ w1[e] + b1[e]  # [n_e, h]
        act[s:t] = activation_forward(pre[s:t], activation)  # [n_e, h]
        out[s:t] = act[s:t] @ w2[e] + b2[e]  # [n_e, d]
    return (out, pre, act) if keep else (out, None, None)


def ffn_backward(
    d_out: np.ndarray,
    packed: np.ndarray,
    offsets: np.ndarray,
    w1: np.ndarray,
    w2: np.ndarray,
    pre: np.ndarray,
    act: np.ndarray,
    activation: str,
    dw1: np.ndarray,
    db1: np.ndarray,
    dw2: np.ndarray,
    db2: np.ndarray,
    d_pre: np.ndarray | None = None,
    implicit: int = 0,
) -> np.ndarray:
    """Backward of `ffn_forward`. Returns d_packed [N, d].

    Weight gradients are packed: row q of dw1/db1/dw2/db2 is the q-th expert (ascending)
    that received more than `implicit` rows, *written* (not accumulated). Experts without
    rows have no gradient rows, so a step's gradient memory and cost follow the experts
    used; neither do experts with 1..implicit rows, whose gradients stay as factors (see
    moe.optim.LowRank). d_pre [N, h], if given, receives every row's hidden-layer gradient.
    """
    if implicit > 0 and d_pre is None:
        raise ValueError("implicit > 0 leaves gradients as factors: pass d_pre [N, h] to keep them")
    d_packed = np.empty_like(packed)  # [N, d]
    counts = np.diff(offsets)
    explicit = np.flatnonzero(counts > implicit)
    want = (explicit.size,) + w1.shape[1:]
    if dw1.shape != want:
        raise ValueError(f"dw1 must be [A, d, h] = {list(want)} (one row per expert with rows), got {list(dw1.shape)}")
    slot = np.full(counts.size, -1)
    slot[explicit] = np.arange(explicit.size)
    for e in np.flatnonzero(counts):
        s, t, q = offsets[e], offsets[e + 1], slot[e]
        g = d_out[s:t]  # [n_e, d]
        dp = (g @ w2[e].T) * activation_backward(pre[s:t], activation)  # [n_e, h]
        if q >= 0:
            dw2[q] = act[s:t].T @ g  # [h, d]
            db2[q] = g.sum(axis=0)  # [d]
            dw1[q] = packed[s:t].T @ dp  # [d, h]
            db1[q] = dp.sum(axis=0)  # [h]
        if d_pre is not None:
            d_pre[s:t] = dp
        d_packed[s:t] = dp @ w1[e].T  # [n_e, d]
    return d_packed


def lowrank_rows(
    u: np.ndarray | None, v: np.ndarray, starts: np.ndarray, counts: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """out[i] = sum_{r < counts[i]} outer(u[starts[i] + r], v[starts[i] + r]) (u None: ones).

    The products are added in row order, starting from the first (no zero start), so the
    bits are those of the compiled kernel and of the fused low-rank Adam update.
    """
    n = starts.shape[0]
    flat = out.reshape(n, 1 if u is None else u.shape[1], v.shape[1])  # [n, a, b]
    if n == 0:
        return out

    def term(r: np.ndarray) -> np.ndarray:
        return v[r][:, None, :] if u is None else u[r][:, :, None] * v[r][:, None, :]  # [n_r, a, b]

    flat[...] = term(starts)
    for r in range(1, int(counts.max())):
        sel = np.flatnonzero(counts > r)
        flat[sel] = flat[sel] + term(starts[sel] + r)
    return out


def row_sq_norms(g: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = sum_j g[i, j]^2 in float64 (g [n, size]); numpy's own loops, so the bits do
    not depend on BLAS threads."""
    out[...] = np.einsum("ij,ij->i", g, g, dtype=np.float64)
    return out


def lowrank_sq_norms(
    u: np.ndarray | None, v: np.ndarray, starts: np.ndarray, counts: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """out[i] = |sum_{r < counts[i]} outer(u[starts[i] + r], v[starts[i] + r])|^2 in float64 (u
    None: ones), from the Gram identity |sum_r u_r v_r^T|^2 = sum_{r,s} (u_r . u_s)(v_r . v_s)
    without building the rows. Rows with the same count c are done together: their factors
    gathered as [m, c, a] and [m, c, b], the Gram matrices [m, c, c] formed by einsum."""
    out[...] = 0.0
    for c in np.unique(counts).tolist():
        rows = np.flatnonzero(counts == c)  # [m]
        at = starts[rows, None] + np.arange(c)  # [m, c]
        w = v[at]  # [m, c, b]
        gram = np.einsum("mib,mjb->mij", w, w, dtype=np.float64)  # [m, c, c]
        if u is not None:
            uu = u[at]  # [m, c, a]
            gram *= np.einsum("mia,mja->mij", uu, uu, dtype=np.float64)
        out[rows] = gram.sum(axis=(1, 2))
    return out
