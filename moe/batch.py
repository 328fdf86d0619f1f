"""Packed batches: many tasks' examples in a few arrays, at a cost set by the batch's rows.

A batch of 256 examples drawn from 10,000 tasks holds about 250 distinct tasks. Carried as
one `Chunk` per task, every step pays tens of microseconds of Python per task (validating,
grouping, slicing outputs and loss gradients), which made a step over 10,000 tasks cost
2.2x one over 23. A `Batch` carries the same rows as arrays: the task of each run, the run
boundaries, one input array per input width and one target array per target group
(kind, n_outputs). `Layout` places every row (its task, and its place among the rows of its
width and of its target group); the sampler, the model and the loss work on these arrays
with numpy alone, so a batch costs the same Python whether it holds 23 tasks or 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe.tasks.spec import TaskColumns

TargetKey = tuple[str, int]  # (kind, n_outputs): tasks whose outputs and targets stack


@dataclass(frozen=True)
class Batch:
    """Rows of a batch, each task's rows contiguous (a run), tasks in `tasks` order.

    tasks: int64 [u], distinct task ids; starts: int64 [u + 1], run j is batch rows
    starts[j]:starts[j+1]. x: {width: [n_w, width]}, the rows of the tasks with that input
    width in batch order. y (training only): {(kind, n_outputs): targets of those tasks' rows
    in batch order}, int class ids [n] for multiclass, float [n, n_outputs] otherwise.
    """

    tasks: np.ndarray
    starts: np.ndarray
    x: dict[int, np.ndarray]
    y: dict[TargetKey, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


@dataclass(frozen=True)
class Layout:
    """Where every row of a Batch goes. Targets are in the order they first appear in the batch."""

    row_task: np.ndarray  # int64 [B]
    width_rows: dict[int, np.ndarray]  # width -> int64 [n_w], its batch rows ascending
    target_rows: dict[TargetKey, np.ndarray]  # (kind, n_out) -> int64 [n_g], its batch rows ascending
    rank: np.ndarray  # int64 [B]: a row's place among the rows of its target group


def layout(tasks: np.ndarray, starts: np.ndarray, columns: TaskColumns) -> Layout:
    """The Layout of runs of `tasks` with boundaries `starts` (ids valid for `columns`)."""
    sizes = np.diff(starts)
    row_task = np.repeat(tasks, sizes)  # [B]
    by_target = rows_by(columns.target[tasks], sizes)
    rank = np.empty(row_task.shape[0], dtype=np.int64)  # [B]
    for rows in by_target.values():
        rank[rows] = np.arange(rows.shape[0])
    return Layout(row_task, rows_by(columns.n_inputs[tasks], sizes),
                  {columns.targets[i]: rows for i, rows in by_target.items()}, rank)


def rows_by(run_key: np.ndarray, sizes: np.ndarray) -> dict[int, np.ndarray]:
    """{key: the batch rows of the runs that have it, ascending}, keys in order of first appearance."""
    keys, first = np.unique(run_key, return_index=True)
    if keys.size == 1:
        return {int(keys[0]): np.arange(int(sizes.sum()))}
    row_key = np.repeat(run_key, sizes)  # [B]
    return {int(keys[i]): np.flatnonzero(row_key == keys[i]) for i in np.argsort(first, kind="stable")}


def runs_of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group examples by table row: (order, distinct rows, run starts), where examples
    `order` (a stable sort, so each row's examples keep their order) form one run per row."""
    order = np.argsort(rows, kind="stable")  # [n]
    s = rows[order]
    cut = np.flatnonzero(s[1:] != s[:-1]) + 1
    starts = np.concatenate([[0], cut, [s.shape[0]]]).astype(np.int64)
    return order, s[starts[:-1]], starts


def run_slices(lay: Layout, starts: np.ndarray, tasks: np.ndarray, columns: TaskColumns):
    """(target key, start, stop) of each run within its target group's arrays."""
    keys = [columns.targets[i] for i in columns.target[tasks].tolist()]
    first = lay.rank[starts[:-1]].tolist()
    return [(k, a, a + n) for k, a, n in zip(keys, first, np.diff(starts).tolist(), strict=True)]
