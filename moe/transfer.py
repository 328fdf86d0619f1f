"""Add a task with little data: freeze the shared trunk, learn only what belongs to the new task.

What is learned: the new task's head (a small MLP by default), its adapter and task
embedding when no related task exists to start them from, and (with grow_experts) the
fresh experts together with their gate columns. Experts, routers and layer norms that
existed before stay bit for bit. When an existing task has the same input width, the new
task's adapter and embedding are frozen copies of that task's: it is routed exactly as
its source and sees the same features. Measured on the held-out digits task, retraining
either from 20 examples lost most of the transfer (the embedding moves the routing away
from the features the head learns on; the adapter overfits).

Training is full-batch Adam with weight decay: early stopping on a held-out part of the
few examples picks the number of epochs, then the same start is retrained on all of them.
The comparison is a dense model trained from scratch on exactly the same examples with the
same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe.baseline import baseline_config
from moe.config import Config
from moe.model import Chunk, MultiTaskMoE
from moe.optim import Adam, AdamConfig
from moe.progress import Progress
from moe.tasks.losses import loss_and_grad
from moe.tasks.metrics import evaluate
from moe.tasks.spec import TaskData, TaskRegistry
from moe.train import predict_split


@dataclass
class AddTaskResult:
    task: str
    metric: str
    score: float
    scratch_score: float
    shots: int
    init_from: str | None
    epochs: int


def select_shots(task: TaskData, shots: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices into the train split: `shots` per class (classification) or in total."""
    n = task.x_train.shape[0]
    if shots is None:
        return np.arange(n)
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = task.y_train if kind == "multiclass" else task.y_train[:, 0]
        picked = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            picked.append(rng.choice(idx, size=min(shots, idx.size), replace=False))
        return np.sort(np.concatenate(picked))
    return np.sort(rng.choice(n, size=min(shots, n), replace=False))


def shots_short(task: TaskData, shots: int | None) -> dict[str, int]:
    """What select_shots cannot give: {class label: examples it has} for each class (or
    {"in total": n} for a task without classes) whose train split holds fewer than `shots`."""
    if shots is None:
        return {}
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = task.y_train if kind == "multiclass" else task.y_train[:, 0]
        ids, have = np.unique(labels.astype(np.int64), return_counts=True)
        names = task.decode_labels(ids) if task.classes is not None else ids
        return {str(n): int(h) for n, h in zip(names.tolist(), have.tolist(), strict=True) if h < shots}
    n = task.x_train.shape[0]
    return {"in total": n} if n < shots else {}


def split_fit_stop(task: TaskData, idx: np.ndarray, rng: np.random.Generator, frac: float = 0.3):
    """Hold out ~frac of the few examples (at least one per class when possible) for early stopping."""
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = task.y_train[idx] if kind == "multiclass" else task.y_train[idx, 0]
        stop = []
        for c in np.unique(labels):
            members = idx[labels == c]
            if members.size >= 2:
                k = max(1, int(round(frac * members.size)))
                stop.append(rng.choice(members, size=k, replace=False))
        stop = np.sort(np.concatenate(stop)) if stop else idx[:0]
    else:
        k = max(1, int(round(frac * idx.size))) if idx.size >= 2 else 0
        stop = np.sort(rng.choice(idx, size=k, replace=False))
    fit = np.setdiff1d(idx, stop)
    if fit.size == 0 or stop.size == 0:
        raise ValueError(f"task {task.name!r}: {idx.size} examples are too few to hold some out for early stopping")
    return fit, stop


def _train(model, params, grads, task, rows, *, lr, weight_decay, epochs=None, stop_rows=None, patience=0):
    """Full-batch Adam on rows; with stop_rows, return the epoch with the best held-out loss."""
    opt = Adam(params, AdamConfig(weight_decay=weight_decay))
    kind = task.spec.kind
    fit_chunk = [Chunk(task.name, task.x_train[rows], task.y_train[rows])]
    best, best_epoch = np.inf, 0
    for epoch in range(1, (epochs or 10_000) + 1):
        out = model.forward(fit_chunk, train=False, grad=True)  # no gate noise, but a backward
        model.backward([loss_and_grad(kind, out.outputs[0], fit_chunk[0].y)[1]])
        opt.step(grads, lr)
        if stop_rows is None:
            continue
        held_out = model.forward([Chunk(task.name, task.x_train[stop_rows])], train=False).outputs[0]
        held = loss_and_grad(kind, held_out, task.y_train[stop_rows])[0]
        if held < best - 1e-6:
            best, best_epoch = held, epoch
        elif epoch - best_epoch >= patience:
            break
    return best_epoch


def fit_few_shot(
    model: MultiTaskMoE,
    trainable: dict[str, tuple[np.ndarray, np.ndarray]],
    task: TaskData,
    fit: np.ndarray,
    stop: np.ndarray,
    *,
    lr: float,
    max_epochs: int,
    patience: int,
    weight_decay: float = 1e-2,
) -> int:
    """Choose the number of epochs by early stopping on `stop`, then retrain from the same
    start on all the examples (fit + stop) for that many epochs. Returns the epoch count.

    `trainable` maps names to (param view, grad view); views stay valid because every
    backward writes its gradients in place."""
    params = {n: p for n, (p, _) in trainable.items()}
    grads = {n: g for n, (_, g) in trainable.items()}
    start = {n: p.copy() for n, p in params.items()}
    best_epoch = _train(model, params, grads, task, fit, lr=lr, weight_decay=weight_decay,
                        epochs=max_epochs, stop_rows=stop, patience=patience)
    for n, p in params.items():
        p[...] = start[n]
    _train(model, params, grads, task, np.union1d(fit, stop), lr=lr, weight_decay=weight_decay,
           epochs=max(best_epoch, 1))
    return best_epoch


def trainable_views(
    model: MultiTaskMoE, name: str, old_experts: int | None, copied: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The new task's head (and its adapter and embedding unless they were copied from a
    related task and stay frozen), plus any grown experts and their gate columns."""
    views = model.task_views(name, ("head",) if copied else ("head", "emb", "encoder"))
    if old_experts is not None:
        for n, p in model.params.items():
            g = model.grads[n]
            if ".moe.gate." in n:
                views[n] = (p[:, old_experts:], g[:, old_experts:])  # new gate columns
            elif ".moe.experts." in n:
                views[n] = (p[old_experts:], g[old_experts:])  # new experts
    return views


def add_task(
    model: MultiTaskMoE,
    config: Config,
    task: TaskData,
    *,
    shots: int | None,
    rng: np.random.Generator,
    grow_experts: int = 0,
    init_from: str | None = None,
    head_hidden: int = 64,
    lr: float = 3e-3,
    max_epochs: int = 400,
    patience: int = 40,
    progress: Progress | None = None,
) -> AddTaskResult:
    """Add `task` to `model` in place (frozen trunk); return its test score next to from-scratch.

    `progress` (2 units) advances after the new task's fit and after the scratch model's."""
    if task.name in model.tasks:
        raise ValueError(f"task {task.name!r} is already in the model")
    if init_from is None:
        same = [s.name for s in model.tasks if s.n_inputs == task.spec.n_inputs]
        init_from = same[0] if same else None
    idx = select_shots(task, shots, rng)
    fit, stop = split_fit_stop(task, idx, rng)
    old_e = model.config.n_experts
    model.add_task(task.spec, rng=rng, init_from=init_from, grow_experts=grow_experts, head_hidden=head_hidden)
    views = trainable_views(model, task.name, old_e if grow_experts else None, copied=init_from is not None)
    epochs = fit_few_shot(model, views, task, fit, stop, lr=lr, max_epochs=max_epochs, patience=patience)
    if progress is not None:
        progress.update(1)
    metric = task.spec.metric
    score = evaluate(task.spec.kind, predict_split(model, task, "test"), task.y_test)[metric]

    scratch_cfg = baseline_config(config, examples=1)
    scratch = MultiTaskMoE(scratch_cfg.model, TaskRegistry([task.spec]), rng=np.random.default_rng(rng.integers(2**32)))
    everything = {n: (p, scratch.grads[n]) for n, p in scratch.params.items()}
    fit_few_shot(scratch, everything, task, fit, stop, lr=lr, max_epochs=max_epochs, patience=patience)
    if progress is not None:
        progress.update(1)
    scratch_score = evaluate(task.spec.kind, predict_split(scratch, task, "test"), task.y_test)[metric]
    return AddTaskResult(task.name, metric, float(score), float(scratch_score), int(idx.size), init_from, epochs)


def with_added_record(source: dict, record: dict) -> dict:
    return {**source, "added": [*source.get("added", []), record]}

