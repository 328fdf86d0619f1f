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
                   related: Callable[[str, str], bool] | None = None,
                   train_routing: tuple[str, float] = ("topk", 1.25)) -> dict[str, Any]:
    """Mutual information (first block) with training-time and noise-free routing on the train
    split; with `related`, the mean expert overlap of related and of unrelated task pairs.
    train_routing: (routing, balance factor) the model trained with (TrainConfig.routing)."""
    names = list(model.tasks.names)
    out: dict[str, Any] = {}
    routing, factor = train_routing
    for mode, noise_seed, how in (("train", None if routing == "balanced" else seed, routing), ("noise_free", None, "topk")):
        prof = collect_profile(model, data, split="train", noise_seed=noise_seed, routing=how, balance_factor=factor)
        counts = prof.layer("block0").task_expert_matrix("counts")
        mi, per_task = mutual_information(counts)
        out[mode] = {"mutual_information": mi, "per_task": dict(zip(names, per_task.tolist(), strict=True)),
                     "routing": how, **({"balance_factor": factor} if how == "balanced" else {})}
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


def group_table(columns: dict[str, dict[str, float]]) -> str:
    """Mean primary test score per task group for each compared model (a column per model,
    given as task -> score; a model missing a group's tasks shows '-')."""
    first = next(iter(columns.values()))
    counts: dict[str, int] = {}
    for name in first:
        counts[group_of(name)] = counts.get(group_of(name), 0) + 1
    groups = [g for g in ("original", *(g for _, g in GROUPS)) if g in counts] + ["all"]
    counts["all"] = len(first)
    means = {m: by_group(s) if s else {} for m, s in columns.items()}
    width = max(12, *(len(m) for m in columns))
    lines = [f"{'group':12s} {'tasks':>6s} " + " ".join(f"{m:>{width}s}" for m in columns)]
    for g in groups:
        cells = [f"{means[m][g]:{width}.3f}" if g in means[m] else f"{'-':>{width}s}" for m in columns]
        lines.append(f"{g:12s} {counts[g]:6d} " + " ".join(cells))
    return "\n".join(lines)


def skill_relatedness_of(config: Config) -> Callable[[str, str], bool] | None:
    """Related-by-construction pairs of the run's skill tasks (None without skill tasks)."""
    from moe.tasks.skills import skill_relatedness

    return skill_relatedness(config.data.n_skills, config.data.seed) if config.data.n_skills >= 2 else None


def after_training(config: Config, data: list[TaskData], model: MultiTaskMoE,
                   test: dict[str, dict[str, float]], baselines: dict[str, float] | None,
                   echo: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Everything a finished run is compared with, per config.train.baseline: the columns of
    the group table (task -> primary test score per compared model), routing specialisation
    and balanced inference."""
    mode = config.train.baseline
    columns: dict[str, dict[str, float]] = {"moe": primary(test, data), "moe without MoE outputs": ablated(model, data)}
    if baselines is not None:
        columns["dense net per task"] = baselines
    if mode in ("sklearn", "all"):
        echo("fitting a scikit-learn linear model per task ...")
        columns["sklearn linear per task"] = per_task_sklearn(data, "linear", config.train.seed)
    if mode == "all":
        c = config.model
        for label, hidden in (("dense, active size", c.k * c.d_hidden), ("dense, total size", c.n_experts * c.d_hidden)):
            echo(f"training a dense model of {hidden} hidden units per block on the same batches ...")
            columns[f"{label} ({hidden})"] = train_dense(config, data, hidden)
    spec = specialisation(model, data, seed=config.train.seed, related=skill_relatedness_of(config),
                          train_routing=(config.train.routing, config.train.balanced_factor))
    return {"columns": columns, "specialisation": spec, "inference": balanced_inference(model, data, seed=config.train.seed)}


def specialisation_lines(spec: dict[str, Any]) -> list[str]:
    lines = []
    t = spec["train"]
    how = (f"balanced seats, factor {t['balance_factor']:g}" if t.get("routing") == "balanced"
           else "gate noise as at the last step")
    modes = [("train", f"while training ({how})"), ("noise_free", "noise-free top-k")]
    if spec["train"] == spec["noise_free"]:  # a gate without noise trains with the routing it is used with
        modes = [("noise_free", "(no gate noise: the same while training and at inference)")]
    for mode, label in modes:
        r = spec[mode]
        line = f"task-expert mutual information {label}: {r['mutual_information']:.3f} nats"
        if "overlap_related" in r:
            line += (f"; expert overlap of related skill tasks {r['overlap_related']:.3f}, "
                     f"unrelated {r['overlap_unrelated']:.3f}")
        lines.append(line)
    return lines


def inference_lines(inf: dict[str, Any]) -> list[str]:
    top, bal = inf["topk"], inf["balanced"]
    drops = ", ".join(f"cf {cf}: {r:.3f}" for cf, r in inf["topk_drop_rates"].items())
    return [f"mixed test batches of 256: top-k mean score {top['mean_score']:.3f}, busiest expert "
            f"{top['max_mean_load_median']:.2f}x the mean (worst {top['max_mean_load_worst']:.2f}); "
            f"top-k drop rate at {drops}",
            f"balanced routing (moe eval --routing balanced): mean score {bal['mean_score']:.3f}, busiest "
            f"expert {bal['max_mean_load_median']:.2f}x (worst {bal['max_mean_load_worst']:.2f})"]
