"""Mixed-task batches with a resumable data cursor, at a cost set by the batch.

Each step draws the task of every example from the task distribution (B draws by inverse
CDF, so O(B log T) however many tasks there are), then takes each present task's examples
from its shuffled training order, reshuffling at the end of an epoch. The tasks whose epoch
does not end in this batch are served with one gather for all of them, and `next_packed`
reads their rows from one array per input width: no Python runs per task present, only per
task whose epoch ends. Everything that
decides future batches (the generator state, every task's order and position) is in
`state()` as a handful of flat arrays, so a resumed run sees the same batches and a
checkpoint of 100,000 tasks stays small.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe.batch import Batch, rows_by
from moe.model import Chunk
from moe.tasks.spec import TaskData, TaskRegistry


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
        self.sizes = np.array([d.x_train.shape[0] for d in data], dtype=np.int64)  # [T]
        self.probs = task_probabilities(self.sizes, sampling, temperature)
        self.cdf = np.cumsum(self.probs)  # [T]
        self.offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        # task t's order is order[offsets[t]:offsets[t+1]]
        self.order = np.empty(int(self.offsets[-1]), dtype=np.int64)
        for t, n in enumerate(self.sizes):
            self.order[self.offsets[t] : self.offsets[t + 1]] = rng.permutation(int(n))
        self.pos = np.zeros(len(data), dtype=np.int64)
        self.epoch = np.zeros(len(data), dtype=np.int64)
        self.seen_counts = np.zeros(len(data), dtype=np.int64)
        self._store: _TrainStore | None = None  # built by the first next_packed

    @property
    def seen(self) -> dict[str, int]:
        """Examples drawn so far, per task name."""
        return {d.name: int(n) for d, n in zip(self.data, self.seen_counts, strict=True)}

    def _take(self, t: int, n: int) -> np.ndarray:
        order = self.order[self.offsets[t] : self.offsets[t + 1]]  # a view
        taken = []
        while n > 0:
            p = int(self.pos[t])
            m = min(n, order.shape[0] - p)
            taken.append(order[p : p + m].copy())
            self.pos[t], n = p + m, n - m
            if self.pos[t] == order.shape[0]:  # epoch over: reshuffle in place
                order[...] = self.rng.permutation(order.shape[0])
                self.pos[t] = 0
                self.epoch[t] += 1
        return taken[0] if len(taken) == 1 else np.concatenate(taken)

    def _draw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tasks ascending [u], run starts [u + 1], each row's index into its task's training
        split [B]) of the next batch. Tasks whose epoch ends in this batch reshuffle (drawing
        from the generator) in ascending task order, as one call of _take per task would."""
        u = self.rng.random(self.batch_size)  # [B]
        draws = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.data) - 1)  # [B]
        tasks, counts = np.unique(draws, return_counts=True)  # ascending task order
        starts = np.zeros(tasks.size + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        pos = self.pos[tasks]  # [u]
        ends = pos + counts >= self.sizes[tasks]  # [u] the epoch ends: reshuffle
        within = np.arange(self.batch_size) - np.repeat(starts[:-1], counts)  # [B]
        first = self.offsets[tasks] + pos  # [u] where each task's rows start in self.order
        at = np.where(np.repeat(ends, counts), 0, np.repeat(first, counts) + within)  # [B]
        idx = self.order[at]  # [B] (the rows of tasks whose epoch ends are filled below)
        self.pos[tasks] = pos + counts
        for j in np.flatnonzero(ends).tolist():
            t = int(tasks[j])
            self.pos[t] = pos[j]
            idx[starts[j] : starts[j + 1]] = self._take(t, int(counts[j]))
        self.seen_counts[tasks] += counts
        return tasks.astype(np.int64), starts, idx

    def next_indices(self) -> list[tuple[TaskData, np.ndarray]]:
        """The next batch as (task, indices into its training split), in batch order, without
        reading any example: a process that needs only some rows gathers only those."""
        tasks, starts, idx = self._draw()
        return [(self.data[t], idx[a:b]) for t, a, b in zip(tasks.tolist(), starts[:-1].tolist(),
                                                            starts[1:].tolist(), strict=True)]

    def next_batch(self) -> list[Chunk]:
        """The next batch as one Chunk per task (next_packed draws the same batch as arrays)."""
        return [Chunk(d.name, d.x_train[idx], d.y_train[idx]) for d, idx in self.next_indices()]

    def next_packed(self) -> Batch:
        """The next batch as a packed Batch whose task ids are positions in `data` (the ids of a
        model built from these tasks in this order); the same rows as next_batch."""
        if self._store is None:
            self._store = _TrainStore(self.data)
        tasks, starts, idx = self._draw()
        return self._store.gather(tasks, starts, idx)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"data.order": self.order, "data.pos": self.pos, "data.epoch": self.epoch,
                  "data.seen": self.seen_counts, "data.sizes": self.sizes}
        return arrays, {"rng": self.rng.bit_generator.state}

    def load_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        for key, like in (("data.sizes", self.sizes), ("data.order", self.order), ("data.pos", self.pos),
                          ("data.epoch", self.epoch), ("data.seen", self.seen_counts)):
            got = arrays.get(key)
            if got is None or got.shape != like.shape or got.dtype != like.dtype:
                what = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
                raise ValueError(f"data cursor {key!r} does not match the training sets: expected "
                                 f"{like.dtype}{list(like.shape)}, got {what}")
        if not np.array_equal(arrays["data.sizes"], self.sizes):
            raise ValueError("data cursor was written for training sets of other sizes")
        pos = arrays["data.pos"]
        if (pos < 0).any() or (pos >= np.maximum(self.sizes, 1)).any():
            raise ValueError("data cursor positions are out of range")
        self.order[...] = arrays["data.order"]
        self.pos[...] = pos
        self.epoch[...] = arrays["data.epoch"]
        self.seen_counts[...] = arrays["data.seen"]
        self.rng.bit_generator.state = info["rng"]


class _TrainStore:
    """Every task's training rows in one array per input width and one per target group, so a
    batch over hundreds of tasks is one gather per array (a copy of the training splits)."""

    def __init__(self, data: list[TaskData]) -> None:
        self.columns = TaskRegistry([d.spec for d in data]).columns()
        n = np.array([d.x_train.shape[0] for d in data], dtype=np.int64)  # [T]
        self.x: dict[int, np.ndarray] = {}
        self.y: dict[tuple[str, int], np.ndarray] = {}
        self.x_at = np.zeros(len(data), dtype=np.int64)  # [T] first row of task t in its x array
        self.y_at = np.zeros(len(data), dtype=np.int64)  # [T] ... and in its y array
        for keys, into, at, field, name in ((self.columns.n_inputs, self.x, self.x_at, "x_train", int),
                                            (self.columns.target, self.y, self.y_at, "y_train",
                                             lambda k: self.columns.targets[k])):
            for k in np.unique(keys):
                members = np.flatnonzero(keys == k)
                offsets = np.cumsum(n[members]) - n[members]
                at[members] = offsets
                into[name(k)] = np.concatenate([getattr(data[t], field) for t in members.tolist()])

    def gather(self, tasks: np.ndarray, starts: np.ndarray, idx: np.ndarray) -> Batch:
        sizes = np.diff(starts)
        row_task = np.repeat(tasks, sizes)  # [B]
        x, y = {}, {}
        for out, store, at, run_key, name in ((x, self.x, self.x_at, self.columns.n_inputs, int),
                                              (y, self.y, self.y_at, self.columns.target,
                                               lambda k: self.columns.targets[k])):
            for k, rows in rows_by(run_key[tasks], sizes).items():
                t = row_task[rows]
                out[name(k)] = store[name(k)][at[t] + idx[rows]]
        return Batch(tasks, starts, x, y)
