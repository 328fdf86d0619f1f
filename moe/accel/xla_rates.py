"""This process's JAX devices measured with XLA itself, for the cost model of a JAX step.

Why: the numpy-measured "cpu" spec (moe.accel.devices.calibrate_cpu) is OpenBLAS sgemm and a
numpy copy. XLA's CPU kernels for a step's small per-device shapes (a few hundred rows,
d = 128) run well below that, and N host devices sharing two cores add their own overhead,
so a cost model fed numpy's rates under-predicted the JAX step by 2.1-2.8x on every layout.
Here every device runs its own share of the same kernel at once, so the rates are per device
under the sharing a step sees: a sharded batched GEMM of the experts' shape, a fused Adam
update of the experts' size, an all-to-all of the send buffers, a psum of the gradients, and
(on a small problem of its own shape, as calibrate_cpu does for numpy) this backend's noisy
gate and its dispatch + combine, forward and backward. The gate's top-k, softplus and normal
CDF, and the dispatch's scatters and gathers, are what a roofline cannot predict here: the
gate alone took 18 ms of a 60 ms step where the roofline gave it 2. The kernels are
micro-benchmarks, not the step itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from moe.accel.devices import DeviceSpec, PodSpec, cpu_mesh

# the gate and dispatch micro-benchmarks: rows per device, experts, width (not a step's shape).
# The dispatch has a part over [rows x k, E] (one-hot capacity slots) and one over [rows x k, d]
# (the gathers): two problems, one wide in E and one wide in d, separate them.
GATE_PROBLEM = (256, 64, 32)
DISPATCH_PROBLEMS = ((256, 64, 32), (256, 16, 128))


@dataclass(frozen=True)
class XlaRates:
    """Per device, every device running at once."""

    flops: float  # FLOP/s of the batched GEMM
    bw: float  # bytes read + written per second of the Adam update
    a2a_bw: float  # bytes leaving a device per second in the all-to-all
    all_reduce_bw: float  # ring bytes per second, 2 (n-1)/n x payload / time, of the psum
    router_elem_s: float  # seconds per (row x expert) of the noisy gate fwd + bwd, GEMMs excluded
    dispatch_elem_s: float  # seconds per (assignment x d) of dispatch + combine, fwd + bwd
    dispatch_expert_s: float  # and per (assignment x expert), its capacity slots


def _median_seconds(fn, budget: float) -> float:
    fn()  # compile and warm up
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _check(what: str, values: tuple[int, ...]) -> None:
    if not all(isinstance(v, int | np.integer) and v >= 1 for v in values):
        raise ValueError(f"{what} must be positive ints, got {list(values)}")


def _gate_seconds(mesh, flops: float, budget: float) -> float:
    """The noisy top-k gate of moe.accel.jax_layer, fwd + bwd, less its GEMMs at `flops`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from moe.accel.jax_layer import ROWS, LayerSpec, gate_forward

    b, E, d = GATE_PROBLEM
    n = mesh.size
    spec = LayerSpec(E, 2, "noisy_topk", 1.25, 0.01, 0.01, 0.0, "relu")

    def loss(wg, wn, xg, eps):
        _, gates, _, _, aux = gate_forward(spec, xg, wg, wn, eps, b * n)
        return jax.lax.psum(jnp.sum(gates * gates), ROWS) + aux

    rows, rep = PartitionSpec(ROWS), PartitionSpec()
    fn = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(rep, rep, rows, rows),
                               out_specs=(rep, rep), check_vma=False))
    rng = np.random.default_rng(1)
    wg, wn = (jnp.asarray(rng.standard_normal((d, E), dtype=np.float32) * 0.1) for _ in range(2))
    xg = jnp.asarray(rng.standard_normal((n * b, d), dtype=np.float32))  # [n b, d]
    eps = jnp.asarray(rng.standard_normal((n * b, E), dtype=np.float32))  # [n b, E]
    t = _median_seconds(lambda: jax.block_until_ready(fn(wg, wn, xg, eps)), budget)
    gemm = 3 * 2 * (2.0 * b * d * E) / flops  # two gate matrices, fwd + 2 bwd GEMMs each
    return max(t - gemm, 0.0) / (b * E)


def _dispatch_seconds(mesh, problem: tuple[int, int, int], budget: float) -> float:
    """Capacity slots, send buffers and combine of moe.accel.jax_layer (no exchange), fwd + bwd,
    for `problem` = (rows per device, experts, d): seconds per call."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from moe.accel.jax_layer import (
        ROWS,
        LayerSpec,
        capacity,
        capacity_slots,
        combine_rows,
        send_buffers,
    )

    b, E, d = problem
    k, n = 2, mesh.size
    spec = LayerSpec(E, k, "softmax_topk", 1.25, 0.0, 0.0, 0.0, "relu")
    cap = capacity(spec, b * n)

    def loss(x, gates, index):
        keep, slot = capacity_slots(index, E, cap, spec.capacity_scope)  # [b, k] x2
        send = send_buffers(x, index, keep, slot, E, min(cap, b))  # [E, S, d]
        y, _ = combine_rows(send, index, keep, slot, gates)  # [b, d]
        return jax.lax.psum(jnp.sum(y * y), ROWS)

    rows = PartitionSpec(ROWS)
    fn = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(rows, rows, rows),
                               out_specs=(rows, rows), check_vma=False))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((n * b, d), dtype=np.float32))  # [n b, d]
    gates = jnp.full((n * b, k), 0.5, jnp.float32)  # [n b, k]
    index = jnp.asarray(np.argsort(rng.random((n * b, E)), axis=1)[:, :k].astype(np.int32))  # [n b, k]
    return _median_seconds(lambda: jax.block_until_ready(fn(x, gates, index)), budget)


def _dispatch_rates(mesh, budget: float) -> tuple[float, float]:
    """(seconds per (assignment x d), per (assignment x expert)): t = a (b k d) + c (b k E)
    solved on DISPATCH_PROBLEMS; a part that comes out negative (noise) is 0 and the other
    carries the whole time of the first problem."""
    k = 2
    coef = np.array([[b * k * d, b * k * E] for b, E, d in DISPATCH_PROBLEMS], dtype=np.float64)
    t = np.array([_dispatch_seconds(mesh, p, budget / 2) for p in DISPATCH_PROBLEMS])
    per_d, per_e = np.linalg.solve(coef, t)
    if per_d < 0 or per_e < 0:
        return (0.0, t[0] / coef[0, 1]) if per_d < 0 else (t[0] / coef[0, 0], 0.0)
    return float(per_d), float(per_e)


def xla_rates(gemm: tuple[int, int, int, int], adam_elems: int, exchange_rows: int, width: int,
              seconds: float = 1.0) -> XlaRates:
    """XlaRates of this process's JAX devices, every device at once: a batched float32 GEMM
    [g, m, k] @ [g, k, n] (gemm = (g, m, k, n)), a fused Adam update of `adam_elems`
    parameters (7 arrays of 4 bytes per element read or written), an all-to-all over all
    devices of `exchange_rows` x `width` float32 rows each (its rate counts the bytes that
    leave a device, (n-1)/n of them, as moe.accel.devices does), a psum of `adam_elems`
    float32 values (the gradients an all-reduce carries), and the gate and dispatch
    micro-benchmarks (GATE_PROBLEM, DISPATCH_PROBLEMS). With one device the collectives have
    no rate (0)."""
    import jax
    import jax.numpy as jnp
    from jax import shard_map
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from moe.accel.jax_layer import ROWS

    _check("gemm (g, m, k, n)", tuple(gemm))
    _check("adam_elems, exchange_rows, width", (adam_elems, exchange_rows, width))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"xla_rates needs seconds > 0, got {seconds}")
    budget = seconds / 6
    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    shard = NamedSharding(mesh, PartitionSpec("d"))
    g, m, k, nn = (int(v) for v in gemm)
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((n * g, m, k), dtype=np.float32), shard)  # [n g, m, k]
    b = jax.device_put(rng.standard_normal((n * g, k, nn), dtype=np.float32), shard)  # [n g, k, n]
    matmul = jax.jit(jnp.matmul, out_shardings=shard)
    flops = 2.0 * g * m * k * nn / _median_seconds(lambda: matmul(a, b).block_until_ready(), budget)

    def adam(p, mom, vel, grad):
        mom = 0.9 * mom + 0.1 * grad
        vel = 0.999 * vel + 0.001 * grad * grad
        return p - 1e-3 * mom / (jnp.sqrt(vel) + 1e-8), mom, vel

    step = jax.jit(adam, out_shardings=(shard, shard, shard), donate_argnums=(0, 1, 2))
    state = [jax.device_put(np.full(n * int(adam_elems), v, np.float32), shard) for v in (1.0, 0.0, 0.0, 0.5)]

    def run() -> None:
        state[:3] = step(*state)
        jax.block_until_ready(state[:3])

    bw = 7 * 4 * int(adam_elems) / _median_seconds(run, budget)
    a2a_bw = all_reduce_bw = 0.0
    if n > 1:
        rows = -(-int(exchange_rows) // n) * n  # a whole number of rows to every device
        x = jax.device_put(np.ones((n * rows, int(width)), np.float32), shard)  # [n rows, w]
        a2a = jax.jit(shard_map(lambda v: jax.lax.all_to_all(v.reshape(n, rows // n, -1), "d", 0, 0).reshape(rows, -1),
                                mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))
        a2a_bw = (n - 1) / n * rows * int(width) * 4 / _median_seconds(lambda: a2a(x).block_until_ready(), budget)
        grads = jax.device_put(np.ones(n * int(adam_elems), np.float32), shard)  # [n elems]
        psum = jax.jit(shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=PartitionSpec("d"),
                                 out_specs=PartitionSpec("d")))
        t_ar = _median_seconds(lambda: psum(grads).block_until_ready(), budget)
        all_reduce_bw = 2.0 * (n - 1) / n * int(adam_elems) * 4 / t_ar
    rows_mesh = Mesh(np.array(devices).reshape(n, 1), ROWS)
    return XlaRates(flops, bw, a2a_bw, all_reduce_bw, _gate_seconds(rows_mesh, flops, budget),
                    *_dispatch_rates(rows_mesh, budget))


def xla_cpu_mesh(base: DeviceSpec, gemm: tuple[int, int, int, int], adam_elems: int, exchange_rows: int,
                 width: int, seconds: float = 1.0) -> tuple[PodSpec, XlaRates]:
    """(moe.accel.devices.cpu_mesh over this process's JAX devices with XLA's measured rates in
    place of numpy's, the rates): peak FLOP/s from the GEMM, memory bandwidth from the Adam
    update, the all-to-all and all-reduce at their own measured rates, and the gate and
    dispatch element costs of this backend. `base` (the numpy-measured "cpu") gives the rest:
    memory size and cache."""
    import jax

    r = xla_rates(gemm, adam_elems, exchange_rows, width, seconds)
    n = jax.device_count()
    whole = replace(base, name="cpu-xla", peak_flops=r.flops * n, hbm_bw=r.bw * n,
                    flops_kind=f"float32 XLA GEMM {list(gemm)} per device, all devices at once (measured)",
                    source=f"measured by xla_rates on {n} JAX devices; memory and cache from {base.name}")
    pod = cpu_mesh(n, whole)
    device = replace(pod.device, router_elem_s=r.router_elem_s, dispatch_elem_s=r.dispatch_elem_s,
                     dispatch_expert_s=r.dispatch_expert_s, a2a_bw=r.a2a_bw, all_reduce_bw=r.all_reduce_bw)
    return replace(pod, device=device), r
