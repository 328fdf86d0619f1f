"""Run configuration: frozen dataclasses, loaded from TOML, overridden by `key=value` flags.

Every field is validated with a message that says what it must be and what arrived.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.routing.gates import GATE_TYPES

ROUTE_BY = ("example+task", "example", "task")
TASK_EMB_INIT = ("signature", "random")
SAMPLING = ("proportional", "uniform", "temperature")
# what a finished `moe train` is compared with: nothing; a dense net per task; that and a
# scikit-learn logistic/ridge model per task; those and a dense model of the MoE's active size
BASELINES = ("none", "per_task", "sklearn", "all")


def _need(cond: bool, what: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{what}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_experts: int = 64
    d_hidden: int = 128
    k: int = 2
    n_layers: int = 1
    # softmax top-k over a task-level router (Task-MoE): every example of a task takes the same
    # k experts. Measured on the built-in benchmark (bench/RESULTS.md, issue 9): routing on the
    # example as well lets a few hundred rows per task carve the input space and overfit, and
    # gate noise keeps a task's experts from settling; "noisy_topk" with "example+task" is the
    # per-example router of Shazeer et al. (2017).
    gate: str = "softmax_topk"  # one name, or a comma list with one gate per layer
    capacity_factor: float | None = None
    w_importance: float = 0.1
    w_load: float = 0.1
    w_z: float = 0.0
    route_by: str = "task"
    d_task_emb: int = 16
    # where the task embeddings start under route_by = "task": "signature" (tasks of a shared
    # domain from what their training targets correlate with, moe.tasks.signature, so related
    # tasks start on shared experts; the rest at random) or "random" (N(0, I) for every task,
    # and always under the per-example routers, whose gates read the example too)
    task_emb_init: str = "signature"
    activation: str = "relu"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_experts", "d_hidden", "k", "n_layers", "d_task_emb"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"model.{name} must be an integer >= 1", v)
        _need(self.k <= self.n_experts, f"model.k must be <= n_experts={self.n_experts}", self.k)
        gates = self.gates
        _need(len(gates) in (1, self.n_layers), f"model.gate must name 1 or {self.n_layers} gates", self.gate)
        for g in gates:
            _need(g in GATE_TYPES, f"model.gate entries must be in {GATE_TYPES}", g)
            _need(g != "top1" or self.k == 1, "model.gate 'top1' needs k = 1", self.k)
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            _need(isinstance(cf, int | float) and math.isfinite(cf) and cf > 0,
                  "model.capacity_factor must be > 0 or none", cf)
        for name in ("w_importance", "w_load", "w_z"):
            v = getattr(self, name)
            _need(isinstance(v, int | float) and math.isfinite(v) and v >= 0, f"model.{name} must be >= 0", v)
        _need(self.route_by in ROUTE_BY, f"model.route_by must be one of {ROUTE_BY}", self.route_by)
        _need(self.activation in ("relu", "gelu"), "model.activation must be 'relu' or 'gelu'", self.activation)
        _need(self.task_emb_init in TASK_EMB_INIT, f"model.task_emb_init must be one of {TASK_EMB_INIT}", self.task_emb_init)

    @property
    def gates(self) -> list[str]:
        names = [g.strip() for g in self.gate.split(",")]
        return names * self.n_layers if len(names) == 1 else names


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-2
    warmup: int = 100
    min_lr_ratio: float = 0.05
    # gate noise std scale at the last step; it falls linearly from 1 (Shazeer's noise) at
    # step 0, so the routing the model trains with ends close to the one it is used with
    noise_final: float = 1.0
    # the last share of the training steps route by the balanced assignment (moe.routing
    # .balanced) with ceil(balanced_factor * B * k / E) seats per expert instead of the gate's
    # top-k: every expert takes the same rows (balanced_factor 1.0: exactly B k / E each),
    # and the model learns to work on the experts a capacity-bounded server gives it (BASE
    # layers train on their assignment); the first steps, with top-k, settle the routing
    balanced_share: float = 0.5
    balanced_factor: float = 1.0
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    sampling: str = "temperature"
    temperature: float = 2.0
    eval_every: int = 250
    checkpoint_every: int = 500
    keep_last: int = 3
    seed: int = 0
    baseline: str = "sklearn"
    progress: bool = True
    tensorboard: bool = False

    @property
    def routing(self) -> str:
        """The routing most training steps take ("balanced" or "topk"): what a profile of the
        routing the model trains with should route by."""
        return "balanced" if self.balanced_share >= 0.5 else "topk"  # the model's last steps

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "keep_last"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"train.{name} must be an integer >= 1", v)
        _need(isinstance(self.warmup, int) and self.warmup >= 0, "train.warmup must be an integer >= 0", self.warmup)
        _need(isinstance(self.seed, int) and self.seed >= 0, "train.seed must be an integer >= 0", self.seed)
        _need(self.lr > 0 and math.isfinite(self.lr), "train.lr must be > 0", self.lr)
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]", self.min_lr_ratio)
        _need(0 < self.noise_final <= 1, "train.noise_final must be in (0, 1]", self.noise_final)
        _need(0 <= self.balanced_share <= 1, "train.balanced_share must be in [0, 1]", self.balanced_share)
        _need(1 <= self.balanced_factor <= 64 and math.isfinite(self.balanced_factor),
              "train.balanced_factor must be in [1, 64]", self.balanced_factor)
        _need(self.clip_norm >= 0, "train.clip_norm must be >= 0 (0 = no clipping)", self.clip_norm)
        _need(self.weight_decay >= 0, "train.weight_decay must be >= 0", self.weight_decay)
        if isinstance(self.baseline, bool) or self.baseline is None:  # older configs: true = the per-task nets
            object.__setattr__(self, "baseline", "per_task" if self.baseline else "none")
        _need(self.baseline in BASELINES, f"train.baseline must be one of {BASELINES}", self.baseline)
        _need(self.sampling in SAMPLING, f"train.sampling must be one of {SAMPLING}", self.sampling)
        _need(self.temperature > 0, "train.temperature must be > 0", self.temperature)


@dataclass(frozen=True)
class DataConfig:
    builtin: bool = True  # the built-in benchmark (scikit-learn's bundled datasets + a generated family)
    n_family: int = 16
    family_size: int = 600
    n_digit_sets: int = 20  # label functions "digit in S" over the digits domain
    n_skills: int = 100  # tasks of the skills domain (moe.tasks.skills)
    skill_size: int = 300  # examples per skill task
    task_file: str | None = None  # a TOML file of user tasks, added to (or instead of) the built-in ones
    seed: int = 0  # split seed

    def __post_init__(self) -> None:
        _need(isinstance(self.n_family, int) and self.n_family >= 0, "data.n_family must be an integer >= 0", self.n_family)
        _need(isinstance(self.family_size, int) and self.family_size >= 30,
              "data.family_size must be an integer >= 30", self.family_size)
        for name in ("n_digit_sets", "n_skills"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"data.{name} must be an integer >= 0", v)
        _need(isinstance(self.skill_size, int) and self.skill_size >= 30,
              "data.skill_size must be an integer >= 30", self.skill_size)
        _need(self.builtin or self.task_file, "data needs builtin = true or a task_file", None)


@dataclass(frozen=True)
class ShardConfig:
    """Where experts run when not in this process (see docs/PROTOCOL.md and `moe shard serve`)."""

    local: int = 0  # start this many shard processes on this machine (`moe train --shards N`)
    transport: str = "ipc"  # for local shards: "ipc" or "tcp" (loopback)
    endpoints: tuple[str, ...] = ()  # already-running shards, e.g. ("tcp://10.0.0.2:5555", ...)
    placement: str | None = None  # JSON file mapping expert -> shard (from the profiler); contiguous if unset
    deadline_s: float = 5.0  # a request unanswered this long means the shard is dead or stalled
    heartbeat_s: float = 1.0
    retries: int = 2  # resends of an unanswered (idempotent) request before declaring failure
    max_failures: int = 3  # failures tolerated within failure_window_s before giving up
    failure_window_s: float = 600.0
    curve_dir: str | None = None  # folder with client and server keypairs (`moe keys generate`)
    secret_file: str | None = None  # with endpoints: the run secret the shards were given (`moe keys secret`)

    def __post_init__(self) -> None:
        _need(isinstance(self.local, int) and self.local >= 0, "shards.local must be an integer >= 0", self.local)
        _need(self.transport in ("ipc", "tcp"), "shards.transport must be 'ipc' or 'tcp'", self.transport)
        _need(not (self.local and self.endpoints), "use shards.local or shards.endpoints, not both", self.endpoints)
        for name in ("deadline_s", "heartbeat_s", "failure_window_s"):
            v = getattr(self, name)
            _need(isinstance(v, int | float) and v > 0, f"shards.{name} must be > 0", v)
        _need(isinstance(self.retries, int) and self.retries >= 0, "shards.retries must be >= 0", self.retries)
        _need(isinstance(self.max_failures, int) and self.max_failures >= 1, "shards.max_failures must be >= 1",
              self.max_failures)
        if not isinstance(self.endpoints, tuple):
            object.__setattr__(self, "endpoints", tuple(self.endpoints))

    @property
    def enabled(self) -> bool:
        return bool(self.local or self.endpoints)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected {', '.join(SECTIONS)}")
        sections = {}
        for name, klass in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"config section [{name}] must be a table, got {type(values).__name__}")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"unknown key(s) {bad} in [{name}]; expected some of {sorted(known)}")
            sections[name] = klass(**values)
        return cls(**sections)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "shards": ShardConfig}

# Keys whose default changed after checkpoints were written without them: a saved config that
# lacks one was trained with this value, not with today's default.
_BEFORE = {"train": {"balanced_share": 0.0}}


def saved_config(d: dict[str, Any]) -> Config:
    """The config a checkpoint's manifest records, read so that resuming it trains as the run
    that wrote it did (keys it lacks take their value from before they existed: _BEFORE)."""
    if not isinstance(d, dict):
        raise ValueError(f"a saved config must be a table, got {type(d).__name__}")
    filled = dict(d)
    for section, keys in _BEFORE.items():
        values = filled.get(section, {})
        if isinstance(values, dict):
            filled[section] = {**keys, **values}
    return Config.from_dict(filled)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, base: Config | None = None
) -> Config:
    """Defaults (or `base`), then the TOML file, then `key=value` overrides ("model.n_experts=32"
    or "steps=100")."""
    raw: dict[str, dict[str, Any]] = base.to_dict() if base is not None else {name: {} for name in SECTIONS}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        try:
            loaded = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for section, values in loaded.items():
            raw.setdefault(section, {})
            if isinstance(values, dict):
                raw[section].update(values)
            else:
                raw[section] = values
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    return Config.from_dict(raw)


def parse_override(item: str) -> tuple[str, str, Any]:
    """"model.k=1" -> ("model", "k", 1); a bare key is looked up in every section."""
    if "=" not in item:
        raise ValueError(f"override must look like key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if "." in key:
        section, name = key.split(".", 1)
    else:
        owners = [s for s, k in SECTIONS.items() if name_in(key, k)]
        if len(owners) != 1:
            raise ValueError(f"unknown config key {key!r}" if not owners else
                             f"config key {key!r} is ambiguous; write one of {[o + '.' + key for o in owners]}")
        section, name = owners[0], key
    return section, name, parse_value(text.strip())


def name_in(key: str, klass: type) -> bool:
    return key in {f.name for f in dataclasses.fields(klass)}


def parse_value(text: str) -> Any:
    """TOML scalar syntax (numbers, true/false, quoted strings); `none` means None; else a bare string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
