"""Placement advice: which bin (shard, process, device) each expert should live on.

Why: a shard's step time is set by its busiest bin, so experts are spread by measured
load rather than by id. Greedy LPT is simple, deterministic and within 4/3 of optimal.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from moe.profiling.stats import check_count

PLACEMENT_FORMAT = "moe.placement/1"


def _check_loads(loads: np.ndarray, name: str = "loads") -> np.ndarray:
    a = np.asarray(loads)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one load per expert), got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)  # [E]
    if not np.all(np.isfinite(a)) or a.min() < 0:
        raise ValueError(f"{name} must be finite and >= 0, got values in [{a.min()}, {a.max()}]")
    return a


def _check_assignment(assignment: np.ndarray, n_bins: int, n_experts: int | None = None) -> np.ndarray:
    a = np.asarray(assignment)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"assignment must be an integer array (bin per expert), got dtype {a.dtype}")
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"assignment must be a non-empty 1-D array, got shape {a.shape}")
    if n_experts is not None and a.size != n_experts:
        raise ValueError(f"assignment must place {n_experts} experts, got {a.size}")
    if a.min() < 0 or a.max() >= n_bins:
        raise ValueError(f"bin ids must be in [0, {n_bins}), got values in [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def _check_bins_vs_experts(n_experts: int, n_bins: int) -> None:
    if n_bins > n_experts:
        raise ValueError(
            f"a placement needs at least one expert per bin: cannot spread {n_experts} experts over {n_bins} bins"
        )


def lpt_placement(loads: np.ndarray, n_bins: int, capacity: int | None = None) -> np.ndarray:
    """Greedy Longest-Processing-Time placement: int32[E], the bin of each expert.

    Experts are taken by load, heaviest first (stable: equal loads keep id order); each goes
    to the currently least-loaded bin, ties to the lowest bin id; with `capacity`, a bin
    that holds `capacity` experts takes no more. Deterministic. Experts with zero load add
    nothing to a bin, so with fewer than n_bins positive loads (and no capacity) some bins
    stay empty; pass capacity=ceil(E / n_bins) to spread experts evenly as well.
    """
    w = _check_loads(loads)  # [E]
    n_experts = w.size
    n_bins = check_count("n_bins", n_bins, 1)
    _check_bins_vs_experts(n_experts, n_bins)
    if capacity is not None:
        capacity = check_count("capacity", capacity, 1)
        if capacity * n_bins < n_experts:
            raise ValueError(
                f"capacity {capacity} per bin over {n_bins} bins holds {capacity * n_bins} experts, need {n_experts}"
            )
    order = np.argsort(-w, kind="stable").tolist()  # heaviest first
    weight = w.tolist()
    heap = [(0.0, b) for b in range(n_bins)]  # (bin load, bin id): pops least-loaded, then lowest id
    filled = [0] * n_bins
    out = np.empty(n_experts, dtype=np.int32)  # [E]
    for e in order:
        bin_load, b = heapq.heappop(heap)
        out[e] = b
        filled[b] += 1
        if capacity is None or filled[b] < capacity:
            heapq.heappush(heap, (bin_load + weight[e], b))
    return out


def contiguous_placement(n_experts: int, n_bins: int) -> np.ndarray:
    """Balanced contiguous ranges of expert ids, int32[E]; the first E % n_bins bins get one more."""
    n_experts = check_count("n_experts", n_experts, 1)
    n_bins = check_count("n_bins", n_bins, 1)
    _check_bins_vs_experts(n_experts, n_bins)
    sizes = np.full(n_bins, n_experts // n_bins, dtype=np.int64)  # [n_bins]
    sizes[: n_experts % n_bins] += 1
    return np.repeat(np.arange(n_bins, dtype=np.int32), sizes)  # [E]


def placement_stats(loads: np.ndarray, assignment: np.ndarray, n_bins: int) -> dict[str, Any]:
    """Per-bin load and expert count, max/mean bin load (0.0 when all loads are 0), empty bins."""
    w = _check_loads(loads)  # [E]
    n_bins = check_count("n_bins", n_bins, 1)
    a = _check_assignment(assignment, n_bins, w.size)  # [E]
    bin_load = np.bincount(a, weights=w, minlength=n_bins)  # [n_bins]
    bin_experts = np.bincount(a, minlength=n_bins)  # [n_bins]
    mean = float(bin_load.mean())
    return {
        "n_experts": int(w.size),
        "n_bins": n_bins,
        "bin_load": bin_load.tolist(),
        "bin_experts": bin_experts.tolist(),
        "max_bin_load": float(bin_load.max()),
        "mean_bin_load": mean,
        "max_mean_bin_load": float(bin_load.max()) / mean if mean > 0 else 0.0,
        "empty_bins": np.flatnonzero(bin_experts == 0).tolist(),
    }


def save_placement(path: str | os.PathLike, assignment: np.ndarray, loads: np.ndarray | None = None) -> Path:
    """Write {"format": "moe.placement/1", "n_experts", "n_bins", "assignment"} (+ loads) atomically.

    n_bins is max(assignment) + 1; every bin must hold an expert, so the file can be read back.
    """
    a = np.asarray(assignment)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"assignment must be a non-empty 1-D integer array, got dtype {a.dtype} shape {a.shape}")
    if a.min() < 0:
        raise ValueError(f"bin ids must be >= 0, got min {a.min()}")
    n_bins = int(a.max()) + 1
    _check_no_empty_bins(a, n_bins)
    doc: dict[str, Any] = {
        "format": PLACEMENT_FORMAT,
        "n_experts": int(a.size),
        "n_bins": n_bins,
        "assignment": a.astype(np.int64).tolist(),
    }
    if loads is not None:
        w = _check_loads(loads)
        if w.size != a.size:
            raise ValueError(f"loads must have one entry per expert ({a.size}), got {w.size}")
        doc["loads"] = w.tolist()
        doc["bin_load"] = np.bincount(a, weights=w, minlength=n_bins).tolist()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_no_empty_bins(a: np.ndarray, n_bins: int, where: str = "placement") -> None:
    empty = np.flatnonzero(np.bincount(a, minlength=n_bins) == 0)
    if empty.size:
        raise ValueError(
            f"{where}: every bin must hold at least one expert; bins {empty[:10].tolist()} of {n_bins} are empty "
            "(with zero-load experts, lpt_placement(..., capacity=ceil(E / n_bins)) avoids this)"
        )


def _json_int(doc: dict[str, Any], key: str, where: str) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: '{key}' must be a positive int, got {v!r}")
    return v


def load_placement(path: str | os.PathLike, n_experts: int | None = None) -> np.ndarray:
    """Read and validate a placement file; returns int32[E], the bin of each expert."""
    where = f"placement file {os.fspath(path)}"
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    if doc.get("format") != PLACEMENT_FORMAT:
        raise ValueError(f"{where}: format must be {PLACEMENT_FORMAT!r}, got {doc.get('format')!r}")
    file_experts = _json_int(doc, "n_experts", where)
    n_bins = _json_int(doc, "n_bins", where)
    if n_experts is not None and file_experts != n_experts:
        raise ValueError(f"{where} places {file_experts} experts, expected {n_experts}")
    raw = doc.get("assignment")
    if not isinstance(raw, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in raw):
        raise ValueError(f"{where}: 'assignment' must be a list of int bin ids")
    if len(raw) != file_experts:
        raise ValueError(f"{where}: 'assignment' has {len(raw)} entries, n_experts says {file_experts}")
    a = np.asarray(raw, dtype=np.int64)  # [E]
    if a.min() < 0 or a.max() >= n_bins:
        raise ValueError(f"{where}: bin ids must be in [0, {n_bins}), got values in [{a.min()}, {a.max()}]")
    _check_no_empty_bins(a, n_bins, where)
    loads = doc.get("loads")
    if loads is not None and (
        not isinstance(loads, list)
        or len(loads) != file_experts
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in loads)
    ):
        raise ValueError(f"{where}: 'loads' must be {file_experts} finite numbers >= 0")
    return a.astype(np.int32)
