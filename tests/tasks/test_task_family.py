"""The generated family: determinism, measurable shared structure, and learnability."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score

from moe.tasks.family import make_family, make_structure, random_rotation

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def family():
    return make_family(6, 600, seed=0)


def _arrays(td):
    return [td.x_train, td.y_train, td.x_val, td.y_val, td.x_test, td.y_test, td.mean, td.std]


def test_names_kinds_shapes_and_dtypes(family):
    assert [t.name for t in family] == [f"family_{i:02d}" for i in range(6)]
    assert [t.spec.kind for t in family] == ["multiclass", "binary", "regression"] * 2
    for t in family:
        assert t.spec.n_inputs == 16
        assert t.x_train.dtype == np.float32 and t.x_train.shape == (360, 16)
        assert t.x_val.shape == (120, 16) and t.x_test.shape == (120, 16)
        if t.spec.kind == "multiclass":
            assert t.spec.n_outputs == 3 and t.y_train.dtype == np.int32
        else:
            assert t.y_train.dtype == np.float32 and t.y_train.shape == (360, 1)


def test_same_seed_same_bits_and_other_seed_differs(family):
    again = make_family(6, 600, seed=0)
    for a, b in zip(family, again, strict=True):
        assert a.spec == b.spec
        for u, v in zip(_arrays(a), _arrays(b), strict=True):
            assert u.dtype == v.dtype and u.tobytes() == v.tobytes()
    other = make_family(6, 600, seed=1)
    assert not np.array_equal(family[0].x_train, other[0].x_train)


def test_a_task_does_not_depend_on_how_many_tasks_are_made(family):
    fewer = make_family(2, 600, seed=0)
    for a, b in zip(fewer, family[:2], strict=True):
        for u, v in zip(_arrays(a), _arrays(b), strict=True):
            np.testing.assert_array_equal(u, v)


def test_classification_labels_are_balanced_by_train_quantiles(family):
    counts = np.bincount(family[0].y_train, minlength=3)
    assert np.all(np.abs(counts - 120) <= 1)
    assert abs(family[1].y_train.mean() - 0.5) <= 1 / 360


def test_rotation_is_orthogonal():
    q = random_rotation(16, np.random.default_rng(0))
    np.testing.assert_allclose(q @ q.T, np.eye(16), atol=1e-12)


def test_tasks_sharing_features_are_more_correlated_than_disjoint_ones():
    st = make_structure(40, seed=3)
    u = np.random.default_rng(99).standard_normal((8000, st.d))
    corr = np.abs(np.corrcoef(st.scores(u).T))  # [T, T]
    shared, disjoint = [], []
    for i in range(40):
        for j in range(i + 1, 40):
            k = st.shared_features(i, j)
            if k >= 3:
                shared.append(corr[i, j])
            elif k == 0:
                disjoint.append(corr[i, j])
    assert len(shared) >= 20 and len(disjoint) >= 20
    assert np.mean(shared) > np.mean(disjoint) + 0.08


def test_data_follows_the_structure():
    # Undo task 2's scaling and rotation to recover u; its targets must track the structure's score.
    st = make_structure(3, seed=0)
    td = make_family(3, 600, seed=0)[2]
    assert td.spec.kind == "regression"
    x_raw = td.x_train.astype(np.float64) * td.std + td.mean
    u_hat = x_raw @ st.rotations[2]  # x = u R^T + noise  ->  u ~ x R
    score = st.scores(u_hat)[:, 2]
    assert np.corrcoef(score, td.y_train[:, 0])[0, 1] > 0.9
    # another task's score on the same u explains it much less (different subset and weights)
    others = [np.abs(np.corrcoef(st.scores(u_hat)[:, t], td.y_train[:, 0])[0, 1]) for t in (0, 1)]
    assert max(others) < 0.9


def test_a_simple_model_learns_every_task_well_above_chance(family):
    for t in family:
        x, xt = t.x_train, t.x_test
        if t.spec.kind == "regression":
            r2 = r2_score(t.y_test[:, 0], Ridge().fit(x, t.y_train[:, 0]).predict(xt))
            assert r2 > 0.4, t.name
        else:
            y, yt = t.y_train.reshape(-1), t.y_test.reshape(-1)
            acc = LogisticRegression(max_iter=500).fit(x, y).score(xt, yt)
            chance = 1 / 3 if t.spec.kind == "multiclass" else 1 / 2
            assert acc > chance + 0.2, t.name


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_tasks": -1}, "n_tasks"), ({"n_per_task": 5}, "n_per_task"), ({"d": 0}, "d must")],
)
def test_bad_arguments(kwargs, match):
    args = {"n_tasks": 2, "n_per_task": 50, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_family(**args)


def test_zero_tasks_is_an_empty_family():
    assert make_family(0, 50, seed=0) == []
