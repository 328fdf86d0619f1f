"""The gate's decision for one batch, as a named record (never a positional tuple)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Routing:
    """One gate decision for a batch of B examples over E experts, k choices each.

    expert_index: int32[B, k]  chosen experts, best first
    gates:        float[B, k]  combine weights; 0 where capacity dropped the assignment
    importance:   float[E]     sum over the batch of gate values, before the capacity mask
    load:         float[E]     Shazeer's smooth estimator when training with noise,
                               otherwise hard assignment counts (before the capacity mask)
    counts:       int32[E]     rows actually dispatched to each expert (after capacity)
    dropped:      int          assignments cut by capacity
    aux_loss:     float        the weighted balance (+ z) loss this batch adds to the objective
    """

    expert_index: np.ndarray
    gates: np.ndarray
    importance: np.ndarray
    load: np.ndarray
    counts: np.ndarray
    dropped: int
    aux_loss: float

    @property
    def n_experts(self) -> int:
        return int(self.importance.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.expert_index.shape[0])

    @property
    def k(self) -> int:
        return int(self.expert_index.shape[1])
