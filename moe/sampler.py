"""Mixed-task batches with a resumable data cursor.

Each step draws how many examples each task contributes (a multinomial over the task
distribution), then takes them from that task's shuffled training order, reshuffling at
the end of an epoch. Everything that decides future batches (the generator state, every
task's current order and position) is in `state()`, so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe.model import Chunk
from moe.tasks.spec import TaskData


def task_probabilities(sizes: np.ndarray, sampling: str, temperature: float = 1.0) -> np.ndarray:
    """proportional: p ~ n; uniform: p = 1/T; temperature: p ~ n^(1/T) (T=1 is proportional)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sampling == "uniform":
        w = np.ones_like(sizes)
    elif sampling == "proportional":
        w = sizes
    elif sampling == "temperature":
        w = sizes ** (1.0 / temperature)
    else:
        raise ValueError(f"sampling must be proportional, uniform or temperature, got {sampling!r}")
    return w / w.sum()


class TaskSampler:
    def __init__(
        self,
        data: list[TaskData],
        batch_size: int,
        *,
        sampling: str,
        temperature: float,
        rng: np.random.Generator,
    ) -> None:
        self.data, self.batch_size, self.rng = data, batch_size, rng
        sizes = np.array([d.x_train.shape[0] for d in data])
        self.probs = task_probabilities(sizes, sampling, temperature)
        self.order = {d.name: rng.permutation(d.x_train.shape[0]) for d in data}
        self.pos = {d.name: 0 for d in data}
        self.epoch = {d.name: 0 for d in data}
        self.seen = {d.name: 0 for d in data}

    def _take(self, d: TaskData, n: int) -> np.ndarray:
        taken = []
        while n > 0:
            order, p = self.order[d.name], self.pos[d.name]
            m = min(n, order.shape[0] - p)
            taken.append(order[p : p + m])
            self.pos[d.name], n = p + m, n - m
            if self.pos[d.name] == order.shape[0]:  # epoch over: reshuffle
                self.order[d.name] = self.rng.permutation(order.shape[0])
                self.pos[d.name] = 0
                self.epoch[d.name] += 1
        return np.concatenate(taken)

    def next_indices(self) -> list[tuple[TaskData, np.ndarray]]:
        """The next batch as (task, indices into its training split), in batch order, without
        reading any example: a process that needs only some rows gathers only those."""
        counts = self.rng.multinomial(self.batch_size, self.probs)  # [T]
        parts = []
        for d, n in zip(self.data, counts, strict=True):
            if n:
                parts.append((d, self._take(d, int(n))))
                self.seen[d.name] += int(n)
        return parts

    def next_batch(self) -> list[Chunk]:
        return [Chunk(d.name, d.x_train[idx], d.y_train[idx]) for d, idx in self.next_indices()]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"data.order.{name}": o for name, o in self.order.items()}
        info = {"pos": dict(self.pos), "epoch": dict(self.epoch), "seen": dict(self.seen),
                "rng": self.rng.bit_generator.state}
        return arrays, info

    def load_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        for d in self.data:
            key = f"data.order.{d.name}"
            if key not in arrays or arrays[key].shape != (d.x_train.shape[0],):
                raise ValueError(f"data cursor for task {d.name!r} does not match its training set")
            self.order[d.name] = arrays[key].astype(np.int64)
            self.pos[d.name] = int(info["pos"][d.name])
            self.epoch[d.name] = int(info["epoch"][d.name])
            self.seen[d.name] = int(info["seen"][d.name])
        self.rng.bit_generator.state = info["rng"]
