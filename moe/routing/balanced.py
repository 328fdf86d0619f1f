"""Balanced routing for inference: every example gets k experts, no expert gets more than C.

Why: without noise, top-k on the clean logits is unbalanced (the busiest expert of a batch
can take several times the mean), so a server sized for the mean either drops assignments
or waits on one expert. This is a balanced assignment in the spirit of BASE layers (Lewis
et al. 2021): experts have a capacity C = ceil(factor * B * k / E), and assignments are made
in rounds of proposals and acceptances. In each round every example that still needs an
expert proposes its best remaining one (by clean logit); each expert accepts the proposals
with the highest logits up to its remaining capacity; a rejected proposal is never made
again. An example's first choice therefore stands unless its expert is oversubscribed by
examples that want it more. With factor >= 1 the capacity always suffices, so nothing is
dropped; the price is that some examples use their next-best expert.
"""

from __future__ import annotations

import math

import numpy as np


def balanced_capacity(factor: float, batch: int, k: int, n_experts: int) -> int:
    """C = ceil(factor * B * k / E): each expert's seats."""
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"balanced routing needs a capacity factor >= 1, got {factor}")
    return max(1, math.ceil(factor * batch * k / n_experts))


def balanced_topk(logits: np.ndarray, k: int, capacity: int) -> np.ndarray:
    """logits [B, E] -> expert_index int32 [B, k] (each row's experts distinct, in the order
    assigned; no column of the result holds one expert more than `capacity` times).

    Deterministic: ties go to the lower example index, then the lower expert id."""
    B, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, {E}], got {k}")
    if capacity * E < B * k:
        raise ValueError(f"{E} experts x capacity {capacity} cannot seat {B} x {k} assignments")
    avail = logits.astype(np.float64, copy=True)  # [B, E]; -inf where no longer on offer
    left = np.full(E, capacity, dtype=np.int64)  # [E] seats
    index = np.full((B, k), -1, dtype=np.int64)  # [B, k]
    filled = np.zeros(B, dtype=np.int64)  # [B]
    rows = np.arange(B)
    while True:
        need = rows[filled < k]  # [n]
        if need.size == 0:
            break
        want = np.argmax(avail[need], axis=1)  # [n] best remaining expert (lowest id on ties)
        score = avail[need, want]  # [n]
        stuck = ~np.isfinite(score)
        if stuck.any():  # the only free seats are on experts these examples already hold
            for b in need[stuck]:
                _swap_in(logits, index, filled, left, int(b))
            continue
        # rank proposals per expert: higher logit first, then lower example index
        order = np.lexsort((need, -score, want))  # [n]
        w_sorted = want[order]
        first = np.searchsorted(w_sorted, w_sorted, side="left")  # [n] start of each expert's group
        rank = np.arange(order.shape[0]) - first  # [n] position within the expert's proposals
        ok = rank < left[w_sorted]  # [n]
        acc_rows, acc_experts = need[order[ok]], w_sorted[ok]
        index[acc_rows, filled[acc_rows]] = acc_experts
        filled[acc_rows] += 1
        left -= np.bincount(acc_experts, minlength=E)
        avail[need, want] = -np.inf  # accepted or refused, never proposed again
        avail[:, left == 0] = -np.inf  # full experts take no more
    return index.astype(np.int32)


def _swap_in(logits: np.ndarray, index: np.ndarray, filled: np.ndarray, left: np.ndarray, b: int) -> None:
    """Seat example b when every free seat is on an expert it already holds: some other
    example b2 moves from an expert e2 (that b lacks) to a free expert f (that b2 lacks), and b
    takes b2's seat at e2. Chooses the move that loses the least logit. Rare (only when the
    seats are nearly exactly enough), so a plain loop."""
    held_b = set(index[b, : filled[b]].tolist())
    free = np.flatnonzero(left > 0)
    best = None
    for b2 in range(index.shape[0]):
        held2 = index[b2, : filled[b2]]
        for f in free:
            if f in held2:
                continue
            for j, e2 in enumerate(held2.tolist()):
                if e2 in held_b:
                    continue
                cost = logits[b2, e2] - logits[b2, f] - logits[b, e2]
                if best is None or cost < best[0]:
                    best = (cost, b2, j, int(f), e2)
    if best is None:
        raise RuntimeError(f"balanced routing cannot seat example {b}")
    _, b2, j, f, e2 = best
    index[b2, j] = f
    left[f] -= 1
    index[b, filled[b]] = e2
    filled[b] += 1
