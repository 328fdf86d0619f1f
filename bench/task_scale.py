"""How the training step scales with the number of tasks a model holds (issue: cost set by the batch).

A synthetic family of T tasks over 4 shared input domains (width 16; kinds cycle binary /
multiclass(3) / regression; 30 examples each), the default model (d=64, E=64, h=128, k=2,
its default router), batch 256, temperature sampling. For each T in 23, 1,000, 10,000 and 100,000 (each
in its own process, so its peak RSS is its own) it trains the default run's schedule
(--steps steps, 2,000 as `moe train`: learning-rate warmup and decay, the first half routed by
the gate's top-k, the last half on balanced seats, train.balanced_share = 0.5) and reports,
for each phase, the median train_step time, the ratio to a 23-task model's step, the experts a
batch routes to; and bytes per task (parameters + optimizer state, and the task's data), the
process's peak RSS, and for the largest T the time to save and to load a checkpoint.

The ratio is paired: each process also trains a 23-task model on the same schedule and
alternates one step of each, so both medians see the same machine load (a shared machine
drifts by 1.5x within minutes). Phases: "top-k, first 40" (steps 5-44, what earlier runs of
this bench timed: the routing is still that of the initial weights, under which a batch of 23
tasks uses 34 experts and one of 250 uses 61), "top-k half" (all of the first half after the
warmup) and "balanced half" (seats use every expert whatever the tasks). The experts' update
is work set by the batch: `--router example` trains the per-example router (every batch uses
every expert) to separate the two.

Run: python bench/task_scale.py [--tasks 23,1000,10000,100000] [--steps 2000] [--router task|example]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

DOMAINS, WIDTH, PER_TASK = 4, 16, 30


def make_tasks(n_tasks: int, seed: int = 0):
    """n_tasks small tasks whose labels are random functions of inputs shared within a domain."""
    from moe.tasks.spec import TaskSpec
    from moe.tasks.splits import make_task_data

    rng = np.random.default_rng(seed)
    split = (np.arange(18), np.arange(18, 24), np.arange(24, PER_TASK))
    pools = [rng.standard_normal((4096, WIDTH)).astype(np.float32) for _ in range(DOMAINS)]
    ident = (np.zeros(WIDTH, np.float32), np.ones(WIDTH, np.float32))
    tasks = []
    for t in range(n_tasks):
        x = pools[t % DOMAINS][rng.integers(0, 4096, PER_TASK)]  # [n, w]
        score = x @ rng.standard_normal(WIDTH)  # [n]
        kind = ("binary", "multiclass", "regression")[t % 3]
        if kind == "binary":
            spec, y, classes = TaskSpec(f"t{t}", kind, WIDTH, 1, domain=f"d{t % DOMAINS}"), (score > 0).astype(np.float32), np.arange(2)
        elif kind == "multiclass":
            spec, y, classes = TaskSpec(f"t{t}", kind, WIDTH, 3, domain=f"d{t % DOMAINS}"), np.digitize(score, [-0.5, 0.5]), np.arange(3)
        else:
            spec, y, classes = TaskSpec(f"t{t}", kind, WIDTH, 1, domain=f"d{t % DOMAINS}"), score, None
        tasks.append(make_task_data(spec, x, y, split, classes=classes, x_stats=ident))
    return tasks


def _count_experts(model, into: list) -> None:
    """Record the experts each forward_batch routes to (mean over blocks)."""
    forward = model.forward_batch

    def counted(*args, **kw):
        out = forward(*args, **kw)
        into.append(float(np.mean([np.count_nonzero(r.load) for r in out.routings])))
        return out

    model.forward_batch = counted


FIRST = 40  # the "top-k, first 40" window: what earlier runs of this bench timed


def phases(steps: int, warmup: int, share: float) -> dict[str, slice]:
    """The timed windows (indices into the steps taken) of a run of `steps` steps whose last
    `share` route on balanced seats, as Trainer.train_step decides."""
    first_balanced = steps - round(share * steps)
    return {"top-k, first 40": slice(warmup, min(warmup + FIRST, first_balanced)),
            "top-k half": slice(warmup, first_balanced),
            "balanced half": slice(first_balanced, steps)}


def one(n_tasks: int, steps: int, warmup: int, checkpoint: bool, router: str) -> dict:
    from moe import checkpoint as ckpt
    from moe.config import Config, ModelConfig, TrainConfig
    from moe.train import Trainer

    t0 = time.perf_counter()
    data = make_tasks(n_tasks)
    build_data = time.perf_counter() - t0
    model = ModelConfig() if router == "task" else ModelConfig(route_by="example+task")
    train = TrainConfig(steps=steps, progress=False, batch_size=256)  # the default schedule otherwise
    config = Config(model=model, train=train)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(config, data, tmp)
        build_model = time.perf_counter() - t0
        reference = Trainer(config, make_tasks(23), tmp, save_checkpoints=False)
        times, ref_times, experts, ref_experts = [], [], [], []
        _count_experts(trainer.model, experts)
        _count_experts(reference.model, ref_experts)
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            t1 = time.perf_counter()
            reference.train_step()
            times.append(t1 - t0)
            ref_times.append(time.perf_counter() - t1)
        times, ref_times = np.array(times), np.array(ref_times)
        table_bytes = sum(p.nbytes for t in trainer.model.tables().values() for p in t.params.values())
        opt_bytes = sum(v.nbytes for o in trainer.table_optimizers.values() for v in o.state_dict().values())
        data_bytes = sum(d.x_train.nbytes + d.x_val.nbytes + d.x_test.nbytes + d.y_train.nbytes
                         + d.y_val.nbytes + d.y_test.nbytes for d in data)
        out = {"tasks": n_tasks, "phases": {}, "param_bytes_per_task": (table_bytes + opt_bytes) / n_tasks,
               "data_bytes_per_task": data_bytes / n_tasks,
               "build_data_s": build_data, "build_model_s": build_model,
               "tasks_per_batch": float(np.mean([len(trainer.sampler.next_batch()) for _ in range(5)]))}
        for name, w in phases(steps, warmup, train.balanced_share).items():
            if w.stop <= w.start:
                continue
            out["phases"][name] = {
                "steps": w.stop - w.start, "step_ms": 1e3 * float(np.median(times[w])),
                "ref_ms": 1e3 * float(np.median(ref_times[w])),
                "paired_ratio": float(np.median(times[w] / ref_times[w])),
                "experts": float(np.mean(experts[w])), "ref_experts": float(np.mean(ref_experts[w])),
                "step_ms_min": 1e3 * float(times[w].min()), "step_ms_max": 1e3 * float(times[w].max())}
        if checkpoint:
            t0 = time.perf_counter()
            where = trainer.save()
            out["save_s"] = time.perf_counter() - t0
            out["checkpoint_mb"] = sum(f.stat().st_size for f in where.iterdir()) / 2**20
            t0 = time.perf_counter()
            fresh = Trainer(config, data, tmp, restoring=True)  # as `moe train --resume` builds it
            out["rebuild_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fresh.restore(ckpt.list_checkpoints(where.parent)[-1])
            out["load_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="23,1000,10000,100000")
    ap.add_argument("--steps", type=int, default=2000, help="the schedule's length (moe train's default)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    ap.add_argument("--router", choices=("task", "example"), default="task",
                    help="task: the default router; example: route_by=example+task")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.child, args.steps, args.warmup, args.checkpoint, args.router)))
        return
    sizes = [int(s) for s in args.tasks.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--router", args.router] + (["--checkpoint"] if n == max(sizes) else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nrouter: {args.router}, {args.steps} steps (the first {args.warmup} not timed)")
    print("\n| registered tasks | tasks per batch | bytes/task (params+Adam) | bytes/task (data) | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tasks']:,} | {r['tasks_per_batch']:.0f} | {r['param_bytes_per_task']:,.0f} | "
              f"{r['data_bytes_per_task']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print("\n| registered tasks | phase (steps timed) | experts per batch (23-task ref) | step ms (median, min-max) | "
          "23-task step ms, same process | paired ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for name, f in r["phases"].items():
            print(f"| {r['tasks']:,} | {name} ({f['steps']}) | {f['experts']:.1f} ({f['ref_experts']:.1f}) | "
                  f"{f['step_ms']:.1f} ({f['step_ms_min']:.1f}-{f['step_ms_max']:.1f}) | {f['ref_ms']:.1f} | "
                  f"{f['paired_ratio']:.2f} |")
    last = rows[-1]
    if "save_s" in last:
        print(f"\ncheckpoint of {last['tasks']:,} tasks: {last['checkpoint_mb']:.1f} MB, save {last['save_s']:.2f} s, "
              f"load {last['load_s']:.2f} s (model rebuild {last['rebuild_s']:.2f} s, data build {last['build_data_s']:.1f} s)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
