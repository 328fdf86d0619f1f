"""An executable plan: the layout `moe plan --out` chose, as a file `moe train --plan` runs.

    {"format": "moe.plan/1", "target": "tpu-v4-slice", "device": "tpu-v4",
     "ep": 64, "dp": 1, "tokens_per_device": 2048, "n_micro": 1,
     "capacity_factor": 1.25,                 # per device (GShard), null: dropless
     "placement": [0, 0, 1, ...],             # expert -> EP rank, E entries
     "model": {"n_experts": 2048, "k": 2, "n_layers": 4, "d_model": 1024, "d_hidden": 4096},
     "predicted": {"step_time_s": ..., "memory_per_device_bytes": ..., "mfu": ...}}

A step runs `n_micro` micro-batches of ep x dp x tokens_per_device rows each (gradients
accumulated), on a mesh of dp x ep devices: rows split over all of them, experts over the
"expert" axis (EP rank r holds the experts whose placement is r) and replicated over "data".
The capacity factor is GShard's per-device one, C = ceil(cf * tokens_per_device * k / E)
rows per expert from each device, which is what the cost model priced; the model's own
`capacity_factor` (numpy's, over the whole batch) is what `moe eval` uses afterwards.

Pure Python: nothing here imports jax, so `moe plan` runs without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "moe.plan/1"
MODEL_KEYS = ("n_experts", "k", "n_layers", "d_model", "d_hidden")


@dataclass(frozen=True)
class Layout:
    """How one training step is laid out on ep x dp devices (see the module docstring)."""

    ep: int
    dp: int
    tokens_per_device: int
    n_micro: int = 1
    capacity_factor: float | None = None
    placement: tuple[int, ...] | None = None  # expert -> EP rank; None: contiguous blocks
    target: str = ""
    device: str = ""
    model: dict[str, int] | None = None  # the model shape it was planned for
    predicted: dict[str, float] | None = None
    origin: str = field(default="the plan", compare=False)  # how errors name it (not saved)

    KEYS = ("format", "target", "device", "ep", "dp", "tokens_per_device", "n_micro", "capacity_factor",
            "placement", "model", "predicted")

    def __post_init__(self) -> None:
        for name in ("ep", "dp", "tokens_per_device", "n_micro"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"plan {name} must be an integer >= 1, got {v!r}")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int | float)
                               or not math.isfinite(cf) or cf <= 0):
            raise ValueError(f"plan capacity_factor must be a number > 0 or null (dropless), got {cf!r}")

    @property
    def n_devices(self) -> int:
        return self.ep * self.dp

    @property
    def micro_batch(self) -> int:
        """Rows of one micro-batch over the whole mesh."""
        return self.n_devices * self.tokens_per_device

    @property
    def batch(self) -> int:
        """Rows of one optimizer step."""
        return self.micro_batch * self.n_micro

    def describe(self) -> str:
        cf = "dropless" if self.capacity_factor is None else f"capacity factor {self.capacity_factor:g} per device"
        micro = f" x {self.n_micro} micro-batches" if self.n_micro > 1 else ""
        return (f"EP {self.ep} x DP {self.dp}, {self.tokens_per_device} rows/device{micro} "
                f"= {self.batch} rows/step, {cf}")

    def expert_order(self, n_experts: int) -> np.ndarray:
        """int64[E]: which expert sits in each slot of the device layout (slot j on EP rank
        j // (E / ep)); identity for the contiguous placement."""
        if self.placement is None:
            return np.arange(n_experts, dtype=np.int64)
        return np.argsort(np.asarray(self.placement, dtype=np.int64), kind="stable")

    # ------------------------------------------------------------------ checks
    def check_model(self, model: dict[str, Any]) -> None:
        """Refuse a plan made for another model shape (one line: what differs)."""
        where = self.origin
        if self.model is not None:
            diff = [f"{k} {self.model[k]} (config: {model[k]})" for k in MODEL_KEYS
                    if k in self.model and self.model[k] != model[k]]
            if diff:
                raise ValueError(f"{where} was made for another model: {', '.join(diff)}")
        E = int(model["n_experts"])
        if E % self.ep:
            raise ValueError(f"{where} puts {E} experts on EP {self.ep}; the JAX backend needs EP to "
                             "divide the experts evenly")
        if self.placement is not None:
            p = np.asarray(self.placement)
            counts = np.bincount(p, minlength=self.ep) if p.size and p.min() >= 0 else None
            if p.shape != (E,) or counts is None or p.max() >= self.ep or np.any(counts != E // self.ep):
                raise ValueError(f"{where}'s placement must give each of the {self.ep} EP ranks "
                                 f"{E // self.ep} of the {E} experts (an int list of length {E} "
                                 f"with values in [0, {self.ep})), got {len(p)} entries")

    def check_devices(self, n_devices: int, what: str) -> None:
        """Refuse a plan laid out for another number of devices than the run has."""
        where = self.origin
        if n_devices != self.n_devices:
            made = f" ({self.target})" if self.target else ""
            raise ValueError(f"{where} lays out EP {self.ep} x DP {self.dp} = {self.n_devices} devices{made}, "
                             f"but this run has {n_devices}: {what}")

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "target": self.target, "device": self.device, "ep": self.ep, "dp": self.dp,
                "tokens_per_device": self.tokens_per_device, "n_micro": self.n_micro,
                "capacity_factor": self.capacity_factor,
                "placement": None if self.placement is None else list(self.placement),
                "model": self.model, "predicted": self.predicted}

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Layout:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{where} is not a moe plan (expected format {FORMAT!r}, got {got!r})")
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}")
        missing = [k for k in ("ep", "dp", "tokens_per_device") if k not in d]
        if missing:
            raise ValueError(f"{where} is missing {missing}")
        placement = d.get("placement")
        if placement is not None:
            if not isinstance(placement, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                          for x in placement):
                raise ValueError(f"{where}: placement must be a list of integers (expert -> EP rank) or null")
            placement = tuple(placement)
        model = d.get("model")
        if model is not None and (not isinstance(model, dict) or not all(
                isinstance(model.get(k), int) for k in MODEL_KEYS)):
            raise ValueError(f"{where}: model must hold integer {', '.join(MODEL_KEYS)}")
        try:
            return cls(ep=d["ep"], dp=d["dp"], tokens_per_device=d["tokens_per_device"],
                       n_micro=d.get("n_micro", 1), capacity_factor=d.get("capacity_factor"),
                       placement=placement, target=str(d.get("target", "")), device=str(d.get("device", "")),
                       model=None if model is None else {k: int(model[k]) for k in MODEL_KEYS},
                       predicted=d.get("predicted"), origin=where)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def model_shape(model_config) -> dict[str, int]:
    """The fields of a ModelConfig a plan depends on."""
    return {k: int(getattr(model_config, k)) for k in MODEL_KEYS}


def layout_of_report(report, placement: np.ndarray | None, target: str, model: dict[str, int]) -> Layout:
    """The Layout of one ranked CostReport (and the placement the planner used for its ep)."""
    return Layout(ep=int(report.ep), dp=int(report.dp), tokens_per_device=int(report.tokens_per_device),
                  n_micro=int(report.n_micro), capacity_factor=report.shape.capacity_factor,
                  placement=None if placement is None else tuple(int(p) for p in placement),
                  target=target, device=report.device_name, model=model,
                  predicted={"step_time_s": report.step_time, "memory_per_device_bytes": report.memory_total,
                             "mfu": report.mfu})


def write_plan(path: str | Path, layout: Layout) -> Path:
    """Write the plan as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(layout.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_plan(path: str | Path) -> Layout:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"plan file {str(path)!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read plan {str(path)!r}: {e}") from None
    return Layout.from_dict(doc, where=f"plan {str(path)!r}")
