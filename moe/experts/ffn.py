"""FFNExperts: E two-layer feed-forward experts stored as stacked weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from moe import bindings
from moe.bindings.reference import ACTIVATIONS
from moe.optim import LowRank

# Experts with at most this many rows in a step keep their weight gradients as factors
# (LowRank): rebuilding a line of X^T D costs n multiply-adds per element, in cache, where
# writing the gradient out and reading it back costs 8 bytes per element of memory traffic.
# It is also where the kernels switch from gemm to per-row gemv (moe.bindings._grouped).
FEW_ROWS = 8


class FFNExperts:
    """W1 [E, d, h], b1 [E, h], W2 [E, h, d], b2 [E, d]; out = act(x W1 + b1) W2 + b2.

    Fan-in init: W1 ~ N(0, gain/d) with gain 2 for ReLU and 1 for GELU, W2 ~ N(0, 1/h), biases 0.

    A bank costs its weights. Gradients exist only once a backward ran, and only for the
    experts that received rows: after a backward, `touched` [A] lists those experts
    (ascending). Of them, `explicit` (more than FEW_ROWS rows) have their gradients in
    `grad_rows[name]` [A_x, ...], packed in that order, in buffers kept and reused across
    steps; `implicit` (1..FEW_ROWS rows) keep theirs as factors, `low_rank[name]` (see
    moe.optim.LowRank: W1's gradient over an expert's n rows is X^T D_pre, n (d + h) numbers
    instead of d h), which lazy Adam expands line by line in cache. `grads` gives dense
    [E, ...] gradients to callers that want them (tests, small models): built on first
    access, then kept current by every backward.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "relu",
        rng: np.random.Generator,
        dtype: np.dtype = np.float32,
    ) -> None:
        if n_experts < 1 or d_model < 1 or d_hidden < 1:
            raise ValueError(
                f"experts need n_experts, d_model, d_hidden >= 1, got {n_experts}, {d_model}, {d_hidden}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.activation, self.dtype = activation, np.dtype(dtype)
        gain = 2.0 if activation == "relu" else 1.0
        E, d, h = n_experts, d_model, d_hidden
        w1 = rng.standard_normal((E, d, h), dtype=self.dtype)
        w1 *= self.dtype.type(np.sqrt(gain / d))
        w2 = rng.standard_normal((E, h, d), dtype=self.dtype)
        w2 *= self.dtype.type(np.sqrt(1.0 / h))
        self.params = {
            "w1": w1,
            "b1": np.zeros((E, h), dtype=self.dtype),
            "w2": w2,
            "b2": np.zeros((E, d), dtype=self.dtype),
        }
        none = np.zeros(0, dtype=np.int64)
        self.touched = self.explicit = self.implicit = none  # [A], [A_x], [A_i] expert ids
        self.grad_rows: dict[str, np.ndarray] = {
            n: np.zeros((0,) + p.shape[1:], dtype=self.dtype) for n, p in self.params.items()
        }  # [A_x, ...] packed gradients of `explicit`
        self._store: dict[str, np.ndarray] = dict(self.grad_rows)  # [capacity, ...] behind grad_rows
        self.low_rank: dict[str, LowRank] = {}  # gradients of `implicit`, as factors
        self.grads = DenseGrads(self)
        self._cache = None

    def forward(self, packed: np.ndarray, offsets: np.ndarray, keep: bool = True) -> np.ndarray:
        """packed [N, d] grouped by expert -> out [N, d]. keep=False: no backward follows, so
        the hidden activations are not kept (and not even materialised for all rows at once)."""
        p = self.params
        out, pre, act = bindings.ffn_forward(
            packed, offsets, p["w1"], p["b1"], p["w2"], p["b2"], self.activation, keep
        )  # [N, d], [N, h], [N, h]
        self._cache = (packed, offsets, pre, act) if keep else None
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out [N, d] -> grad of packed rows [N, d]; fills touched, grad_rows, low_rank."""
        if self._cache is None:
            raise ValueError("experts backward called before a forward that keeps its activations")
        packed, offsets, pre, act = self._cache
        self._cache = None
        before = self.touched
        counts = np.diff(offsets)  # [E]
        self.touched = np.flatnonzero(counts)  # [A]
        few = counts[self.touched] <= FEW_ROWS
        self.explicit, self.implicit = self.touched[~few], self.touched[few]  # [A_x], [A_i]
        self.grad_rows = self._gradient_buffers(self.explicit.size)
        d_pre = np.empty(pre.shape, dtype=self.dtype) if self.implicit.size else None  # [N, h]
        p, g = self.params, self.grad_rows
        d_packed = bindings.ffn_backward(
            grad_out, packed, offsets, p["w1"], p["w2"], pre, act, self.activation,
            g["w1"], g["b1"], g["w2"], g["b2"], d_pre, FEW_ROWS if d_pre is not None else 0,
        )  # [N, d]
        self.low_rank = {}
        if d_pre is not None:
            s, c = offsets[self.implicit], counts[self.implicit]  # [A_i] first row, rows
            d, h = self.d_model, self.d_hidden
            grad_out = np.ascontiguousarray(grad_out)
            self.low_rank = {"w1": LowRank(packed, d_pre, s, c, (d, h)), "b1": LowRank(None, d_pre, s, c, (h,)),
                             "w2": LowRank(act, grad_out, s, c, (h, d)), "b2": LowRank(None, grad_out, s, c, (d,))}
        self.grads.refresh(before)
        return d_packed

    def _gradient_buffers(self, n: int) -> dict[str, np.ndarray]:
        """Views [n, ...] of the kept gradient buffers, grown (with 1/16 slack) when too small.

        Growing allocates fresh arrays, so a view someone kept from an earlier step stays valid."""
        if n > next(iter(self._store.values())).shape[0]:
            cap = n + n // 16
            self._store = {k: np.empty((cap,) + a.shape[1:], dtype=a.dtype) for k, a in self._store.items()}
        return {k: a[:n] for k, a in self._store.items()}

    def grad_bytes(self) -> int:
        """Bytes held by gradients: packed buffers, the hidden-layer gradient d_pre that the
        factors add to the activations kept anyway, and the dense arrays if asked for."""
        factors = self.low_rank["w1"].v.nbytes if self.low_rank else 0
        return int(sum(a.nbytes for a in self._store.values())) + factors + self.grads.nbytes()


class DenseGrads(Mapping):
    """name -> dense gradient [E, ...] of an FFNExperts bank (zero for experts without rows).

    Nothing is allocated until a caller reads an entry; from then on every backward keeps the
    dense arrays current, clearing the rows of the previous step and writing the new ones.
    """

    def __init__(self, bank: FFNExperts) -> None:
        self._bank = bank
        self._arrays: dict[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if self._arrays is None:
            b = self._bank
            self._arrays = {n: np.zeros_like(p) for n, p in b.params.items()}
            self.refresh(np.zeros(0, dtype=np.int64))
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bank.params)

    def __len__(self) -> int:
        return len(self._bank.params)

    def refresh(self, before: np.ndarray) -> None:
        """After a backward: zero the rows of `before` (the previous step's experts), write the new."""
        if self._arrays is None:
            return
        b = self._bank
        for n, a in self._arrays.items():
            a[before] = 0
            a[b.explicit] = b.grad_rows[n]
            if b.implicit.size:
                a[b.implicit] = b.low_rank[n].materialize()

    def nbytes(self) -> int:
        return 0 if self._arrays is None else int(sum(a.nbytes for a in self._arrays.values()))
