"""Adding tasks through the experts (issue 10): shots curve, growth, a sequence of added tasks.

One trunk is trained (or given with --trunk): the default `moe train` job (its 143 tasks:
the original tasks, the digit sets and --n-skills skill tasks over the shared "skills"
domain) for --steps steps. Then:

- shots: the built-in held-out task digits_ge5 at 1, 5, 10, 50 shots per class, seeds
  0..4 (shot choice and new weights); gain = add-task's test accuracy - a dense model from
  scratch on the same shots with the same epoch rule. Mean and worst over seeds.
- growth: a held-out skill task whose two skills no trained skill task uses (capacity the
  model does not have), learned from its training split, with --grow-experts 4 against no
  growth (same seeds); and `auto` on it and on digits_ge5 (10 shots), with its decision;
  grown experts start as --grow-start says (fresh weights, or copies).
- sequence: --sequence held-out skill tasks added one after another (--sequence-grow, all
  their training examples); after each, every earlier task's test outputs are compared bit for bit
  with before, the new task's score with scratch, and the parameters it added are printed.
  The model after the sequence is saved as a resumable checkpoint and trained on jointly
  for --resume-steps more steps (`moe train --resume`'s code path).

Run: python bench/add_task.py [--parts shots,growth,sequence] [--trunk RUN] [--seeds 5]
         [--sequence-grow 0|M|auto] [--grow-start fresh|clone]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout


def train_trunk(out: Path, steps: int, n_skills: int) -> Path:
    from moe.config import load_config
    from moe.datasets import load_source, source_of
    from moe.train import Trainer

    config = load_config(None, [f"steps={steps}", f"n_skills={n_skills}", "progress=false",
                                "baseline=false", f"checkpoint_every={steps}", f"eval_every={steps}"])
    source = source_of(config.data)
    Trainer(config, load_source(source), out, data_source=source, echo=lambda _: None).train()
    return out


def outputs(model, data) -> dict[str, np.ndarray]:
    from moe.train import predict_split

    return {d.name: predict_split(model, d, "test") for d in data}


def unused_skill_tasks(n_trained: int, seed: int, count: int, skill_size: int) -> list[int]:
    """Skill-task indices beyond the trained ones whose skills no trained task reads."""
    from moe.tasks.skills import make_bank

    bank = make_bank(n_trained + 400, seed)
    used = set(bank.subsets[:n_trained].ravel().tolist())
    out = [t for t in range(n_trained, n_trained + 400) if not used & set(bank.subsets[t].tolist())]
    return out[:count]


def part_shots(trunk: Path, seeds: int, shot_counts: list[int]) -> dict:
    from moe.api import load
    from moe.config import Config
    from moe.datasets import load_added
    from moe.transfer import add_task

    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0})
    rows = {}
    for shots in shot_counts:
        gains, info = [], []
        for seed in range(seeds):
            model = load(trunk)
            config = Config.from_dict(model.manifest["config"])
            r = add_task(model, config, task, shots=shots, rng=np.random.default_rng(seed))
            gains.append(r.score - r.scratch_score)
            info.append((round(r.score, 3), round(r.scratch_score, 3), r.init_from, r.epochs, r.adapter))
        rows[shots] = {"mean": float(np.mean(gains)), "worst": float(np.min(gains)), "gains": gains, "runs": info}
        print(f"shots {shots:2d}: gain mean {np.mean(gains):+.3f} worst {np.min(gains):+.3f}  {info}", flush=True)
    return rows


def part_growth(trunk: Path, seeds: int, n_skills: int, skill_size: int, shots: int | None, start: str) -> dict:
    from moe.api import load
    from moe.config import Config
    from moe.datasets import load_added
    from moe.transfer import add_task

    t = unused_skill_tasks(n_skills, 0, 1, skill_size)[0]
    task = load_added({"skill": t, "seed": 0, "size": skill_size, "name": f"skill_{t:03d}"})
    res = {"task": task.name, "kind": task.spec.kind}
    for seed in range(seeds):
        scores = {}
        for grow in (0, 4, "auto"):
            model = load(trunk)
            r = add_task(model, Config.from_dict(model.manifest["config"]), task, shots=shots,
                         rng=np.random.default_rng(seed), grow_experts=grow, grow_start=start)
            scores[str(grow)] = (r.score, r.scratch_score, r.grown_share, r.growth)
        res[seed] = scores
        print(f"growth {task.name} ({task.spec.kind}) seed {seed}: none {scores['0'][0]:.3f}  grow4 "
              f"{scores['4'][0]:.3f} (share {scores['4'][2]:.2f})  auto {scores['auto'][0]:.3f} "
              f"[{scores['auto'][3]}]  scratch {scores['0'][1]:.3f}", flush=True)
    digits = load_added({"heldout": True, "name": "digits_ge5", "seed": 0})
    for seed in range(seeds):
        model = load(trunk)
        r = add_task(model, Config.from_dict(model.manifest["config"]), digits, shots=10,
                     rng=np.random.default_rng(seed), grow_experts="auto", grow_start=start)
        res[f"digits_auto_{seed}"] = r.growth
        print(f"auto on digits_ge5 seed {seed}: {r.growth}", flush=True)
    return res


def part_sequence(trunk: Path, n: int, n_skills: int, skill_size: int, resume_steps: int, grow, start: str) -> dict:
    from moe import checkpoint as ckpt
    from moe.added import save_added
    from moe.api import load
    from moe.config import Config
    from moe.datasets import load_added, load_source
    from moe.train import Trainer
    from moe.transfer import add_task, result_record, with_added_record

    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    source = model.manifest["data_source"]
    data = load_source(source)
    rows = []
    for i, t in enumerate(range(n_skills, n_skills + n)):
        rec = {"skill": t, "seed": 0, "size": skill_size, "name": f"skill_{t:03d}"}
        task = load_added(rec)
        before = outputs(model, data)
        r = add_task(model, config, task, shots=None, rng=np.random.default_rng(i), grow_experts=grow,
                     grow_start=start)
        after = outputs(model, data)
        changed = [k for k in before if not np.array_equal(before[k], after[k])]
        rec = result_record(rec, r)
        source = with_added_record(source, rec)
        data.append(load_added(rec))  # as the model holds it (an own encoder: no domain)
        rows.append({"task": task.name, "kind": task.spec.kind, "score": r.score, "scratch": r.scratch_score,
                     "params_added": r.params_added, "grown": len(r.grown), "changed": changed, "start": r.init_from,
                     "adapter": r.adapter, "adapter_why": r.adapter_why})
        print(f"{i + 1:2d} {task.name} {task.spec.kind:10s} {r.metric} {r.score:.3f} scratch {r.scratch_score:.3f} "
              f"params +{r.params_added:,} grown {len(r.grown)} start {r.init_from} encoder {r.adapter} "
              f"earlier tasks changed: {len(changed)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        where, resumable = save_added(Path(tmp) / "seq", ckpt.resolve(trunk), model, config, load_source(source), source)
        manifest = ckpt.read_manifest(where)
        cfg = Config.from_dict(manifest["config"])
        cfg = Config.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "steps": manifest["step"] + resume_steps}})
        trainer = Trainer(cfg, load_source(manifest["data_source"]), Path(tmp) / "seq", data_source=manifest["data_source"],
                          head_hidden=manifest["head_hidden"], expert_owners=manifest["expert_owners"] or None,
                          echo=lambda _: None)
        result = trainer.train(resume=True)
        added_scores = {r["task"]: result.test[r["task"]][load_added({"skill": int(r["task"][6:]), "seed": 0, "size": skill_size}).spec.metric]
                        for r in rows}
    print(f"resumed joint training {resume_steps} steps to step {result.step} (resumable={resumable}); "
          f"added tasks after it: " + json.dumps({k: round(v, 3) for k, v in added_scores.items()}), flush=True)
    return {"rows": rows, "resumed_step": result.step, "after_resume": added_scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="shots,growth,sequence")
    ap.add_argument("--trunk", help="a run folder to add to (default: train one)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-skills", type=int, default=100)
    ap.add_argument("--skill-size", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shots", default="1,5,10,50", help="shots per class for the shots part")
    ap.add_argument("--sequence", type=int, default=20)
    ap.add_argument("--growth-shots", type=int, default=None, help="examples for the growth task (default: its train split)")
    ap.add_argument("--resume-steps", type=int, default=50)
    ap.add_argument("--sequence-grow", default="0", help="--grow-experts for each task of the sequence (M or auto)")
    ap.add_argument("--grow-start", choices=("fresh", "clone"), default="fresh", help="grown experts' start (growth, sequence)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    np.seterr(all="raise")
    print(f"load average before: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trunk = Path(args.trunk) if args.trunk else train_trunk(Path(tmp) / "trunk", args.steps, args.n_skills)
        out = {}
        parts = args.parts.split(",")
        if "shots" in parts:
            out["shots"] = part_shots(trunk, args.seeds, [int(s) for s in args.shots.split(",")])
        if "growth" in parts:
            out["growth"] = part_growth(trunk, args.seeds, args.n_skills, args.skill_size, args.growth_shots, args.grow_start)
        if "sequence" in parts:
            grow = args.sequence_grow if args.sequence_grow == "auto" else int(args.sequence_grow)
            out["sequence"] = part_sequence(trunk, args.sequence, args.n_skills, args.skill_size, args.resume_steps, grow,
                                            args.grow_start)
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - t0:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
