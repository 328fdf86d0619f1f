"""Tables of small same-shaped modules, one row per task (or per input domain).

Why: a model that holds 100,000 tasks cannot afford one Python object, one optimizer entry
and one checkpoint tensor per task, nor a step that loops over all of them. A table stacks
the parameters of every task of one shape along a leading axis ([R, ...]); a batch says
which row each run of examples uses; forward and backward touch only those rows, and the
lazy row-Adam of moe.optim updates only them, exactly as for experts. A row's gradient is
written only when the row is in the batch and zeroed again by the next backward, so the
cost of a step is set by the batch, not by the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe import bindings

# Few, long runs: one matmul per run. Many short runs: gather each example's weights and do
# one batched product, which costs a copy of [n, d_in, d_out] but no Python loop per row.
_LOOP_MAX_RUNS = 16


@dataclass(frozen=True)
class Runs:
    """Contiguous runs of examples that use one table row each.

    rows: int64 [u], distinct; starts: int64 [u + 1], run j is examples starts[j]:starts[j+1].
    """

    rows: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, sizes: np.ndarray) -> Runs:
        rows = np.asarray(rows, dtype=np.int64)
        if np.unique(rows).shape[0] != rows.shape[0]:
            raise ValueError(f"runs must use distinct rows, got {rows.tolist()[:10]}")
        starts = np.zeros(rows.shape[0] + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        return cls(rows, starts)

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def per_example(self) -> np.ndarray:
        """The table row of every example: int64 [n]."""
        return np.repeat(self.rows, self.sizes)

    def sum_runs(self, v: np.ndarray) -> np.ndarray:
        """Sum of v [n, ...] over each run -> [u, ...] (zero for an empty run)."""
        out = np.add.reduceat(v, self.starts[:-1], axis=0) if v.shape[0] else np.zeros((0,) + v.shape[1:], v.dtype)
        empty = self.sizes == 0
        if empty.any():  # reduceat returns v[start] for an empty run
            out[empty] = 0
        return out


class SparseGrads:
    """Full-size gradient arrays of which only the rows touched by the last backward are non-zero."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.grads = {n: np.zeros_like(p) for n, p in params.items()}
        self.touched = np.zeros(0, dtype=np.int64)  # rows written by the last backward, ascending

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Zero the previous rows, then set these rows' gradients (rows distinct)."""
        self.clear()
        for n, v in values.items():
            self.grads[n][rows] = v
        self.touched = np.sort(rows)

    def clear(self) -> None:
        for g in self.grads.values():
            g[self.touched] = 0
        self.touched = np.zeros(0, dtype=np.int64)

    def sq_norm(self) -> float:
        """float64 sum of squares of the touched rows (the rest are zero)."""
        total = 0.0
        if self.touched.size == 0:
            return total
        for g in self.grads.values():
            rows = g[self.touched].reshape(self.touched.shape[0], -1)  # [r, size]
            total += float(np.sum(bindings.row_sq_norms(rows, np.empty(rows.shape[0]))))
        return total


class LinearTable:
    """R linear maps of one shape: y = x w[r] + b[r] for the examples of row r.

    params/grads: "w" [R, d_in, d_out], "b" [R, d_out]. Row init as moe.nn.Linear's.
    """

    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        if w.ndim != 3 or b.shape != (w.shape[0], w.shape[2]) or b.dtype != w.dtype:
            raise ValueError(f"a linear table needs w [R, i, o] and b [R, o], got {w.shape} and {b.shape}")
        self.params = {"w": w, "b": b}
        self._grads = SparseGrads(self.params)
        self.grads = self._grads.grads
        self._cache = None

    @staticmethod
    def init_row(d_in: int, d_out: int, rng: np.random.Generator, dtype, gain: float = 1.0):
        """One row's (w [d_in, d_out], b [d_out]): fan-in normal init, zero bias."""
        dt = np.dtype(dtype)
        w = rng.standard_normal((d_in, d_out), dtype=dt)
        w *= dt.type(np.sqrt(gain / d_in))
        return w, np.zeros(d_out, dtype=dt)

    @property
    def n_rows(self) -> int:
        return int(self.params["w"].shape[0])

    @property
    def touched(self) -> np.ndarray:
        return self._grads.touched

    def grad_sq_norm(self) -> float:
        return self._grads.sq_norm()

    def forward(self, x: np.ndarray, runs: Runs) -> np.ndarray:
        """x [n, d_in] (examples grouped in runs) -> y [n, d_out]."""
        w, b = self.params["w"], self.params["b"]
        if runs.rows.shape[0] <= _LOOP_MAX_RUNS:
            y = np.empty((x.shape[0], w.shape[2]), dtype=w.dtype)  # [n, o]
            for j, r in enumerate(runs.rows):
                s, e = runs.starts[j], runs.starts[j + 1]
                np.matmul(x[s:e], w[r], out=y[s:e])
                y[s:e] += b[r]
            gathered = None
        else:
            rows = runs.per_example()  # [n]
            gathered = w[rows]  # [n, i, o]
            y = np.matmul(x[:, None, :], gathered)[:, 0, :] + b[rows]  # [n, o]
        self._cache = (x, runs, gathered)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy [n, d_out] -> dx [n, d_in]; the runs' rows get their weight gradients."""
        if self._cache is None:
            raise ValueError("LinearTable backward called before forward")
        (x, runs, gathered), self._cache = self._cache, None
        w = self.params["w"]
        if gathered is None:
            dx = np.empty(x.shape, dtype=w.dtype)  # [n, i]
            dw = np.empty((runs.rows.shape[0],) + w.shape[1:], dtype=w.dtype)  # [u, i, o]
            for j, r in enumerate(runs.rows):
                s, e = runs.starts[j], runs.starts[j + 1]
                np.matmul(x[s:e].T, dy[s:e], out=dw[j])
                np.matmul(dy[s:e], w[r].T, out=dx[s:e])
        else:
            dx = np.matmul(dy[:, None, :], gathered.transpose(0, 2, 1))[:, 0, :]  # [n, i]
            dw = runs.sum_runs(x[:, :, None] * dy[:, None, :])  # [u, i, o]
        self._grads.write(runs.rows, {"w": dw, "b": runs.sum_runs(dy)})
        return dx

    def zero_grad(self) -> None:
        self._grads.clear()


class MLPTable:
    """R two-layer heads of one shape: relu(x w1[r] + b1[r]) w2[r] + b2[r]."""

    def __init__(self, l1: LinearTable, l2: LinearTable) -> None:
        self.l1, self.l2 = l1, l2
        self._pre = None

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"w1": self.l1.params["w"], "b1": self.l1.params["b"],
                "w2": self.l2.params["w"], "b2": self.l2.params["b"]}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {"w1": self.l1.grads["w"], "b1": self.l1.grads["b"],
                "w2": self.l2.grads["w"], "b2": self.l2.grads["b"]}

    @property
    def n_rows(self) -> int:
        return self.l1.n_rows

    @property
    def touched(self) -> np.ndarray:
        return self.l1.touched

    def grad_sq_norm(self) -> float:
        return self.l1.grad_sq_norm() + self.l2.grad_sq_norm()

    def forward(self, x: np.ndarray, runs: Runs) -> np.ndarray:
        self._pre = self.l1.forward(x, runs)  # [n, h]
        return self.l2.forward(np.maximum(self._pre, 0), runs)  # [n, o]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._pre is None:
            raise ValueError("MLPTable backward called before forward")
        d_act = self.l2.backward(dy)  # [n, h]
        d_pre = d_act * (self._pre > 0)
        self._pre = None
        return self.l1.backward(d_pre)  # [n, i]

    def zero_grad(self) -> None:
        self.l1.zero_grad()
        self.l2.zero_grad()


class EmbeddingTable:
    """One vector per row: e [R, d]. forward gives each example its row's vector."""

    def __init__(self, e: np.ndarray) -> None:
        self.params = {"e": e}
        self._grads = SparseGrads(self.params)
        self.grads = self._grads.grads
        self._runs: Runs | None = None

    @property
    def n_rows(self) -> int:
        return int(self.params["e"].shape[0])

    @property
    def touched(self) -> np.ndarray:
        return self._grads.touched

    def grad_sq_norm(self) -> float:
        return self._grads.sq_norm()

    def forward(self, runs: Runs) -> np.ndarray:
        self._runs = runs
        return self.params["e"][runs.per_example()]  # [n, d]

    def backward(self, d: np.ndarray) -> None:
        """d [n, d] -> each run's row gets the sum over its examples."""
        if self._runs is None:
            raise ValueError("EmbeddingTable backward called before forward")
        runs, self._runs = self._runs, None
        self._grads.write(runs.rows, {"e": runs.sum_runs(d)})

    def zero_grad(self) -> None:
        self._grads.clear()
