"""The compiled path must be live: CI fails when the Cython extensions were not built."""

import os

import numpy as np
import pytest

import moe.bindings as bindings

pytestmark = pytest.mark.kernels


def test_compiled_kernels_are_built():
    if os.environ.get("MOE_ALLOW_PURE_PYTHON") == "1":
        pytest.skip("MOE_ALLOW_PURE_PYTHON=1: the numpy path is allowed")
    assert bindings.HAVE_COMPILED, "moe.bindings._dispatch/_grouped missing: run `pip install -e .`"
    assert bindings.backend() == "compiled"


def test_public_wrappers_reach_the_compiled_kernels():
    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built")
    # the compiled twin rejects what the numpy oracle silently accepts: a proof of which ran
    h = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="k must be <="):
        bindings.topk_rows(h, 4)
    with bindings.use_backend("numpy"):
        assert bindings.topk_rows(h, 4)[0].shape == (2, 3)


def _child_runs_parallel_sized_kernels() -> None:
    """In a forked child: the kernels must finish (one thread) and stay correct."""
    from moe.bindings import _dispatch, _grouped, reference

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, 512)).astype(np.float32)
    src = rng.integers(0, 4096, size=4096).astype(np.int32)
    _dispatch._configure(parallel_min_work=0)  # would take the parallel path without the fork guard
    assert np.array_equal(_dispatch.gather_rows(x, src), x[src])
    _grouped._configure(parallel_min_flops=0)
    w1 = rng.standard_normal((2, 8, 200)).astype(np.float32)
    w2 = rng.standard_normal((2, 200, 8)).astype(np.float32)
    b1, b2 = np.zeros((2, 200), np.float32), np.zeros((2, 8), np.float32)
    packed = rng.standard_normal((700, 8)).astype(np.float32)
    offsets = np.array([0, 650, 700])
    ours = _grouped.ffn_forward(packed, offsets, w1, b1, w2, b2, "gelu")[0]
    want = reference.ffn_forward(packed, offsets, w1, b1, w2, b2, "gelu")[0]
    assert np.abs(ours - want).max() <= 1e-5 * np.abs(want).max()
    from moe.bindings import _optim  # the fused lazy Adam uses prange too

    _optim._configure(parallel_min_elements=0)

    p, m, v = np.ones((64, 300), np.float32), np.zeros((64, 300), np.float32), np.zeros((64, 300), np.float32)
    rows = np.arange(64)
    _optim.adam_rows(p, m, v, np.ones_like(p), rows, rows, rows, np.ones(64, np.int64), 0.1, 1.0, 0.9, 0.999, 1e-8, 0.0)
    assert np.allclose(p, 0.9)


def test_kernels_work_in_a_child_forked_after_parallel_work():
    # GNU OpenMP hangs in a forked child whose parent already ran a parallel region;
    # the kernels must notice the fork and fall back to one thread.
    import multiprocessing

    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built")
    from moe.bindings import _dispatch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 512)).astype(np.float32)
    saved = _dispatch._configure(parallel_min_work=0)
    try:
        _dispatch.gather_rows(x, rng.integers(0, 4096, size=4096).astype(np.int32))  # parallel
        child = multiprocessing.get_context("fork").Process(
            target=_child_runs_parallel_sized_kernels
        )
        child.start()
        child.join(60)
    finally:
        _dispatch._configure(**saved)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("a kernel hung in a forked child")
    assert child.exitcode == 0
