"""Hand-built Routing records for the profiling tests (no gate involved)."""

from __future__ import annotations

import numpy as np
import pytest

from moe.routing.types import Routing


def _distinct_choices(rng: np.random.Generator, B: int, E: int, k: int, p: np.ndarray) -> np.ndarray:
    """int32[B, k] experts drawn from p, distinct within each row (rows with repeats redrawn)."""
    idx = rng.choice(E, size=(B, k), p=p)
    while True:
        srt = np.sort(idx, axis=1)
        bad = np.flatnonzero(np.any(srt[:, 1:] == srt[:, :-1], axis=1)) if k > 1 else np.array([], int)
        if bad.size == 0:
            return idx.astype(np.int32)
        idx[bad] = rng.choice(E, size=(bad.size, k), p=p)


def random_routing(
    rng: np.random.Generator, B: int, E: int, k: int, drop_p: float = 0.2, skew: float = 1.5
) -> Routing:
    """A plausible Routing: skewed expert popularity (so some experts stay dead), softmax
    gates, a random capacity mask that zeroes gates, and counts/importance consistent with it."""
    popularity = rng.random(E) ** (skew * 4) + 1e-12
    popularity /= popularity.sum()
    index = _distinct_choices(rng, B, E, k, popularity)  # [B, k]
    logits = rng.normal(size=(B, k))
    raw = np.exp(logits - logits.max(axis=1, keepdims=True))
    gates = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)  # [B, k]
    dropped = rng.random((B, k)) < drop_p  # [B, k]
    importance = np.bincount(index.ravel(), weights=gates.ravel(), minlength=E).astype(np.float32)
    load = (np.bincount(index.ravel(), minlength=E) * rng.uniform(0.5, 1.5, E)).astype(np.float32)
    counts = np.bincount(index[~dropped], minlength=E).astype(np.int32)
    masked = np.where(dropped, np.float32(0), gates).astype(np.float32)
    return Routing(
        expert_index=index,
        gates=masked,
        importance=importance,
        load=load,
        counts=counts,
        dropped=int(dropped.sum()),
        aux_loss=0.0,
    )


@pytest.fixture
def make_routing():
    """Factory: make_routing(rng, B, E, k, drop_p=0.2) -> Routing."""
    return random_routing
