"""Kernel benchmark: compiled Cython kernels vs numpy, and the grouped FFN vs this machine's floor.

    python bench/kernels.py [--reps 5] [--experts 8,64,512,4096] [--tiny] [--ffn-only]

Prints medians (after one warm-up round) for every kernel of moe.bindings at the target shape
T = 8192 examples, k = 2, d = 256, h = 512, E in {8, 64, 512, 4096}, then the grouped FFN
(forward + backward) against the floor of bench/_bound.py (forward and backward phases, each
max(FLOPs / sgemm peak, bytes / copy bandwidth); bytes read + written, at the copy rate
counted the same way; the expert weights that got rows are read forward, read backward and
their gradients written). The limits are probed right before and right after each FFN line;
a line whose two probes differ by more than 10% is marked NOISY.

The numpy column is what a numpy user would write: top-k by np.argpartition (then ordering
the k), the other dispatch kernels and the FFN as moe.bindings.reference. The functions on
one line run alternated, one call each per round (bench/_timing.py). `ours/floor` is our
median over the floor from the faster probes; `best/floor` our fastest round. --tiny adds
d = 64, h = 128, E = 65,536 (most experts get 0-1 rows). Expert weights are one random block
tiled over experts (fast to build; every expert still has its own memory, so traffic is real).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import _timing  # noqa: F401  (first: thread settings before numpy loads)
import numpy as np
from _bound import ffn_phases, floor_seconds
from _timing import alternate, limits_text, machine_line, measure_row

from moe.bindings import reference

try:
    from moe.bindings import _dispatch, _grouped
except ImportError as exc:  # pragma: no cover - the benchmark needs the build
    raise SystemExit(f"compiled kernels missing ({exc}); run `pip install -e .` first") from exc

T, K, D, H = 8192, 2, 256, 512


def numpy_topk(h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row as a numpy user writes it: argpartition, then order the k kept."""
    part = np.argpartition(-h, k - 1, axis=1)[:, :k]  # [T, k] unordered
    vals = np.take_along_axis(h, part, axis=1)  # [T, k]
    order = np.argsort(-vals, axis=1)  # [T, k]
    return np.take_along_axis(part, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)


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
        self.active = int(np.count_nonzero(np.diff(self.offsets)))
        # packed weight gradients: one row per expert with rows (ffn_backward's contract)
        self.grads = [np.zeros((self.active, *a.shape[1:]), np.float32) for a in (self.w1, self.b1, self.w2, self.b2)]

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
        topk = numpy_topk if mod is reference else mod.topk_rows
        return {
            "topk_rows": lambda: topk(self.logits, K),
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


def ffn_row(p: Problem, activation: str, reps: int, numpy_too: bool) -> str:
    """One FFN line: ours (median, best), numpy, the floor's compute and traffic parts, the
    floor, ours/floor and best/floor, and the two limit probes."""
    fns = {"ours": p.ffn(_grouped, activation)}
    if numpy_too:
        fns["numpy"] = p.ffn(reference, activation)
    row = measure_row(fns, reps, gemm_shapes=((T, p.h, p.d), (T, p.d, p.h), (p.d, p.h, T)))
    lim = row.limits
    phases = ffn_phases(p.N, p.d, p.h, p.active)
    gemm_s = sum(ph.flops for ph in phases) / lim.sgemm
    traffic_s = sum(ph.nbytes for ph in phases) / lim.copy
    floor = floor_seconds(phases, lim.sgemm, lim.copy)
    ours = row.timings["ours"]
    numpy_ms = row.median("numpy") * 1e3 if numpy_too else float("nan")
    err = check_ffn(p, activation)
    flag = "" if err < 1e-4 else f"  WRONG (rel err {err:.1e})"
    return (
        f"| {p.E} | {p.d} | {p.h} | {activation} | {p.N} | {p.active} | {ours.median * 1e3:.1f} | "
        f"{ours.best * 1e3:.1f} | {numpy_ms:.1f} | {gemm_s * 1e3:.1f} | {traffic_s * 1e3:.1f} | "
        f"{floor * 1e3:.1f} | {ours.median / floor:.2f} | {ours.best / floor:.2f} | {limits_text(row)} | "
        f"{row.load_before:.2f} / {row.load_after:.2f} |{flag}"
    )


FFN_HEADER = (
    "| E | d | h | act | N | active | ours ms | best ms | numpy ms | gemm ms | traffic ms | floor ms | "
    "ours/floor | best/floor | limits (start -> end) | load before/after |\n"
    "|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"
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
        f"{machine_line()}; {info['threads']} OpenMP threads; BLAS threads {info['blas_threads']} "
        f"(control: {info['blas_thread_control']}); schedule {info['schedule']}; "
        f"gemv up to {info['gemv_max_rows']} rows; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"median of {reps} alternated rounds after a warm-up round; T={T} k={K}")

    rng = np.random.default_rng(0)
    if not args.ffn_only:
        print(f"\ndispatch kernels, d={D}")
        print("| E | kernel | compiled ms | numpy ms | numpy/compiled |\n|--:|---|--:|--:|--:|")
        for E in experts:
            p = Problem(E, D, H, rng)
            ours_fns, numpy_fns = p.kernels(_dispatch), p.kernels(reference)
            for name in ours_fns:
                t = alternate({"ours": ours_fns[name], "numpy": numpy_fns[name]}, reps)
                ours, theirs = t["ours"].median, t["numpy"].median
                print(f"| {E} | {name} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | {theirs / ours:.1f} |", flush=True)
            del p

    print("\ngrouped FFN, forward + backward, ms")
    print(FFN_HEADER)
    shapes = [(E, D, H) for E in experts] + ([(65536, 64, 128)] if args.tiny else [])
    for E, d, h in shapes:
        p = Problem(E, d, h, rng)
        for act in activations:
            print(ffn_row(p, act, reps, not args.no_numpy_ffn), flush=True)
        del p
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
