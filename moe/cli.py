"""The `moe` command: train, eval, add-task, profile (and the sharding and planning tools).

User mistakes (bad paths, bad columns, corrupt checkpoints, bad config values) print one
line to stderr and exit with status 2; no traceback. `--json` prints the final summary as
one JSON object on stdout, and everything human-readable goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moe import checkpoint as ckpt


class UserError(Exception):
    """A mistake in what the user asked for; reported without a traceback."""


def _out(args) -> Any:
    """Where human-readable output goes: stderr when stdout is reserved for JSON."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def say(args, *lines: str) -> None:
    print(*lines, sep="\n", file=_out(args), flush=True)


def emit_json(args, obj: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(obj, sort_keys=True), flush=True)


# ----------------------------------------------------------------------------- tables
def score_table(rows: list[tuple[str, str, float, float | None]], right: str = "dense baseline") -> str:
    lines = [f"{'task':18s} {'metric':9s} {'moe':>7s} {right:>15s} {'delta':>7s}"]
    for name, metric, score, base in rows:
        b = f"{base:15.3f}" if base is not None else f"{'-':>15s}"
        d = f"{score - base:+7.3f}" if base is not None else f"{'':>7s}"
        lines.append(f"{name:18s} {metric:9s} {score:7.3f} {b} {d}")
    scores = [r[2] for r in rows]
    bases = [r[3] for r in rows if r[3] is not None]
    mean_b = f"{np.mean(bases):15.3f}" if len(bases) == len(rows) else f"{'':>15s}"
    lines.append(f"{'mean':18s} {'':9s} {np.mean(scores):7.3f} {mean_b}")
    return "\n".join(lines)


def balance_lines(b: dict[str, float]) -> str:
    return (f"load balance: CV(importance) {b['cv_importance']:.3f}  CV(load) {b['cv_load']:.3f}  "
            f"max/mean load {b['max_mean_load']:.2f}  drop rate {b['drop_rate']:.3f}")


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    import contextlib
    import dataclasses

    from moe.config import load_config
    from moe.datasets import load_source, source_of

    config = load_config(args.config, args.overrides)
    shard_changes = {}
    if args.shards is not None:
        shard_changes["local"] = args.shards
    if args.placement is not None:
        shard_changes["placement"] = args.placement
    if args.out is None:
        if args.resume:
            raise UserError("--resume needs --out (the run folder to continue)")
        import time

        args.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out)
    if args.resume:
        found = ckpt.list_checkpoints(out / "checkpoints")
        if not found:
            raise UserError(f"--resume: no checkpoint under {str(out / 'checkpoints')!r}")
        manifest = ckpt.read_manifest(found[-1])
        if manifest.get("resumable") is False:
            raise UserError(f"{str(found[-1])!r} was written by add-task; it cannot resume training")
        from moe.config import Config

        saved = Config.from_dict(manifest["config"])
        if args.config is None and not args.overrides:
            config = saved
        elif (config.model, config.data) != (saved.model, saved.data):
            raise UserError("--resume: the [model] and [data] settings must match the checkpoint's "
                            "(only [train] and [shards] settings may change)")
        source = manifest["data_source"]
    else:
        if ckpt.list_checkpoints(out / "checkpoints"):
            raise UserError(f"{str(out)!r} already holds checkpoints; pass --resume or choose another --out")
        source = source_of(config.data)
    if shard_changes:
        config = dataclasses.replace(config, shards=dataclasses.replace(config.shards, **shard_changes))
    if args.progress is False:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
    data = load_source(source)
    where = "in this process"
    if config.shards.enabled:
        where = f"on {config.shards.local or len(config.shards.endpoints)} shard(s)"
    say(args, f"moe train: {len(data)} tasks, E={config.model.n_experts} experts ({where}), k={config.model.k}, "
              f"{config.model.n_layers} MoE block(s), {config.train.steps} steps -> {out}")
    if args.backend == "jax":
        if config.shards.enabled:
            raise UserError("--backend jax places experts on JAX devices; it does not use shard servers")
        try:
            from moe.accel.jax_train import train_with_jax
        except ImportError as e:
            raise UserError(f"--backend jax needs JAX: pip install 'moe[accel]' ({e})") from None
        result, trainer = train_with_jax(config, data, out, data_source=source, resume=args.resume,
                                         stop_at=args.stop_at, echo=lambda m: say(args, m))
        if result.step < config.train.steps:
            say(args, f"stopped at step {result.step} of {config.train.steps}; checkpoint {result.checkpoint}")
            emit_json(args, {"step": result.step, "checkpoint": str(result.checkpoint)})
            return 0
        return _report_training(args, config, data, result, trainer.model, None)
    if not config.shards.enabled:
        return _train_and_report(args, config, data, source, out, None, None)
    from moe.sharding.coordinator import open_expert_groups

    with contextlib.ExitStack() as stack:
        groups, on_failure = stack.enter_context(open_expert_groups(config, out, echo=lambda m: say(args, m)))
        return _train_and_report(args, config, data, source, out, groups, on_failure)


def _train_and_report(args, config, data, source, out, groups, on_failure) -> int:
    from moe.train import Trainer

    trainer = Trainer(config, data, out, data_source=source, expert_groups=groups, on_failure=on_failure,
                      echo=lambda m: say(args, m))
    result = trainer.train(resume=args.resume, stop_at=args.stop_at)
    if result.step < config.train.steps:
        say(args, f"stopped at step {result.step} of {config.train.steps}; checkpoint {result.checkpoint}")
        emit_json(args, {"step": result.step, "checkpoint": str(result.checkpoint)})
        return 0
    return _report_training(args, config, data, result, trainer.model, trainer.recovering)


def _report_training(args, config, data, result, model, recovering) -> int:
    """Baselines, profile, the table and the JSON summary after a finished run. `recovering`
    (Trainer.recovering, for experts on shards) repairs and repeats the profile after a failure."""
    from moe.baseline import train_baseline
    from moe.profile_model import balance_summary, collect_profile, write_profile

    out = Path(args.out)
    baselines: dict[str, float | None] = {d.name: None for d in data}
    if config.train.baseline:
        say(args, "training the per-task dense baselines on the same budget ...")
        for d in data:
            baselines[d.name] = train_baseline(config, d, result.seen[d.name])[d.spec.metric]
    def route():
        return collect_profile(model, data, split="train", batch_size=config.train.batch_size)

    profile = route() if recovering is None else recovering(route, "profile")
    files = write_profile(profile, out / "profile")
    balance = balance_summary(profile)
    rows = [(d.name, d.spec.metric, result.test[d.name][d.spec.metric], baselines[d.name]) for d in data]
    c = config.model
    say(args, "", "test metrics (one MoE model for all tasks vs one dense model per task):", score_table(rows), "",
        balance_lines(balance),
        f"active expert parameters per example: {c.k}/{c.n_experts} = {100 * c.k / c.n_experts:.1f}% "
        f"(per block)",
        f"checkpoint: {result.checkpoint}", f"profile: {files['json']}",
        f"train time {result.seconds:.1f}s")
    emit_json(args, {
        "tasks": {n: {"metric": m, "score": s, "baseline": b} for n, m, s, b in rows},
        "balance": balance, "checkpoint": str(result.checkpoint),
        "active_expert_fraction": c.k / c.n_experts, "profile": files["json"],
    })
    return 0


# ----------------------------------------------------------------------------- eval
def _model_and_data(args):
    from moe.api import load
    from moe.datasets import load_source
    from moe.tasks.userdata import load_task_file

    model = load(args.checkpoint)
    if args.data:
        data = load_task_file(args.data)
        unknown = [d.name for d in data if d.name not in model.tasks]
        if unknown:
            raise UserError(f"task(s) {unknown} in {args.data!r} are not in the checkpoint; it has {list(model.tasks.names)}")
    else:
        data = load_source(model.manifest["data_source"])
    return model, data


def cmd_eval(args) -> int:
    from moe.profile_model import balance_summary, collect_profile
    from moe.train import evaluate_tasks

    model, data = _model_and_data(args)
    scores = evaluate_tasks(model, data, "test")
    rows = [(d.name, d.spec.metric, scores[d.name][d.spec.metric], None) for d in data]
    balance = balance_summary(collect_profile(model, data, split="test", noise_seed=None))
    say(args, score_table(rows), "", balance_lines(balance) + "  (test split, no noise)")
    emit_json(args, {"tasks": {n: {"metric": m, "score": s, "baseline": None} for n, m, s, _ in rows},
                     "balance": balance, "checkpoint": str(ckpt.resolve(args.checkpoint))})
    return 0


# ----------------------------------------------------------------------------- add-task
def cmd_add_task(args) -> int:
    from moe.api import load, save_model
    from moe.config import Config
    from moe.datasets import load_added
    from moe.transfer import add_task, with_added_record

    model = load(args.checkpoint)
    manifest = model.manifest
    if args.data is None:  # the built-in held-out task
        record = {"heldout": True, "name": "digits_ge5", "seed": manifest["data_source"].get("builtin", {}).get("seed", 0)
                  if manifest["data_source"].get("builtin") else 0}
        if args.name not in (None, "digits_ge5"):
            raise UserError("without --data, add-task adds the built-in held-out task 'digits_ge5'")
    else:
        if not args.name or not args.target:
            raise UserError("add-task with --data needs --name and --target")
        record = {"name": args.name, "path": str(Path(args.data).resolve()), "target": args.target,
                  "kind": args.kind, "features": args.features.split(",") if args.features else None,
                  "seed": args.seed}
    task = load_added(record)
    config = Config.from_dict(manifest["config"])
    rng = np.random.default_rng(args.seed)
    res = add_task(model, config, task, shots=args.shots, rng=rng, grow_experts=args.grow_experts,
                   init_from=args.init_from, head_hidden=args.head_hidden)
    import dataclasses

    new_config = dataclasses.replace(config, model=model.config)
    out = Path(args.out) if args.out else ckpt.resolve(args.checkpoint).parent.parent / f"add-{task.name}"
    source = with_added_record(manifest["data_source"], record)
    where = save_model(out / "checkpoints", int(manifest["step"]), model, new_config,
                       {"data_source": source, "added_from": str(ckpt.resolve(args.checkpoint))})
    say(args, f"added task {task.name!r} from {res.shots} examples (adapter started from {res.init_from!r}, "
              f"best after {res.epochs} epochs)",
        f"{'':18s} {'metric':9s} {'moe+task':>9s} {'scratch':>9s} {'delta':>7s}",
        f"{task.name:18s} {res.metric:9s} {res.score:9.3f} {res.scratch_score:9.3f} {res.score - res.scratch_score:+7.3f}",
        f"checkpoint: {where}")
    emit_json(args, {"task": task.name, "metric": res.metric, "score": res.score,
                     "scratch_score": res.scratch_score, "shots": res.shots, "checkpoint": str(where)})
    return 0


# ----------------------------------------------------------------------------- profile
def cmd_profile(args) -> int:
    from moe.profile_model import collect_profile, write_profile
    from moe.profiling.report import format_summary

    model, data = _model_and_data(args)
    noise = None if args.no_noise else args.seed
    profile = collect_profile(model, data, split=args.split, noise_seed=noise)
    files = write_profile(profile, Path(args.out))
    summary = profile.summary()
    h = summary["headline"]
    say(args, format_summary(summary), "", *(f"{k}: {v}" for k, v in files.items()))
    emit_json(args, {"cv_importance": h["cv_importance"], "cv_load": h["cv_load"],
                     "max_mean_load": h["max_mean_load"], "drop_rate": h["drop_rate"],
                     "dead_experts": h["dead_experts"], "files": files})
    return 0


# ----------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from moe.accel.plan_cli import cmd_plan as plan_layout

    out = plan_layout(args)
    say(args, out["text"])
    r = out["result"]
    best = r.best
    emit_json(args, {
        "target": args.target,
        "best": None if best is None else {
            "ep": best.ep, "dp": best.dp, "tokens_per_device": best.tokens_per_device,
            "capacity_factor": best.shape.capacity_factor, "step_time_s": best.step_time, "mfu": best.mfu,
            "memory_per_device_bytes": best.memory_total},
        "candidates": r.n_candidates, "rejected": r.n_rejected,
    })
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe", description=(
        "One sparse mixture-of-experts model across many tasks. "
        "Run `moe train` with no arguments to train the built-in benchmark."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one MoE model on many tasks", description=(
        "Train on the built-in benchmark (scikit-learn's bundled datasets and a generated task family) "
        "and/or a TOML task file. Prints per-task test metrics next to per-task dense baselines, writes "
        "checkpoints, a metrics log (metrics.jsonl) and a load-balance profile under --out. Config keys "
        "can be overridden as key=value, e.g. model.n_experts=32 steps=500 gate=top1 k=1."))
    t.add_argument("--config", help="TOML file with [model], [train], [data] tables")
    t.add_argument("--out", default=None, help="run folder (default: a new runs/YYYYmmdd-HHMMSS)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop (with a checkpoint) after this step, e.g. to resume later")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    t.add_argument("--shards", type=int, default=None, metavar="N",
                   help="run the experts in N local shard processes (ipc; shards.transport=tcp for loopback tcp)")
    t.add_argument("--placement", help="expert -> shard placement JSON (written by the profiler); default contiguous")
    t.add_argument("--backend", choices=["numpy", "jax"], default="numpy",
                   help="numpy (this process, Cython kernels) or jax (XLA on whatever JAX devices exist)")
    t.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-task test metrics of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint folder, or a run folder (newest checkpoint)")
    e.add_argument("--data", help="TOML task file to evaluate instead of the checkpoint's own tasks")
    e.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("add-task", help="add a new task from a few examples (frozen trunk)", description=(
        "Learn a new task's adapter, task embedding and head (and optionally fresh experts) with the "
        "shared experts and routers frozen, early-stopped on a held-out part of the few examples, and "
        "compare with a dense model trained from scratch on the same examples. Without --data this adds "
        "the built-in held-out task digits_ge5 ('is the digit >= 5')."))
    a.add_argument("checkpoint")
    a.add_argument("--name", help="the new task's name")
    a.add_argument("--data", help="CSV or NPZ file with the new task's examples")
    a.add_argument("--target", help="target column")
    a.add_argument("--features", help="comma-separated feature columns (default: all but the target)")
    a.add_argument("--kind", choices=["multiclass", "binary", "multilabel", "regression"],
                   help="task kind (default: inferred from the target)")
    a.add_argument("--shots", type=int, default=10, help="examples per class (or in total for regression); default 10")
    a.add_argument("--grow-experts", type=int, default=0, metavar="M", help="add M fresh experts only this task trains")
    a.add_argument("--init-from", help="existing task whose adapter starts the new one (default: first with the same input width)")
    a.add_argument("--head-hidden", type=int, default=64, metavar="H",
                   help="hidden width of the new task's MLP head (0: a linear head); default 64")
    a.add_argument("--seed", type=int, default=0, help="seed for shot selection and new weights")
    a.add_argument("--out", help="run folder for the new checkpoint (default: next to the source run)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_add_task)

    pr = sub.add_parser("profile", help="load-balance profile of a checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("--data", help="TOML task file to route instead of the checkpoint's own tasks")
    pr.add_argument("--out", required=True, help="folder for profile.json and the PNGs")
    pr.add_argument("--split", default="train", choices=["train", "val", "test"])
    pr.add_argument("--no-noise", action="store_true", help="route without gate noise (hard counts)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the gate noise")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="lay the model out on an accelerator pod (cost model + planner)", description=(
        "Enumerate expert-parallel x data-parallel layouts, per-device batches and capacity factors on a "
        "target (e.g. tpu-v2-pod, tpu-v4-slice), reject layouts that do not fit in HBM (saying by how much), "
        "rank the rest by predicted step time. With --profile (a profile.json from `moe profile`), place "
        "experts on devices by measured load (LPT) and report max/mean device load before and after."))
    pl.add_argument("--target", required=True, help="pod or device name (see the error for the list)")
    pl.add_argument("--config", help="training config TOML (default: the built-in defaults)")
    pl.add_argument("--profile", help="profile.json from `moe profile`")
    pl.add_argument("--tokens", type=int, default=1 << 20, help="global examples per step (default 1,048,576)")
    pl.add_argument("--capacity-factors", default="1.0,1.25,1.5,2.0",
                    help="comma list to try; 'none' means dropless")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    pl.set_defaults(func=cmd_plan)

    from moe.sharding.cli import register as register_sharding

    register_sharding(sub)  # `moe shard serve`, `moe keys generate`
    return p


EXIT_USER_ERROR = 2  # a mistake in what was asked (also: shards that cannot be started or reached)
EXIT_GAVE_UP = 3  # experts failed more than shards.max_failures times within shards.failure_window_s


def main(argv: list[str] | None = None) -> int:
    from moe.train import TooManyFailures

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TooManyFailures as e:
        print(f"moe {args.command}: gave up: {e}", file=sys.stderr)
        return EXIT_GAVE_UP
    except KeyboardInterrupt:
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
