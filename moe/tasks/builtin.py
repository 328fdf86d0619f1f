"""The built-in benchmark: scikit-learn's bundled datasets plus the generated family. Offline only.

The digits-derived tasks (digits, digits_rotation, digits_parity and the held-out digits >= 5)
share one split of the 1797 digit images, fixed by the seed, so no task ever trains on an image
another task tests on; in particular the held-out task's test images are unseen by every
digits task.
"""

from __future__ import annotations

import numpy as np

from moe.tasks.family import make_family
from moe.tasks.skills import make_skill_tasks
from moe.tasks.spec import TaskData, TaskSpec
from moe.tasks.splits import fit_standardizer, make_task_data, split_indices

# Independent random streams per purpose: default_rng([seed, STREAM]).
_DIGITS_SPLIT, _ROTATION, _HELDOUT_SHOTS, _DIGIT_SETS = 0, 1, 2, 3
DIGIT_SET_TRAIN = 300  # train images per digit-set task: little data each, one shared domain
_TABLE_STREAM = {"wine": 10, "breast_cancer": 11, "diabetes": 12, "iris": 13}
DIGITS = "digits"  # the domain of every task over the 8x8 digit images


def _rng(seed: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images [n, 8, 8], digit labels [n], the shared stratified split) for this seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [n, 8, 8]
    target = np.asarray(bunch.target, dtype=np.int64)  # [n]
    split = split_indices(target.shape[0], _rng(seed, _DIGITS_SPLIT), stratify=target)
    return images, target, split


def _digits_tasks(seed: int) -> list[TaskData]:
    images, target, split = _digits(seed)
    n = target.shape[0]
    flat = images.reshape(n, 64)  # [n, 64]
    rot = _rng(seed, _ROTATION).integers(0, 4, size=n)  # [n] quarter turns per image
    rotated = np.stack([np.rot90(img, k) for img, k in zip(images, rot, strict=True)])  # [n, 8, 8]
    stats = fit_standardizer(flat[split[0]])  # one scaling for the whole domain
    return [
        make_task_data(
            TaskSpec("digits", "multiclass", 64, 10, domain=DIGITS), flat, target, split,
            classes=np.arange(10), x_stats=stats,
        ),
        make_task_data(
            TaskSpec("digits_rotation", "multiclass", 64, 4, domain=DIGITS),
            rotated.reshape(n, 64),
            rot,
            split,
            classes=np.array([0, 90, 180, 270]),  # degrees counter-clockwise
            x_stats=stats,
        ),
        make_task_data(
            TaskSpec("digits_parity", "binary", 64, 1, domain=DIGITS),
            flat,
            (target % 2).astype(np.float32),
            split,
            classes=np.array([0, 1]),  # 1 = odd
            x_stats=stats,
        ),
    ]


def digit_sets(seed: int, n: int) -> list[tuple[int, ...]]:
    """n distinct label functions "the digit is in S" (|S| in 2..5), none equal to a named task's
    (parity, or the held-out "digit >= 5" and its complement)."""
    reserved = {(0, 2, 4, 6, 8), (1, 3, 5, 7, 9), (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)}
    rng, out, seen = _rng(seed, _DIGIT_SETS), [], set(reserved)
    while len(out) < n:
        s = tuple(sorted(rng.choice(10, size=int(rng.integers(2, 6)), replace=False).tolist()))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _digit_set_tasks(seed: int, n: int) -> list[TaskData]:
    """Binary tasks "digit in S" over the digits domain; each trains on DIGIT_SET_TRAIN images
    of the shared train split and is tested on the shared test split."""
    if n == 0:
        return []
    images, target, (train, val, test) = _digits(seed)
    flat = images.reshape(target.shape[0], 64)  # [n, 64]
    stats = fit_standardizer(flat[train])
    rng = _rng(seed, _DIGIT_SETS + 100)
    tasks = []
    for i, s in enumerate(digit_sets(seed, n)):
        label = np.isin(target, s).astype(np.float32)  # [n]
        rows = rng.choice(train, size=min(DIGIT_SET_TRAIN, train.shape[0]), replace=False)
        spec = TaskSpec(f"digitset_{i:03d}", "binary", 64, 1, domain=DIGITS)
        tasks.append(make_task_data(spec, flat, label, (rows, val, test), classes=np.array([0, 1]),
                                    x_stats=stats))
    return tasks


def _table_task(name: str, seed: int) -> TaskData:
    from sklearn import datasets

    loader = {
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)  # [n, d]
    rng = _rng(seed, _TABLE_STREAM[name])
    if name == "diabetes":
        y = np.asarray(bunch.target, dtype=np.float64)[:, None]  # [n, 1]
        split = split_indices(x.shape[0], rng)
        return make_task_data(TaskSpec(name, "regression", x.shape[1], 1), x, y, split)
    target = np.asarray(bunch.target, dtype=np.int64)  # [n]
    classes = np.unique(target)
    split = split_indices(x.shape[0], rng, stratify=target)
    if classes.shape[0] == 2:
        spec = TaskSpec(name, "binary", x.shape[1], 1)
        return make_task_data(spec, x, target.astype(np.float32), split, classes=classes)
    spec = TaskSpec(name, "multiclass", x.shape[1], classes.shape[0])
    return make_task_data(spec, x, np.searchsorted(classes, target), split, classes=classes)


def builtin_tasks(
    seed: int = 0, n_family: int = 16, family_size: int = 600, n_digit_sets: int = 0,
    n_skills: int = 0, skill_size: int = 300,
) -> list[TaskData]:
    """The benchmark, in a fixed order: digits, digits_rotation, digits_parity, wine,
    breast_cancer, diabetes, iris, family_00 .. family_{n_family-1}, then digitset_000 ..
    (label functions over the digits domain) and skill_000 .. (the skills domain, see
    moe.tasks.skills).

    Same seed, same bits. Reads only scikit-learn's bundled files; never downloads.
    """
    tasks = _digits_tasks(seed)
    tasks += [_table_task(name, seed) for name in ("wine", "breast_cancer", "diabetes", "iris")]
    tasks += make_family(n_family, family_size, seed)
    tasks += _digit_set_tasks(seed, n_digit_sets)
    tasks += make_skill_tasks(n_skills, skill_size, seed) if n_skills else []
    return tasks


def heldout_task(seed: int = 0, shots_per_class: int | None = 10) -> TaskData:
    """The transfer task `digits_ge5`: is the digit >= 5 (binary; classes [0, 1], 1 = yes).

    Train holds `shots_per_class` examples of each of the two classes (<5 and >=5), drawn from
    the shared digits train split (None = the whole train split), in random order. Val and test
    are the shared digits val and test splits, which no digits task trains on. Inputs use the
    digits standardiser fitted on the digits train split, so they match what the digits
    adapters saw.
    """
    if shots_per_class is not None and (
        isinstance(shots_per_class, bool)
        or not isinstance(shots_per_class, int | np.integer)
        or shots_per_class < 1
    ):
        raise ValueError(f"shots_per_class must be None or an int >= 1, got {shots_per_class!r}")
    images, target, (train, val, test) = _digits(seed)
    flat = images.reshape(target.shape[0], 64)  # [n, 64]
    label = (target >= 5).astype(np.float32)  # [n]
    stats = fit_standardizer(flat[train])  # the digits standardiser: whole digits train split
    if shots_per_class is not None:
        rng = _rng(seed, _HELDOUT_SHOTS)
        picked = []
        for c in (0.0, 1.0):
            rows = train[label[train] == c]
            if shots_per_class > rows.shape[0]:
                raise ValueError(
                    f"shots_per_class must be <= {rows.shape[0]} (digits train rows of class "
                    f"{int(c)}), got {shots_per_class}"
                )
            picked.append(rng.choice(rows, size=shots_per_class, replace=False))
        train = rng.permutation(np.concatenate(picked))
    spec = TaskSpec("digits_ge5", "binary", 64, 1, domain=DIGITS)
    return make_task_data(
        spec, flat, label, (train, val, test), classes=np.array([0, 1]), x_stats=stats
    )
