"""An expert's routing does not depend on how many experts follow it.

Why: add-task grows experts closed to every other task and promises those tasks the same
bits. BLAS results depend on a GEMM's shape (measured: the first 64 columns of x @ W change
in their last bits when W grows from 68 to 72 columns), so the gates compute logits in
GEMMs of a fixed shape (tiles of LOGIT_TILE experts, the last one zero-padded; blocks of a
fixed number of rows). Oracle: the same rows, restricted to the first 64 experts, routed by
gates of 64 to 300 experts (both paths, train-mode noise and not) give the same bits.
"""

import numpy as np
import pytest

from moe import bindings
from moe.layer import MoELayer
from moe.routing.gates import LOGIT_TILE, GroupedTopK, tiled_matmul

pytestmark = pytest.mark.unit

WIDTHS = (64, 68, 72, 130, 300)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("d", [16, 80])
def test_the_first_experts_route_alike_whatever_the_width(gate_backend, noisy, d):
    rng = np.random.default_rng(3)
    P = 700  # several row blocks
    x = rng.standard_normal((P, d), dtype=np.float32)
    wg = (rng.standard_normal((d, WIDTHS[-1])) * 0.3).astype(np.float32)
    wn = (rng.standard_normal((d, WIDTHS[-1])) * 0.1).astype(np.float32)
    eps = rng.standard_normal((P, WIDTHS[-1]), dtype=np.float32)
    seen = None
    for n in WIDTHS:
        allowed = np.zeros((P, n), dtype=bool)
        allowed[:, :64] = True
        index, gates, _ = GroupedTopK(2, n).forward(
            x, wg[None, :, :n], wn[None, :, :n] if noisy else None, np.array([0, P]),
            eps[:, :n] if noisy else None, allowed=allowed)
        if seen is None:
            seen = index.copy(), gates.copy()
        assert np.array_equal(index, seen[0]) and np.array_equal(gates, seen[1]), n


def test_both_paths_tile_alike():
    if bindings.HAVE_COMPILED:
        from moe.bindings import _gates

        assert _gates.logit_tile() == LOGIT_TILE
        assert len({_gates.block_rows(n) for n in (1, 64, 68, 600, 4096, 65536)}) == 1


def test_tiled_matmul_is_the_matmul_and_tiles_do_not_see_their_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16), dtype=np.float32)
    w = rng.standard_normal((16, 150), dtype=np.float32)
    np.testing.assert_allclose(tiled_matmul(x, w), x @ w, rtol=1e-5, atol=1e-5)
    for n in (LOGIT_TILE + 1, 2 * LOGIT_TILE, 150):  # a column's bits: the same in any width
        assert np.array_equal(tiled_matmul(x, w[:, :n])[:, :LOGIT_TILE + 1], tiled_matmul(x, w[:, :LOGIT_TILE + 1]))


def test_a_layer_keeps_its_outputs_bit_for_bit_when_experts_are_grown(gate_backend):
    rng = np.random.default_rng(1)
    layer = MoELayer(32, 64, 16, k=2, gate="softmax_topk", rng=rng)
    x = rng.standard_normal((700, 32), dtype=np.float32)
    allowed = np.ones((700, 64), dtype=bool)
    before, _ = layer.forward(x, train=False, allowed=allowed)
    for _ in range(3):  # 64 -> 68 -> 72 -> 76: each growth closes the new experts to these rows
        layer.grow_experts(4, rng=rng)
        allowed = np.concatenate([allowed, np.zeros((700, 4), dtype=bool)], axis=1)
        after, _ = layer.forward(x, train=False, allowed=allowed)
        assert np.array_equal(after, before), layer.n_experts
    assert bindings.backend() == gate_backend
