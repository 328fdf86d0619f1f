"""Where a run's tasks come from, recorded in every checkpoint so eval/profile can rebuild them.

A source is JSON: {"builtin": {"seed", "n_family", "family_size"} | None,
"task_file": absolute path | None, "added": [one record per task added with add-task]}.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from moe.config import DataConfig
from moe.tasks.builtin import builtin_tasks, heldout_task
from moe.tasks.skills import skill_task
from moe.tasks.spec import TaskData
from moe.tasks.userdata import load_table, load_task_file


def source_of(cfg: DataConfig) -> dict[str, Any]:
    return {
        "builtin": {"seed": cfg.seed, "n_family": cfg.n_family, "family_size": cfg.family_size,
                    "n_digit_sets": cfg.n_digit_sets, "n_skills": cfg.n_skills, "skill_size": cfg.skill_size}
        if cfg.builtin else None,
        "task_file": str(Path(cfg.task_file).resolve()) if cfg.task_file else None,
        "added": [],
    }


def load_source(source: dict[str, Any]) -> list[TaskData]:
    """Rebuild every task of a source, in registry order (built-in, task file, then added)."""
    data: list[TaskData] = []
    if source.get("builtin"):
        b = source["builtin"]
        data += builtin_tasks(seed=b["seed"], n_family=b["n_family"], family_size=b["family_size"],
                              n_digit_sets=b.get("n_digit_sets", 0), n_skills=b.get("n_skills", 0),
                              skill_size=b.get("skill_size", 300))
    if source.get("task_file"):
        data += load_task_file(source["task_file"])
    for rec in source.get("added", []):
        data.append(load_added(rec))
    names = [d.name for d in data]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate task name(s) {dupes} across the built-in tasks and the task file")
    return data


def load_added(rec: dict[str, Any], shots: int | None = None) -> TaskData:
    """A task added by add-task: the built-in held-out task, a held-out skill task, or a user
    table. `shots` limits train (held-out digits task); a record's `train_rows` (the examples
    add-task learned from) keeps only those rows of the train split."""
    if rec.get("heldout"):
        task = heldout_task(seed=rec["seed"], shots_per_class=shots)
    elif rec.get("skill") is not None:
        task = skill_task(int(rec["skill"]), seed=rec["seed"], n_per_task=rec.get("size", 300))
    else:
        task = load_table(
            rec["path"], name=rec["name"], target=rec["target"], features=rec.get("features"),
            kind=rec.get("kind"), seed=rec.get("seed", 0), loss_weight=rec.get("loss_weight", 1.0),
            split=rec.get("split"),
        )
    adapter = rec.get("adapter", "shared")
    if adapter not in ("shared", "own"):
        raise ValueError(f"added task {task.name!r}: adapter must be 'shared' or 'own', got {adapter!r}")
    if adapter == "own":  # add-task gave it an encoder of its own (moe.transfer, step 4)
        task = task.with_own_space()
    rows = rec.get("train_rows")
    if rows is None:
        return task
    rows = np.asarray(rows, dtype=np.int64)
    n = task.x_train.shape[0]
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"added task {task.name!r}: train_rows must be indices in [0, {n}), got {rows.tolist()[:10]}")
    return dataclasses.replace(task, x_train=task.x_train[rows], y_train=task.y_train[rows])
