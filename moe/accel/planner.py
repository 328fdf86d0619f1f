"""Choose an EP x DP layout, per-device batch and capacity factor for a pod, by predicted time.

The planner enumerates every factorisation ep x dp of the device count with ep <= E (experts
per device = ceil(E / ep) when ep does not divide E), on a torus both nestings (EP groups
compact with DP strided across them, or the reverse), micro-batch sizes per device and
capacity factors; asks moe.accel.cost.predict for each; rejects layouts that do not fit in
HBM (keeping by how much they miss) and ranks the rest by step time (ties: less memory).

With a measured load profile, experts are placed on the ep ranks of a group by
moe.profiling.placement.lpt_placement (at most ceil(E/ep) experts per rank, so memory stays
as modelled) and the contiguous placement is reported beside it. The busiest rank's load
sets the expert and all-to-all time when routing is dropless; with a capacity factor the
padded buffers fix the time and the imbalance shows up as expected drops instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from moe.accel.cost import CostReport, predict
from moe.accel.devices import PodSpec
from moe.accel.shape import MoEShape

GiB = 2**30


@dataclass(frozen=True)
class LoadBalance:
    """Device load max/mean for one ep under the contiguous and the LPT placement."""

    ep: int
    before: float  # contiguous
    after: float  # LPT
    placement: np.ndarray = field(repr=False)  # int32[E], the LPT placement used


@dataclass(frozen=True)
class Rejected:
    """A layout that does not fit: its report and how far over HBM it is."""

    report: CostReport

    @property
    def miss_gib(self) -> float:
        return self.report.miss_bytes / GiB


@dataclass(frozen=True)
class PlanResult:
    """Fitting layouts ranked by step time (best first, at most `top`), plus the misses."""

    shape: MoEShape
    pod: PodSpec
    ranked: list[CostReport]
    n_candidates: int
    n_rejected: int
    closest_misses: list[Rejected]
    balance: dict[int, LoadBalance]  # ep -> placement statistics (empty without a profile)
    n_over_drop_limit: int = 0

    @property
    def best(self) -> CostReport | None:
        return self.ranked[0] if self.ranked else None

    @property
    def runners_up(self) -> list[CostReport]:
        return self.ranked[1:]


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _batch_candidates(shape: MoEShape, n: int, per_device_batches) -> list[int]:
    share = math.ceil(shape.tokens / n)
    if per_device_batches is None:  # the full share, then halvings (gradient accumulation)
        out, t = [], share
        while t >= 1 and len(out) < 6:
            out.append(t)
            t //= 2
        return out
    out = []
    for t in per_device_batches:
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 1:
            raise ValueError(f"per_device_batches must hold ints >= 1, got {t!r}")
        if t > share:
            raise ValueError(f"per-device batch {t} exceeds the share ceil({shape.tokens} / {n}) = {share}")
        out.append(int(t))
    return sorted(set(out), reverse=True)


def _check_loads(loads, n_experts: int) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape != (n_experts,):
        raise ValueError(f"profile_loads must be float[{n_experts}] (one per expert), got shape {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0) or loads.sum() <= 0:
        raise ValueError("profile_loads must be finite, >= 0 and not all zero")
    return loads


def _max_over_mean(loads: np.ndarray, placement: np.ndarray, n_bins: int) -> float:
    per_bin = np.bincount(placement.astype(np.int64), weights=loads, minlength=n_bins)  # [n_bins]
    return float(per_bin.max() / per_bin.mean())


def _balance(loads: np.ndarray, ep: int) -> LoadBalance:
    from moe.profiling.placement import contiguous_placement, lpt_placement

    E = loads.shape[0]
    before = np.asarray(contiguous_placement(E, ep))
    after = np.asarray(lpt_placement(loads, ep, capacity=math.ceil(E / ep)))
    return LoadBalance(ep, _max_over_mean(loads, before, ep), _max_over_mean(loads, after, ep), after)


def plan(shape: MoEShape, pod: PodSpec, *, profile_loads: np.ndarray | None = None,
         capacity_factors=(1.0, 1.25, 1.5, 2.0), per_device_batches=None, top: int = 5,
         max_drop_rate: float | None = None) -> PlanResult:
    """Rank every fitting (ep, dp, tokens per device, capacity factor) by predicted step time.

    capacity_factors may include None (dropless). per_device_batches: micro-batch sizes per
    device (default: the full share ceil(tokens / n) and its halvings). max_drop_rate drops
    candidates whose expected drop rate (from the profile) is higher.
    """
    if not capacity_factors:
        raise ValueError("capacity_factors must name at least one factor (or None for dropless)")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    n = pod.n_devices
    loads = None if profile_loads is None else _check_loads(profile_loads, shape.n_experts)
    eps = [ep for ep in _divisors(n) if ep <= shape.n_experts]
    balance = {ep: _balance(loads, ep) for ep in eps} if loads is not None else {}
    fitting: list[CostReport] = []
    rejected: list[Rejected] = []
    over_drop = 0
    for cf in capacity_factors:
        s = replace(shape, capacity_factor=cf)
        for ep in eps:
            placement = balance[ep].placement if ep in balance else None
            nestings = (True, False) if pod.topology.startswith("torus") and 1 < ep < n else (True,)
            for t in _batch_candidates(shape, n, per_device_batches):
                for ep_inner in nestings:
                    report = predict(s, pod, ep, n // ep, tokens_per_device=t, expert_loads=loads,
                                     placement=placement, ep_inner=ep_inner)
                    if not report.fits:
                        rejected.append(Rejected(report))
                    elif max_drop_rate is not None and report.drop_rate > max_drop_rate:
                        over_drop += 1
                    else:
                        fitting.append(report)
    fitting.sort(key=lambda r: (r.step_time, r.memory_total))
    rejected.sort(key=lambda r: r.report.miss_bytes)
    return PlanResult(shape, pod, fitting[:top], len(fitting) + len(rejected) + over_drop,
                      len(rejected), rejected[:top], balance, over_drop)


def read_profile_loads(path: str | Path, *, reduce: str = "sum") -> np.ndarray:
    """Per-expert load (float64[E]) from a profile JSON.

    Accepts {"load": [...]} (one layer, e.g. a LoadProfile summary) or
    {"layers": {name: {"load": [...]}, ...}} (a ModelProfile summary), either at the top level
    or under "summary" (the profile.json that moe.profiling.write_report writes). Layers are combined elementwise by `reduce`:
    "sum" (default) is the total work expert slot e gets under one placement shared by every
    layer, which is what an expert-to-device placement must balance; "max" is the per-slot
    peak over layers (conservative when one layer dominates). A layer whose "load" is all zero
    (no noisy gate) falls back to its "counts" when present.
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read profile {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"profile {path} must be a JSON object, got {type(doc).__name__}")
    if "load" not in doc and "layers" not in doc and isinstance(doc.get("summary"), dict):
        doc = doc["summary"]
    if "load" in doc:
        return _layer_load(doc, "top level", path)
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"profile {path} needs a top-level 'load' list or a non-empty 'layers' object")
    per_layer = [_layer_load(entry, f"layer {name!r}", path) for name, entry in layers.items()]
    sizes = {v.shape[0] for v in per_layer}
    if len(sizes) != 1:
        raise ValueError(f"profile {path}: layers have different expert counts {sorted(sizes)}")
    stacked = np.stack(per_layer)  # [L, E]
    return stacked.sum(axis=0) if reduce == "sum" else stacked.max(axis=0)


def _layer_load(entry: object, where: str, path: Path) -> np.ndarray:
    if not isinstance(entry, dict) or "load" not in entry:
        raise ValueError(f"profile {path}: {where} needs a 'load' list")
    values = _as_loads(entry["load"], where, path)
    if values.sum() == 0 and "counts" in entry:
        values = _as_loads(entry["counts"], where, path)
    return values


def _as_loads(raw: object, where: str, path: Path) -> np.ndarray:
    if not isinstance(raw, list) or not raw or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw):
        raise ValueError(f"profile {path}: {where} load must be a non-empty list of numbers")
    values = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"profile {path}: {where} load must be finite and >= 0")
    return values


# ============================================================================ text
def format_plan(result: PlanResult) -> str:
    """A readable summary: best layouts, misses, and the placement effect of a profile."""
    s, pod = result.shape, result.pod
    lines = [
        f"plan for {pod.name} ({pod.n_devices} x {pod.device.name}, {pod.topology} {'x'.join(map(str, pod.dims))}): "
        f"E={s.n_experts} k={s.k} d={s.d_model} h={s.d_hidden} L={s.n_layers} tokens/step={s.tokens:,}",
        f"  {result.n_candidates} candidates, {len(result.ranked)} shown, {result.n_rejected} rejected (do not fit)"
        + (f", {result.n_over_drop_limit} over the drop-rate limit" if result.n_over_drop_limit else ""),
        "",
    ]
    if result.ranked:
        lines.append(f"  {'#':>2} {'EP':>5} {'DP':>5} {'inner':>5} {'tok/dev':>8} {'micro':>5} {'cf':>8} "
                     f"{'step ms':>10} {'MFU':>6} {'mem GiB':>8} {'free GiB':>8} {'drop':>6}")
        for i, r in enumerate(result.ranked, 1):
            cf = "dropless" if r.shape.dropless else f"{r.shape.capacity_factor:g}"
            inner = "EP" if r.ep_inner else "DP"
            lines.append(f"  {i:>2} {r.ep:>5} {r.dp:>5} {inner:>5} {r.tokens_per_device:>8} {r.n_micro:>5} {cf:>8} "
                         f"{r.step_time * 1e3:>10.3f} {r.mfu:>6.1%} {r.memory_total / GiB:>8.2f} "
                         f"{-r.miss_bytes / GiB:>8.2f} {r.drop_rate:>6.1%}")
        best = result.ranked[0]
        worst = max(best.times, key=best.times.get)
        lines.append(f"  best: EP {best.ep} x DP {best.dp}; largest component {worst} "
                     f"({best.times[worst] / best.step_time:.0%} of the step)")
        if best.drop_rate > 0.01:
            lines.append(f"  warning: the best layout is expected to drop {best.drop_rate:.1%} of assignments "
                         f"(C = {best.capacity} rows/expert/device); raise the capacity factor or tokens "
                         "per device, or leave such layouts out with max_drop_rate (moe plan --max-drop-rate)")
    else:
        lines.append("  no layout fits in HBM")
    if result.closest_misses:
        lines += ["", "  closest misses (GiB over HBM):"]
        for miss in result.closest_misses:
            r = miss.report
            cf = "dropless" if r.shape.dropless else f"{r.shape.capacity_factor:g}"
            lines.append(f"    EP {r.ep:>5} x DP {r.dp:>5} ({'EP' if r.ep_inner else 'DP'} inner), tok/dev {r.tokens_per_device}, cf {cf}: "
                         f"{r.memory_total / GiB:.2f} GiB needed, over by {miss.miss_gib:.2f} GiB")
    if result.balance:
        lines += ["", "  device load max/mean (contiguous -> LPT):"]
        for ep in sorted(result.balance):
            b = result.balance[ep]
            lines.append(f"    EP {ep:>5}: {b.before:.3f} -> {b.after:.3f}")
    return "\n".join(lines)
