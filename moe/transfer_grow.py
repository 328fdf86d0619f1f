"""Growth that the new task uses: new experts only it routes to, started fresh or as copies.

Two starts (`start=`):
- "fresh" (the default): the grown experts keep the fresh weights every new expert gets
  (moe.experts.ffn's init), i.e. new capacity of the task's own. Measured on the 20 held-out
  skill tasks of bench/add_task.py (all their examples, 2 grown experts): the new task
  scores at least as well as a dense model from scratch on 19 of 20 (mean gain +0.11), where
  copies reach 13 of 20 (+0.06) and no growth 11 of 20 (+0.02): a copy starts at a function
  tuned for another task and a few epochs on the new one do not move it far.
- "clone" (µ2Net's clone-and-mutate): a copy of one of the task's most used experts (in its
  block), its weights perturbed by PERTURB of their spread so the copies can specialise apart.

Either way a grown expert's gate columns are copied from its source (the task's most used
experts) plus a push along the task's embedding that raises this task's logit for it by
MARGIN above the source's, so the grown experts take the sources' places in the task's top
k from the first step. Only this task may route to grown experts (model.expert_owner), so
the other tasks never see them.
"""

from __future__ import annotations

import numpy as np

from moe.model import Chunk, MultiTaskMoE
from moe.tasks.spec import TaskData
from moe.train import EVAL_BATCH

PERTURB = 0.05
MARGIN = 1.0


def expert_usage(model: MultiTaskMoE, name: str, x: np.ndarray) -> list[np.ndarray]:
    """Per block, int64 [E]: how many of the examples' assignments each expert received."""
    out = model.forward([Chunk(name, x)], train=False)
    return [np.bincount(r.expert_index[r.gates > 0], minlength=model.config.n_experts) for r in out.routings]


STARTS = ("fresh", "clone")


def start_grown(model: MultiTaskMoE, name: str, usage: list[np.ndarray], grown: list[int], *,
                rng: np.random.Generator, start: str = "fresh") -> list[list[int]]:
    """Start the grown experts (module doc): their gate columns from the task's most used
    experts plus the push, their weights fresh or perturbed copies of those experts; return
    the sources per block."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    emb = model.task_views(name, ("emb",))
    e = next(iter(emb.values()))[0].astype(np.float64)  # [d_t]
    sources = []
    for layer, counts in zip(model.layers, usage, strict=True):
        order = np.argsort(-counts[: grown[0]], kind="stable")  # most used first (old experts only)
        src = [int(order[i % max(1, int((counts > 0).sum()))]) for i in range(len(grown))]
        sources.append(src)
        for p in layer.experts.params.values() if start == "clone" else ():
            spread = p[src].std(axis=tuple(range(1, p.ndim)), keepdims=True)  # [m, 1, ...]
            noise = rng.standard_normal(p[src].shape).astype(p.dtype) * (PERTURB * spread).astype(p.dtype)
            p[grown] = p[src] + noise
        for p in layer.gate.params.values():
            p[:, grown] = p[:, src]
        if layer.d_gate_extra and e @ e > 0:
            w = layer.gate.params["w_gate"]  # [d_in, E]; the task embedding is the last d_t inputs
            push = (MARGIN * e / (e @ e)).astype(w.dtype)  # [d_t]: e . push = MARGIN
            w[w.shape[0] - layer.d_gate_extra :, grown] += push[:, None]
    return sources


def grown_share(model: MultiTaskMoE, task: TaskData, grown: list[int], split: str = "test") -> float:
    """Share of the task's assignments (all blocks, the split's examples) that go to `grown`."""
    x, _ = task.split(split)
    on, total = 0, 0
    for i in range(0, x.shape[0], EVAL_BATCH):
        for r in model.forward([Chunk(task.name, x[i : i + EVAL_BATCH])], train=False).routings:
            used = r.expert_index[r.gates > 0]
            on += int(np.isin(used, grown).sum())
            total += used.size
    return on / max(total, 1)
