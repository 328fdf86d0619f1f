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
MAX_TASK_ROWS = 40  # more tasks than this: the group table on screen, every task in summary.json
def score_table(rows: list[tuple[str, str, float, float | None]], right: str = "dense baseline") -> str:
    """Per-task scores; the `right` column (and the delta) only when some row has a value."""
    with_right = any(r[3] is not None for r in rows)
    lines = [f"{'task':18s} {'metric':9s} {'moe':>7s}" + (f" {right:>15s} {'delta':>7s}" if with_right else "")]
    for name, metric, score, base in rows:
        line = f"{name:18s} {metric:9s} {score:7.3f}"
        if with_right:
            b = f"{base:15.3f}" if base is not None else f"{'-':>15s}"
            d = f"{score - base:+7.3f}" if base is not None else f"{'':>7s}"
            line += f" {b} {d}"
        lines.append(line)
    scores = [r[2] for r in rows]
    bases = [r[3] for r in rows if r[3] is not None]
    mean = f"{'mean':18s} {'':9s} {np.mean(scores):7.3f}"
    if with_right and len(bases) == len(rows):
        mean += f" {np.mean(bases):15.3f}"
    lines.append(mean)
    return "\n".join(lines)


def balance_lines(b: dict[str, Any], what: str = "load balance") -> str:
    """One line of balance figures that says what they were measured on."""
    from moe.profiling.report import routing_words

    return (f"{what} ({routing_words(b)}): CV(importance) {b['cv_importance']:.3f}  CV(load) {b['cv_load']:.3f}  "
            f"max/mean load {b['max_mean_load']:.2f}  drop rate {b['drop_rate']:.3f}")


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    import contextlib
    import dataclasses

    from moe.accel.train_cli import launch
    from moe.config import load_config
    from moe.datasets import load_source, source_of

    rc = launch(args)  # --processes / --coordinator: this process starts and watches the workers
    if rc is not None:
        return rc
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
            raise UserError(f"{str(found[-1])!r} is an inference-only checkpoint (no training state); "
                            "it cannot resume training")
        from moe.config import saved_config

        saved = saved_config(manifest["config"])
        if args.config is None:  # overrides (e.g. more steps) apply to the saved settings
            config = load_config(None, args.overrides, base=saved)
        if (config.model, config.data) != (saved.model, saved.data):
            raise UserError("--resume: the [model] and [data] settings must match the checkpoint's "
                            "(only [train] and [shards] settings may change)")
        source = manifest["data_source"]
        added = {"head_hidden": manifest.get("head_hidden") or None, "expert_owners": manifest.get("expert_owners") or None}
    else:
        if ckpt.list_checkpoints(out / "checkpoints"):
            raise UserError(f"{str(out)!r} already holds checkpoints; pass --resume or choose another --out")
        source = source_of(config.data)
        added = {}
    if shard_changes:
        config = dataclasses.replace(config, shards=dataclasses.replace(config.shards, **shard_changes))
    if args.progress is False:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
    data = load_source(source)
    where = "in this process"
    if config.shards.enabled:
        where = f"on {config.shards.local or len(config.shards.endpoints)} shard(s)"
    header = (f"moe train: {len(data)} tasks, E={config.model.n_experts} experts ({where}), k={config.model.k}, "
              f"{config.model.n_layers} MoE block(s), {config.train.steps} steps -> {out}")
    try:
        if args.backend == "jax":
            if config.shards.enabled:
                raise UserError("--backend jax places experts on JAX devices; it does not use shard servers")
            if any(added.values()):
                raise UserError("--backend jax cannot resume a model with tasks added by add-task yet; use --backend numpy")
            from moe.accel.train_cli import train as train_jax

            return train_jax(args, config, data, source, out, header, say=say, report=_finish_training)
        say(args, header)
        if not config.shards.enabled:
            return _train_and_report(args, config, data, source, out, None, None, added)
        from moe.sharding.coordinator import open_expert_groups

        with contextlib.ExitStack() as stack:
            groups, on_failure = stack.enter_context(open_expert_groups(config, out, echo=lambda m: say(args, m)))
            return _train_and_report(args, config, data, source, out, groups, on_failure, added)
    except KeyboardInterrupt:
        from moe.progress import close_open

        close_open()
        print(interrupted_message(out, config.train.steps, args.backend), file=sys.stderr, flush=True)
        return 130


def interrupted_message(out: Path, steps: int, backend: str = "numpy") -> str:
    """What Ctrl-C leaves behind, on lines of their own: the checkpoint kept and how to go on."""
    import shlex

    found = ckpt.list_checkpoints(out / "checkpoints")
    if not found:
        return ("moe train: interrupted before the first checkpoint was written; nothing was kept "
                "(run the same command again to start over)")
    step = int(ckpt.read_manifest(found[-1])["step"])
    command = f"moe train --out {shlex.quote(str(out))} --resume" + (" --backend jax" if backend == "jax" else "")
    return (f"moe train: interrupted; kept checkpoint {found[-1]} (step {step} of {steps})\n"
            f"resume with: {command}")


def _train_and_report(args, config, data, source, out, groups, on_failure, added) -> int:
    from moe.train import Trainer

    trainer = Trainer(config, data, out, data_source=source, expert_groups=groups, on_failure=on_failure,
                      echo=lambda m: say(args, m), restoring=args.resume, **added)
    result = trainer.train(resume=args.resume, stop_at=args.stop_at)
    return _finish_training(args, config, data, result, trainer.model, trainer.recovering)


def _finish_training(args, config, data, result, model, recovering=None) -> int:
    if result.step < config.train.steps:
        say(args, f"stopped at step {result.step} of {config.train.steps}; checkpoint {result.checkpoint}")
        emit_json(args, {"step": result.step, "checkpoint": str(result.checkpoint)})
        return 0
    return _report_training(args, config, data, result, model, recovering)


def _report_training(args, config, data, result, model, recovering=None) -> int:
    """Baselines, comparisons, profiles, the tables and the JSON summary after a finished run.
    `recovering` (Trainer.recovering, for experts on shards) repairs and repeats a phase that
    uses the experts after a failure."""
    from moe import compare
    from moe.baseline import train_baseline
    from moe.profile_model import balance_summary, collect_profile, shard_placement, write_profile
    from moe.progress import Progress

    out = Path(args.out)
    baselines: dict[str, float | None] = {d.name: None for d in data}
    if config.train.baseline != "none":
        say(args, "training the per-task dense baselines on the same budget ...")
        with Progress(len(data), "dense baselines", unit="tasks", enabled=config.train.progress) as bar:
            for d in data:
                bar.set_postfix(task=d.name)
                baselines[d.name] = train_baseline(config, d, result.seen[d.name])[d.spec.metric]
                bar.update(1)

    def guarded(phase: str, fn):
        return fn() if recovering is None else recovering(fn, phase)

    compared = guarded("compare", lambda: compare.after_training(
        config, data, model, result.test, baselines if config.train.baseline != "none" else None,
        echo=lambda m: say(args, m)))
    about = {"checkpoint": str(result.checkpoint), "step": result.step}
    t = config.train  # profile the routing the model trained with
    profile = guarded("profile", lambda: collect_profile(
        model, data, split="train", batch_size=t.batch_size, progress=t.progress, about=about, routing=t.routing,
        balance_factor=t.balanced_factor, noise_seed=None if t.routing == "balanced" else 0))
    placement, note = shard_placement(config.shards, model.config.n_experts)
    files = write_profile(profile, out / "profile", placement=placement)
    balance = balance_summary(profile)
    inference = balance_summary(guarded("profile", lambda: collect_profile(
        model, data, split="test", noise_seed=None, batch_size=config.train.batch_size)))
    rows = [(d.name, d.spec.metric, result.test[d.name][d.spec.metric], baselines[d.name]) for d in data]
    c = config.model
    summary = {
        "tasks": {n: {"metric": m, "score": s, "baseline": b} for n, m, s, b in rows},
        "compared": compared["columns"], "groups": {m: compare.by_group(v) for m, v in compared["columns"].items()},
        "specialisation": compared["specialisation"], "inference_routing": compared["inference"],
        "balance": balance, "balance_inference": inference, "checkpoint": str(result.checkpoint),
        "active_expert_fraction": c.k / c.n_experts, "profile": files["json"],
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, sort_keys=True))
    tmp.replace(summary_path)
    if len(rows) <= MAX_TASK_ROWS:
        table = ["test metrics (one MoE model for all tasks vs one dense model per task):", score_table(rows)]
    else:
        table = [f"{len(rows)} tasks: every task's figures are in {summary_path}"]
    say(args, "", *table, "",
        "mean test score by task group (primary metric of each task):", compare.group_table(compared["columns"]), "",
        *compare.specialisation_lines(compared["specialisation"]),
        *compare.inference_lines(compared["inference"]), "",
        balance_lines(balance, "load balance while training"),
        balance_lines(inference, "load balance at inference"),
        *([note] if note else []),
        f"active expert parameters per example: {c.k}/{c.n_experts} = {100 * c.k / c.n_experts:.1f}% "
        f"(per block)",
        f"checkpoint: {result.checkpoint}", f"profile: {files['html']}", f"summary: {summary_path}",
        f"train time {result.seconds:.1f}s")
    emit_json(args, summary)
    return 0


# ----------------------------------------------------------------------------- eval
def _model_and_data(args):
    """The checkpoint's model and the tasks to run it on: --data in any of its forms, or the
    tasks the checkpoint was trained on."""
    from moe.api import load
    from moe.datasets import load_source

    model = load(args.checkpoint)
    if args.data:
        data = load_user_data(args)
        unknown = [d.name for d in data if d.name not in model.tasks]
        if unknown:
            raise UserError(f"task(s) {unknown} in {args.data!r} are not in the checkpoint; it has "
                            f"{list(model.tasks.names)} (for a table, --name says which task it is)")
        for d in data:
            check_same_task(d.spec, model.tasks.spec(d.name), args.data)
    else:
        given = [f for f in ("target", "name", "features", "kind") if getattr(args, f, None)]
        if given:
            raise UserError(f"--{given[0]} describes a --data table; without --data the checkpoint's own tasks are used")
        data = load_source(model.manifest["data_source"])
    return model, data


def table_options(args) -> dict[str, Any]:
    """The options that describe a --data table (--target, --name, --features, --kind)."""
    return {"target": args.target, "name": args.name, "kind": args.kind,
            "features": args.features.split(",") if args.features else None}


def load_user_data(args):
    """The tasks `--data` names (rows of a table split with seed 0, as `moe train` does)."""
    from moe.tasks.userdata import load_data

    return load_data(args.data, **table_options(args))


def check_same_task(got, want, where: str) -> None:
    """A task read from --data must be the task the checkpoint learned: same kind, widths, classes."""
    for field in ("kind", "n_inputs", "n_outputs"):
        if getattr(got, field) != getattr(want, field):
            raise UserError(f"task {got.name!r} from {where!r} has {field} {getattr(got, field)!r}, the "
                            f"checkpoint's task {getattr(want, field)!r}")
    if want.classes is not None and got.classes != want.classes:
        raise UserError(f"task {got.name!r} from {where!r} has class labels {list(got.classes or [])!r:.200}, "
                        f"the checkpoint's {list(want.classes)!r:.200}")
    if want.classes is None and any(isinstance(c, str) for c in got.classes or ()):
        # numbers map to class ids in sorted order as in training; text labels could mean any id
        raise UserError(f"task {got.name!r} from {where!r} has text class labels {list(got.classes)!r:.200}; "
                        "the checkpoint's task learned class ids without labels, so which label is which "
                        "class is unknown (give the class ids, 0 to n-1, as numbers)")


def class_lines(model, data) -> list[str]:
    """'class labels of wine: 0=barbera, 1=barolo, ...' for each task whose spec carries labels."""
    lines = []
    for d in data:
        classes = model.tasks.spec(d.name).classes
        if classes is None:
            continue
        shown = ", ".join(f"{i}={c}" for i, c in enumerate(classes[:12]))
        lines.append(f"class labels of {d.name}: {shown}" + (f", ... ({len(classes)} in all)" if len(classes) > 12 else ""))
    return lines


def cmd_eval(args) -> int:
    from moe.inference import drop_rates, predict_mixed
    from moe.profile_model import balance_summary, collect_profile
    from moe.train import evaluate_tasks

    model, data = _model_and_data(args)
    extra: list[str] = []
    if args.routing == "balanced":  # balanced assignment depends on the batch: mixed test batches of 256
        res = predict_mixed(model, data, "test", batch_size=256, routing="balanced", rng=np.random.default_rng(0))
        scores = res.metrics
        drops = drop_rates(res, model.config.n_experts)
        extra = [f"balanced routing in mixed test batches of 256: busiest expert {res.median_max_mean:.2f}x the "
                 f"mean (worst full batch {res.worst_max_mean:.2f}x); share over capacity "
                 + ", ".join(f"cf {cf}: {r:.3f}" for cf, r in drops.items())]
    else:
        scores = evaluate_tasks(model, data, "test")
    rows = [(d.name, d.spec.metric, scores[d.name][d.spec.metric], None) for d in data]
    balance = balance_summary(collect_profile(model, data, split="test", noise_seed=None, routing=args.routing))
    labels = class_lines(model, data)
    say(args, score_table(rows), "", balance_lines(balance), *extra, *([""] + labels if labels else []))
    tasks = {}
    for n, m, s, _ in rows:
        tasks[n] = {"metric": m, "score": s}
        if model.tasks.spec(n).classes is not None:
            tasks[n]["classes"] = list(model.tasks.spec(n).classes)
    emit_json(args, {"tasks": tasks, "balance": balance, "routing": args.routing,
                     "checkpoint": str(ckpt.resolve(args.checkpoint))})
    return 0


# ----------------------------------------------------------------------------- add-task
def _added_record(args, manifest) -> dict[str, Any]:
    """The data-source record of the task to add (stored in the new checkpoint, so eval and
    profile rebuild it): the built-in held-out task, or the one task --data names."""
    from moe.tasks.userdata import data_entries

    if args.data is None:
        given = [f for f in ("target", "features", "kind") if getattr(args, f)]
        if given or args.name not in (None, "digits_ge5"):
            raise UserError("without --data, add-task adds the built-in held-out task 'digits_ge5'; "
                            "give --data for your own task")
        builtin = manifest["data_source"].get("builtin")
        return {"heldout": True, "name": "digits_ge5", "seed": builtin.get("seed", 0) if builtin else 0}
    entries = data_entries(args.data, seed=args.seed, **table_options(args))
    if len(entries) > 1:
        raise UserError(f"{args.data!r} lists {len(entries)} tasks {[e['name'] for e in entries]}; "
                        "add-task adds one: pick it with --name")
    e = entries[0]
    return {**e, "path": str(Path(e["path"]).resolve())}


def cmd_add_task(args) -> int:
    from moe.added import new_run_folder, save_added
    from moe.api import load
    from moe.config import saved_config
    from moe.datasets import load_added, load_source
    from moe.progress import Progress
    from moe.transfer import add_task, result_record, shots_short, with_added_record

    model = load(args.checkpoint)
    manifest = model.manifest
    record = _added_record(args, manifest)
    if record["name"] in model.tasks:
        raise UserError(f"task {record['name']!r} is already in the model")
    grow = args.grow_experts
    if grow != "auto":
        try:
            grow = int(grow)
        except ValueError:
            raise UserError(f"--grow-experts must be a number >= 0 or 'auto', got {grow!r}") from None
    source_ckpt = ckpt.resolve(args.checkpoint)
    out, where_said = new_run_folder(source_ckpt.parent.parent / f"add-{record['name']}",
                                     Path(args.out) if args.out else None)
    task = load_added(record)
    short = shots_short(task, args.shots)
    if short:
        held = (f"{short['in total']} in total" if "in total" in short
                else "class " + ", ".join(f"{k!r}: {v}" for k, v in short.items()))
        say(args, f"note: --shots {args.shots} asks for more examples than the train split of {task.name!r} "
                  f"holds ({held}); all of those are used")
    config = saved_config(manifest["config"])
    rng = np.random.default_rng(args.seed)
    with Progress(2, f"add-task {task.name} (the new task, then from scratch)", unit="fits",
                  enabled=args.progress) as bar:
        res = add_task(model, config, task, shots=args.shots, rng=rng, grow_experts=grow,
                       grow_start=args.grow_start, init_from=args.init_from, head_hidden=args.head_hidden,
                       adapter=args.adapter, progress=bar)
    record = result_record(record, res)
    source = with_added_record(manifest["data_source"], record)
    where, resumable = save_added(out, source_ckpt, model, config, load_source(source), source)
    best = sorted(res.similarity.items(), key=lambda kv: kv[1])[:3]
    say(args, f"added task {task.name!r} from {res.shots} examples; {res.params_added:,} parameters added",
        f"start: {res.init_from or 'fresh'} (lowest leave-one-out probe error on the shots among "
        f"{len(res.similarity)} candidates: " + ", ".join(f"{n} {v:.3f}" for n, v in best) + ")",
        f"encoder: {res.adapter} ({res.adapter_why})",
        f"epochs: {res.epochs} ({res.stop_rule})",
        f"growth: {res.growth}" + (f"; {100 * res.grown_share:.1f}% of its test assignments on grown experts"
                                   if res.grown_share is not None else ""),
        f"{'':18s} {'metric':9s} {'moe+task':>9s} {'scratch':>9s} {'delta':>7s}",
        f"{task.name:18s} {res.metric:9s} {res.score:9.3f} {res.scratch_score:9.3f} {res.score - res.scratch_score:+7.3f}",
        *class_lines(model, [task]),
        f"{where_said}; checkpoint: {where} "
        + ("(resumable: moe train --resume --out " + str(out) + " continues joint training)" if resumable
           else "(inference only: the source checkpoint has no training state)"))
    emit_json(args, {"task": task.name, "metric": res.metric, "score": res.score,
                     "scratch_score": res.scratch_score, "shots": res.shots, "shots_short": short,
                     "checkpoint": str(where), "resumable": resumable, "start": res.init_from,
                     "similarity": res.similarity, "epochs": res.epochs, "stop_rule": res.stop_rule,
                     "growth": res.growth, "grown": res.grown, "grown_share": res.grown_share,
                     "adapter": res.adapter, "adapter_why": res.adapter_why,
                     "params_added": res.params_added})
    return 0


# ----------------------------------------------------------------------------- profile
def cmd_profile(args) -> int:
    from moe.config import Config, ShardConfig
    from moe.profile_model import balance_summary, collect_profile, shard_placement, write_profile
    from moe.profiling.report import format_summary

    model, data = _model_and_data(args)
    noise = None if args.no_noise else args.seed
    if args.routing == "balanced" and not args.no_noise:
        raise UserError("--routing balanced routes as at inference; add --no-noise")
    shards = Config.from_dict(model.manifest["config"]).shards
    if args.shards is not None or args.placement is not None:  # what-if: another layout
        shards = ShardConfig(local=args.shards or 0, placement=args.placement)
    placement, note = shard_placement(shards, model.config.n_experts)
    if note and args.placement is not None:
        raise UserError(note.removeprefix("no load-per-shard view: "))
    about = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "step": int(model.manifest["step"])}
    profile = collect_profile(model, data, split=args.split, noise_seed=noise, progress=args.progress, about=about,
                              routing=args.routing)
    files = write_profile(profile, Path(args.out), placement=placement)
    summary = profile.summary()
    h = summary["headline"]
    say(args, format_summary(summary), *([note] if note else []), "", *(f"{k}: {v}" for k, v in files.items()))
    emit_json(args, {**balance_summary(profile), "dead_experts": h["dead_experts"], "files": files})
    return 0


# ----------------------------------------------------------------------------- plan
PLANNER_OPTIONS = ("max_drop_rate", "tokens_per_device", "capacity_factors", "tokens", "top", "profile", "target")


def cmd_plan(args) -> int:
    from moe.accel.plan_cli import cmd_plan as plan_layout

    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip().replace("-", "_") in PLANNER_OPTIONS:
            flag = "--" + key.strip().replace("_", "-")
            raise UserError(f"{key.strip()} is a planner option, not a config key: pass {flag} {value}".rstrip())
    if args.max_drop_rate is not None and not 0.0 <= args.max_drop_rate <= 1.0:
        raise UserError(f"--max-drop-rate must be a fraction in [0, 1], got {args.max_drop_rate}")
    if args.tokens_per_device is not None and not all(t.strip().isdigit() for t in args.tokens_per_device.split(",")):
        raise UserError(f"--tokens-per-device must be a comma list of whole numbers, got {args.tokens_per_device!r}")
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
        "plan": None if out["layout"] is None else {"path": str(args.out), **out["layout"].to_dict()},
    })
    return 0 if best is not None else 1  # no layout fits: a result, not a usage error


# ----------------------------------------------------------------------------- parser
def add_data_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--data and its table options, the same in eval, profile and add-task."""
    from moe.tasks.spec import TASK_KINDS
    from moe.tasks.userdata import DATA_FORMS

    p.add_argument("--data", metavar="FILE", help=f"{what}: {DATA_FORMS}")
    p.add_argument("--target", metavar="COLUMN", help="the target column of a --data table")
    p.add_argument("--name", help="the task's name for a --data table (default: the file name without its "
                                  "suffix); with a TOML file, the one task of it to use")
    p.add_argument("--features", metavar="COL,COL", help="feature columns of a --data table "
                                                        "(default: every column but the target)")
    p.add_argument("--kind", choices=TASK_KINDS, help="task kind of a --data table (default: inferred from the "
                                                      "target; text labels are classes)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the final summary as one JSON object on stdout (the rest goes to stderr)")


def _routing_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", default="topk", choices=["topk", "balanced"],
                   help="topk: each example's k best experts (default); balanced: capacity-bounded balanced "
                        "assignment (busiest expert <= 1.25x the mean in each batch), scored on mixed batches of 256")


def build_parser() -> argparse.ArgumentParser:
    from moe import __version__

    p = argparse.ArgumentParser(prog="moe", description=(
        "One sparse mixture-of-experts model across many tasks. "
        "Run `moe train` with no arguments to train the built-in benchmark."))
    p.add_argument("--version", action="version", version=f"moe {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one MoE model on many tasks", description=(
        "Train on the built-in benchmark (scikit-learn's bundled datasets and a generated task family) "
        "and/or a TOML task file. Prints per-task test metrics next to per-task dense baselines and the "
        "load balance while training and at inference; writes checkpoints, a metrics log (metrics.jsonl) "
        "and a load-balance report (profile/profile.html) under --out. Config keys can be overridden as "
        "key=value, e.g. model.n_experts=32 steps=500 gate=top1 k=1. Ctrl-C keeps the newest checkpoint "
        "and prints the command that resumes from it."))
    t.add_argument("--config", help="TOML file with [model], [train], [data] and [shards] tables")
    t.add_argument("--out", default=None, help="run folder (default: a new runs/YYYYmmdd-HHMMSS)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (bit-exact)")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop (with a checkpoint) after this step, e.g. to resume later")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress display (on a terminal a bar, otherwise a line every few seconds)")
    t.add_argument("--shards", type=int, default=None, metavar="N",
                   help="run the experts in N local shard processes (ipc; shards.transport=tcp for loopback tcp)")
    t.add_argument("--placement", help="expert -> shard placement JSON (written by the profiler); default contiguous")
    t.add_argument("--backend", choices=["numpy", "jax"], default="numpy",
                   help="numpy (this process, Cython kernels) or jax (XLA on whatever JAX devices exist)")
    t.add_argument("--plan", metavar="PLAN.json",
                   help="with --backend jax: run the layout `moe plan --out` wrote (EP x DP mesh, per-device "
                        "batch, capacity factor, expert placement); refused if the devices do not match")
    t.add_argument("--processes", type=int, default=None, metavar="N",
                   help="with --backend jax: start N processes on this machine over loopback (jax.distributed); "
                        "all stop when one fails")
    t.add_argument("--cpu-devices", type=int, default=None, metavar="D",
                   help="with --backend jax: simulate D XLA host devices per process (a mesh on a CPU, for testing)")
    t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --backend jax: join a multi-host run whose process 0 serves at HOST:PORT; "
                        "'auto' reads a TPU pod slice's or SLURM's environment")
    t.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="processes in the run (with --coordinator HOST:PORT)")
    t.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's id, 0..N-1 (with --coordinator HOST:PORT)")
    t.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                   help="with several processes: one silent this long counts as dead and the run stops (default 30)")
    t.add_argument("--worker", default=None, metavar="LOG", help=argparse.SUPPRESS)  # a launched process
    _json_flag(t)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=500")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-task test metrics of a checkpoint", description=(
        "Score a checkpoint on the test split of its own tasks (rebuilt from the data source it recorded) "
        "or of the tasks --data names, and report the load balance at inference (test split, no gate "
        "noise) and the class labels of tasks that have them."))
    e.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    add_data_arguments(e, "tasks to evaluate instead of the checkpoint's own")
    _routing_flag(e)
    _json_flag(e)
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("add-task", help="add a new task from a few examples (frozen trunk)", description=(
        "Learn a new task's routing (task embedding, and its own encoder for a new input space) and head, "
        "started from the existing task measured best on the shots, with every existing expert and task "
        "frozen; optionally grow experts only it uses. Compares with a dense model trained from scratch "
        "on the same examples. Writes a resumable checkpoint in a new folder (never over an earlier "
        "result). Without --data this adds the built-in held-out task digits_ge5 ('is the digit >= 5')."))
    a.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    add_data_arguments(a, "the new task")
    a.add_argument("--shots", type=int, default=10,
                   help="examples per class (or in total for regression) to learn from; default 10")
    a.add_argument("--grow-experts", default="0", metavar="M|auto",
                   help="add M experts only this task routes to; 'auto' grows only if that raises the "
                        "held-out score on the shots")
    a.add_argument("--grow-start", choices=("fresh", "clone"), default="fresh",
                   help="grown experts start with fresh weights (default) or as perturbed copies of the "
                        "task's most used experts; either way the task routes to them from the first step")
    a.add_argument("--adapter", choices=("auto", "shared", "own"), default="auto",
                   help="for a task of a domain the model knows: read through the domain's encoder "
                        "(shared), or train a copy of it for this task alone (own); 'auto' (default) "
                        "keeps the lower held-out loss on the shots (shared when fewer than 20 "
                        "examples can be held out)")
    a.add_argument("--init-from", help="existing task whose embedding (and encoder) starts the new one "
                                       "(default: the one measured best on the shots)")
    a.add_argument("--head-hidden", type=int, default=None, metavar="H",
                   help="hidden width of the new task's MLP head (0: a linear head); default 64, or linear "
                        "when a class has one example")
    a.add_argument("--seed", type=int, default=0, help="seed for shot selection, new weights and a table's split")
    a.add_argument("--out", help="run folder for the new checkpoint (default: add-NAME next to the source run, "
                                 "add-NAME.v2, ... when taken)")
    a.add_argument("--no-progress", dest="progress", action="store_false", help="no progress display")
    _json_flag(a)
    a.set_defaults(func=cmd_add_task)

    pr = sub.add_parser("profile", help="load-balance report of a checkpoint", description=(
        "Route one split of the data through a checkpoint and write how evenly the experts are loaded: "
        "profile.html (per block: load and importance per expert by id and sorted, the hottest and the "
        "dead experts, drops per capacity factor, load per shard, the task x expert heatmap and a "
        "per-task table), profile.json, profile_tasks.csv and the PNGs. By default the gates run as in "
        "training (gate noise on); --no-noise routes as at inference."))
    pr.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    add_data_arguments(pr, "tasks to route instead of the checkpoint's own")
    pr.add_argument("--out", required=True, help="folder for profile.html, profile.json, the CSV and the PNGs")
    pr.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split to route (default train)")
    pr.add_argument("--no-noise", action="store_true", help="route without gate noise, as at inference (hard counts)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the gate noise")
    _routing_flag(pr)
    pr.add_argument("--shards", type=int, default=None, metavar="N",
                    help="show load per shard for N shards of contiguous expert ids (default: the run's own shards)")
    pr.add_argument("--placement", metavar="FILE", help="show load per shard for this placement JSON")
    pr.add_argument("--no-progress", dest="progress", action="store_false", help="no progress display")
    _json_flag(pr)
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="lay the model out on an accelerator pod (cost model + planner)", description=(
        "Enumerate expert-parallel x data-parallel layouts, per-device batches and capacity factors on a "
        "target (e.g. tpu-v2-pod, tpu-v4-slice), reject layouts that do not fit in HBM (saying by how much), "
        "rank the rest by predicted step time. With --profile (a profile.json from `moe profile`), place "
        "experts on devices by measured load (LPT) and report max/mean device load before and after. "
        "Exits with status 1 when no layout fits."))
    pl.add_argument("--target", required=True, help="pod or device name (see the error for the list)")
    pl.add_argument("--config", help="training config TOML (default: the built-in defaults)")
    pl.add_argument("--profile", help="profile.json from `moe profile`")
    pl.add_argument("--tokens", type=int, default=1 << 20, help="global examples per step (default 1,048,576)")
    pl.add_argument("--capacity-factors", default="1.0,1.25,1.5,2.0",
                    help="comma list to try; 'none' means dropless")
    pl.add_argument("--tokens-per-device", metavar="T,T", default=None,
                    help="comma list of micro-batch sizes per device to try (default: the full share and its halvings)")
    pl.add_argument("--max-drop-rate", type=float, default=None, metavar="R",
                    help="leave out layouts expected to drop more than this fraction of assignments, e.g. 0.01 "
                         "(expected from the measured load with --profile, else from uniform routing)")
    pl.add_argument("--top", type=int, default=5, metavar="N", help="how many fitting layouts to list (default 5)")
    pl.add_argument("--out", metavar="PLAN.json",
                    help="write the best layout the JAX backend can run, for `moe train --backend jax --plan`")
    _json_flag(pl)
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_experts=2048")
    pl.set_defaults(func=cmd_plan)

    from moe.sharding.cli import register as register_sharding

    register_sharding(sub)  # `moe shard serve`, `moe keys generate`
    return p


EXIT_USER_ERROR = 2  # a mistake in what was asked (also: shards that cannot be started or reached)
EXIT_GAVE_UP = 3  # experts failed more than shards.max_failures times within shards.failure_window_s


def main(argv: list[str] | None = None) -> int:
    from moe.train import TooManyFailures

    args = build_parser().parse_args(argv)
    from moe.progress import close_open

    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher repeats to its workers
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        close_open()
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TooManyFailures as e:
        print(f"moe {args.command}: gave up: {e}", file=sys.stderr)
        return EXIT_GAVE_UP
    except KeyboardInterrupt:
        close_open()
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
