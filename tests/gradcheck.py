"""Central finite differences in float64: the oracle for every backward pass."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_grad(
    loss: Callable[[], float], arr: np.ndarray, eps: float = 1e-6, at: np.ndarray | None = None
) -> np.ndarray:
    """d loss / d arr by central differences, perturbing `arr` in place (restored after).

    With `at` (flat indices), only those entries: returns a 1-D array in that order."""
    assert arr.dtype == np.float64, "finite differences need float64"
    flat = arr.reshape(-1)
    picks = np.arange(flat.size) if at is None else np.asarray(at)
    out = np.zeros(picks.size)
    for t, i in enumerate(picks):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        out[t] = (up - down) / (2 * eps)
    return out.reshape(arr.shape) if at is None else out


def assert_close(analytic: np.ndarray, numeric: np.ndarray, rtol: float = 1e-6, atol: float = 1e-7, name: str = "") -> None:
    """|a - n| <= atol + rtol * max|n|, elementwise; the message shows the worst entry."""
    err = np.abs(analytic - numeric)
    bound = atol + rtol * np.abs(numeric).max(initial=0.0)
    assert err.max(initial=0.0) <= bound, f"{name}: max error {err.max():.3e} > {bound:.3e}"
