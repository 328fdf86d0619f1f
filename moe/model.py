"""MultiTaskMoE: input encoders per domain, shared pre-norm residual MoE blocks, heads per task.

    x_t [n_t, d_in] -> encoder of t's input space -> h [B, d_model]   (tasks stacked in batch order)
    for each block:  h = h + MoE(LayerNorm(h), task embedding)        (the gate sees the embedding)
    LayerNorm(h)[rows of t] -> head_t -> outputs of task t

Tasks of one domain (the same images, the same feature table) share its encoder, so a task
owns only its embedding and its head; a task without a domain has an encoder of its own.
Per-task and per-domain parameters live in tables (moe.tables): encoders stacked by input
width, heads stacked by shape, embeddings in one [T, d_t] table. A batch touches only the
rows of the tasks and domains in it, whatever the number of tasks the model holds.

A batch is a list of `Chunk`s, one per task present, so inputs of different widths travel
together through the shared blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

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


def head_key(n_outputs: int, hidden: int) -> str:
    """The head table a task's head lives in: linear ("o3") or an MLP ("h64o3")."""
    return f"h{hidden}o{n_outputs}" if hidden else f"o{n_outputs}"


@dataclass(frozen=True)
class _Group:
    """The chunks of a batch that use one table: their positions in the batch and their runs."""

    chunks: list[int]
    pos: np.ndarray  # int64 [n_g]: batch rows, in the order the table sees them
    runs: Runs


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
        dtype=np.float32,
    ) -> None:
        """head_hidden: tasks whose head is an MLP with this hidden width (others: linear)."""
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
        many fresh experts to every block. Existing rows and experts are kept bit for bit."""
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
            for layer in self.layers:
                layer.grow_experts(grow_experts, rng=rng)
            self.config = dataclasses.replace(self.config, n_experts=self.config.n_experts + grow_experts)
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

    def _groups(self, ids: np.ndarray, bounds: np.ndarray) -> tuple[dict[int, _Group], dict[str, _Group]]:
        """Which chunks each encoder table and each head table sees, and in what order."""
        def group(members: list[int], rows: list[int]) -> _Group:
            # chunks with the same row are made adjacent (stable), so each row is one run
            order = sorted(range(len(members)), key=lambda j: rows[j])
            chunks = [members[j] for j in order]
            pos = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in chunks])
            run_rows, run_sizes = [], []
            for j in order:
                n = int(bounds[members[j] + 1] - bounds[members[j]])
                if run_rows and run_rows[-1] == rows[j]:
                    run_sizes[-1] += n
                else:
                    run_rows.append(rows[j])
                    run_sizes.append(n)
            return _Group(chunks, pos, Runs.of(np.array(run_rows), np.array(run_sizes)))

        enc_members: dict[int, tuple[list[int], list[int]]] = {}
        head_members: dict[str, tuple[list[int], list[int]]] = {}
        for i, tid in enumerate(ids):
            spec = self.tasks.spec(int(tid))
            m = enc_members.setdefault(spec.n_inputs, ([], []))
            m[0].append(i)
            m[1].append(self.space_row[spec.input_space])
            key, row = self.head_row[int(tid)]
            h = head_members.setdefault(key, ([], []))
            h[0].append(i)
            h[1].append(row)
        return ({w: group(*m) for w, m in enc_members.items()},
                {k: group(*m) for k, m in head_members.items()})

    def forward(
        self,
        chunks: list[Chunk],
        *,
        train: bool = True,
        rng: np.random.Generator | None = None,
        moe_off: bool = False,
        grad: bool | None = None,
        routing: str = "topk",
    ) -> ModelOutput:
        """moe_off=True leaves every MoE block's output out (the ablation "without experts").
        grad: keep what backward needs (default: when training); see MoELayer.forward.
        routing="balanced" routes with capacity-bounded balanced assignment (inference only;
        see moe.routing.balanced)."""
        ids = self._check_chunks(chunks)
        sizes = np.array([ch.x.shape[0] for ch in chunks], dtype=np.int64)
        bounds = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        enc_groups, head_groups = self._groups(ids, bounds)
        h = np.empty((int(bounds[-1]), self.config.d_model), dtype=self.dtype)  # [B, d]
        for width, g in enc_groups.items():
            x = np.concatenate([chunks[i].x for i in g.chunks])  # [n_g, d_in]
            h[g.pos] = self.encoders[width].forward(x, g.runs)  # [n_g, d]
        uses_emb = any(layer.d_gate_extra for layer in self.layers) and not moe_off
        emb = self.task_emb.forward(Runs.of(ids, sizes)) if uses_emb else None  # [B, d_t]
        routings = []
        if not moe_off:
            for ln, layer in self.blocks:
                z = ln.forward(h)  # [B, d]
                y, r = layer.forward(z, emb if layer.d_gate_extra else None, train=train, rng=rng,
                                     grad=grad, routing=routing)
                h = h + y  # [B, d]
                routings.append(r)
        hf = self.final_ln.forward(h)  # [B, d]
        outs: list[np.ndarray | None] = [None] * len(chunks)
        for key, g in head_groups.items():
            y = self.heads[key].forward(hf[g.pos], g.runs)  # [n_g, n_out]
            off = 0
            for i in g.chunks:
                outs[i] = y[off : off + sizes[i]]
                off += sizes[i]
        self._cache = (enc_groups, head_groups, bounds, moe_off, uses_emb)
        return ModelOutput(outs, routings, float(sum(r.aux_loss for r in routings)))

    def backward(self, d_outputs: list[np.ndarray]) -> None:
        """Gradients of (task losses + aux losses) into self.grads; d_outputs as from forward.

        Only the rows of tables this batch used get gradients; every other row's gradient is 0."""
        if self._cache is None:
            raise ValueError("model backward called before forward")
        enc_groups, head_groups, bounds, moe_off, uses_emb = self._cache
        self._cache = None
        if moe_off:
            raise ValueError("backward through a forward with moe_off=True is not supported")
        for table in self.tables().values():
            table.zero_grad()
        d_hf = np.empty((int(bounds[-1]), self.config.d_model), dtype=self.dtype)  # [B, d]
        for key, g in head_groups.items():
            dy = np.concatenate([d_outputs[i] for i in g.chunks])  # [n_g, n_out]
            d_hf[g.pos] = self.heads[key].backward(dy)
        dh = self.final_ln.backward(d_hf)  # [B, d]
        d_emb = np.zeros((dh.shape[0], self.config.d_task_emb), dtype=self.dtype)  # [B, d_t]
        for ln, layer in reversed(self.blocks):
            dz = layer.backward(dh)  # [B, d]
            dh = dh + ln.backward(dz)
            if layer.grad_task_emb is not None:
                d_emb += layer.grad_task_emb
        for width, g in enc_groups.items():
            self.encoders[width].backward(dh[g.pos])
        if uses_emb:
            self.task_emb.backward(d_emb)


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
