"""Chips, pods and their interconnect: public figures, a measured CPU, collective timings.

Every registry entry cites where its numbers come from. Units: FLOP/s, bytes, bytes/s.
`peak_flops` of an accelerator is its dense bf16 matrix-unit peak (what XLA uses for float32
matmuls at default precision on TPU); the CPU's is float32 sgemm measured on this machine.
`link_bw` is per link and per direction; `links_per_chip` counts links, not neighbours.
HBM sizes written "GB" by a vendor for power-of-two HBM stacks are taken as GiB (the TPU v2
pod's "4 TB" is exactly 256 x 16 GiB = 4 TiB).

Collective models (bandwidth terms only; per-message latency is ignored, which is fair for
the megabyte-sized exchanges of an MoE step and optimistic for tiny ones):
- all-reduce: ring reduce-scatter + all-gather moves 2 (n-1)/n * bytes through each node's
  link (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
  workstations"). On a torus the group is a sub-block; each torus dimension runs its own
  ring, bidirectional when the ring closes through the wraparound link (data split in two
  halves going opposite ways: 2x link_bw), and the payload is split into one part per
  dimension with the dimension order rotated, so all dimensions work at once -- the
  multi-dimensional all-reduce of TPU pods (Ying et al. 2018, "Image Classification at
  Supercomputer Scale", 2-D torus gradient summation). Time = max over dimensions of the
  bytes that dimension's ring carries / its bandwidth. On a 16x16 v5e pod this gives
  ~2 * bytes / (4 links * 50 GB/s), i.e. the 51.2 TB/s "all-reduce bandwidth per pod" of the
  Cloud TPU v5e page. On a switch (NVSwitch) it is one ring at the GPU's full NVLink bandwidth.
- all-to-all: the larger of (a) injection: (g-1)/g * bytes leave each chip through the links
  it has inside the group, and (b) bisection: uniform traffic sends g * bytes / 4 across the
  cut each way, over the bisection of the group's k-ary n-cube -- cutting the longest ring
  of a torus cuts 2 links per ring (wraparound), 1 on a mesh (Dally & Towles 2004,
  "Principles and Practices of Interconnection Networks", ch. 3). A 16x16 v5e torus gives
  32 links x 50 GB/s = 1.6 TB/s, the Cloud TPU page's bisection figure.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOPOLOGIES = ("torus2d", "torus3d", "switch", "single")
_TOPOLOGY_RANK = {"torus2d": 2, "torus3d": 3, "switch": 1, "single": 1}
GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One chip. peak_flops is per chip for `flops_kind` (see module docstring). hbm_bw is
    bytes read + written per second: a vendor's memory bandwidth is that total, and the
    measured "cpu" counts both directions of a copy (copy_bandwidth)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bw: float
    link_bw: float
    links_per_chip: int
    flops_kind: str = "bf16 matrix peak (dense)"
    cache_bytes: float = 0.0
    source: str = ""
    # Measured only for "cpu" (0 = unknown, roofline only): seconds per (example x expert)
    # element of a noisy top-k gate's elementwise work (noise draws, softplus, top-k, the
    # normal CDF/PDF of the smooth load, fwd + bwd, GEMMs excluded), and seconds per
    # (dispatched row x d) element of dispatch + combine, fwd + bwd.
    router_elem_s: float = 0.0
    dispatch_elem_s: float = 0.0
    # and seconds per (dispatched row x expert) of it, where the dispatch builds one-hot
    # capacity slots over the experts (measured only for XLA: moe.accel.xla_rates)
    dispatch_expert_s: float = 0.0
    # Measured per-collective rates of a "switch" mesh (0 = from link_bw x links_per_chip):
    # bytes leaving a device per second in an all-to-all, and ring bytes per second
    # (2 (g-1)/g x payload / time) in an all-reduce. On XLA's CPU mesh the two collectives run
    # at rates an order of magnitude apart, and neither is the copy bandwidth.
    a2a_bw: float = 0.0
    all_reduce_bw: float = 0.0

    def __post_init__(self) -> None:
        for name in ("peak_flops", "hbm_bytes", "hbm_bw"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DeviceSpec {self.name!r}: {name} must be finite and > 0, got {value}")
        for name in ("router_elem_s", "dispatch_elem_s", "dispatch_expert_s", "a2a_bw", "all_reduce_bw"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceSpec {self.name!r}: {name} must be finite and >= 0, got {value}")
        if self.link_bw < 0 or self.links_per_chip < 0 or self.cache_bytes < 0:
            raise ValueError(
                f"DeviceSpec {self.name!r}: link_bw, links_per_chip and cache_bytes must be >= 0, "
                f"got {self.link_bw}, {self.links_per_chip}, {self.cache_bytes}"
            )

    @property
    def injection_bw(self) -> float:
        """Bytes/s a chip can push into the network, all links, one direction."""
        return self.link_bw * self.links_per_chip


@dataclass(frozen=True)
class PodSpec:
    """A set of identical chips and how they are wired; totals are derived."""

    name: str
    device: DeviceSpec
    n_devices: int
    topology: str
    dims: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"PodSpec {self.name!r}: topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if len(self.dims) != _TOPOLOGY_RANK[self.topology] or any(int(d) < 1 for d in self.dims):
            raise ValueError(
                f"PodSpec {self.name!r}: topology {self.topology!r} needs "
                f"{_TOPOLOGY_RANK[self.topology]} positive dims, got {self.dims}"
            )
        if math.prod(self.dims) != self.n_devices:
            raise ValueError(f"PodSpec {self.name!r}: dims {self.dims} hold {math.prod(self.dims)} chips, n_devices is {self.n_devices}")
        if self.topology == "single" and self.n_devices != 1:
            raise ValueError(f"PodSpec {self.name!r}: topology 'single' has 1 device, got {self.n_devices}")
        if self.n_devices > 1 and self.device.injection_bw <= 0:
            raise ValueError(f"PodSpec {self.name!r}: {self.n_devices} devices need link bandwidth, device has none")

    @property
    def peak_flops(self) -> float:
        return self.device.peak_flops * self.n_devices

    @property
    def hbm_bytes(self) -> float:
        return self.device.hbm_bytes * self.n_devices

    @property
    def hbm_bw(self) -> float:
        return self.device.hbm_bw * self.n_devices

    @property
    def bisection_bw(self) -> float:
        """One-direction bytes/s across the worst half/half cut of the whole pod."""
        if self.n_devices == 1:
            return 0.0
        rings = _group_rings(self, self.n_devices)
        return _bisection_bw(self, rings, self.n_devices)


# ============================================================================ registry
_GB = 1e9


def _tpu(name, tflops, hbm_gib, hbm_gbs, link_gbs, links, source) -> DeviceSpec:
    return DeviceSpec(name, tflops * 1e12, hbm_gib * GiB, hbm_gbs * _GB, link_gbs * _GB, links, source=source)


_DEVICES: dict[str, DeviceSpec] = {
    # TPU v2: 45 TFLOPS, 16 GB HBM, 600 GB/s per chip (Google I/O 2017; J. Dean's talks on the
    # TPU v2 pod: 180 TFLOPS / 64 GB board, 11.5 PFLOPS / 4 TB 256-chip pod). Inter-chip link:
    # 4 ICI links at 496 Gbit/s = 62 GB/s (Jouppi et al. 2020, "A Domain-Specific Supercomputer
    # for Training Deep Neural Networks", CACM 63(7), Table 3). ASSUMPTION: read as per link
    # per direction -- the same paper's v3 figure (656 Gbit/s) read that way reproduces the
    # v3 pod's 340 TB/s all-reduce bandwidth on the Cloud TPU v3 page (1024 x 4 x 82 GB/s).
    "tpu-v2": _tpu("tpu-v2", 45, 16, 600, 62, 4, "Google I/O 2017; Jouppi et al. CACM 2020"),
    # TPU v3: 123 TFLOPS bf16, 32 GiB, 900 GB/s (cloud.google.com/tpu/docs/v3); 4 ICI links at
    # 656 Gbit/s = 82 GB/s (Jouppi et al. 2020 Table 3, per direction as above).
    "tpu-v3": _tpu("tpu-v3", 123, 32, 900, 82, 4, "cloud.google.com/tpu/docs/v3; Jouppi et al. CACM 2020"),
    # TPU v4: 275 TFLOPS bf16, 32 GiB, 1200 GB/s (cloud.google.com/tpu/docs/v4); 6 ICI links of
    # 50 GB/s per direction (Jouppi et al. 2023, "TPU v4: An Optically Reconfigurable
    # Supercomputer", ISCA). Cross-check: 4096 x 6 x 50 GB/s = 1.2 PB/s vs the page's 1.1 PB/s
    # all-reduce bandwidth; a 16^3 torus bisection 512 x 50 GB/s = 25.6 TB/s vs its 24 TB/s.
    "tpu-v4": _tpu("tpu-v4", 275, 32, 1200, 50, 6, "cloud.google.com/tpu/docs/v4; Jouppi et al. ISCA 2023"),
    # TPU v5e: 197 TFLOPS bf16, 16 GB HBM2 (taken as GiB), 819 GB/s, 400 GB/s bidirectional
    # ICI per chip over 4 ports = 50 GB/s per link per direction (cloud.google.com/tpu/docs/v5e;
    # its 1.6 TB/s pod bisection = 32 cut links x 50 GB/s on the 16x16 torus).
    "tpu-v5e": _tpu("tpu-v5e", 197, 16, 819, 50, 4, "cloud.google.com/tpu/docs/v5e"),
    # TPU v5p: 459 TFLOPS bf16, 95 GiB, 2765 GB/s, 1200 GB/s bidirectional ICI per chip over
    # 6 links = 100 GB/s per link per direction (cloud.google.com/tpu/docs/v5p).
    "tpu-v5p": _tpu("tpu-v5p", 459, 95, 2765, 100, 6, "cloud.google.com/tpu/docs/v5p"),
    # NVIDIA H100 SXM5: 989.4 TFLOPS dense BF16 tensor core (1979 with 2:4 sparsity), 80 GB
    # HBM3 at 3.35 TB/s, NVLink 4: 18 links, 900 GB/s total bidirectional = 25 GB/s per link
    # per direction (NVIDIA H100 Tensor Core GPU datasheet).
    "h100-sxm": DeviceSpec("h100-sxm", 989.4e12, 80e9, 3.35e12, 25e9, 18, source="NVIDIA H100 datasheet"),
    # NVIDIA H200 SXM: same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s
    # (NVIDIA H200 Tensor Core GPU datasheet).
    "h200": DeviceSpec("h200", 989.4e12, 141e9, 4.8e12, 25e9, 18, source="NVIDIA H200 datasheet"),
}

# name -> (device, topology, dims, source)
_PODS: dict[str, tuple[str, str, tuple[int, ...], str]] = {
    # 4-chip board; within the 16x16 pod torus a board is a 2x2 block (size-2 dims: no wrap bonus).
    "tpu-v2-board": ("tpu-v2", "torus2d", (2, 2), "Google I/O 2017: 4 chips, 180 TFLOPS, 64 GB"),
    # 64 boards = 256 chips, 16x16 2-D torus, 11.5 PFLOPS, 4 TB (Google I/O 2017; Jouppi et al. 2020).
    "tpu-v2-pod": ("tpu-v2", "torus2d", (16, 16), "Google I/O 2017; Jouppi et al. CACM 2020"),
    # 1024 chips, 2-D torus 32x32 (cloud.google.com/tpu/docs/v3; Jouppi et al. 2020). The page's
    # 6.4 TB/s bisection is ~20% above 64 cut links x 82 GB/s = 5.2 TB/s modelled here.
    "tpu-v3-pod": ("tpu-v3", "torus2d", (32, 32), "cloud.google.com/tpu/docs/v3"),
    # 4096 chips = 64 cubes of 4x4x4 joined by optical circuit switches into a 16^3 torus.
    "tpu-v4-pod": ("tpu-v4", "torus3d", (16, 16, 16), "cloud.google.com/tpu/docs/v4; Jouppi et al. ISCA 2023"),
    # One 4x4x4 cube (64 chips, v4-128); a full cube closes its wraparound through the OCS.
    "tpu-v4-slice": ("tpu-v4", "torus3d", (4, 4, 4), "cloud.google.com/tpu/docs/v4 (slice shapes)"),
    # 256 chips, 16x16 2-D torus (cloud.google.com/tpu/docs/v5e).
    "tpu-v5e-pod": ("tpu-v5e", "torus2d", (16, 16), "cloud.google.com/tpu/docs/v5e"),
    # 8960 chips = 140 4x4x4 cubes in a 3-D torus (cloud.google.com/tpu/docs/v5p). No single
    # torus shape for the whole pod is published (largest slice 16x16x24); 16x20x28 is a
    # notional cube-multiple factorisation used only for bisection estimates.
    "tpu-v5p-pod": ("tpu-v5p", "torus3d", (16, 20, 28), "cloud.google.com/tpu/docs/v5p"),
    # HGX/DGX H100 and H200: 8 GPUs on NVSwitch, full NVLink bandwidth between any pair.
    "h100-node": ("h100-sxm", "switch", (8,), "NVIDIA DGX H100 / HGX H100 8-GPU"),
    "h200-node": ("h200", "switch", (8,), "NVIDIA HGX H200 8-GPU"),
}


def get_device(name: str) -> DeviceSpec:
    """A chip by name; "cpu" is measured on first use (see calibrate_cpu)."""
    if name == "cpu":
        return calibrate_cpu()
    if name in _DEVICES:
        return _DEVICES[name]
    hint = f" ({name!r} is a pod: use get_pod)" if name in _PODS else ""
    raise ValueError(f"unknown device {name!r}{hint}; known devices: {sorted([*_DEVICES, 'cpu'])}")


def get_pod(name: str) -> PodSpec:
    """A pod by name; a device name gives that chip alone as a one-device pod; "cpu:N" is N
    XLA host devices simulated on this machine (see cpu_mesh)."""
    if name.startswith("cpu:"):
        n = name[len("cpu:"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"target 'cpu:N' needs a device count N >= 1, got {name!r}")
        return cpu_mesh(int(n))
    if name in _PODS:
        device, topology, dims, source = _PODS[name]
        return PodSpec(name, _DEVICES[device], math.prod(dims), topology, dims, source)
    if name in _DEVICES or name == "cpu":
        device = get_device(name)
        return PodSpec(name, device, 1, "single", (1,), device.source)
    raise ValueError(f"unknown pod {name!r}; known targets: {list_targets()} and cpu:N")


def list_targets() -> list[str]:
    """Every name get_pod accepts: pods, then single chips (and "cpu"); also "cpu:N" (cpu_mesh)."""
    return sorted(_PODS) + sorted([*_DEVICES, "cpu"])


def cpu_mesh(n_devices: int, device: DeviceSpec | None = None) -> PodSpec:
    """N XLA host devices simulated on this machine (`moe train --backend jax --cpu-devices N`,
    i.e. XLA_FLAGS=--xla_force_host_platform_device_count=N), as a pod.

    They share the machine's cores, memory and memory bandwidth, so each gets 1/N of the
    measured rates of `device` (default: the numpy-measured "cpu"); an exchange between them
    is a memory copy, modelled as a switch whose per-device injection bandwidth is 1/N of the
    copy bandwidth."""
    base = calibrate_cpu() if device is None else device
    n = int(n_devices)
    if n < 1:
        raise ValueError(f"a cpu mesh needs n_devices >= 1, got {n_devices!r}")
    per = DeviceSpec(
        f"{base.name}/{n}", peak_flops=base.peak_flops / n, hbm_bytes=base.hbm_bytes / n, hbm_bw=base.hbm_bw / n,
        link_bw=base.hbm_bw / n, links_per_chip=1, flops_kind=base.flops_kind, cache_bytes=base.cache_bytes / n,
        source=f"1/{n} of {base.name} ({base.source})",
        router_elem_s=base.router_elem_s * n, dispatch_elem_s=base.dispatch_elem_s * n,
        dispatch_expert_s=base.dispatch_expert_s * n)
    return PodSpec(f"cpu:{n}", per, n, "switch" if n > 1 else "single", (n,), per.source)


# ============================================================================ the measured CPU
_CPU_CACHE: dict[str, DeviceSpec] = {}
_SGEMM_SHAPES = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 256, 1024))


def _median_seconds(fn, budget: float, max_reps: int = 50) -> float:
    """Median wall time of fn() over repetitions that fill `budget` seconds (at least 3)."""
    fn()  # warm up: thread pool start, page faults
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < budget and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return float(np.median(times))


def sgemm_peak(budget: float, extra_shapes: tuple[tuple[int, int, int], ...] = ()) -> float:
    """FLOP/s: the best median float32 matmul rate over a few shapes (m, n, k) and any
    `extra_shapes` (a benchmark's own products), numpy's BLAS and its threads; `budget`
    seconds in all."""
    shapes = _SGEMM_SHAPES + tuple(extra_shapes)
    best = 0.0
    for m, n, kk in shapes:
        a = np.full((m, kk), 0.5, dtype=np.float32)  # [m, k]
        b = np.full((kk, n), 0.25, dtype=np.float32)  # [k, n]
        out = np.empty((m, n), dtype=np.float32)  # [m, n]
        dt = _median_seconds(lambda a=a, b=b, out=out: np.matmul(a, b, out=out), budget / len(shapes))
        best = max(best, 2.0 * m * n * kk / dt)
    return best


def copy_bandwidth(budget: float) -> float:
    """Bytes read + written per second by a copy of a 64 MiB float32 array (past any cache),
    the faster of one thread and one thread per core (numpy's copy releases the GIL).

    The one accounting of memory traffic: a model counts every byte it reads and every byte
    it writes against this rate (write-allocate traffic is not counted, so this is the usable
    copy rate). A copy of n bytes counts 2 n.
    """
    src = np.full(16 * 2**20, 1.0, dtype=np.float32)  # 64 MiB
    dst = np.empty_like(src)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    best = 2.0 * src.nbytes / _median_seconds(lambda: np.copyto(dst, src), budget / 2)
    if cores > 1:
        parts = [slice(i * src.size // cores, (i + 1) * src.size // cores) for i in range(cores)]
        with ThreadPoolExecutor(cores) as pool:
            def threaded() -> None:
                list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))

            best = max(best, 2.0 * src.nbytes / _median_seconds(threaded, budget / 2))
    return best


def _last_level_cache_bytes() -> float:
    """Largest cache size the kernel reports for cpu0 (0 when unknown)."""
    best = 0.0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, float(digits) * scale)
    return best


def _physical_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8.0 * GiB  # platform without sysconf: a placeholder, said here


def calibrate_cpu(seconds: float = 1.0, *, refresh: bool = False) -> DeviceSpec:
    """Measure this machine as a single "cpu" device, once per process.

    peak_flops: sgemm_peak; hbm_bw: copy_bandwidth (bytes read + written per second, the one
    accounting of memory traffic in the cost model and bench/). Later calls return the cached
    spec unless refresh=True.
    """
    if "cpu" in _CPU_CACHE and not refresh:
        return _CPU_CACHE["cpu"]
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"calibrate_cpu needs seconds > 0, got {seconds}")
    budget = seconds / (len(_SGEMM_SHAPES) + 1)
    best_flops = sgemm_peak(budget * len(_SGEMM_SHAPES))
    copy_bw = copy_bandwidth(budget)
    router_elem_s = _router_elem_seconds(best_flops, budget)
    dispatch_elem_s = _dispatch_elem_seconds(budget)
    spec = DeviceSpec(
        "cpu",
        peak_flops=best_flops,
        hbm_bytes=_physical_memory_bytes(),
        hbm_bw=copy_bw,
        link_bw=0.0,
        links_per_chip=0,
        flops_kind="float32 sgemm (measured)",
        cache_bytes=_last_level_cache_bytes(),
        source=f"measured by calibrate_cpu({seconds:g}) on this machine",
        router_elem_s=router_elem_s,
        dispatch_elem_s=dispatch_elem_s,
    )
    _CPU_CACHE["cpu"] = spec
    return spec


def _router_elem_seconds(peak_flops: float, budget: float) -> float:
    """Time this project's noisy top-k gate (fwd + bwd) on a small problem, less its GEMMs at
    peak, per (example x expert) element. Elementwise numpy work with transcendentals (normal
    draws, softplus, erf) is far from both the FLOP and the bandwidth roofline on a CPU."""
    from moe.routing.gates import NoisyTopKGate

    T, d, E = 2048, 64, 256
    rng = np.random.default_rng(0)
    gate = NoisyTopKGate(d, E, 2, rng=rng)
    gate.params["w_noise"][...] = rng.standard_normal((d, E), dtype=np.float32) * 0.1
    x = rng.standard_normal((T, d), dtype=np.float32)

    def step() -> None:
        out = gate.forward(x, train=True, rng=rng)
        gate.backward(np.ones_like(out.gates))

    gemm_s = 3 * 2 * (2.0 * T * d * E) / peak_flops  # two gate matrices, fwd + 2 bwd GEMMs each
    return max(_median_seconds(step, budget) - gemm_s, 0.0) / (T * E)


def _dispatch_elem_seconds(budget: float) -> float:
    """Time the dispatch plan, gather, combine and their backward per (row x d) element."""
    from moe import bindings
    from moe.bindings.plan import plan_dispatch

    T, d, k, E = 4096, 128, 2, 64
    rng = np.random.default_rng(0)
    index = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    x = rng.standard_normal((T, d), dtype=np.float32)
    w = np.full((T, k), 0.5, dtype=np.float32)

    def step() -> None:
        plan = plan_dispatch(index, E, -1)
        packed = bindings.gather_rows(x, plan.src_row)  # [N, d]
        y = bindings.combine(packed, plan.slot, w)  # [T, d]
        d_out, _ = bindings.combine_backward(y, packed, plan.slot, w)
        bindings.combine(d_out, plan.slot, plan.keep.astype(np.float32))

    return _median_seconds(step, budget) / (T * k * d)


# ============================================================================ collectives
@dataclass(frozen=True)
class _Ring:
    """A group's extent along one torus dimension: `size` chips, `stride` hops apart."""

    size: int
    dim: int
    stride: int
    wraps: bool  # the ring closes through the wraparound link
    bw: float  # bytes/s one ring moves per direction of the data flow


def _split(avail: tuple[int, ...], group_size: int) -> tuple[int, ...] | None:
    """Per-dimension factors t_i | avail_i with prod t_i = group_size, filling early dims first.

    Prime by prime: each prime factor of the group goes to the first dimension that still
    has that factor, so a factorisation is found whenever one exists. None when none does.
    """
    take, rest, left, p = [1] * len(avail), list(avail), group_size, 2
    while left > 1:
        if p * p > left:
            p = left  # what is left is prime
        if left % p:
            p += 1
            continue
        i = next((i for i, r in enumerate(rest) if r % p == 0), None)
        if i is None:
            return None
        take[i] *= p
        rest[i] //= p
        left //= p
    return tuple(take)


def _group_rings(pod: PodSpec, group_size: int, stride: int = 1) -> list[_Ring]:
    """Lay a group of `group_size` chips on the torus, beside `stride`-sized inner blocks.

    stride 1: the group is a sub-block filling the first dimensions (an EP group). stride s:
    the torus is first split into blocks of s chips (the EP groups) and the group takes one
    chip from each of `group_size` blocks (a DP group): its ring along dimension i hops
    s_i chips and shares each link with the s_i interleaved groups. A group that does not
    tile the torus is modelled as one open ring at one link's bandwidth (pessimistic).
    """
    link = pod.device.link_bw
    inner = _split(pod.dims, stride)
    avail = None if inner is None else tuple(d // e for d, e in zip(pod.dims, inner, strict=True))
    take = None if avail is None else _split(avail, group_size)
    if take is None:
        return [_Ring(group_size, 0, 1, False, link)]
    rings = []
    for dim, hop, size, room in zip(pod.dims, inner, take, avail, strict=True):
        if size > 1:
            wraps = size == room and dim > 2  # spans the whole dimension: closes through the wrap link
            rings.append(_Ring(size, dim, hop, wraps, (2 if wraps else 1) * link / hop))
    return rings


def _check_group(pod: PodSpec, group_size: int, stride: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if group_size * stride > pod.n_devices:
        raise ValueError(f"group of {group_size} chips (stride {stride}) exceeds pod {pod.name!r} with {pod.n_devices} chips")


def _bisection_bw(pod: PodSpec, rings: list[_Ring], group_size: int) -> float:
    """One-direction bandwidth across the group's worst half/half cut (Dally & Towles 2004)."""
    if pod.topology == "switch":
        return group_size / 2 * pod.device.injection_bw  # non-blocking switch: full bisection
    if not rings:
        return 0.0
    longest = max(rings, key=lambda r: r.size)
    rows = group_size / longest.size  # parallel rings the cut crosses
    cut_links = 2 if longest.wraps else 1
    return rows * cut_links * pod.device.link_bw / longest.stride


def all_reduce_time(nbytes: float, pod: PodSpec, group_size: int, *, stride: int = 1) -> float:
    """Seconds to all-reduce `nbytes` per chip across `group_size` chips (module docstring).

    switch: 2 (g-1)/g * bytes / (links * link_bw), the ring bound of Patarasuk & Yuan 2009
    (the device's measured all_reduce_bw in place of links * link_bw where it has one).
    torus: per-dimension rings, payload split over dimensions with rotated order; returns
    max over dims of sum_parts 2 (t-1)/t * part_bytes_reaching_that_dim / ring_bw.
    """
    _check_group(pod, group_size, stride)
    if nbytes < 0:
        raise ValueError(f"all_reduce_time needs bytes >= 0, got {nbytes}")
    if group_size == 1 or nbytes == 0:
        return 0.0
    if pod.topology == "switch":
        return 2.0 * (group_size - 1) / group_size * nbytes / (pod.device.all_reduce_bw or pod.device.injection_bw)
    rings = _group_rings(pod, group_size, stride)
    n_parts = len(rings)
    load = [0.0] * n_parts
    for first in range(n_parts):
        data = nbytes / n_parts
        for pos in range(n_parts):
            i = (first + pos) % n_parts
            size = rings[i].size
            load[i] += 2.0 * (size - 1) / size * data
            data /= size  # reduce-scatter leaves 1/size of the part for the next dimension
    return max(load[i] / rings[i].bw for i in range(n_parts))


def all_to_all_time(bytes_per_device: float, pod: PodSpec, group_size: int, *, stride: int = 1) -> float:
    """Seconds for an all-to-all where each of `group_size` chips sends `bytes_per_device`
    spread evenly over the group (itself included): max(injection, bisection) bound.
    stride > 1: the group interleaves with others (see _group_rings) and shares their links.
    A switch whose device carries a measured a2a_bw: the bytes leaving a device at that rate."""
    _check_group(pod, group_size, stride)
    if bytes_per_device < 0:
        raise ValueError(f"all_to_all_time needs bytes_per_device >= 0, got {bytes_per_device}")
    if group_size == 1 or bytes_per_device == 0:
        return 0.0
    leaving = (group_size - 1) / group_size * bytes_per_device
    if pod.topology == "switch" and pod.device.a2a_bw > 0:  # a measured rate holds every limit
        return leaving / pod.device.a2a_bw
    if pod.topology == "switch":
        inject_bw = pod.device.injection_bw
        rings: list[_Ring] = []
    else:
        rings = _group_rings(pod, group_size, stride)
        # a chip with a neighbour on both sides of a ring uses 2 links in that dimension,
        # shared with the groups interleaved along it
        inject_bw = sum((2 if r.size > 2 else 1) * pod.device.link_bw / r.stride for r in rings)
    t_inject = leaving / inject_bw
    t_bisect = group_size * bytes_per_device / 4.0 / _bisection_bw(pod, rings, group_size)
    return max(t_inject, t_bisect)
