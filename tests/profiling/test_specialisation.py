"""Task-expert mutual information and overlap against scikit-learn and hand-worked cases."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import mutual_info_score

from moe.profiling.specialisation import mutual_information, overlap

pytestmark = pytest.mark.unit


def test_mutual_information_matches_sklearn_and_decomposes_per_task():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 20, size=(7, 11)) * (rng.random((7, 11)) < 0.6)
    mi, per_task = mutual_information(sp.csr_matrix(m))
    assert mi == pytest.approx(mutual_info_score(None, None, contingency=m), rel=1e-12)
    assert mi == pytest.approx(float(np.sum(m.sum(1) / m.sum() * per_task)), rel=1e-12)


def test_extremes_and_overlap():
    same = np.tile([3, 1, 0, 4], (5, 1))
    assert mutual_information(same)[0] == pytest.approx(0.0, abs=1e-15)
    private = np.eye(4) * 10  # each task its own expert: MI = log 4
    assert mutual_information(private)[0] == pytest.approx(np.log(4))
    assert mutual_information(np.zeros((2, 3)))[0] == 0.0
    m = np.array([[2, 2, 0], [0, 2, 2], [4, 0, 0]])
    np.testing.assert_allclose(overlap(m, [[0, 1], [0, 2], [1, 2], [0, 0]]), [0.5, 0.5, 0.0, 1.0])
