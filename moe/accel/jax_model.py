"""MultiTaskMoE as a pure JAX function of (params, batch), the same maths as moe.model.

A mixed-task batch travels as one fixed-shape triple so a training run compiles once:
    tid int32 [B]          the task of each row (index into ModelSpec.tasks)
    x   float32 [B, Din]   inputs, zero-padded to the widest task
    y   float32 [B, Ymax]  targets, zero-padded (multiclass: the class id in column 0)
Parameter names are those of MultiTaskMoE.params (experts included), so converting either
way is a dict copy.

Per-task work touches only each row's own task (moe.model's tables): on each device (shard_map,
its own rows), the rows are sorted by their row of the encoder table of their input width
(and of their head table) and packed into static-shape blocks of one table row each, one
batched product per table (table_linear). So the program holds one product per encoder
width and per head shape whatever the number of tasks, and a step costs about
2 x b x d_in x d per width (not tasks x b, nor the b x d_in x d bytes of gathering every
row's weights). Rows of other widths or head shapes are masked with `where`, which is exact
(they add exact zeros to every gradient). Outputs are padded to the widest head [B, n_max];
the losses mask the padding. Why blocks and not the alternatives (per-task `where` over all
rows, every row gathering its weights, `lax.ragged_dot`, which XLA:CPU expands to every
group on every row): bench/jax_tasks.py, recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe.accel.jax_layer import ROWS, LayerSpec, moe_layer
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
    def n_out_max(self) -> int:
        return max(t.n_outputs for t in self.tasks)

    @property
    def y_width(self) -> int:
        return max(1 if t.kind == "multiclass" else t.n_outputs for t in self.tasks)

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tasks)}

    def task_id(self, name: str) -> int:
        if name not in self._ids:
            raise ValueError(f"unknown task {name!r}; the model has {len(self.tasks)} tasks "
                             f"(e.g. {[t.name for t in self.tasks[:5]]})")
        return self._ids[name]

    @functools.cached_property
    def widths(self) -> tuple[int, ...]:
        """Input widths: one encoder table each."""
        return tuple(sorted({t.n_inputs for t in self.tasks}))

    @functools.cached_property
    def head_keys(self) -> tuple[str, ...]:
        """Head shapes: one head table each."""
        return tuple(sorted({t.head_key for t in self.tasks}))

    @functools.cached_property
    def lut(self) -> dict[str, np.ndarray]:
        """Per-task constants the program indexes by tid: int32 / float32 [T]."""
        T = self.tasks
        out = {"width": np.array([t.n_inputs for t in T], np.int32),
               "enc_row": np.array([t.enc_row for t in T], np.int32),
               "head": np.array([self.head_keys.index(t.head_key) for t in T], np.int32),
               "head_row": np.array([t.head_row for t in T], np.int32),
               "n_out": np.array([t.n_outputs for t in T], np.int32),
               "kind": np.array([KINDS.index(t.kind) for t in T], np.int32),
               "weight": np.array([t.loss_weight for t in T], np.float32)}
        return out


KINDS = ("multiclass", "binary", "multilabel", "regression")


def table_rows(spec: ModelSpec, tid) -> dict[str, tuple]:
    """Per table (by the prefix of its parameter names): (each row's index into it [B], which
    rows use it [B] bool). Rows of other tables get index 0, masked out."""
    lut = {k: jnp.asarray(v) for k, v in spec.lut.items()}
    out = {"task.emb": (tid, jnp.ones(tid.shape, bool))}
    for w in spec.widths:
        use = lut["width"][tid] == w  # [B]
        out[f"enc.{w}"] = (jnp.where(use, lut["enc_row"][tid], 0), use)
    for k, key in enumerate(spec.head_keys):
        use = lut["head"][tid] == k  # [B]
        out[f"head.{key}"] = (jnp.where(use, lut["head_row"][tid], 0), use)
    return out


def touched_rows(spec: ModelSpec, params: dict, tid) -> dict[str, jax.Array]:
    """Per table: bool [R], the rows this batch uses (what lazy row-Adam updates)."""
    out = {}
    for prefix, (rows, use) in table_rows(spec, tid).items():
        R = next(v.shape[0] for n, v in params.items() if n.startswith(prefix + "."))
        out[prefix] = jnp.zeros(R, bool).at[jnp.where(use, rows, R)].set(True, mode="drop")
    return out


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


def draw_noise(spec: ModelSpec, mesh, key, B: int) -> tuple:
    """Per layer: standard normal gate noise [B, E] (noisy gates) or None, split over the rows
    of the mesh. Draws depend on (key, layer, B, E) only, not on the mesh: threefry is
    partitionable, so every layout and process count sees the same noise."""
    rows = NamedSharding(mesh, P(ROWS))
    return tuple(
        jax.lax.with_sharding_constraint(jax.random.normal(jax.random.fold_in(key, i), (B, layer.n_experts)), rows)
        if layer.noisy else None
        for i, layer in enumerate(spec.layers))


def layer_norm(x, g, b):
    mu = x.mean(axis=1, keepdims=True)  # [B, 1]
    xc = x - mu  # [B, d]
    inv = 1.0 / jnp.sqrt((xc * xc).mean(axis=1, keepdims=True) + LN_EPS)  # [B, 1]
    return xc * inv * g + b  # [B, d]


def block_shape(n_rows: int, n_table: int) -> tuple[int, int]:
    """(rows per block, blocks) for n_rows batch rows over a table of n_table rows.

    A batch uses at most U = min(n_table, n_rows) table rows; blocks of ceil(n_rows / U)
    rows each hold rows of one table row only, and sum_r ceil(n_r / blk) <= (n_rows - U) /
    blk + U blocks always suffice (each used row wastes less than one block). So the blocks
    hold at most about 2 x n_rows rows and gather at most about 2 x U weight rows."""
    used = max(1, min(n_table, n_rows))
    blk = -(-n_rows // used)
    return blk, (n_rows - used) // blk + used


@jax.custom_vjp
def take_rows(x, idx, keep, back, back_keep):
    """y[q] = x[idx[q]] where keep[q], else 0, for a map that reads each row of x at most
    once; back[j] is the q that reads row j (back_keep[j]: whether one does). Its transpose is
    the same kind of gather (dx[j] = dy[back[j]]), so neither direction is a scatter, which
    XLA:CPU runs one row at a time."""
    return jnp.where(keep[:, None], x[idx], 0)


def _take_rows_fwd(x, idx, keep, back, back_keep):
    return take_rows(x, idx, keep, back, back_keep), (idx, keep, back, back_keep)


def _take_rows_bwd(res, dy):
    idx, keep, back, back_keep = res
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731 (integer / bool inputs)
    return (jnp.where(back_keep[:, None], dy[back], 0), zero(idx), zero(keep), zero(back), zero(back_keep))


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def table_linear(x, w, b, rows):
    """Each batch row through its own row of a linear table: x [B, i], w [R, i, o], b [R, o],
    rows int [B] -> [B, o] (rows of other tables come with index 0; the caller masks them).

    Static-shape segments: the rows are sorted by table row and packed into blocks of one
    table row each (block_shape), each block is one [blk, i] x [i, o] product with its
    gathered weights, and the results go back to batch order. Cost: about 2 x B x i x o
    FLOPs and min(R, B) weight rows gathered, whatever R is, where gathering every batch
    row's weights would move B x i x o (too much for wide inputs) and running every table
    row on every batch row would cost R x B x i x o. The seam where per-task work is laid
    out: bench/jax_tasks.py measures the alternatives."""
    B, i = x.shape
    blk, nb = block_shape(B, w.shape[0])
    order = jnp.argsort(rows)  # [B] batch rows grouped by table row
    srow = rows[order]  # [B]
    count = jnp.bincount(rows, length=w.shape[0])  # [R]
    pos = jnp.arange(B) - (jnp.cumsum(count) - count)[srow]  # [B] place within its table row's run
    nblk = (count + blk - 1) // blk  # [R]
    q = ((jnp.cumsum(nblk) - nblk)[srow] + pos // blk) * blk + pos % blk  # [B] place in the blocks, ascending
    src = jnp.minimum(jnp.searchsorted(q, jnp.arange(nb * blk)), B - 1)  # [nb*blk] the sorted row there
    filled = q[src] == jnp.arange(nb * blk)  # [nb*blk]
    every, inv = jnp.ones(B, bool), jnp.argsort(order)  # [B]
    xs = take_rows(x, order, every, inv, every)  # [B, i] sorted
    xb = take_rows(xs, src, filled, q, every).reshape(nb, blk, i)  # [nb, blk, i]
    brow = srow[src.reshape(nb, blk)[:, 0]]  # [nb] each block's table row (its first slot's)
    yb = jnp.einsum("nbi,nio->nbo", xb, w[brow]) + b[brow][:, None, :]  # [nb, blk, o]
    ys = take_rows(yb.reshape(nb * blk, -1), q, every, src, filled)  # [B, o] sorted
    return take_rows(ys, inv, every, order, every)  # [B, o] batch order


def encode(spec: ModelSpec, params, tid, x):
    """One device's rows: inputs through each row's encoder row -> h [b, d]."""
    rows = table_rows(spec, tid)
    h = jnp.zeros((x.shape[0], spec.d_model), x.dtype)  # [b, d]
    for w in spec.widths:
        r, use = rows[f"enc.{w}"]
        a = table_linear(x[:, :w], params[f"enc.{w}.w"], params[f"enc.{w}.b"], r)  # [b, d]
        h = jnp.where(use[:, None], a, h)
    return h


def heads(spec: ModelSpec, params, tid, hf):
    """One device's rows: hf [b, d] through each row's head row -> [b, n_max] (columns past
    the task's outputs are 0)."""
    rows = table_rows(spec, tid)
    out = jnp.zeros((hf.shape[0], spec.n_out_max), hf.dtype)  # [b, n_max]
    for key in spec.head_keys:
        p, (r, use) = f"head.{key}", rows[f"head.{key}"]
        if f"{p}.w1" in params:
            a = jax.nn.relu(table_linear(hf, params[f"{p}.w1"], params[f"{p}.b1"], r))  # [b, h]
            o = table_linear(a, params[f"{p}.w2"], params[f"{p}.b2"], r)  # [b, n_out]
        else:
            o = table_linear(hf, params[f"{p}.w"], params[f"{p}.b"], r)  # [b, n_out]
        o = jnp.pad(o, ((0, 0), (0, spec.n_out_max - o.shape[1])))  # [b, n_max]
        out = jnp.where(use[:, None], o, out)
    return out


def on_rows(spec: ModelSpec, mesh, fn, prefix: str, params: dict, tid, a):
    """fn(spec, the tables under `prefix`, tid, a) on each device's own rows (shard_map):
    the sorting and blocking of table_linear stay local, where the partitioner would run
    them on the whole batch on every device."""
    tables = {n: v for n, v in params.items() if n.startswith(prefix)}
    body = functools.partial(fn, spec)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(ROWS), P(ROWS)), out_specs=P(ROWS))(tables, tid, a)


def forward(spec: ModelSpec, mesh, params: dict, tid, x, eps: tuple):
    """(params, batch) -> (outputs [B, n_max] padded per row to its task's outputs, aux, routings).

    eps: one entry per layer, the gate noise [B, E] (noisy gates while training) or None."""
    h = on_rows(spec, mesh, encode, "enc.", params, tid, x)  # [B, d]
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
    return on_rows(spec, mesh, heads, "head.", params, tid, hf), aux, routings


def row_losses(spec: ModelSpec, out, tid, y):
    """Each row's loss under its task's kind (moe.tasks.losses conventions), padding masked: [B]."""
    lut = {k: jnp.asarray(v) for k, v in spec.lut.items()}
    kind = lut["kind"][tid]  # [B]
    valid = jnp.arange(out.shape[1])[None, :] < lut["n_out"][tid][:, None]  # [B, n_max]
    logits = jnp.where(valid, out, jnp.finfo(out.dtype).min)  # [B, n_max]
    cls = jnp.clip(y[:, 0].astype(jnp.int32), 0, lut["n_out"][tid] - 1)  # [B]
    xent = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(out, cls[:, None], axis=1)[:, 0]  # [B]
    yy = jnp.pad(y, ((0, 0), (0, max(out.shape[1] - y.shape[1], 0))))[:, : out.shape[1]]  # [B, n_max]
    sq = 0.5 * jnp.sum(jnp.where(valid, jnp.square(out - yy), 0.0), axis=1)  # [B]
    bce = jnp.maximum(out, 0) - out * yy + jnp.log1p(jnp.exp(-jnp.abs(out)))  # [B, n_max] BCE with logits
    bce = jnp.sum(jnp.where(valid, bce, 0.0), axis=1)  # [B]
    return jnp.where(kind == KINDS.index("multiclass"), xent,
                     jnp.where(kind == KINDS.index("regression"), sq, bce))


def task_loss(spec: ModelSpec, out, tid, y):
    """sum_rows w_task(row) * loss(row) / B (moe.train.task_loss)."""
    w = jnp.asarray(spec.lut["weight"])[tid]  # [B]
    return jnp.sum(w * row_losses(spec, out, tid, y)) / tid.shape[0]


def loss_fn(spec: ModelSpec, mesh, params, tid, x, y, eps):
    """Task loss + aux loss (what moe.model.backward differentiates), with (task, aux, routings, outs)."""
    outs, aux, routings = forward(spec, mesh, params, tid, x, eps)
    task = task_loss(spec, outs, tid, y)
    return task + aux, (task, aux, routings, outs)
