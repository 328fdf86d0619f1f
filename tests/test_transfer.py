"""add-task's training against an independent oracle: full-batch AdamW written out here.

The oracle replays add_task's procedure (the same shot selection and measured start, then
the epoch count from early-stopped fits on three held-out sets: the most right answers over
all held-out shots, ties to the least mean held-out loss; then a refit on all shots for that
many epochs) with its own Adam: decoupled weight decay on the head, an L2 pull toward the start on
the task's embedding (anchored, no decay). Gradients come from the model (they are
checked by finite differences elsewhere); every optimizer step is the oracle's.
"""

import numpy as np
import pytest

from moe.config import Config, ModelConfig
from moe.model import Chunk, MultiTaskMoE
from moe.tasks.family import make_family
from moe.tasks.losses import loss_and_grad
from moe.tasks.spec import TaskRegistry
from moe.transfer import (
    HEAD_HIDDEN,
    LOSS_MIN_HELD_OUT,
    FitRule,
    add_task,
    epoch_count,
    select_shots,
    split_fit_stop,
)
from moe.transfer_start import choose_start

pytestmark = pytest.mark.unit

LR, WD, ANCHOR = 3e-3, 1e-2, 1e-2  # what add_task trains with (FitRule's defaults)


class AdamW:
    """Textbook Adam with decoupled weight decay (Loshchilov & Hutter), float64 state."""

    def __init__(self, params, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
        self.p = {n: p.astype(np.float64) for n, p in params.items()}
        self.m = {n: np.zeros_like(p) for n, p in self.p.items()}
        self.v = {n: np.zeros_like(p) for n, p in self.p.items()}
        self.lr, self.wd, self.b1, self.b2, self.eps, self.t = lr, wd, b1, b2, eps, 0

    def step(self, grads):
        self.t += 1
        for n, p in self.p.items():
            g = grads[n].astype(np.float64)
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
            m_hat = self.m[n] / (1 - self.b1**self.t)
            v_hat = self.v[n] / (1 - self.b2**self.t)
            self.p[n] = p - self.lr * (m_hat / (np.sqrt(v_hat) + self.eps) + self.wd * p)


def oracle_folds(task, fit, stop):
    """The held-out sets fit_few_shot documents: stop, then the fit rows dealt class by class
    (in row order) into min(2, fewest of a class - 1) more."""
    labels = task.y_train[fit] if task.spec.kind == "multiclass" else task.y_train[fit, 0]
    per_class = {c: [r for r, lab in zip(fit.tolist(), labels.tolist(), strict=True) if lab == c]
                 for c in sorted(set(labels.tolist()))}
    least = min(len(v) for v in per_class.values())
    if least < 2:
        return [stop]
    k = min(2, least - 1)
    folds = [sorted(r for v in per_class.values() for i, r in enumerate(v) if i % k == f) for f in range(k)]
    return [stop] + [np.array(f, dtype=np.int64) for f in folds]


def oracle_fit(model, free, anchored, task, idx, fit, stop, *, max_epochs, patience, wd=WD):
    """(best epoch, final params) by the rule fit_few_shot documents: for each held-out set,
    train on the other shots with early stopping (on the held-out loss) and keep its curves of
    held-out loss and right answers (a stopped curve keeps its last values); the epoch count
    is where the right answers over all held-out sets are most, ties to the least mean loss;
    then a refit on all shots. `free` (the head, decayed) and `anchored` (pulled toward their start)
    map names to the (param, grad) rows the model reads and writes."""
    views = {**free, **anchored}
    start = {n: p.copy() for n, (p, _) in views.items()}

    def run(rows, epochs, stop_rows=None):
        for n, (p, _) in views.items():
            p[...] = start[n]
        f = AdamW({n: start[n] for n in free}, LR, wd)
        a = AdamW({n: start[n] for n in anchored}, LR, 0.0)
        best, best_epoch, curve = np.inf, 0, []  # (loss, right answers) per epoch
        for epoch in range(1, epochs + 1):
            out = model.forward([Chunk(task.name, task.x_train[rows], task.y_train[rows])], train=False, grad=True)
            model.backward([loss_and_grad(task.spec.kind, out.outputs[0], task.y_train[rows])[1]])
            f.step({n: g for n, (_, g) in free.items()})
            a.step({n: g.astype(np.float64) + ANCHOR * (a.p[n] - start[n]) for n, (_, g) in anchored.items()})
            for n, (p, _) in views.items():
                p[...] = f.p[n] if n in free else a.p[n]  # the model computes the next gradient at these
            if stop_rows is not None:
                held = model.forward([Chunk(task.name, task.x_train[stop_rows])], train=False).outputs[0]
                loss = loss_and_grad(task.spec.kind, held, task.y_train[stop_rows])[0]
                curve.append((loss, int(np.sum(np.argmax(held, axis=1) == task.y_train[stop_rows]))))  # multiclass
                if loss < best - 1e-6:
                    best, best_epoch = loss, epoch
                elif epoch - best_epoch >= patience:
                    break
        return curve, {**f.p, **a.p}

    folds = oracle_folds(task, fit, stop)
    assert max(f.size for f in folds) < LOSS_MIN_HELD_OUT  # few shots: the right-answers rule
    curves = [run(np.setdiff1d(idx, held), max_epochs, held)[0] for held in folds]
    n = max(len(c) for c in curves)
    padded = [list(c) + [c[-1]] * (n - len(c)) for c in curves]
    right = [sum(c[e][1] for c in padded) for e in range(n)]
    mean_loss = [np.mean([c[e][0] for c in padded]) for e in range(n)]
    best_epoch = min((e for e in range(n) if right[e] == max(right)), key=lambda e: mean_loss[e]) + 1
    return best_epoch, run(idx, best_epoch)[1]


# seeds whose epoch count is long enough (> 10 epochs) for the decay to show: 0, 3, 7 and 8
# of 0-9 (the 3-fold rule by right answers, per-example router); the others stop at 2-10
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_add_task_trains_the_head_and_its_routing_with_adamw(seed):
    tasks = make_family(4, 200, seed=4)
    known, new = tasks[:2], tasks[3]  # family_03 is multiclass
    config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, gate="noisy_topk", route_by="example+task"))

    def fresh():
        return MultiTaskMoE(config.model, TaskRegistry([t.spec for t in known]), rng=np.random.default_rng(9))

    model = fresh()
    trunk = {n: p.copy() for n, p in model.params.items()}
    res = add_task(model, config, new, shots=6, rng=np.random.default_rng(seed),
                   rule=FitRule(max_epochs=100, patience=20))
    for n, p in trunk.items():  # the trunk did not move: per-task tables only gain a row
        after = model.params[n]
        assert after.shape[1:] == p.shape[1:] and np.array_equal(after[: p.shape[0]], p), n

    def oracle(wd):
        ref = fresh()
        rng = np.random.default_rng(seed)  # the same generator calls give the same start
        idx = select_shots(new, 6, rng)
        fit, stop = split_fit_stop(new, idx, rng)
        ref.add_task(new.spec, rng=rng, head_hidden=HEAD_HIDDEN)
        chosen, _ = choose_start(ref, new.name, new.x_train[idx], new.y_train[idx], forced=res.init_from)
        assert chosen == res.init_from
        views = ref.task_views(new.name)
        free = {n: v for n, v in views.items() if n.startswith("head.")}
        anchored = {n: v for n, v in views.items() if n not in free}
        return views, oracle_fit(ref, free, anchored, new, idx, fit, stop, max_epochs=100, patience=20, wd=wd)

    views, (best_epoch, want) = oracle(WD)
    assert any(n.startswith("head.") for n in views) and any(not n.startswith("head.") for n in views)
    assert res.epochs == best_epoch and 10 < best_epoch < 100, best_epoch
    got = model.task_views(new.name)
    assert sorted(got) == sorted(views)
    for n, (p, _) in got.items():
        assert p.dtype == np.float32
        np.testing.assert_allclose(p, want[n], rtol=1e-5, atol=2e-6, err_msg=n)
    # the tolerance is far tighter than what the weight decay changes: the test can tell
    _, (_, no_decay) = oracle(0.0)
    assert max(float(np.abs(no_decay[n] - want[n]).max()) for n in views) > 100 * 2e-6


def test_epoch_count_follows_the_pooled_metric_not_one_fold_s_blown_up_loss():
    # fold 0's loss rises from epoch 2 (two confident mistakes) while every fold's right
    # answers are most at epoch 4: the mean loss would pick epoch 2, the metric picks 4
    curves = [[(0.40, 4 / 6), (0.30, 4 / 6), (0.90, 4 / 6), (1.50, 4 / 6)],
              [(0.60, 3 / 7), (0.50, 4 / 7), (0.40, 5 / 7), (0.35, 7 / 7)],
              [(0.60, 3 / 7), (0.55, 4 / 7), (0.45, 5 / 7), (0.40, 6 / 7)]]
    assert int(np.argmin(np.mean([[lo for lo, _ in c] for c in curves], axis=0))) + 1 == 2
    assert epoch_count(curves, [6, 7, 7]) == 4


def test_epoch_count_breaks_ties_by_the_mean_loss_and_pads_a_stopped_fold():
    # right answers 2+2 at epochs 2 and 3 (fold 1 stopped after epoch 2 and keeps its last
    # values); epoch 3 has the lower mean loss
    curves = [[(0.7, 1 / 3), (0.6, 2 / 3), (0.5, 2 / 3)],
              [(0.8, 1 / 3), (0.7, 2 / 3)]]
    assert epoch_count(curves, [3, 3]) == 3
    # weights are the fold sizes: 1 of 1 on a one-example fold counts less than 3 of 9 more
    curves = [[(0.5, 0.0), (0.5, 1.0)], [(0.5, 6 / 9), (0.4, 3 / 9)]]
    assert epoch_count(curves, [1, 9]) == 1


def test_epoch_count_on_larger_held_out_sets_is_the_least_mean_loss():
    # every fold holds out LOSS_MIN_HELD_OUT or more: the metric (best at epoch 3) is not used
    n = LOSS_MIN_HELD_OUT
    curves = [[(0.5, 0.50), (0.3, 0.55), (0.4, 0.70)], [(0.6, 0.50), (0.4, 0.60), (0.5, 0.65)]]
    assert epoch_count(curves, [n, n + 5]) == 2
    assert epoch_count(curves, [n - 1, n + 5]) == 3  # one small fold: the pooled metric
