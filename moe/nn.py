"""Dense building blocks with backward beside forward: Linear and LayerNorm."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np


class Joined(Mapping):
    """name -> array, read through from several mappings under prefixes.

    A model's or layer's `grads`: values are looked up on access, never copied or read at
    construction, so an expert bank builds its dense gradients only when one is asked for.
    """

    def __init__(self, parts: Iterable[tuple[str, Mapping[str, np.ndarray]]]) -> None:
        self._where = {prefix + n: (m, n) for prefix, m in parts for n in m}

    def __getitem__(self, key: str) -> np.ndarray:
        m, n = self._where[key]
        return m[n]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


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


class MLP:
    """Linear -> ReLU -> Linear. The head of a task added from few examples: the trunk's
    features cluster by what the old tasks taught it, and a new label is often a union of
    such clusters, which no linear head can carve out."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rng: np.random.Generator, dtype=np.float32) -> None:
        self.l1 = Linear(d_in, d_hidden, rng=rng, dtype=dtype, gain=2.0)
        self.l2 = Linear(d_hidden, d_out, rng=rng, dtype=dtype)
        self.params = {"w1": self.l1.params["w"], "b1": self.l1.params["b"],
                       "w2": self.l2.params["w"], "b2": self.l2.params["b"]}
        self.grads = {"w1": self.l1.grads["w"], "b1": self.l1.grads["b"],
                      "w2": self.l2.grads["w"], "b2": self.l2.grads["b"]}
        self._pre = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._pre = self.l1.forward(x)  # [B, h]
        return self.l2.forward(relu(self._pre))  # [B, d_out]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._pre is None:
            raise ValueError("MLP backward called before forward")
        d_act = self.l2.backward(dy)  # [B, h]
        d_pre = d_act * (self._pre > 0)
        self._pre = None
        return self.l1.backward(d_pre)  # [B, d_in]
