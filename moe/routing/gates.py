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

from moe import bindings
from moe.bindings import topk_rows
from moe.routing.balance import SmoothLoad, cv_squared, switch_balance

GATE_TYPES = ("noisy_topk", "softmax_topk", "top1")

# The clean logit of an expert a row may not use (an expert grown for another task). Finite,
# so the noise, the load estimator and their gradients stay finite; far below any real
# logit, so such an expert is never among the top k and its softmax share underflows to 0.
MASKED_LOGIT = -1e4


LOGIT_TILE = 64  # experts per logits matmul (moe.bindings._gates tiles the same way)


def tiled_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [P, d] @ w [d, n] as matmuls of LOGIT_TILE columns each, the last zero-padded."""
    n, tile = w.shape[1], LOGIT_TILE
    out = np.empty((x.shape[0], n), dtype=np.result_type(x, w))  # [P, n]
    full = n - n % tile
    for c0 in range(0, full, tile):
        out[:, c0 : c0 + tile] = x @ w[:, c0 : c0 + tile]
    if full < n:
        pad = np.zeros((w.shape[0], tile), dtype=w.dtype)  # [d, tile]
        pad[:, : n - full] = w[:, full:]
        out[:, full:] = (x @ pad)[:, : n - full]
    return out


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


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
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
        self, clean: np.ndarray, raw: np.ndarray | None, eps: np.ndarray | None, noise_scale: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """clean, raw, eps [P, n] (raw/eps None: no noise) -> (index [P, k], gates [P, k], P(x,i) [P, n] or None).

        The noise std is noise_scale * softplus(raw) (1: Shazeer's formula exactly)."""
        k, n = self.k, self.n
        noisy = raw is not None
        if noisy:
            std = softplus(raw)  # [P, n]
            if noise_scale != 1.0:
                std *= std.dtype.type(noise_scale)
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
        self._cache = (raw, eps, index, gates, probs, smooth, noise_scale)
        return index, gates, p_load

    def release(self) -> None:
        """Drop what the last forward kept for backward (no backward will follow)."""
        self._cache = self.probs = None

    def backward(
        self, d_gates: np.ndarray, d_p: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """dL/dgates [P, k] and dL/dP(x,i) [P, n] (or None) -> (d_clean [P, n], d_raw [P, n] or None)."""
        if self._cache is None:
            raise ValueError("gate backward called before forward")
        raw, eps, index, gates, probs, smooth, noise_scale = self._cache
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
            d_raw = d_std * sigmoid(raw)  # softplus' = sigmoid
            if noise_scale != 1.0:
                d_raw *= d_raw.dtype.type(noise_scale)
            return d_clean, d_raw


@dataclass(frozen=True)
class GroupSums:
    """Sums over each group's rows that the balance losses read (float64 unless said)."""

    importance: np.ndarray  # [G, n]  sum of gate values
    counts: np.ndarray  # int64 [G, n]  assignments
    load: np.ndarray | None  # [G, n]  sum of Shazeer's P(x, i) (only with noise)
    p_sum: np.ndarray | None  # [G, n]  sum of softmax(clean) (when asked)
    lse: np.ndarray | None  # [P]  logsumexp(clean) per row, the gate's dtype (when asked)


def sums_as(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float64 sum in the layer's dtype: an expert's smooth load can be far below float32's
    range (P(x, i) = Phi(-30) is 1e-198 in double), and becomes 0 there instead of an error."""
    with np.errstate(under="ignore"):
        return v.astype(dtype)


class GroupedTopK:
    """Top-k gating of P rows sorted into G groups, each group with its own gate weights.

    Row r of group g gets clean = x_r W_g[g] and, with noise, raw = x_r W_noise[g]; then the
    TopKRows rule. The flat gate is G = 1; HierarchicalMoELayer's secondary gates are one
    group per primary choice. The compiled path (moe.bindings._gates, one fused pass over the
    rows each way) runs when it is live; otherwise this numpy path, which is its oracle.
    """

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.rows = TopKRows(k, n)
        self._cache = None

    def forward(
        self,
        x: np.ndarray,
        w_gate: np.ndarray,
        w_noise: np.ndarray | None,
        offsets: np.ndarray,
        eps: np.ndarray | None,
        *,
        noise_scale: float = 1.0,
        softmax_clean: bool = False,
        logsumexp: bool = False,
        allowed: np.ndarray | None = None,
        keep: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, GroupSums]:
        """x [P, d], w_gate/w_noise [G, d, n], offsets [G+1], eps [P, n] (None: no noise)
        -> (index int32 [P, k], gates [P, k], GroupSums). w_noise without eps: a noisy gate
        in eval mode (its gradient is zero). allowed (bool [P, n], optional): the experts each
        row may use; the others' clean logits are the constant MASKED_LOGIT (mask_logits), so
        they get no gradient. Both paths mask the same way: a model keeps its path (and so its
        bits) when experts closed to some tasks are added."""
        kern = bindings.compiled_gates(x.dtype)
        if kern is not None:
            st = kern.forward(x, w_gate, w_noise, offsets, eps, self.k, noise_scale=noise_scale,
                              softmax_clean=softmax_clean, logsumexp=logsumexp, allowed=allowed)
            load = st.load
            if eps is not None and load is None:  # k = n: every expert always chosen, P = 1
                load = np.repeat(np.diff(offsets).astype(np.float64)[:, None], self.n, axis=1)
            self._cache = ("compiled", st) if keep else None
            return st.index, st.gates, GroupSums(st.importance, st.counts, load, st.p_sum, st.lse)
        out = self._forward_numpy(x, w_gate, w_noise, offsets, eps, noise_scale, softmax_clean, logsumexp, allowed)
        if not keep:
            self._cache = None
            self.rows.release()
        return out

    def _forward_numpy(self, x, w_gate, w_noise, offsets, eps, noise_scale, softmax_clean, logsumexp, allowed):
        G, n = w_gate.shape[0], self.n
        noisy = eps is not None
        clean = mask_logits(self._logits(x, w_gate, offsets), allowed)  # [P, n]
        raw = self._logits(x, w_noise, offsets) if noisy else None  # [P, n]
        index, gates, p_load = self.rows.forward(clean, raw, eps, noise_scale)  # [P, k] x2, [P, n]
        sizes = np.diff(offsets)  # [G]
        group = np.repeat(np.arange(G), sizes)  # [P]
        flat = (group[:, None] * n + index).ravel()  # [P*k]
        importance = np.bincount(flat, weights=gates.ravel(), minlength=G * n).reshape(G, n)
        counts = np.bincount(flat, minlength=G * n).astype(np.int64).reshape(G, n)
        load = self._group_sum(p_load, offsets) if noisy else None  # [G, n]
        p = None
        if softmax_clean or logsumexp:
            probs = self.rows.probs
            p = probs if (probs is not None and not noisy) else softmax(clean.copy())  # [P, n]
        p_sum = self._group_sum(p, offsets) if softmax_clean else None
        lse = logsumexp_rows(clean) if logsumexp else None  # [P]
        self._cache = ("numpy", x, w_gate, w_noise, offsets, group, index, p, allowed)
        return index, gates, GroupSums(importance, counts, load, p_sum, lse)

    @staticmethod
    def _logits(x: np.ndarray, w: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """x W[g] on each group's rows, in matmuls of LOGIT_TILE experts (the last tile
        zero-padded): BLAS results depend on the shape, and with tiles of a fixed width an
        expert's logit does not change when experts are added after it (add-task's growth)."""
        out = np.empty((x.shape[0], w.shape[2]), dtype=x.dtype)  # [P, n]
        for g in np.flatnonzero(np.diff(offsets)):
            s, t = offsets[g], offsets[g + 1]
            out[s:t] = tiled_matmul(x[s:t], w[g])  # [n_g, n]
        return out

    @staticmethod
    def _group_sum(v: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """[P, n] -> [G, n] float64 sums over each group's rows, in row order."""
        G = offsets.shape[0] - 1
        if G == 1:
            return v.sum(axis=0, dtype=np.float64)[None]
        out = np.zeros((G, v.shape[1]))
        active = np.flatnonzero(np.diff(offsets))
        if active.size:
            out[active] = np.add.reduceat(v, offsets[active], axis=0, dtype=np.float64)
        return out

    def backward(
        self,
        d_gates: np.ndarray,
        *,
        d_importance: np.ndarray | None = None,
        d_load: np.ndarray | None = None,
        d_psum: np.ndarray | None = None,
        d_lse: np.ndarray | None = None,
        dw_gate: np.ndarray,
        dw_noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """dL/dgates [P, k] and dL/d of the GroupSums ([G, n]; d_lse [P]) -> dL/dx [P, d].

        Writes dw_gate (and dw_noise) [G, d, n] for every group that had rows and leaves the
        others untouched. Products of small probabilities underflow to 0 here: the right answer.
        """
        if self._cache is None:
            raise ValueError("gate backward called before forward")
        cache, self._cache = self._cache, None
        if cache[0] == "compiled":
            return bindings.compiled_gates(d_gates.dtype).backward(
                cache[1], d_gates, d_importance=d_importance, d_load=d_load, d_psum=d_psum,
                d_lse=d_lse, dw_gate=dw_gate, dw_noise=dw_noise)
        with np.errstate(under="ignore"):
            return self._backward_numpy(cache[1:], d_gates, d_importance, d_load, d_psum, d_lse, dw_gate, dw_noise)

    def _backward_numpy(self, cache, d_gates, d_importance, d_load, d_psum, d_lse, dw_gate, dw_noise):
        x, w_gate, w_noise, offsets, group, index, p, allowed = cache
        G, P, n = w_gate.shape[0], x.shape[0], self.n
        d_g = d_gates.astype(x.dtype, copy=True)  # [P, k]
        if d_importance is not None:  # importance sums the gate values
            d_g += d_importance[0][index] if G == 1 else d_importance[group[:, None], index]
        d_p = None  # load = sum over the group's rows of P(x, i)
        if d_load is not None:
            d_p = np.broadcast_to(d_load[0], (P, n)) if G == 1 else d_load[group]  # [P, n]
        d_clean, d_raw = self.rows.backward(d_g, d_p)  # [P, n], [P, n] or None
        if d_psum is not None:  # p_sum = sum over rows of softmax(clean) = p
            if G == 1:
                d_clean += p * (d_psum[0] - (p @ d_psum[0])[:, None])  # [P, n]
            else:
                gr = d_psum[group]  # [P, n]
                d_clean += p * (gr - (p * gr).sum(axis=1, keepdims=True))
        if d_lse is not None:
            d_clean += d_lse[:, None] * p  # d logsumexp = softmax
        if allowed is not None:  # a masked logit is a constant: no gradient reaches w_gate or x
            d_clean[~allowed] = 0
        if G == 1:
            dw_gate[0][...] = x.T @ d_clean  # [d, n]
            dx = d_clean @ w_gate[0].T  # [P, d]
            if w_noise is not None:
                if d_raw is None:  # eval-mode forward: no noise path
                    dw_noise[0][...] = 0
                else:
                    dw_noise[0][...] = x.T @ d_raw
                    dx += d_raw @ w_noise[0].T
            return dx
        dx = np.empty_like(x)  # [P, d]
        for g in np.flatnonzero(np.diff(offsets)):
            s, t = offsets[g], offsets[g + 1]
            dw_gate[g] = x[s:t].T @ d_clean[s:t]  # [d, n]
            dx[s:t] = d_clean[s:t] @ w_gate[g].T  # [n_g, d]
            if w_noise is not None:
                if d_raw is None:
                    dw_noise[g] = 0
                else:
                    dw_noise[g] = x[s:t].T @ d_raw[s:t]  # [d, n]
                    dx[s:t] += d_raw[s:t] @ w_noise[g].T  # [n_g, d]
        return dx


class TopKGate:
    """The shared mechanism; use NoisyTopKGate, SoftmaxTopKGate or Top1Gate.

    noise_scale multiplies the noise std while training (1: Shazeer's formula).
    """

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
        self.noise_scale = 1.0
        self.dtype = np.dtype(dtype)
        self.params = {"w_gate": self._init_gate_weights(rng)}
        if self.noisy:
            self.params["w_noise"] = np.zeros((d_in, n_experts), dtype=self.dtype)
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.rows = GroupedTopK(k, n_experts)
        self._cache = None

    def _init_gate_weights(self, rng: np.random.Generator) -> np.ndarray:
        # Without noise, equal zero logits would send every example to experts 0..k-1 forever;
        # a small random start breaks the tie (Switch uses a small truncated normal).
        std = 0.1 / np.sqrt(self.d_in)
        return (rng.standard_normal((self.d_in, self.n_experts)) * std).astype(self.dtype)

    def _weights(self, store: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The gate's [d_in, E] arrays as one group, [1, d_in, E] (views)."""
        return store["w_gate"][None], store["w_noise"][None] if self.noisy else None

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: np.ndarray, *, train: bool, rng: np.random.Generator | None,
        allowed: np.ndarray | None = None, keep: bool = True,
    ) -> GateOutput:
        """x: [B, d_in] (the example, with the task embedding appended when used); allowed
        (bool [B, E], optional): the experts each row may use, the rest are never chosen.
        keep=False: no backward will follow, so nothing is held for one."""
        B, E = x.shape[0], self.n_experts
        noisy = self.noisy and train
        eps = None
        if noisy:
            if rng is None:
                raise ValueError("a noisy gate needs an rng for its noise while training")
            eps = rng.standard_normal((B, E), dtype=self.dtype)  # [B, E]
        # the Switch surrogate needs softmax(clean) summed over the batch, the z-loss logsumexp
        switch = self.w_load > 0 and not self.noisy
        w_gate, w_noise = self._weights(self.params)
        index, gates, sums = self.rows.forward(
            x, w_gate, w_noise, np.array([0, B]), eps, noise_scale=self.noise_scale,
            softmax_clean=switch, logsumexp=self.w_z > 0, allowed=allowed, keep=keep,
        )  # [B, k], [B, k], sums over the batch
        importance = sums_as(sums.importance[0], self.dtype)  # [E]
        counts = sums.counts[0].astype(self.dtype)  # [E]

        aux, d_imp = 0.0, None
        if self.w_importance > 0:
            cv2, g = cv_squared(importance)
            aux += self.w_importance * cv2
            d_imp = self.w_importance * g
        d_load = d_psum = d_lse = None
        if noisy:
            load = sums_as(sums.load[0], self.dtype)  # [E]
            if self.w_load > 0:
                cv2, g = cv_squared(load)
                aux += self.w_load * cv2
                d_load = self.w_load * g  # [E]
        else:
            load = counts
            if switch:  # E * sum_i f_i P_i with P_i the batch mean of softmax(clean)_i
                p_mean = sums_as(sums.p_sum[0] / B, self.dtype)  # [E]
                val, d_pmean = switch_balance(counts / counts.sum(), p_mean)
                aux += self.w_load * val
                d_psum = (self.w_load * d_pmean) / B  # [E]
        if self.w_z > 0:
            lse = sums.lse  # [B]
            aux += self.w_z * float(np.mean(lse.astype(np.float64) ** 2))
            d_lse = (self.w_z * 2.0 / B) * lse  # [B]
        self._cache = (d_imp, d_load, d_psum, d_lse) if keep else None
        return GateOutput(index, gates, importance, load, float(aux))

    # ------------------------------------------------------------------ backward
    def backward(self, d_gates: np.ndarray) -> np.ndarray:
        """dL/dgates [B, k] (main loss) -> dL/dx [B, d_in]; the aux loss gradient is added here.

        Fills self.grads (overwritten, not accumulated).
        """
        if self._cache is None:
            raise ValueError("gate backward called before forward")
        d_imp, d_load, d_psum, d_lse = self._cache
        self._cache = None
        dw_gate, dw_noise = self._weights(self.grads)
        return self.rows.backward(
            np.ascontiguousarray(d_gates, dtype=self.dtype),
            d_importance=None if d_imp is None else d_imp[None],
            d_load=None if d_load is None else d_load[None],
            d_psum=None if d_psum is None else d_psum[None],
            d_lse=d_lse, dw_gate=dw_gate, dw_noise=dw_noise,
        )


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
