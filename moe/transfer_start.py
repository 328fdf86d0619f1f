"""Where a new task starts: the candidate start that serves its few examples best, measured.

A candidate is an existing task: the new task takes its task embedding (so the routers send
the shots where they would send that task's examples) and, when the new task has an input
space of its own of the same width, its encoder row too. "Fresh" (the new task's own random
start) is a candidate as well. Each candidate routes the shots through the frozen model; a
ridge probe on the features the new head would read (unit-normalised rows) is scored by its
leave-one-out squared error, in closed form: r_i = (y - H y)_i / (1 - H_ii) with
H = K (K + lam I)^-1, K the shots' feature kernel. No training, so it is cheap per candidate
and defined from one example per class (each shot predicted from the others).
"""

from __future__ import annotations

import numpy as np

from moe.model import Chunk, MultiTaskMoE

MAX_CANDIDATES = 64  # existing tasks tried (same input space first, then same width, then the rest)
RIDGE = 0.1  # lam as a fraction of the kernel's mean diagonal
FRESH = "(fresh)"


def probe_targets(kind: str, y: np.ndarray, n_outputs: int) -> np.ndarray:
    """Targets of the ridge probe, float64 [n, o]: one-hot classes, 0/1 labels, standardised values."""
    if kind == "multiclass":
        return np.eye(n_outputs)[np.asarray(y, dtype=np.int64)]
    t = np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1)
    if kind == "regression":
        sd = t.std(axis=0)
        t = (t - t.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return t


def loo_ridge_error(features: np.ndarray, targets: np.ndarray) -> float:
    """Mean leave-one-out squared error of ridge regression of targets [n, o] on features [n, d]."""
    f = features.astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # [n, d]
    k = f @ f.T + 1.0  # [n, n]; the constant adds an unpenalised-ish bias
    lam = RIDGE * float(np.mean(np.diag(k)))
    h = k @ np.linalg.inv(k + lam * np.eye(k.shape[0]))  # [n, n] hat matrix
    resid = (targets - h @ targets) / (1.0 - np.diag(h))[:, None]  # [n, o]
    return float(np.mean(resid**2))


def candidates(model: MultiTaskMoE, name: str, limit: int = MAX_CANDIDATES) -> list[str]:
    spec = model.tasks.spec(name)
    others = [s for s in model.tasks if s.name != name]
    rank = {s.name: (s.input_space != spec.input_space, s.n_inputs != spec.n_inputs) for s in others}
    return sorted(rank, key=lambda n: rank[n])[:limit]  # stable: registry order within a rank


def choose_start(
    model: MultiTaskMoE, name: str, x: np.ndarray, y: np.ndarray, *, forced: str | None = None
) -> tuple[str | None, dict[str, float]]:
    """Set task `name`'s embedding (and own encoder row) to the best measured start; return
    (the source task, or None for the fresh start; {candidate: leave-one-out error})."""
    spec = model.tasks.spec(name)
    views = model.task_views(name, ("emb", "encoder"))
    emb_key = next(n for n in views if n.startswith("task.emb."))
    fresh = {n: p.copy() for n, (p, _) in views.items()}
    targets = probe_targets(spec.kind, y, spec.n_outputs)
    if forced is not None and forced not in model.tasks:
        raise ValueError(f"--init-from: unknown task {forced!r}")

    own_encoder = spec.domain is None

    def apply(source: str | None) -> None:
        for n, (p, _) in views.items():
            p[...] = fresh[n]
        if source is None:
            return
        views[emb_key][0][...] = model.task_emb.params["e"][model.tasks.id(source)]
        src = model.tasks.spec(source)
        if own_encoder and src.n_inputs == spec.n_inputs:  # its encoder row (a domain's, or its own)
            table = model.encoders[spec.n_inputs]
            src_row, new_row = model.space_row[src.input_space], model.space_row[spec.input_space]
            for p in table.params.values():
                p[new_row] = p[src_row]

    pool = [forced] if forced is not None else [None, *candidates(model, name)]
    similarity: dict[str, float] = {}
    for source in pool:
        apply(source)
        feats = model.forward([Chunk(name, x)], train=False).features  # [n, d]
        similarity[source or FRESH] = loo_ridge_error(feats, targets)
    best = min(similarity, key=similarity.get)
    chosen = None if best == FRESH else best
    apply(chosen)
    return chosen, similarity
