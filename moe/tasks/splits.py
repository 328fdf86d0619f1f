"""Train/val/test splits and the train-only standardiser, and the assembly of a TaskData.

Everything that turns raw (x, y) into a TaskData goes through here, so built-in and user tasks
are split and scaled the same way: fit on train only, apply to val and test.
"""

from __future__ import annotations

import numpy as np

from moe.tasks.spec import TaskData, TaskSpec

_F32_MAX = float(np.finfo(np.float32).max)


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Row counts per split; train keeps the remainder and at least one row when n >= 1."""
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    while n_val + n_test > max(n - 1, 0):  # keep >= 1 row for train
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    f = tuple(float(v) for v in fractions)
    if len(f) != 3 or any(not np.isfinite(v) or v < 0 for v in f):
        raise ValueError(
            f"fractions must be 3 finite numbers >= 0 (train, val, test), got {fractions}"
        )
    if abs(sum(f) - 1.0) > 1e-6 or f[0] <= 0:
        raise ValueError(f"fractions must sum to 1 with train > 0, got {fractions}")
    return f  # type: ignore[return-value]


def split_indices(
    n: int,
    rng: np.random.Generator,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint index arrays (train, val, test) covering range(n), each in random order.

    The same Generator state gives the same split. With `stratify` (one label per row) each class
    is split on its own by the fractions, and any class with at least one row gets one in train,
    so a classifier never meets a class at test time that it could not have seen in training.
    Order inside each split is shuffled, so taking a prefix (e.g. for early stopping) is unbiased.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    f = _check_fractions(fractions)
    if stratify is None:
        perm = rng.permutation(n)
        n_tr, n_va, _ = _split_counts(n, f)
        return perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
    stratify = np.asarray(stratify)
    if stratify.ndim != 1 or stratify.shape[0] != n:
        raise ValueError(f"stratify must have shape ({n},), got {stratify.shape}")
    _, inverse = np.unique(stratify, return_inverse=True)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(int(inverse.max()) + 1 if n else 0):
        rows = rng.permutation(np.flatnonzero(inverse == c))
        n_tr, n_va, _ = _split_counts(rows.shape[0], f)
        parts[0].append(rows[:n_tr])
        parts[1].append(rows[n_tr : n_tr + n_va])
        parts[2].append(rows[n_tr + n_va :])
    out = []
    for p in parts:
        joined = np.concatenate(p) if p else np.zeros(0, dtype=np.int64)
        out.append(rng.permutation(joined))
    return out[0], out[1], out[2]


def fit_standardizer(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (mean, std) as float32; a column constant on train gets std 1 (so it maps to 0)."""
    x = np.asarray(x_train, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"standardiser needs a non-empty 2-D array [n, d], got shape {x.shape}")
    mean = x.mean(axis=0)  # [d]
    with np.errstate(under="ignore"):  # squared deviations below float64's range are 0
        std = x.std(axis=0)  # [d]
    std[np.ptp(x, axis=0) == 0] = 1.0  # exactly constant columns; mean then equals the value
    std[std < 1e-12 * np.maximum(np.abs(mean), 1.0)] = 1.0  # numerically constant columns
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std as float32 [n, d]."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != mean.shape[0] or std.shape != mean.shape:
        raise ValueError(
            f"standardize expects x [n, {mean.shape[0]}] with mean/std [{mean.shape[0]}], "
            f"got x {x.shape}, mean {mean.shape}, std {std.shape}"
        )
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)  # [n, d]


def to_float32(values: np.ndarray, what: str) -> np.ndarray:
    """Cast to float32, refusing values float32 cannot hold (tiny values round to 0, as they should)."""
    v = np.asarray(values, dtype=np.float64)
    big = np.abs(v) > _F32_MAX
    if np.any(big):
        raise ValueError(f"{what} has a value out of float32 range: {v[big][0]!r}")
    with np.errstate(under="ignore"):
        return v.astype(np.float32)


def make_task_data(
    spec: TaskSpec,
    x: np.ndarray,
    y: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    classes: np.ndarray | None = None,
    x_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> TaskData:
    """Cut raw (x, y) by `splits` and standardise: x on train (or with `x_stats`), regression y on train.

    x: raw features [n, n_inputs]; y: already encoded for spec.kind (int class ids [n];
    0/1 [n, L]; raw regression targets [n, n_outputs]).
    x_stats: a (mean, std) to reuse instead of fitting (e.g. share a standardiser across tasks).
    """
    tr, va, te = (np.asarray(s, dtype=np.intp) for s in splits)
    x = to_float32(x, f"task '{spec.name}' inputs")
    if x_stats is None:
        mean, std = fit_standardizer(x[tr])
    else:
        mean, std = (np.asarray(a, dtype=np.float32) for a in x_stats)
    xs = [standardize(x[i], mean, std) for i in (tr, va, te)]
    y_mean = y_std = None
    if spec.kind == "multiclass":
        y = np.asarray(y).astype(np.int32)
    else:
        y = to_float32(y, f"task '{spec.name}' targets")
        if y.ndim == 1:
            y = y[:, None]
        if spec.kind == "regression":
            y_mean, y_std = fit_standardizer(y[tr])
            y = standardize(y, y_mean, y_std)
    return TaskData(
        spec=spec,
        x_train=xs[0],
        y_train=y[tr],
        x_val=xs[1],
        y_val=y[va],
        x_test=xs[2],
        y_test=y[te],
        mean=mean,
        std=std,
        y_mean=y_mean,
        y_std=y_std,
        classes=classes,
    )
