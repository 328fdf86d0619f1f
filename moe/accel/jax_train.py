"""`moe train --backend jax`: the Trainer's loop with the step compiled by XLA, on one or many processes.

What is the same as moe.train.Trainer: initial weights (the Trainer builds them from the
seed), the batches (its TaskSampler, so the same task mix and example order), the loss
(weighted per-task means + aux), the schedule (warmup + cosine), global-norm clipping, Adam
with decoupled weight decay (dense Adam for the shared parameters, lazy row-Adam for the
experts and for the per-task / per-domain tables: only experts that received rows and only
the tasks and domains in the batch move, each row with its own step count), the checkpoint layout
(written by the Trainer itself, so `moe.load`, `moe eval` and `--resume` read it) and the
metrics log.

What differs, on purpose:
- gate noise comes from jax.random (key = fold_in(fold_in(seed key, step), micro-batch)),
  not the numpy generator, so a JAX run and a numpy run with noisy gates take different
  (equally valid) steps; without noise they agree to float rounding (tests/accel);
- with a plan (moe.accel.layout), the capacity is GShard's per device and a step may
  accumulate gradients over several micro-batches (the aux loss is the mean of theirs);
- the batch must divide evenly over the devices of the mesh.

Several processes (jax.distributed, see moe.accel.distributed): every process runs this same
loop. The sampler draws the same example indices everywhere (same seed, no communication),
and each process reads only the rows that land on its own devices. Process 0 alone logs,
shows progress, evaluates and writes checkpoints; bringing the sharded state to the host
for those is a collective that every process joins. Not supported (clear errors): remote
expert shards.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe import checkpoint as ckpt
from moe.accel import xla_flags
from moe.accel.jax_backend import (
    JaxMoE,
    check_fits,
    describe_mesh,
    host,
    is_expert_param,
    to_devices,
)
from moe.accel.jax_layer import EXPERT, ROWS
from moe.accel.jax_model import draw_noise, loss_fn, pack_batch, touched_rows
from moe.accel.layout import Layout
from moe.config import Config
from moe.model import Chunk
from moe.optim import AdamConfig, lr_at
from moe.profiling.stats import cv
from moe.tasks.spec import TaskData
from moe.train import Trainer, TrainResult, evaluate_tasks


def _adam(p, m, v, g, lr, t, hit, cfg: AdamConfig):
    """One Adam update (moe.optim.Adam._update) where `hit` (broadcasting against p: per row
    or one flag), the old values elsewhere; t broadcasts against p (per-row step counts).

    The new moments are materialised first and the weight update reads them: written as one
    expression, XLA recomputed the moments inside the weight's kernel from the old ones, so it
    copied each donated moment before overwriting it (16 array passes per parameter instead
    of 10; Adam took 32 ms of the 1 x 8 layout's step). Same values bit for bit: where `hit`,
    the new moment is the updated one."""
    m_new = jnp.where(hit, cfg.beta1 * m + (1 - cfg.beta1) * g, m)
    v_new = jnp.where(hit, cfg.beta2 * v + (1 - cfg.beta2) * (g * g), v)
    m_new, v_new = jax.lax.optimization_barrier((m_new, v_new))
    tf = t.astype(jnp.float32)
    upd = (m_new / (1 - cfg.beta1 ** tf)) / (jnp.sqrt(v_new / (1 - cfg.beta2 ** tf)) + cfg.eps)
    if cfg.weight_decay:
        upd = upd + cfg.weight_decay * p
    return jnp.where(hit, p - lr * upd, p), m_new, v_new


def row_group(name: str, tables: tuple[str, ...]) -> str | None:
    """The lazily updated group a parameter belongs to: its MoE block's experts ("block<i>"),
    a per-task / per-domain table (its prefix), or None (shared: every step moves it)."""
    if is_expert_param(name):
        return name.split(".", 1)[0]
    prefix = name.rsplit(".", 1)[0]
    return prefix if prefix in tables else None


def adam_step(state: dict, grads: dict, touched: dict, lr, clip_norm: float, cfg: AdamConfig):
    """Global-norm clipping, then dense Adam for the shared parameters (one step count) and
    lazy row-Adam for experts and tables (moe.optim): rows the batch did not use keep their
    weights, moments and step count. Skipped whole if the norm is not finite.

    state: params, m, v (dicts by name), t (int32 scalar), t_rows (group -> int32 [R]);
    touched: group -> bool [R]."""
    sq = sum(jnp.sum(jnp.square(g)) for g in grads.values())
    norm = jnp.sqrt(sq)
    scale = jnp.where((clip_norm > 0) & (norm > clip_norm), clip_norm / norm, 1.0) if clip_norm > 0 else 1.0
    ok = jnp.isfinite(norm)
    t1 = state["t"] + 1
    t_rows = {g: t + touched[g].astype(t.dtype) for g, t in state["t_rows"].items()}
    new = {"params": {}, "m": {}, "v": {}}
    for n, p in state["params"].items():
        g, m, v = grads[n] * scale, state["m"][n], state["v"][n]
        group = row_group(n, tuple(t_rows))
        if group is not None:
            rows = (-1,) + (1,) * (p.ndim - 1)
            hit = touched[group].reshape(rows) & ok  # [R, 1, ...]
            out = _adam(p, m, v, g, lr, jnp.maximum(t_rows[group], 1).reshape(rows), hit, cfg)
        else:
            out = _adam(p, m, v, g, lr, t1, ok, cfg)
        new["params"][n], new["m"][n], new["v"][n] = out
    new["t"] = jnp.where(ok, t1, state["t"])
    new["t_rows"] = {g: jnp.where(ok, t_rows[g], state["t_rows"][g]) for g in t_rows}
    return new, norm


def chunks_in_rows(parts: list[tuple[TaskData, np.ndarray]], start: int, stop: int) -> list[Chunk]:
    """The examples of global batch rows [start, stop), gathered from the training splits."""
    out, r = [], 0
    for d, idx in parts:
        lo, hi = max(start, r), min(stop, r + idx.shape[0])
        if lo < hi:
            sel = idx[lo - r : hi - r]
            out.append(Chunk(d.name, d.x_train[sel], d.y_train[sel]))
        r += idx.shape[0]
    return out


def make_step(spec, mesh, adam: AdamConfig, clip: float, n_micro: int):
    """The jitted training step: forward + backward over n_micro micro-batches (gradients
    averaged), then Adam. Batch arrays are [n_micro, B_micro, ...], rows over the mesh."""

    def micro(params, tid, x, y, key):
        eps = draw_noise(spec, mesh, key, tid.shape[0])
        (loss, (task, aux, rs, _)), g = jax.value_and_grad(
            lambda p: loss_fn(spec, mesh, p, tid, x, y, eps), has_aux=True)(params)
        counts = jnp.stack([r["counts"] for r in rs])  # [L, E]
        return g, jnp.stack([loss, task, aux]), counts, rs[0]["load"]

    def step(state, tid, x, y, key, lr):
        params = state["params"]
        if n_micro == 1:
            g, scalars, counts, load = micro(params, tid[0], x[0], y[0], jax.random.fold_in(key, 0))
        else:
            def body(acc, xs):
                out = micro(params, *xs)
                return jax.tree.map(jnp.add, acc, out), None
            keys = jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.arange(n_micro))
            zero = jax.eval_shape(lambda: micro(params, tid[0], x[0], y[0], keys[0]))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (g, scalars, counts, load), _ = jax.lax.scan(body, zero, (tid, x, y, keys))
            g = jax.tree.map(lambda a: a / n_micro, g)
            scalars, load = scalars / n_micro, load / n_micro
        touched = touched_rows(spec, params, tid.reshape(-1))  # tables: rows of any micro-batch
        touched.update({f"block{i}": counts[i] > 0 for i in range(len(spec.layers))})
        new, norm = adam_step(state, g, touched, lr, clip, adam)
        return new, {"loss": scalars[0], "task_loss": scalars[1], "aux_loss": scalars[2],
                     "grad_norm": norm, "load0": load}

    return jax.jit(step, donate_argnums=(0,))


class JaxTrainer:
    """Same constructor and `train()` as moe.train.Trainer; `.model` is the numpy model,
    brought up to date by `sync()`. layout: an executable plan (moe.accel.layout)."""

    def __init__(
        self,
        config: Config,
        data: list[TaskData],
        out_dir: str | Path,
        *,
        data_source: dict[str, Any] | None = None,
        save_checkpoints: bool = True,
        echo=print,
        mesh=None,
        layout: Layout | None = None,
        restoring: bool = False,
    ) -> None:
        if config.shards.enabled:
            raise ValueError("the JAX backend runs the experts on JAX devices; remote expert shards "
                             f"(shards.local={config.shards.local}, shards.endpoints="
                             f"{list(config.shards.endpoints)}) are not supported with --backend jax")
        top_k_only = f"the JAX backend trains with the gate's top-k routing: train.balanced_share=" \
                     f"{config.train.balanced_share:g} is set to 0" if config.train.balanced_share else None
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, balanced_share=0.0))
        if config.train.noise_final != 1.0:
            raise ValueError(f"train.noise_final={config.train.noise_final}: the JAX backend trains with the "
                             "full gate noise only (train.noise_final = 1)")
        self.main = jax.process_index() == 0
        self.n_micro = 1 if layout is None else layout.n_micro
        if layout is not None:  # the plan sets the batch: n_micro micro-batches of ep x dp x t rows
            layout.check_model(dataclasses.asdict(config.model))
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=layout.micro_batch))
        if not self.main:  # one process logs and shows progress
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
            echo = lambda *_: None  # noqa: E731
        if top_k_only:
            echo(top_k_only)
        self.config, self.data, self.echo, self.layout = config, data, echo, layout
        self.trainer = Trainer(config, data, out_dir, data_source=data_source,
                               save_checkpoints=save_checkpoints and self.main, echo=echo, restoring=restoring)
        self.save_checkpoints = save_checkpoints
        self.model = self.trainer.model
        self.jm = JaxMoE(self.model, mesh, layout)
        self.mesh = self.jm.mesh
        check_fits(self.jm.spec, self.mesh, config.train.batch_size)
        self.adam = AdamConfig(weight_decay=config.train.weight_decay)
        self.key = jax.random.key(config.train.seed)
        self.rows = NamedSharding(self.mesh, P(None, ROWS))  # [n_micro, B, ...]
        self.rows_read = 0  # examples this process gathered for training (its share only)
        self.steps_run = 0  # steps taken by this object (not those before a resume)
        self.state: dict = {}
        self._load_optimizer_state()
        self.compiled_step = make_step(self.jm.spec, self.mesh, self.adam, float(config.train.clip_norm), self.n_micro)

    @property
    def step(self) -> int:
        return self.trainer.step

    # ------------------------------------------------------------------ state in and out
    def _row_groups(self) -> dict[str, Any]:
        """Lazily updated parameters by group, with the numpy optimizer that holds their state:
        each MoE block's experts ("block<i>") and each per-task / per-domain table (its prefix)."""
        groups = {f"block{i}": layer.experts.optimizer for i, layer in enumerate(self.model.layers)}
        groups.update(self.trainer.table_optimizers)
        return groups

    def _slot(self, name: str) -> tuple[str | None, str]:
        """(row group or None for a shared parameter, the key its optimizer knows it by)."""
        if is_expert_param(name):
            block, _, _, local = name.split(".")  # block<i>.moe.experts.<w>
            return block, local
        prefix, local = name.rsplit(".", 1)
        return (prefix, local) if prefix in self.trainer.table_optimizers else (None, name)

    def _load_optimizer_state(self) -> None:
        """Parameters and Adam state from the numpy model and optimizers (zeros on a fresh run) onto the mesh."""
        dense, groups = self.trainer.optimizer, self._row_groups()
        m, v = {}, {}
        for n in self.model.params:
            group, key = self._slot(n)
            opt = dense if group is None else groups[group]
            m[n], v[n] = opt.moments(key)  # dense on the mesh (zeros where a row has none)
        jm = self.jm
        split, rep = NamedSharding(self.mesh, P(EXPERT)), NamedSharding(self.mesh, P())
        t_rows = {g: to_devices(opt.t[jm.order].astype(np.int32), split) if g.startswith("block")
                  else to_devices(opt.t.astype(np.int32), rep) for g, opt in groups.items()}
        self.state = {"params": jm.put_params(self.model.params), "m": jm.put_params(m), "v": jm.put_params(v),
                      "t": to_devices(np.asarray(dense.t[0], np.int32), rep), "t_rows": t_rows}
        self.jm.params = self.state["params"]

    def sync(self) -> None:
        """Copy parameters and Adam state from the devices into the numpy model and
        optimizers. With several processes every process must call it (it gathers)."""
        jm, st = self.jm, self.state
        jm.params = st["params"]
        jm.write_back(self.model)
        m, v = jm.get_params(st["m"]), jm.get_params(st["v"])
        dense, groups = self.trainer.optimizer, self._row_groups()
        dense.t[...] = int(host(st["t"]))
        t_rows = {}
        for g in groups:
            t = host(st["t_rows"][g])
            t_rows[g] = np.asarray(jm.experts_from_slots(t) if g.startswith("block") else t, dtype=np.int64)
        rows: dict[str, dict[str, np.ndarray]] = {g: {} for g in groups}  # lazy-row optimizers' new state
        for n in self.model.params:
            group, key = self._slot(n)
            if group is None:
                dense.m[key][...], dense.v[key][...] = m[n], v[n]
            else:  # a lazy-row optimizer holds the moments of rows with t > 0 only
                live = t_rows[group] > 0
                rows[group].update({f"m.{key}": np.ascontiguousarray(m[n][live]),
                                    f"v.{key}": np.ascontiguousarray(v[n][live])})
        for g, opt in groups.items():
            opt.load_state_dict({"t": t_rows[g], **rows[g]})

    # ------------------------------------------------------------------ one step
    def next_batch(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The next step's n_micro micro-batches as global [n_micro, B, ...] arrays; this
        process gathers only the rows of its own devices."""
        tr, spec, M = self.trainer, self.jm.spec, self.n_micro
        plans = [tr.sampler.next_indices() for _ in range(M)]
        B = self.config.train.batch_size
        packed: dict[tuple[int, int, int], tuple] = {}

        def rows(m: int, start: int, stop: int):
            if (m, start, stop) not in packed:
                packed[(m, start, stop)] = pack_batch(spec, chunks_in_rows(plans[m], start, stop))
                self.rows_read += stop - start
            return packed[(m, start, stop)]

        def part(which: int):
            def fill(idx):
                start, stop, _ = idx[1].indices(B)
                return np.stack([rows(m, start, stop)[which] for m in range(*idx[0].indices(M))])
            return fill

        shapes = [(M, B), (M, B, spec.d_in_max), (M, B, spec.y_width)]
        return tuple(jax.make_array_from_callback(s, self.rows, part(i)) for i, s in enumerate(shapes))

    def train_step(self) -> dict[str, float]:
        tr, t = self.trainer, self.config.train
        tid, x, y = self.next_batch()
        lr = lr_at(tr.step, lr=t.lr, warmup=t.warmup, total=t.steps, min_ratio=t.min_lr_ratio)
        key = jax.random.fold_in(self.key, tr.step)
        self.state, met = self.compiled_step(self.state, tid, x, y, key, jnp.float32(lr))
        self.jm.params = self.state["params"]
        norm = float(host(met["grad_norm"]))
        if not np.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm} at step {tr.step}; the step was skipped "
                                     "and training stopped")
        tr.step += 1
        self.steps_run += 1
        return {"loss": float(host(met["loss"])), "task_loss": float(host(met["task_loss"])),
                "aux_loss": float(host(met["aux_loss"])),
                "cv_load": cv(host(met["load0"]).astype(np.float64)), "lr": lr, "grad_norm": norm,
                "noise_scale": 1.0}

    def save(self) -> Path | None:
        """Process 0 writes one checkpoint in the numpy layout; the others join the gather
        and wait until it is on disk."""
        self.sync()
        where = self.trainer.save() if self.main else None
        _barrier(f"checkpoint {self.step}")
        return where

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to config.train.steps (or stop after `stop_at`), as Trainer.train."""
        tr, t = self.trainer, self.config.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        if resume:
            found = ckpt.list_checkpoints(tr.ckpt_root)
            if not found:
                raise ValueError(f"--resume: no checkpoint under {str(tr.ckpt_root)!r}")
            tr.restore(found[-1])
            self._load_optimizer_state()
            self.echo(f"resumed from {found[-1]} at step {tr.step}")
        saving = self.save_checkpoints
        if saving and self.main:
            tr.out.mkdir(parents=True, exist_ok=True)
        plan = f"; plan {self.layout.describe()}" if self.layout is not None else ""
        self.echo(f"jax backend: {describe_mesh(self.mesh)}{plan}; XLA_FLAGS {xla_flags.describe()}")
        log_path = tr.out / "metrics.jsonl"
        start = time.perf_counter()
        bar = tr.progress_bar(t.steps)
        while tr.step < end:
            m = self.train_step()
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", cv_load=f"{m['cv_load']:.3f}")
                bar.update(1)
            if saving and (tr.step % t.eval_every == 0 or tr.step == t.steps):
                self.sync()
                if self.main:
                    tr.log_eval(log_path, m)
            if saving and (tr.step % t.checkpoint_every == 0 or tr.step == end):
                self.save()
        if bar is not None:
            bar.close()
        self.sync()
        test = evaluate_tasks(self.model, self.data, "test") if self.main else {}
        where = ckpt.list_checkpoints(tr.ckpt_root)[-1] if saving else None
        return TrainResult(tr.step, test, where, dict(tr.sampler.seen), time.perf_counter() - start)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_with_jax(
    config: Config, data: list[TaskData], out_dir: str | Path, *, data_source: dict[str, Any] | None = None,
    resume: bool = False, stop_at: int | None = None, echo=print, layout: Layout | None = None,
) -> tuple[TrainResult, JaxTrainer]:
    """One call for the CLI: train with the JAX backend; returns the result and the trainer
    (its `.model` is the trained numpy model, for baselines and the profile)."""
    trainer = JaxTrainer(config, data, out_dir, data_source=data_source, echo=echo, layout=layout, restoring=resume)
    return trainer.train(resume=resume, stop_at=stop_at), trainer
