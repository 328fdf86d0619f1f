"""Many tasks on the JAX backend (issue 12): compile time, step time and memory per task count.

Trains the built-in benchmark with N tasks (7 built-in + a generated family, each family
task with an encoder of its own; default config otherwise: d = 64, E = 64, batch 256) for
--steps steps, each configuration in a fresh process, and prints per configuration the
first step (trace + compile + one step), its CPU time (all threads: a figure a busy machine
changes less), the median of the later steps, the peak RSS of the process, its RSS before
the trainer existed (imports and data loaded) and, for JAX, what importing jax alone added.
The numpy rows never import jax: they are what a user of the numpy backend runs.

Backends: numpy (moe.train.Trainer) and JAX (moe.accel.jax_train.JaxTrainer) with each way
of laying out per-task work (`--impl`, see moe.accel.jax_model.table_linear):

- blocks: rows sorted by table row into static-shape blocks of one table row each, one
          batched product over the blocks (the backend's choice);
- gather: each batch row gathers its own table row's weights, one batched product;
- ragged: rows sorted by table row, jax.lax.ragged_dot over the groups, unsorted back;
- where:  every table row on every batch row, selected by `where` (how the backend worked
          before issue 12: cost grows with tasks x batch).

XLA flags come from the environment as for any run (moe.accel.xla_flags adds the library's CPU
defaults unless XLA_FLAGS already chooses them), so `XLA_FLAGS=... python bench/jax_tasks.py`
measures another setting.

    python bench/jax_tasks.py --tasks 8,200,1000 --impl blocks,gather,ragged,where --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _impls() -> dict:
    """The per-task layouts issue 12 compared with the blocks (imports jax)."""
    import jax
    import jax.numpy as jnp

    def gather(x, w, b, rows):
        """Each batch row gathers its own weights [B, i, o], one batched product."""
        return jnp.einsum("bi,bio->bo", x, w[rows]) + b[rows]

    def ragged(x, w, b, rows):
        """Rows sorted by table row, one ragged_dot over the groups, unsorted back."""
        perm = jnp.argsort(rows)  # [B]
        sizes = jnp.bincount(rows, length=w.shape[0]).astype(jnp.int32)  # [R]
        ys = jax.lax.ragged_dot(x[perm], w, sizes)  # [B, o]
        return jnp.zeros_like(ys).at[perm].set(ys) + b[rows]

    def where(x, w, b, rows):
        """Every table row on every batch row, each batch row keeping its own."""
        y = jnp.zeros((x.shape[0], w.shape[2]), x.dtype)  # [B, o]
        for j in range(w.shape[0]):
            y = jnp.where((rows == j)[:, None], x @ w[j] + b[j], y)
        return y

    return {"gather": gather, "ragged": ragged, "where": where}


def worker(n_tasks: int, impl: str, steps: int) -> dict:
    """One configuration in this (fresh) process: timings and memory."""
    from moe.config import Config, DataConfig, TrainConfig
    from moe.datasets import load_source, source_of

    if n_tasks < 8:
        raise ValueError(f"--tasks needs >= 8 (7 built-in tasks + a family), got {n_tasks}")
    data_cfg = DataConfig(n_family=n_tasks - 7, n_digit_sets=0, n_skills=0)
    data = load_source(source_of(data_cfg))
    # top-k routing throughout, as the JAX trainer runs (it sets train.balanced_share = 0)
    config = Config(data=data_cfg, train=TrainConfig(steps=steps + 1, progress=False, baseline=False,
                                                     balanced_share=0.0))
    pre_jax = _rss_mb()
    if impl != "numpy":
        import moe.accel.jax_model as jax_model
        from moe.accel.jax_train import JaxTrainer

        if impl != "blocks":
            jax_model.table_linear = _impls()[impl]
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "numpy":
            from moe.train import Trainer

            tr = Trainer(config, data, tmp, save_checkpoints=False, echo=lambda m: None)
        else:
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
            "step_s": statistics.median(times), "peak_mb": peak, "base_mb": base,
            "jax_import_mb": base - pre_jax, "jax_loaded": "jax" in sys.modules,
            "loss_first": loss0, "loss_last": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="8,200,1000", help="comma list of task counts")
    ap.add_argument("--impl", default="blocks,gather,ragged,where", help="JAX layouts of per-task work")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1], a.steps)))
        return
    print(f"many tasks: default config, batch 256, medians of {a.steps} steps after the first; "
          f"each row a fresh process; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (before moe's defaults)")
    print(f"{'tasks':>6} {'backend':>12} {'first step s':>13} {'its CPU s':>10} {'step ms':>9} {'peak RSS MB':>12} "
          f"{'before MB':>10} {'of it jax MB':>13} {'peak / numpy':>13} {'loss first -> last':>19}")
    for n in [int(c) for c in a.tasks.split(",")]:
        numpy_peak = None
        for impl in ["numpy", *a.impl.split(",")]:
            cmd = [sys.executable, __file__, "--worker", str(n), impl, "--steps", str(a.steps)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                print(f"{n:>6} {impl:>12}  did not finish in {a.timeout:.0f} s", flush=True)
                continue
            if proc.returncode:
                print(f"{n:>6} {impl:>12}  failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if impl == "numpy":
                if r["jax_loaded"]:
                    raise RuntimeError("the numpy worker imported jax: its memory would not be numpy's")
                numpy_peak = r["peak_mb"]
            ratio = r["peak_mb"] / numpy_peak if numpy_peak else float("nan")
            name = impl if impl == "numpy" else f"jax {impl}"
            print(f"{r['tasks']:>6} {name:>12} {r['first_s']:>13.2f} {r['first_cpu_s']:>10.2f} {r['step_s'] * 1e3:>9.1f} "
                  f"{r['peak_mb']:>12.0f} {r['base_mb']:>10.0f} {r['jax_import_mb']:>13.0f} {ratio:>13.2f} "
                  f"{r['loss_first']:>9.3f} -> {r['loss_last']:.3f}", flush=True)


if __name__ == "__main__":
    main()
