"""Per-task tables: both compute paths against a per-row reference and finite differences,
and the sparse-gradient contract (only rows in the batch get gradients; the rest stay 0)."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.tables import EmbeddingTable, LinearTable, MLPTable, Runs

pytestmark = pytest.mark.unit


def _runs(rng, n_rows, n_runs):
    rows = rng.choice(n_rows, size=n_runs, replace=False)
    return Runs.of(rows, rng.integers(1, 4, size=n_runs))


@pytest.mark.parametrize("n_runs", [3, 25])  # one matmul per run / one gathered batched product
def test_linear_table_matches_per_row_reference_and_finite_differences(n_runs):
    rng = np.random.default_rng(n_runs)
    R, i, o = 30, 4, 3
    table = LinearTable(rng.normal(size=(R, i, o)), rng.normal(size=(R, o)))
    runs = _runs(rng, R, n_runs)
    x = rng.normal(size=(runs.n, i))
    up = rng.normal(size=(runs.n, o))
    y = table.forward(x, runs)
    rows = runs.per_example()
    ref = np.stack([x[j] @ table.params["w"][r] + table.params["b"][r] for j, r in enumerate(rows)])
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dx = table.backward(up)

    def loss():
        return float(np.sum(table.forward(x, runs) * up))

    grads = {n: g.copy() for n, g in table.grads.items()}
    for n, p in table.params.items():
        assert_close(grads[n], numerical_grad(loss, p), name=n)
    assert_close(dx, numerical_grad(loss, x), name="x")
    untouched = np.setdiff1d(np.arange(R), runs.rows)
    assert not grads["w"][untouched].any() and not grads["b"][untouched].any()
    np.testing.assert_array_equal(table.touched, np.sort(runs.rows))


def test_next_backward_clears_the_previous_rows():
    rng = np.random.default_rng(0)
    table = LinearTable(rng.normal(size=(10, 2, 2)), rng.normal(size=(10, 2)))
    first = Runs.of(np.array([1, 4]), np.array([2, 1]))
    table.forward(rng.normal(size=(3, 2)), first)
    table.backward(rng.normal(size=(3, 2)))
    assert table.grads["w"][[1, 4]].any()
    second = Runs.of(np.array([7]), np.array([2]))
    table.forward(rng.normal(size=(2, 2)), second)
    table.backward(rng.normal(size=(2, 2)))
    assert not table.grads["w"][[1, 4]].any() and table.grads["w"][7].any()
    np.testing.assert_array_equal(table.touched, [7])
    table.zero_grad()
    assert not table.grads["w"].any() and table.touched.size == 0 and table.grad_sq_norm() == 0.0


@pytest.mark.parametrize("n_runs", [2, 20])
def test_mlp_and_embedding_tables_against_finite_differences(n_runs):
    rng = np.random.default_rng(5)
    R, i, h, o = 24, 3, 5, 2
    mlp = MLPTable(LinearTable(rng.normal(size=(R, i, h)), rng.normal(size=(R, h))),
                   LinearTable(rng.normal(size=(R, h, o)), rng.normal(size=(R, o))))
    emb = EmbeddingTable(rng.normal(size=(R, 3)))
    runs = _runs(rng, R, n_runs)
    x = rng.normal(size=(runs.n, i))
    up, up_e = rng.normal(size=(runs.n, o)), rng.normal(size=(runs.n, 3))

    def loss():
        return float(np.sum(mlp.forward(x, runs) * up) + np.sum(emb.forward(runs) * up_e))

    loss()
    mlp.backward(up)
    emb.backward(up_e)
    for table in (mlp, emb):
        grads = {n: g.copy() for n, g in table.grads.items()}
        for n, p in table.params.items():
            assert_close(grads[n], numerical_grad(loss, p), name=n)
    # the squared norm is that of the whole gradient, computed from the touched rows alone
    full = sum(float(np.sum(g**2)) for g in mlp.grads.values())
    assert mlp.grad_sq_norm() == pytest.approx(full, rel=1e-12)


def test_runs_refuse_repeated_rows():
    with pytest.raises(ValueError, match="distinct rows"):
        Runs.of(np.array([3, 3]), np.array([1, 1]))
