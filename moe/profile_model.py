"""Run a model over data and collect every layer's Routing records into a load profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe.model import Chunk, MultiTaskMoE
from moe.profiling.report import write_report
from moe.profiling.stats import ModelProfile
from moe.tasks.spec import TaskData


def collect_profile(
    model: MultiTaskMoE,
    data: list[TaskData],
    *,
    split: str = "train",
    batch_size: int = 256,
    noise_seed: int | None = 0,
) -> ModelProfile:
    """Route every example of `split` through the model in batches of one task each.

    With noise_seed set, the gates run as in training (noise on, Routing.load is the smooth
    estimator the balance loss sees) without updating anything; with None they run as at
    inference (no noise, hard counts).
    """
    names = list(model.tasks.names)
    profile = ModelProfile(len(names), names)
    rng = np.random.default_rng(noise_seed) if noise_seed is not None else None
    for d in data:
        x, _ = d.split(split)
        tid = model.tasks.id(d.name)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            out = model.forward([Chunk(d.name, xb)], train=rng is not None, rng=rng)
            ids = np.full(xb.shape[0], tid, dtype=np.int64)
            for layer, r in enumerate(out.routings):
                profile.add(f"block{layer}", r, ids)
    return profile


def balance_summary(profile: ModelProfile) -> dict[str, float]:
    """The headline numbers for --json output (worst layer)."""
    h = profile.summary()["headline"]
    return {k: float(h[k]) for k in ("cv_importance", "cv_load", "max_mean_load", "drop_rate")}


def write_profile(profile: ModelProfile, out_dir: str | Path) -> dict[str, str]:
    return write_report(profile, Path(out_dir))
