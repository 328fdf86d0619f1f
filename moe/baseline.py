"""The per-task dense baseline: what each task gets on its own with the same budget.

A baseline for task t is the same architecture with a single dense expert (adapter ->
pre-norm residual FFN -> head), trained alone with the same optimizer and schedule on as
many examples as the multitask model drew from t. Batches are smaller (32) so small tasks
still get many updates: this favours the baseline, not us.
"""

from __future__ import annotations

import dataclasses
import math

from moe.config import Config
from moe.tasks.spec import TaskData
from moe.train import Trainer

BASELINE_BATCH = 32


def baseline_config(config: Config, examples: int, batch: int = BASELINE_BATCH) -> Config:
    model = dataclasses.replace(
        config.model, n_experts=1, k=1, n_layers=1, gate="softmax_topk", capacity_factor=None,
        w_importance=0.0, w_load=0.0, w_z=0.0, route_by="example",
    )
    steps = max(1, math.ceil(examples / batch))
    train = dataclasses.replace(
        config.train, steps=steps, batch_size=batch, warmup=min(config.train.warmup, steps // 10),
        progress=False, tensorboard=False, sampling="uniform",
        eval_every=steps, checkpoint_every=steps,
    )
    return Config(model=model, train=train, data=config.data)


def train_baseline(config: Config, task: TaskData, examples: int) -> dict[str, float]:
    """Train the dense single-task baseline on `examples` draws; return its test metrics."""
    trainer = Trainer(baseline_config(config, examples), [task], "unused", save_checkpoints=False)
    return trainer.train().test[task.name]
