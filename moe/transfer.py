"""Add a task with little data through the experts the model already has.

1. Start, chosen by a measurement on the shots: every candidate start (an existing task's
   task embedding, and for a task with an input space of its own that task's encoder row
   when the widths match; "fresh" is a candidate too) routes the shots through the frozen
   model, and a ridge probe on the features the new head would read is scored by its
   leave-one-out error (closed form, so it works from one example per class). The start
   with the lowest error wins; every candidate's figure is reported (moe.transfer_start).
2. Learned routing: the new task's embedding (and own encoder row) is trained from the
   shots together with its head, pulled toward its start by an L2 anchor, so the routers
   pick the experts that serve it without drifting far from what was measured.
3. Growth (new pathways, as DEMix's new expert per domain): grown experts start with fresh
   weights (or, `grow_start="clone"`, as µ2Net's perturbed copies of the experts the new
   task uses most; fresh measured better, moe.transfer_grow), with gate columns that rank
   each just above its source for this task; only this task may route to them
   (model.expert_owner), so every other task's outputs stay bit for bit. With
   `grow_experts="auto"` growth is kept only if it raises the score on a held-out part of
   the shots of at least AUTO_MIN_HELD_OUT examples (declined on fewer).
4. Adapter: a task of a domain the model knows reads through that domain's encoder
   ("shared") or gets a copy of it that it trains (anchored) for itself ("own"; its encoder
   row is then one more add-on, and no other task moves). "auto" measures both on the
   held-out part of the shots and keeps the lower held-out loss (shared on ties, when
   nothing can be held out, and when too few can for the comparison to mean anything:
   AUTO_MIN_HELD_OUT).
5. Epochs: when every class has at least two examples, early-stopped fits on up to FOLDS
   held-out sets (every shot held out once) give held-out curves; the epoch count is where
   their mean loss is least, or, when a fold holds out fewer than LOSS_MIN_HELD_OUT shots,
   where their metric pooled over all held-out shots is highest (ties to the least mean
   loss); the start is then retrained on all examples for that many (epoch_count). One
   held-out set alone stops on noise (digits_ge5 at 10 shots, 5 seeds: worst gain +0.058 with
   one, +0.089 with three). With one example of a class nothing can be held out, so a fixed
   budget (FIXED_EPOCHS) is used.
The comparison is a dense model trained from scratch on exactly the same examples with the
same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
from moe.transfer_grow import STARTS, expert_usage, grown_share, start_grown
from moe.transfer_start import choose_start

# Epochs when nothing can be held out (a class with one example). The median early-stopped
# epoch count at 2 to 5 shots per class on the held-out digits task (bench/add_task.py).
FIXED_EPOCHS = 60
FOLDS = 3  # held-out sets whose mean loss curve picks the epoch count (a single one stops early on noise)
AUTO_GROW = 4  # experts tried by grow_experts="auto"
# The head's hidden width by default: an MLP, or a linear head when a class has one example
# (an MLP fitted to two points overfits: 1 shot per class on digits_ge5 from the digits
# start, 5 seeds, mean gain +0.057 with the MLP head, +0.100 with a linear one).
HEAD_HIDDEN, ONE_SHOT_HEAD_HIDDEN = 64, 0


@dataclass
class AddTaskResult:
    task: str
    metric: str
    score: float
    scratch_score: float
    shots: int  # examples used
    init_from: str | None  # the start chosen (None: a fresh start)
    epochs: int
    stop_rule: str  # how the epoch count was chosen
    similarity: dict[str, float] = field(default_factory=dict)  # candidate -> leave-one-out error
    grown: list[int] = field(default_factory=list)  # ids of the experts kept for this task
    growth: str = "none"  # what growth did and why
    grown_share: float | None = None  # share of the task's test assignments on its grown experts
    adapter: str = "own"  # "shared" (its domain's encoder) or "own" (an encoder row of its own)
    adapter_why: str = ""  # how that was decided
    params_added: int = 0
    train_rows: list[int] = field(default_factory=list)  # the train-split rows used


def class_labels(task: TaskData, rows: np.ndarray | None = None) -> np.ndarray:
    """The class of each train row (all, or `rows`) of a multiclass or binary task."""
    y = task.y_train if rows is None else task.y_train[rows]
    return y if task.spec.kind == "multiclass" else y[:, 0]


def select_shots(task: TaskData, shots: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices into the train split: `shots` per class (classification) or in total."""
    n = task.x_train.shape[0]
    if shots is None:
        return np.arange(n)
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = class_labels(task)
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
        labels = class_labels(task)
        ids, have = np.unique(labels.astype(np.int64), return_counts=True)
        names = task.decode_labels(ids) if task.classes is not None else ids
        return {str(n): int(h) for n, h in zip(names.tolist(), have.tolist(), strict=True) if h < shots}
    n = task.x_train.shape[0]
    return {"in total": n} if n < shots else {}


def split_fit_stop(task: TaskData, idx: np.ndarray, rng: np.random.Generator, frac: float = 0.3):
    """Hold out ~frac of the examples for early stopping: (fit, stop), or None when a class
    has a single example (or fewer than 4 examples in all) and nothing can be held out."""
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = class_labels(task, idx)
        counts = [int((labels == c).sum()) for c in np.unique(labels)]
        if min(counts) < 2:
            return None
        stop = [rng.choice(idx[labels == c], size=max(1, int(round(frac * n))), replace=False)
                for c, n in zip(np.unique(labels), counts, strict=True)]
        stop = np.sort(np.concatenate(stop))
    else:
        if idx.size < 4:
            return None
        stop = np.sort(rng.choice(idx, size=max(1, int(round(frac * idx.size))), replace=False))
    return np.setdiff1d(idx, stop), stop


@dataclass
class Trainable:
    """What add-task trains: free parameters (the head: weight decay toward 0) and anchored
    ones (embedding, own encoder, grown experts and gate columns: an L2 pull toward their
    start). Each is a (param view, grad view) pair; views stay valid because every backward
    writes its gradients in place."""

    free: dict[str, tuple[np.ndarray, np.ndarray]]
    anchored: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: p for n, (p, _) in {**self.free, **self.anchored}.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        return {n: p.copy() for n, p in self.arrays().items()}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        for n, p in self.arrays().items():
            p[...] = saved[n]

    def size(self) -> int:
        return int(sum(p.size for p in self.arrays().values()))


@dataclass(frozen=True)
class FitRule:
    lr: float = 3e-3
    weight_decay: float = 1e-2
    anchor: float = 1e-2  # L2 pull of anchored parameters toward their start
    max_epochs: int = 400
    patience: int = 40


def _epochs(model, trainable: Trainable, task: TaskData, rows, rule: FitRule, *, epochs: int,
            stop_rows=None, curve: list | None = None) -> tuple[int, float, float]:
    """Full-batch Adam on rows for up to `epochs`; with stop_rows, stop when the held-out loss
    has not improved for rule.patience epochs (each epoch's (held-out loss, metric) is
    appended to `curve` when given). Returns (best epoch, held-out score and loss there)."""
    free = Adam({n: p for n, (p, _) in trainable.free.items()}, AdamConfig(weight_decay=rule.weight_decay))
    anch = {n: p for n, (p, _) in trainable.anchored.items()}
    start = {n: p.copy() for n, p in anch.items()}
    anchored = Adam(anch, AdamConfig(weight_decay=0.0)) if anch else None
    kind, metric = task.spec.kind, task.spec.metric
    chunk = [Chunk(task.name, task.x_train[rows], task.y_train[rows])]
    best, best_epoch, best_score = np.inf, 0, float("nan")
    for epoch in range(1, epochs + 1):
        out = model.forward(chunk, train=False, grad=True)  # no gate noise, but a backward
        model.backward([loss_and_grad(kind, out.outputs[0], chunk[0].y)[1]])
        free.step({n: g for n, (_, g) in trainable.free.items()}, rule.lr)
        if anchored is not None:
            anchored.step({n: g + rule.anchor * (anch[n] - start[n]) for n, (_, g) in trainable.anchored.items()},
                          rule.lr)
        if stop_rows is None:
            continue
        held_out = model.forward([Chunk(task.name, task.x_train[stop_rows])], train=False).outputs[0]
        held = loss_and_grad(kind, held_out, task.y_train[stop_rows])[0]
        score = None
        if curve is not None:
            score = evaluate(kind, held_out, task.y_train[stop_rows])[metric]
            curve.append((float(held), float(score)))
        if held < best - 1e-6:
            best, best_epoch = held, epoch
            best_score = score if score is not None else evaluate(kind, held_out, task.y_train[stop_rows])[metric]
        elif epoch - best_epoch >= rule.patience:
            break
    return (best_epoch if stop_rows is not None else epochs), float(best_score), float(best)


def fit_few_shot(model, trainable: Trainable, task: TaskData, idx: np.ndarray, split, rule: FitRule) -> tuple[int, str]:
    """Train on the examples idx: the epoch count from early-stopped fits on fold_sets(split)
    (then retrained from the same start on all of idx), or FIXED_EPOCHS when split is None.
    Returns (epochs, the rule used, in words)."""
    if split is None:
        _epochs(model, trainable, task, idx, rule, epochs=FIXED_EPOCHS)
        return FIXED_EPOCHS, f"fixed budget of {FIXED_EPOCHS} epochs (a class has one example: nothing to hold out)"
    start = trainable.snapshot()
    curves, sizes = [], []
    for held in fold_sets(task, split):
        curve: list[tuple[float, float]] = []
        _epochs(model, trainable, task, np.setdiff1d(idx, held), rule, epochs=rule.max_epochs, stop_rows=held,
                curve=curve)
        trainable.restore(start)
        curves.append(curve)
        sizes.append(held.size)
    best_epoch = epoch_count(curves, sizes)
    _epochs(model, trainable, task, idx, rule, epochs=best_epoch)
    by = (f"the best pooled held-out {task.spec.metric}, ties to the least mean loss"
          if _by_metric(sizes) else "the least mean held-out loss")
    return best_epoch, f"{len(curves)}-fold early stopping (the epoch of {by}), then retrained on all {idx.size}"


# Below this many held-out shots in a fold, the epoch count follows the folds' pooled metric
# instead of their mean loss. On a few shots one fold's confident mistakes drive the mean loss
# (digits_ge5 at 10 shots, 6-7 held out per fold: seed 2 stopped at 8 epochs, test 0.749; by
# the metric 151 epochs, 0.844; 5 seeds, mean score 0.869 -> 0.888; the same scores at 5
# shots); on larger folds the metric is the noisier figure (skill_108 from 180 examples, ~60
# per fold, 4 grown experts: 76 epochs by the metric, test 0.350; 20 by the loss, 0.633). Set
# after those runs (bench/RESULTS.md), at the floor AUTO_MIN_HELD_OUT already uses.
LOSS_MIN_HELD_OUT = 20


def _by_metric(sizes: list[int]) -> bool:
    """Whether epoch_count follows the pooled metric (a fold of fewer than LOSS_MIN_HELD_OUT)."""
    return min(sizes) < LOSS_MIN_HELD_OUT


def epoch_count(curves: list[list[tuple[float, float]]], sizes: list[int]) -> int:
    """The epoch (from 1) of the least mean held-out loss; when a fold holds out fewer than
    LOSS_MIN_HELD_OUT examples, the epoch whose held-out metric weighted by fold size (right
    answers over all held-out shots) is highest, ties going to the least mean loss.
    curves[f][e] = (loss, metric) of fold f after epoch e + 1; sizes[f] its held-out count; a
    fold stopped early keeps its last values."""
    longest = max(len(c) for c in curves)
    full = np.array([c + [c[-1]] * (longest - len(c)) for c in curves], dtype=np.float64)  # [F, epochs, 2]
    mean_loss = full[:, :, 0].mean(axis=0)  # [epochs]
    if not _by_metric(sizes):
        return int(np.argmin(mean_loss)) + 1
    w = np.asarray(sizes, dtype=np.float64)[:, None]  # [F, 1]
    pooled = np.sum(full[:, :, 1] * w, axis=0) / w.sum()  # [epochs]
    top = np.flatnonzero(pooled >= pooled.max() - 1e-9)
    return int(top[np.argmin(mean_loss[top])]) + 1


def fold_sets(task: TaskData, split) -> list[np.ndarray]:
    """Held-out sets for the epoch count: split's held-out part, and the fit part dealt into
    FOLDS - 1 more, class by class in row order (no random draw: the split made it random),
    so every example is held out once; fewer folds when a class has too few examples."""
    fit, stop = split
    kind = task.spec.kind
    if kind in ("multiclass", "binary"):
        labels = class_labels(task, fit)
        rank = np.empty(fit.size, dtype=np.int64)
        for c in np.unique(labels):
            rank[labels == c] = np.arange(int((labels == c).sum()))
        least = min(int((labels == c).sum()) for c in np.unique(labels))
    else:
        rank, least = np.arange(fit.size), fit.size
    k = max(1, min(FOLDS - 1, least - 1))  # each training set keeps an example of every class
    return [stop] + [fit[rank % k == f] for f in range(k)] if least >= 2 else [stop]


def task_trainable(model: MultiTaskMoE, name: str) -> Trainable:
    """The new task's head (free) and its embedding and own encoder row (anchored)."""
    views = model.task_views(name)
    head = {n: v for n, v in views.items() if n.startswith("head.")}
    return Trainable(head, {n: v for n, v in views.items() if n not in head})


def with_grown(model: MultiTaskMoE, trainable: Trainable, ids: list[int]) -> Trainable:
    """Add the grown experts' weights and gate columns (anchored) to what is trained."""
    lo, hi = ids[0], ids[-1] + 1
    anchored = dict(trainable.anchored)
    for n, p in model.params.items():
        g = model.grads[n]
        if ".moe.gate." in n:
            anchored[f"{n}[:, {lo}:{hi}]"] = (p[:, lo:hi], g[:, lo:hi])  # the new gate columns
        elif ".moe.experts." in n:
            anchored[f"{n}[{lo}:{hi}]"] = (p[lo:hi], g[lo:hi])  # the new experts
    return Trainable(trainable.free, anchored)


ADAPTERS = ("auto", "shared", "own")
# "auto" compares two fits (the two encoders; growth against none) only on at least this many
# held-out examples. On fewer the comparison is noise: on digits_ge5 (bench/add_task.py, 5
# seeds) letting 4 and 6 held-out examples pick the encoder lowered the mean gain at 5 shots
# from +0.174 to +0.128 and at 10 from +0.201 to +0.180, while 30 (50 shots) raised it from
# +0.055 to +0.101; 6 held-out examples kept fresh growth on 2 of 5 seeds at 10 shots on
# one more right answer. Set after those runs.
AUTO_MIN_HELD_OUT = 20


def choose_adapter(model: MultiTaskMoE, trainable: Trainable, task: TaskData, split, rule: FitRule,
                   adapter: str) -> tuple[Trainable, str, str]:
    """Decide whether the new task (registered in its domain) keeps its domain's encoder or
    gets its own copy; apply it. Returns (what to train, "shared" | "own", why).

    The "own" trial trains the domain's row itself, as the copy would be trained, and puts it
    back bit for bit after: the same numbers as a copy, without adding one to undo."""
    spec = model.tasks.spec(task.name)
    if spec.domain is None:
        return trainable, "own", "its input space is its own (no domain the model knows)"
    if adapter == "shared":
        return trainable, "shared", "asked for (--adapter shared)"
    if adapter == "auto":
        if split is None:
            return trainable, "shared", "auto: shared (nothing can be held out to compare on: a class has one example)"
        if split[1].size < AUTO_MIN_HELD_OUT:
            return trainable, "shared", (f"auto: shared (only {split[1].size} held-out examples; comparing two fits "
                                         f"needs {AUTO_MIN_HELD_OUT})")
        shared = _held_out(model, trainable, task, split, rule)
        table, row = model.encoders[spec.n_inputs], model.space_row[spec.input_space]
        domain_row = {f"enc.{spec.n_inputs}.{n}[{row}]": (p[row], table.grads[n][row]) for n, p in table.params.items()}
        own = _held_out(model, Trainable(trainable.free, {**trainable.anchored, **domain_row}), task, split, rule)
        verdict = (f"held-out loss {own[1]:.4f} ({spec.metric} {own[0]:.3f}) with its own encoder vs "
                   f"{shared[1]:.4f} ({shared[0]:.3f}) with the domain's")
        if not own[1] < shared[1]:  # the loss: the metric on a few held-out examples ties often
            return trainable, "shared", f"auto: shared; {verdict}"
        why = f"auto: own; {verdict}"
    else:
        why = "asked for (--adapter own)"
    model.own_encoder(task.name)
    return task_trainable(model, task.name), "own", why


def _score(model, task: TaskData, split: str) -> float:
    return float(evaluate(task.spec.kind, predict_split(model, task, split), task.split(split)[1])[task.spec.metric])


def _held_out(model, trainable: Trainable, task: TaskData, split, rule: FitRule) -> tuple[float, float]:
    """(score, loss) on split's held-out part after training on its fit part, at the best
    epoch; the start is restored after."""
    start = trainable.snapshot()
    _, score, loss = _epochs(model, trainable, task, split[0], rule, epochs=rule.max_epochs, stop_rows=split[1])
    trainable.restore(start)
    return score, loss


def add_task(
    model: MultiTaskMoE,
    config: Config,
    task: TaskData,
    *,
    shots: int | None,
    rng: np.random.Generator,
    grow_experts: int | str = 0,
    grow_start: str = "fresh",
    init_from: str | None = None,
    head_hidden: int | None = None,
    adapter: str = "auto",
    rule: FitRule = FitRule(),
    progress: Progress | None = None,
) -> AddTaskResult:
    """Add `task` to `model` in place (everything that existed stays bit for bit); return its
    test score next to a from-scratch model's on the same examples.

    init_from: force the start (default: the measured best). grow_experts: M experts, or
    "auto" (AUTO_GROW experts, kept only if they raise the held-out score on the shots);
    grow_start: "fresh" weights or "clone"s of the task's most used experts (transfer_grow).
    head_hidden: the new head's hidden width (None: HEAD_HIDDEN, or ONE_SHOT_HEAD_HIDDEN
    when nothing can be held out). adapter: "auto", "shared" or "own" (module doc, step 4;
    only for a task of a domain the model knows). progress (2 units) advances after the new
    task's fit and after the scratch model's."""
    if task.name in model.tasks:
        raise ValueError(f"task {task.name!r} is already in the model")
    if not (grow_experts == "auto" or (isinstance(grow_experts, int) and grow_experts >= 0)):
        raise ValueError(f"grow_experts must be an int >= 0 or 'auto', got {grow_experts!r}")
    if grow_start not in STARTS:
        raise ValueError(f"grow_start must be one of {STARTS}, got {grow_start!r}")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    alone = ""
    if task.spec.domain is not None and all(s.domain != task.spec.domain for s in model.tasks):
        alone = f"the model has no task of domain {task.spec.domain!r}, so its encoder is its own"
        task = task.with_own_space()
    idx = select_shots(task, shots, rng)
    split = split_fit_stop(task, idx, rng)
    if head_hidden is None:
        head_hidden = HEAD_HIDDEN if split is not None else ONE_SHOT_HEAD_HIDDEN
    model.add_task(task.spec, rng=rng, head_hidden=head_hidden)
    x_shots, y_shots = task.x_train[idx], task.y_train[idx]
    start, similarity = choose_start(model, task.name, x_shots, y_shots, forced=init_from)
    trainable = task_trainable(model, task.name)
    trainable, adapter, adapter_why = choose_adapter(model, trainable, task, split, rule, adapter)
    adapter_why = alone or adapter_why

    grown: list[int] = []
    growth = "none"
    m = AUTO_GROW if grow_experts == "auto" else grow_experts
    if grow_experts == "auto" and split is not None and split[1].size < AUTO_MIN_HELD_OUT:
        m, growth = 0, (f"auto: declined (only {split[1].size} held-out examples; comparing two fits needs "
                        f"{AUTO_MIN_HELD_OUT})")
    if m:
        base_score = _held_out(model, trainable, task, split, rule)[0] if grow_experts == "auto" and split else None
        usage = expert_usage(model, task.name, x_shots)
        grown = model.grow_experts(task.name, m, rng=rng)
        sources = start_grown(model, task.name, usage, grown, rng=rng, start=grow_start)
        trainable = with_grown(model, trainable, grown)
        grown_what = (f"{m} fresh experts (gate columns from {sources})" if grow_start == "fresh"
                      else f"{m} experts (copies of {sources})")
        growth = f"grew {grown_what}"
        if grow_experts == "auto":
            if split is None:
                model.drop_last_experts(m)
                trainable, grown = task_trainable(model, task.name), []
                growth = "auto: declined (no held-out part to measure growth on: a class has one example)"
            else:
                grow_score = _held_out(model, trainable, task, split, rule)[0]
                verdict = f"held-out {task.spec.metric} {grow_score:.3f} with {m} grown experts vs {base_score:.3f} without"
                if grow_score > base_score:
                    growth = f"auto: kept {grown_what}; {verdict}"
                else:
                    model.drop_last_experts(m)
                    trainable, grown = task_trainable(model, task.name), []
                    growth = f"auto: declined; {verdict}"
    epochs, stop_rule = fit_few_shot(model, trainable, task, idx, split, rule)
    if progress is not None:
        progress.update(1)
    score = _score(model, task, "test")
    share = grown_share(model, task, grown) if grown else None

    scratch_cfg = baseline_config(config, examples=1)
    scratch = MultiTaskMoE(scratch_cfg.model, TaskRegistry([task.spec]), rng=np.random.default_rng(rng.integers(2**32)))
    everything = Trainable({n: (p, scratch.grads[n]) for n, p in scratch.params.items()})
    fit_few_shot(scratch, everything, task, idx, split, rule)
    if progress is not None:
        progress.update(1)
    return AddTaskResult(
        task.name, task.spec.metric, score, _score(scratch, task, "test"), int(idx.size), start, epochs,
        stop_rule, similarity, grown, growth, share, adapter, adapter_why, trainable.size(),
        [int(i) for i in idx],
    )


def result_record(record: dict, res: AddTaskResult) -> dict:
    """The data-source record of an added task with what add-task decided (the examples it
    used; an own encoder), so that loading it rebuilds the task as the model holds it."""
    return {**record, "train_rows": res.train_rows, **({"adapter": "own"} if res.adapter == "own" else {})}


def with_added_record(source: dict, record: dict) -> dict:
    return {**source, "added": [*source.get("added", []), record]}
