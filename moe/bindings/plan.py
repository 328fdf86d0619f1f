"""The dispatch plan: which example each packed row comes from, and where each assignment went."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe import bindings


@dataclass(frozen=True)
class DispatchPlan:
    """src_row int32[N]: example of each packed row; slot int32[B, k]: packed row of each
    assignment or -1 when dropped; offsets int64[E+1]: expert e owns rows offsets[e]:offsets[e+1]."""

    src_row: np.ndarray
    slot: np.ndarray
    offsets: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)  # [E]

    @property
    def keep(self) -> np.ndarray:
        return self.slot >= 0  # [B, k]

    @property
    def dropped(self) -> int:
        return int(self.slot.size - self.src_row.shape[0])


def plan_dispatch(expert_index: np.ndarray, n_experts: int, capacity: int) -> DispatchPlan:
    """Capacity slots, then a stable counting sort of the kept assignments by expert."""
    keep = bindings.capacity_keep(expert_index, n_experts, capacity)  # [B, k]
    src_row, slot, offsets = bindings.counting_sort(expert_index, keep, n_experts)
    return DispatchPlan(src_row, slot, offsets)
