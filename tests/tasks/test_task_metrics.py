"""Metrics against sklearn.metrics on random data and on the edge cases the module defines."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error, r2_score

from moe.tasks.metrics import evaluate, primary_metric
from moe.tasks.spec import TASK_KINDS, TaskSpec

pytestmark = pytest.mark.unit


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=40).astype(np.int32)
    m = _no_warnings(evaluate, "multiclass", out, y)
    pred = out.argmax(axis=1)
    assert set(m) == {"accuracy", "macro_f1"}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_class_never_predicted_has_f1_zero():
    # 3 classes in y, class 2 never predicted; class 1 never true.
    y = np.array([0, 0, 2, 2], np.int32)
    out = np.full((4, 3), -5.0, np.float32)
    out[[0, 1, 2], 0] = 5.0  # predicts 0, 0, 0
    out[3, 1] = 5.0  # predicts 1
    m = _no_warnings(evaluate, "multiclass", out, y)
    # By hand: class 0: tp=2, fp=1, fn=0 -> F1 = 4/5; class 1: tp=0 -> 0; class 2: tp=0 -> 0.
    assert m["macro_f1"] == pytest.approx((0.8 + 0 + 0) / 3)
    assert m["accuracy"] == pytest.approx(0.5)
    pred = out.argmax(axis=1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_classes_absent_from_both_y_and_predictions_are_ignored():
    y = np.array([0, 1, 1], np.int32)
    out = np.eye(5, dtype=np.float32)[[0, 1, 1]]  # 5 outputs, only classes 0 and 1 used
    assert _no_warnings(evaluate, "multiclass", out, y)["macro_f1"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_binary_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(30, 1)).astype(np.float32)
    y = rng.integers(0, 2, size=(30, 1)).astype(np.float32)
    m = _no_warnings(evaluate, "binary", out, y)
    pred = (out[:, 0] > 0).astype(int)
    assert set(m) == {"accuracy", "f1"}
    assert m["accuracy"] == pytest.approx(accuracy_score(y[:, 0], pred))
    assert m["f1"] == pytest.approx(f1_score(y[:, 0], pred, zero_division=0))


def test_binary_without_any_positive_has_f1_zero():
    out = -np.ones((4, 1), np.float32)
    y = np.zeros((4, 1), np.float32)
    m = _no_warnings(evaluate, "binary", out, y)
    assert m == {"accuracy": 1.0, "f1": 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(25, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=(25, 4)).astype(np.float32)
    if seed == 0:
        y[:, 3] = 0  # a label that is never true
    m = _no_warnings(evaluate, "multilabel", out, y)
    pred = (out > 0).astype(int)
    assert set(m) == {"f1", "accuracy"}
    assert m["f1"] == pytest.approx(f1_score(y.astype(int), pred, average="micro", zero_division=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(y.astype(int), pred))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("d", [1, 3])
def test_regression_against_sklearn(seed, d):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(30, d)).astype(np.float32)
    out = (y + rng.normal(scale=0.5, size=y.shape)).astype(np.float32)
    m = _no_warnings(evaluate, "regression", out, y)
    assert set(m) == {"r2", "mse"}
    assert m["r2"] == pytest.approx(
        r2_score(y.astype(np.float64), out.astype(np.float64)), rel=1e-6
    )
    assert m["mse"] == pytest.approx(
        mean_squared_error(y.astype(np.float64), out.astype(np.float64)), rel=1e-6
    )


def test_r2_of_a_constant_target_is_one_if_exact_else_zero():
    y = np.full((5, 1), 2.0, np.float32)
    assert _no_warnings(evaluate, "regression", y.copy(), y)["r2"] == 1.0
    out = y + np.array([[0.0], [1.0], [0.0], [0.0], [0.0]], np.float32)
    m = _no_warnings(evaluate, "regression", out, y)
    assert m["r2"] == 0.0
    assert m["mse"] == pytest.approx(0.2)
    assert r2_score(y, out, force_finite=True) == m["r2"]  # sklearn's documented convention
    # mixed outputs: one constant and predicted exactly (1.0), one ordinary
    y2 = np.array([[2.0, 0.0], [2.0, 1.0], [2.0, 2.0]], np.float32)
    o2 = np.array([[2.0, 0.0], [2.0, 1.0], [2.0, 1.0]], np.float32)
    # ordinary column by hand: ss_res = 1, ss_tot = 2 -> 0.5; mean with 1.0 -> 0.75
    assert _no_warnings(evaluate, "regression", o2, y2)["r2"] == pytest.approx(0.75)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_primary_metric_is_the_spec_metric_and_is_reported(kind, request):
    n_out = 1 if kind == "binary" else 3
    assert primary_metric(kind) == TaskSpec("t", kind, 2, n_out).metric
    rng = np.random.default_rng(0)
    out = rng.normal(size=(8, n_out)).astype(np.float32)
    if kind == "multiclass":
        y = rng.integers(0, 3, size=8).astype(np.int32)
    elif kind == "regression":
        y = rng.normal(size=(8, n_out)).astype(np.float32)
    else:
        y = rng.integers(0, 2, size=(8, n_out)).astype(np.float32)
    assert primary_metric(kind) in evaluate(kind, out, y)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="ranking"):
        primary_metric("ranking")
