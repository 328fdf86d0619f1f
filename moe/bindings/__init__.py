"""Sparse dispatch, grouped-GEMM and gate kernels: compiled (Cython) when built, numpy otherwise.

`HAVE_COMPILED` says whether the Cython extensions imported. Every public function here
has the same signature on both paths; `reference` is the numpy oracle. `use_backend("numpy")`
forces the oracle (for tests and benchmarks) without touching anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from moe.bindings import reference

try:  # the compiled path is optional at import time; `make test` insists on it
    from moe.bindings import _dispatch, _gates, _grouped, _optim  # type: ignore[attr-defined]

    HAVE_COMPILED = True
except ImportError:  # pragma: no cover - exercised only on a machine without the build
    _dispatch = _gates = _grouped = _optim = None
    HAVE_COMPILED = False

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_backend = "compiled" if HAVE_COMPILED else "numpy"


def backend() -> str:
    """The live path: "compiled" or "numpy"."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily force "numpy" or "compiled" (the latter only if it was built)."""
    global _backend
    if name not in ("numpy", "compiled"):
        raise ValueError(f"backend must be 'numpy' or 'compiled', got {name!r}")
    if name == "compiled" and not HAVE_COMPILED:
        raise RuntimeError("the compiled kernels are not built; run `pip install -e .`")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _mod(compiled_module, dtype: np.dtype | None = None):
    if _backend == "compiled" and (dtype is None or np.dtype(dtype) in _COMPILED_DTYPES):
        return compiled_module
    return reference


def topk_rows(h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return _mod(_dispatch, h.dtype).topk_rows(h, k)


def capacity_keep(expert_index: np.ndarray, n_experts: int, capacity: int) -> np.ndarray:
    return _mod(_dispatch).capacity_keep(expert_index, n_experts, capacity)


def counting_sort(expert_index: np.ndarray, keep: np.ndarray, n_experts: int):
    return _mod(_dispatch).counting_sort(expert_index, keep, n_experts)


def gather_rows(x: np.ndarray, src_row: np.ndarray) -> np.ndarray:
    return _mod(_dispatch, x.dtype).gather_rows(x, src_row)


def combine(out: np.ndarray, slot: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return _mod(_dispatch, out.dtype).combine(out, slot, weights)


def combine_backward(dy: np.ndarray, out: np.ndarray, slot: np.ndarray, weights: np.ndarray):
    return _mod(_dispatch, out.dtype).combine_backward(dy, out, slot, weights)


def ffn_forward(packed, offsets, w1, b1, w2, b2, activation: str, keep: bool = True):
    return _mod(_grouped, packed.dtype).ffn_forward(packed, offsets, w1, b1, w2, b2, activation, keep)


def ffn_backward(d_out, packed, offsets, w1, w2, pre, act, activation: str, dw1, db1, dw2, db2,
                 d_pre=None, implicit: int = 0):
    return _mod(_grouped, packed.dtype).ffn_backward(
        d_out, packed, offsets, w1, w2, pre, act, activation, dw1, db1, dw2, db2, d_pre, implicit
    )


def compiled_gates(dtype: np.dtype):
    """The fused gate kernels (`_gates`) for this dtype when the compiled path is live, else
    None: then `moe.routing.gates.GroupedTopK` runs its numpy path, the oracle."""
    return _gates if _mod(_gates, dtype) is _gates else None


def lowrank_rows(u, v, starts, counts, out):
    return _mod(_optim, out.dtype).lowrank_rows(u, v, starts, counts, out)


def row_sq_norms(g: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = float64 sum of squares of g[i] (g [n, size]): gradient norms for clipping."""
    return _mod(_optim, g.dtype).row_sq_norms(g, out)


def lowrank_sq_norms(u, v, starts, counts, out):
    """out[i] = float64 squared Frobenius norm of row i of a moe.optim.LowRank, unbuilt."""
    return _mod(_optim, v.dtype).lowrank_sq_norms(u, v, starts, counts, out)


def compiled_adam_rows():
    """The fused lazy-Adam kernel when the compiled path is live, else None (numpy path)."""
    return _optim.adam_rows if _backend == "compiled" else None


def compiled_adam_lowrank():
    """The fused lazy-Adam kernel for low-rank gradients (moe.optim.LowRank), or None."""
    return _optim.adam_lowrank if _backend == "compiled" else None


__all__ = [
    "compiled_adam_rows",
    "compiled_gates",
    "compiled_adam_lowrank",
    "lowrank_rows",
    "lowrank_sq_norms",
    "row_sq_norms",
    "HAVE_COMPILED",
    "backend",
    "use_backend",
    "reference",
    "topk_rows",
    "capacity_keep",
    "counting_sort",
    "gather_rows",
    "combine",
    "combine_backward",
    "ffn_forward",
    "ffn_backward",
]
