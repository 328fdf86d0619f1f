"""Inference as a server sees it: mixed-task batches of a fixed size, with a choice of routing.

`predict_mixed` shuffles every example of a split across tasks (with an explicit generator),
cuts batches of `batch_size`, routes them with "topk" (the gate's own choice, dropping over
capacity when the model has a capacity factor) or "balanced" (moe.routing.balanced: at most
ceil(factor * B * k / E) examples per expert, nothing dropped), and reports per-task metrics
next to the load each batch put on its busiest expert. `drop_rates` says how many
assignments top-k routing would lose at each capacity factor on the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe.model import Chunk, MultiTaskMoE
from moe.tasks.metrics import evaluate
from moe.tasks.spec import TaskData


@dataclass
class MixedResult:
    metrics: dict[str, dict[str, float]]  # task -> metrics
    max_mean_load: list[float]  # per batch, worst block: busiest expert's rows / mean rows
    routing: str
    batch_size: int
    expert_index: list[list[np.ndarray]]  # per batch, per block: [B, k] (for drop-rate replays)

    def _full(self) -> list[float]:
        """Loads of the full batches: the last, partial one is left out when there are full ones,
        since with few rows integer counts make max/mean coarse (20 rows, k = 2, 64 experts:
        one expert with 2 rows is already 1.6x the mean)."""
        full = [m for m, idx in zip(self.max_mean_load, self.expert_index, strict=True)
                if idx and idx[0].shape[0] == self.batch_size]
        return full or self.max_mean_load

    @property
    def worst_max_mean(self) -> float:
        return max(self._full(), default=0.0)

    @property
    def median_max_mean(self) -> float:
        full = self._full()
        return float(np.median(full)) if full else 0.0


def _batches(data: list[TaskData], split: str, batch_size: int, rng: np.random.Generator):
    """(list of chunks, (task, row) of each example) per batch of a shuffled mixed split."""
    sizes = [d.split(split)[0].shape[0] for d in data]
    owner = np.repeat(np.arange(len(data)), sizes)  # [N] task of each example
    row = np.concatenate([np.arange(n) for n in sizes])  # [N] its row in the task's split
    perm = rng.permutation(owner.shape[0])
    owner, row = owner[perm], row[perm]
    for s in range(0, owner.shape[0], batch_size):
        o, r = owner[s : s + batch_size], row[s : s + batch_size]
        order = np.lexsort((r, o))  # group by task
        o, r = o[order], r[order]
        tasks, starts = np.unique(o, return_index=True)
        ends = np.append(starts[1:], o.shape[0])
        chunks = [Chunk(data[t].name, data[t].split(split)[0][r[a:b]]) for t, a, b in zip(tasks, starts, ends, strict=True)]
        yield chunks, [(t, r[a:b]) for t, a, b in zip(tasks, starts, ends, strict=True)]


def predict_mixed(
    model: MultiTaskMoE,
    data: list[TaskData],
    split: str = "test",
    *,
    batch_size: int = 256,
    routing: str = "topk",
    rng: np.random.Generator,
) -> MixedResult:
    """Per-task metrics and per-batch load when the split is served in mixed batches."""
    outs = [np.zeros((d.split(split)[0].shape[0], d.spec.n_outputs), dtype=model.dtype) for d in data]
    loads, indices = [], []
    for chunks, where in _batches(data, split, batch_size, rng):
        out = model.forward(chunks, train=False, routing=routing)
        for (t, rows), o in zip(where, out.outputs, strict=True):
            outs[t][rows] = o
        worst = 0.0
        for r in out.routings:
            counts = r.counts.astype(np.float64)
            worst = max(worst, float(counts.max() / counts.mean()))
        loads.append(worst)
        indices.append([r.expert_index for r in out.routings])
    metrics = {d.name: evaluate(d.spec.kind, o, d.split(split)[1]) for d, o in zip(data, outs, strict=True)}
    return MixedResult(metrics, loads, routing, batch_size, indices)


def drop_rates(result: MixedResult, n_experts: int, factors: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)) -> dict[float, float]:
    """Share of top-k assignments over C = ceil(cf * B * k / E) on each expert, per capacity
    factor, on the batches of `result` (the share a capacity limit would have to drop)."""
    out = {}
    for cf in factors:
        dropped = total = 0
        for blocks in result.expert_index:
            for idx in blocks:
                B, k = idx.shape
                cap = math.ceil(cf * B * k / n_experts)
                counts = np.bincount(idx.ravel(), minlength=n_experts)
                dropped += int(np.maximum(counts - cap, 0).sum())
                total += idx.size
        out[cf] = dropped / total if total else 0.0
    return out
