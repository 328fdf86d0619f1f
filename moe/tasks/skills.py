"""A generated benchmark where sparse capacity matters: many tasks, each combining a few of
many shared nonlinear skills over the same inputs.

Why: on small real datasets a per-task adapter and head can do most of the work, so the
experts barely matter. Here every task reads the same inputs x ~ N(0, I_d) (one domain,
one encoder), and its score is w_1 s_a(x) + w_2 s_b(x) for two skills drawn from a bank of
M. Each skill is a small random ReLU network with its linear part removed, so the bank
as a whole needs about M x units hidden units and M directions of the residual stream: a dense model
with the active compute of an MoE (k experts' hidden units) cannot hold it, and a dense
model of any width must squeeze M skills through d_model dimensions, while task-aware
routing can give each task only the experts that compute its skills. Tasks that share a
skill are related by construction; `shared_skills` says by how much, so routing overlap can
be checked against the truth. Per task there are only a few hundred examples, so a model
per task (what a user would fit with scikit-learn) must learn each skill from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe.tasks.family import FAMILY_KINDS, check_int, labels_from_score
from moe.tasks.spec import TaskData, TaskSpec
from moe.tasks.splits import make_task_data, split_indices

SKILLS = "skills"  # the domain every skill task reads
DIM, BANK, UNITS, PER_TASK = 8, 128, 4, 2  # inputs, skills in the bank, ReLU units per skill, skills per task


@dataclass(frozen=True)
class SkillBank:
    """The hidden truth: M skills and each task's few of them.

    Skill m is a small ReLU network with its best linear fit taken out, scaled to unit
    variance on N(0, I): s_m(x) = (v_m . relu(A_m x + c_m) - beta_m . [x, 1]) / sd_m. Without
    its linear part no linear model (and no linear head on the inputs) can use a skill, so a
    model must build it in its experts. A: [M, u, d] (unit-norm rows), c, v: [M, u];
    beta: [M, d + 1]; sd: [M]; subsets [T, s] skill ids per task, weights [T, s].
    """

    A: np.ndarray
    c: np.ndarray
    v: np.ndarray
    beta: np.ndarray
    sd: np.ndarray
    subsets: np.ndarray
    weights: np.ndarray

    @property
    def n_skills(self) -> int:
        return int(self.A.shape[0])

    def raw(self, m: int, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.A[m].T + self.c[m], 0) @ self.v[m]  # [n]

    def skill(self, m: int, x: np.ndarray) -> np.ndarray:
        """Skill m on inputs x [n, d] -> [n]."""
        lin = x @ self.beta[m, :-1] + self.beta[m, -1]  # [n]
        return (self.raw(m, x) - lin) / self.sd[m]

    def score(self, t: int, x: np.ndarray) -> np.ndarray:
        return sum(w * self.skill(m, x) for m, w in zip(self.subsets[t], self.weights[t], strict=True))

    def shared_skills(self, t1: int, t2: int) -> int:
        return len(set(self.subsets[t1].tolist()) & set(self.subsets[t2].tolist()))


def make_bank(n_tasks: int, seed: int, d: int | None = None, *, n_skills: int | None = None,
              units: int | None = None, per_task: int | None = None) -> SkillBank:
    """Draw the bank and every task's skills from default_rng([seed, 7]); task t's choice comes
    from its own spawned generator, so the first tasks do not depend on n_tasks. Unset sizes
    take the module's DIM, BANK, UNITS and PER_TASK."""
    d, n_skills = d or DIM, n_skills or BANK
    units, per_task = units or UNITS, per_task or PER_TASK
    for what, v, lo in (("n_tasks", n_tasks, 0), ("d", d, 1), ("n_skills", n_skills, 1),
                        ("units", units, 1), ("per_task", per_task, 1)):
        check_int(what, v, lo)
    if per_task > n_skills:
        raise ValueError(f"per_task must be <= n_skills ({n_skills}), got {per_task}")
    rng = np.random.default_rng([seed, 7])
    A = rng.standard_normal((n_skills, units, d))
    A /= np.linalg.norm(A, axis=2, keepdims=True)
    c = rng.normal(0.0, 0.5, size=(n_skills, units))
    v = rng.standard_normal((n_skills, units))
    ref = rng.standard_normal((8192, d))  # the reference sample that fixes beta and sd
    design = np.concatenate([ref, np.ones((ref.shape[0], 1))], axis=1)  # [n, d + 1]
    beta, sd = np.zeros((n_skills, d + 1)), np.zeros(n_skills)
    for m in range(n_skills):
        g = np.maximum(ref @ A[m].T + c[m], 0) @ v[m]
        beta[m] = np.linalg.lstsq(design, g, rcond=None)[0]
        sd[m] = (g - design @ beta[m]).std()
    subsets, weights = [], []
    for child in rng.spawn(n_tasks):
        subsets.append(np.sort(child.choice(n_skills, size=per_task, replace=False)))
        weights.append(child.uniform(0.6, 1.4, per_task) * child.choice([-1.0, 1.0], per_task))
    return SkillBank(A, c, v, beta, sd, np.array(subsets, dtype=np.int64).reshape(n_tasks, per_task),
                     np.array(weights).reshape(n_tasks, per_task))


def make_skill_tasks(n_tasks: int, n_per_task: int, seed: int, target_noise: float = 0.1) -> list[TaskData]:
    """n_tasks tasks named skill_000, ... over the "skills" domain (kinds cycle as the family's).

    Inputs are N(0, I) and scaled by the identity, so one encoder sees every task's rows alike.
    """
    check_int("n_per_task", n_per_task, 10)
    bank = make_bank(n_tasks, seed)
    d = bank.A.shape[2]
    ident = (np.zeros(d, np.float32), np.ones(d, np.float32))
    out = []
    for t, rng in enumerate(np.random.default_rng([seed, 8]).spawn(n_tasks)):
        kind = FAMILY_KINDS[t % 3]
        x = rng.standard_normal((n_per_task, d))  # [n, d]
        score = bank.score(t, x)  # [n]
        if kind == "regression":
            score = score + target_noise * rng.standard_normal(n_per_task)
        splits = split_indices(n_per_task, rng)
        y, classes = labels_from_score(kind, score, splits[0])
        spec = TaskSpec(f"skill_{t:03d}", kind, d, 3 if kind == "multiclass" else 1, domain=SKILLS)
        out.append(make_task_data(spec, x, y, splits, classes=classes, x_stats=ident))
    return out


def skill_relatedness(n_tasks: int, seed: int) -> Callable[[str, str], bool]:
    """related(a, b): both are skill tasks of this bank and read at least one common skill."""
    bank = make_bank(n_tasks, seed)

    def index(name: str) -> int | None:
        if not name.startswith("skill_"):
            return None
        t = int(name[len("skill_"):])
        return t if t < n_tasks else None

    def related(a: str, b: str) -> bool:
        i, j = index(a), index(b)
        return i is not None and j is not None and bank.shared_skills(i, j) > 0

    return related
