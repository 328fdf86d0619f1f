"""This process's JAX devices measured with XLA itself, for the cost model of a JAX step.

Why: the numpy-measured "cpu" spec (moe.accel.devices.calibrate_cpu) is OpenBLAS sgemm and a
numpy copy. XLA's CPU kernels for a step's small per-device shapes (a few hundred rows,
d = 128) run well below that, and N host devices sharing two cores add their own overhead,
so a cost model fed numpy's rates under-predicted the JAX step by one constant 2.4x on every
layout. Here every device runs its own share of the same kernel at once (a sharded batched
GEMM of the experts' shape, and a fused Adam update of the experts' size), so the rates are
per device under the sharing a step sees. The kernels are micro-benchmarks of shapes the
caller names, not the step itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from moe.accel.devices import DeviceSpec, PodSpec, cpu_mesh


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


def xla_rates(gemm: tuple[int, int, int, int], adam_elems: int, exchange_rows: int, width: int,
              seconds: float = 1.0) -> tuple[float, float, float]:
    """(FLOP/s, bytes/s, exchange bytes/s) per device when every JAX device at once runs a
    batched float32 GEMM [g, m, k] @ [g, k, n] (gemm = (g, m, k, n)), a fused Adam update of
    `adam_elems` parameters (7 arrays of 4 bytes per element read or written), and an
    all-to-all over all devices of `exchange_rows` x `width` float32 rows each (the exchange
    rate counts the bytes that leave a device, (n-1)/n of them, as moe.accel.devices does)."""
    import jax
    import jax.numpy as jnp
    from jax import shard_map
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    _check("gemm (g, m, k, n)", tuple(gemm))
    _check("adam_elems, exchange_rows, width", (adam_elems, exchange_rows, width))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"xla_rates needs seconds > 0, got {seconds}")
    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    shard = NamedSharding(mesh, PartitionSpec("d"))
    g, m, k, nn = (int(v) for v in gemm)
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((n * g, m, k), dtype=np.float32), shard)  # [n g, m, k]
    b = jax.device_put(rng.standard_normal((n * g, k, nn), dtype=np.float32), shard)  # [n g, k, n]
    matmul = jax.jit(jnp.matmul, out_shardings=shard)
    t_gemm = _median_seconds(lambda: matmul(a, b).block_until_ready(), seconds / 3)

    def adam(p, mom, vel, grad):
        mom = 0.9 * mom + 0.1 * grad
        vel = 0.999 * vel + 0.001 * grad * grad
        return p - 1e-3 * mom / (jnp.sqrt(vel) + 1e-8), mom, vel

    step = jax.jit(adam, out_shardings=(shard, shard, shard), donate_argnums=(0, 1, 2))
    state = [jax.device_put(np.full(n * int(adam_elems), v, np.float32), shard) for v in (1.0, 0.0, 0.0, 0.5)]

    def run() -> None:
        state[:3] = step(*state)
        jax.block_until_ready(state[:3])

    t_adam = _median_seconds(run, seconds / 3)
    rows = -(-int(exchange_rows) // n) * n  # a whole number of rows to every device
    x = jax.device_put(np.ones((n * rows, int(width)), np.float32), shard)  # [n rows, w]
    a2a = jax.jit(shard_map(lambda v: jax.lax.all_to_all(v.reshape(n, rows // n, -1), "d", 0, 0).reshape(rows, -1),
                            mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))
    t_x = _median_seconds(lambda: a2a(x).block_until_ready(), seconds / 3) if n > 1 else math.inf
    leaving = (n - 1) / n * rows * int(width) * 4
    return 2.0 * g * m * k * nn / t_gemm, 7 * 4 * int(adam_elems) / t_adam, leaving / t_x


def xla_cpu_mesh(base: DeviceSpec, gemm: tuple[int, int, int, int], adam_elems: int, exchange_rows: int,
                 width: int, seconds: float = 1.0) -> tuple[PodSpec, float]:
    """(moe.accel.devices.cpu_mesh over this process's JAX devices with XLA's measured rates in
    place of numpy's: peak FLOP/s from the GEMM, memory bandwidth from the Adam update; the
    all-to-all's measured exchange rate). The pod's link stays cpu_mesh's: the cost model has
    one link figure for the all-to-all and the gradient all-reduce, and on the CPU mesh XLA's
    psum and all_to_all run at different rates, so putting the all-to-all's there would
    mis-predict the all-reduce. The router and dispatch element costs stay `base`'s."""
    import jax

    flops, bw, link = xla_rates(gemm, adam_elems, exchange_rows, width, seconds)
    n = jax.device_count()
    whole = replace(base, name="cpu-xla", peak_flops=flops * n, hbm_bw=bw * n,
                    flops_kind=f"float32 XLA GEMM {list(gemm)} per device, all devices at once (measured)",
                    source=f"measured by xla_rates on {n} JAX devices; router/dispatch from {base.name}")
    return cpu_mesh(n, whole), link
