"""Load-balance statistics accumulated over many routing decisions.

Why: the balance losses see one batch at a time; whether the experts are really used
evenly, and which tasks use which experts, only shows once the gate's decisions are
accumulated over many batches, layers and processes. Accumulators are float64/int64
on purpose: they sum millions of float32 gate values, and float32 sums drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from moe.profiling.specialisation import mutual_information
from moe.routing.capacity import expert_capacity
from moe.routing.types import Routing

PROFILE_FORMAT = "moe.load_profile/1"
MODEL_PROFILE_FORMAT = "moe.model_profile/1"
SPARSE_THRESHOLD = 4096  # above this many experts the task x expert matrices are scipy.sparse
TOP_EXPERTS = 5  # experts listed per task in the summary
HOT_EXPERTS = 5  # busiest experts named per layer in the summary, with the tasks that load them
HOT_TASKS = 3  # tasks named per hot expert
# What the same gate decisions would drop at these capacity factors (the planner's defaults).
CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)
_FLUSH_TRIPLETS = 1 << 18  # pending COO triplets before they are summed into the CSR matrices
_HEADLINE_METRICS = ("cv_load", "cv_importance", "max_mean_load", "drop_rate")


def cv(values: np.ndarray) -> float:
    """Coefficient of variation std/mean with the POPULATION variance (divide by E, not E-1).

    This is the CV whose square the importance and load losses use (Shazeer et al. 2017).
    Defined as 0.0 when every value is 0 (nothing routed yet counts as evenly spread);
    a zero mean with non-zero values (only possible with negative values) is a ValueError.
    """
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"cv needs a non-empty 1-D array, got shape {v.shape}")
    if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise TypeError(f"cv needs real numbers, got dtype {v.dtype}")
    v = v.astype(np.float64)  # [E]
    if not np.all(np.isfinite(v)):
        raise ValueError("cv needs finite values, got NaN or inf")
    if not np.any(v):
        return 0.0
    mean = float(v.mean())
    if mean == 0.0:
        raise ValueError("cv is undefined for values whose mean is 0 but that are not all 0")
    return float(np.std(v) / mean)  # ddof=0: population variance


def max_over_mean(values: np.ndarray) -> float:
    """max/mean of non-negative values (1.0 = perfectly even); 0.0 when all are 0."""
    v = np.asarray(values, dtype=np.float64)  # [E]
    if v.size == 0 or not np.any(v):
        return 0.0
    return float(v.max() / v.mean())


def capacity_drops(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """int64[len(CAPACITY_FACTORS)]: assignments of one batch that a capacity of
    C = ceil(cf * B * k / E) rows per expert would cut, for each cf in CAPACITY_FACTORS.

    An expert chosen a_e times keeps min(a_e, C) of them whatever the priority order, so the
    count is sum_e max(a_e - C, 0): exactly Routing.dropped of a layer with that factor.
    """
    B, k = expert_index.shape
    assigned = np.bincount(expert_index.reshape(-1), minlength=n_experts)  # [E], before any capacity
    caps = np.array([expert_capacity(cf, B, k, n_experts) for cf in CAPACITY_FACTORS], dtype=np.int64)  # [n_cf]
    return np.maximum(assigned[None, :] - caps[:, None], 0).sum(axis=1)  # [n_cf]


def encode_matrix(matrix: np.ndarray | sp.spmatrix) -> dict[str, Any]:
    """JSON-safe form of a [T, E] matrix: dense list-of-lists, or CSR triplets when sparse."""
    if sp.issparse(matrix):
        m = sp.csr_matrix(matrix)
        m.sum_duplicates()
        return {
            "layout": "csr",
            "shape": [int(m.shape[0]), int(m.shape[1])],
            "indptr": m.indptr.tolist(),
            "indices": m.indices.tolist(),
            "data": m.data.tolist(),
        }
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"encode_matrix expects a 2-D matrix, got shape {a.shape}")
    return {"layout": "dense", "shape": [int(a.shape[0]), int(a.shape[1])], "rows": a.tolist()}


def decode_matrix(
    doc: Mapping[str, Any], shape: tuple[int, int], dtype: type
) -> np.ndarray | sp.csr_matrix:
    """Inverse of encode_matrix, checking the shape and the CSR structure."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"matrix must be a JSON object, got {type(doc).__name__}")
    if list(doc.get("shape", [])) != list(shape):
        raise ValueError(f"matrix shape must be {list(shape)}, got {doc.get('shape')}")
    layout = doc.get("layout")
    if layout == "dense":
        try:
            a = np.asarray(doc["rows"], dtype=dtype)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"dense matrix needs numeric 'rows': {err}") from None
        if a.shape != tuple(shape):
            raise ValueError(f"dense matrix rows must form shape {list(shape)}, got {list(a.shape)}")
        return a
    if layout == "csr":
        try:
            indptr = np.asarray(doc["indptr"], dtype=np.int64)  # [T+1]
            indices = np.asarray(doc["indices"], dtype=np.int64)  # [nnz]
            data = np.asarray(doc["data"], dtype=dtype)  # [nnz]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"csr matrix needs integer 'indptr', 'indices' and numeric 'data': {err}") from None
        nnz = indices.shape[0] if indices.ndim == 1 else -1
        if (
            indptr.shape != (shape[0] + 1,)
            or data.shape != (nnz,)
            or indptr[0] != 0
            or indptr[-1] != nnz
            or np.any(np.diff(indptr) < 0)
        ):
            raise ValueError(
                f"csr matrix of shape {list(shape)} needs indptr of length {shape[0] + 1} rising from 0 "
                f"to len(indices) == len(data); got {indptr.shape[0]} indptr, {indices.size} indices, "
                f"{data.size} data"
            )
        if nnz and (indices.min() < 0 or indices.max() >= shape[1]):
            raise ValueError(f"csr column indices must be in [0, {shape[1]}), got [{indices.min()}, {indices.max()}]")
        return sp.csr_matrix((data, indices, indptr), shape=shape)
    raise ValueError(f"matrix layout must be 'dense' or 'csr', got {layout!r}")


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_names(task_names: Sequence[str] | None, n_tasks: int) -> list[str]:
    if task_names is None:
        return [f"task{t}" for t in range(n_tasks)]
    if isinstance(task_names, str):
        raise TypeError("task_names must be a sequence of str, got a single str")
    names = list(task_names)
    if len(names) != n_tasks:
        raise ValueError(f"task_names must name all {n_tasks} tasks, got {len(names)} names")
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"task_names must be non-empty str, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be unique, got {names!r}")
    return names


def _non_negative_finite(name: str, a: np.ndarray) -> None:
    if a.size and not (np.all(np.isfinite(a)) and a.min() >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got values in [{a.min()}, {a.max()}]")


class LoadProfile:
    """Accumulates load-balance statistics for one MoE layer over many batches.

    Per expert: dispatched rows (counts), importance, load. Per task x expert: the gate
    mass routed (gates, 0 where capacity dropped) and the number of assignments the gate
    made (counts matrix; it includes dropped assignments, so it sums to `assignments`).
    With more than `sparse_threshold` experts the matrices are scipy.sparse CSR, so memory
    grows with the distinct (task, expert) pairs seen rather than with T * E.
    """

    def __init__(
        self,
        n_experts: int,
        n_tasks: int,
        task_names: Sequence[str] | None = None,
        *,
        sparse_threshold: int = SPARSE_THRESHOLD,
    ) -> None:
        self.n_experts = check_count("n_experts", n_experts, 1)
        self.n_tasks = check_count("n_tasks", n_tasks, 1)
        self.sparse_threshold = check_count("sparse_threshold", sparse_threshold, 0)
        self.task_names = _check_names(task_names, self.n_tasks)
        self.sparse = self.n_experts > self.sparse_threshold
        E, T = self.n_experts, self.n_tasks
        self.counts = np.zeros(E, dtype=np.int64)  # [E]
        self.importance = np.zeros(E, dtype=np.float64)  # [E]
        self.load = np.zeros(E, dtype=np.float64)  # [E]
        self.task_examples = np.zeros(T, dtype=np.int64)  # [T]
        self.examples = 0
        self.assignments = 0
        self.dropped = 0
        # capacity_drops[i]: assignments a capacity of CAPACITY_FACTORS[i] would cut, batch by batch;
        # None for a profile read from a file written before it was recorded
        self.capacity_drops: np.ndarray | None = np.zeros(len(CAPACITY_FACTORS), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        if self.sparse:
            self._gates: np.ndarray | sp.csr_matrix = sp.csr_matrix((T, E), dtype=np.float64)
            self._hits: np.ndarray | sp.csr_matrix = sp.csr_matrix((T, E), dtype=np.int64)
        else:
            self._gates = np.zeros((T, E), dtype=np.float64)  # [T, E]
            self._hits = np.zeros((T, E), dtype=np.int64)  # [T, E]

    # ---- accumulation -------------------------------------------------------------------

    def add(self, routing: Routing, task_ids: np.ndarray) -> None:
        """Accumulate one batch's gate decision; task_ids is int[B], the task of each example."""
        index, gates, tasks = self._validated(routing, task_ids)
        B, k = index.shape
        E = self.n_experts
        self.counts += np.asarray(routing.counts, dtype=np.int64)  # [E]
        self.importance += routing.importance  # [E]
        self.load += routing.load  # [E]
        self.task_examples += np.bincount(tasks, minlength=self.n_tasks)  # [T]
        self.examples += B
        self.assignments += B * k
        self.dropped += int(routing.dropped)
        if self.capacity_drops is not None:
            self.capacity_drops += capacity_drops(index, E)  # [n_cf]
        rows = np.repeat(tasks.astype(np.int64), k)  # [B*k]
        cols = index.reshape(-1).astype(np.int64)  # [B*k]
        vals = gates.reshape(-1).astype(np.float64)  # [B*k]
        if self.sparse:
            self._pending.append((rows, cols, vals))
            self._pending_n += rows.size
            if self._pending_n > max(_FLUSH_TRIPLETS, self._hits.nnz):
                self._flush()
        else:
            flat = rows * E + cols  # [B*k]
            # reshape(-1) is a view because the dense matrices are always C-contiguous;
            # 1-D np.add.at is several times faster than indexing with (rows, cols)
            np.add.at(self._gates.reshape(-1), flat, vals)  # [T*E]
            np.add.at(self._hits.reshape(-1), flat, 1)  # [T*E]

    def _validated(
        self, routing: Routing, task_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check everything before anything is accumulated, so a bad batch changes nothing."""
        if not isinstance(routing, Routing):
            raise TypeError(f"add() expects a moe.routing.Routing, got {type(routing).__name__}")
        E, T = self.n_experts, self.n_tasks
        for name in ("importance", "load", "counts"):
            shape = np.shape(getattr(routing, name))
            if shape != (E,):
                raise ValueError(f"routing.{name} must have shape ({E},) for this {E}-expert profile, got {shape}")
        counts = np.asarray(routing.counts)
        if not np.issubdtype(counts.dtype, np.integer):
            raise TypeError(f"routing.counts must be an integer array, got dtype {counts.dtype}")
        if counts.min() < 0:
            raise ValueError(f"routing.counts must be >= 0, got min {counts.min()}")
        for name in ("importance", "load"):
            a = np.asarray(getattr(routing, name))
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"routing.{name} must be a float array, got dtype {a.dtype}")
            _non_negative_finite(f"routing.{name}", a)
        index = np.asarray(routing.expert_index)
        gates = np.asarray(routing.gates)
        if index.ndim != 2:
            raise ValueError(f"routing.expert_index must be 2-D [B, k], got shape {index.shape}")
        if not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"routing.expert_index must be an integer array, got dtype {index.dtype}")
        if gates.shape != index.shape:
            raise ValueError(f"routing.gates must have expert_index's shape {index.shape}, got {gates.shape}")
        if not np.issubdtype(gates.dtype, np.floating):
            raise TypeError(f"routing.gates must be a float array, got dtype {gates.dtype}")
        if index.size and (index.min() < 0 or index.max() >= E):
            raise ValueError(f"routing.expert_index must be in [0, {E}), got values in [{index.min()}, {index.max()}]")
        _non_negative_finite("routing.gates", gates)
        B, k = index.shape
        dropped = routing.dropped
        if isinstance(dropped, bool) or not isinstance(dropped, int | np.integer):
            raise TypeError(f"routing.dropped must be an int, got {type(dropped).__name__}")
        if not 0 <= dropped <= B * k:
            raise ValueError(f"routing.dropped must be in [0, {B * k}] for a [{B}, {k}] batch, got {dropped}")
        tasks = np.asarray(task_ids)
        if tasks.dtype == np.bool_ or not np.issubdtype(tasks.dtype, np.integer):
            raise TypeError(f"task_ids must be an integer array, got dtype {tasks.dtype}")
        if tasks.shape != (B,):
            raise ValueError(f"task_ids must have shape ({B},) to match the batch, got {tasks.shape}")
        if B and (tasks.min() < 0 or tasks.max() >= T):
            raise ValueError(f"task_ids must be in [0, {T}), got values in [{tasks.min()}, {tasks.max()}]")
        return index, gates, tasks

    def _flush(self) -> None:
        """Sum the pending COO triplets into the CSR matrices (duplicates are summed)."""
        if not self._pending:
            return
        rows = np.concatenate([p[0] for p in self._pending])  # [n]
        cols = np.concatenate([p[1] for p in self._pending])  # [n]
        vals = np.concatenate([p[2] for p in self._pending])  # [n]
        self._pending, self._pending_n = [], 0
        shape = (self.n_tasks, self.n_experts)
        ones = np.ones(rows.size, dtype=np.int64)  # [n]
        self._gates = self._gates + sp.coo_matrix((vals, (rows, cols)), shape=shape).tocsr()
        self._hits = self._hits + sp.coo_matrix((ones, (rows, cols)), shape=shape).tocsr()

    def merge(self, other: LoadProfile) -> LoadProfile:
        """Add another profile's statistics into this one (same experts and tasks); returns self."""
        if not isinstance(other, LoadProfile):
            raise TypeError(f"merge() expects a LoadProfile, got {type(other).__name__}")
        if other.n_experts != self.n_experts or other.n_tasks != self.n_tasks:
            raise ValueError(
                f"cannot merge a profile over {other.n_experts} experts and {other.n_tasks} tasks "
                f"into one over {self.n_experts} experts and {self.n_tasks} tasks"
            )
        if other.task_names != self.task_names:
            raise ValueError(f"cannot merge profiles with different task names: {self.task_names} vs {other.task_names}")
        self._flush()
        other._flush()
        g, h = other._gates, other._hits  # read before updating: other may be self
        self.counts += other.counts
        self.importance += other.importance
        self.load += other.load
        self.task_examples += other.task_examples
        self.examples += other.examples
        self.assignments += other.assignments
        self.dropped += other.dropped
        if self.capacity_drops is None or other.capacity_drops is None:
            self.capacity_drops = None
        else:
            self.capacity_drops = self.capacity_drops + other.capacity_drops
        if self.sparse:
            self._gates = self._gates + sp.csr_matrix(g)
            self._hits = self._hits + sp.csr_matrix(h)
        else:
            self._gates = self._gates + (g.toarray() if sp.issparse(g) else g)
            self._hits = self._hits + (h.toarray() if sp.issparse(h) else h)
        return self

    # ---- reading ------------------------------------------------------------------------

    def task_expert_matrix(self, kind: str = "gates") -> np.ndarray | sp.csr_matrix:
        """A copy of the [T, E] task x expert matrix: "gates" (float64 gate mass) or "counts" (int64)."""
        if kind not in ("gates", "counts"):
            raise ValueError(f"kind must be 'gates' or 'counts', got {kind!r}")
        self._flush()
        return (self._gates if kind == "gates" else self._hits).copy()

    def _task_row(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Experts with positive gate mass for task t, and that mass."""
        if self.sparse:
            lo, hi = self._gates.indptr[t], self._gates.indptr[t + 1]
            cols, vals = self._gates.indices[lo:hi], self._gates.data[lo:hi]  # [nnz_t]
            keep = vals > 0
            return cols[keep].astype(np.int64), vals[keep]
        row = self._gates[t]  # [E]
        cols = np.flatnonzero(row > 0)  # [nnz_t]
        return cols, row[cols]

    def _per_task(self, mi_terms: np.ndarray) -> dict[str, dict[str, Any]]:
        """Per task: examples, routing entropy, top experts with their share of the task's
        gate mass, the task's share of the layer's gate mass, and its term of the task-expert
        mutual information (KL of its expert distribution from the layer's, by assignments)."""
        out = {}
        total = float(self._gates.sum())
        for t, name in enumerate(self.task_names):
            cols, vals = self._task_row(t)
            entropy, mass = 0.0, float(vals.sum())
            if vals.size:
                p = vals / mass  # [nnz_t]
                entropy = float(-np.sum(p * np.log(p)))
            order = np.lexsort((cols, -vals))[:TOP_EXPERTS]  # heaviest first, ties: lower id
            out[name] = {
                "examples": int(self.task_examples[t]),
                "entropy": entropy,
                "top_experts": cols[order].tolist(),
                "top_shares": (vals[order] / mass).tolist() if vals.size else [],
                "share": mass / total if total > 0 else 0.0,
                "mutual_information": float(mi_terms[t]),
            }
        return out

    def _hot_experts(self, basis: np.ndarray) -> list[dict[str, Any]]:
        """The busiest experts by `basis`, each with basis/mean and the tasks whose
        assignments make up most of it (share of that expert's assignments)."""
        mean = float(basis.mean())
        if mean <= 0:
            return []
        hot = np.lexsort((np.arange(self.n_experts), -basis))[:HOT_EXPERTS]  # busiest first, ties: lower id
        hits = sp.csc_matrix(self._hits) if self.sparse else self._hits
        out = []
        for e in hot.tolist():
            col = np.asarray(hits[:, e].toarray()).ravel() if self.sparse else hits[:, e]  # [T]
            n = int(col.sum())
            tasks = np.lexsort((np.arange(self.n_tasks), -col))[:HOT_TASKS]
            out.append({
                "expert": e,
                "over_mean": float(basis[e]) / mean,
                "tasks": [[self.task_names[t], float(col[t]) / n] for t in tasks.tolist() if col[t] > 0] if n else [],
            })
        return out

    def _drops_by_capacity(self) -> list[dict[str, Any]] | None:
        if self.capacity_drops is None:
            return None
        return [
            {"capacity_factor": cf, "dropped": int(d), "drop_rate": int(d) / self.assignments if self.assignments else 0.0}
            for cf, d in zip(CAPACITY_FACTORS, self.capacity_drops.tolist(), strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-safe statistics. max_mean_load (and hot_experts) use counts when load is all 0
        (balance_basis says which); drop_rate and max_mean_load are 0.0 before anything was
        routed; mutual_information (nats) is the task-expert MI of the assignment counts;
        a task's entropy (nats) is 0.0 when it has no gate mass; top_experts lists up
        to 5 experts with positive gate mass. drops_by_capacity is what the same decisions
        would drop at each capacity factor (None when the profile was read from a file that
        did not record it)."""
        self._flush()
        basis = self.load if np.any(self.load) else self.counts
        mi, mi_terms = mutual_information(self._hits)
        return {
            "n_experts": self.n_experts,
            "n_tasks": self.n_tasks,
            "examples": self.examples,
            "assignments": self.assignments,
            "dropped": self.dropped,
            "counts": self.counts.tolist(),
            "importance": self.importance.tolist(),
            "load": self.load.tolist(),
            "cv_importance": cv(self.importance),
            "cv_load": cv(self.load),
            "max_mean_load": max_over_mean(basis),
            "balance_basis": "load" if basis is self.load else "counts",
            "drop_rate": self.dropped / self.assignments if self.assignments else 0.0,
            "dead_experts": np.flatnonzero((self.counts == 0) & (self.importance == 0)).tolist(),
            "hot_experts": self._hot_experts(basis),
            "drops_by_capacity": self._drops_by_capacity(),
            "mutual_information": mi,
            "per_task": self._per_task(mi_terms),
        }

    # ---- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this profile, as JSON-safe values."""
        self._flush()
        return {
            "format": PROFILE_FORMAT,
            "n_experts": self.n_experts,
            "n_tasks": self.n_tasks,
            "task_names": list(self.task_names),
            "sparse_threshold": self.sparse_threshold,
            "examples": self.examples,
            "assignments": self.assignments,
            "dropped": self.dropped,
            "counts": self.counts.tolist(),
            "importance": self.importance.tolist(),
            "load": self.load.tolist(),
            "task_examples": self.task_examples.tolist(),
            "task_expert": {"gates": encode_matrix(self._gates), "counts": encode_matrix(self._hits)},
            **({} if self.capacity_drops is None else {
                "capacity_factors": list(CAPACITY_FACTORS), "capacity_drops": self.capacity_drops.tolist()}),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LoadProfile:
        """Rebuild a profile written by to_dict(), validating every field."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"a load profile must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != PROFILE_FORMAT:
            raise ValueError(f"load profile format must be {PROFILE_FORMAT!r}, got {doc.get('format')!r}")
        missing = [key for key in _PROFILE_KEYS if key not in doc]
        if missing:
            raise ValueError(f"load profile is missing {missing}")
        p = cls(doc["n_experts"], doc["n_tasks"], doc["task_names"], sparse_threshold=doc["sparse_threshold"])
        E, T = p.n_experts, p.n_tasks
        p.counts = _vector(doc, "counts", E, np.int64)
        p.importance = _vector(doc, "importance", E, np.float64)
        p.load = _vector(doc, "load", E, np.float64)
        p.task_examples = _vector(doc, "task_examples", T, np.int64)
        for key in ("examples", "assignments", "dropped"):
            setattr(p, key, check_count(key, doc[key], 0))
        mats = doc["task_expert"]
        if not isinstance(mats, Mapping) or "gates" not in mats or "counts" not in mats:
            raise ValueError("load profile 'task_expert' must hold 'gates' and 'counts' matrices")
        gates = decode_matrix(mats["gates"], (T, E), np.float64)
        hits = decode_matrix(mats["counts"], (T, E), np.int64)
        if p.sparse:
            p._gates, p._hits = sp.csr_matrix(gates), sp.csr_matrix(hits)
        else:
            p._gates = np.ascontiguousarray(gates.toarray() if sp.issparse(gates) else gates)
            p._hits = np.ascontiguousarray(hits.toarray() if sp.issparse(hits) else hits)
        p.capacity_drops = _capacity_drops_from(doc, p.assignments)
        _check_consistent(p, hits)
        return p


def _capacity_drops_from(doc: Mapping[str, Any], assignments: int) -> np.ndarray | None:
    """The optional capacity_factors / capacity_drops pair (absent in older files: None)."""
    if "capacity_drops" not in doc and "capacity_factors" not in doc:
        return None
    if list(doc.get("capacity_factors", [])) != list(CAPACITY_FACTORS):
        raise ValueError(f"load profile 'capacity_factors' must be {list(CAPACITY_FACTORS)}, "
                         f"got {doc.get('capacity_factors')!r}")
    drops = _vector(doc, "capacity_drops", len(CAPACITY_FACTORS), np.int64)
    if drops.max() > assignments or np.any(np.diff(drops) > 0):
        raise ValueError(f"load profile 'capacity_drops' must fall as the capacity factor grows and stay "
                         f"<= {assignments} assignments, got {drops.tolist()}")
    return drops


_PROFILE_KEYS = (
    "n_experts", "n_tasks", "task_names", "sparse_threshold", "examples", "assignments",
    "dropped", "counts", "importance", "load", "task_examples", "task_expert",
)


def _check_consistent(p: LoadProfile, hits: np.ndarray | sp.csr_matrix) -> None:
    """Totals that every honestly accumulated profile satisfies."""
    entries = hits.data if sp.issparse(hits) else hits
    if entries.size and entries.min() < 0:
        raise ValueError("load profile 'task_expert' counts must be >= 0")
    if int(hits.sum()) != p.assignments or int(p.task_examples.sum()) != p.examples or p.dropped > p.assignments:
        raise ValueError(
            f"load profile totals disagree: {int(hits.sum())} assignments in the task x expert counts vs "
            f"{p.assignments}, {int(p.task_examples.sum())} task examples vs {p.examples}, "
            f"{p.dropped} dropped of {p.assignments}"
        )


def _vector(doc: Mapping[str, Any], key: str, n: int, dtype: type) -> np.ndarray:
    try:
        a = np.asarray(doc[key], dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load profile '{key}' must be a list of numbers: {err}") from None
    if a.shape != (n,):
        raise ValueError(f"load profile '{key}' must have {n} entries, got shape {list(a.shape)}")
    _non_negative_finite(f"load profile '{key}'", a)
    return a


class ModelProfile:
    """One LoadProfile per MoE layer (by name, in first-seen order) of a multi-layer model.

    A layer's profile is created on its first add() with the routing's expert count, so
    layers may differ in size. summary()["headline"] reports, for each of cv_load,
    cv_importance, max_mean_load and drop_rate, the WORST (largest) value over layers and
    which layer it came from; "worst_layer" is the layer with the largest cv_load.

    `context` says how the decisions were made (which split, whether the gate noise was on,
    how batches were formed, ...): a JSON-safe dict carried into summary() and to_dict(),
    because a balance figure means little without it.
    """

    def __init__(
        self,
        n_tasks: int,
        task_names: Sequence[str] | None = None,
        *,
        sparse_threshold: int = SPARSE_THRESHOLD,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.n_tasks = check_count("n_tasks", n_tasks, 1)
        self.task_names = _check_names(task_names, self.n_tasks)
        self.sparse_threshold = check_count("sparse_threshold", sparse_threshold, 0)
        self.context = _check_context(context)
        self.layers: dict[str, LoadProfile] = {}

    def _new_layer(self, n_experts: int) -> LoadProfile:
        return LoadProfile(n_experts, self.n_tasks, self.task_names, sparse_threshold=self.sparse_threshold)

    def layer(self, name: str, n_experts: int | None = None) -> LoadProfile:
        """The named layer's profile; created (empty) when n_experts is given and it is new."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"layer name must be a non-empty str, got {name!r}")
        if name not in self.layers:
            if n_experts is None:
                raise ValueError(f"no layer named {name!r}; known layers: {list(self.layers)}")
            self.layers[name] = self._new_layer(n_experts)
        elif n_experts is not None and self.layers[name].n_experts != n_experts:
            raise ValueError(f"layer {name!r} has {self.layers[name].n_experts} experts, got {n_experts}")
        return self.layers[name]

    def add(self, layer_name: str, routing: Routing, task_ids: np.ndarray) -> None:
        """Accumulate one batch's routing of layer `layer_name`."""
        if not isinstance(layer_name, str) or not layer_name:
            raise TypeError(f"layer name must be a non-empty str, got {layer_name!r}")
        if not isinstance(routing, Routing):
            raise TypeError(f"add() expects a moe.routing.Routing, got {type(routing).__name__}")
        profile = self.layers.get(layer_name)
        if profile is None:
            profile = self._new_layer(routing.n_experts)
            profile.add(routing, task_ids)  # registered only once the first batch is accepted
            self.layers[layer_name] = profile
        else:
            profile.add(routing, task_ids)

    def merge(self, other: ModelProfile) -> ModelProfile:
        """Add another model profile layer by layer (same tasks); returns self."""
        if not isinstance(other, ModelProfile):
            raise TypeError(f"merge() expects a ModelProfile, got {type(other).__name__}")
        if other.task_names != self.task_names:
            raise ValueError(f"cannot merge profiles with different task names: {self.task_names} vs {other.task_names}")
        if other.context != self.context:
            raise ValueError(f"cannot merge profiles routed differently: {self.context} vs {other.context}")
        for name, theirs in list(other.layers.items()):
            mine = self.layers.get(name)
            if mine is None:
                self.layers[name] = self._new_layer(theirs.n_experts).merge(theirs)
            else:
                mine.merge(theirs)
        return self

    def summary(self) -> dict[str, Any]:
        """Per-layer summaries plus the headline (worst-layer) numbers; JSON-safe."""
        layers = {name: p.summary() for name, p in self.layers.items()}
        return {
            "n_layers": len(layers),
            "n_tasks": self.n_tasks,
            "task_names": list(self.task_names),
            "context": dict(self.context),
            "layers": layers,
            "headline": _headline(layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_PROFILE_FORMAT,
            "n_tasks": self.n_tasks,
            "task_names": list(self.task_names),
            "sparse_threshold": self.sparse_threshold,
            "context": dict(self.context),
            "layers": {name: p.to_dict() for name, p in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ModelProfile:
        if not isinstance(doc, Mapping):
            raise ValueError(f"a model profile must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != MODEL_PROFILE_FORMAT:
            raise ValueError(f"model profile format must be {MODEL_PROFILE_FORMAT!r}, got {doc.get('format')!r}")
        try:
            m = cls(doc["n_tasks"], doc["task_names"], sparse_threshold=doc["sparse_threshold"],
                    context=doc.get("context"))
            layers = doc["layers"]
        except KeyError as err:
            raise ValueError(f"model profile is missing {err}") from None
        if not isinstance(layers, Mapping):
            raise ValueError(f"model profile 'layers' must be an object, got {type(layers).__name__}")
        for name, layer_doc in layers.items():
            p = LoadProfile.from_dict(layer_doc)
            if p.task_names != m.task_names:
                raise ValueError(f"layer {name!r} has tasks {p.task_names}, the model {m.task_names}")
            m.layers[name] = p
        return m


def _check_context(context: Mapping[str, Any] | None) -> dict[str, Any]:
    if context is None:
        return {}
    if not isinstance(context, Mapping) or not all(isinstance(key, str) for key in context):
        raise TypeError(f"context must be a dict with str keys, got {context!r:.200}")
    try:
        return json.loads(json.dumps(dict(context), allow_nan=False))  # a JSON-safe copy
    except (TypeError, ValueError) as err:
        raise ValueError(f"context must hold JSON values only: {err}") from None


def _headline(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Worst value over layers of each balance metric, and the layer it came from."""
    if not layers:
        out: dict[str, Any] = {m: 0.0 for m in _HEADLINE_METRICS}
        return {"worst_layer": None, **out, "layer_of": {m: None for m in _HEADLINE_METRICS},
                "dead_experts": 0, "examples": 0}
    worst = {m: max(layers, key=lambda name, m=m: layers[name][m]) for m in _HEADLINE_METRICS}
    return {
        "worst_layer": worst["cv_load"],
        **{m: layers[worst[m]][m] for m in _HEADLINE_METRICS},
        "layer_of": worst,
        "dead_experts": sum(len(s["dead_experts"]) for s in layers.values()),
        "examples": max(s["examples"] for s in layers.values()),
    }
