"""Where the default `moe train` job's training step spends its time.

    python bench/step_breakdown.py [--steps 300] [--warmup 30] [key=value ...]

Builds the Trainer of the default job (the built-in benchmark, default config; key=value
overrides as on the `moe` command line), runs --warmup steps, then --steps timed steps.
Each phase is timed by wrapping the methods of that step's own objects, and time spent in a
nested timed call is charged to the inner phase only, so the rows add up to the step:

  gates            gate forward/backward (logits, noise, top-k, softmax, balance losses)
  dispatch         plan, gather, combine, combine backward (experts excluded)
  experts          the expert FFNs forward/backward
  layer norms      the block and final LayerNorms
  adapters, heads  the domain encoders, task heads and task embeddings (tables), task losses
  grad norm        squared gradient norms of the experts and tables (the dense part is inline:
                   "other")
  optimizer        dense Adam on gates/norms, lazy row-Adam on the tables and on the experts
  sampler          drawing the mixed-task batch
  other            everything else in Trainer.train_step: Python glue, list/dict building,
                   concatenations in the model, the dense gradient norm

Prints a markdown table (ms per step and share) and the threads in use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

import moe.threads  # noqa: E402,F401  the thread settings moe applies, before numpy loads BLAS

PHASES = ("gates", "dispatch", "experts", "layer norms", "adapters, heads", "grad norm", "optimizer", "sampler")


class PhaseTimer:
    """Exclusive (self) time per phase: entering a nested phase pauses the outer one."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, started]

    def wrap(self, obj, method: str, phase: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            now = time.perf_counter()
            if self._stack:
                outer = self._stack[-1]
                self.total[outer[0]] += now - outer[1]
            self._stack.append([phase, now])
            try:
                return inner(*args, **kwargs)
            finally:
                ph, started = self._stack.pop()
                now = time.perf_counter()
                self.total[ph] += now - started
                if self._stack:
                    self._stack[-1][1] = now

        setattr(obj, method, timed)

    def reset(self) -> None:
        self.total.clear()


def instrument(trainer, timer: PhaseTimer) -> None:
    model = trainer.model
    for ln, layer in model.blocks:
        timer.wrap(ln, "forward", "layer norms")
        timer.wrap(ln, "backward", "layer norms")
        timer.wrap(layer.gate, "forward", "gates")
        timer.wrap(layer.gate, "backward", "gates")
        timer.wrap(layer.dispatch, "forward", "dispatch")
        timer.wrap(layer.dispatch, "backward", "dispatch")
        timer.wrap(layer.experts, "forward", "experts")
        timer.wrap(layer.experts, "backward", "experts")
        timer.wrap(layer.experts, "grad_sq_norm", "grad norm")
        timer.wrap(layer.experts, "apply_update", "optimizer")
    timer.wrap(model.final_ln, "forward", "layer norms")
    timer.wrap(model.final_ln, "backward", "layer norms")
    for table in model.tables().values():  # domain encoders, task heads, task embeddings
        timer.wrap(table, "forward", "adapters, heads")
        timer.wrap(table, "backward", "adapters, heads")
        timer.wrap(table, "grad_sq_norm", "grad norm")
    timer.wrap(trainer.optimizer, "step", "optimizer")
    for opt in trainer.table_optimizers.values():
        timer.wrap(opt, "step", "optimizer")
    timer.wrap(trainer.sampler, "next_packed", "sampler")
    import moe.train as train_mod

    timer.wrap(train_mod, "batch_loss", "adapters, heads")
    timer.wrap(trainer, "train_step", "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="config key=value, as for `moe train`")
    args = ap.parse_args()

    from moe import threads
    from moe.bindings import HAVE_COMPILED, backend
    from moe.config import load_config
    from moe.datasets import load_source, source_of
    from moe.train import Trainer

    config = load_config(None, ["progress=false", *args.overrides])
    data = load_source(source_of(config.data))
    trainer = Trainer(config, data, "/nonexistent-not-written", save_checkpoints=False)
    timer = PhaseTimer()
    instrument(trainer, timer)
    for _ in range(args.warmup):
        trainer.train_step()
    timer.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        trainer.train_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    step_ms = 1e3 * wall / args.steps
    m = config.model
    print(f"default job step: B={config.train.batch_size}, d={m.d_model}, E={m.n_experts}, h={m.d_hidden}, "
          f"k={m.k}, gate={m.gate}, {len(data)} tasks; kernels {backend() if HAVE_COMPILED else 'numpy'}; "
          f"threads {threads.describe()}")
    print(f"{args.steps} steps: {step_ms:.2f} ms/step wall, {1e3 * cpu / args.steps:.2f} ms/step CPU, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("\n| phase | ms/step | share |\n|---|---:|---:|")
    accounted = sum(timer.total.values())
    for phase in (*PHASES, "other"):
        ms = 1e3 * timer.total.get(phase, 0.0) / args.steps
        print(f"| {phase} | {ms:.2f} | {100 * timer.total.get(phase, 0.0) / accounted:.0f}% |")
    print(f"| **step** | **{1e3 * accounted / args.steps:.2f}** | 100% |")


if __name__ == "__main__":
    main()
