"""Does the cost model predict this CPU? Predicted vs measured MoE layer step (forward+backward).

    python bench/accel_calibration.py [--E 8,64,512] [--reps 5] [--max-error 0.3]

The `cpu` device spec is measured on the spot (sgemm peak and copy bandwidth, see
moe.accel.devices.calibrate_cpu); the cost model then predicts one MoELayer forward+backward
at T = 8192, d = 256, h = 512, k = 2 (noisy top-k, dropless), and we time the real layer
(compiled kernels) in the same run. The issue's bar: |measured / predicted - 1| <= 30%;
the exit status is 1 when a row misses --max-error. This is a measurement, so it lives
here and not in the tests (tests/accel/test_accel_cost.py checks the model's arithmetic).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moe import bindings  # noqa: E402
from moe.accel.cost import predict_layer_step  # noqa: E402
from moe.accel.devices import calibrate_cpu  # noqa: E402
from moe.accel.shape import MoEShape  # noqa: E402
from moe.layer import MoELayer  # noqa: E402


def measure(T: int, d: int, h: int, E: int, k: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    layer = MoELayer(d, E, h, k=k, rng=rng)
    x = rng.standard_normal((T, d), dtype=np.float32)
    dy = rng.standard_normal((T, d), dtype=np.float32)

    def step():
        layer.forward(x, rng=rng)
        layer.backward(dy)

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(T: int, d: int, h: int, experts: list[int], k: int = 2, reps: int = 5, seconds: float = 1.0):
    """Rows of (E, predicted seconds, measured seconds, prediction detail)."""
    device = calibrate_cpu(seconds=seconds, refresh=True)
    rows = []
    for E in experts:
        shape = MoEShape(d_model=d, d_hidden=h, n_experts=E, k=k, n_layers=1, tokens=T, capacity_factor=None)
        pred = predict_layer_step(shape, device)
        rows.append((E, pred["total_s"], measure(T, d, h, E, k, reps), pred))
    return device, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--E", default="8,64,512")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-error", type=float, default=0.3, help="largest |measured/predicted - 1| that passes")
    args = p.parse_args()
    device, rows = calibrate(8192, 256, 512, [int(e) for e in args.E.split(",")], reps=args.reps)
    print(f"cpu spec measured now: sgemm {device.peak_flops / 1e9:.1f} GFLOP/s, copy {device.hbm_bw / 1e9:.1f} GB/s, "
          f"LLC {device.cache_bytes / 2**20:.0f} MiB; compiled kernels: {bindings.HAVE_COMPILED}")
    print("T=8192 d=256 h=512 k=2 noisy top-k dropless, forward+backward\n")
    print(f"{'E':>5s} {'predicted ms':>13s} {'measured ms':>12s} {'measured/pred':>14s}   "
          f"{'router':>7s} {'dispatch':>9s} {'experts':>8s}  (predicted ms)")
    for E, pred_s, meas_s, detail in rows:
        print(f"{E:5d} {pred_s * 1e3:13.0f} {meas_s * 1e3:12.0f} {meas_s / pred_s:14.2f}   "
              f"{detail['router_s'] * 1e3:7.0f} {detail['dispatch_s'] * 1e3:9.0f} {detail['experts_s'] * 1e3:8.0f}")
    missed = [E for E, pred_s, meas_s, _ in rows if abs(meas_s / pred_s - 1) > args.max_error]
    if missed:
        print(f"\nmissed the {args.max_error:.0%} bar at E = {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
