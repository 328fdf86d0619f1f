"""JAX backend benchmark: MoE layer and whole-model forward+backward on whatever JAX devices exist.

Prints the device kind, then for each E (default 8, 64, 512) at T = 8192 examples, d = 256,
h = 512, k = 2, capacity factor 1.25 (GShard buffers [E, C, d] with C = ceil(1.25 T k / E)):

- layer:  jit(grad) of one expert-parallel MoE layer (noisy top-k gate, dispatch all_to_all,
          experts, return all_to_all, combine, aux losses), timed with block_until_ready;
- model:  jit(value_and_grad) of a MultiTaskMoE (one 64-input, 10-class task, one MoE block)
          including adapter, LayerNorms, head and loss;
medians over --steps timed calls after 2 warm-up calls, examples/s = T / median, and the
expert GEMM rate: 12 T k d h useful FLOPs (forward + backward of two GEMMs per kept row)
per second.

    python bench/jax_backend.py --steps 20 [--experts 8,64,512] [--devices N] [--tokens 8192]

Many tasks (issue 12) are measured in bench/jax_tasks.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from moe.accel.jax_backend import JaxMoE, make_mesh  # noqa: E402
from moe.accel.jax_layer import LayerSpec, capacity, moe_layer  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model import Chunk, MultiTaskMoE  # noqa: E402
from moe.tasks.spec import TaskRegistry, TaskSpec  # noqa: E402

D, H, K, CF = 256, 512, 2, 1.25


def median_time(fn, steps: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_layer(mesh, E: int, T: int, steps: int, rng: np.random.Generator) -> float:
    spec = LayerSpec(E, K, "noisy_topk", CF, 0.1, 0.1, 0.0, "relu")
    p = {"w_gate": rng.standard_normal((D, E), dtype=np.float32) * np.float32(0.05),
         "w_noise": rng.standard_normal((D, E), dtype=np.float32) * np.float32(0.05),
         "w1": rng.standard_normal((E, D, H), dtype=np.float32) * np.float32(D ** -0.5),
         "b1": np.zeros((E, H), np.float32),
         "w2": rng.standard_normal((E, H, D), dtype=np.float32) * np.float32(H ** -0.5),
         "b2": np.zeros((E, D), np.float32)}
    row = NamedSharding(mesh, PartitionSpec("expert"))  # experts (and rows) split over devices
    rep = NamedSharding(mesh, PartitionSpec())
    p = {n: jax.device_put(v, rep if n.startswith("w_") else row) for n, v in p.items()}
    x = jax.device_put(rng.standard_normal((T, D), dtype=np.float32), row)
    eps = jax.device_put(rng.standard_normal((T, E), dtype=np.float32), row)
    dy = jax.device_put(rng.standard_normal((T, D), dtype=np.float32), row)

    def loss(p, x):
        y, aux, _ = moe_layer(spec, mesh, x, x, eps, p)
        return jnp.sum(y * dy) + aux

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return median_time(lambda: step(p, x), steps)


def bench_model(mesh, E: int, T: int, steps: int, rng: np.random.Generator) -> float:
    cfg = ModelConfig(d_model=D, n_experts=E, d_hidden=H, k=K, capacity_factor=CF, d_task_emb=16)
    model = MultiTaskMoE(cfg, TaskRegistry([TaskSpec("t", "multiclass", 64, 10)]), rng=rng)
    jm = JaxMoE(model, mesh)
    x = rng.standard_normal((T, 64), dtype=np.float32)
    y = rng.integers(0, 10, T).astype(np.int32)
    from moe.accel.jax_model import pack_batch

    tid, xp, yp = pack_batch(jm.spec, [Chunk("t", x, y)])
    args = jm.place(tid, xp, yp)
    eps = jm._eps(T, True, None, jax.random.key(0))
    return median_time(lambda: jm._grad(jm.params, *args, eps), steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--experts", default="8,64,512")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    mesh = make_mesh(a.devices)
    n = mesh.shape["expert"]
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}; devices: {n} x {dev.platform} / {dev.device_kind}")
    print(f"T={a.tokens} d={D} h={H} k={K} capacity factor {CF}; medians of {a.steps} steps")
    print(f"{'E':>5} {'C':>5} {'layer fwd+bwd ms':>17} {'layer ex/s':>12} {'expert TFLOP/s':>15} "
          f"{'model fwd+bwd ms':>17} {'model ex/s':>12}")
    rng = np.random.default_rng(0)
    flops = 12.0 * a.tokens * K * D * H
    for E in [int(e) for e in a.experts.split(",")]:
        spec = LayerSpec(E, K, "noisy_topk", CF, 0.1, 0.1, 0.0, "relu")
        t_layer = bench_layer(mesh, E, a.tokens, a.steps, rng)
        t_model = float("nan") if a.skip_model else bench_model(mesh, E, a.tokens, a.steps, rng)
        print(f"{E:>5} {capacity(spec, a.tokens):>5} {t_layer * 1e3:>17.3f} {a.tokens / t_layer:>12,.0f} "
              f"{flops / t_layer / 1e12:>15.2f} {t_model * 1e3:>17.3f} {a.tokens / t_model:>12,.0f}",
              flush=True)


if __name__ == "__main__":
    main()
