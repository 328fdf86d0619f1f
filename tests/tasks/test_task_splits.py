"""Splits are disjoint, deterministic and stratified; the standardiser fits on train only."""

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from moe.tasks.spec import TaskSpec
from moe.tasks.splits import fit_standardizer, make_task_data, split_indices, standardize

pytestmark = pytest.mark.unit


def _check_partition(parts, n):
    allrows = np.concatenate(parts)
    assert allrows.shape[0] == n
    np.testing.assert_array_equal(np.sort(allrows), np.arange(n))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 10, 101, 1000])
def test_split_is_a_partition_with_the_asked_sizes(n):
    tr, va, te = split_indices(n, np.random.default_rng(0))
    _check_partition((tr, va, te), n)
    if n >= 1:
        assert tr.shape[0] >= 1
    if n >= 10:  # sizes within one row of the fractions
        assert abs(va.shape[0] - 0.2 * n) <= 1 and abs(te.shape[0] - 0.2 * n) <= 1


def test_split_is_deterministic_per_generator_and_shuffled():
    a = split_indices(200, np.random.default_rng(7))
    b = split_indices(200, np.random.default_rng(7))
    c = split_indices(200, np.random.default_rng(8))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.all(np.diff(a[0]) > 0)  # random order, not sorted


def test_custom_fractions():
    tr, va, te = split_indices(100, np.random.default_rng(0), fractions=(0.5, 0.5, 0.0))
    assert (tr.shape[0], va.shape[0], te.shape[0]) == (50, 50, 0)


def test_stratified_split_keeps_class_proportions_and_every_class_in_train():
    labels = np.repeat([0, 1, 2, 3], [100, 50, 2, 1])  # class 3 has a single row
    parts = split_indices(labels.shape[0], np.random.default_rng(1), stratify=labels)
    _check_partition(parts, labels.shape[0])
    tr, va, te = parts
    assert set(labels[tr].tolist()) == {0, 1, 2, 3}
    assert np.bincount(labels[va], minlength=4).tolist() == [20, 10, 0, 0]
    assert np.bincount(labels[te], minlength=4).tolist() == [20, 10, 0, 0]


def test_stratified_split_accepts_string_labels():
    labels = np.array(["a", "b"] * 10)
    tr, va, te = split_indices(20, np.random.default_rng(0), stratify=labels)
    for part in (tr, va, te):
        assert set(labels[part].tolist()) == {"a", "b"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fractions": (0.5, 0.3, 0.3)}, "sum to 1"),
        ({"fractions": (0.0, 0.5, 0.5)}, "train > 0"),
        ({"fractions": (1.2, -0.1, -0.1)}, ">= 0"),
        ({"stratify": np.zeros(3)}, "shape \\(10,\\)"),
    ],
)
def test_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_indices(10, np.random.default_rng(0), **kwargs)


def test_split_needs_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        split_indices(10, 0)  # type: ignore[arg-type]


def test_standardizer_matches_sklearn_and_constant_columns_get_std_one():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
    x[:, 2] = 0.1  # constant
    mean, std = fit_standardizer(x)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    ref = StandardScaler().fit(x.astype(np.float64))
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-6)
    np.testing.assert_allclose(std[[0, 1, 3]], ref.scale_[[0, 1, 3]], rtol=1e-6)
    assert std[2] == 1.0
    z = standardize(x, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z[:, 2], 0.0)
    cols = [0, 1, 3]
    np.testing.assert_allclose(z[:, cols], ref.transform(x.astype(np.float64))[:, cols], atol=1e-5)


def test_standardize_checks_shapes():
    with pytest.raises(ValueError, match="x \\[n, 3\\]"):
        standardize(np.zeros((2, 2)), np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        fit_standardizer(np.zeros((0, 2)))


def test_make_task_data_fits_on_train_only():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, size=(40, 3))
    y = rng.normal(-2.0, 4.0, size=(40, 1))
    parts = split_indices(40, rng)
    td = make_task_data(TaskSpec("r", "regression", 3, 1), x, y, parts)
    tr, va, te = parts
    np.testing.assert_allclose(td.mean, x[tr].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(td.std, x[tr].std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(td.y_mean, y[tr].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(td.y_std, y[tr].std(axis=0), rtol=1e-5)
    # val/test are scaled with the train statistics, not their own
    np.testing.assert_allclose(td.x_val * td.std + td.mean, x[va], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(td.unstandardize_targets(td.y_test), y[te], rtol=1e-5, atol=1e-5)
    for a in (td.x_train, td.x_val, td.x_test, td.y_train, td.y_val, td.y_test):
        assert a.dtype == np.float32


def test_make_task_data_refuses_values_beyond_float32():
    x = np.ones((5, 1))
    x[2, 0] = 1e300
    with pytest.raises(ValueError, match="out of float32 range"):
        make_task_data(
            TaskSpec("r", "regression", 1, 1),
            x,
            np.arange(5.0)[:, None],
            split_indices(5, np.random.default_rng(0)),
        )
