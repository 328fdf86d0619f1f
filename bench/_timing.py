"""One way to time things in bench/: contenders alternated step by step, the limits probed around them.

Import this module before numpy: it sets OPENBLAS_THREAD_TIMEOUT=4 (unless already set). Idle
OpenBLAS pool threads otherwise spin for ~0.1 s after every threaded call, and on two cores
that spin steals 40-50 ms from whatever runs next (a numpy sgemm before our FFN; the gate's
matmul before the experts in a training step).

- `alternate`: one warm-up round, then `reps` rounds of one call of every contender in a
  fixed order (A B C A B C ...), so a machine shared with other work slows them alike.
- `probe_limits`: the machine's sgemm peak and copy bandwidth (moe.accel.devices, the same
  functions the cost model's "cpu" spec uses: one accounting, bytes read + written).
- `measure_row`: limits, alternated contenders, limits again; the row is marked noisy when
  the two probes of either limit differ by more than 10%.
"""

from __future__ import annotations

import os
import sys

if "numpy" not in sys.modules:  # only where it still takes effect (not when a test imports this)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

from moe.accel.devices import copy_bandwidth, sgemm_peak  # noqa: E402

NOISY_TOLERANCE = 0.10


@dataclass(frozen=True)
class Timing:
    """Wall seconds of one contender's timed rounds."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """{name: Timing}: `warmup` untimed rounds, then `reps` timed rounds, one call of each per round."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"alternate needs reps >= 1 and warmup >= 0, got {reps}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


@dataclass(frozen=True)
class Limits:
    """sgemm FLOP/s and copy bandwidth (bytes read + written per second)."""

    sgemm: float
    copy: float

    def best(self, other: Limits) -> Limits:
        """The faster reading of each limit: the lower floor, the one that flatters us least."""
        return Limits(max(self.sgemm, other.sgemm), max(self.copy, other.copy))

    def disagree(self, other: Limits, tolerance: float = NOISY_TOLERANCE) -> bool:
        """Whether either limit moved by more than `tolerance` (relative to the faster reading)."""
        return any(abs(a - b) > tolerance * max(a, b)
                   for a, b in ((self.sgemm, other.sgemm), (self.copy, other.copy)))


def probe_limits(gemm_shapes: tuple[tuple[int, int, int], ...] = (), budget: float = 1.5) -> Limits:
    """The machine now: best sgemm rate over the cost model's shapes plus `gemm_shapes`
    (m, n, k) of the benchmark's own products, and the copy bandwidth."""
    return Limits(sgemm_peak(budget * 0.75, gemm_shapes), copy_bandwidth(budget * 0.25))


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass(frozen=True)
class Row:
    """One alternated measurement with the machine probed before and after."""

    timings: dict[str, Timing]
    start: Limits
    end: Limits
    load_before: float
    load_after: float

    @property
    def limits(self) -> Limits:
        return self.start.best(self.end)

    @property
    def noisy(self) -> bool:
        return self.start.disagree(self.end)

    def median(self, name: str) -> float:
        return self.timings[name].median


def measure_row(fns: dict[str, Callable[[], object]], reps: int, *, warmup: int = 1,
                gemm_shapes: tuple[tuple[int, int, int], ...] = (), budget: float = 1.5) -> Row:
    """Probe the limits, alternate the contenders, probe again."""
    load_before = load_average()
    start = probe_limits(gemm_shapes, budget)
    timings = alternate(fns, reps, warmup)
    end = probe_limits(gemm_shapes, budget)
    return Row(timings, start, end, load_before, load_average())


def machine_line() -> str:
    import numpy as np

    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, numpy {np.__version__}, "
            f"Python {platform.python_version()}, OPENBLAS_THREAD_TIMEOUT="
            f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT')}, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


def limits_text(row: Row) -> str:
    s, e = row.start, row.end
    return (f"sgemm {s.sgemm / 1e9:.1f} -> {e.sgemm / 1e9:.1f} GFLOP/s, copy {s.copy / 1e9:.1f} -> "
            f"{e.copy / 1e9:.1f} GB/s{' NOISY' if row.noisy else ''}")
