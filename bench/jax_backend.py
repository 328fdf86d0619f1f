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

Many tasks (issue 12): `--tasks 200,1000` trains the built-in benchmark with that many tasks
(7 built-in + a generated family, each family task with an encoder of its own; default
config otherwise: d = 64, E = 64, batch 256) for --steps steps, each configuration in a
fresh process, and prints per configuration the first step (trace + compile + one step),
its CPU time (all threads: a figure a busy machine changes less), the median of the later
steps, the peak RSS of the process and its RSS before the trainer
existed (imports and data loaded). Backends: numpy (moe.train.Trainer) and JAX
(moe.accel.jax_train.JaxTrainer) with each way of laying out per-task work
(`--impl`, see moe.accel.jax_model.table_linear):

- blocks: rows sorted by table row into static-shape blocks of one table row each, one
          batched product over the blocks (the backend's choice);
- gather: each batch row gathers its own table row's weights, one batched product;
- ragged: rows sorted by table row, jax.lax.ragged_dot over the groups, unsorted back;
- where:  every table row on every batch row, selected by `where` (how the backend worked
          before issue 12: cost grows with tasks x batch).

    python bench/jax_backend.py --tasks 200,1000 --impl blocks,gather,ragged,where --steps 10
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


# ============================================================================ many tasks
def _linear_gather(x, w, b, rows):
    """Each batch row gathers its own weights [B, i, o], one batched product."""
    return jnp.einsum("bi,bio->bo", x, w[rows]) + b[rows]


def _linear_ragged(x, w, b, rows):
    """Rows sorted by table row, one ragged_dot over the groups, unsorted back."""
    perm = jnp.argsort(rows)  # [B]
    sizes = jnp.bincount(rows, length=w.shape[0]).astype(jnp.int32)  # [R]
    ys = jax.lax.ragged_dot(x[perm], w, sizes)  # [B, o]
    return jnp.zeros_like(ys).at[perm].set(ys) + b[rows]


def _linear_where(x, w, b, rows):
    """Every table row on every batch row, each batch row keeping its own."""
    y = jnp.zeros((x.shape[0], w.shape[2]), x.dtype)  # [B, o]
    for j in range(w.shape[0]):
        y = jnp.where((rows == j)[:, None], x @ w[j] + b[j], y)
    return y


IMPLS = {"gather": _linear_gather, "ragged": _linear_ragged, "where": _linear_where}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tasks_worker(n_tasks: int, impl: str, steps: int) -> dict:
    """One configuration in this (fresh) process: timings and memory."""
    import resource
    import tempfile

    from moe.config import Config, DataConfig, TrainConfig
    from moe.datasets import load_source, source_of

    if n_tasks < 8:
        raise ValueError(f"--tasks needs >= 8 (7 built-in tasks + a family), got {n_tasks}")
    data_cfg = DataConfig(n_family=n_tasks - 7, n_digit_sets=0, n_skills=0)
    data = load_source(source_of(data_cfg))
    config = Config(data=data_cfg, train=TrainConfig(steps=steps + 1, progress=False, baseline=False))
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "numpy":
            from moe.train import Trainer

            tr = Trainer(config, data, tmp, save_checkpoints=False, echo=lambda m: None)
        else:
            import moe.accel.jax_model as jax_model
            from moe.accel.jax_train import JaxTrainer

            if impl != "blocks":
                jax_model.table_linear = IMPLS[impl]
            tr = JaxTrainer(config, data, tmp, save_checkpoints=False, echo=lambda m: None)
        t0, c0 = time.perf_counter(), time.process_time()
        loss0 = tr.train_step()["loss"]
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = tr.train_step()["loss"]
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tasks": len(data), "impl": impl, "first_s": first, "first_cpu_s": first_cpu,
            "step_s": statistics.median(times),
            "peak_mb": peak, "base_mb": base, "loss_first": loss0, "loss_last": loss}


def bench_tasks(counts: list[int], impls: list[str], steps: int, timeout: float) -> None:
    import json
    import subprocess

    print(f"many tasks: default config, batch 256, medians of {steps} steps after the first; "
          "each row a fresh process")
    print(f"{'tasks':>6} {'backend':>12} {'first step s':>13} {'its CPU s':>10} {'step ms':>9} {'peak RSS MB':>12} "
          f"{'before MB':>10} {'loss first -> last':>19}")
    for n in counts:
        for impl in ["numpy", *impls]:
            cmd = [sys.executable, __file__, "--tasks-worker", str(n), impl, "--steps", str(steps)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{n:>6} {impl:>12}  did not finish in {timeout:.0f} s", flush=True)
                continue
            if proc.returncode:
                print(f"{n:>6} {impl:>12}  failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            name = impl if impl == "numpy" else f"jax {impl}"
            print(f"{r['tasks']:>6} {name:>12} {r['first_s']:>13.2f} {r['first_cpu_s']:>10.2f} {r['step_s'] * 1e3:>9.1f} {r['peak_mb']:>12.0f} "
                  f"{r['base_mb']:>10.0f} {r['loss_first']:>9.3f} -> {r['loss_last']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--experts", default="8,64,512")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--tasks", default=None, help="comma list of task counts: the many-tasks benchmark")
    ap.add_argument("--impl", default="blocks,gather,ragged,where", help="with --tasks: JAX layouts of per-task work")
    ap.add_argument("--timeout", type=float, default=900, help="with --tasks: seconds per configuration")
    ap.add_argument("--tasks-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tasks_worker is not None:
        import json

        print(json.dumps(tasks_worker(int(a.tasks_worker[0]), a.tasks_worker[1], a.steps)))
        return
    if a.tasks is not None:
        bench_tasks([int(n) for n in a.tasks.split(",")], a.impl.split(","), a.steps, a.timeout)
        return
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
