"""Analytic cost of one training step of the multitask MoE on a pod (EP x DP layout).

Conventions, each with its source:
- A matmul [m, k] x [k, n] costs 2 m n k FLOPs (one multiply + one add per term).
- Forward + backward = 3 x forward: the backward of y = x W runs two matmuls of the same
  size (dx = dy W^T, dW = x^T dy) (Kaplan et al. 2020, "Scaling Laws for Neural Language
  Models", sec. 2.1). The same factor is applied to bytes moved, and to the elementwise and
  gather/scatter ops (their backward reads/writes about twice what the forward does).
- Model FLOPs per step = 6 x active params x tokens (the same paper's C = 6 N per token);
  MFU = model FLOPs / (step time x n_devices x peak) (Chowdhery et al. 2022, PaLM, app. B).
  Capacity padding and recomputation are hardware FLOPs, not model FLOPs.
- Each op takes max(FLOPs / peak, bytes / HBM bandwidth): the roofline model (Williams,
  Waterman & Patterson 2009, "Roofline: an insightful visual performance model", CACM).
  Bytes are every byte read plus every byte written, against a bandwidth that counts the
  same way (DeviceSpec.hbm_bw; on the measured cpu, the copy rate with both directions
  counted). bench/ uses this one accounting too (bench/_bound.py).
- Collectives: ring all-reduce and torus all-to-all bounds from moe.accel.devices
  (Patarasuk & Yuan 2009; Dally & Towles 2004 bisection of a k-ary n-cube).
- Optimizer: memory-bound; Adam reads param, grad, m, v and writes param, m, v (moments in
  float32); SGD (no momentum) reads param, grad, writes param; Adafactor as SGD plus its
  factored second moment (Shazeer & Stern 2018).

Layout (GShard, Lepikhin et al. 2020): the global batch is split over all ep x dp devices;
dense params are replicated everywhere (so their gradients are all-reduced over every
device), experts are split over the ep devices of a group (ceil(E / ep) per device) and
replicated over the dp groups (their gradients are all-reduced over dp, stride ep). Each
device dispatches its tokens into capacity buffers of C = ceil(cf * t * k / E) rows per
expert (t = tokens on the device), exchanged with its EP group by all-to-all: 4 exchanges
per layer (dispatch and combine, forward and backward). With a capacity factor the buffers
are padded (static shapes): time does not depend on load balance, overflow is dropped. With
capacity_factor None (dropless) buffers are ragged: the busiest device's real load sets the
expert and all-to-all time, and buffer memory is sized as cf = 1.0 times that imbalance.
Nothing is overlapped: the step is the sum of its parts (an upper bound on a good schedule).
Nothing is fused either: the activation and the LayerNorm are separate memory passes.
Measured rates, where a device carries them (the calibrated "cpu", an XLA CPU mesh): the gate's
elementwise work per (token x expert) and the dispatch per (assignment x d) and per
(assignment x expert) take the slower of the roofline and the measured rate; a switch's
all-to-all and all-reduce run at their measured rates (moe.accel.devices). A TPU or GPU spec
has none: the roofline alone.

Components: dense (adapters, heads, LayerNorm + residual), router (gate matmuls, softmax /
top-k, and the local dispatch/combine copies into and out of the capacity buffers), experts,
all_to_all, grad_all_reduce, optimizer (update + gradient accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import special

from moe.accel.devices import DeviceSpec, PodSpec, all_reduce_time, all_to_all_time
from moe.accel.shape import MoEShape

COMPONENTS = ("dense", "router", "experts", "all_to_all", "grad_all_reduce", "optimizer")
MEMORY_PARTS = ("params", "grads", "optimizer_state", "activations", "capacity_buffers")
FWD_BWD = 3.0  # forward + backward = 3 x forward (Kaplan et al. 2020)
GiB = 2**30


@dataclass(frozen=True)
class Op:
    """One roofline term: per micro-batch (or per step for once-a-step ops), fwd + bwd."""

    name: str
    component: str
    flops: float
    nbytes: float
    seconds: float
    bound: str  # "compute", "memory" or "network"


@dataclass(frozen=True)
class CostReport:
    """Predicted step time, memory per device and utilisation of one layout."""

    shape: MoEShape
    pod_name: str
    device_name: str
    n_devices: int
    ep: int
    dp: int
    ep_inner: bool  # EP groups are compact sub-blocks (DP strided across them), or the reverse
    tokens_per_device: int  # per micro-batch
    n_micro: int  # micro-batches per step (gradient accumulation)
    experts_per_device: int
    capacity: int  # C: buffer rows per expert per source device
    expert_rows: int  # rows the busiest device's experts compute per layer and micro-batch
    imbalance: float  # busiest device load / mean device load
    drop_rate: float  # expected fraction of assignments over capacity
    times: dict[str, float]  # component -> seconds per step
    memory: dict[str, float]  # part -> bytes per device
    hbm_bytes: float
    model_flops: float
    hardware_flops: float  # per device per step, padding included
    peak_flops: float  # per device
    ops: tuple[Op, ...] = field(repr=False)
    notes: tuple[str, ...] = ()

    @property
    def step_time(self) -> float:
        return float(sum(self.times.values()))

    @property
    def memory_total(self) -> float:
        return float(sum(self.memory.values()))

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.hbm_bytes

    @property
    def miss_bytes(self) -> float:
        """Bytes over HBM (negative: headroom)."""
        return self.memory_total - self.hbm_bytes

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time * self.n_devices * self.peak_flops)


# ============================================================================ op builders
def _roofline(name: str, component: str, flops: float, nbytes: float, peak: float, bw: float) -> Op:
    t_compute, t_memory = flops / peak, nbytes / bw
    bound = "compute" if t_compute >= t_memory else "memory"
    return Op(name, component, flops, nbytes, max(t_compute, t_memory), bound)


def _matmul(name: str, component: str, m: float, k: float, n: float, weight_bytes: float,
            act: int, dev: DeviceSpec, *, weight_passes: float = FWD_BWD) -> Op:
    """[m, k] x [k, n], forward + backward: 3 x (2 m n k) FLOPs; activations in and out move
    three times, weights `weight_passes` times (read fwd, read for dx, write dW)."""
    flops = FWD_BWD * 2.0 * m * n * k
    nbytes = FWD_BWD * act * (m * k + m * n) + weight_passes * weight_bytes
    return _roofline(name, component, flops, nbytes, dev.peak_flops, dev.hbm_bw)


def _elementwise(name: str, component: str, elems: float, flops_per: float, touches: float,
                 act: int, dev: DeviceSpec) -> Op:
    """An elementwise pass over `elems` values reading/writing `touches` values each, fwd + bwd."""
    flops = FWD_BWD * flops_per * elems
    nbytes = FWD_BWD * touches * elems * act
    return _roofline(name, component, flops, nbytes, dev.peak_flops, dev.hbm_bw)


# ============================================================================ load model
def _measured(op: Op, *rates: tuple[float, float]) -> Op:
    """Where the device carries measured rates for this op's elements, (seconds per element,
    elements) pairs (the calibrated "cpu", an XLA CPU mesh: moe.accel.xla_rates), their sum
    replaces the roofline when slower: elementwise work with transcendentals, top-k and
    gathers runs far below both limits there."""
    seconds = sum(elem_s * elems for elem_s, elems in rates if elem_s > 0)
    if seconds <= 0:
        return op
    return replace(op, seconds=max(op.seconds, seconds), bound="measured")


def _load_shares(expert_loads: np.ndarray | None, n_experts: int) -> np.ndarray:
    """Per-expert share of assignments (sums to 1); uniform without a profile."""
    if expert_loads is None:
        return np.full(n_experts, 1.0 / n_experts)
    loads = np.asarray(expert_loads, dtype=np.float64)
    if loads.shape != (n_experts,):
        raise ValueError(f"expert_loads must have shape ({n_experts},), got {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0) or loads.sum() <= 0:
        raise ValueError("expert_loads must be finite, >= 0 and not all zero")
    return loads / loads.sum()


def _default_placement(n_experts: int, ep: int) -> np.ndarray:
    from moe.profiling.placement import contiguous_placement

    return np.asarray(contiguous_placement(n_experts, ep))


def _device_imbalance(shares: np.ndarray, placement: np.ndarray | None, ep: int, profiled: bool) -> float:
    """max / mean device load given an expert -> device placement."""
    E = shares.shape[0]
    if placement is None:
        if not profiled:  # uniform load, contiguous ceil(E/ep) blocks: the busiest holds ceil(E/ep)
            return math.ceil(E / ep) * ep / E
        placement = _default_placement(E, ep)
    placement = np.asarray(placement)
    if placement.shape != (E,) or placement.min() < 0 or placement.max() >= ep:
        raise ValueError(f"placement must be int[{E}] with values in [0, {ep}), got shape {placement.shape}")
    device_share = np.bincount(placement.astype(np.int64), weights=shares, minlength=ep)  # [ep]
    return float(device_share.max() * ep)


def _drop_rate(shares: np.ndarray, tokens: int, k: int, capacity: int) -> float:
    """Expected fraction of one device's t k assignments that overflow capacity C.

    Expert e's demand is X_e ~ Binomial(t k, p_e) (routing fluctuates even when balanced on
    average); E[(X_e - C)+] uses the normal approximation, closed form
    (mu - C) (1 - Phi(z)) + sigma phi(z) with z = (C - mu) / sigma. Summed over experts and
    divided by t k. Tails beyond |z| = 30 are taken as exactly 0 or mu - C.
    """
    n = float(tokens * k)
    mu = n * shares  # [E]
    sigma = np.sqrt(n * shares * (1.0 - shares))  # [E]
    excess = np.maximum(mu - capacity, 0.0)  # [E] the sigma -> 0 limit
    live = sigma > 0
    z = np.zeros_like(mu)
    z[live] = (capacity - mu[live]) / sigma[live]
    mid = live & (np.abs(z) < 30.0)
    zm = z[mid]
    pdf = np.exp(-0.5 * zm * zm) / math.sqrt(2.0 * math.pi)
    # clipped at 0: far in the upper tail the two terms cancel to rounding noise
    excess[mid] = np.maximum((mu[mid] - capacity) * special.ndtr(-zm) + sigma[mid] * pdf, 0.0)
    return float(excess.sum() / n)


# ============================================================================ predict
def _check_layout(shape: MoEShape, pod: PodSpec, ep: int, dp: int) -> None:
    for name, value in (("ep", ep), ("dp", dp)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if ep * dp != pod.n_devices:
        raise ValueError(f"ep x dp must equal the {pod.n_devices} devices of {pod.name!r}, got {ep} x {dp} = {ep * dp}")
    if ep > shape.n_experts:
        raise ValueError(f"ep must be <= n_experts ({shape.n_experts}), got {ep}")


def _tokens_per_device(shape: MoEShape, n: int, tokens_per_device: int | None) -> tuple[int, int]:
    share = math.ceil(shape.tokens / n)
    if tokens_per_device is None:
        return share, 1
    if isinstance(tokens_per_device, bool) or not isinstance(tokens_per_device, int | np.integer):
        raise ValueError(f"tokens_per_device must be an int, got {tokens_per_device!r}")
    if not 1 <= tokens_per_device <= share:
        raise ValueError(f"tokens_per_device must be in [1, ceil({shape.tokens} / {n}) = {share}], got {tokens_per_device}")
    t = int(tokens_per_device)
    return t, math.ceil(shape.tokens / (n * t))


@dataclass(frozen=True)
class _Rows:
    capacity: int
    send: int  # rows a device sends per exchange
    busy: int  # rows the busiest device receives and computes
    imbalance: float
    drop_rate: float


def _rows(shape: MoEShape, t: int, ep: int, shares: np.ndarray, imbalance: float) -> _Rows:
    E, k = shape.n_experts, shape.k
    C = shape.capacity(t)
    if shape.dropless:  # ragged: real rows, the busiest device's load sets the pace
        return _Rows(C, t * k, math.ceil(t * k * imbalance), imbalance, 0.0)
    padded = math.ceil(E / ep) * ep * C  # ceil(E/ep) experts x C rows from each of ep sources
    return _Rows(C, E * C, padded, imbalance, _drop_rate(shares, t, k, C))


def _micro_batch_ops(shape: MoEShape, pod: PodSpec, ep: int, dp: int, ep_inner: bool, t: int,
                     rows: _Rows) -> list[Op]:
    """Ops of one micro-batch on the busiest device (all layers)."""
    dev, a, w = pod.device, shape.act_bytes, shape.bytes_per_param
    d, h, E, L = shape.d_model, shape.d_hidden, shape.n_experts, shape.n_layers
    e_local = math.ceil(E / ep)
    touched = min(shape.n_tasks, t)  # adapters / heads whose weights this batch reads
    gm = shape.gate_matrices
    ops = [
        _matmul("adapters", "dense", t, shape.d_in, d, w * touched * (shape.d_in * d + d), a, dev),
        _matmul("heads", "dense", t, d, shape.n_out, w * touched * (d * shape.n_out + shape.n_out), a, dev),
    ]
    per_layer = [
        # LayerNorm (~8 flops/elem) + residual add: read x, write xn; read x, y_moe, write y
        _elementwise("layernorm+residual", "dense", t * d, 9.0, 5.0, a, dev),
        _matmul("gate matmul", "router", t, shape.gate_in, gm * E, w * gm * shape.gate_in * E, a, dev),
        # softmax / softplus / noise / top-k / load estimator over [t, E] per gate matrix
        _measured(_elementwise("gate softmax+top-k", "router", gm * t * E, 10.0, 2.0, a, dev),
                  (dev.router_elem_s, t * E)),
        # dispatch gathers t*k rows into `send` buffer rows; combine reads them back into [t, d]
        _measured(_roofline("dispatch+combine copies", "router", FWD_BWD * 2.0 * t * shape.k * d,
                            FWD_BWD * a * d * (t * shape.k + 2 * rows.send + t), dev.peak_flops, dev.hbm_bw),
                  (dev.dispatch_elem_s, t * shape.k * d), (dev.dispatch_expert_s, t * shape.k * E)),
        _matmul("expert W1", "experts", rows.busy, d, h, w * e_local * (d * h + h), a, dev),
        _elementwise("expert activation", "experts", rows.busy * h, 1.0, 2.0, a, dev),
        _matmul("expert W2", "experts", rows.busy, h, d, w * e_local * (h * d + d), a, dev),
    ]
    ops += [_scale(op, L) for op in per_layer]
    if ep > 1:
        nbytes = max(rows.send, rows.busy) * d * a
        t_x = all_to_all_time(nbytes, pod, ep, stride=1 if ep_inner else dp)
        ops.append(Op("all-to-all x4 per layer", "all_to_all", 0.0, 4 * L * nbytes, 4 * L * t_x, "network"))
    return ops


def _scale(op: Op, factor: float) -> Op:
    return Op(op.name, op.component, op.flops * factor, op.nbytes * factor, op.seconds * factor, op.bound)


def _local_params(shape: MoEShape, ep: int) -> tuple[float, float, float]:
    """(dense, local expert, optimizer-state elements) held by one device."""
    e_local = math.ceil(shape.n_experts / ep)
    frac = e_local / shape.n_experts
    dense = float(shape.dense_params)
    experts = float(shape.expert_params) * frac
    if shape.optimizer == "adam":
        state = 2.0 * (dense + experts)
    elif shape.optimizer == "adafactor":
        state = sum(g.adafactor_state * (frac if g.expert else 1.0) for g in shape.param_groups())
    else:
        state = 0.0
    return dense, experts, state


def _step_ops(shape: MoEShape, pod: PodSpec, ep: int, dp: int, ep_inner: bool, n_micro: int) -> list[Op]:
    """Once-per-step ops: gradient all-reduces, gradient accumulation, optimizer update."""
    dev, w = pod.device, shape.bytes_per_param
    dense, experts, state = _local_params(shape, ep)
    ops = []
    if pod.n_devices > 1:
        t_dense = all_reduce_time(dense * w, pod, pod.n_devices)
        ops.append(Op("dense grads all-reduce (all devices)", "grad_all_reduce", 0.0, dense * w, t_dense, "network"))
    if dp > 1:
        t_exp = all_reduce_time(experts * w, pod, dp, stride=ep if ep_inner else 1)
        ops.append(Op("expert grads all-reduce (dp)", "grad_all_reduce", 0.0, experts * w, t_exp, "network"))
    local = dense + experts
    if shape.optimizer == "adam":  # read p, g, m, v; write p, m, v (moments float32)
        nbytes, flops = local * (3 * w + 4 * 4), 10.0 * local
    elif shape.optimizer == "adafactor":  # read p, g; write p; read + write factored stats
        nbytes, flops = local * 3 * w + state * 4 * 2, 8.0 * local
    else:  # sgd: read p, g; write p
        nbytes, flops = local * 3 * w, 2.0 * local
    ops.append(_roofline(f"{shape.optimizer} update", "optimizer", flops, nbytes, dev.peak_flops, dev.hbm_bw))
    if n_micro > 1:  # accumulate: read + write the gradient once per extra micro-batch
        acc = (n_micro - 1) * 2.0 * local * w
        ops.append(_roofline("grad accumulation", "optimizer", (n_micro - 1) * local, acc, dev.peak_flops, dev.hbm_bw))
    return ops


def _memory(shape: MoEShape, ep: int, t: int, rows: _Rows) -> dict[str, float]:
    """Bytes per device: params, grads, optimizer state, kept activations, staging buffers."""
    w, a = shape.bytes_per_param, shape.act_bytes
    d, h, E, k = shape.d_model, shape.d_hidden, shape.n_experts, shape.k
    dense, experts, state = _local_params(shape, ep)
    per_layer = (
        2 * t * d  # block input x and LayerNorm output xn (gate and dispatch input)
        + 2 * t  # LayerNorm mean, rstd
        + (shape.gate_matrices + 1) * t * E  # gate logits (+ noise logits) and probabilities
        + 2 * t * k  # top-k indices and gate values
        + rows.busy * d  # expert input rows (W1 gradient)
        + 2 * rows.busy * h  # hidden pre- and post-activation
        + rows.send * d  # expert outputs back at the source (gate gradient in combine)
    )
    edges = t * shape.d_in + t * d + t * shape.n_out  # adapter input, head input, logits
    return {
        "params": (dense + experts) * w,
        "grads": (dense + experts) * w,
        "optimizer_state": state * 4.0,
        "activations": (shape.n_layers * per_layer + edges) * a,
        "capacity_buffers": (rows.send + rows.busy) * d * a,  # one layer's send + receive staging
    }


def predict(shape: MoEShape, pod: PodSpec, ep: int, dp: int, *, tokens_per_device: int | None = None,
            expert_loads: np.ndarray | None = None, placement: np.ndarray | None = None,
            ep_inner: bool = True) -> CostReport:
    """Predict one training step of `shape` on `pod` laid out as ep x dp.

    tokens_per_device: micro-batch per device (default: the whole share, ceil(tokens / n));
    smaller values accumulate gradients over ceil(tokens / (n t)) micro-batches.
    expert_loads: measured per-expert load (float[E]); with `placement` (int[E] expert ->
    EP rank, default contiguous) it sets the busiest device's load and the expected drops.
    ep_inner: on a torus, EP groups are compact sub-blocks and each DP group takes one chip
    from every EP group (strided); False swaps the roles (DP groups compact, EP strided).
    """
    _check_layout(shape, pod, ep, dp)
    n = pod.n_devices
    t, n_micro = _tokens_per_device(shape, n, tokens_per_device)
    shares = _load_shares(expert_loads, shape.n_experts)
    imbalance = _device_imbalance(shares, placement, ep, expert_loads is not None)
    rows = _rows(shape, t, ep, shares, imbalance)
    micro = _micro_batch_ops(shape, pod, ep, dp, ep_inner, t, rows)
    ops = [_scale(op, n_micro) for op in micro] + _step_ops(shape, pod, ep, dp, ep_inner, n_micro)
    times = dict.fromkeys(COMPONENTS, 0.0)
    for op in ops:
        times[op.component] += op.seconds
    notes = []
    if shape.dropless:
        notes.append("dropless routing: buffers sized as capacity factor 1.0, ragged exchange at the busiest device's load")
    if shape.tokens % (n * t):
        notes.append(f"{n * t * n_micro - shape.tokens} padding tokens per step (tokens not divisible by n x t)")
    if shape.n_experts % ep:
        notes.append(f"{shape.n_experts} experts over {ep} devices: the busiest holds {math.ceil(shape.n_experts / ep)}")
    return CostReport(
        shape=shape, pod_name=pod.name, device_name=pod.device.name, n_devices=n, ep=ep, dp=dp, ep_inner=bool(ep_inner),
        tokens_per_device=t, n_micro=n_micro, experts_per_device=math.ceil(shape.n_experts / ep),
        capacity=rows.capacity, expert_rows=rows.busy, imbalance=rows.imbalance, drop_rate=rows.drop_rate,
        times=times, memory=_memory(shape, ep, t, rows), hbm_bytes=pod.device.hbm_bytes,
        model_flops=6.0 * shape.active_params * shape.tokens,
        hardware_flops=float(sum(op.flops for op in ops)), peak_flops=pod.device.peak_flops,
        ops=tuple(ops), notes=tuple(notes),
    )


# ============================================================================ one layer, one device
def predict_layer_step(shape: MoEShape, device: DeviceSpec) -> dict:
    """One MoE layer forward + backward on one device for `shape.tokens` tokens.

    Models this project's packed (ragged) dispatch: N = rows actually routed (T k less the
    expected overflow of uniform routing at the capacity factor, see _drop_rate), router matmul + softmax/top-k, gather/scatter traffic of
    dispatch and combine, and the experts' two matmuls. Expert weights move 3x (fwd read,
    bwd read, dW write) when all E experts' weights exceed the device's last-level cache,
    once otherwise. Per-op roofline; small per-expert matmuls (N/E rows) usually run below
    sgemm peak, which this model does not know -- compare against measurement.
    """
    a, w = shape.act_bytes, shape.bytes_per_param
    T, d, h, E, k = shape.tokens, shape.d_model, shape.d_hidden, shape.n_experts, shape.k
    shares = np.full(E, 1.0 / E)
    drop = 0.0 if shape.dropless else _drop_rate(shares, T, k, shape.capacity(T))
    N = round(T * k * (1.0 - drop))  # rows actually routed (packed, no padding)
    gm = shape.gate_matrices
    weight_bytes = float(E * shape.expert_params_each * w)
    fits = 0 < weight_bytes <= device.cache_bytes
    passes = 1.0 if fits else FWD_BWD
    gate_elem = _elementwise("gate softmax+top-k", "router", gm * T * E, 10.0, 2.0, a, device)
    dispatch = _roofline("dispatch+combine", "dispatch", FWD_BWD * 2.0 * N * d, FWD_BWD * a * d * (3 * N + T),
                         device.peak_flops, device.hbm_bw)  # gather N rows, combine N rows into [T, d]
    gate_elem = _measured(gate_elem, (device.router_elem_s, T * E))
    dispatch = _measured(dispatch, (device.dispatch_elem_s, N * d), (device.dispatch_expert_s, N * E))
    ops = [
        _matmul("gate matmul", "router", T, shape.gate_in, gm * E, w * gm * shape.gate_in * E, a, device),
        gate_elem,
        dispatch,
        _matmul("expert W1", "experts", N, d, h, w * E * (d * h + h), a, device, weight_passes=passes),
        _elementwise("expert activation", "experts", N * h, 1.0, 2.0, a, device),
        _matmul("expert W2", "experts", N, h, d, w * E * (h * d + d), a, device, weight_passes=passes),
    ]
    by = {c: sum(op.seconds for op in ops if op.component == c) for c in ("router", "dispatch", "experts")}
    return {
        "device": device.name,
        "tokens": T,
        "rows": N,
        "rows_per_expert": N / E,
        "router_s": by["router"],
        "dispatch_s": by["dispatch"],
        "experts_s": by["experts"],
        "total_s": sum(by.values()),
        "flops": sum(op.flops for op in ops),
        "bytes": sum(op.nbytes for op in ops),
        "expert_weight_bytes": weight_bytes,
        "weights_fit_in_cache": fits,
        "peak_flops": device.peak_flops,
        "mem_bw": device.hbm_bw,
        "ops": {op.name: {"flops": op.flops, "bytes": op.nbytes, "seconds": op.seconds, "bound": op.bound} for op in ops},
    }


# ============================================================================ text
def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} FLOP"


def format_report(report: CostReport) -> str:
    """A readable table: time per component (ms, % of step), memory per device (GiB), fit."""
    s, step = report.shape, report.step_time
    cf = "dropless" if s.dropless else f"{s.capacity_factor:g}"
    order = "EP groups compact, DP strided" if report.ep_inner else "DP groups compact, EP strided"
    lines = [
        f"{report.pod_name} ({report.n_devices} x {report.device_name}): EP {report.ep} x DP {report.dp} ({order})",
        f"  tokens/device {report.tokens_per_device} x {report.n_micro} micro-batch(es), capacity factor {cf}, "
        f"C = {report.capacity} rows/expert/device, {report.experts_per_device} expert(s)/device, "
        f"busiest device computes {report.expert_rows} rows/layer",
        f"  load imbalance (max/mean device) {report.imbalance:.3f}, expected drop rate {report.drop_rate:.2%}",
        "",
        f"  {'component':<18}{'ms/step':>12}{'% step':>9}",
    ]
    for name in COMPONENTS:
        t = report.times[name]
        lines.append(f"  {name:<18}{t * 1e3:>12.3f}{(t / step if step else 0.0):>9.1%}")
    lines.append(f"  {'total':<18}{step * 1e3:>12.3f}{1.0:>9.1%}")
    lines += ["", f"  {'memory/device':<18}{'GiB':>12}"]
    for name in MEMORY_PARTS:
        lines.append(f"  {name:<18}{report.memory[name] / GiB:>12.3f}")
    lines.append(f"  {'total':<18}{report.memory_total / GiB:>12.3f}   of {report.hbm_bytes / GiB:.2f} GiB HBM")
    miss = report.miss_bytes / GiB
    lines.append(f"  fits: {'yes' if report.fits else 'NO'}, {'headroom' if report.fits else 'over by'} {abs(miss):.3f} GiB")
    lines += [
        "",
        f"  model FLOPs/step {_fmt_flops(report.model_flops)} (6 x {report.shape.active_params:,} active params x "
        f"{report.shape.tokens:,} tokens), MFU {report.mfu:.1%}",
    ]
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)
