"""What the MoE is compared with: dense models of the same active or total size trained on
all tasks, and models per task (a dense net on the same budget, or scikit-learn's).

- `dense_config(config, hidden)`: the same model with each MoE block replaced by one dense
  FFN of `hidden` units (an MoE with one expert always chosen: gate 1, no router). With
  hidden = k * d_hidden it has the MoE's active parameters per example; with
  hidden = E * d_hidden its total parameters.
- `train_baseline`: the per-task dense net. A baseline for task t is the same architecture with
  a single dense expert (encoder -> pre-norm residual FFN -> head), trained alone with the same
  optimizer and schedule on as many examples as the multitask model drew from t. Batches are
  smaller (32) so small tasks still get many updates: this favours the baseline, not us.
- `sklearn_baseline`: what a user would fit per task instead: logistic/ridge regression,
  random forest or gradient boosting on the same train split; "best" picks, per task, the
  one with the best validation score.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moe.config import Config, ModelConfig
from moe.tasks.metrics import evaluate
from moe.tasks.spec import TaskData
from moe.train import Trainer

BASELINE_BATCH = 32


def dense_model(model: ModelConfig, hidden: int, n_layers: int | None = None) -> ModelConfig:
    """Each MoE block as one dense FFN with `hidden` units (one expert, gate 1, no balance loss)."""
    return dataclasses.replace(
        model, n_experts=1, k=1, d_hidden=hidden, n_layers=n_layers or model.n_layers,
        gate="softmax_topk", capacity_factor=None, w_importance=0.0, w_load=0.0, w_z=0.0,
        route_by="example",
    )


def dense_config(config: Config, hidden: int) -> Config:
    """The run's config with dense blocks of `hidden` units (trained on the same tasks and steps)."""
    return dataclasses.replace(config, model=dense_model(config.model, hidden),  # one expert: nothing to balance
                               train=dataclasses.replace(config.train, baseline="none", balanced_share=0.0))


def baseline_config(config: Config, examples: int, batch: int = BASELINE_BATCH) -> Config:
    model = dense_model(config.model, config.model.d_hidden, n_layers=1)
    steps = max(1, math.ceil(examples / batch))
    train = dataclasses.replace(
        config.train, steps=steps, batch_size=batch, warmup=min(config.train.warmup, steps // 10),
        progress=False, tensorboard=False, sampling="uniform", balanced_share=0.0,
        eval_every=steps, checkpoint_every=steps,
    )
    return Config(model=model, train=train, data=config.data)


def train_baseline(config: Config, task: TaskData, examples: int) -> dict[str, float]:
    """Train the dense single-task baseline on `examples` draws; return its test metrics."""
    trainer = Trainer(baseline_config(config, examples), [task], "unused", save_checkpoints=False)
    return trainer.train().test[task.name]


SKLEARN_MODELS = ("linear", "forest", "boosting", "best")


def _sklearn(kind: str, which: str, seed: int):
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge

    classify = kind in ("multiclass", "binary")
    if which == "linear":
        return LogisticRegression(max_iter=2000) if classify else Ridge(alpha=1.0)
    if which == "forest":
        cls = RandomForestClassifier if classify else RandomForestRegressor
        return cls(n_estimators=100, random_state=seed, n_jobs=1)
    if which == "boosting":
        cls = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return cls(random_state=seed)
    raise ValueError(f"sklearn model must be one of {SKLEARN_MODELS}, got {which!r}")


def _outputs(kind: str, pred: np.ndarray, n_out: int) -> np.ndarray:
    """Predictions in the raw-output form moe.tasks.metrics.evaluate reads."""
    if kind == "multiclass":
        return np.eye(n_out, dtype=np.float32)[pred.astype(np.intp)]  # [n, C] one-hot
    if kind in ("binary", "multilabel"):
        return np.where(pred.reshape(pred.shape[0], -1) > 0.5, 1.0, -1.0).astype(np.float32)  # logit sign
    return pred.reshape(pred.shape[0], -1).astype(np.float32)  # [n, D]


def sklearn_baseline(task: TaskData, which: str = "linear", seed: int = 0) -> dict[str, float]:
    """Test metrics of a scikit-learn model fitted on this task's train split alone.

    Multilabel tasks fit one model per label. "best" fits linear, forest and boosting and keeps
    the one with the best validation score (what a careful user would do)."""
    if which == "best":
        fits = [_fit_predict(task, w, seed) for w in SKLEARN_MODELS[:-1]]
        return max(fits, key=lambda f: f[0][task.spec.metric])[1]
    return _fit_predict(task, which, seed)[1]


def _fit_predict(task: TaskData, which: str, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """(val metrics, test metrics) of one model fitted on the train split."""
    kind, n_out = task.spec.kind, task.spec.n_outputs
    ytr = task.y_train
    columns = [ytr] if kind == "multiclass" else [ytr[:, j] for j in range(ytr.shape[1])]
    preds: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    for col in columns:
        model = None
        if kind == "regression" or np.unique(col).shape[0] > 1:
            model = _sklearn(kind, which, seed).fit(task.x_train, col)
        for split in preds:  # a single-class column predicts that class
            x = task.split(split)[0]
            preds[split].append(model.predict(x) if model is not None else np.full(x.shape[0], col[0]))
    out = []
    for split, p in preds.items():
        pred = p[0] if kind == "multiclass" else np.stack(p, axis=1)
        out.append(evaluate(kind, _outputs(kind, pred, n_out), task.split(split)[1]))
    return out[0], out[1]
