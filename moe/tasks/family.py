"""A generated family of related tasks that share latent structure.

Why: on real benchmarks it is hard to tell whether experts specialise or whether a new task
transfers. Here the ground truth is known. Every task sees the same latent u ~ N(0, I_d) through
its own rotation, and its score is a weighted sum of a few features from one shared bank
phi_m(u) = tanh(a_m . u + b_m). Tasks that read the same features are related by construction,
so routing overlap and transfer can be checked against the overlap of their feature subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe.tasks.spec import TaskData, TaskSpec
from moe.tasks.splits import make_task_data, split_indices

FAMILY_KINDS = ("multiclass", "binary", "regression")  # cycled: task t has FAMILY_KINDS[t % 3]


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix [d, d] (QR of a Gaussian with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # [d, d]


@dataclass(frozen=True)
class FamilyStructure:
    """The hidden truth behind a family: shared feature bank and each task's view of it.

    a: [M, d] and b: [M] define phi(u) = tanh(u a^T + b) -> [n, M].
    subsets: [T, s] feature ids each task reads; weights: [T, s] their weights.
    rotations: [T, d, d] orthogonal; task t sees x = u R_t^T + noise.
    """

    a: np.ndarray
    b: np.ndarray
    subsets: np.ndarray
    weights: np.ndarray
    rotations: np.ndarray
    kinds: tuple[str, ...]
    input_noise: float
    target_noise: float

    @property
    def n_tasks(self) -> int:
        return int(self.subsets.shape[0])

    @property
    def d(self) -> int:
        return int(self.a.shape[1])

    def features(self, u: np.ndarray) -> np.ndarray:
        """phi(u): the shared bank evaluated on latent points u [n, d] -> [n, M]."""
        return np.tanh(u @ self.a.T + self.b)  # [n, M]

    def scores(self, u: np.ndarray) -> np.ndarray:
        """Every task's noiseless score on the same latent points: [n, d] -> [n, T]."""
        phi = self.features(u)  # [n, M]
        return np.stack(
            [phi[:, self.subsets[t]] @ self.weights[t] for t in range(self.n_tasks)], axis=1
        )  # [n, T]

    def shared_features(self, t1: int, t2: int) -> int:
        """How many bank features tasks t1 and t2 both read."""
        return len(set(self.subsets[t1].tolist()) & set(self.subsets[t2].tolist()))


def make_structure(
    n_tasks: int,
    seed: int,
    d: int = 16,
    *,
    n_features: int = 24,
    n_active: int = 6,
    input_noise: float = 0.1,
    target_noise: float = 0.1,
) -> FamilyStructure:
    """Draw the bank and every task's subset, weights and rotation from default_rng(seed).

    Task t's parameters come from the t-th spawned child generator, so the first k tasks are the
    same whatever n_tasks is.
    """
    check_int("n_tasks", n_tasks, 0)
    check_int("d", d, 1)
    check_int("n_features", n_features, 1)
    check_int("n_active", n_active, 1)
    if n_active > n_features:
        raise ValueError(f"n_active must be <= n_features ({n_features}), got {n_active}")
    rng = np.random.default_rng(seed)
    # Rows of a random tight frame (d columns of an orthogonal [M, M]) are as close to orthogonal
    # as M vectors in R^d get, so bank features are nearly uncorrelated and sharing stands out.
    # Scaled so |a_m| ~ 1.5: a_m.u has std ~1.5, clearly nonlinear through tanh, rarely saturated.
    if d <= n_features:
        frame = random_rotation(n_features, rng)[:, :d] * np.sqrt(n_features / d)  # [M, d]
    else:
        frame = random_rotation(d, rng)[:n_features]  # [M, d] orthonormal rows
    a = 1.5 * frame  # [M, d]
    b = rng.normal(0.0, 0.5, size=n_features)  # [M]
    children = rng.spawn(n_tasks)
    subsets, weights, rotations = [], [], []
    for child in children:
        subsets.append(np.sort(child.choice(n_features, size=n_active, replace=False)))
        # Magnitudes kept away from 0 so every chosen feature matters.
        weights.append(child.uniform(0.5, 1.5, n_active) * child.choice([-1.0, 1.0], n_active))
        rotations.append(random_rotation(d, child))
    return FamilyStructure(
        a=a,
        b=b,
        subsets=np.array(subsets, dtype=np.int64).reshape(n_tasks, n_active),
        weights=np.array(weights, dtype=np.float64).reshape(n_tasks, n_active),
        rotations=np.array(rotations, dtype=np.float64).reshape(n_tasks, d, d),
        kinds=tuple(FAMILY_KINDS[t % 3] for t in range(n_tasks)),
        input_noise=float(input_noise),
        target_noise=float(target_noise),
    )


def check_int(what: str, v: object, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {v!r}")


def labels_from_score(
    kind: str, score: np.ndarray, train: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Targets from a score; class thresholds come from train quantiles only."""
    if kind == "multiclass":
        cuts = np.quantile(score[train], [1 / 3, 2 / 3])
        return np.searchsorted(cuts, score, side="right").astype(np.int32), np.arange(3)
    if kind == "binary":
        return (score > np.median(score[train])).astype(np.float32)[:, None], np.arange(2)
    return score[:, None], None


def make_family_task(
    structure: FamilyStructure, t: int, n_per_task: int, rng: np.random.Generator
) -> TaskData:
    """Sample n_per_task examples of task t: u, its score, labels, and the rotated noisy inputs."""
    kind = structure.kinds[t]
    u = rng.standard_normal((n_per_task, structure.d))  # [n, d]
    score = structure.features(u)[:, structure.subsets[t]] @ structure.weights[t]  # [n]
    if kind == "regression":
        score = score + structure.target_noise * rng.standard_normal(n_per_task)  # [n]
    x = u @ structure.rotations[t].T  # [n, d]
    x = x + structure.input_noise * rng.standard_normal(x.shape)  # [n, d]
    splits = split_indices(n_per_task, rng)
    y, classes = labels_from_score(kind, score, splits[0])
    n_out = 3 if kind == "multiclass" else 1
    spec = TaskSpec(f"family_{t:02d}", kind, structure.d, n_out)
    return make_task_data(spec, x, y, splits, classes=classes)


def make_family(n_tasks: int, n_per_task: int, seed: int, d: int = 16) -> list[TaskData]:
    """n_tasks related tasks named family_00, family_01, ... (kinds cycle multiclass/binary/regression).

    Same seed, same bits: everything descends from np.random.default_rng(seed). Each task's
    data comes from its own spawned generator, so task t does not depend on n_tasks.
    """
    check_int("n_per_task", n_per_task, 10)
    structure = make_structure(n_tasks, seed, d)
    # The same children make_structure drew task t's parameters from; each spawns a data stream.
    data_rngs = [c.spawn(1)[0] for c in np.random.default_rng(seed).spawn(n_tasks)]
    return [make_family_task(structure, t, n_per_task, data_rngs[t]) for t in range(n_tasks)]
