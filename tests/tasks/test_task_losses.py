"""Losses against sklearn/scipy values, gradients against central finite differences, stability."""

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import log_loss, mean_squared_error

from moe.tasks.losses import loss_and_grad, predict

pytestmark = pytest.mark.unit


def _case(kind, rng, b=6, c=4, dtype=np.float64):
    out = rng.normal(0, 2, size=(b, 1 if kind == "binary" else c)).astype(dtype)
    if kind == "multiclass":
        y = rng.integers(0, c, size=b).astype(np.int32)
    elif kind == "regression":
        y = rng.normal(size=out.shape).astype(np.float32)
    else:
        y = rng.integers(0, 2, size=out.shape).astype(np.float32)
    return out, y


def test_multiclass_matches_sklearn_log_loss():
    rng = np.random.default_rng(0)
    out, y = _case("multiclass", rng, b=20, c=5)
    loss, _ = loss_and_grad("multiclass", out, y)
    assert loss == pytest.approx(log_loss(y, softmax(out, axis=1), labels=range(5)), rel=1e-10)


def test_binary_matches_sklearn_log_loss():
    rng = np.random.default_rng(1)
    out, y = _case("binary", rng, b=30)
    loss, _ = loss_and_grad("binary", out, y)
    assert loss == pytest.approx(log_loss(y[:, 0], expit(out[:, 0]), labels=[0, 1]), rel=1e-10)


def test_multilabel_is_per_label_log_loss_summed_over_labels():
    rng = np.random.default_rng(2)
    out, y = _case("multilabel", rng, b=25, c=3)
    loss, _ = loss_and_grad("multilabel", out, y)
    ref = sum(log_loss(y[:, j], expit(out[:, j]), labels=[0, 1]) for j in range(3))
    assert loss == pytest.approx(ref, rel=1e-10)


def test_regression_is_half_squared_error_summed_over_outputs():
    rng = np.random.default_rng(3)
    out, y = _case("regression", rng, b=10, c=3)
    loss, grad = loss_and_grad("regression", out, y)
    assert loss == pytest.approx(0.5 * 3 * mean_squared_error(y, out), rel=1e-10)
    np.testing.assert_allclose(grad, (out - y) / 10, rtol=1e-12)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
def test_gradient_matches_central_finite_differences(kind):
    rng = np.random.default_rng(4)
    out, y = _case(kind, rng, b=5, c=4)
    _, grad = loss_and_grad(kind, out, y)
    num = np.zeros_like(out)
    h = 1e-6
    for idx in np.ndindex(out.shape):
        plus, minus = out.copy(), out.copy()
        plus[idx] += h
        minus[idx] -= h
        num[idx] = (loss_and_grad(kind, plus, y)[0] - loss_and_grad(kind, minus, y)[0]) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_keeps_the_output_dtype(kind, dtype):
    out, y = _case(kind, np.random.default_rng(5), dtype=dtype)
    loss, grad = loss_and_grad(kind, out, y)
    assert grad.dtype == dtype and grad.shape == out.shape
    assert isinstance(loss, float)


def test_extreme_logits_are_stable_in_float32():
    # Under np.seterr(all="raise") (conftest), any overflow/underflow/invalid would raise here.
    out = np.array([[100.0, -100.0], [-100.0, 100.0]], np.float32)
    loss, grad = loss_and_grad("multiclass", out, np.array([0, 0], np.int32))
    assert loss == pytest.approx((0 + 200) / 2, rel=1e-6)  # -log softmax: 0 and 200 by hand
    np.testing.assert_allclose(grad, [[0, 0], [-0.5, 0.5]], atol=1e-7)

    z = np.array([[100.0], [-100.0], [100.0], [-100.0]], np.float32)
    y = np.array([[1.0], [0.0], [0.0], [1.0]], np.float32)
    loss, grad = loss_and_grad("binary", z, y)
    assert loss == pytest.approx((0 + 0 + 100 + 100) / 4, rel=1e-6)
    np.testing.assert_allclose(grad, [[0], [0], [0.25], [-0.25]], atol=1e-7)
    assert np.all(np.isfinite(grad))

    loss, grad = loss_and_grad("multilabel", z.reshape(2, 2), y.reshape(2, 2))
    assert loss == pytest.approx((0 + 0 + 100 + 100) / 2, rel=1e-6)
    assert grad.dtype == np.float32


def test_bce_is_exact_for_moderate_logits():
    # log(1 + e^-z) for z=0 is log 2; y=1 at z=0 and y=0 at z=0 both give log 2.
    loss, grad = loss_and_grad(
        "binary", np.zeros((2, 1), np.float32), np.array([[1.0], [0.0]], np.float32)
    )
    assert loss == pytest.approx(np.log(2), rel=1e-6)
    np.testing.assert_allclose(grad, [[-0.25], [0.25]], rtol=1e-6)


@pytest.mark.parametrize(
    "kind,out,y,match",
    [
        ("multiclass", np.zeros((3, 2), np.float32), np.array([0, 1, 2]), "in \\[0, 2\\)"),
        ("multiclass", np.zeros((3, 2), np.float32), np.zeros(3, np.float32), "int class ids"),
        ("multiclass", np.zeros((3, 2), np.float32), np.zeros(2, np.int32), "\\[3\\]"),
        ("binary", np.zeros((3, 1), np.float32), np.zeros(3, np.float32), "shape \\(3, 1\\)"),
        ("binary", np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32), "\\[B, 1\\]"),
        ("regression", np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32), "empty batch"),
        ("regression", np.zeros(3, np.float32), np.zeros(3, np.float32), "\\[B, n_outputs\\]"),
        ("regression", np.zeros((3, 1), np.int32), np.zeros((3, 1), np.float32), "float array"),
        ("ranking", np.zeros((3, 1), np.float32), np.zeros((3, 1), np.float32), "ranking"),
    ],
)
def test_bad_inputs_raise_value_errors(kind, out, y, match):
    with pytest.raises(ValueError, match=match):
        loss_and_grad(kind, out, y)


@pytest.mark.parametrize(
    "out,got",
    [(np.zeros((3, 1), np.int32), "int32 (3, 1)"), (np.zeros(3, np.float32), "float32 (3,)"),
     ([[0.0], [1.0]], "list"), (None, "NoneType")],
)
def test_bad_outputs_say_what_came(out, got):
    with pytest.raises(ValueError) as e:
        loss_and_grad("regression", out, np.zeros((2, 1), np.float32))
    assert str(e.value) == f"regression outputs must be a float array [B, n_outputs], got {got}"


def test_predict_per_kind():
    out = np.array([[0.1, 2.0, -1.0], [3.0, -2.0, 0.0]], np.float32)
    p = predict("multiclass", out)
    assert p.dtype == np.int32
    np.testing.assert_array_equal(p, [1, 0])
    p = predict("multilabel", out)
    assert p.dtype == np.float32
    np.testing.assert_array_equal(p, [[1, 1, 0], [1, 0, 0]])  # 0 is not > 0
    np.testing.assert_array_equal(
        predict("binary", np.array([[-0.5], [0.5]], np.float32)), [[0], [1]]
    )
    assert predict("regression", out) is out


def test_predict_refuses_an_unknown_kind():
    from moe.tasks.losses import predict

    with pytest.raises(ValueError, match="kind"):
        predict("ranking", np.zeros((2, 1), np.float32))
