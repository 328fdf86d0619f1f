"""What a finished run is measured against, and what its routing learned.

- scores by task group (the original benchmark, the digit sets, the skills family);
- the ablation: the same model with every MoE block's output left out;
- dense models of the MoE's active and of its total size, trained on the same tasks, batches
  and steps, and a scikit-learn model per task on the same splits;
- routing specialisation: task-expert mutual information with the routing the model trains
  with (gate noise on) and noise-free, and how much more related tasks share experts than
  unrelated ones (skills family: tasks that read a common skill are related by construction);
- balanced inference (moe.routing.balanced) against top-k on mixed test batches of 256.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moe.baseline import dense_config, sklearn_baseline
from moe.config import Config
from moe.inference import drop_rates, predict_mixed
from moe.model import Chunk, MultiTaskMoE
from moe.profile_model import collect_profile
from moe.profiling.specialisation import mutual_information, overlap
from moe.tasks.metrics import evaluate
from moe.tasks.spec import TaskData

GROUPS = (("digitset_", "digit sets"), ("skill_", "skills"))


def group_of(name: str) -> str:
    for prefix, group in GROUPS:
        if name.startswith(prefix):
            return group
    return "original"


def primary(test: dict[str, dict[str, float]], data: list[TaskData]) -> dict[str, float]:
    return {d.name: float(test[d.name][d.spec.metric]) for d in data}


def by_group(scores: dict[str, float]) -> dict[str, float]:
    """Mean primary score per task group, and over all tasks ("all")."""
    groups: dict[str, list[float]] = {}
    for name, s in scores.items():
        groups.setdefault(group_of(name), []).append(s)
    out = {g: float(np.mean(v)) for g, v in groups.items()}
    out["all"] = float(np.mean(list(scores.values())))
    return out


def ablated(model: MultiTaskMoE, data: list[TaskData], split: str = "test") -> dict[str, float]:
    """Each task's primary score with every MoE block's output removed."""
    out = {}
    for d in data:
        x, y = d.split(split)
        o = model.forward([Chunk(d.name, x)], train=False, moe_off=True).outputs[0]
        out[d.name] = float(evaluate(d.spec.kind, o, y)[d.spec.metric])
    return out


def train_dense(config: Config, data: list[TaskData], hidden: int) -> dict[str, float]:
    """Primary test scores of a dense model with `hidden` units per block, trained like the MoE."""
    from moe.train import Trainer

    trainer = Trainer(dense_config(config, hidden), data, "unused", save_checkpoints=False)
    return primary(trainer.train().test, data)


def specialisation(model: MultiTaskMoE, data: list[TaskData], *, seed: int,
                   related: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
    """Mutual information (first block) with training-time and noise-free routing on the train
    split; with `related`, the mean expert overlap of related and of unrelated task pairs."""
    names = list(model.tasks.names)
    out: dict[str, Any] = {}
    for mode, noise_seed in (("train", seed), ("noise_free", None)):
        prof = collect_profile(model, data, split="train", noise_seed=noise_seed)
        counts = prof.layer("block0").task_expert_matrix("counts")
        mi, per_task = mutual_information(counts)
        out[mode] = {"mutual_information": mi, "per_task": dict(zip(names, per_task.tolist(), strict=True))}
        if related is not None:
            ids = [model.tasks.id(d.name) for d in data]
            pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
            rel = np.array([related(names[a], names[b]) for a, b in pairs])
            ov = overlap(counts, np.array(pairs)) if pairs else np.zeros(0)
            if rel.any() and (~rel).any():
                out[mode]["overlap_related"] = float(ov[rel].mean())
                out[mode]["overlap_unrelated"] = float(ov[~rel].mean())
    return out


def balanced_inference(model: MultiTaskMoE, data: list[TaskData], *, seed: int, batch_size: int = 256) -> dict[str, Any]:
    """Mean score and busiest-expert load of top-k and of balanced routing on mixed test batches."""
    out: dict[str, Any] = {}
    for routing in ("topk", "balanced"):
        res = predict_mixed(model, data, "test", batch_size=batch_size, routing=routing,
                            rng=np.random.default_rng(seed))
        out[routing] = {"mean_score": float(np.mean(list(primary(res.metrics, data).values()))),
                        "max_mean_load_median": res.median_max_mean, "max_mean_load_worst": res.worst_max_mean}
        if routing == "topk":
            out["topk_drop_rates"] = {str(cf): r for cf, r in drop_rates(res, model.config.n_experts).items()}
    return out


def per_task_sklearn(data: list[TaskData], which: str = "linear", seed: int = 0) -> dict[str, float]:
    return {d.name: float(sklearn_baseline(d, which, seed)[d.spec.metric]) for d in data}
