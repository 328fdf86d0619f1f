"""Trainer: mixed-task batches, Adam with warmup + cosine, clipping, eval, logs, checkpoints, resume.

Reproducibility: three generators, all derived from the seed and all saved in checkpoints:
`init` (weights), `noise` (gate noise), `data` (task mix and example order); a fourth,
[seed, 3], draws the features of the task signatures that start the task embeddings
(moe.tasks.signature) and is used once, before step 0. A run resumed from a checkpoint takes
exactly the steps an uninterrupted run would, bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe import checkpoint as ckpt
from moe.batch import Batch, TargetKey, layout, run_slices
from moe.config import Config
from moe.experts.protocol import ExpertGroup, ExpertGroupFailure
from moe.model import BatchOutput, Chunk, MultiTaskMoE
from moe.optim import Adam, AdamConfig, clip_scale, lr_at, noise_scale_at
from moe.profiling.stats import cv
from moe.progress import Progress
from moe.sampler import TaskSampler
from moe.tasks.losses import row_losses
from moe.tasks.metrics import evaluate
from moe.tasks.signature import blend, nonlinear_share, signature_embeddings
from moe.tasks.spec import TaskData, TaskRegistry

EVAL_BATCH = 2048
log = logging.getLogger("moe.train")


class TooManyFailures(RuntimeError):
    """Expert groups failed more than shards.max_failures times within shards.failure_window_s:
    the run gives up (`moe train` prints one line and exits with status 3)."""


def batch_loss(model: MultiTaskMoE, batch: Batch, out: BatchOutput) -> tuple[float, dict[TargetKey, np.ndarray]]:
    """sum over rows of w_task * loss(row) / B (each task's loss weighted by its share of the
    batch), and d loss / d outputs per target group. One loss call per (kind, width), not per task."""
    lay, B = out.layout, batch.n
    if batch.y is None or set(batch.y) != set(lay.target_rows):
        got = "none" if batch.y is None else sorted(batch.y)
        raise ValueError(f"batch targets must be keyed by its tasks' (kind, n_outputs) {sorted(lay.target_rows)}, got {got}")
    weight = model.tasks.columns().loss_weight
    total, grads = 0.0, {}
    for key, rows in lay.target_rows.items():
        w = weight[lay.row_task[rows]] / B  # [n_g]
        per_row, g = row_losses(key[0], out.outputs[key], batch.y[key])  # [n_g], [n_g, n_out]
        total += float(w @ per_row)
        g *= w.astype(g.dtype)[:, None]
        grads[key] = g
    return total, grads


def task_loss(model: MultiTaskMoE, chunks: list[Chunk], outputs: list[np.ndarray]):
    """batch_loss for a list of Chunks and their outputs (as from model.forward): the loss and
    one gradient per chunk."""
    batch = model.pack(chunks)
    cols = model.tasks.columns()
    lay = layout(batch.tasks, batch.starts, cols)
    slices = run_slices(lay, batch.starts, batch.tasks, cols)
    by_key: dict[TargetKey, list[np.ndarray]] = {}
    for (key, _, _), o in zip(slices, outputs, strict=True):
        by_key.setdefault(key, []).append(o)
    packed = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in by_key.items()}
    total, grads = batch_loss(model, batch, BatchOutput(packed, [], 0.0, None, lay))
    return total, [grads[k][a:b] for k, a, b in slices]


def predict_split(model: MultiTaskMoE, data: TaskData, split: str) -> np.ndarray:
    x, _ = data.split(split)
    outs = [model.forward([Chunk(data.name, x[i : i + EVAL_BATCH])], train=False).outputs[0]
            for i in range(0, x.shape[0], EVAL_BATCH)]
    return np.concatenate(outs, axis=0)


def evaluate_tasks(model: MultiTaskMoE, data: list[TaskData], split: str) -> dict[str, dict[str, float]]:
    """Every metric of every task on one split (no noise, no drops beyond the model's config)."""
    return {d.name: evaluate(d.spec.kind, predict_split(model, d, split), d.split(split)[1]) for d in data}


@dataclass
class TrainResult:
    step: int
    test: dict[str, dict[str, float]]
    checkpoint: Path | None
    seen: dict[str, int]
    seconds: float


class Trainer:
    """Trains one MultiTaskMoE on a list of tasks; writes logs and checkpoints under out_dir."""

    def __init__(
        self,
        config: Config,
        data: list[TaskData],
        out_dir: str | Path,
        *,
        expert_groups: list[ExpertGroup] | None = None,
        data_source: dict[str, Any] | None = None,
        save_checkpoints: bool = True,
        on_failure: Callable[[Exception], None] | None = None,
        echo=print,
        head_hidden: dict[str, int] | None = None,
        expert_owners: dict[str, list[int]] | None = None,
        restoring: bool = False,
    ) -> None:
        """expert_groups: one ExpertGroup per MoE block to use instead of in-process experts
        (they receive the same initial weights). on_failure is called after an
        ExpertGroupFailure (e.g. to restart a dead shard) before rolling back. head_hidden and
        expert_owners: as MultiTaskMoE's (a model that tasks were added to; see moe.added).
        restoring: every weight will come from a checkpoint (a resume), so the signature start
        of the task embeddings is not drawn (at 100,000 tasks it takes ~24 s)."""
        self.config, self.data, self.out = config, data, Path(out_dir)
        self.echo, self.save_checkpoints = echo, save_checkpoints
        self.data_source = data_source or {}
        seed = config.train.seed
        self.rng_init = np.random.default_rng([seed, 0])
        self.rng_noise = np.random.default_rng([seed, 1])
        self.rng_data = np.random.default_rng([seed, 2])
        registry = TaskRegistry([d.spec for d in data])
        # Always initialise in this process, so the weights do not depend on where experts run.
        self.model = MultiTaskMoE(config.model, registry, rng=self.rng_init, head_hidden=head_hidden,
                                  expert_owners=expert_owners)
        if config.model.task_emb_init == "signature" and config.model.route_by == "task" and not restoring:
            e = self.model.task_emb.params["e"]  # [T, d_t]
            start = signature_embeddings(data, e.shape[1], np.random.default_rng([seed, 3]))
            for d in data:
                if d.name in start:
                    i = self.model.tasks.id(d.name)
                    e[i] = blend(e[i], start[d.name], nonlinear_share(d))
        if config.train.balanced_share > 0 and (self.model.expert_owner >= 0).any():
            raise ValueError(f"train.balanced_share={config.train.balanced_share:g} routes through balanced seats, which would put "
                             f"other tasks' rows on experts grown for one task ({sorted(self.model.expert_owners())}); "
                             "set train.balanced_share=0")
        self.on_failure = on_failure
        self._failures: list[float] = []
        self.remote = False  # experts live elsewhere: keep a rollback checkpoint from step 0
        self.phase = "start"
        self._initial: tuple[Path, list[dict[str, dict]]] | None = None  # experts' weights before step 0
        self._logged = -1  # step of the last evaluation written to metrics.jsonl
        self._bar, self._end = None, config.train.steps
        t = config.train
        adam = AdamConfig(weight_decay=t.weight_decay)
        self.dense_names = self.model.dense_param_names()
        self.shared_names = self.model.shared_param_names()
        # Shared parameters take a dense step; per-task and per-domain tables a lazy one over
        # the rows in the batch (per-row step counts), so an absent task does not move at all.
        self.optimizer = Adam({n: self.model.params[n] for n in self.shared_names}, adam)
        self.table_optimizers = {name: Adam(table.params, adam, lazy_rows=True)
                                 for name, table in self.model.tables().items()}
        self.sampler = TaskSampler(data, t.batch_size, sampling=t.sampling, temperature=t.temperature,
                                   rng=self.rng_data)
        self.step = 0
        self.last_routings: list = []  # the last step's Routing per MoE block
        self.ckpt_root = self.out / "checkpoints"
        self._tb = None
        if expert_groups is not None:
            self._adopt(expert_groups)

    def _adopt(self, groups: list[ExpertGroup]) -> None:
        """Hand each block's freshly initialised experts to the given groups, then use those.

        The initial weights stay in a staging folder until the first checkpoint commits, so a
        failure before then rolls back to them."""
        if len(groups) != len(self.model.layers):
            raise ValueError(f"need one expert group per MoE block ({len(self.model.layers)}), got {len(groups)}")
        staging = self.out / ".init-experts"
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run
        staging.mkdir(parents=True)
        entries = [layer.experts.save_part(staging, i) for i, layer in enumerate(self.model.layers)]
        for layer, group in zip(self.model.layers, groups, strict=True):
            layer.set_experts(group)
        self._initial = (staging, entries)
        self.remote = True
        self.recovering(self._load_initial, "start")

    def _load_initial(self) -> None:
        staging, entries = self._initial
        for i, layer in enumerate(self.model.layers):
            layer.experts.load_part(staging, entries[i], i)

    def _drop_initial(self) -> None:
        if self._initial is not None:
            shutil.rmtree(self._initial[0], ignore_errors=True)
            self._initial = None

    # ------------------------------------------------------------------ one step
    def routing_at(self, step: int) -> str:
        """The routing training step `step` (from 0) takes: "balanced" for the last
        train.balanced_share of the steps, "topk" before."""
        t = self.config.train
        return "balanced" if step >= t.steps - round(t.balanced_share * t.steps) else "topk"

    def train_step(self) -> dict[str, float]:
        t = self.config.train
        batch = self.sampler.next_packed()
        noise = noise_scale_at(self.step, final=t.noise_final, total=t.steps)
        self.model.set_noise_scale(noise)
        out = self.model.forward_batch(batch, train=True, rng=self.rng_noise, routing=self.routing_at(self.step),
                                       balance_factor=t.balanced_factor)
        self.last_routings = out.routings  # what this step routed, one per MoE block (for tallies)
        loss, d_outs = batch_loss(self.model, batch, out)
        self.model.backward_batch(d_outs)
        grads = self.model.grads
        tables = self.model.tables()
        sq = sum(float(np.sum(np.square(grads[n], dtype=np.float64))) for n in self.shared_names)
        sq += sum(table.grad_sq_norm() for table in tables.values())
        sq += sum(layer.experts.grad_sq_norm() for layer in self.model.layers)
        scale = clip_scale(sq, t.clip_norm)
        lr = lr_at(self.step, lr=t.lr, warmup=t.warmup, total=t.steps, min_ratio=t.min_lr_ratio)
        self.optimizer.step({n: grads[n] for n in self.shared_names}, lr, scale)
        for name, table in tables.items():
            if table.touched.size:
                self.table_optimizers[name].step(table.grads, lr, scale, rows=table.touched)
        for layer in self.model.layers:
            layer.experts.apply_update(lr, scale)
        self.step += 1
        r = out.routings[0]
        return {"loss": loss + out.aux_loss, "task_loss": loss, "aux_loss": out.aux_loss,
                "cv_load": cv(r.load.astype(np.float64)), "lr": lr, "grad_norm": float(np.sqrt(sq)),
                "noise_scale": noise}

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to config.train.steps (or stop early after `stop_at`, with a checkpoint)."""
        t = self.config.train
        self._end = t.steps if stop_at is None else min(stop_at, t.steps)
        if resume:
            found = ckpt.list_checkpoints(self.ckpt_root)
            if not found:
                raise ValueError(f"--resume: no checkpoint under {str(self.ckpt_root)!r}")
            ckpt.remove_stale(self.ckpt_root)
            self.recovering(lambda: self.restore(found[-1]), "load")
            self.echo(f"resumed from {found[-1]} at step {self.step}")
        if self.save_checkpoints:
            self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self._bar = self.progress_bar(t.steps)
        self._rate = (self.step, time.perf_counter())
        if self.remote and self.save_checkpoints and not ckpt.list_checkpoints(self.ckpt_root):
            self.recovering(self.save, "checkpoint save")  # a rollback point before the first step
        self._advance(self._end)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        test = self.recovering(lambda: evaluate_tasks(self.model, self.data, "test"), "final evaluation")
        self._drop_initial()
        where = ckpt.list_checkpoints(self.ckpt_root)[-1] if self.save_checkpoints else None
        return TrainResult(self.step, test, where, dict(self.sampler.seen), time.perf_counter() - start)

    def _advance(self, target: int) -> None:
        """Train up to step `target`: each step, then its evaluation and checkpoint when due.
        An expert failure in any of them rolls back and the loop takes the same steps again."""
        t = self.config.train
        while self.step < target:
            try:
                self._at("step")
                m = self.train_step()
                self._show(m)
                if self.save_checkpoints and (self.step % t.eval_every == 0 or self.step == t.steps):
                    self._at("evaluation")
                    self.log_eval(self.out / "metrics.jsonl", m)
                if self.save_checkpoints and (self.step % t.checkpoint_every == 0 or self.step == self._end):
                    self._at("checkpoint save")
                    self.save()
            except ExpertGroupFailure as e:
                self._recover(e)

    def recovering(self, fn: Callable[[], Any], phase: str) -> Any:
        """Run fn, a phase that uses the experts (evaluation, profiling, a save, a load). After
        an expert failure: repair, roll back, train again up to the step we were at (the same
        bits), and run fn again. Gives up with TooManyFailures like the training loop."""
        target = self.step
        while True:
            try:
                self._at(phase)
                out = fn()
            except ExpertGroupFailure as e:
                self._recover(e)
                self._advance(target)
                continue
            log.debug("phase %s done at step %d", phase, self.step)  # the experts are idle again
            return out

    def _at(self, phase: str) -> None:
        self.phase = phase
        log.debug("phase %s at step %d", phase, self.step)

    def _recover(self, error: ExpertGroupFailure) -> None:
        """The phase is void: let the owner repair (restart a shard), roll everything back to the
        last checkpoint (or, before the first one, to the initial weights). A failure while
        repairing or rolling back counts as another failure and is repaired the same way."""
        while True:
            self._count_failure(error)
            found = ckpt.list_checkpoints(self.ckpt_root)
            to = found[-1].name if found else "the initial weights"
            if not found and (self._initial is None or self.step != 0):
                raise RuntimeError(f"expert failure at step {self.step} with no checkpoint to roll back to: "
                                   f"{error}") from error
            where = f"step {self.step + 1}" if self.phase == "step" else f"{self.phase} at step {self.step}"
            self.echo(f"{where} failed: {error}; rolling back to {to}")
            try:
                self._at("rollback")
                if self.on_failure is not None:
                    self.on_failure(error)
                if found:
                    self.restore(found[-1])
                else:
                    self._load_initial()
                break
            except ExpertGroupFailure as e:
                error = e
        if self._bar is not None:
            self._bar.set_position(self.step)

    def _count_failure(self, error: ExpertGroupFailure) -> None:
        s = self.config.shards
        now = time.monotonic()
        self._failures = [t for t in self._failures if now - t <= s.failure_window_s] + [now]
        if len(self._failures) > s.max_failures:
            raise TooManyFailures(
                f"{len(self._failures)} expert failures within {s.failure_window_s:g} s (limit "
                f"{s.max_failures}); giving up at step {self.step}. Last: {error}") from error

    def _show(self, m: dict[str, float]) -> None:
        bar = self._bar
        if bar is None:
            return
        now = time.perf_counter()
        last, last_t = self._rate
        if now - last_t > 0.5:
            rate = (self.step - last) * self.config.train.batch_size / (now - last_t)
            bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{rate:,.0f}", cv_load=f"{m['cv_load']:.3f}")
            self._rate = (self.step, now)
        bar.update(1)

    def progress_bar(self, total: int) -> Progress:
        """The training progress display from the current step to `total` (moe.progress)."""
        return Progress(total, "train", initial=self.step, enabled=self.config.train.progress)

    def log_eval(self, path: Path, m: dict[str, float]) -> None:
        """Evaluate self.model on the val split and append one record (step, the step's
        metrics `m`, every task's scores) to the metrics log (and TensorBoard if enabled)."""
        if self.step <= self._logged:
            return  # already written before a rollback: the replayed steps give the same values
        val = evaluate_tasks(self.model, self.data, "val")
        primary = {d.name: val[d.name][d.spec.metric] for d in self.data}
        record = {"step": self.step, "split": "val", "loss": m["loss"], "aux_loss": m["aux_loss"],
                  "lr": m["lr"], "noise_scale": m["noise_scale"], "cv_load": m["cv_load"], "mean_score": float(np.mean(list(primary.values()))),
                  "tasks": val,
                  # cv_load is block 0 on this step's training batch, not the val split the scores are on
                  "cv_load_split": "train", "cv_load_noise": self.model.config.gates[0] == "noisy_topk"}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._logged = self.step
        if self.config.train.tensorboard:
            self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # optional: JSONL is the log of record
            return
        if self._tb is None:
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        for key in ("loss", "aux_loss", "lr", "cv_load", "mean_score"):
            self._tb.add_scalar(key, record[key], record["step"])
        for name, metrics in record["tasks"].items():
            for k, v in metrics.items():
                self._tb.add_scalar(f"val/{name}/{k}", v, record["step"])
        self._tb.flush()

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, dict[str, np.ndarray]]:
        """Coordinator-side state; the experts write their own part files (see save)."""
        optim = self.optimizer.state_dict("dense.")
        for name, opt in self.table_optimizers.items():
            optim.update(opt.state_dict(f"table.{name}."))
        arrays, _ = self.sampler.state()
        optim.update(arrays)
        return {"params": {n: self.model.params[n] for n in self.dense_names}, "optim": optim}

    def manifest(self) -> dict[str, Any]:
        _, cursor = self.sampler.state()
        return {
            "config": self.config.to_dict(),
            "tasks": self.model.tasks.to_dict(),
            "data_source": self.data_source,
            "rng": {"init": self.rng_init.bit_generator.state, "noise": self.rng_noise.bit_generator.state},
            "data_cursor": cursor,
            "head_hidden": dict(self.model.head_hidden),
            "expert_owners": self.model.expert_owners(),
        }

    def save(self) -> Path:
        writers = [lambda folder, i=i, g=layer.experts: g.save_part(folder, i)
                   for i, layer in enumerate(self.model.layers)]
        where = ckpt.save_checkpoint(self.ckpt_root, self.step, self.state_tensors(), self.manifest(),
                                     keep_last=self.config.train.keep_last, writers=writers)
        self._drop_initial()  # from now on failures roll back to a checkpoint
        return where

    def restore(self, path: str | Path) -> None:
        manifest, files, where = ckpt.load_checkpoint(path)
        ckpt.require(manifest, {"tasks": dict, "rng": dict, "data_cursor": dict}, where)
        if manifest.get("tasks") != self.model.tasks.to_dict():
            raise ckpt.CheckpointError(f"checkpoint {str(where)!r} was trained on other tasks")
        ckpt.assign({n: self.model.params[n] for n in self.dense_names}, files["params"], "model parameters")
        optim = files["optim"]
        self.optimizer.load_state_dict(optim, "dense.")
        for name, opt in self.table_optimizers.items():
            opt.load_state_dict(optim, f"table.{name}.")
        for i, layer in enumerate(self.model.layers):
            layer.experts.load_part(where, manifest["files"], i)
        self.sampler.load_state(optim, manifest["data_cursor"])
        self.rng_init.bit_generator.state = manifest["rng"]["init"]
        self.rng_noise.bit_generator.state = manifest["rng"]["noise"]
        self.step = int(manifest["step"])
