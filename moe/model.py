"""MultiTaskMoE: per-task adapters and heads around shared pre-norm residual MoE blocks.

    x_t [n_t, d_in_t] -> adapter_t -> h [B, d_model]            (tasks stacked in batch order)
    for each block:  h = h + MoE(LayerNorm(h), task embedding)   (the gate sees the embedding)
    LayerNorm(h)[rows of t] -> head_t -> outputs of task t

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
from moe.nn import MLP, Joined, LayerNorm, Linear
from moe.routing.types import Routing
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
    routings: list[Routing]  # one per block
    aux_loss: float


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
        self.config, self.tasks, self.dtype = config, tasks, np.dtype(dtype)
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
        self.adapters: dict[str, Linear] = {}
        self.heads: dict[str, Linear | MLP] = {}
        self.head_hidden: dict[str, int] = dict(head_hidden or {})
        self.task_emb: dict[str, np.ndarray] = {}
        self.task_emb_grad: dict[str, np.ndarray] = {}
        for spec in tasks:
            self._build_task(spec, rng)
        self._collect()
        self._cache = None

    # ------------------------------------------------------------------ structure
    def _build_task(self, spec: TaskSpec, rng: np.random.Generator) -> None:
        self.adapters[spec.name] = Linear(spec.n_inputs, self.config.d_model, rng=rng, dtype=self.dtype)
        hidden = self.head_hidden.get(spec.name, 0)
        if hidden:
            self.heads[spec.name] = MLP(self.config.d_model, hidden, spec.n_outputs, rng=rng, dtype=self.dtype)
        else:
            self.heads[spec.name] = Linear(self.config.d_model, spec.n_outputs, rng=rng, dtype=self.dtype)
        emb = rng.standard_normal(self.config.d_task_emb, dtype=self.dtype)
        self.task_emb[spec.name] = emb
        self.task_emb_grad[spec.name] = np.zeros_like(emb)

    def _collect(self) -> None:
        """Rebuild the flat params dict and the grads view (the modules' arrays, not copies)."""
        self.params: dict[str, np.ndarray] = {}
        parts: list[tuple[str, dict]] = []

        def add(prefix: str, module) -> None:
            for n in module.params:
                self.params[f"{prefix}.{n}"] = module.params[n]
            parts.append((f"{prefix}.", module.grads))

        for name in self.tasks.names:
            add(f"task.{name}.adapter", self.adapters[name])
            add(f"task.{name}.head", self.heads[name])
            self.params[f"task.{name}.emb"] = self.task_emb[name]
            parts.append((f"task.{name}.", {"emb": self.task_emb_grad[name]}))
        for i, (ln, layer) in enumerate(self.blocks):
            add(f"block{i}.ln", ln)
            add(f"block{i}.moe", layer)
        add("final_ln", self.final_ln)
        self.grads = Joined(parts)

    @property
    def layers(self) -> list[MoELayer]:
        return [layer for _, layer in self.blocks]

    def dense_param_names(self) -> list[str]:
        """Everything the coordinator updates itself (not the experts, which update where they live)."""
        return [n for n in self.params if ".moe.experts." not in n]

    def add_task(
        self,
        spec: TaskSpec,
        *,
        rng: np.random.Generator,
        init_from: str | None = None,
        grow_experts: int = 0,
        head_hidden: int = 0,
    ) -> None:
        """Register a new task with a fresh head (an MLP when head_hidden > 0); its adapter and
        embedding start from `init_from` (a task with the same input width) when given, else
        at random. `grow_experts` adds that many fresh experts to every block."""
        self.tasks.add(spec)
        if head_hidden:
            self.head_hidden[spec.name] = head_hidden
        self._build_task(spec, rng)
        if init_from is not None:
            src = self.tasks.spec(init_from)
            if src.n_inputs != spec.n_inputs:
                raise ValueError(
                    f"task {spec.name!r} has {spec.n_inputs} inputs; cannot start its adapter from "
                    f"{init_from!r} with {src.n_inputs}"
                )
            for n, p in self.adapters[init_from].params.items():
                self.adapters[spec.name].params[n][...] = p
            self.task_emb[spec.name][...] = self.task_emb[init_from]
        if grow_experts:
            for layer in self.layers:
                layer.grow_experts(grow_experts, rng=rng)
            self.config = dataclasses.replace(self.config, n_experts=self.config.n_experts + grow_experts)
        self._collect()

    # ------------------------------------------------------------------ forward / backward
    def forward(
        self, chunks: list[Chunk], *, train: bool = True, rng: np.random.Generator | None = None,
        grad: bool | None = None,
    ) -> ModelOutput:
        """grad: keep what backward needs (default: when training); see MoELayer.forward."""
        if not chunks:
            raise ValueError("a batch needs at least one chunk")
        if len({ch.task for ch in chunks}) != len(chunks):
            raise ValueError(f"each task may appear once per batch, got {[ch.task for ch in chunks]}")
        hs, embs, sizes = [], [], []
        for ch in chunks:
            if ch.task not in self.tasks:
                raise ValueError(f"unknown task {ch.task!r}; known tasks: {list(self.tasks.names)}")
            spec = self.tasks.spec(ch.task)
            if not isinstance(ch.x, np.ndarray) or ch.x.ndim != 2 or ch.x.shape[1] != spec.n_inputs:
                got = list(ch.x.shape) if isinstance(ch.x, np.ndarray) else type(ch.x).__name__
                raise ValueError(f"task {ch.task!r} has {spec.n_inputs} input features, got {got}")
            if ch.x.dtype != self.dtype:
                raise ValueError(f"task {ch.task!r}: inputs must be {self.dtype}, got {ch.x.dtype}")
            if not np.isfinite(ch.x).all():
                raise ValueError(f"task {ch.task!r}: inputs contain NaN or Inf")
            hs.append(self.adapters[ch.task].forward(ch.x))  # [n_t, d]
            embs.append(np.broadcast_to(self.task_emb[ch.task], (ch.x.shape[0], self.config.d_task_emb)))
            sizes.append(ch.x.shape[0])
        h = np.concatenate(hs, axis=0)  # [B, d]
        emb = np.ascontiguousarray(np.concatenate(embs, axis=0))  # [B, d_t]
        routings = []
        for ln, layer in self.blocks:
            z = ln.forward(h)  # [B, d]
            y, r = layer.forward(z, emb if layer.d_gate_extra else None, train=train, rng=rng, grad=grad)
            h = h + y  # [B, d]
            routings.append(r)
        hf = self.final_ln.forward(h)  # [B, d]
        bounds = np.cumsum([0] + sizes)
        outs = [self.heads[ch.task].forward(hf[bounds[i] : bounds[i + 1]]) for i, ch in enumerate(chunks)]
        self._cache = ([ch.task for ch in chunks], bounds)
        return ModelOutput(outs, routings, float(sum(r.aux_loss for r in routings)))

    def backward(self, d_outputs: list[np.ndarray]) -> None:
        """Gradients of (task losses + aux losses) into self.grads; d_outputs as from forward."""
        if self._cache is None:
            raise ValueError("model backward called before forward")
        names, bounds = self._cache
        self._cache = None
        for g in self.task_emb_grad.values():
            g[...] = 0
        for adapter in self.adapters.values():  # tasks absent from the batch get zero grads
            for g in adapter.grads.values():
                g[...] = 0
        for head in self.heads.values():
            for g in head.grads.values():
                g[...] = 0
        d_hf = np.concatenate(
            [self.heads[n].backward(d) for n, d in zip(names, d_outputs, strict=True)], axis=0
        )  # [B, d]
        dh = self.final_ln.backward(d_hf)  # [B, d]
        d_emb = np.zeros((dh.shape[0], self.config.d_task_emb), dtype=self.dtype)  # [B, d_t]
        for ln, layer in reversed(self.blocks):
            dz = layer.backward(dh)  # [B, d]
            dh = dh + ln.backward(dz)
            if layer.grad_task_emb is not None:
                d_emb += layer.grad_task_emb
        for i, n in enumerate(names):
            rows = slice(bounds[i], bounds[i + 1])
            self.adapters[n].backward(dh[rows])
            self.task_emb_grad[n] += d_emb[rows].sum(axis=0)

