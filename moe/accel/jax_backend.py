"""The JAX/XLA backend: run a MultiTaskMoE on whatever JAX devices exist, expert-parallel.

    jm = JaxMoE(moe.load("runs/x"))          # or JaxMoE(live_model, mesh=make_mesh(8))
    out = jm.forward(chunks, train=False)     # outputs, routings, aux loss (numpy)
    loss, aux, grads = jm.loss_and_grads(chunks, eps=...)   # grads keyed like model.params
    jm.write_back(model)                      # parameters back into the numpy model

The mesh has one axis, "expert": examples are split over it (data parallel) and so are the
experts (expert parallel); the MoE layers exchange rows with all_to_all inside shard_map
(moe.accel.jax_layer). Inputs are placed with NamedSharding before each call.
Only moe.accel.jax_* import jax; the core never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe.accel.jax_layer import AXIS
from moe.accel.jax_model import ModelSpec, forward, loss_fn, pack_batch, spec_of
from moe.model import Chunk, MultiTaskMoE


def make_mesh(n_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh over the first n_devices JAX devices (all by default), axis "expert"."""
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs) if n_devices is None else n_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"n_devices must be in [1, {len(devs)}] (the JAX devices present), got {n}")
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=devs[:n])


def is_expert_param(name: str) -> bool:
    return ".moe.experts." in name


def param_shardings(mesh: Mesh, names) -> dict[str, NamedSharding]:
    """Experts split over the mesh along their leading (expert) axis; everything else replicated."""
    return {n: NamedSharding(mesh, P(AXIS) if is_expert_param(n) else P()) for n in names}


def check_fits(spec: ModelSpec, mesh: Mesh, batch: int | None = None) -> None:
    n = mesh.shape[AXIS]
    for i, layer in enumerate(spec.layers):
        if layer.n_experts % n:
            raise ValueError(f"block {i} has {layer.n_experts} experts, which do not divide evenly "
                             f"over the {n} devices of mesh axis {AXIS!r}")
    if batch is not None and batch % n:
        raise ValueError(f"a batch of {batch} rows does not divide evenly over the {n} devices "
                         f"of mesh axis {AXIS!r}")


@dataclass(frozen=True)
class JaxOutput:
    outputs: list[np.ndarray]  # one [n_t, n_outputs_t] per chunk, as MultiTaskMoE.forward
    routings: list[dict[str, np.ndarray]]  # per block: expert_index, keep, gates, importance, load, counts
    aux_loss: float
    loss: float | None = None  # task loss + aux (only from loss_and_grads)


class JaxMoE:
    """A MultiTaskMoE's parameters on a device mesh, with jitted forward and gradient."""

    def __init__(self, model: MultiTaskMoE, mesh: Mesh | None = None) -> None:
        for i, layer in enumerate(model.layers):
            if not hasattr(layer.experts, "params"):
                raise ValueError(f"block {i}'s experts are remote ({type(layer.experts).__name__}); "
                                 "the JAX backend needs the expert weights in this process")
        self.spec = spec_of(model)
        self.mesh = make_mesh() if mesh is None else mesh
        check_fits(self.spec, self.mesh)
        self.shardings = param_shardings(self.mesh, model.params)
        self.params = {n: jax.device_put(np.asarray(p), self.shardings[n]) for n, p in model.params.items()}
        self.row = NamedSharding(self.mesh, P(AXIS))
        spec, mesh_ = self.spec, self.mesh
        self._forward = jax.jit(lambda p, tid, x, eps: forward(spec, mesh_, p, tid, x, eps))
        self._grad = jax.jit(jax.value_and_grad(
            lambda p, tid, x, y, eps: loss_fn(spec, mesh_, p, tid, x, y, eps), has_aux=True))

    @classmethod
    def from_checkpoint(cls, path: str | Path, mesh: Mesh | None = None) -> JaxMoE:
        from moe.api import load

        return cls(load(path), mesh)

    # ------------------------------------------------------------------ helpers
    def place(self, tid: np.ndarray, x: np.ndarray, y: np.ndarray | None = None):
        """Put a packed batch on the mesh, split over rows."""
        check_fits(self.spec, self.mesh, tid.shape[0])
        out = [jax.device_put(tid, self.row), jax.device_put(x, self.row)]
        if y is not None:
            out.append(jax.device_put(y, self.row))
        return out

    def _eps(self, B: int, train: bool, eps, key) -> tuple:
        """Per layer: the gate noise [B, E] (noisy gates while training) or None."""
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
            return tuple(jax.device_put(np.asarray(e, np.float32), self.row) if need else None
                         for e, need in zip(eps, noisy, strict=True))
        if any(noisy) and key is None:
            raise ValueError("a noisy gate needs noise while training: pass eps or a jax PRNG key")
        return tuple(
            jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (B, layer.n_experts)), self.row)
            if need else None
            for i, (layer, need) in enumerate(zip(self.spec.layers, noisy, strict=True))
        )

    @staticmethod
    def _routings(rs) -> list[dict[str, np.ndarray]]:
        return [{k: np.asarray(v) for k, v in r.items()} for r in rs]

    def _split(self, chunks: list[Chunk], outs) -> list[np.ndarray]:
        res, r = [], 0
        for ch in chunks:
            n = ch.x.shape[0]
            res.append(np.asarray(outs[self.spec.task_id(ch.task)][r : r + n]))
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
        return out, {n: np.asarray(g) for n, g in grads.items()}

    def write_back(self, model: MultiTaskMoE) -> None:
        """Copy the parameters into a numpy model of the same structure (in place)."""
        for n, p in model.params.items():
            if n not in self.params:
                raise ValueError(f"numpy model has parameter {n!r} that the JAX model lacks")
            src = np.asarray(self.params[n])
            if src.shape != p.shape:
                raise ValueError(f"parameter {n!r}: numpy {list(p.shape)}, JAX {list(src.shape)}")
            p[...] = src

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(p) for n, p in self.params.items()}

