"""FFNExperts: E two-layer feed-forward experts stored as stacked weights."""

from __future__ import annotations

import numpy as np

from moe import bindings
from moe.bindings.reference import ACTIVATIONS


class FFNExperts:
    """W1 [E, d, h], b1 [E, h], W2 [E, h, d], b2 [E, d]; out = act(x W1 + b1) W2 + b2.

    Fan-in init: W1 ~ N(0, gain/d) with gain 2 for ReLU and 1 for GELU, W2 ~ N(0, 1/h), biases 0.
    Weight gradients are dense arrays that are exactly right after every backward, but a
    step only writes (and clears) the slices of experts that received rows.
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
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.touched = np.zeros(0, dtype=np.int64)  # experts whose grads are non-zero
        self._cache = None

    def forward(self, packed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """packed [N, d] grouped by expert -> out [N, d]."""
        p = self.params
        out, pre, act = bindings.ffn_forward(
            packed, offsets, p["w1"], p["b1"], p["w2"], p["b2"], self.activation
        )  # [N, d], [N, h], [N, h]
        self._cache = (packed, offsets, pre, act)
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out [N, d] -> grad of packed rows [N, d]; fills self.grads."""
        if self._cache is None:
            raise ValueError("experts backward called before forward")
        packed, offsets, pre, act = self._cache
        self._cache = None
        g = self.grads
        for arr in g.values():  # clear only what the last step wrote
            arr[self.touched] = 0
        self.touched = np.flatnonzero(np.diff(offsets))  # [E_active]
        p = self.params
        return bindings.ffn_backward(
            grad_out, packed, offsets, p["w1"], p["w2"], pre, act, self.activation,
            g["w1"], g["b1"], g["w2"], g["b2"],
        )  # [N, d]
