"""`moe train --backend jax`: the Trainer's loop with the step compiled by XLA.

What is the same as moe.train.Trainer: initial weights (the Trainer builds them from the
seed), the batches (its TaskSampler, so the same task mix and example order), the loss
(weighted per-task means + aux), the schedule (warmup + cosine), global-norm clipping, Adam
with decoupled weight decay, the checkpoint layout (written by the Trainer itself, so
`moe.load`, `moe eval` and `--resume` read it) and the metrics log.

What differs, on purpose:
- experts use dense Adam (every expert moves every step, one shared step count), not lazy
  Adam; checkpoints record each expert's Adam step count as that shared count;
- gate noise comes from jax.random (key = fold_in(seed key, step)), not the numpy generator,
  so a JAX run and a numpy run with the same seed take different (equally valid) steps;
- the batch (train.batch_size rows) must divide evenly over the devices of the mesh.
Not supported (clear errors): remote expert shards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe import checkpoint as ckpt
from moe.accel.jax_backend import JaxMoE, check_fits, is_expert_param, make_mesh
from moe.accel.jax_model import loss_fn, pack_batch
from moe.config import Config
from moe.optim import Adam, AdamConfig, lr_at
from moe.profiling.stats import cv
from moe.tasks.spec import TaskData
from moe.train import Trainer, TrainResult, evaluate_tasks


def adam_step(params, m, v, t, grads, lr, clip_norm: float, cfg: AdamConfig):
    """Global-norm clipping then Adam (moe.optim.Adam._update); skipped if the norm is not finite."""
    sq = sum(jnp.sum(jnp.square(g)) for g in grads.values())
    norm = jnp.sqrt(sq)
    scale = jnp.where((clip_norm > 0) & (norm > clip_norm), clip_norm / norm, 1.0) if clip_norm > 0 else 1.0
    ok = jnp.isfinite(norm)
    t1 = t + 1
    bc1 = 1 - cfg.beta1 ** t1.astype(jnp.float32)
    bc2 = 1 - cfg.beta2 ** t1.astype(jnp.float32)
    new_p, new_m, new_v = {}, {}, {}
    for n, p in params.items():
        g = grads[n] * scale
        mm = cfg.beta1 * m[n] + (1 - cfg.beta1) * g
        vv = cfg.beta2 * v[n] + (1 - cfg.beta2) * (g * g)
        upd = (mm / bc1) / (jnp.sqrt(vv / bc2) + cfg.eps)
        if cfg.weight_decay:
            upd = upd + cfg.weight_decay * p
        new_p[n] = jnp.where(ok, p - lr * upd, p)
        new_m[n] = jnp.where(ok, mm, m[n])
        new_v[n] = jnp.where(ok, vv, v[n])
    return new_p, new_m, new_v, jnp.where(ok, t1, t), norm


class JaxTrainer:
    """Same constructor and `train()` as moe.train.Trainer; `.model` is the (synced) numpy model."""

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
    ) -> None:
        if config.shards.enabled:
            raise ValueError("the JAX backend runs the experts on JAX devices; remote expert shards "
                             f"(shards.local={config.shards.local}, shards.endpoints="
                             f"{list(config.shards.endpoints)}) are not supported with --backend jax")
        self.config, self.data, self.echo = config, data, echo
        self.trainer = Trainer(config, data, out_dir, data_source=data_source,
                               save_checkpoints=save_checkpoints, echo=echo)
        self.model = self.trainer.model
        self.mesh = make_mesh() if mesh is None else mesh
        self.jm = JaxMoE(self.model, self.mesh)
        check_fits(self.jm.spec, self.mesh, config.train.batch_size)
        self.adam = AdamConfig(weight_decay=config.train.weight_decay)
        self.key = jax.random.key(config.train.seed)
        self._load_optimizer_state()
        spec, mesh_, adam, clip = self.jm.spec, self.mesh, self.adam, float(config.train.clip_norm)
        noisy = [layer.noisy for layer in spec.layers]

        def step(params, m, v, t, tid, x, y, key, lr):
            eps = tuple(jax.random.normal(jax.random.fold_in(key, i), (tid.shape[0], layer.n_experts))
                        if need else None for i, (layer, need) in enumerate(zip(spec.layers, noisy, strict=True)))
            (loss, (task, aux, rs, _)), g = jax.value_and_grad(
                lambda p: loss_fn(spec, mesh_, p, tid, x, y, eps), has_aux=True)(params)
            params, m, v, t, norm = adam_step(params, m, v, t, g, lr, clip, adam)
            return params, m, v, t, {"loss": loss, "task_loss": task, "aux_loss": aux,
                                     "grad_norm": norm, "load0": rs[0]["load"]}

        self._step = jax.jit(step, donate_argnums=(0, 1, 2))

    @property
    def step(self) -> int:
        return self.trainer.step

    # ------------------------------------------------------------------ state in and out
    def _load_optimizer_state(self) -> None:
        """Adam moments from the numpy optimizers (zeros on a fresh run) onto the mesh."""
        dense = self.trainer.optimizer
        m, v = {}, {}
        for n in self.model.params:
            opt, local = self._slot(n)
            m[n], v[n] = opt.moments(local)  # dense on the mesh (zeros where a row has none)
        sh = self.jm.shardings
        self.m = {n: jax.device_put(np.asarray(a), sh[n]) for n, a in m.items()}
        self.v = {n: jax.device_put(np.asarray(a), sh[n]) for n, a in v.items()}
        self.t = jnp.asarray(int(dense.t[0]), dtype=jnp.int32)
        self.jm.params = {n: jax.device_put(np.asarray(p), sh[n]) for n, p in self.model.params.items()}

    def _slot(self, name: str) -> tuple[Adam, str]:
        """(numpy optimizer, its key) holding a parameter's moments: the dense one, a task
        table's or an expert bank's (lazy-row Adam)."""
        if is_expert_param(name):
            block, _, _, local = name.split(".")  # block<i>.moe.experts.<w>
            return self.model.layers[int(block[len("block"):])].experts.optimizer, local
        prefix, local = name.rsplit(".", 1)
        table_opt = self.trainer.table_optimizers.get(prefix)
        return (self.trainer.optimizer, name) if table_opt is None else (table_opt, local)

    def sync(self) -> None:
        """Copy parameters and Adam state from the devices into the numpy model and optimizers."""
        self.jm.write_back(self.model)
        t = int(self.t)
        dense = self.trainer.optimizer
        dense.t[...] = t
        rows: dict[int, tuple[Adam, dict[str, np.ndarray]]] = {}  # lazy-row optimizers' new state
        for n in self.model.params:
            m, v = np.asarray(self.m[n]), np.asarray(self.v[n])
            opt, local = self._slot(n)
            if opt is dense:
                dense.m[n][...], dense.v[n][...] = m, v
            else:
                rows.setdefault(id(opt), (opt, {}))[1].update({f"m.{local}": m, f"v.{local}": v})
        for opt, sd in rows.values():  # dense Adam on the mesh: every row took every step
            if t > 0:  # before any step no row has state
                opt.load_state_dict({"t": np.full(opt.t.shape, t, dtype=np.int64), **sd})

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, float]:
        tr, t = self.trainer, self.config.train
        chunks = tr.sampler.next_batch()
        tid, x, y = pack_batch(self.jm.spec, chunks)
        lr = lr_at(tr.step, lr=t.lr, warmup=t.warmup, total=t.steps, min_ratio=t.min_lr_ratio)
        key = jax.random.fold_in(self.key, tr.step)
        self.jm.params, self.m, self.v, self.t, met = self._step(
            self.jm.params, self.m, self.v, self.t, *self.jm.place(tid, x, y), key, jnp.float32(lr))
        norm = float(met["grad_norm"])
        if not np.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm} at step {tr.step}; the step was skipped "
                                     "and training stopped")
        tr.step += 1
        return {"loss": float(met["loss"]), "task_loss": float(met["task_loss"]),
                "aux_loss": float(met["aux_loss"]), "cv_load": cv(np.asarray(met["load0"], np.float64)),
                "lr": lr, "grad_norm": norm}

    def save(self) -> Path:
        self.sync()
        return self.trainer.save()

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
        if tr.save_checkpoints:
            tr.out.mkdir(parents=True, exist_ok=True)
        self.echo(f"jax backend: {self.mesh.shape['expert']} x {jax.devices()[0].device_kind} "
                  "(dense Adam for experts)")
        log_path = tr.out / "metrics.jsonl"
        start = time.perf_counter()
        bar = tr._progress(t.steps)
        while tr.step < end:
            m = self.train_step()
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", cv_load=f"{m['cv_load']:.3f}")
                bar.update(1)
            if tr.save_checkpoints and (tr.step % t.eval_every == 0 or tr.step == t.steps):
                self.sync()
                tr._log_eval(log_path, m)
            if tr.save_checkpoints and (tr.step % t.checkpoint_every == 0 or tr.step == end):
                self.save()
        if bar is not None:
            bar.close()
        self.sync()
        test = evaluate_tasks(self.model, self.data, "test")
        where = ckpt.list_checkpoints(tr.ckpt_root)[-1] if tr.save_checkpoints else None
        return TrainResult(tr.step, test, where, dict(tr.sampler.seen), time.perf_counter() - start)


def train_with_jax(
    config: Config, data: list[TaskData], out_dir: str | Path, *, data_source: dict[str, Any] | None = None,
    resume: bool = False, stop_at: int | None = None, echo=print,
) -> tuple[TrainResult, JaxTrainer]:
    """One call for the CLI: train with the JAX backend; returns the result and the trainer
    (its `.model` is the trained numpy model, for baselines and the profile)."""
    trainer = JaxTrainer(config, data, out_dir, data_source=data_source, echo=echo)
    return trainer.train(resume=resume, stop_at=stop_at), trainer
