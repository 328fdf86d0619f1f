"""MultiTaskMoE: input encoders per domain, shared pre-norm residual MoE blocks, heads per task.

    x_t [n_t, d_in] -> encoder of t's input space -> h [B, d_model]   (tasks stacked in batch order)
    for each block:  h = h + MoE(LayerNorm(h), task embedding)        (the gate sees the embedding)
    LayerNorm(h)[rows of t] -> head_t -> outputs of task t

Tasks of one domain (the same images, the same feature table) share its encoder, so a task
owns only its embedding and its head; a task without a domain has an encoder of its own.
Per-task and per-domain parameters live in tables (moe.tables): encoders stacked by input
width, heads stacked by shape, embeddings in one [T, d_t] table. A batch touches only the
rows of the tasks and domains in it, whatever the number of tasks the model holds.

A batch is packed (moe.batch.Batch: one input array per width, runs of rows per task) so
that its cost is set by its rows, not by the number of tasks in it; `forward(chunks)` takes
one `Chunk` per task present, packs them and runs the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moe.batch import Batch, Layout, TargetKey, layout, rows_by, run_slices, runs_of
from moe.config import ModelConfig
from moe.experts.protocol import ExpertGroup
from moe.layer import MoELayer
from moe.nn import Joined, LayerNorm
from moe.routing.types import Routing
from moe.tables import EmbeddingTable, LinearTable, MLPTable, Runs
from moe.tasks.spec import TaskRegistry, TaskSpec


@dataclass(frozen=True)
class Chunk:
    """The examples of one task in a batch: x [n, n_inputs], targets y (optional for inference)."""

    task: str
    x: np.ndarray
    y: np.ndarray | None = None


@dataclass(frozen=True)
class ModelOutput:
    outputs: list[np.ndarray]  # one [n_t, n_outputs_t] per chunk
    routings: list[Routing]  # one per block (none when the blocks were switched off)
    aux_loss: float
    features: np.ndarray | None = None  # [B, d_model]: what the heads read (final layer norm)


@dataclass(frozen=True)
class BatchOutput:
    outputs: dict[TargetKey, np.ndarray]  # (kind, n_outputs) -> [n_g, n_outputs], rows in batch order
    routings: list[Routing]
    aux_loss: float
    features: np.ndarray  # [B, d_model]
    layout: Layout  # where each row of the batch went


def head_key(n_outputs: int, hidden: int) -> str:
    """The head table a task's head lives in: linear ("o3") or an MLP ("h64o3")."""
    return f"h{hidden}o{n_outputs}" if hidden else f"o{n_outputs}"


@dataclass
class _Pass:
    """What backward needs from the last forward: where each encoder's and head's rows sat."""

    encoders: list[tuple[int, np.ndarray]]  # (width, batch rows in the table's order)
    heads: list[tuple[str, np.ndarray, list]]  # (head key, batch rows, target parts)
    layout: Layout
    moe_off: bool
    uses_emb: bool
    chunks: list[tuple[TargetKey, int, int]] | None = None  # forward(chunks): each chunk's slice


class MultiTaskMoE:
    """One sparse MoE model shared by every task. params: a flat dict of name -> array;
    grads: a read-only mapping with the same keys, read through from the modules (so local
    experts' dense gradients are built only if someone reads them)."""

    def __init__(
        self,
        config: ModelConfig,
        tasks: TaskRegistry,
        *,
        rng: np.random.Generator,
        expert_groups: list[ExpertGroup] | None = None,
        head_hidden: dict[str, int] | None = None,
        expert_owners: dict[str, list[int]] | None = None,
        dtype=np.float32,
    ) -> None:
        """head_hidden: tasks whose head is an MLP with this hidden width (others: linear).
        expert_owners: experts (ids, the same in every block) that only the named task may
        use, as `add_task(grow_experts=)` makes them; every other expert is shared."""
        if len(tasks) == 0:
            raise ValueError("a model needs at least one task")
        self.config, self.dtype = config, np.dtype(dtype)
        self.tasks = TaskRegistry()
        c = config
        uses_task = c.route_by in ("example+task", "task")
        self.blocks: list[tuple[LayerNorm, MoELayer]] = []
        for i, gate in enumerate(c.gates):
            layer = MoELayer(
                c.d_model, c.n_experts, c.d_hidden, k=c.k, gate=gate,
                capacity_factor=c.capacity_factor, w_importance=c.w_importance, w_load=c.w_load,
                w_z=c.w_z, rng=rng, d_gate_extra=c.d_task_emb if uses_task else 0,
                route_on_x=c.route_by != "task", activation=c.activation, dtype=self.dtype,
                experts=None if expert_groups is None else expert_groups[i],
            )
            self.blocks.append((LayerNorm(c.d_model, dtype=self.dtype), layer))
        self.final_ln = LayerNorm(c.d_model, dtype=self.dtype)
        self.head_hidden: dict[str, int] = dict(head_hidden or {})
        self.encoders: dict[int, LinearTable] = {}  # input width -> one row per input space
        self.heads: dict[str, LinearTable | MLPTable] = {}  # head_key -> one row per task
        self.task_emb = EmbeddingTable(np.zeros((0, c.d_task_emb), dtype=self.dtype))
        self.space_row: dict[str, int] = {}  # input space -> its row in encoders[width]
        self.head_row: list[tuple[str, int]] = []  # task id -> (head key, row)
        self._build_tasks(list(tasks), rng)
        # expert id -> the id of the only task that may route to it, -1 for a shared expert
        self.expert_owner = np.full(c.n_experts, -1, dtype=np.int64)  # [E]
        for name, ids in (expert_owners or {}).items():
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= c.n_experts):
                raise ValueError(f"experts owned by {name!r} must be in [0, {c.n_experts}), got {ids.tolist()}")
            self.expert_owner[ids] = self.tasks.id(name)
        self._collect()
        self._cache = None

    # ------------------------------------------------------------------ structure
    def _build_tasks(self, specs: list[TaskSpec], rng: np.random.Generator) -> None:
        """Register specs and draw their rows (per task: encoder if its space is new, head, embedding)."""
        enc: dict[int, list] = {}
        heads: dict[str, list] = {}
        embs = []
        for spec in specs:
            self.tasks.add(spec)
            if spec.input_space not in self.space_row:
                w = enc.setdefault(spec.n_inputs, [])
                base = self.encoders[spec.n_inputs].n_rows if spec.n_inputs in self.encoders else 0
                self.space_row[spec.input_space] = base + len(w)
                w.append(LinearTable.init_row(spec.n_inputs, self.config.d_model, rng, self.dtype))
            hidden = self.head_hidden.get(spec.name, 0)
            key = head_key(spec.n_outputs, hidden)
            rows = heads.setdefault(key, [])
            base = self.heads[key].n_rows if key in self.heads else 0
            self.head_row.append((key, base + len(rows)))
            rows.append(self._init_head(spec.n_outputs, hidden, rng))
            embs.append(rng.standard_normal(self.config.d_task_emb, dtype=self.dtype))
        for width, rows in enc.items():
            self.encoders[width] = _extend(self.encoders.get(width), rows, _linear_table)
        for key, rows in heads.items():
            self.heads[key] = _extend(self.heads.get(key), rows, _head_table)
        self.task_emb = EmbeddingTable(np.concatenate([self.task_emb.params["e"], np.stack(embs)]))
        self._index_rows()

    def _index_rows(self) -> None:
        """Per task id, for packed batches: its encoder row, its head table and row in it."""
        self._enc_row = np.array([self.space_row[s.input_space] for s in self.tasks], dtype=np.int64)  # [T]
        self._head_keys = list(self.heads)
        index = {k: i for i, k in enumerate(self._head_keys)}
        self._head_of = np.array([index[k] for k, _ in self.head_row], dtype=np.int64)  # [T]
        self._head_row = np.array([r for _, r in self.head_row], dtype=np.int64)  # [T]

    def _init_head(self, n_out: int, hidden: int, rng: np.random.Generator) -> tuple:
        d = self.config.d_model
        if hidden:
            return (*LinearTable.init_row(d, hidden, rng, self.dtype, gain=2.0),
                    *LinearTable.init_row(hidden, n_out, rng, self.dtype))
        return LinearTable.init_row(d, n_out, rng, self.dtype)

    def tables(self) -> dict[str, LinearTable | MLPTable | EmbeddingTable]:
        """Every per-task and per-domain table, by the prefix of its parameter names."""
        out: dict[str, LinearTable | MLPTable | EmbeddingTable] = {f"enc.{w}": t for w, t in self.encoders.items()}
        out.update({f"head.{k}": t for k, t in self.heads.items()})
        out["task.emb"] = self.task_emb
        return out

    def _collect(self) -> None:
        """Rebuild the flat params dict and the grads view (the modules' arrays, not copies)."""
        self.params: dict[str, np.ndarray] = {}
        parts: list[tuple[str, dict]] = []

        def add(prefix: str, module) -> None:
            for n in module.params:
                self.params[f"{prefix}.{n}"] = module.params[n]
            parts.append((f"{prefix}.", module.grads))

        for prefix, table in self.tables().items():
            add(prefix, table)
        for i, (ln, layer) in enumerate(self.blocks):
            add(f"block{i}.ln", ln)
            add(f"block{i}.moe", layer)
        add("final_ln", self.final_ln)
        self.grads = Joined(parts)

    def expert_owners(self) -> dict[str, list[int]]:
        """{task: the experts only it may use} (the `expert_owners` manifest key)."""
        out: dict[str, list[int]] = {}
        for e in np.flatnonzero(self.expert_owner >= 0).tolist():
            out.setdefault(self.tasks.names[int(self.expert_owner[e])], []).append(e)
        return out

    def _allowed(self, row_task: np.ndarray) -> np.ndarray | None:
        """bool [B, E]: the experts each row may use (None when every expert is shared)."""
        if not (self.expert_owner >= 0).any():
            return None
        owner = self.expert_owner[None, :]  # [1, E]
        return (owner < 0) | (owner == row_task[:, None])  # [B, E]

    @property
    def layers(self) -> list[MoELayer]:
        return [layer for _, layer in self.blocks]

    def set_noise_scale(self, scale: float) -> None:
        """Scale every gate's training noise std (moe.optim.noise_scale_at gives the schedule)."""
        for layer in self.layers:
            layer.gate.noise_scale = float(scale)

    def dense_param_names(self) -> list[str]:
        """Everything the coordinator holds (not the experts, which live where they run)."""
        return [n for n in self.params if ".moe.experts." not in n]

    def shared_param_names(self) -> list[str]:
        """Coordinator parameters every step updates: gates and layer norms (not the tables)."""
        prefixes = tuple(f"{p}." for p in self.tables())
        return [n for n in self.dense_param_names() if not n.startswith(prefixes)]

    def task_views(self, name: str, parts: tuple[str, ...] = ("head", "emb", "encoder")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Views (param, grad) of one task's own rows: its head, its embedding, and its encoder
        when the task has an input space of its own (a shared domain encoder is not the task's).

        The views stay valid until the tables grow (add_task)."""
        spec = self.tasks.spec(name)
        tid = self.tasks.id(name)
        views = {}
        if "head" in parts:
            key, row = self.head_row[tid]
            table = self.heads[key]
            for n, p in table.params.items():
                views[f"head.{key}.{n}[{row}]"] = (p[row], table.grads[n][row])
        if "emb" in parts:
            views[f"task.emb.e[{tid}]"] = (self.task_emb.params["e"][tid], self.task_emb.grads["e"][tid])
        if "encoder" in parts and spec.domain is None:
            row, table = self.space_row[spec.input_space], self.encoders[spec.n_inputs]
            for n, p in table.params.items():
                views[f"enc.{spec.n_inputs}.{n}[{row}]"] = (p[row], table.grads[n][row])
        return views

    def add_task(
        self,
        spec: TaskSpec,
        *,
        rng: np.random.Generator,
        init_from: str | None = None,
        grow_experts: int = 0,
        head_hidden: int = 0,
    ) -> None:
        """Register a new task with a fresh head (an MLP when head_hidden > 0). A task of a known
        domain reads through that domain's encoder; a task with its own input space gets an
        encoder started from `init_from`'s (a task with the same input width) when given, else
        at random, and its embedding starts from `init_from`'s too. `grow_experts` adds that
        many fresh experts to every block, owned by the new task: no other task can route to
        them, so every other task's outputs stay bit for bit. Existing rows and experts are
        kept bit for bit."""
        if head_hidden:
            self.head_hidden[spec.name] = head_hidden
        if init_from is not None:
            src = self.tasks.spec(init_from)
            if src.n_inputs != spec.n_inputs:
                raise ValueError(
                    f"task {spec.name!r} has {spec.n_inputs} inputs; cannot start its encoder from "
                    f"{init_from!r} with {src.n_inputs}"
                )
        self._build_tasks([spec], rng)
        if init_from is not None:
            src_id, new_id = self.tasks.id(init_from), self.tasks.id(spec.name)
            if spec.domain is None:
                enc = self.encoders[spec.n_inputs]
                src_row, new_row = self.space_row[src.input_space], self.space_row[spec.input_space]
                for p in enc.params.values():
                    p[new_row] = p[src_row]
            e = self.task_emb.params["e"]
            e[new_id] = e[src_id]
        if grow_experts:
            self.grow_experts(spec.name, grow_experts, rng=rng)
        self._collect()

    def own_encoder(self, name: str) -> None:
        """Give task `name` (of a shared domain) an encoder row of its own, started as a copy of
        its domain's row, so training it changes no other task (add-task's own adapter).
        Existing rows are kept bit for bit; the new row is appended."""
        spec = self.tasks.spec(name)
        if spec.domain is None:
            raise ValueError(f"task {name!r} already has an encoder of its own")
        table, src = self.encoders[spec.n_inputs], self.space_row[spec.input_space]
        new = self.tasks.give_own_space(name)
        self.space_row[new.input_space] = table.n_rows
        self.encoders[spec.n_inputs] = _concat(table, LinearTable(table.params["w"][src:src + 1].copy(),
                                                                  table.params["b"][src:src + 1].copy()))
        self._index_rows()
        self._collect()

    def grow_experts(self, name: str, m: int, *, rng: np.random.Generator) -> list[int]:
        """Append m fresh experts to every block, owned by task `name`; return their ids."""
        start = self.config.n_experts
        for layer in self.layers:
            layer.grow_experts(m, rng=rng)
        self.config = dataclasses.replace(self.config, n_experts=start + m)
        self.expert_owner = np.concatenate([self.expert_owner, np.full(m, self.tasks.id(name), dtype=np.int64)])
        self._collect()
        return list(range(start, start + m))

    def drop_last_experts(self, m: int) -> None:
        """Undo grow_experts: remove the last m experts of every block (the rest kept bit for bit)."""
        keep = self.config.n_experts - m
        if not 1 <= m <= self.config.n_experts - self.config.k or (self.expert_owner[keep:] < 0).any():
            raise ValueError(f"can only drop grown experts (at most {int((self.expert_owner >= 0).sum())}), got {m}")
        for layer in self.layers:
            layer.keep_experts(keep)
        self.config = dataclasses.replace(self.config, n_experts=keep)
        self.expert_owner = self.expert_owner[:keep].copy()
        self._collect()

    # ------------------------------------------------------------------ forward / backward
    def _check_chunks(self, chunks: list[Chunk]) -> np.ndarray:
        """Validate a batch; return each chunk's task id."""
        if not chunks:
            raise ValueError("a batch needs at least one chunk")
        ids = np.empty(len(chunks), dtype=np.int64)
        for i, ch in enumerate(chunks):
            if ch.task not in self.tasks:
                raise ValueError(f"unknown task {ch.task!r}; the model has {len(self.tasks)} tasks "
                                 f"(e.g. {list(self.tasks.names[:5])})")
            ids[i] = tid = self.tasks.id(ch.task)
            spec = self.tasks.spec(tid)
            if not isinstance(ch.x, np.ndarray) or ch.x.ndim != 2 or ch.x.shape[1] != spec.n_inputs:
                got = list(ch.x.shape) if isinstance(ch.x, np.ndarray) else type(ch.x).__name__
                raise ValueError(f"task {ch.task!r} has {spec.n_inputs} input features, got {got}")
            if ch.x.shape[0] == 0:
                raise ValueError(f"task {ch.task!r}: a chunk needs at least one example")
            if ch.x.dtype != self.dtype:
                raise ValueError(f"task {ch.task!r}: inputs must be {self.dtype}, got {ch.x.dtype}")
            if not np.isfinite(ch.x).all():
                raise ValueError(f"task {ch.task!r}: inputs contain NaN or Inf")
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError(f"each task may appear once per batch, got {[ch.task for ch in chunks]}")
        return ids

    def pack(self, chunks: list[Chunk]) -> Batch:
        """A list of Chunks (checked, each naming its task in errors) as one packed Batch, in
        the same row order; targets are packed when every chunk has them."""
        ids = self._check_chunks(chunks)
        starts = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([ch.x.shape[0] for ch in chunks], out=starts[1:])
        cols = self.tasks.columns()
        x = _stack_by(cols.n_inputs[ids], [ch.x for ch in chunks], lambda k: int(k))
        y = None
        if all(ch.y is not None for ch in chunks):
            y = _stack_by(cols.target[ids], [ch.y for ch in chunks], lambda k: cols.targets[k])
        return Batch(ids, starts, x, y)

    def check_batch(self, batch: Batch) -> Layout:
        """Validate a packed batch against this model; return where its rows go."""
        n_tasks, t, st = len(self.tasks), batch.tasks, batch.starts
        if not isinstance(t, np.ndarray) or t.ndim != 1 or t.dtype.kind not in "iu" or t.size == 0:
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, np.ndarray) else type(t).__name__
            raise ValueError(f"batch tasks must be a non-empty int array [u], got {got}")
        if t.min() < 0 or t.max() >= n_tasks:
            raise ValueError(f"batch task ids must be in [0, {n_tasks}), got [{t.min()}, {t.max()}]")
        if (not isinstance(st, np.ndarray) or st.shape != (t.size + 1,) or st.dtype.kind not in "iu"
                or st[0] != 0 or (np.diff(st) < 1).any()):
            got = f"{st.dtype}{list(st.shape)}" if isinstance(st, np.ndarray) else type(st).__name__
            raise ValueError(f"batch starts must be ints [{t.size + 1}] rising from 0 by at least 1 "
                             f"(each task needs an example), got {got}")
        if np.unique(t).size != t.size:
            raise ValueError(f"each task may appear once per batch, got task ids {t.tolist()[:10]}")
        lay = layout(t.astype(np.int64), st.astype(np.int64), self.tasks.columns())
        if not isinstance(batch.x, dict) or set(batch.x) != set(lay.width_rows):
            got = sorted(batch.x) if isinstance(batch.x, dict) else type(batch.x).__name__
            raise ValueError(f"batch inputs must be keyed by its tasks' input widths {sorted(lay.width_rows)}, got {got}")
        for w, rows in lay.width_rows.items():
            x = batch.x[w]
            if not isinstance(x, np.ndarray) or x.shape != (rows.size, w):
                got = list(x.shape) if isinstance(x, np.ndarray) else type(x).__name__
                raise ValueError(f"batch inputs of width {w}: expected [{rows.size}, {w}], got {got}")
            if x.dtype != self.dtype:
                raise ValueError(f"batch inputs of width {w} must be {self.dtype}, got {x.dtype}")
            if not np.isfinite(x).all():
                raise ValueError(f"batch inputs of width {w} contain NaN or Inf")
        return lay

    def forward(
        self,
        chunks: list[Chunk],
        *,
        train: bool = True,
        rng: np.random.Generator | None = None,
        moe_off: bool = False,
        grad: bool | None = None,
        routing: str = "topk",
        balance_factor: float = 1.25,
    ) -> ModelOutput:
        """moe_off=True leaves every MoE block's output out (the ablation "without experts").
        grad: keep what backward needs (default: when training); see MoELayer.forward.
        routing="balanced" routes with capacity-bounded balanced assignment, at most
        ceil(balance_factor * B * k / E) rows per expert (moe.routing.balanced); when training,
        the model trains through those seats (MoELayer.forward). The same computation as
        forward_batch(self.pack(chunks)), bit for bit, with one output array per chunk."""
        batch = self.pack(chunks)
        lay = layout(batch.tasks, batch.starts, self.tasks.columns())
        out = self._forward(batch, lay, train=train, rng=rng, moe_off=moe_off, grad=grad, routing=routing,
                            balance_factor=balance_factor)
        slices = run_slices(lay, batch.starts, batch.tasks, self.tasks.columns())
        self._cache.chunks = slices
        return ModelOutput([out.outputs[k][a:b] for k, a, b in slices], out.routings, out.aux_loss, out.features)

    def forward_batch(
        self,
        batch: Batch,
        *,
        train: bool = True,
        rng: np.random.Generator | None = None,
        moe_off: bool = False,
        grad: bool | None = None,
        routing: str = "topk",
        balance_factor: float = 1.25,
    ) -> BatchOutput:
        """forward over a packed batch (checked first): outputs per target group (kind, n_outputs)."""
        lay = self.check_batch(batch)
        return self._forward(batch, lay, train=train, rng=rng, moe_off=moe_off, grad=grad, routing=routing,
                             balance_factor=balance_factor)

    def _forward(self, batch: Batch, lay: Layout, *, train, rng, moe_off, grad, routing, balance_factor) -> BatchOutput:
        cols, row_task = self.tasks.columns(), lay.row_task
        h = np.empty((batch.n, self.config.d_model), dtype=self.dtype)  # [B, d]
        enc_cache = []
        for width, rows in lay.width_rows.items():
            order, table_rows, starts = runs_of(self._enc_row[row_task[rows]])
            pos = rows[order]  # [n_w] batch rows in the order the table sees them
            h[pos] = self.encoders[width].forward(batch.x[width][order], Runs(table_rows, starts))  # [n_w, d]
            enc_cache.append((width, pos))
        uses_emb = any(layer.d_gate_extra for layer in self.layers) and not moe_off
        emb = self.task_emb.forward(Runs(batch.tasks, batch.starts)) if uses_emb else None  # [B, d_t]
        routings = []
        if not moe_off:
            allowed = self._allowed(row_task)  # [B, E] or None
            for ln, layer in self.blocks:
                z = ln.forward(h)  # [B, d]
                y, r = layer.forward(z, emb if layer.d_gate_extra else None, train=train, rng=rng,
                                     grad=grad, routing=routing, balance_factor=balance_factor, allowed=allowed)
                h = h + y  # [B, d]
                routings.append(r)
        hf = self.final_ln.forward(h)  # [B, d]
        outs = {key: np.empty((rows.size, key[1]), dtype=self.dtype) for key, rows in lay.target_rows.items()}
        row_target = cols.target[row_task]  # [B]
        head_cache = []
        for k, rows in rows_by(self._head_of[batch.tasks], batch.sizes).items():
            order, table_rows, starts = runs_of(self._head_row[row_task[rows]])
            pos = rows[order]  # [n_k]
            key = self._head_keys[k]
            y = self.heads[key].forward(hf[pos], Runs(table_rows, starts))  # [n_k, n_out]
            parts = _parts(row_target[pos])
            for t, sel in parts:
                at = lay.rank[pos if sel is None else pos[sel]]
                outs[cols.targets[t]][at] = y if sel is None else y[sel]
            head_cache.append((key, pos, parts))
        self._cache = _Pass(enc_cache, head_cache, lay, moe_off, uses_emb)
        return BatchOutput(outs, routings, float(sum(r.aux_loss for r in routings)), hf, lay)

    def backward(self, d_outputs: list[np.ndarray]) -> None:
        """Gradients of (task losses + aux losses) into self.grads; d_outputs as from forward.

        Only the rows of tables this batch used get gradients; every other row's gradient is 0."""
        if self._cache is None:
            raise ValueError("model backward called before forward")
        slices = self._cache.chunks
        if slices is None:
            raise ValueError("the last forward was forward_batch: call backward_batch")
        if len(d_outputs) != len(slices):
            raise ValueError(f"expected one output gradient per chunk ({len(slices)}), got {len(d_outputs)}")
        d: dict[TargetKey, list[np.ndarray]] = {}
        for i, ((key, a, b), g) in enumerate(zip(slices, d_outputs, strict=True)):
            if not isinstance(g, np.ndarray) or g.shape != (b - a, key[1]):
                got = list(g.shape) if isinstance(g, np.ndarray) else type(g).__name__
                raise ValueError(f"output gradient of chunk {i}: expected [{b - a}, {key[1]}], got {got}")
            d.setdefault(key, []).append(g)
        self.backward_batch({k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in d.items()})

    def backward_batch(self, d_outputs: dict[TargetKey, np.ndarray]) -> None:
        """backward for forward_batch: d_outputs per target group, shaped like its outputs."""
        if self._cache is None:
            raise ValueError("model backward called before forward")
        last = self._cache
        lay = last.layout
        if last.moe_off:
            raise ValueError("backward through a forward with moe_off=True is not supported")
        for key, rows in lay.target_rows.items():
            g = d_outputs.get(key)
            if not isinstance(g, np.ndarray) or g.shape != (rows.size, key[1]):
                got = "nothing" if g is None else (list(g.shape) if isinstance(g, np.ndarray) else type(g).__name__)
                raise ValueError(f"output gradient of {key[0]} tasks with {key[1]} outputs: expected "
                                 f"[{rows.size}, {key[1]}], got {got}")
        self._cache = None
        for table in self.tables().values():
            table.zero_grad()
        targets = self.tasks.columns().targets
        d_hf = np.empty((lay.row_task.shape[0], self.config.d_model), dtype=self.dtype)  # [B, d]
        for key, pos, parts in last.heads:
            if parts[0][1] is None:
                dy = d_outputs[targets[parts[0][0]]][lay.rank[pos]]  # [n_k, n_out]
            else:
                dy = np.empty((pos.size, targets[parts[0][0]][1]), dtype=self.dtype)  # [n_k, n_out]
                for t, sel in parts:
                    dy[sel] = d_outputs[targets[t]][lay.rank[pos[sel]]]
            d_hf[pos] = self.heads[key].backward(dy)
        dh = self.final_ln.backward(d_hf)  # [B, d]
        d_emb = np.zeros((dh.shape[0], self.config.d_task_emb), dtype=self.dtype)  # [B, d_t]
        for ln, layer in reversed(self.blocks):
            dz = layer.backward(dh)  # [B, d]
            dh = dh + ln.backward(dz)
            if layer.grad_task_emb is not None:
                d_emb += layer.grad_task_emb
        for width, pos in last.encoders:
            self.encoders[width].backward(dh[pos])
        if last.uses_emb:
            self.task_emb.backward(d_emb)


def _stack_by(run_key: np.ndarray, arrays: list[np.ndarray], name) -> dict:
    """{name(key): the arrays of the runs with that key, concatenated in order}, keys in order of first appearance."""
    keys, first = np.unique(run_key, return_index=True)
    if keys.size == 1:
        return {name(keys[0]): arrays[0] if len(arrays) == 1 else np.concatenate(arrays)}
    out = {}
    for i in np.argsort(first, kind="stable"):
        sel = [a for a, k in zip(arrays, run_key.tolist(), strict=True) if k == keys[i]]
        out[name(keys[i])] = sel[0] if len(sel) == 1 else np.concatenate(sel)
    return out


def _parts(row_target: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
    """[(target index, bool mask of the rows with it, or None for all)] of some rows."""
    if (row_target == row_target[0]).all():
        return [(int(row_target[0]), None)]
    return [(int(t), row_target == t) for t in np.unique(row_target)]


def _linear_table(rows: list) -> LinearTable:
    return LinearTable(np.stack([w for w, _ in rows]), np.stack([b for _, b in rows]))


def _head_table(rows: list) -> LinearTable | MLPTable:
    if len(rows[0]) == 2:
        return _linear_table(rows)
    return MLPTable(_linear_table([r[:2] for r in rows]), _linear_table([r[2:] for r in rows]))


def _extend(table, rows: list, make):
    """A table holding the old rows (kept bit for bit) followed by the new ones."""
    new = make(rows)
    if table is None:
        return new
    if isinstance(table, MLPTable):
        return MLPTable(_concat(table.l1, new.l1), _concat(table.l2, new.l2))
    return _concat(table, new)


def _concat(a: LinearTable, b: LinearTable) -> LinearTable:
    return LinearTable(np.concatenate([a.params["w"], b.params["w"]]),
                       np.concatenate([a.params["b"], b.params["b"]]))
