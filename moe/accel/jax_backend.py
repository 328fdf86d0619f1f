"""The JAX/XLA backend: run a MultiTaskMoE on a data x expert mesh of JAX devices.

    jm = JaxMoE(moe.load("runs/x"))                    # all devices as EP n x DP 1
    jm = JaxMoE(model, layout=read_plan("plan.json"))  # the plan's EP x DP, capacity, placement
    out = jm.forward(chunks, train=False)               # outputs, routings, aux loss (numpy)
    loss, aux, grads = jm.loss_and_grads(chunks, eps=...)   # grads keyed like model.params
    jm.write_back(model)                                # parameters back into the numpy model

The mesh has two axes, "data" and "expert" (moe.accel.jax_layer). Rows are split over all
devices; experts over "expert". A plan's placement (expert -> EP rank) is realised by
storing the experts in *slot order* on the devices (slot j holds expert `order[j]`, EP rank
j // (E / ep) holds its block of slots): expert weights, the gates' columns and the routing
records are permuted at this boundary and nowhere else, so the layer code only ever sees
contiguous blocks. Everything crossing the boundary works with several processes
(jax.distributed): each process puts only its own shards on its devices and `host` gathers
a sharded array back when a process needs all of it.
Only moe.accel.jax_* import jax; the core never does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe.accel.jax_layer import DATA, EXPERT, ROWS
from moe.accel.jax_model import ModelSpec, draw_noise, forward, loss_fn, pack_batch, spec_of
from moe.accel.layout import Layout
from moe.model import Chunk, MultiTaskMoE


def make_mesh(n_devices: int | None = None, devices=None, *, dp: int = 1) -> Mesh:
    """A dp x ep mesh (axes "data", "expert") over the first n_devices JAX devices (all by
    default; ep = n_devices / dp). Devices are taken in process order, so a mesh over the
    same number of devices has the same layout whatever the number of processes."""
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs) if n_devices is None else n_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"n_devices must be in [1, {len(devs)}] (the JAX devices present), got {n}")
    if dp < 1 or n % dp:
        raise ValueError(f"dp={dp} must divide the {n} devices of the mesh")
    devs = sorted(devs[:n], key=lambda d: (d.process_index, d.id))
    return jax.make_mesh((dp, n // dp), (DATA, EXPERT), axis_types=(AxisType.Auto,) * 2, devices=devs)


def mesh_for(layout: Layout | None) -> Mesh:
    """The mesh a plan asks for, refusing (one line) a plan made for another device count."""
    if layout is None:
        return make_mesh()
    kinds = sorted({d.device_kind for d in jax.devices()})
    layout.check_devices(jax.device_count(), f"{jax.device_count()} x {'/'.join(kinds)} over "
                         f"{jax.process_count()} process(es)")
    return make_mesh(dp=layout.dp)


def describe_mesh(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return (f"mesh DP {mesh.shape[DATA]} x EP {mesh.shape[EXPERT]} over {mesh.devices.size} x {d.device_kind} "
            f"({jax.process_count()} process(es))")


def is_expert_param(name: str) -> bool:
    return ".moe.experts." in name


def is_gate_param(name: str) -> bool:
    return ".moe.gate." in name


def param_shardings(mesh: Mesh, names) -> dict[str, NamedSharding]:
    """Experts split over "expert" along their leading (expert) axis; everything else replicated."""
    return {n: NamedSharding(mesh, P(EXPERT) if is_expert_param(n) else P()) for n in names}


def check_fits(spec: ModelSpec, mesh: Mesh, batch: int | None = None) -> None:
    ep, n = mesh.shape[EXPERT], mesh.devices.size
    for i, layer in enumerate(spec.layers):
        if layer.n_experts % ep:
            raise ValueError(f"block {i} has {layer.n_experts} experts, which do not divide evenly "
                             f"over the {ep} devices of mesh axis {EXPERT!r}")
    if batch is not None and batch % n:
        raise ValueError(f"a batch of {batch} rows does not divide evenly over the {n} devices of the mesh")


def to_devices(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds; each process transfers only the
    shards of its own devices."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def host(a: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded, multi-process) array on this host. With several
    processes this is a collective: every process must call it."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    if a.sharding.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


@dataclass(frozen=True)
class JaxOutput:
    outputs: list[np.ndarray]  # one [n_t, n_outputs_t] per chunk, as MultiTaskMoE.forward
    routings: list[dict[str, np.ndarray]]  # per block: expert_index, keep, gates, importance, load, counts
    aux_loss: float
    loss: float | None = None  # task loss + aux (only from loss_and_grads)


class JaxMoE:
    """A MultiTaskMoE's parameters on a device mesh, with jitted forward and gradient.

    layout: an executable plan (moe.accel.layout); it sets the mesh (unless `mesh` is given),
    the per-device GShard capacity and the expert placement. Without one, every device is
    expert-parallel (EP n x DP 1) and capacity is numpy's, over the whole batch."""

    def __init__(self, model: MultiTaskMoE, mesh: Mesh | None = None, layout: Layout | None = None) -> None:
        for i, layer in enumerate(model.layers):
            if not hasattr(layer.experts, "params"):
                raise ValueError(f"block {i}'s experts are remote ({type(layer.experts).__name__}); "
                                 "the JAX backend needs the expert weights in this process")
        spec = spec_of(model)
        if layout is not None:
            layout.check_model(dataclasses.asdict(model.config))
            spec = dataclasses.replace(spec, layers=tuple(
                dataclasses.replace(s, capacity_factor=layout.capacity_factor, capacity_scope="device")
                for s in spec.layers))
        self.spec, self.layout = spec, layout
        self.mesh = mesh_for(layout) if mesh is None else mesh
        check_fits(self.spec, self.mesh)
        E = model.config.n_experts
        self.order = np.arange(E) if layout is None else layout.expert_order(E)  # slot -> expert id
        self.slot_of = np.argsort(self.order)  # expert id -> slot
        self.shardings = param_shardings(self.mesh, model.params)
        self.params = self.put_params(model.params)
        self.row = NamedSharding(self.mesh, P(ROWS))
        spec, mesh_ = self.spec, self.mesh
        self._noise = jax.jit(lambda key, B: draw_noise(spec, mesh_, key, B), static_argnums=1)
        self._forward = jax.jit(lambda p, tid, x, eps: forward(spec, mesh_, p, tid, x, eps))
        self._grad = jax.jit(jax.value_and_grad(
            lambda p, tid, x, y, eps: loss_fn(spec, mesh_, p, tid, x, y, eps), has_aux=True))

    @classmethod
    def from_checkpoint(cls, path: str | Path, mesh: Mesh | None = None, layout: Layout | None = None) -> JaxMoE:
        from moe.api import load

        return cls(load(path), mesh, layout)

    # ------------------------------------------------------------------ the placement boundary
    def to_slots(self, name: str, a: np.ndarray) -> np.ndarray:
        """A numpy-model array (experts in id order) in device slot order."""
        if is_expert_param(name):
            return a[self.order]
        if is_gate_param(name):
            return a[:, self.order]
        return a

    def from_slots(self, name: str, a: np.ndarray) -> np.ndarray:
        if is_expert_param(name):
            return a[self.slot_of]
        if is_gate_param(name):
            return a[:, self.slot_of]
        return a

    def experts_from_slots(self, v: np.ndarray) -> np.ndarray:
        """A per-expert vector [E] (importance, load, counts) from slot order to expert ids."""
        return v[self.slot_of]

    def put_params(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Numpy-model arrays (params, or Adam moments keyed the same) onto the mesh."""
        return {n: to_devices(self.to_slots(n, np.asarray(a)), self.shardings[n]) for n, a in arrays.items()}

    def get_params(self, arrays: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """The inverse of put_params (a collective with several processes)."""
        return {n: self.from_slots(n, host(a)) for n, a in arrays.items()}

    # ------------------------------------------------------------------ helpers
    def place(self, tid: np.ndarray, x: np.ndarray, y: np.ndarray | None = None):
        """Put a packed batch on the mesh, split over rows."""
        check_fits(self.spec, self.mesh, tid.shape[0])
        out = [to_devices(tid, self.row), to_devices(x, self.row)]
        if y is not None:
            out.append(to_devices(y, self.row))
        return out

    def _eps(self, B: int, train: bool, eps, key) -> tuple:
        """Per layer: the gate noise [B, E] in slot order (noisy gates while training) or None.
        eps given by the caller is in expert-id order, as numpy draws it."""
        noisy = [train and layer.noisy for layer in self.spec.layers]
        if eps is not None:
            eps = list(eps)
            if len(eps) != len(noisy):
                raise ValueError(f"eps needs one entry per MoE block ({len(noisy)}), got {len(eps)}")
            for i, (e, need) in enumerate(zip(eps, noisy, strict=True)):
                E = self.spec.layers[i].n_experts
                if need and (e is None or np.shape(e) != (B, E)):
                    raise ValueError(f"block {i} needs gate noise of shape {[B, E]}, got "
                                     f"{None if e is None else list(np.shape(e))}")
            return tuple(to_devices(np.asarray(e, np.float32)[:, self.order], self.row) if need else None
                         for e, need in zip(eps, noisy, strict=True))
        if any(noisy) and key is None:
            raise ValueError("a noisy gate needs noise while training: pass eps or a jax PRNG key")
        return self._noise(key, B) if train else tuple(None for _ in noisy)

    def _routings(self, rs) -> list[dict[str, np.ndarray]]:
        """Routing records with expert ids (not slots)."""
        out = []
        for r in rs:
            d = {k: host(v) for k, v in r.items()}
            d["expert_index"] = self.order[d["expert_index"]].astype(np.int32)
            for k in ("importance", "load", "counts"):
                d[k] = self.experts_from_slots(d[k])
            out.append(d)
        return out

    def _split(self, chunks: list[Chunk], outs) -> list[np.ndarray]:
        """The padded outputs [B, n_max] back into one [n_t, n_outputs_t] per chunk."""
        full, res, r = host(outs), [], 0
        for ch in chunks:
            n = ch.x.shape[0]
            res.append(full[r : r + n, : self.spec.tasks[self.spec.task_id(ch.task)].n_outputs])
            r += n
        return res

    # ------------------------------------------------------------------ public
    def forward(self, chunks: list[Chunk], *, train: bool = False, eps=None, key=None) -> JaxOutput:
        """Outputs per chunk, routings and aux loss. eps: per block numpy noise (or None) to
        reproduce a numpy forward; else `key` draws it (noisy gates while training only)."""
        tid, x, _ = pack_batch(self.spec, chunks)
        tid_d, x_d = self.place(tid, x)
        outs, aux, rs = self._forward(self.params, tid_d, x_d, self._eps(tid.shape[0], train, eps, key))
        return JaxOutput(self._split(chunks, outs), self._routings(rs), float(aux))

    def loss_and_grads(
        self, chunks: list[Chunk], *, train: bool = True, eps=None, key=None
    ) -> tuple[JaxOutput, dict[str, np.ndarray]]:
        """Forward and jax.grad of (weighted task loss + aux loss) wrt every parameter."""
        tid, x, y = pack_batch(self.spec, chunks)
        args = self.place(tid, x, y)
        (loss, (_, aux, rs, outs)), grads = self._grad(self.params, *args, self._eps(tid.shape[0], train, eps, key))
        out = JaxOutput(self._split(chunks, outs), self._routings(rs), float(aux), float(loss))
        return out, self.get_params(grads)

    def write_back(self, model: MultiTaskMoE) -> None:
        """Copy the parameters into a numpy model of the same structure (in place)."""
        got = self.get_params(self.params)
        for n, p in model.params.items():
            if n not in got:
                raise ValueError(f"numpy model has parameter {n!r} that the JAX model lacks")
            if got[n].shape != p.shape:
                raise ValueError(f"parameter {n!r}: numpy {list(p.shape)}, JAX {list(got[n].shape)}")
            p[...] = got[n]

    def numpy_params(self) -> dict[str, np.ndarray]:
        return self.get_params(self.params)
