"""Central finite differences in float64: the oracle for every backward pass."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_grad(loss: Callable[[], float], arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d loss / d arr by central differences, perturbing `arr` in place (restored after)."""
    assert arr.dtype == np.float64, "finite differences need float64"
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def assert_close(analytic: np.ndarray, numeric: np.ndarray, rtol: float = 1e-6, atol: float = 1e-7, name: str = "") -> None:
    """|a - n| <= atol + rtol * max|n|, elementwise; the message shows the worst entry."""
    err = np.abs(analytic - numeric)
    bound = atol + rtol * np.abs(numeric).max(initial=0.0)
    assert err.max(initial=0.0) <= bound, f"{name}: max error {err.max():.3e} > {bound:.3e}"
