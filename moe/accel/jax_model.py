"""MultiTaskMoE as a pure JAX function of (params, batch), the same maths as moe.model.

A mixed-task batch travels as one fixed-shape triple so a training run compiles once:
    tid int32 [B]          the task of each row (index into ModelSpec.tasks)
    x   float32 [B, Din]   inputs, zero-padded to the widest task
    y   float32 [B, Ymax]  targets, zero-padded (multiclass: the class id in column 0)
Per-task adapters, heads and losses are computed on every row and selected by tid with
`where`, which is exact (the unselected rows contribute exact zeros to every gradient).
Parameter names are those of MultiTaskMoE.params (experts included), so converting either
way is a dict copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from moe.accel.jax_layer import LayerSpec, moe_layer
from moe.model import Chunk, MultiTaskMoE

LN_EPS = 1e-5  # moe.nn.LayerNorm's default


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str
    n_inputs: int
    n_outputs: int
    loss_weight: float
    head_hidden: int  # 0: linear head
    head_key: str  # the head table (moe.model.head_key) and the task's row in it
    head_row: int
    enc_row: int  # the task's input space's row in the encoder table of its width


@dataclass(frozen=True)
class ModelSpec:
    """Everything static about a model: the compiled program depends on this and on shapes."""

    d_model: int
    d_task_emb: int
    uses_task: bool  # the gate sees the task embedding
    route_on_x: bool  # the gate sees the example
    layers: tuple[LayerSpec, ...]
    tasks: tuple[TaskInfo, ...]

    @property
    def d_in_max(self) -> int:
        return max(t.n_inputs for t in self.tasks)

    @property
    def y_width(self) -> int:
        return max(1 if t.kind == "multiclass" else t.n_outputs for t in self.tasks)

    def task_id(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise ValueError(f"unknown task {name!r}; known tasks: {[t.name for t in self.tasks]}")


def spec_of(model: MultiTaskMoE) -> ModelSpec:
    c = model.config
    layers = tuple(
        LayerSpec(layer.n_experts, layer.k, layer.gate_name, layer.capacity_factor,
                  layer.gate.w_importance, layer.gate.w_load, layer.gate.w_z, c.activation)
        for layer in model.layers
    )
    tasks = tuple(
        TaskInfo(s.name, s.kind, s.n_inputs, s.n_outputs, float(s.loss_weight),
                 int(model.head_hidden.get(s.name, 0)), *model.head_row[i], model.space_row[s.input_space])
        for i, s in enumerate(model.tasks)
    )
    return ModelSpec(c.d_model, c.d_task_emb, c.route_by in ("example+task", "task"),
                     c.route_by != "task", layers, tasks)


def pack_batch(spec: ModelSpec, chunks: list[Chunk]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks (in batch order) -> (tid [B], x [B, Din], y [B, Ymax]); y is zero without targets."""
    if not chunks:
        raise ValueError("a batch needs at least one chunk")
    B = sum(ch.x.shape[0] for ch in chunks)
    tid = np.empty(B, dtype=np.int32)
    x = np.zeros((B, spec.d_in_max), dtype=np.float32)
    y = np.zeros((B, spec.y_width), dtype=np.float32)
    r = 0
    for ch in chunks:
        t = spec.task_id(ch.task)
        info = spec.tasks[t]
        if ch.x.ndim != 2 or ch.x.shape[1] != info.n_inputs:
            raise ValueError(f"task {ch.task!r} has {info.n_inputs} input features, got {list(ch.x.shape)}")
        if ch.x.dtype != np.float32:
            raise TypeError(f"task {ch.task!r}: inputs must be float32, got {ch.x.dtype}")
        n = ch.x.shape[0]
        tid[r : r + n] = t
        x[r : r + n, : info.n_inputs] = ch.x
        if ch.y is not None:
            yy = np.asarray(ch.y)
            y[r : r + n, : (1 if yy.ndim == 1 else yy.shape[1])] = yy.reshape(n, -1)
        r += n
    return tid, x, y


def layer_norm(x, g, b):
    mu = x.mean(axis=1, keepdims=True)  # [B, 1]
    xc = x - mu  # [B, d]
    inv = 1.0 / jnp.sqrt((xc * xc).mean(axis=1, keepdims=True) + LN_EPS)  # [B, 1]
    return xc * inv * g + b  # [B, d]


def _head(info: TaskInfo, params, hf):
    p, r = f"head.{info.head_key}", info.head_row
    if info.head_hidden:
        a = jax.nn.relu(hf @ params[f"{p}.w1"][r] + params[f"{p}.b1"][r])  # [B, h]
        return a @ params[f"{p}.w2"][r] + params[f"{p}.b2"][r]  # [B, n_out]
    return hf @ params[f"{p}.w"][r] + params[f"{p}.b"][r]  # [B, n_out]


def forward(spec: ModelSpec, mesh, params: dict, tid, x, eps: tuple):
    """(params, batch) -> (outputs: per task [B, n_out_t] on every row, aux, routings).

    eps: one entry per layer, the gate noise [B, E] (noisy gates while training) or None."""
    h = jnp.zeros((x.shape[0], spec.d_model), x.dtype)  # [B, d]
    for t, info in enumerate(spec.tasks):
        p, r = f"enc.{info.n_inputs}", info.enc_row
        a = x[:, : info.n_inputs] @ params[f"{p}.w"][r] + params[f"{p}.b"][r]  # [B, d]
        h = jnp.where((tid == t)[:, None], a, h)
    emb = params["task.emb.e"][tid]  # [B, d_t]
    aux = jnp.zeros((), x.dtype)
    routings = []
    for i, lspec in enumerate(spec.layers):
        z = layer_norm(h, params[f"block{i}.ln.g"], params[f"block{i}.ln.b"])  # [B, d]
        if not spec.uses_task:
            xg = z
        else:
            xg = jnp.concatenate([z, emb], axis=1) if spec.route_on_x else emb  # [B, d_gate]
        pre = f"block{i}.moe."
        lp = {n[len(pre):].split(".", 1)[1]: v for n, v in params.items() if n.startswith(pre)}
        y, a_l, r = moe_layer(lspec, mesh, z, xg, eps[i], lp)
        h = h + y  # [B, d]
        aux = aux + a_l
        routings.append(r)
    hf = layer_norm(h, params["final_ln.g"], params["final_ln.b"])  # [B, d]
    outs = [_head(info, params, hf) for info in spec.tasks]
    return outs, aux, routings


def _row_loss(info: TaskInfo, out, y):
    """Per-row loss of one task on every row (moe.tasks.losses conventions)."""
    if info.kind == "multiclass":
        cls = jnp.clip(y[:, 0].astype(jnp.int32), 0, info.n_outputs - 1)  # [B]
        picked = jnp.take_along_axis(out, cls[:, None], axis=1)[:, 0]  # [B]
        return jax.nn.logsumexp(out, axis=1) - picked
    yy = y[:, : info.n_outputs]  # [B, L]
    if info.kind == "regression":
        return 0.5 * jnp.sum(jnp.square(out - yy), axis=1)
    per = jnp.maximum(out, 0) - out * yy + jnp.log1p(jnp.exp(-jnp.abs(out)))  # [B, L] BCE with logits
    return per.sum(axis=1)


def task_loss(spec: ModelSpec, outs, tid, y):
    """sum_t w_t * (n_t / B) * mean_t(loss) = sum_rows w_task(row) * loss(row) / B (moe.train.task_loss)."""
    B = tid.shape[0]
    total = jnp.zeros((), y.dtype)
    for t, info in enumerate(spec.tasks):
        rows = jnp.where(tid == t, _row_loss(info, outs[t], y), 0.0)  # [B]
        total = total + info.loss_weight * rows.sum() / B
    return total


def loss_fn(spec: ModelSpec, mesh, params, tid, x, y, eps):
    """Task loss + aux loss (what moe.model.backward differentiates), with (task, aux, routings, outs)."""
    outs, aux, routings = forward(spec, mesh, params, tid, x, eps)
    task = task_loss(spec, outs, tid, y)
    return task + aux, (task, aux, routings, outs)
