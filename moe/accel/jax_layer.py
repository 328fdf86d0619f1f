"""The MoE layer in JAX, expert-parallel over a data x expert device mesh (GShard), same maths as moe.layer.

The mesh has two axes, "data" (dp) and "expert" (ep). Examples are split over all dp x ep
devices; experts over the "expert" axis (E/ep per device) and replicated over "data".
Inside `jax.shard_map`, per device:

    gate (local rows)            -> expert_index [b, k], gate values [b, k]   (moe.routing.gates)
    capacity                     -> keep [b, k] and each assignment's send slot [b, k]
    dispatch                     -> send buffer [E, S, d]; all_to_all over "expert" -> [ep, E/ep, S, d]
    experts (local weights)      -> [E/ep, ep*S, d]
    return all_to_all            -> [E, S, d]; combine: y = sum_j gate_kept[b, j] * out[b, j]

Capacity has two scopes (LayerSpec.capacity_scope):
- "batch" (numpy's): every expert keeps at most C = ceil(cf * B * k / E) rows of the whole
  batch under one global priority (every example's first choice before any second choice,
  then example order), exactly as moe.bindings.reference.capacity_keep; counts are
  all-gathered over the mesh. A device may send one expert up to S = min(C, b) rows.
- "device" (GShard's, what moe.accel.cost prices and what an executable plan runs): each
  device keeps at most C = ceil(cf * b * k / E) of its own rows per expert, same priority
  order locally; no gather, and the buffers are S = min(C, b) rows.
Dropless layers use C = B (never binds). Balance statistics (importance, load, Switch
fractions, z-loss) are summed over the whole mesh with psum before the losses, so the aux
loss is that of the whole batch. Gradients come from jax.grad through all of this,
including the all_to_alls (and the psum over "data" of the replicated experts' gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jax.sharding import PartitionSpec as P

DATA, EXPERT = "data", "expert"
ROWS = (DATA, EXPERT)  # examples are split over both axes, data-major
TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one MoE layer (everything that shapes the compiled program)."""

    n_experts: int
    k: int
    gate: str  # "noisy_topk" | "softmax_topk" | "top1"
    capacity_factor: float | None
    w_importance: float
    w_load: float
    w_z: float
    activation: str  # "relu" | "gelu"
    capacity_scope: str = "batch"  # "batch" (numpy's) | "device" (GShard's), see the module docstring

    @property
    def noisy(self) -> bool:
        return self.gate == "noisy_topk"


def capacity(spec: LayerSpec, rows: int) -> int:
    """C = ceil(cf * rows * k / E) as moe.routing.capacity, for the rows the capacity covers (the
    batch, or one device's rows); dropless layers get C = rows (never binds)."""
    if spec.capacity_factor is None:
        return rows
    return int(math.ceil(spec.capacity_factor * rows * spec.k / spec.n_experts))


def cv_squared(v: jax.Array) -> jax.Array:
    """Var(v) / mean(v)^2 with the population variance; 0 for an all-zero or single-entry v."""
    E = v.shape[0]
    m = jnp.mean(v)
    if E < 2:
        return jnp.zeros((), v.dtype)
    safe = jnp.where(m == 0, 1.0, m)
    var = jnp.mean(jnp.square(v - m))
    return jnp.where(m == 0, 0.0, var / (safe * safe))


def _psum(x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, ROWS)


def gate_forward(spec: LayerSpec, xg, w_gate, w_noise, eps, batch: int):
    """Local rows of the gate. Returns (index [b,k], gates [b,k], importance [E], load [E], aux).

    eps [b, E] is the standard normal noise (noisy top-k while training), else None.
    `batch` is the global B (for means over the batch)."""
    E, k = spec.n_experts, spec.k
    clean = xg @ w_gate  # [b, E]
    noisy = spec.noisy and eps is not None
    if noisy:
        std = jax.nn.softplus(xg @ w_noise)  # [b, E]
        h = clean + eps * std  # [b, E]
    else:
        std, h = None, clean
    n_top = min(k + 1, E) if noisy else k
    top_value, top_index = jax.lax.top_k(h, n_top)  # [b, n_top]; ties: lower index first
    index = top_index[:, :k]  # [b, k]
    if k > 1:
        gates = jax.nn.softmax(top_value[:, :k], axis=1)  # [b, k]
    else:  # Switch: the single expert is scaled by its full-softmax probability
        gates = jnp.take_along_axis(jax.nn.softmax(h, axis=1), index, axis=1)  # [b, 1]
    onehot = jax.nn.one_hot(index, E, dtype=clean.dtype)  # [b, k, E]
    importance = _psum(jnp.einsum("bk,bke->e", gates, onehot))  # [E]
    counts = _psum(onehot.sum(axis=(0, 1)))  # [E] assignments before capacity
    aux = jnp.zeros((), clean.dtype)
    if spec.w_importance > 0:
        aux = aux + spec.w_importance * cv_squared(importance)
    if noisy:
        if k >= E:
            p_load = jnp.ones_like(clean)  # [b, E]
        else:
            in_topk = onehot.sum(axis=1) > 0  # [b, E]
            thr = jnp.where(in_topk, top_value[:, k, None], top_value[:, k - 1, None])  # [b, E]
            p_load = ndtr((clean - thr) / jnp.maximum(std, TINY))  # [b, E]
        load = _psum(p_load.sum(axis=0))  # [E]
        if spec.w_load > 0:
            aux = aux + spec.w_load * cv_squared(load)
    else:
        load = counts
        if spec.w_load > 0 and not spec.noisy:  # Switch surrogate E * sum f_i P_i
            p_mean = _psum(jax.nn.softmax(clean, axis=1).sum(axis=0)) / batch  # [E]
            f = jax.lax.stop_gradient(counts / counts.sum())  # [E]
            aux = aux + spec.w_load * E * jnp.dot(f, p_mean)
    if spec.w_z > 0:
        lse = jax.nn.logsumexp(clean, axis=1)  # [b]
        aux = aux + spec.w_z * _psum(jnp.sum(lse * lse)) / batch
    return index, gates, importance, load, aux


def capacity_slots(index, n_experts: int, cap: int, scope: str):
    """keep [b, k] under the GShard priority, and each assignment's local send slot [b, k].

    Rank-major order (all first choices, then all second choices, ...) with example order
    inside a rank. scope "batch": over the whole batch, this device's rows after those of
    lower-numbered devices (data-major over the mesh); scope "device": over this device's rows."""
    b, k = index.shape
    onehot = jax.nn.one_hot(index.T, n_experts, dtype=jnp.int32)  # [k, b, E] rank-major
    flat = onehot.reshape(k * b, n_experts)  # [k*b, E]
    local_pos = (jnp.cumsum(flat, axis=0) - flat).reshape(k, b, n_experts)  # [k, b, E]
    slot = (local_pos * onehot).sum(axis=2).T  # [b, k] rank-major order on this device
    if scope == "device":
        return slot < cap, slot
    local_counts = onehot.sum(axis=1)  # [k, E]
    everyone = jax.lax.all_gather(local_counts, ROWS)  # [n, k, E]
    me = jax.lax.axis_index(ROWS)
    n = everyone.shape[0]
    rank_totals = everyone.sum(axis=0)  # [k, E]
    before_rank = jnp.cumsum(rank_totals, axis=0) - rank_totals  # [k, E] earlier ranks, all devices
    lower_dev = (jnp.arange(n) < me).astype(jnp.int32)  # [n]
    before_dev = jnp.einsum("n,nke->ke", lower_dev, everyone)  # [k, E] same rank, earlier devices
    within = jnp.cumsum(onehot, axis=1) - onehot  # [k, b, E] earlier rows of this device, same rank
    pos = ((before_rank + before_dev)[:, None, :] + within) * onehot  # [k, b, E]
    keep = pos.sum(axis=2).T < cap  # [b, k]
    return keep, slot


def experts_forward(activation: str, x, w1, b1, w2, b2):
    """x [E_l, R, d] through each local expert -> [E_l, R, d]."""
    pre = jnp.einsum("erd,edh->erh", x, w1) + b1[:, None, :]  # [E_l, R, h]
    act = jax.nn.relu(pre) if activation == "relu" else pre * ndtr(pre)  # [E_l, R, h]
    return jnp.einsum("erh,ehd->erd", act, w2) + b2[:, None, :]  # [E_l, R, d]


def send_buffers(x, index, keep, slot, n_experts: int, S: int):
    """x [b, d] into send buffers [E, S, d]: which local row fills (expert, slot); empty slots
    read an appended zero row, dropped assignments scatter out of range."""
    b, d = x.shape
    k = index.shape[1]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, k))  # [b, k]
    tgt_e = jnp.where(keep, index, n_experts)  # [b, k]
    src = jnp.full((n_experts, S), b, dtype=jnp.int32).at[tgt_e, slot].set(rows, mode="drop")  # [E, S]
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)  # [b+1, d]
    return x_pad[src]  # [E, S, d]


def combine_rows(ret, index, keep, slot, gates):
    """The experts' outputs ret [E, S, d] back to this device's rows: (y [b, d], kept gates [b, k])."""
    kept_gates = jnp.where(keep, gates, 0.0)  # [b, k]
    y = jnp.zeros((index.shape[0], ret.shape[2]), ret.dtype)  # [b, d]
    for j in range(index.shape[1]):  # j = 0..k-1, the numpy summation order
        out_j = ret[jnp.where(keep[:, j], index[:, j], 0), jnp.where(keep[:, j], slot[:, j], 0)]  # [b, d]
        y = y + kept_gates[:, j, None] * jnp.where(keep[:, j, None], out_j, 0.0)
    return y, kept_gates


def moe_local(spec: LayerSpec, batch: int, x, xg, eps, w_gate, w_noise, w1, b1, w2, b2):
    """The body run on each device by shard_map (see the module docstring)."""
    b, d = x.shape
    E = spec.n_experts
    n = jax.lax.axis_size(EXPERT)
    cap = capacity(spec, b if spec.capacity_scope == "device" else batch)
    S = min(cap, b)
    index, gates, importance, load, aux = gate_forward(spec, xg, w_gate, w_noise, eps, batch)
    keep, slot = capacity_slots(index, E, cap, spec.capacity_scope)  # [b, k], [b, k]
    send = send_buffers(x, index, keep, slot, E, S)  # [E, S, d]
    recv = jax.lax.all_to_all(send, EXPERT, 0, 0, tiled=True)  # [n*E_l, S, d], source-major
    E_l = E // n
    work = recv.reshape(n, E_l, S, d).transpose(1, 0, 2, 3).reshape(E_l, n * S, d)  # [E_l, n*S, d]
    done = experts_forward(spec.activation, work, w1, b1, w2, b2)  # [E_l, n*S, d]
    back = done.reshape(E_l, n, S, d).transpose(1, 0, 2, 3).reshape(n * E_l, S, d)  # [E, S, d]
    ret = jax.lax.all_to_all(back, EXPERT, 0, 0, tiled=True)  # [E, S, d] this device's rows
    y, kept_gates = combine_rows(ret, index, keep, slot, gates)  # [b, d], [b, k]
    counts = _psum(jnp.einsum("bk,bke->e", keep.astype(x.dtype), jax.nn.one_hot(index, E, dtype=x.dtype)))
    routing = {"expert_index": index, "keep": keep, "gates": kept_gates,
               "importance": importance, "load": load, "counts": counts}
    return y, aux, routing


def moe_layer(spec: LayerSpec, mesh, x, xg, eps, p: dict):
    """Global view: x [B, d], xg [B, d_gate] (rows over the mesh), eps [B, E] or None,
    p: w_gate [d_gate, E] (+ w_noise), w1 [E, d, h], b1, w2, b2 (experts over "expert").
    Returns (y [B, d], aux scalar, routing dict)."""
    B = x.shape[0]
    ep, n = mesh.shape[EXPERT], mesh.shape[DATA] * mesh.shape[EXPERT]
    if spec.n_experts % ep:
        raise ValueError(f"n_experts={spec.n_experts} must divide evenly over the {ep} devices "
                         f"of mesh axis {EXPERT!r}")
    if B % n:
        raise ValueError(f"the batch of {B} rows must divide evenly over the {n} devices of the mesh")
    w_noise = p.get("w_noise", jnp.zeros_like(p["w_gate"]))
    rep, row, split = P(), P(ROWS), P(EXPERT)
    routing_specs = {"expert_index": row, "keep": row, "gates": row,
                     "importance": rep, "load": rep, "counts": rep}
    weights = (p["w_gate"], w_noise, p["w1"], p["b1"], p["w2"], p["b2"])
    w_specs = (rep, rep, split, split, split, split)  # gate replicated, experts split over "expert"
    if eps is None:
        def body(x, xg, *w):
            return moe_local(spec, B, x, xg, None, *w)
        args, specs = (x, xg, *weights), (row, row, *w_specs)
    else:
        def body(x, xg, eps, *w):
            return moe_local(spec, B, x, xg, eps, *w)
        args, specs = (x, xg, eps, *weights), (row, row, row, *w_specs)
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(row, rep, routing_specs))
    return fn(*args)
