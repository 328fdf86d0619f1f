"""Task embeddings started from what each task's data says, so related tasks start on shared experts.

Why: the task router sends every example of a task to the experts its embedding selects, and
top-k gives no gradient to experts a task does not use, so with random embeddings two tasks
that need the same skill rarely meet on the same expert (measured on the skills benchmark:
expert overlap 0.03 for related pairs, the same as for unrelated ones). Starting related tasks
close together lets the experts they share learn what they share.

A task's signature is what its targets correlate with, in one random feature space per
shared input domain: c_t = phi(x)^T Y / n over its train split (at most MAX_ROWS rows of it,
evenly spaced, so a large table costs no more than 4,096 rows), [F, o], where phi(x) =
relu(x W + b) with standardised columns, and Y the centred targets (one-hot classes, 0/1
labels, standardised values) with their linear fit on [x, 1] taken out (a head reads the
linear part; the experts are there for the rest). Two tasks' similarity is
  K(t, u) = ||c_t^T c_u||_F^2 / (||c_t^T c_t||_F ||c_u^T c_u||_F)   in [0, 1],
unchanged when a task's outputs are permuted or flip sign (its head can undo either); K reads
c_t only through c_t c_t^T, so a task of more than MAX_OUTPUTS outputs keeps its top
MAX_OUTPUTS singular directions and the kernel blocks stay bounded (CHUNK_COLUMNS). The
embeddings are the top d kernel principal components of K over the domain's tasks, through a
Nystroem map on at most LANDMARKS tasks so the cost stays linear in the number of tasks, each
row scaled to norm sqrt(d) (the expected norm of the random start it replaces). A task then
starts from `blend`: sqrt(1 - rho) x its random row + sqrt(rho) x its signature row, with rho
its nonlinear share (what a linear head cannot fit): the skill tasks (rho ~1) start from their
signatures, the nearly linear digit-set tasks (rho ~0.3) mostly at random, which keeps their
experts as varied as before (measured: with the signature alone the 10-shot add-task gain on
digits_ge5 fell from 0.17 to 0.13, bench/RESULTS.md). Tasks with an input space of their own,
a domain of one task, or targets with nothing beyond their linear part keep the random start.
"""

from __future__ import annotations

import numpy as np

from moe.tasks.spec import TaskData

FEATURES = 1024  # random ReLU features per domain
LANDMARKS = 256  # tasks whose kernel columns span the map (all of them in a smaller domain)
CHUNK_COLUMNS = 8192  # signature columns per block of kernel rows (bounds the memory at 100,000 tasks)
MAX_OUTPUTS = 16  # columns a signature keeps: a task with more keeps its top singular directions
LINEAR_TOL = 1e-4  # targets whose residual is below this share of their spread count as linear
MAX_ROWS = 4096  # train rows a signature reads (evenly spaced): bounds [rows, FEATURES] at 32 MiB


def _rows(data: TaskData) -> slice | np.ndarray:
    """The train rows the signature reads: all of them (a slice, no copy), or MAX_ROWS evenly
    spaced indices (spread over the whole split, so a table sorted by its label is still sampled across)."""
    n = data.x_train.shape[0]
    return slice(None) if n <= MAX_ROWS else np.unique(np.linspace(0, n - 1, MAX_ROWS).round().astype(np.int64))


def _targets(data: TaskData) -> np.ndarray:
    """The train split's targets as float64 [n, o]: one-hot classes, 0/1 labels, standardised values."""
    y = data.y_train[_rows(data)]
    if data.spec.kind == "multiclass":
        return np.eye(data.spec.n_outputs)[np.asarray(y, dtype=np.int64)]  # [n, C]
    return np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1)  # [n, o]


def centred_targets(data: TaskData) -> np.ndarray:
    """The train split's targets as float64 [n, o], centred, with their linear fit on [x, 1] removed."""
    x, t = data.x_train[_rows(data)].astype(np.float64), _targets(data)
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # [n, d + 1]
    resid = t - design @ np.linalg.lstsq(design, t, rcond=None)[0]  # [n, o]
    # what float32 targets leave of an exactly linear function is rounding, not signal
    return resid if np.linalg.norm(resid) > LINEAR_TOL * np.linalg.norm(t - t.mean(axis=0)) else np.zeros_like(t)


def nonlinear_share(data: TaskData) -> float:
    """rho in [0, 1]: the share of the train targets' variance that their linear fit on [x, 1]
    leaves, adjusted for the fit's d + 1 parameters (as adjusted R^2 is); 0 for a task a linear
    head solves (and when n <= d + 1), ~0.3 for the digit-set tasks, ~1 for a skill task."""
    t = _targets(data)
    n, p = t.shape[0], data.spec.n_inputs + 1
    total = float(((t - t.mean(axis=0)) ** 2).sum())
    if total <= 0 or n <= p:
        return 0.0
    return float(min(1.0, (centred_targets(data) ** 2).sum() / total * (n - 1) / (n - p)))


def blend(random_row: np.ndarray, signature_row: np.ndarray, share: float) -> np.ndarray:
    """sqrt(1 - rho) random + sqrt(rho) signature: a task starts from its signature as far as
    the experts have its targets to compute (its nonlinear share rho); the expected squared
    norm stays d either way."""
    return np.sqrt(1.0 - share) * random_row + np.sqrt(share) * signature_row


def signature(data: TaskData, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c_t [F, o], scaled so that K(t, t) = 1 (zeros when nothing is left beyond the linear part)."""
    phi = np.maximum(data.x_train[_rows(data)].astype(np.float64) @ w + b, 0.0)  # [n, F]
    sd = phi.std(axis=0)
    phi = (phi - phi.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    c = phi.T @ centred_targets(data) / phi.shape[0]  # [F, o]
    if c.shape[1] > MAX_OUTPUTS:  # K reads c only through c c^T: keep its top MAX_OUTPUTS directions
        u, sv, _ = np.linalg.svd(c, full_matrices=False)
        c = u[:, :MAX_OUTPUTS] * sv[:MAX_OUTPUTS]  # [F, MAX_OUTPUTS]
    norm = np.sqrt(np.linalg.norm(c.T @ c))
    return c / norm if norm > 0 else np.zeros_like(c)


def _kernel(rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
    """K [len(rows), len(cols)], K(t, u) = ||c_t^T c_u||_F^2 for unit-scaled signatures."""
    a, b = np.concatenate(rows, axis=1), np.concatenate(cols, axis=1)  # [F, sum o]
    g = (a.T @ b) ** 2  # [sum o_rows, sum o_cols]
    ra = np.cumsum([0] + [r.shape[1] for r in rows[:-1]])
    cb = np.cumsum([0] + [c.shape[1] for c in cols[:-1]])
    return np.add.reduceat(np.add.reduceat(g, ra, axis=0), cb, axis=1)


def domain_embeddings(tasks: list[TaskData], d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kernel-PCA embeddings [d] (norm sqrt(d)) of one domain's tasks; tasks left out keep theirs."""
    n_in = tasks[0].spec.n_inputs
    w = rng.standard_normal((n_in, FEATURES)) / np.sqrt(n_in)  # [n_in, F]
    b = rng.standard_normal(FEATURES)  # [F]
    marks = np.sort(rng.choice(len(tasks), size=min(LANDMARKS, len(tasks)), replace=False))
    land = [signature(tasks[i], w, b) for i in marks]
    k_mm = _kernel(land, land)  # [m, m]
    lam, u = np.linalg.eigh(k_mm)
    keep = lam > 1e-9 * max(float(lam[-1]), 1e-300)
    proj = u[:, keep] / np.sqrt(lam[keep])  # [m, r]: Nystroem map K(., landmarks) -> features
    at = {int(i): j for j, i in enumerate(marks)}  # task index -> its landmark signature
    feats, ok, sigs, cols = [], [], [], 0
    for i, t in enumerate(tasks):
        sigs.append(land[at[i]] if i in at else signature(t, w, b))
        cols += sigs[-1].shape[1]
        if cols >= CHUNK_COLUMNS or i == len(tasks) - 1:
            feats.append(_kernel(sigs, land) @ proj)  # [chunk, r]
            ok.extend(bool(c.any()) for c in sigs)
            sigs, cols = [], 0
    f = np.concatenate(feats)  # [n, r]
    ok_ = np.array(ok)
    if ok_.sum() < 2:
        return {}
    f -= f[ok_].mean(axis=0)
    _, v = np.linalg.eigh(f[ok_].T @ f[ok_])  # principal axes of the centred features
    coords = f @ v[:, ::-1][:, :d]  # [n, <= d]
    coords = np.pad(coords, ((0, 0), (0, d - coords.shape[1])))
    norm = np.linalg.norm(coords, axis=1)
    good = ok_ & (norm > 1e-9 * max(float(norm.max()), 1e-300))
    return {t.name: coords[i] * np.sqrt(d) / norm[i] for i, t in enumerate(tasks) if good[i]}


def signature_embeddings(data: list[TaskData], d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{task: embedding [d] float64} for the tasks of every shared domain with >= 2 tasks."""
    domains: dict[str, list[TaskData]] = {}
    for t in data:
        if t.spec.domain is not None:
            domains.setdefault(t.spec.domain, []).append(t)
    out: dict[str, np.ndarray] = {}
    for name in sorted(domains):  # domains in a fixed order, whatever order the tasks come in
        if len(domains[name]) >= 2:
            out.update(domain_embeddings(domains[name], d, rng))
    return out
