"""MoE layer forward+backward against peers and against this machine's limit.

    python bench/layer.py [--E 8,64,512,4096] [--reps 5] [--skip-peers]

T = 8192 examples, d = 256, h = 512, k = 2, float32, softmax top-k router (the peers' router;
noisy top-k adds one more router GEMM). Medians of --reps steps after one warm-up step.

Columns:
  ours        MoELayer with the compiled kernels (moe.bindings)
  numpy       the same layer on the numpy oracle path
  torch-loop  a PyTorch CPU layer in the style of Hugging Face Mixtral's sparse block:
              softmax router, topk, a Python loop over experts with index selection and index_add_
  moe-pypi    the published `mixture-of-experts` package (GShard-style dense dispatch tensors)
  bound       max(step FLOPs / sgemm peak, expert-weight traffic / copy bandwidth), both
              measured in this run: sgemm on [T, d] x [d, h] shaped products (the layer's own
              GEMMs if they were one big dense one), traffic = 3 x expert weight bytes
              (read forward, read backward, gradients written). Router FLOPs count.
torch and mixture-of-experts are bench-only dependencies (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moe import bindings  # noqa: E402
from moe.layer import MoELayer  # noqa: E402

T, D, H, K = 8192, 256, 512, 2


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sgemm_peak(reps: int = 5) -> float:
    """Best median GFLOP/s of float32 GEMMs shaped like the layer's (forward and both backward forms)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((T, D), dtype=np.float32)
    w = rng.standard_normal((D, H), dtype=np.float32)
    g = rng.standard_normal((T, H), dtype=np.float32)
    best = 0.0
    for f in (lambda: a @ w, lambda: g @ w.T, lambda: a.T @ g):
        best = max(best, 2 * T * D * H / median_time(f, reps) / 1e9)
    return best


def copy_bandwidth(reps: int = 5) -> float:
    """GB/s of np.copyto on 256 MiB float32 arrays (bytes read + written)."""
    src = np.ones(64 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    t = median_time(lambda: np.copyto(dst, src), reps)
    return 2 * src.nbytes / t / 1e9


def step_flops(E: int) -> float:
    router = 3 * 2 * T * D * E  # forward GEMM + two backward GEMMs
    experts = 3 * 2 * (2 * T * K * D * H)  # 2 GEMMs forward, 4 backward
    return router + experts


def expert_bytes(E: int) -> int:
    return E * (2 * D * H + H + D) * 4


def bench_ours(E: int, reps: int, backend: str) -> float:
    rng = np.random.default_rng(0)
    layer = MoELayer(D, E, H, k=K, gate="softmax_topk", rng=rng)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)

    def step():
        layer.forward(x, rng=rng)
        layer.backward(dy)

    with bindings.use_backend(backend):
        return median_time(step, reps)


def bench_torch_loop(E: int, reps: int) -> float:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, E, bias=False)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)) for _ in range(E)
            )

        def forward(self, x):
            probs = torch.softmax(self.gate(x), dim=-1)
            weights, chosen = torch.topk(probs, K, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out = torch.zeros_like(x)
            mask = nn.functional.one_hot(chosen, num_classes=E).permute(2, 1, 0)  # [E, k, T]
            for e in range(E):
                slot, rows = torch.where(mask[e])
                if rows.numel() == 0:
                    continue
                y = self.experts[e](x[rows]) * weights[rows, slot, None]
                out.index_add_(0, rows, y)
            return out

    torch.manual_seed(0)
    block = Block()
    x = torch.randn(T, D, requires_grad=True)
    dy = torch.randn(T, D)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(dy)

    return median_time(step, reps)


def bench_pypi(E: int, reps: int) -> float:
    import torch
    from mixture_of_experts import MoE

    torch.manual_seed(0)
    moe = MoE(dim=D, num_experts=E, hidden_dim=H, second_policy_train="all", capacity_factor_train=1.25)
    x = torch.randn(1, T, D, requires_grad=True)
    dy = torch.randn(1, T, D)

    def step():
        moe.zero_grad(set_to_none=True)
        out, aux = moe(x)
        torch.autograd.backward([out, aux], [dy, torch.ones_like(aux)])

    return median_time(step, reps)


def fmt(t: float | None) -> str:
    return f"{t * 1e3:9.0f}" if t is not None else f"{'-':>9s}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--E", default="8,64,512,4096")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-peers", action="store_true", help="only ours, numpy and the bound")
    p.add_argument("--pypi-max-E", type=int, default=512, help="largest E for the mixture-of-experts package")
    args = p.parse_args()
    experts = [int(e) for e in args.E.split(",")]

    peak = sgemm_peak()
    bw = copy_bandwidth()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"compiled kernels: {bindings.HAVE_COMPILED}")
    print(f"measured limits: sgemm {peak:.1f} GFLOP/s, copy {bw:.1f} GB/s")
    print(f"T={T} d={D} h={H} k={K} float32, forward+backward, median of {args.reps} (ms)\n")
    head = (f"{'E':>5s} {'ours':>9s} {'numpy':>9s} {'torch-loop':>10s} {'moe-pypi':>9s} {'bound':>9s} "
            f"{'ours/torch':>10s} {'ours/bound':>10s} {'ours/numpy':>10s}")
    print(head)
    for E in experts:
        flops_t = step_flops(E) / (peak * 1e9)
        traffic_t = 3 * expert_bytes(E) / (bw * 1e9)
        bound = max(flops_t, traffic_t)
        ours = bench_ours(E, args.reps, "compiled" if bindings.HAVE_COMPILED else "numpy")
        gc.collect()
        numpy_t = bench_ours(E, max(2, args.reps // 2) if E >= 4096 else args.reps, "numpy")
        gc.collect()
        torch_t = pypi_t = None
        if not args.skip_peers:
            torch_t = bench_torch_loop(E, max(2, args.reps // 2) if E >= 4096 else args.reps)
            gc.collect()
            if E <= args.pypi_max_E:
                pypi_t = bench_pypi(E, args.reps)
                gc.collect()
        ratio_t = f"{ours / torch_t:10.2f}" if torch_t else f"{'-':>10s}"
        print(f"{E:5d} {fmt(ours)} {fmt(numpy_t)} {fmt(torch_t):>10s} {fmt(pypi_t)} {fmt(bound)} "
              f"{ratio_t} {ours / bound:10.2f} {ours / numpy_t:10.2f}"
              f"   (bound: {'FLOPs' if flops_t >= traffic_t else 'weight traffic'})", flush=True)


if __name__ == "__main__":
    main()
