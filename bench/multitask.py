"""Does one sparse model beat the alternatives on many tasks, and does capacity help?

For each seed, on the built-in benchmark of the default `moe train` job (the original tasks,
the digit sets and the skills family): the MoE (E = 64, k = 2), the ablation of its MoE
outputs, a dense model with the MoE's active parameters (k * d_hidden units), a dense model
with its total parameters (E * d_hidden units), and scikit-learn per task (linear, and the
best of linear / forest / boosting by validation score); then the capacity curve at fixed
k = 2 and fixed expert size (so fixed active compute): E = 4, 16, 64, 256. It also reports
routing specialisation (task-expert mutual information with training-time and noise-free
routing, expert overlap of related and unrelated skill tasks), balanced inference, and the
load balance of the batches the MoE trained on, per phase (top-k, balanced seats).
`moe_shuffled` is the MoE with its signature-started task embeddings dealt to the wrong tasks
of their domain (the ablation of `model.task_emb_init=signature`); `model.task_emb_init=random`
as an override gives the random start.

Mean primary test score per task group, over seeds, with the worst seed. Every variant
trains on the same tasks, batches and steps as the default job (config overrides apply to
all: e.g. steps=500 for a quick look).

Run: python bench/multitask.py [--seeds 0,1,2] [--experts 4,16,64,256] [--skip dense_total] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

VARIANTS = ("moe", "moe_shuffled", "dense_active", "dense_total", "sklearn_linear", "sklearn_best")


def shuffle_signature_starts(trainer, data, seed: int) -> None:
    """The ablation of the signature start: the same embedding rows, dealt to the wrong tasks
    (a permutation within each domain), so only which tasks start together is lost."""
    from moe.tasks.signature import signature_embeddings

    e = trainer.model.task_emb.params["e"]  # [T, d_t]
    start = signature_embeddings(data, e.shape[1], np.random.default_rng([seed, 3]))  # the Trainer's draw
    by_domain: dict[str, list[int]] = {}
    for d in data:
        if d.name in start:
            by_domain.setdefault(d.spec.domain, []).append(trainer.model.tasks.id(d.name))
    rng = np.random.default_rng([seed, 4])
    for ids in by_domain.values():
        e[ids] = e[rng.permutation(ids)]


class TallyingTrainer:
    """Wraps a Trainer's steps to add up what its training batches routed, per phase ("topk",
    "balanced") and MoE block: the balance of the routing the model trains with, measured on
    the batches it trained on (the sampler's temperature mix), not on a proportional replay of
    the train split (what `moe train`'s profile routes)."""

    def __init__(self, trainer) -> None:
        self.tally: dict = {}
        step = trainer.train_step

        def counted() -> dict:
            phase = trainer.routing_at(trainer.step)
            m = step()
            for b, r in enumerate(trainer.last_routings):
                t = self.tally.setdefault((phase, b), {"load": 0.0, "importance": 0.0, "batch_max_mean": []})
                counts = r.counts.astype(np.float64)  # [E] assignments this batch
                t["load"] = t["load"] + counts
                t["importance"] = t["importance"] + r.importance.astype(np.float64)
                t["batch_max_mean"].append(float(counts.max() / counts.mean()))
            return m

        trainer.train_step = counted

    def summary(self) -> dict:
        """Per phase, the worst block's CV(importance), CV(load) and max/mean load over all the
        phase's steps together, and the median max/mean within one batch."""
        from moe.profiling.stats import cv

        out: dict = {}
        for (phase, _), t in self.tally.items():
            row = {"steps": len(t["batch_max_mean"]), "cv_importance": cv(t["importance"]), "cv_load": cv(t["load"]),
                   "max_mean_load": float(t["load"].max() / t["load"].mean()),
                   "batch_max_mean_median": float(np.median(t["batch_max_mean"]))}
            prev = out.get(phase)
            out[phase] = row if prev is None else {k: max(prev[k], v) for k, v in row.items()}
        return out


def run_variant(variant: str, seed: int, n_experts: int, overrides: list[str]) -> dict:
    from moe import compare
    from moe.config import load_config
    from moe.datasets import load_source, source_of
    from moe.tasks.skills import skill_relatedness
    from moe.train import Trainer

    config = load_config(None, [*overrides, "progress=false", f"train.seed={seed}", f"data.seed={seed}"])
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, n_experts=n_experts))
    data = load_source(source_of(config.data))
    t0 = time.perf_counter()
    out: dict = {"variant": variant, "seed": seed, "E": n_experts}
    c = config.model
    if variant.startswith("sklearn_"):
        scores = compare.per_task_sklearn(data, variant.split("_", 1)[1], seed)
    elif variant.startswith("dense_"):
        hidden = c.k * c.d_hidden if variant == "dense_active" else c.n_experts * c.d_hidden
        scores = compare.train_dense(config, data, hidden)
        out["hidden"] = hidden
    else:
        trainer = Trainer(config, data, "unused", save_checkpoints=False)
        if variant == "moe_shuffled":
            shuffle_signature_starts(trainer, data, config.train.seed)
        tally = TallyingTrainer(trainer)
        result = trainer.train()
        out["training_batches"] = tally.summary()
        scores = compare.primary(result.test, data)
        out["ablated"] = compare.by_group(compare.ablated(trainer.model, data))
        if n_experts == 64 and variant == "moe":
            related = skill_relatedness(config.data.n_skills, seed)
            spec = compare.specialisation(trainer.model, data, seed=seed, related=related,
                                          train_routing=(config.train.routing, config.train.balanced_factor))
            out["specialisation"] = {m: {k: v for k, v in r.items() if k != "per_task"} for m, r in spec.items()}
            out["balanced"] = compare.balanced_inference(trainer.model, data, seed=seed)
    out["groups"] = compare.by_group(scores)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--experts", default="4,16,64,256", help="the capacity curve")
    ap.add_argument("--skip", default="", help="comma list of variants to leave out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        variant, seed, E = args.child.split(":")
        print(json.dumps(run_variant(variant, int(seed), int(E), args.overrides)))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    jobs = [(v, s, 64) for s in seeds for v in VARIANTS if v not in skip]
    jobs += [("moe", s, E) for s in seeds for E in map(int, args.experts.split(",")) if E != 64]
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for v, s, E in jobs:  # each in its own process: independent memory, same code path as a user run
        res = subprocess.run([sys.executable, __file__, "--child", f"{v}:{s}:{E}", *args.overrides],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{v} seed {s} E={E} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    report(rows)


def _stat(rows: list[dict], key: str, group: str) -> str:
    vals = [r[key][group] for r in rows if group in r.get(key, {})]
    return f"{np.mean(vals):.3f} (worst {min(vals):.3f})" if vals else "-"


def report(rows: list[dict]) -> None:
    groups = sorted({g for r in rows for g in r["groups"]}, key=lambda g: (g == "all", g))
    print("\n| model | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for v in VARIANTS:
        sel = [r for r in rows if r["variant"] == v and r["E"] == 64]
        if sel:
            print(f"| {v} | " + " | ".join(_stat(sel, "groups", g) for g in groups) + " |")
    moe = [r for r in rows if r["variant"] == "moe" and r["E"] == 64]
    if moe:
        print("| moe without its MoE outputs | " + " | ".join(_stat(moe, "ablated", g) for g in groups) + " |")
    print("\ncapacity curve (k = 2, expert size fixed):\n\n| E | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for E in sorted({r["E"] for r in rows if r["variant"] == "moe"}):
        sel = [r for r in rows if r["variant"] == "moe" and r["E"] == E]
        print(f"| {E} | " + " | ".join(_stat(sel, "groups", g) for g in groups) + " |")
    for r in moe:
        if "specialisation" in r:
            print(f"\nseed {r['seed']}: specialisation {json.dumps(r['specialisation'])}")
            print(f"seed {r['seed']}: inference {json.dumps(r['balanced'])}")
    for r in moe:
        for phase, b in r.get("training_batches", {}).items():
            print(f"seed {r['seed']}: training batches, {phase} phase ({b['steps']} steps, worst block): "
                  f"CV(importance) {b['cv_importance']:.3f}, CV(load) {b['cv_load']:.3f}, max/mean "
                  f"{b['max_mean_load']:.2f}; within one batch median max/mean {b['batch_max_mean_median']:.2f}")


if __name__ == "__main__":
    main()
