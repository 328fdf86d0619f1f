"""Loading and saving whole models outside the training loop: `moe.load`, `save_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe import checkpoint as ckpt
from moe.config import Config
from moe.experts import state
from moe.model import MultiTaskMoE
from moe.optim import Adam, AdamConfig, noise_scale_at
from moe.tasks.spec import TaskRegistry


def load(path: str | Path) -> MultiTaskMoE:
    """A MultiTaskMoE from a checkpoint folder (or a run folder: its newest checkpoint).

    Experts are loaded in this process whatever sharding wrote them. Only the weights are
    read (and verified): optimizer files stay unread, so a loaded model costs its weights.
    The manifest is kept on the model as `model.manifest`."""
    manifest, files, where = ckpt.load_checkpoint(path, optimizer=False)
    try:
        config = Config.from_dict(manifest["config"])
        tasks = TaskRegistry.from_dict(manifest["tasks"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"checkpoint {str(where)!r}: bad config or task registry ({e})") from None
    heads = {n: int(h) for n, h in manifest.get("head_hidden", {}).items()}
    model = MultiTaskMoE(config.model, tasks, rng=np.random.default_rng(0), head_hidden=heads)  # weights replaced below
    dense = {n: model.params[n] for n in model.dense_param_names()}
    ckpt.assign(dense, files["params"], f"checkpoint {str(where)!r} parameters")
    weights = {f: e for f, e in manifest["files"].items() if e.get("kind") != state.ADAM}
    for i, layer in enumerate(model.layers):
        layer.experts.load_part(where, weights, i)
    model.manifest = manifest
    t = config.train  # training-time routing as at the checkpoint's step
    model.set_noise_scale(noise_scale_at(int(manifest.get("step", 0)), final=t.noise_final, total=t.steps))
    return model


def save_model(
    root: str | Path, step: int, model: MultiTaskMoE, config: Config, manifest: dict[str, Any]
) -> Path:
    """Write an inference checkpoint (weights, config, tasks; fresh optimizer moments)."""
    dense = {n: model.params[n] for n in model.dense_param_names()}
    optim = Adam(dense, AdamConfig()).state_dict("dense.")
    writers = [lambda folder, i=i, g=layer.experts: g.save_part(folder, i) for i, layer in enumerate(model.layers)]
    full = {**manifest, "config": config.to_dict(), "tasks": model.tasks.to_dict(), "resumable": False,
            "head_hidden": dict(model.head_hidden)}
    return ckpt.save_checkpoint(root, step, {"params": dense, "optim": optim}, full, writers=writers)


def profile(
    model_or_path: MultiTaskMoE | str | Path,
    data: list | None = None,
    *,
    split: str = "train",
    noise_seed: int | None = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Route data through a model and summarise how evenly the experts are loaded.

    data defaults to the tasks the checkpoint was trained on. With out_dir, also writes the
    JSON, PNG and HTML report there. Returns {"summary", "files", "profile"}."""
    from moe.datasets import load_source
    from moe.profile_model import collect_profile, write_profile

    model = model_or_path if isinstance(model_or_path, MultiTaskMoE) else load(model_or_path)
    if data is None:
        manifest = getattr(model, "manifest", None)
        if manifest is None:
            raise ValueError("profile needs data for a model that was not loaded from a checkpoint")
        data = load_source(manifest["data_source"])
    prof = collect_profile(model, data, split=split, noise_seed=noise_seed)
    files = write_profile(prof, out_dir) if out_dir is not None else {}
    return {"summary": prof.summary(), "files": files, "profile": prof}
