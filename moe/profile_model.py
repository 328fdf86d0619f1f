"""Run a model over data and collect every layer's Routing records into a load profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moe.config import ShardConfig
from moe.model import Chunk, MultiTaskMoE
from moe.profiling.placement import load_placement
from moe.profiling.report import write_report
from moe.profiling.stats import ModelProfile
from moe.progress import Progress
from moe.tasks.spec import TaskData


def mixed_batches(sizes: list[int], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(task position int64[b], example index int64[b]) per batch, mixing the tasks in
    proportion to their sizes: example i of a task of n sits at (i + 0.5) / n of the way
    through, as a proportional sampler would place it. Deterministic, no generator."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    task = np.concatenate([np.full(n, t, dtype=np.int64) for t, n in enumerate(sizes)])  # [N]
    index = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])  # [N]
    where = (index + 0.5) / np.repeat(np.asarray(sizes, dtype=np.float64), sizes)  # [N]
    order = np.argsort(where, kind="stable")  # ties: task order
    return [(task[order[i : i + batch_size]], index[order[i : i + batch_size]])
            for i in range(0, order.size, batch_size)]


def collect_profile(
    model: MultiTaskMoE,
    data: list[TaskData],
    *,
    split: str = "train",
    batch_size: int = 256,
    noise_seed: int | None = 0,
    progress: bool = False,
    about: dict[str, Any] | None = None,
    routing: str = "topk",
    balance_factor: float = 1.25,
) -> ModelProfile:
    """Route every example of `split` through the model and accumulate each block's decisions.

    Batches mix the tasks in proportion to their sizes, close to how training batches mix
    them (those are drawn by temperature sampling), so drops at a capacity factor are near
    what a training batch of this size would see; batches of one task would overstate them. With
    noise_seed set, the gates run as in training (noise on, Routing.load is the smooth
    estimator the balance loss sees) without updating anything; with None they run as at
    inference (no noise, load is the hard assignment count). The profile's context records
    all of this (plus `about`, e.g. the checkpoint and step), so every figure drawn from it
    can say what it measured. routing="balanced" routes with the capacity-bounded balanced
    assignment (moe.routing.balanced, ceil(balance_factor * B * k / E) seats per expert), by
    the clean logits: with a noisy gate it needs noise_seed=None.
    """
    if routing == "balanced" and noise_seed is not None and "noisy_topk" in model.config.gates:
        raise ValueError("balanced routing is an inference routing: profile it without gate noise (noise_seed=None)")
    names = list(model.tasks.names)
    splits = [d.split(split) for d in data]
    sizes = [x.shape[0] for x, _ in splits]
    c = model.config
    noisy = noise_seed is not None and "noisy_topk" in c.gates  # softmax top-k and top-1 have no noise
    context = {
        "split": split, "noise": noisy, "noise_seed": noise_seed if noisy else None,
        "tasks": len(data), "examples": int(sum(sizes)), "batch_size": batch_size, "batching": "mixed",
        "gates": list(c.gates), "k": c.k, "capacity_factor": c.capacity_factor, "routing": routing,
        **({"balance_factor": balance_factor} if routing == "balanced" else {}),
        **(about or {}),
    }
    profile = ModelProfile(len(names), names, context=context)
    rng = np.random.default_rng(noise_seed) if noise_seed is not None else None
    ids = np.array([model.tasks.id(d.name) for d in data], dtype=np.int64)  # [n_data]
    batches = mixed_batches(sizes, batch_size)
    with Progress(len(batches), f"profile ({split} split)", unit="batches", enabled=progress) as bar:
        for task, index in batches:
            chunks, rows = [], []
            for t in np.unique(task).tolist():  # one chunk per task present, in data order
                x = splits[t][0][index[task == t]]  # [n_t, d_in_t]
                chunks.append(Chunk(data[t].name, x))
                rows.append(np.full(x.shape[0], ids[t], dtype=np.int64))
            out = model.forward(chunks, train=rng is not None, rng=rng, routing=routing, grad=False,
                                balance_factor=balance_factor)
            task_ids = np.concatenate(rows)  # [b], in the model's row order (chunk by chunk)
            for layer, r in enumerate(out.routings):
                profile.add(f"block{layer}", r, task_ids)
            bar.update(1)
    return profile


def balance_summary(profile: ModelProfile) -> dict[str, Any]:
    """The headline numbers for --json output (worst layer), with the split and noise
    setting they were measured under."""
    s = profile.summary()
    h, ctx = s["headline"], s["context"]
    out: dict[str, Any] = {k: float(h[k]) for k in ("cv_importance", "cv_load", "max_mean_load", "drop_rate")}
    out.update(split=ctx.get("split"), noise=ctx.get("noise"), examples=int(h["examples"]))
    if ctx.get("routing") == "balanced":
        out.update(routing="balanced", balance_factor=ctx.get("balance_factor"))
    return out


def shard_placement(shards: ShardConfig, n_experts: int) -> tuple[dict[str, Any] | None, str | None]:
    """(placement for write_profile, or None; a note when the run's placement cannot be shown).

    The run's expert -> shard map: its placement file, or the contiguous ranges the shard
    launcher uses; None when the experts ran in one process.
    """
    n = shards.local or len(shards.endpoints)
    try:
        if shards.placement:
            a = load_placement(shards.placement, n_experts)
            source = f"placement file {shards.placement}"
        elif n:
            from moe.sharding.remote import contiguous_placement

            a, source = contiguous_placement(n_experts, n), f"contiguous expert ids over {n} shards"
        else:
            return None, None
    except (ValueError, OSError) as e:
        return None, f"no load-per-shard view: {e}"
    return {"assignment": np.asarray(a).tolist(), "label": "shard", "source": source}, None


def write_profile(profile: ModelProfile, out_dir: str | Path, *,
                  placement: dict[str, Any] | None = None) -> dict[str, str]:
    return write_report(profile, Path(out_dir), placement=placement)


def computed_profile(path: str | Path) -> dict[str, Any]:
    """profile.json without what names the run rather than what it computed: the checkpoint's
    path in its contexts, and the placement (a function of the loads and of the shard layout;
    an in-process run has none). Two runs that routed alike give equal dicts."""
    doc = json.loads(Path(path).read_text())
    doc.pop("placement", None)
    for context in (doc.get("context"), doc.get("summary", {}).get("context")):
        if isinstance(context, dict):
            context.pop("checkpoint", None)
    return doc
