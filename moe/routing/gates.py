"""Top-k gates: noisy top-k (Shazeer 2017), softmax top-k, and top-1 (Switch).

All three are one mechanism with two switches: whether training adds tunable Gaussian
noise, and which load loss is used (Shazeer's smooth estimator needs the noise; without
noise the Switch surrogate E * sum f_i P_i stands in). Forward and backward sit together.

Gate values:
- k > 1: G = softmax over the k kept logits (KeepTopK then softmax, eq. 3-5).
- k = 1: a softmax over one logit is constantly 1 and carries no gradient, so the single
  expert is scaled by its *full* softmax probability softmax(H)_i over all E experts, as
  Switch does. This keeps the router trainable through the main loss.

The optional router z-loss (ST-MoE) is w_z * mean_x logsumexp(x W_g)^2 on the clean logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe.bindings import topk_rows
from moe.routing.balance import SmoothLoad, cv_squared, switch_balance

GATE_TYPES = ("noisy_topk", "softmax_topk", "top1")

# The clean logit of an expert a row may not use (an expert grown for another task). Finite,
# so the noise, the load estimator and their gradients stay finite; far below any real
# logit, so such an expert is never among the top k and its softmax share underflows to 0.
MASKED_LOGIT = -1e4


def mask_logits(clean: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """clean [B, E] with the entries not `allowed` (bool [B, E]) set to MASKED_LOGIT."""
    if allowed is None:
        return clean
    if allowed.shape != clean.shape or allowed.dtype != np.bool_:
        raise ValueError(f"allowed must be bool {list(clean.shape)}, got {allowed.dtype}{list(allowed.shape)}")
    return np.where(allowed, clean, clean.dtype.type(MASKED_LOGIT))  # [B, E]


def softplus(z: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore", over="ignore"):
        return np.logaddexp(z.dtype.type(0), z)


def sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore", over="ignore"):
        return 0.5 * (1 + np.tanh(0.5 * z))


def softmax(z: np.ndarray) -> np.ndarray:
    e = z - z.max(axis=1, keepdims=True)
    with np.errstate(under="ignore"):
        np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e


def logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    with np.errstate(under="ignore"):
        return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


@dataclass(frozen=True)
class GateOutput:
    """What a gate decides before capacity: choices, their gate values, and balance stats."""

    expert_index: np.ndarray  # int32 [B, k]
    gates: np.ndarray  # [B, k] before the capacity mask
    importance: np.ndarray  # [E]
    load: np.ndarray  # [E]
    aux_loss: float


class TopKRows:
    """Noisy top-k gating on logit rows that are already computed (no weights of its own).

    TopKGate runs it on x W_g; HierarchicalMoELayer runs it for its primary gate (rows =
    examples over groups) and for all secondary gates at once (rows = (example, group)
    pairs over one group's experts). Gate values as in the module doc.
    """

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self._cache = None

    def forward(
        self, clean: np.ndarray, raw: np.ndarray | None, eps: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """clean, raw, eps [P, n] (raw/eps None: no noise) -> (index [P, k], gates [P, k], P(x,i) [P, n] or None)."""
        k, n = self.k, self.n
        noisy = raw is not None
        if noisy:
            std = softplus(raw)  # [P, n]
            h = clean + eps * std  # [P, n]
        else:
            std = None
            h = clean
        top_index, top_value = topk_rows(h, min(k + 1, n) if noisy else k)  # [P, k(+1)]
        index = np.ascontiguousarray(top_index[:, :k])  # [P, k]
        if k > 1:
            probs = None
            gates = softmax(top_value[:, :k].copy())  # [P, k]
        else:
            probs = softmax(h.copy())  # [P, n]
            gates = np.take_along_axis(probs, index, axis=1)  # [P, 1]
        smooth = p_load = None
        if noisy:
            in_topk = np.zeros(h.shape, dtype=bool)
            np.put_along_axis(in_topk, index, True, axis=1)
            smooth = SmoothLoad()
            p_load = smooth.forward(clean, std, in_topk, top_index, top_value, k)  # [P, n]
        self.probs = probs  # [P, n] full softmax when k == 1, else None
        self._cache = (raw, eps, index, gates, probs, smooth)
        return index, gates, p_load

    def backward(
        self, d_gates: np.ndarray, d_p: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """dL/dgates [P, k] and dL/dP(x,i) [P, n] (or None) -> (d_clean [P, n], d_raw [P, n] or None)."""
        if self._cache is None:
            raise ValueError("gate backward called before forward")
        raw, eps, index, gates, probs, smooth = self._cache
        self._cache = None
        P, n = gates.shape[0], self.n
        with np.errstate(under="ignore"):  # products of tiny probabilities underflow to 0: fine
            d_h = np.zeros((P, n), dtype=gates.dtype)  # [P, n]
            if self.k > 1:
                d_top = gates * (d_gates - (gates * d_gates).sum(axis=1, keepdims=True))  # [P, k]
                np.put_along_axis(d_h, index, d_top, axis=1)
            else:  # gate = softmax(H)_i*:  dH = gate * (onehot_i* - probs)
                gd = gates * d_gates  # [P, 1]
                d_h -= probs * gd  # [P, n]
                np.put_along_axis(d_h, index, np.take_along_axis(d_h, index, axis=1) + gd, axis=1)
            if raw is None:
                return d_h, None
            d_clean = d_h.copy()  # [P, n]
            d_std = d_h * eps  # [P, n]
            if d_p is not None:
                dc, ds, dh_thr = smooth.backward(d_p)  # [P, n] each
                d_clean += dc + dh_thr
                d_std += ds + dh_thr * eps
            return d_clean, d_std * sigmoid(raw)  # softplus' = sigmoid


class TopKGate:
    """The shared mechanism; use NoisyTopKGate, SoftmaxTopKGate or Top1Gate."""

    noisy = False

    def __init__(
        self,
        d_in: int,
        n_experts: int,
        k: int,
        *,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        w_z: float = 0.0,
        rng: np.random.Generator,
        dtype: np.dtype = np.float32,
    ) -> None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        if d_in < 1:
            raise ValueError(f"gate input width must be >= 1, got {d_in}")
        for name, w in (("w_importance", w_importance), ("w_load", w_load), ("w_z", w_z)):
            if not (np.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w}")
        self.d_in, self.n_experts, self.k = d_in, n_experts, k
        self.w_importance, self.w_load, self.w_z = float(w_importance), float(w_load), float(w_z)
        self.dtype = np.dtype(dtype)
        self.params = {"w_gate": self._init_gate_weights(rng)}
        if self.noisy:
            self.params["w_noise"] = np.zeros((d_in, n_experts), dtype=self.dtype)
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.rows = TopKRows(k, n_experts)
        self._cache = None

    def _init_gate_weights(self, rng: np.random.Generator) -> np.ndarray:
        # Without noise, equal zero logits would send every example to experts 0..k-1 forever;
        # a small random start breaks the tie (Switch uses a small truncated normal).
        std = 0.1 / np.sqrt(self.d_in)
        return (rng.standard_normal((self.d_in, self.n_experts)) * std).astype(self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: np.ndarray, *, train: bool, rng: np.random.Generator | None,
        allowed: np.ndarray | None = None,
    ) -> GateOutput:
        """x: [B, d_in] (the example, with the task embedding appended when used); allowed
        (bool [B, E], optional): the experts each row may use, the rest are never chosen."""
        B, E = x.shape[0], self.n_experts
        clean = mask_logits(x @ self.params["w_gate"], allowed)  # [B, E]
        noisy = self.noisy and train
        if noisy:
            if rng is None:
                raise ValueError("a noisy gate needs an rng for its noise while training")
            raw = x @ self.params["w_noise"]  # [B, E]
            eps = rng.standard_normal((B, E), dtype=self.dtype)  # [B, E]
        else:
            raw = eps = None
        index, gates, p_load = self.rows.forward(clean, raw, eps)  # [B, k], [B, k], [B, E] or None
        probs = self.rows.probs
        importance = self._scatter(index, gates)  # [E]
        counts = np.bincount(index.ravel(), minlength=E).astype(self.dtype)  # [E]

        aux, d_imp = 0.0, None
        if self.w_importance > 0:
            cv2, g = cv_squared(importance)
            aux += self.w_importance * cv2
            d_imp = self.w_importance * g
        d_load = p_mean = None
        # softmax of the clean logits, shared by the Switch surrogate and the z-loss (forward
        # and backward); without noise it is the gate's own full softmax when k == 1
        p_clean = None
        if (self.w_load > 0 and not self.noisy) or self.w_z > 0:
            p_clean = probs if (probs is not None and not noisy) else softmax(clean.copy())  # [B, E]
        if noisy:
            load = p_load.sum(axis=0, dtype=np.float64).astype(self.dtype)  # [E]
            if self.w_load > 0:
                cv2, g = cv_squared(load)
                aux += self.w_load * cv2
                d_load = self.w_load * g  # [E]
        else:
            load = counts
            if self.w_load > 0 and not self.noisy:
                # Switch surrogate on the full softmax of the clean logits.
                p_mean = p_clean.mean(axis=0)  # [E]
                f = counts / counts.sum()
                val, d_pmean = switch_balance(f, p_mean)
                aux += self.w_load * val
                p_mean = self.w_load * d_pmean  # keep only the gradient
        if self.w_z > 0:
            lse = logsumexp(clean)  # [B]
            aux += self.w_z * float(np.mean(lse.astype(np.float64) ** 2))
        else:
            lse = None

        self._cache = (x, clean, index, d_imp, d_load, p_mean, lse, p_clean)
        return GateOutput(index, gates, importance, load, float(aux))

    def _scatter(self, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        sums = np.bincount(index.ravel(), weights=values.ravel(), minlength=self.n_experts)
        return sums.astype(self.dtype)  # [E]

    # ------------------------------------------------------------------ backward
    def backward(self, d_gates: np.ndarray) -> np.ndarray:
        """dL/dgates [B, k] (main loss) -> dL/dx [B, d_in]; the aux loss gradient is added here.

        Fills self.grads (overwritten, not accumulated). Products of small probabilities may
        underflow to zero here, which is the right answer, so underflow is not an error.
        """
        with np.errstate(under="ignore"):
            return self._backward(d_gates)

    def _backward(self, d_gates: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise ValueError("gate backward called before forward")
        x, clean, index, d_imp, d_load, d_pmean, lse, p = self._cache
        self._cache = None
        B, E = clean.shape
        d_g = d_gates.astype(self.dtype, copy=True)  # [B, k]
        if d_imp is not None:
            d_g += d_imp[index]  # importance sums the gate values
        d_p = None if d_load is None else np.broadcast_to(d_load, (B, E))  # load = sum_x P(x, i)
        d_clean, d_raw = self.rows.backward(d_g, d_p)  # [B, E], [B, E] or None
        if d_pmean is not None:  # P_i = mean_x softmax(clean)_i; p is that softmax
            g = d_pmean / B  # [E], the same for every row
            d_clean += p * (g - (p @ g)[:, None])  # [B, E]
        if lse is not None:
            d_clean += (self.w_z * 2.0 / B) * lse[:, None] * p

        self.grads["w_gate"][...] = x.T @ d_clean  # [d_in, E]
        dx = d_clean @ self.params["w_gate"].T  # [B, d_in]
        if self.noisy:
            if d_raw is None:  # eval-mode forward: no noise path
                self.grads["w_noise"][...] = 0
            else:
                self.grads["w_noise"][...] = x.T @ d_raw
                dx += d_raw @ self.params["w_noise"].T
        return dx


class NoisyTopKGate(TopKGate):
    """Shazeer 2017 noisy top-k gating; W_g and W_noise start at zero (the noise breaks ties)."""

    noisy = True

    def _init_gate_weights(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((self.d_in, self.n_experts), dtype=self.dtype)


class SoftmaxTopKGate(TopKGate):
    """Top-k of the clean logits, softmax over the kept k; no noise."""


class Top1Gate(TopKGate):
    """Switch routing: one expert, scaled by its full-softmax probability."""

    def __init__(self, d_in: int, n_experts: int, k: int = 1, **kwargs) -> None:
        if k != 1:
            raise ValueError(f"top1 gate routes to exactly one expert, got k={k}")
        super().__init__(d_in, n_experts, 1, **kwargs)


def make_gate(name: str, d_in: int, n_experts: int, k: int, **kwargs) -> TopKGate:
    classes = {"noisy_topk": NoisyTopKGate, "softmax_topk": SoftmaxTopKGate, "top1": Top1Gate}
    if name not in classes:
        raise ValueError(f"gate must be one of {GATE_TYPES}, got {name!r}")
    return classes[name](d_in, n_experts, k, **kwargs)
