"""Kernel benchmark: compiled Cython kernels vs the numpy reference, and the FFN vs machine limits.

Prints medians (after one warm-up call) for every kernel of moe.bindings at the target shape
T = 8192 examples, k = 2, d = 256, h = 512, E in {8, 64, 512, 4096}, then the grouped FFN
(forward + backward) against two bounds measured in the same run:

- gemm bound: the FFN's FLOPs (6 GEMMs of 2*N*d*h) / numpy's sgemm GFLOP/s on
  [8192 x 256] @ [256 x 512];
- weight-traffic bound: 3 x the weight bytes of the experts that got rows (read forward, read
  backward, write the gradient) / copy bandwidth (bytes of a 512 MiB np.copyto per second).

The functions compared on one line (ours, numpy, and for the FFN the sgemm and copy probes)
run round-robin, one call each per round, so a machine shared with other work slows them
alike. `ours/bound` is our median over the larger bound (from the probes' medians);
`best/bound` uses the fastest round of each, the closest to an idle machine. --tiny adds the tiny-expert case
d = 64, h = 128, E = 65,536 (most experts get 0-1 rows). Expert weights are one random block
tiled over experts (fast to build; every expert still has its own memory, so traffic is real).

OPENBLAS_THREAD_TIMEOUT=4 (unless set already): OpenBLAS's idle pool threads otherwise spin
for ~0.1 s after every threaded call, and numpy's sgemm run just before our FFN cost it
40-50 ms (of ~150) on two cores. The same holds in a training step after the gate's matmul.

    PYTHONPATH=. .venv/bin/python bench/kernels.py [--reps 5] [--experts 8,64,512,4096] [--tiny]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from moe.bindings import reference  # noqa: E402

try:
    from moe.bindings import _dispatch, _grouped
except ImportError as exc:  # pragma: no cover - the benchmark needs the build
    raise SystemExit(f"compiled kernels missing ({exc}); run `pip install -e .` first") from exc

T, K, D, H = 8192, 2, 256, 512


def round_robin(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """{name: (median, best) seconds}: one warm-up call each, then `reps` rounds of one call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


class Probes:
    """The machine limits: numpy sgemm on the FFN's first-layer shape, and a large copy."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.a = rng.standard_normal((8192, 256), dtype=np.float32)
        self.b = rng.standard_normal((256, 512), dtype=np.float32)
        self.src = np.ones(512 << 20, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        self.flops = 2 * 8192 * 256 * 512

    def fns(self) -> dict[str, Callable[[], object]]:
        return {"sgemm": lambda: self.a @ self.b, "copy": lambda: np.copyto(self.dst, self.src)}


class Problem:
    """One routed batch and one expert bank of E experts."""

    def __init__(self, E: int, d: int, h: int, rng: np.random.Generator) -> None:
        self.E, self.d, self.h = E, d, h
        self.logits = rng.standard_normal((T, E), dtype=np.float32)  # [T, E]
        self.index, _ = _dispatch.topk_rows(self.logits, K)  # [T, k]
        self.capacity = int(np.ceil(1.25 * T * K / E))
        self.keep = np.ones((T, K), dtype=bool)  # dropless, so every expert sees its rows
        self.src, self.slot, self.offsets = _dispatch.counting_sort(self.index, self.keep, E)
        self.N = self.src.shape[0]
        self.x = rng.standard_normal((T, d), dtype=np.float32)  # [T, d]
        self.packed = _dispatch.gather_rows(self.x, self.src)  # [N, d]
        self.gates = rng.random((T, K), dtype=np.float32)  # [T, k]
        self.out = rng.standard_normal((self.N, d), dtype=np.float32)  # [N, d]
        self.dy = rng.standard_normal((T, d), dtype=np.float32)  # [T, d]
        self.w1 = np.empty((E, d, h), np.float32)
        self.w1[:] = rng.standard_normal((1, d, h), dtype=np.float32) / np.float32(np.sqrt(d))
        self.w2 = np.empty((E, h, d), np.float32)
        self.w2[:] = rng.standard_normal((1, h, d), dtype=np.float32) / np.float32(np.sqrt(h))
        self.b1 = np.zeros((E, h), np.float32)
        self.b2 = np.zeros((E, d), np.float32)
        self.grads = [np.zeros_like(a) for a in (self.w1, self.b1, self.w2, self.b2)]
        self.active = int(np.count_nonzero(np.diff(self.offsets)))

    def ffn(self, mod, activation: str) -> Callable[[], object]:
        def step():
            out, pre, act = mod.ffn_forward(
                self.packed, self.offsets, self.w1, self.b1, self.w2, self.b2, activation
            )  # [N, d], [N, h], [N, h]
            return mod.ffn_backward(
                self.out,
                self.packed,
                self.offsets,
                self.w1,
                self.w2,
                pre,
                act,
                activation,
                *self.grads,
            )  # [N, d]

        return step

    def kernels(self, mod) -> dict[str, Callable[[], object]]:
        return {
            "topk_rows": lambda: mod.topk_rows(self.logits, K),
            "capacity_keep": lambda: mod.capacity_keep(self.index, self.E, self.capacity),
            "counting_sort": lambda: mod.counting_sort(self.index, self.keep, self.E),
            "gather_rows": lambda: mod.gather_rows(self.x, self.src),
            "combine": lambda: mod.combine(self.out, self.slot, self.gates),
            "combine_backward": lambda: mod.combine_backward(
                self.dy, self.out, self.slot, self.gates
            ),
        }


def check_ffn(p: Problem, activation: str) -> float:
    """Worst forward error relative to scale: a guard against timing a broken kernel."""
    args = (p.packed, p.offsets, p.w1, p.b1, p.w2, p.b2, activation)
    ours, want = _grouped.ffn_forward(*args)[0], reference.ffn_forward(*args)[0]
    return float(np.abs(ours - want).max() / max(np.abs(want).max(), 1e-30))


def ffn_row(p: Problem, probes: Probes, activation: str, reps: int, numpy_too: bool) -> str:
    """One FFN line: ours (median, best), numpy, the two bounds, ours/bound (median over the
    bound from the probes' medians) and best/bound (fastest round over the bound from the
    probes' fastest rounds: the idle-machine estimate)."""
    fns = {**probes.fns(), "ours": p.ffn(_grouped, activation)}
    if numpy_too:
        fns["numpy"] = p.ffn(reference, activation)
    t = round_robin(fns, reps)
    flops = 6 * 2 * p.N * p.d * p.h
    traffic = 3 * p.active * (p.w1[0].nbytes + p.w2[0].nbytes)

    def bound(which: int) -> tuple[float, float, float, float]:
        gflops = probes.flops / t["sgemm"][which] / 1e9
        bandwidth = probes.src.nbytes / t["copy"][which]
        gemm_s, traffic_s = flops / (gflops * 1e9), traffic / bandwidth
        return gflops, bandwidth, gemm_s, traffic_s

    gflops, bandwidth, gemm_bound, traffic_bound = bound(0)
    best_bound = max(bound(1)[2:])
    (med, best), numpy_ms = t["ours"], t["numpy"][0] * 1e3 if numpy_too else float("nan")
    err = check_ffn(p, activation)
    flag = "" if err < 1e-4 else f"  WRONG (rel err {err:.1e})"
    return (
        f"{p.E:6d} {p.d:4d} {p.h:4d} {activation:5s} {p.N:6d} {p.active:6d} "
        f"{med * 1e3:8.1f} {best * 1e3:8.1f} {numpy_ms:8.1f} {gflops:7.1f} {bandwidth / 1e9:6.2f} "
        f"{gemm_bound * 1e3:8.1f} {traffic_bound * 1e3:8.1f} "
        f"{med / max(gemm_bound, traffic_bound):9.2f}x {best / best_bound:9.2f}x{flag}"
    )


FFN_HEADER = (
    f"{'E':>6} {'d':>4} {'h':>4} {'act':5s} {'N':>6} {'active':>6} {'median':>8} {'best':>8} "
    f"{'numpy':>8} {'sgemmGF':>7} {'copyGB':>6} {'gemm-bd':>8} {'traffic':>8} {'ours/bound':>10} "
    f"{'best/bound':>10}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per measurement (>= 5)")
    ap.add_argument("--experts", default="8,64,512,4096", help="comma-separated E values")
    ap.add_argument("--activations", default="relu,gelu")
    ap.add_argument("--tiny", action="store_true", help="add d=64, h=128, E=65536")
    ap.add_argument("--no-numpy-ffn", action="store_true", help="skip the slow numpy FFN timings")
    ap.add_argument("--ffn-only", action="store_true", help="skip the dispatch kernels")
    args = ap.parse_args()
    reps = max(args.reps, 5)
    experts = [int(e) for e in args.experts.split(",")]
    activations = args.activations.split(",")

    info = _grouped.schedule_info()
    print(
        f"{info['threads']} OpenMP threads; BLAS threads {info['blas_threads']} "
        f"(control: {info['blas_thread_control']}); schedule {info['schedule']}; "
        f"gemv up to {info['gemv_max_rows']} rows; load average {os.getloadavg()[0]:.2f}; "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}"
    )
    print(f"median of {reps} rounds after a warm-up; T={T} k={K}")

    rng = np.random.default_rng(0)
    if not args.ffn_only:
        print(f"\ndispatch kernels, d={D}")
        print(f"{'E':>6} {'kernel':18s} {'compiled ms':>12} {'numpy ms':>10} {'speedup':>8}")
        for E in experts:
            p = Problem(E, D, H, rng)
            ours_fns, numpy_fns = p.kernels(_dispatch), p.kernels(reference)
            for name in ours_fns:
                t = round_robin({"ours": ours_fns[name], "numpy": numpy_fns[name]}, reps)
                ours, theirs = t["ours"][0], t["numpy"][0]
                print(
                    f"{E:6d} {name:18s} {ours * 1e3:12.3f} {theirs * 1e3:10.3f} "
                    f"{theirs / ours:7.1f}x",
                    flush=True,
                )
            del p

    print("\ngrouped FFN, forward + backward, ms")
    print(FFN_HEADER)
    probes = Probes(rng)
    shapes = [(E, D, H) for E in experts] + ([(65536, 64, 128)] if args.tiny else [])
    for E, d, h in shapes:
        p = Problem(E, d, h, rng)
        for act in activations:
            print(ffn_row(p, probes, act, reps, not args.no_numpy_ffn), flush=True)
        del p
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
