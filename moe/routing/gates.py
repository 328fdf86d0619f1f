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
        self._cache = None

    def _init_gate_weights(self, rng: np.random.Generator) -> np.ndarray:
        # Without noise, equal zero logits would send every example to experts 0..k-1 forever;
        # a small random start breaks the tie (Switch uses a small truncated normal).
        std = 0.1 / np.sqrt(self.d_in)
        return (rng.standard_normal((self.d_in, self.n_experts)) * std).astype(self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: np.ndarray, *, train: bool, rng: np.random.Generator | None
    ) -> GateOutput:
        """x: [B, d_in] (the example, with the task embedding appended when used)."""
        B, E, k = x.shape[0], self.n_experts, self.k
        clean = x @ self.params["w_gate"]  # [B, E]
        noisy = self.noisy and train
        if noisy:
            if rng is None:
                raise ValueError("a noisy gate needs an rng for its noise while training")
            raw = x @ self.params["w_noise"]  # [B, E]
            std = softplus(raw)  # [B, E]
            eps = rng.standard_normal((B, E), dtype=self.dtype)  # [B, E]
            h = clean + eps * std  # [B, E]
        else:
            raw = std = eps = None
            h = clean
        n_top = min(k + 1, E) if noisy else k
        top_index, top_value = topk_rows(h, n_top)  # [B, n_top]
        index = np.ascontiguousarray(top_index[:, :k])  # [B, k]
        if k > 1:
            probs = None
            gates = softmax(top_value[:, :k].copy())  # [B, k]
        else:
            probs = softmax(h.copy())  # [B, E]
            gates = np.take_along_axis(probs, index, axis=1)  # [B, 1]
        importance = self._scatter(index, gates)  # [E]
        counts = np.bincount(index.ravel(), minlength=E).astype(self.dtype)  # [E]

        aux, d_imp = 0.0, None
        if self.w_importance > 0:
            cv2, g = cv_squared(importance)
            aux += self.w_importance * cv2
            d_imp = self.w_importance * g
        smooth = None
        p_mean = None
        if noisy:
            in_topk = np.zeros((B, E), dtype=bool)
            np.put_along_axis(in_topk, index, True, axis=1)
            smooth = SmoothLoad()
            p_load = smooth.forward(clean, std, in_topk, top_index, top_value, k)  # [B, E]
            load = p_load.sum(axis=0, dtype=np.float64).astype(self.dtype)  # [E]
            if self.w_load > 0:
                cv2, g = cv_squared(load)
                aux += self.w_load * cv2
                smooth.d_load = self.w_load * g
        else:
            load = counts
            if self.w_load > 0 and not self.noisy:
                # Switch surrogate on the full softmax of the clean logits.
                if probs is None:
                    probs = softmax(clean.copy())
                p_mean = probs.mean(axis=0)  # [E]
                f = counts / counts.sum()
                val, d_pmean = switch_balance(f, p_mean)
                aux += self.w_load * val
                p_mean = self.w_load * d_pmean  # keep only the gradient
        if self.w_z > 0:
            lse = logsumexp(clean)  # [B]
            aux += self.w_z * float(np.mean(lse.astype(np.float64) ** 2))
        else:
            lse = None

        self._cache = (x, clean, raw, std, eps, index, gates, probs, d_imp, smooth, p_mean, lse)
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
        x, clean, raw, std, eps, index, gates, probs, d_imp, smooth, d_pmean, lse = self._cache
        self._cache = None
        B, E = clean.shape
        d_g = d_gates.astype(self.dtype, copy=True)  # [B, k]
        if d_imp is not None:
            d_g += d_imp[index]  # importance sums the gate values

        d_h = np.zeros((B, E), dtype=self.dtype)  # [B, E]
        if self.k > 1:
            d_top = gates * (d_g - (gates * d_g).sum(axis=1, keepdims=True))  # [B, k]
            np.put_along_axis(d_h, index, d_top, axis=1)
        else:
            # gate = softmax(H)_i*:  d/dH = gate * (onehot_i* - probs)
            d_h -= probs * (gates * d_g)  # [B, E]
            np.put_along_axis(
                d_h, index, np.take_along_axis(d_h, index, axis=1) + gates * d_g, axis=1
            )

        d_clean = d_h.copy()  # [B, E]
        d_std = None
        if smooth is not None and getattr(smooth, "d_load", None) is not None:
            d_p = np.broadcast_to(smooth.d_load, (B, E))  # load = sum_x P(x, i)
            dc, ds, dh_thr = smooth.backward(d_p)
            d_clean += dc + dh_thr
            d_std = ds + dh_thr * eps
        if eps is not None:
            d_std = d_h * eps if d_std is None else d_std + d_h * eps
        if d_pmean is not None:
            # P_i = mean_x softmax(clean)_i
            p = softmax(clean.copy())  # [B, E]
            g = np.broadcast_to(d_pmean / B, (B, E))
            d_clean += p * (g - (p * g).sum(axis=1, keepdims=True))
        if lse is not None:
            p = softmax(clean.copy())
            d_clean += (self.w_z * 2.0 / B) * lse[:, None] * p

        self.grads["w_gate"][...] = x.T @ d_clean  # [d_in, E]
        dx = d_clean @ self.params["w_gate"].T  # [B, d_in]
        if self.noisy:
            if d_std is None:  # eval-mode forward: no noise path
                self.grads["w_noise"][...] = 0
            else:
                d_raw = d_std * sigmoid(raw)  # softplus' = sigmoid
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
