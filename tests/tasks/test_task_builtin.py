"""The built-in benchmark: order, shapes, labels against the raw datasets, and no digits leak."""

import numpy as np
import pytest
from sklearn import datasets

from moe.tasks.builtin import builtin_tasks, heldout_task

pytestmark = pytest.mark.unit

NAMES = ["digits", "digits_rotation", "digits_parity", "wine", "breast_cancer", "diabetes", "iris"]


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in builtin_tasks(seed=0, n_family=3, family_size=60)}


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


def _raw(td, split):
    """Undo the standardiser: the original feature rows of a split, as float64."""
    x = getattr(td, f"x_{split}").astype(np.float64)
    return x * td.std + td.mean


def _digit_rows(td, split, digits, unrotate=None):
    """Index of each split row in load_digits (pixel values are integers 0..16, all images unique)."""
    lookup = {row.tobytes(): i for i, row in enumerate(digits.data.astype(np.uint8))}
    pix = np.rint(_raw(td, split)).astype(np.uint8).reshape(-1, 8, 8)
    if unrotate is not None:
        pix = np.stack([np.rot90(img, -k) for img, k in zip(pix, unrotate, strict=True)])
    return np.array([lookup[img.reshape(64).tobytes()] for img in pix])


def test_order_kinds_and_shapes(tasks):
    assert list(tasks) == NAMES + ["family_00", "family_01", "family_02"]
    expect = {
        "digits": ("multiclass", 64, 10, 1797),
        "digits_rotation": ("multiclass", 64, 4, 1797),
        "digits_parity": ("binary", 64, 1, 1797),
        "wine": ("multiclass", 13, 3, 178),
        "breast_cancer": ("binary", 30, 1, 569),
        "diabetes": ("regression", 10, 1, 442),
        "iris": ("multiclass", 4, 3, 150),
    }
    for name, (kind, n_in, n_out, n) in expect.items():
        td = tasks[name]
        assert (td.spec.kind, td.spec.n_inputs, td.spec.n_outputs) == (kind, n_in, n_out), name
        assert td.x_train.shape[0] + td.x_val.shape[0] + td.x_test.shape[0] == n, name
        assert td.x_train.dtype == np.float32, name
        assert abs(td.x_train.shape[0] - 0.6 * n) <= td.spec.n_outputs + 2, name


def test_train_inputs_are_standardised(tasks):
    # the rotated images are scaled like the others of their domain (the upright train images)
    for name in (n for n in NAMES if n != "digits_rotation"):
        x = tasks[name].x_train.astype(np.float64)
        varying = x.std(axis=0) > 0
        np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(axis=0)[varying], 1, atol=1e-4)


def test_digits_tasks_share_one_domain_and_one_scaling(tasks):
    digit_tasks = [n for n in NAMES if n.startswith("digits")]
    assert {tasks[n].spec.domain for n in digit_tasks} == {"digits"}
    for n in digit_tasks:
        np.testing.assert_array_equal(tasks[n].mean, tasks["digits"].mean)
        np.testing.assert_array_equal(tasks[n].std, tasks["digits"].std)
    assert all(tasks[n].spec.domain is None for n in NAMES if not n.startswith("digits"))


def test_digits_labels_match_the_dataset(tasks, digits):
    for split in ("train", "val", "test"):
        rows = _digit_rows(tasks["digits"], split, digits)
        np.testing.assert_array_equal(getattr(tasks["digits"], f"y_{split}"), digits.target[rows])
        par = tasks["digits_parity"]
        rows_p = _digit_rows(par, split, digits)
        np.testing.assert_array_equal(getattr(par, f"y_{split}")[:, 0], digits.target[rows_p] % 2)
        rot = tasks["digits_rotation"]
        k = getattr(rot, f"y_{split}")
        rows_r = _digit_rows(rot, split, digits, unrotate=k)  # fails if a label is not its rotation
        assert rows_r.shape == k.shape
    assert set(np.unique(tasks["digits_rotation"].y_train).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(tasks["digits_rotation"].classes, [0, 90, 180, 270])


def test_digits_tasks_share_one_split_and_heldout_test_is_unseen(tasks, digits):
    split_of = {}
    for name in ("digits", "digits_parity"):
        split_of[name] = {
            s: set(_digit_rows(tasks[name], s, digits).tolist()) for s in ("train", "val", "test")
        }
    assert split_of["digits"] == split_of["digits_parity"]
    rot = tasks["digits_rotation"]
    rot_train = set(_digit_rows(rot, "train", digits, unrotate=rot.y_train).tolist())
    assert rot_train == split_of["digits"]["train"]
    held = heldout_task(seed=0)
    held_test = set(_digit_rows(held, "test", digits).tolist())
    held_val = set(_digit_rows(held, "val", digits).tolist())
    assert held_test == split_of["digits"]["test"] and held_val == split_of["digits"]["val"]
    assert not held_test & (split_of["digits"]["train"] | rot_train)
    assert set(_digit_rows(held, "train", digits).tolist()) <= split_of["digits"]["train"]


def test_heldout_is_digit_ge5_with_few_shots_and_the_digits_standardiser(tasks, digits):
    held = heldout_task(seed=0, shots_per_class=10)
    assert held.name == "digits_ge5" and held.spec.kind == "binary"
    assert held.y_train.shape == (20, 1)
    assert held.y_train.sum() == 10
    np.testing.assert_array_equal(held.mean, tasks["digits"].mean)
    np.testing.assert_array_equal(held.std, tasks["digits"].std)
    for split in ("train", "val", "test"):
        rows = _digit_rows(held, split, digits)
        np.testing.assert_array_equal(getattr(held, f"y_{split}")[:, 0], digits.target[rows] >= 5)
    full = heldout_task(seed=0, shots_per_class=None)
    assert full.x_train.shape == tasks["digits"].x_train.shape
    with pytest.raises(ValueError, match="shots_per_class must be <="):
        heldout_task(seed=0, shots_per_class=10_000)
    with pytest.raises(ValueError, match="shots_per_class must be None or an int >= 1"):
        heldout_task(seed=0, shots_per_class=0)


def test_heldout_shots_are_deterministic_and_seed_dependent():
    a, b, c = heldout_task(seed=0), heldout_task(seed=0), heldout_task(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def _all_rows(td):
    return np.concatenate([_raw(td, s) for s in ("train", "val", "test")])


@pytest.mark.parametrize(
    "name,loader",
    [
        ("wine", datasets.load_wine),
        ("iris", datasets.load_iris),
        ("breast_cancer", datasets.load_breast_cancer),
    ],
)
def test_classification_tables_match_their_datasets(tasks, name, loader):
    td, bunch = tasks[name], loader()
    ys = [getattr(td, f"y_{s}").reshape(-1).astype(int) for s in ("train", "val", "test")]
    np.testing.assert_array_equal(np.bincount(np.concatenate(ys)), np.bincount(bunch.target))
    for y in ys:  # stratified: every class in every split
        assert set(np.unique(y).tolist()) == set(np.unique(bunch.target).tolist())
    # each standardised row comes back to a row of the dataset with the same label
    rows = _all_rows(td)
    labels = np.concatenate(ys)
    for r, lab in zip(rows[:20], labels[:20], strict=True):
        i = np.argmin(np.abs(bunch.data - r).sum(axis=1))
        np.testing.assert_allclose(bunch.data[i], r, rtol=1e-4, atol=1e-3)
        assert td.classes[lab] == bunch.target[i]


def test_diabetes_targets_come_back_to_the_dataset(tasks):
    td = tasks["diabetes"]
    y = np.concatenate(
        [td.unstandardize_targets(getattr(td, f"y_{s}"))[:, 0] for s in ("train", "val", "test")]
    )
    np.testing.assert_allclose(np.sort(y), np.sort(datasets.load_diabetes().target), rtol=1e-5)
    np.testing.assert_allclose(td.y_train.mean(), 0, atol=1e-5)


def test_same_seed_same_bits_other_seed_other_split(tasks):
    again = {t.name: t for t in builtin_tasks(seed=0, n_family=3, family_size=60)}
    other = {t.name: t for t in builtin_tasks(seed=1, n_family=0)}
    assert list(other) == NAMES
    for name in NAMES:
        assert tasks[name].x_test.tobytes() == again[name].x_test.tobytes()
        assert tasks[name].y_test.tobytes() == again[name].y_test.tobytes()
        assert not np.array_equal(tasks[name].x_test, other[name].x_test)
