"""Dense building blocks with backward beside forward: Linear and LayerNorm."""

from __future__ import annotations

import numpy as np


class Linear:
    """y = x W + b with fan-in init W ~ N(0, gain / d_in); params/grads keyed "w", "b"."""

    def __init__(
        self, d_in: int, d_out: int, *, rng: np.random.Generator, dtype=np.float32, gain: float = 1.0
    ) -> None:
        if d_in < 1 or d_out < 1:
            raise ValueError(f"Linear needs d_in, d_out >= 1, got {d_in}, {d_out}")
        dt = np.dtype(dtype)
        w = rng.standard_normal((d_in, d_out), dtype=dt)
        w *= dt.type(np.sqrt(gain / d_in))
        self.params = {"w": w, "b": np.zeros(d_out, dtype=dt)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return x @ self.params["w"] + self.params["b"]  # [B, d_out]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._x is None:
            raise ValueError("Linear backward called before forward")
        x, self._x = self._x, None
        self.grads["w"][...] = x.T @ dy  # [d_in, d_out]
        self.grads["b"][...] = dy.sum(axis=0)
        return dy @ self.params["w"].T  # [B, d_in]


class LayerNorm:
    """Normalise each row to zero mean, unit variance, then scale and shift ("g", "b")."""

    def __init__(self, d: int, *, dtype=np.float32, eps: float = 1e-5) -> None:
        dt = np.dtype(dtype)
        self.eps = eps
        self.params = {"g": np.ones(d, dtype=dt), "b": np.zeros(d, dtype=dt)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self._cache = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        mu = x.mean(axis=1, keepdims=True)  # [B, 1]
        xc = x - mu  # [B, d]
        inv = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + x.dtype.type(self.eps))  # [B, 1]
        xhat = xc * inv  # [B, d]
        self._cache = (xhat, inv)
        return xhat * self.params["g"] + self.params["b"]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise ValueError("LayerNorm backward called before forward")
        (xhat, inv), self._cache = self._cache, None
        self.grads["g"][...] = (dy * xhat).sum(axis=0)
        self.grads["b"][...] = dy.sum(axis=0)
        dxhat = dy * self.params["g"]  # [B, d]
        return inv * (
            dxhat - dxhat.mean(axis=1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=1, keepdims=True)
        )


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)
