"""Balance losses and Shazeer's smooth load estimator, each with its exact gradient.

CV uses the population variance (divide by E), as in Shazeer et al. 2017.
"""

from __future__ import annotations

import numpy as np
from scipy import special

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def cv_squared(v: np.ndarray) -> tuple[float, np.ndarray]:
    """CV(v)^2 = Var(v) / mean(v)^2 with the population variance, and its gradient d/dv.

    An all-zero (or single-expert) vector is perfectly balanced: value 0, gradient 0.
    """
    E = v.shape[0]
    m = float(v.mean(dtype=np.float64))
    if E < 2 or m == 0.0:
        return 0.0, np.zeros_like(v)
    dev = v.astype(np.float64) - m  # [E]
    var = float(np.mean(dev * dev))
    grad = (2.0 / (E * m * m)) * (dev - var / m)  # [E]
    return var / (m * m), grad.astype(v.dtype)


def switch_balance(f: np.ndarray, p_mean: np.ndarray) -> tuple[float, np.ndarray]:
    """Switch Transformer's auxiliary loss E * sum_i f_i * P_i and its gradient wrt P.

    f_i is the (non-differentiable) fraction of assignments routed to i and P_i the mean
    router probability; the loss is 1 at perfect balance.
    """
    E = f.shape[0]
    return float(E * np.dot(f.astype(np.float64), p_mean)), (E * f).astype(p_mean.dtype)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore"):
        return special.ndtr(z)


def normal_pdf(z: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore"):
        return np.exp(-0.5 * z * z) * z.dtype.type(_INV_SQRT_2PI)


class SmoothLoad:
    """P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i) and its backward (appendix A).

    kth_excluding(H, k, i) is the k-th largest of H with element i left out: the (k+1)-th
    largest of H when i is in the top k, the k-th largest otherwise. P compares the *noisy
    logits* H with the clean logit, never softmax probabilities.
    """

    def forward(
        self,
        clean: np.ndarray,
        std: np.ndarray,
        in_topk: np.ndarray,
        top_index: np.ndarray,
        top_value: np.ndarray,
        k: int,
    ) -> np.ndarray:
        """top_index/top_value hold the k+1 best of H per row (only k when k == E)."""
        B, E = clean.shape
        self.k, self.E = k, E
        if k >= E:  # every expert is always chosen: P = 1 exactly, no gradient
            self.z = None
            return np.ones_like(clean)
        thr = np.where(in_topk, top_value[:, k, None], top_value[:, k - 1, None])  # [B, E]
        safe_std = np.maximum(std, np.finfo(std.dtype).tiny)  # [B, E]
        z = (clean - thr) / safe_std  # [B, E]
        self.z, self.std, self.in_topk, self.top_index = z, safe_std, in_topk, top_index
        return normal_cdf(z)  # [B, E]

    def backward(self, d_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Given dL/dP [B, E], return (d_clean, d_std, d_H) where d_H lands on threshold elements."""
        if self.z is None:
            zero = np.zeros_like(d_p)
            return zero, zero, zero
        with np.errstate(under="ignore"):  # tails of the normal: underflow to 0 is exact enough
            dz = d_p * normal_pdf(self.z)  # [B, E]
            d_clean = dz / self.std  # [B, E]
            d_std = -dz * self.z / self.std  # [B, E]
        d_thr = -d_clean  # [B, E]
        k = self.k
        rows = np.arange(d_p.shape[0])
        d_h = np.zeros_like(d_p)  # [B, E]
        # The threshold of a top-k expert is the (k+1)-th element, of the others the k-th.
        d_h[rows, self.top_index[:, k]] += np.where(self.in_topk, d_thr, 0).sum(axis=1)
        d_h[rows, self.top_index[:, k - 1]] += np.where(self.in_topk, 0, d_thr).sum(axis=1)
        return d_clean, d_std, d_h
