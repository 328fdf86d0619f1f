"""The comparisons: per-task scikit-learn models against a direct fit, and dense configs' sizes."""

import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from moe.baseline import dense_config, sklearn_baseline
from moe.config import Config
from moe.tasks.builtin import builtin_tasks

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tasks():
    return {d.name: d for d in builtin_tasks(seed=0, n_family=3, family_size=90)}


def test_linear_baseline_is_sklearn_fitted_on_the_train_split(tasks):
    wine = tasks["wine"]
    acc = LogisticRegression(max_iter=2000).fit(wine.x_train, wine.y_train).score(wine.x_test, wine.y_test)
    assert sklearn_baseline(wine, "linear")["accuracy"] == pytest.approx(acc)
    dia = tasks["diabetes"]
    r2 = Ridge(alpha=1.0).fit(dia.x_train, dia.y_train[:, 0]).score(dia.x_test, dia.y_test[:, 0])
    assert sklearn_baseline(dia, "linear")["r2"] == pytest.approx(r2, rel=1e-5)
    par = tasks["digits_parity"]
    acc = LogisticRegression(max_iter=2000).fit(par.x_train, par.y_train[:, 0]).score(par.x_test, par.y_test[:, 0])
    assert sklearn_baseline(par, "linear")["accuracy"] == pytest.approx(acc)


def test_best_is_one_of_the_three(tasks):
    t = tasks["family_01"]
    each = [sklearn_baseline(t, w)["accuracy"] for w in ("linear", "forest", "boosting")]
    assert sklearn_baseline(t, "best")["accuracy"] in each
    with pytest.raises(ValueError, match="sklearn model must be one of"):
        sklearn_baseline(t, "svm")


def test_dense_configs_have_the_moe_active_and_total_hidden_units():
    c = Config().model
    active = dense_config(Config(), c.k * c.d_hidden).model
    total = dense_config(Config(), c.n_experts * c.d_hidden).model
    assert (active.n_experts, active.k, active.d_hidden) == (1, 1, 256)
    assert total.d_hidden == 64 * 128 and total.w_importance == total.w_load == 0
