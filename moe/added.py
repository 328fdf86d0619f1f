"""Checkpoints of a model that tasks were added to: resumable, never over an earlier result.

add-task writes a full training checkpoint (the same writer and integrity checks as
`moe train`'s), so `moe train --resume` continues joint training with the added tasks
included. Its optimizer state is the source run's, extended: the added task's table rows
and any grown experts and gate columns start with no moments and step count 0 (lazy Adam
counts steps per row), the source run's rows keep theirs bit for bit. The experts' Adam state
is read from the source's expert Adam files (an inference load of the model reads only the
weights). The data cursor is the
source's for the old tasks; an added task's examples (the shots, recorded by their train
rows in the data source) get a fresh order. A source checkpoint that is itself
inference-only (written by `save_model`) has no optimizer state to extend: the result is
then inference-only too, and says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from moe import checkpoint as ckpt
from moe.api import save_model
from moe.config import Config
from moe.experts import state
from moe.model import MultiTaskMoE
from moe.optim import Adam
from moe.tasks.spec import TaskData
from moe.train import Trainer


def new_run_folder(default: Path, explicit: Path | None) -> tuple[Path, str]:
    """Where the added-task run goes, and a sentence saying so. An explicit folder that holds
    checkpoints is refused; the default folder, when taken, becomes <name>.v2, .v3, ..."""
    if explicit is not None:
        if ckpt.list_checkpoints(explicit / "checkpoints"):
            raise ValueError(f"{str(explicit)!r} already holds checkpoints; add-task never overwrites a result "
                             f"(choose another --out, or leave --out out to get a new versioned folder)")
        return explicit, f"wrote {explicit}"
    if not ckpt.list_checkpoints(default / "checkpoints") and not default.exists():
        return default, f"wrote {default}"
    v = 2
    while (default.parent / f"{default.name}.v{v}").exists():
        v += 1
    out = default.parent / f"{default.name}.v{v}"
    return out, f"{default} exists (kept as it is); wrote the new result to {out}"


def _extend(dst: np.ndarray, src: np.ndarray, what: str) -> None:
    """Copy src into the leading corner of dst (rows, and gate columns, added after it)."""
    if src.ndim != dst.ndim or any(s > d for s, d in zip(src.shape, dst.shape, strict=True)) or src.dtype != dst.dtype:
        raise ckpt.CheckpointError(f"{what}: cannot extend {src.dtype}{list(src.shape)} to {dst.dtype}{list(dst.shape)}")
    dst[tuple(slice(0, s) for s in src.shape)] = src


def _extend_adam(opt: Adam, saved: dict[str, np.ndarray], prefix: str) -> None:
    if f"{prefix}t" not in saved:  # a table the added task created (a new head shape): fresh state
        return
    if opt.lazy_rows:  # rows added after the saved ones have no moments yet: step count 0
        t = saved[f"{prefix}t"]
        if t.ndim != 1 or t.shape[0] > opt.t.shape[0]:
            raise ckpt.CheckpointError(f"{prefix}t: cannot extend {list(t.shape)} rows to {opt.t.shape[0]}")
        keys = [f"{prefix}{k}.{n}" for n in opt.params for k in "mv"]
        grown = np.concatenate([t, np.zeros(opt.t.shape[0] - t.shape[0], dtype=t.dtype)])
        try:
            opt.load_state_dict({f"{prefix}t": grown, **{k: saved[k] for k in keys}}, prefix)
        except (KeyError, ValueError) as e:
            raise ckpt.CheckpointError(f"{prefix}: {e}") from None
        return
    _extend(opt.t, saved[f"{prefix}t"], f"{prefix}t")
    for n in opt.params:
        _extend(opt.m[n], saved[f"{prefix}m.{n}"], f"{prefix}m.{n}")
        _extend(opt.v[n], saved[f"{prefix}v.{n}"], f"{prefix}v.{n}")


def save_added(
    out: Path, source: str | Path, model: MultiTaskMoE, config: Config, data: list[TaskData],
    data_source: dict[str, Any],
) -> tuple[Path, bool]:
    """Write `model` (source's model plus added tasks) under out/checkpoints; return (the
    checkpoint, whether it is resumable). data: every task, in the model's registry order."""
    manifest, files, where = ckpt.load_checkpoint(source)
    new_config = dataclasses.replace(config, model=model.config)
    if (model.expert_owner >= 0).any():  # balanced seats would open grown experts to other tasks
        new_config = dataclasses.replace(new_config, train=dataclasses.replace(new_config.train, balanced_share=0.0))
    if manifest.get("resumable") is False or "data_cursor" not in manifest:
        extra = {"data_source": data_source, "added_from": str(ckpt.resolve(source))}
        return save_model(out / "checkpoints", int(manifest["step"]), model, new_config, extra), False
    if [d.name for d in data] != list(model.tasks.names):
        raise ValueError("save_added: data must hold the model's tasks in registry order")
    trainer = Trainer(new_config, data, out, data_source=data_source, head_hidden=model.head_hidden,
                      expert_owners=model.expert_owners(), echo=lambda _: None, restoring=True)
    for n in trainer.dense_names:
        trainer.model.params[n][...] = model.params[n]
    for i, (mine, theirs) in enumerate(zip(trainer.model.layers, model.layers, strict=True)):
        mine.set_experts(theirs.experts)
        # the source's expert Adam state; grown experts (absent from its files) have none
        state.load_adam(where, manifest["files"], i, np.arange(theirs.n_experts), theirs.experts.optimizer)
    optim = files["optim"]
    _extend_adam(trainer.optimizer, optim, "dense.")
    for name, opt in trainer.table_optimizers.items():
        _extend_adam(opt, optim, f"table.{name}.")
    s, old = trainer.sampler, int(optim["data.sizes"].shape[0])
    if not np.array_equal(optim["data.sizes"], s.sizes[:old]):
        raise ckpt.CheckpointError("the source checkpoint's data cursor does not match its tasks' training sets")
    s.order[: s.offsets[old]] = optim["data.order"]
    for arr, key in ((s.pos, "data.pos"), (s.epoch, "data.epoch"), (s.seen_counts, "data.seen")):
        arr[:old] = optim[key]
    s.rng.bit_generator.state = manifest["data_cursor"]["rng"]
    trainer.rng_init.bit_generator.state = manifest["rng"]["init"]
    trainer.rng_noise.bit_generator.state = manifest["rng"]["noise"]
    trainer.step = int(manifest["step"])
    return trainer.save(), True
