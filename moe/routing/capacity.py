"""Expert capacity (GShard / Switch): how many rows each expert may take in one batch."""

from __future__ import annotations

import math


def validate_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is None:
        return
    if not (isinstance(capacity_factor, int | float) and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be a finite number > 0 or None, got {capacity_factor!r}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")


def expert_capacity(capacity_factor: float | None, batch: int, k: int, n_experts: int) -> int:
    """C = ceil(cf * B * k / E); -1 means dropless (no limit)."""
    if capacity_factor is None:
        return -1
    return int(math.ceil(capacity_factor * batch * k / n_experts))
