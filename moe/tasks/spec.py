"""What a task is (TaskSpec), which tasks a model knows (TaskRegistry), and a task's data (TaskData).

Specs are small, validated and JSON-safe so checkpoints can carry them; the registry gives each
task a stable integer id in insertion order, which is what the router and the heads index by.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

TASK_KINDS = ("multiclass", "binary", "multilabel", "regression")

# The one number each kind is judged by (early stopping, reports, transfer comparisons).
METRIC_BY_KIND = {
    "multiclass": "accuracy",
    "binary": "accuracy",
    "multilabel": "f1",
    "regression": "r2",
}

_SPEC_FIELDS = ("name", "kind", "n_inputs", "n_outputs", "loss_weight", "domain", "classes")


def check_kind(kind: object) -> str:
    """Return `kind` if it is a known task kind; otherwise say which kinds exist."""
    if not isinstance(kind, str):
        raise TypeError(f"task kind must be a str, got {type(kind).__name__}")
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {', '.join(TASK_KINDS)}; got {kind!r}")
    return kind


def _check_count(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TaskSpec:
    """The shape of one task: its name, kind, input width and output width.

    n_outputs is the head width: classes for multiclass (>= 2), 1 for binary, labels for
    multilabel, targets for regression. loss_weight scales the task's loss in the total.
    domain names the input space the task reads (the same images, the same feature table):
    tasks of one domain share one input encoder, so such a task owns only its embedding and
    head. None means the task has an input space of its own.
    classes (optional, classification only): the original label of each class id, e.g.
    ("barbera", "barolo", "grignolino"); for binary, y = 1 means classes[1]. Kept in the spec
    so a checkpoint carries the mapping from its outputs back to the user's labels.
    """

    name: str
    kind: str
    n_inputs: int
    n_outputs: int
    loss_weight: float = 1.0
    domain: str | None = None
    classes: tuple[str | int | float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"task name must be a str, got {type(self.name).__name__}")
        if not self.name or any(c.isspace() for c in self.name) or "/" in self.name:
            raise ValueError(
                f"task name must be non-empty with no whitespace or '/', got {self.name!r}"
            )
        check_kind(self.kind)
        _check_count(f"task '{self.name}' n_inputs", self.n_inputs, 1)
        _check_count(f"task '{self.name}' n_outputs", self.n_outputs, 1)
        object.__setattr__(self, "n_inputs", int(self.n_inputs))
        object.__setattr__(self, "n_outputs", int(self.n_outputs))
        if self.kind == "binary" and self.n_outputs != 1:
            raise ValueError(f"binary task '{self.name}' must have 1 output, got {self.n_outputs}")
        if self.kind == "multiclass" and self.n_outputs < 2:
            raise ValueError(
                f"multiclass task '{self.name}' must have >= 2 outputs (classes), got {self.n_outputs}"
            )
        w = self.loss_weight
        if isinstance(w, bool) or not isinstance(w, int | float | np.integer | np.floating):
            raise TypeError(
                f"task '{self.name}' loss_weight must be a number, got {type(w).__name__}"
            )
        if not math.isfinite(float(w)) or float(w) <= 0:
            raise ValueError(f"task '{self.name}' loss_weight must be finite and > 0, got {w}")
        object.__setattr__(self, "loss_weight", float(w))
        if self.classes is not None:
            object.__setattr__(self, "classes", self._checked_classes(self.classes))
        d = self.domain
        if d is not None and (not isinstance(d, str) or not d or any(c.isspace() or c in "/:" for c in d)):
            raise ValueError(
                f"task '{self.name}' domain must be a non-empty string with no whitespace, '/' or ':', "
                f"got {d!r}"
            )

    def _checked_classes(self, classes: object) -> tuple[str | int | float, ...]:
        if self.kind not in ("multiclass", "binary"):
            raise ValueError(f"{self.kind} task '{self.name}' has no classes, got {classes!r:.100}")
        if isinstance(classes, str) or not isinstance(classes, list | tuple):
            raise TypeError(f"task '{self.name}' classes must be a list of labels, got {type(classes).__name__}")
        out = tuple(c.item() if isinstance(c, np.generic) else c for c in classes)
        if not all(isinstance(c, str | int | float) and not isinstance(c, bool) for c in out):
            raise TypeError(f"task '{self.name}' class labels must be str, int or float, got {list(out)!r:.200}")
        want = self.n_outputs if self.kind == "multiclass" else 2
        if len(out) != want or len(set(out)) != len(out):
            raise ValueError(f"{self.kind} task '{self.name}' needs {want} distinct class labels, got {list(out)!r:.200}")
        return out

    @property
    def input_space(self) -> str:
        """The key of the encoder this task reads through: its domain, or its own ("task:<name>")."""
        return self.domain if self.domain is not None else f"task:{self.name}"

    @property
    def metric(self) -> str:
        """Name of the primary metric for this task's kind (see metrics.evaluate)."""
        return METRIC_BY_KIND[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain dict (str, int, float and a list of labels), for checkpoint manifests;
        "domain" and "classes" only when the spec has them."""
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "n_inputs": self.n_inputs,
            "n_outputs": self.n_outputs,
            "loss_weight": self.loss_weight,
        }
        if self.domain is not None:
            d["domain"] = self.domain
        if self.classes is not None:
            d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Inverse of to_dict; unknown or missing keys are errors, not silently dropped."""
        if not isinstance(d, Mapping):
            raise TypeError(f"task spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SPEC_FIELDS))
        if unknown:
            raise ValueError(f"task spec has unknown keys {unknown}; expected {list(_SPEC_FIELDS)}")
        missing = [k for k in _SPEC_FIELDS[:4] if k not in d]
        if missing:
            raise ValueError(f"task spec is missing keys {missing}; got {sorted(d)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class TaskColumns:
    """Per-task facts as arrays indexed by task id, so a batch over thousands of tasks looks
    them up with one gather instead of a Python call per task."""

    n_inputs: np.ndarray  # int64 [T]
    target: np.ndarray  # int64 [T]: the task's index in `targets`
    targets: tuple[tuple[str, int], ...]  # distinct (kind, n_outputs), in order of registration
    loss_weight: np.ndarray  # float64 [T]


class TaskRegistry:
    """Ordered map name -> id (0..T-1) of TaskSpecs; ids never change once given."""

    def __init__(self, specs: list[TaskSpec] | tuple[TaskSpec, ...] = ()) -> None:
        self._specs: list[TaskSpec] = []
        self._ids: dict[str, int] = {}
        self._domain_width: dict[str, int] = {}  # input space -> its width
        self._columns: TaskColumns | None = None
        for s in specs:
            self.add(s)

    def add(self, spec: TaskSpec) -> int:
        """Register a spec and return its id (the next free integer)."""
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"expected a TaskSpec, got {type(spec).__name__}")
        if spec.name in self._ids:
            raise ValueError(
                f"task '{spec.name}' is already registered (id {self._ids[spec.name]})"
            )
        width = self._domain_width.get(spec.input_space)
        if width is not None and width != spec.n_inputs:
            raise ValueError(
                f"task '{spec.name}' has {spec.n_inputs} inputs, but domain {spec.domain!r} "
                f"has {width}"
            )
        self._domain_width[spec.input_space] = spec.n_inputs
        self._ids[spec.name] = len(self._specs)
        self._specs.append(spec)
        self._columns = None
        return self._ids[spec.name]

    def give_own_space(self, name: str) -> TaskSpec:
        """Task `name` stops sharing its domain's input space and gets one of its own (add-task's
        own adapter); everything else about it, and every other task, is unchanged. Returns
        the new spec."""
        old = self.spec(name)
        if old.domain is None:
            raise ValueError(f"task {name!r} already has an input space of its own")
        new = dataclasses.replace(old, domain=None)
        self._specs[self._ids[name]] = new
        self._domain_width[new.input_space] = new.n_inputs
        self._columns = None
        return new

    def columns(self) -> TaskColumns:
        """Every task's input width, target group and loss weight as arrays (rebuilt after add)."""
        if self._columns is None:
            targets: dict[tuple[str, int], int] = {}
            index = [targets.setdefault((s.kind, s.n_outputs), len(targets)) for s in self._specs]
            self._columns = TaskColumns(
                np.array([s.n_inputs for s in self._specs], dtype=np.int64),
                np.array(index, dtype=np.int64), tuple(targets),
                np.array([s.loss_weight for s in self._specs], dtype=np.float64))
        return self._columns

    def id(self, name: str) -> int:
        """Integer id of a task name."""
        try:
            return self._ids[name]
        except (KeyError, TypeError):
            known = ", ".join(self._ids) or "(none)"
            raise ValueError(f"unknown task {name!r}; known tasks: {known}") from None

    def spec(self, name_or_id: str | int) -> TaskSpec:
        """Spec by name or by integer id."""
        if isinstance(name_or_id, str):
            return self._specs[self.id(name_or_id)]
        if isinstance(name_or_id, bool) or not isinstance(name_or_id, int | np.integer):
            raise TypeError(f"expected a task name or int id, got {type(name_or_id).__name__}")
        if not 0 <= name_or_id < len(self._specs):
            raise ValueError(f"task id must be in [0, {len(self._specs)}), got {name_or_id}")
        return self._specs[int(name_or_id)]

    @property
    def names(self) -> tuple[str, ...]:
        """Task names in id order."""
        return tuple(s.name for s in self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(tuple(self._specs))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRegistry) and self._specs == other._specs

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"TaskRegistry({list(self.names)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; the list order is the id order."""
        return {"tasks": [s.to_dict() for s in self._specs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskRegistry:
        """Inverse of to_dict."""
        if not isinstance(d, Mapping) or not isinstance(d.get("tasks"), list):
            raise ValueError(f"task registry dict must be {{'tasks': [...]}}, got {d!r:.200}")
        return cls([TaskSpec.from_dict(t) for t in d["tasks"]])


_SPLITS = ("train", "val", "test")


@dataclass
class TaskData:
    """One task's standardised arrays, split into train/val/test, plus what undoes the scaling.

    x_*: float32 [n, n_inputs], already standardised with (mean, std) fitted on train only.
    y_*: multiclass int32 [n] class ids; binary float32 [n, 1] 0/1; multilabel float32 [n, L] 0/1;
         regression float32 [n, n_outputs], standardised with (y_mean, y_std) fitted on train.
    mean, std: float32 [n_inputs] (std of a constant column is 1).
    y_mean, y_std: float32 [n_outputs] for regression, None otherwise.
    classes: original label values for multiclass [C] and binary [2] (class id i <-> classes[i];
         for binary, y = 1 means classes[1]); None otherwise.
    """

    spec: TaskSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    y_mean: np.ndarray | None = None
    y_std: np.ndarray | None = None
    classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, TaskSpec):
            raise TypeError(f"TaskData.spec must be a TaskSpec, got {type(self.spec).__name__}")
        for split in _SPLITS:
            self._check_split(split)
        self._check_vector("mean", self.mean, self.spec.n_inputs)
        self._check_vector("std", self.std, self.spec.n_inputs)
        if np.any(self.std <= 0):
            raise ValueError(f"task '{self.spec.name}' std must be > 0 everywhere")
        self._check_target_scaling()
        self._check_classes()

    def with_own_space(self) -> TaskData:
        """The same task reading through an input space of its own (its spec without a domain):
        what add-task's own adapter registers."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, domain=None))

    # -- validation -------------------------------------------------------------------------

    def _check_vector(self, what: str, v: object, n: int) -> None:
        name = self.spec.name
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.shape != (n,):
            got = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise ValueError(f"task '{name}' {what} must be float32 [{n}], got {got}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"task '{name}' {what} has NaN or Inf")

    def _check_split(self, split: str) -> None:
        s, name = self.spec, self.spec.name
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(
                f"task '{name}' x_{split} must be float32 [n, {s.n_inputs}], got {got}"
            )
        if x.shape[1] != s.n_inputs:
            raise ValueError(
                f"task '{name}' has {s.n_inputs} input features, x_{split} has {x.shape[1]}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"task '{name}' {split} split is empty")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"task '{name}' x_{split} has NaN or Inf")
        n = x.shape[0]
        if not isinstance(y, np.ndarray):
            raise ValueError(f"task '{name}' y_{split} must be an ndarray, got {type(y).__name__}")
        if s.kind == "multiclass":
            if y.dtype != np.int32 or y.shape != (n,):
                raise ValueError(
                    f"multiclass task '{name}' y_{split} must be int32 [{n}], got {y.dtype} {y.shape}"
                )
            if n and (y.min() < 0 or y.max() >= s.n_outputs):
                raise ValueError(
                    f"task '{name}' y_{split} class ids must be in [0, {s.n_outputs}), "
                    f"got [{y.min()}, {y.max()}]"
                )
            return
        if y.dtype != np.float32 or y.shape != (n, s.n_outputs):
            raise ValueError(
                f"{s.kind} task '{name}' y_{split} must be float32 [{n}, {s.n_outputs}], "
                f"got {y.dtype} {y.shape}"
            )
        if s.kind == "regression":
            if not np.all(np.isfinite(y)):
                raise ValueError(f"task '{name}' y_{split} has NaN or Inf")
        elif not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{s.kind} task '{name}' y_{split} must hold only 0 and 1")

    def _check_target_scaling(self) -> None:
        name = self.spec.name
        if self.spec.kind == "regression":
            self._check_vector("y_mean", self.y_mean, self.spec.n_outputs)
            self._check_vector("y_std", self.y_std, self.spec.n_outputs)
            if np.any(self.y_std <= 0):
                raise ValueError(f"task '{name}' y_std must be > 0 everywhere")
        elif self.y_mean is not None or self.y_std is not None:
            raise ValueError(f"{self.spec.kind} task '{name}' must not have y_mean/y_std")

    def _check_classes(self) -> None:
        name, kind = self.spec.name, self.spec.kind
        if kind in ("multiclass", "binary"):
            n = self.spec.n_outputs if kind == "multiclass" else 2
            c = self.classes
            if not isinstance(c, np.ndarray) or c.shape != (n,):
                got = c.shape if isinstance(c, np.ndarray) else type(c).__name__
                raise ValueError(f"{kind} task '{name}' classes must be an array of {n}, got {got}")
        elif self.classes is not None:
            raise ValueError(f"{kind} task '{name}' must not have classes")
        if self.spec.classes is not None and tuple(np.asarray(self.classes).tolist()) != self.spec.classes:
            raise ValueError(f"task '{name}' classes {np.asarray(self.classes).tolist()!r:.200} differ from its "
                             f"spec's {list(self.spec.classes)!r:.200}")

    # -- conveniences -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of 'train', 'val' or 'test'."""
        if which not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {which!r}")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def standardize_inputs(self, x_raw: np.ndarray) -> np.ndarray:
        """Apply this task's input standardiser to new raw rows (e.g. at prediction time)."""
        x_raw = np.asarray(x_raw)
        if x_raw.ndim != 2 or x_raw.shape[1] != self.spec.n_inputs:
            raise ValueError(
                f"task '{self.name}' has {self.spec.n_inputs} input features, got shape {x_raw.shape}"
            )
        return ((x_raw.astype(np.float32) - self.mean) / self.std).astype(np.float32)  # [n, d]

    def unstandardize_targets(self, y_std_scale: np.ndarray) -> np.ndarray:
        """Map regression outputs back to the original target scale."""
        if self.spec.kind != "regression":
            raise ValueError(f"task '{self.name}' is {self.spec.kind}, not regression")
        return (np.asarray(y_std_scale, np.float32) * self.y_std + self.y_mean).astype(np.float32)

    def decode_labels(self, ids: np.ndarray) -> np.ndarray:
        """Map class ids (multiclass) or 0/1 (binary) back to the original label values."""
        if self.classes is None:
            raise ValueError(f"task '{self.name}' is {self.spec.kind}; it has no class labels")
        ids = np.asarray(ids)
        if self.spec.kind == "binary":
            ids = ids.reshape(ids.shape[0])
        return self.classes[ids.astype(np.intp)]
