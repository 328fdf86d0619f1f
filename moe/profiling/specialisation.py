"""How much routing depends on the task: task-expert mutual information and expert overlap.

From a task x expert matrix of routed assignments (counts), with p(t, e) the share of all
assignments that task t sent to expert e:
  MI(task; expert) = sum_t p(t) KL(p(e | t) || p(e))   (nats; 0 when every task routes alike,
                     at most min(log T, log E))
  a task's own term KL(p(e | t) || p(e)) says how far its routing is from the average.
Overlap of two tasks: the share of routing mass they put on the same experts,
  sum_e min(p(e | t1), p(e | t2))  in [0, 1].
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _rows(matrix) -> np.ndarray:
    m = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return m.astype(np.float64)  # [T, E]


def mutual_information(matrix) -> tuple[float, np.ndarray]:
    """(MI in nats, each task's KL(p(e|t) || p(e)) [T]; 0 for a task with no assignments).
    Sparse in, sparse throughout: the cost follows the nonzero (task, expert) pairs."""
    m = sp.csr_matrix(matrix, dtype=np.float64)
    total = float(m.sum())
    if total <= 0:
        return 0.0, np.zeros(m.shape[0])
    n_t = np.asarray(m.sum(axis=1)).ravel()  # [T]
    p_e = np.asarray(m.sum(axis=0)).ravel() / total  # [E]
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))  # [nnz] task of each entry
    keep = m.data > 0
    rows, cols, q = rows[keep], m.indices[keep], m.data[keep] / n_t[rows[keep]]  # q = p(e | t)
    per_task = np.bincount(rows, weights=q * np.log(q / p_e[cols]), minlength=m.shape[0])  # [T]
    return float(np.sum(n_t / total * per_task)), per_task


def overlap(matrix, pairs: np.ndarray) -> np.ndarray:
    """sum_e min(p(e|t1), p(e|t2)) for each pair (t1, t2) of rows [P, 2] -> [P]."""
    m = _rows(matrix)
    n = m.sum(axis=1, keepdims=True)
    q = np.divide(m, n, out=np.zeros_like(m), where=n > 0)  # [T, E]
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return np.minimum(q[pairs[:, 0]], q[pairs[:, 1]]).sum(axis=1)  # [P]
