"""CV^2 with the population variance, and the Switch surrogate, against direct formulas."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.routing.balance import cv_squared, switch_balance

pytestmark = pytest.mark.unit


def test_cv_squared_uses_population_variance():
    v = np.array([1.0, 2.0, 3.0, 6.0])
    value, _ = cv_squared(v)
    assert value == pytest.approx(np.var(v, ddof=0) / np.mean(v) ** 2, rel=1e-12)
    assert value != pytest.approx(np.var(v, ddof=1) / np.mean(v) ** 2, rel=1e-3)


def test_cv_squared_gradient():
    v = np.random.default_rng(0).uniform(0.5, 3.0, size=9)
    _, grad = cv_squared(v)
    assert_close(grad, numerical_grad(lambda: cv_squared(v)[0], v), name="cv2")


def test_cv_squared_degenerate_cases():
    for v in (np.zeros(4), np.ones(1), np.full(5, 2.0)):
        value, grad = cv_squared(v)
        assert value == 0.0 and not grad.any()


def test_switch_balance_is_one_at_uniform():
    E = 8
    f = np.full(E, 1 / E)
    value, grad = switch_balance(f, np.full(E, 1 / E))
    assert value == pytest.approx(1.0)
    np.testing.assert_allclose(grad, E * f)
