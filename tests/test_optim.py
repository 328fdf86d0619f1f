"""Adam against a hand-written reference; lazy (touched-rows) versus dense semantics."""

import dataclasses

import numpy as np
import pytest

from moe.optim import Adam, AdamConfig, clip_scale, lr_at

pytestmark = pytest.mark.unit


def reference_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, scale=1.0):
    """Adam with decoupled weight decay (AdamW: the decay uses the weights before the step)."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = scale * g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p)
    return p


def test_dense_adam_matches_reference():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    params = {"w": p0.copy()}
    opt = Adam(params, AdamConfig())
    for g in grads:
        opt.step({"w": g}, lr=0.01)
    np.testing.assert_allclose(params["w"], reference_adam(p0, grads, 0.01), rtol=1e-12)


def test_lazy_adam_updates_only_touched_rows_with_their_own_step_count():
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(5, 2, 3))
    params = {"w": p0.copy()}
    opt = Adam(params, AdamConfig(), lazy_rows=True)
    g_rows = {0: [], 3: []}
    for rows in ([0, 3], [3], [0, 3], [3]):
        g = rng.normal(size=(5, 2, 3))
        for r in rows:
            g_rows[r].append(g[r])
        opt.step({"w": g}, lr=0.05, rows=np.array(rows))
    np.testing.assert_array_equal(params["w"][[1, 2, 4]], p0[[1, 2, 4]])  # never touched
    assert not opt.m["w"][[1, 2, 4]].any()
    np.testing.assert_array_equal(opt.t, [2, 0, 0, 4, 0])
    for r in (0, 3):  # each touched row is plain Adam over its own steps
        np.testing.assert_allclose(params["w"][r], reference_adam(p0[r], g_rows[r], 0.05), rtol=1e-12)


@pytest.mark.parametrize("wd,scale", [(0.1, 1.0), (0.03, 0.37)])
def test_dense_adam_with_weight_decay_and_grad_scale_matches_reference(wd, scale):
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(7)]
    params = {"w": p0.copy()}
    opt = Adam(params, AdamConfig(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=wd))
    for g in grads:
        opt.step({"w": g}, lr=0.02, scale=scale)
    want = reference_adam(p0, grads, 0.02, b1=0.8, b2=0.99, eps=1e-6, wd=wd, scale=scale)
    np.testing.assert_allclose(params["w"], want, rtol=1e-12)
    no_decay = reference_adam(p0, grads, 0.02, b1=0.8, b2=0.99, eps=1e-6, scale=scale)
    assert np.abs(want - no_decay).max() > 1e-4  # far above the tolerance


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lazy_adam_with_weight_decay_matches_reference_on_both_paths(backend, dtype):
    """Touched rows are AdamW over their own steps; idle rows are not decayed either."""
    from moe import bindings

    if backend == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    rng = np.random.default_rng(6)
    p0 = rng.normal(size=(5, 2, 3)).astype(dtype)
    params = {"w": p0.copy()}
    opt = Adam(params, AdamConfig(weight_decay=0.05), lazy_rows=True)
    g_rows = {0: [], 2: [], 3: []}
    with bindings.use_backend(backend):
        for rows in ([0, 3], [3], [0, 2, 3], [3], [2]):
            g = rng.normal(size=(5, 2, 3)).astype(dtype)
            for r in rows:
                g_rows[r].append(g[r])
            opt.step({"w": g}, lr=0.05, scale=0.5, rows=np.array(rows))
    assert params["w"].dtype == dtype
    np.testing.assert_array_equal(params["w"][[1, 4]], p0[[1, 4]])
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for r, gs in g_rows.items():
        want = reference_adam(p0[r], gs, 0.05, wd=0.05, scale=0.5)
        np.testing.assert_allclose(params["w"][r], want, rtol=tol, atol=tol)


def test_dense_and_lazy_differ_when_an_expert_sits_out():
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=(2, 3))
    g1, g2 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    g2[1] = 0  # expert 1 received no rows in step 2
    dense, lazy = {"w": p0.copy()}, {"w": p0.copy()}
    od, ol = Adam(dense, AdamConfig()), Adam(lazy, AdamConfig(), lazy_rows=True)
    od.step({"w": g1}, 0.1)
    ol.step({"w": g1}, 0.1, rows=np.array([0, 1]))
    od.step({"w": g2}, 0.1)
    ol.step({"w": g2}, 0.1, rows=np.array([0]))
    np.testing.assert_allclose(dense["w"][0], lazy["w"][0], rtol=1e-12)
    assert not np.allclose(dense["w"][1], lazy["w"][1]), "dense Adam keeps moving an idle expert"


def test_adam_float32_stays_float32():
    params = {"w": np.ones((4, 2), dtype=np.float32)}
    opt = Adam(params, AdamConfig(), lazy_rows=True)
    opt.step({"w": np.full((4, 2), 1e-30, dtype=np.float32)}, 0.1, rows=np.array([1]))
    assert params["w"].dtype == np.float32 and opt.m["w"].dtype == np.float32


def test_schedule_and_clipping():
    assert lr_at(0, lr=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at(100, lr=1.0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, lr=1.0, warmup=10, total=100, min_ratio=0.0) == pytest.approx(0.5)
    assert clip_scale(16.0, 2.0) == pytest.approx(0.5)
    assert clip_scale(1.0, 2.0) == 1.0
    with pytest.raises(FloatingPointError):
        clip_scale(float("nan"), 1.0)


def test_schedule_peaks_at_the_end_of_warmup_and_decays_to_a_tenth_by_default():
    assert lr_at(9, lr=2.0, warmup=10, total=100) == lr_at(10, lr=2.0, warmup=10, total=100) == 2.0
    assert lr_at(11, lr=2.0, warmup=10, total=100) < 2.0
    assert lr_at(100, lr=2.0, warmup=10, total=100) == pytest.approx(0.2, rel=1e-12)
    assert lr_at(10**6, lr=2.0, warmup=10, total=100) == pytest.approx(0.2, rel=1e-12)  # stays there
    # one step of decay: the floor right after the peak
    assert lr_at(11, lr=2.0, warmup=10, total=11, min_ratio=0.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_clip_norm_none_or_zero_means_no_clipping(off):
    """train.clip_norm = 0 is documented as "no clipping": the factor is 1 whatever the norm."""
    assert clip_scale(1e6, off) == 1.0


def test_lazy_rows_need_one_leading_axis():
    params = {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}  # two sizes: the smallest mismatch
    with pytest.raises(ValueError) as e:
        Adam(params, AdamConfig(), lazy_rows=True)
    assert str(e.value) == "lazy rows need one leading axis for all params, got sizes {3, 4}"
    Adam({"a": np.zeros((3, 2)), "b": np.zeros(3)}, AdamConfig(), lazy_rows=True)  # same rows: fine
    Adam(params, AdamConfig())  # dense Adam takes any shapes


def test_lazy_and_dense_steps_refuse_the_other_mode_s_call():
    lazy = Adam({"w": np.zeros((3, 2))}, AdamConfig(), lazy_rows=True)
    with pytest.raises(ValueError) as e:
        lazy.step({"w": np.ones((3, 2))}, 0.1)
    assert str(e.value) == "lazy-row Adam needs the rows to update"
    dense = Adam({"w": np.zeros((3, 2))}, AdamConfig())
    with pytest.raises(ValueError) as e:
        dense.step({"w": np.ones((3, 2))}, 0.1, rows=np.array([0]))
    assert str(e.value) == "dense Adam updates every row; rows= is only for lazy mode"


def test_step_counts_in_the_state_one_for_dense_one_per_row_for_lazy():
    """The step counts a checkpoint stores ("dense.t", and "table.<table>.t" int64 [R] per row)."""
    dense = Adam({"w": np.zeros((3, 2))}, AdamConfig())
    for _ in range(3):
        dense.step({"w": np.ones((3, 2))}, 0.1)
    assert dense.state_dict()["t"].tolist() == [3]
    lazy = Adam({"w": np.zeros((3, 2))}, AdamConfig(), lazy_rows=True)
    lazy.step({"w": np.ones((3, 2))}, 0.1, rows=np.array([0, 2]))
    lazy.step({"w": np.ones((3, 2))}, 0.1, rows=np.array([2]))
    assert lazy.state_dict()["t"].tolist() == [1, 0, 2]


def test_adam_config_is_frozen():
    """Configs are values: a step cannot change the optimizer's settings behind its back."""
    c = AdamConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta1 = 0.5
    assert hash(c) == hash(AdamConfig())


@pytest.mark.parametrize(
    "kwargs,message",
    [({"beta1": 1.0}, "adam beta1 must be in [0, 1), got 1.0"), ({"beta2": -0.1}, "adam beta2 must be in [0, 1), got -0.1"),
     ({"eps": 0.0}, "adam eps must be > 0, got 0.0"), ({"eps": -1e-8}, "adam eps must be > 0, got -1e-08"),
     ({"weight_decay": -0.01}, "adam weight_decay must be >= 0, got -0.01")],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError) as e:
        AdamConfig(**kwargs)
    assert str(e.value) == message


def test_config_edges_are_allowed():
    """beta 0 (no momentum) and no weight decay are valid settings, not errors."""
    AdamConfig(beta1=0.0, beta2=0.0, weight_decay=0.0, eps=1e-30)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "team"])
def test_fused_lazy_adam_kernel_equals_the_numpy_path(dtype, parallel):
    from moe import bindings

    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    from moe.bindings import _optim

    saved = _optim._configure(parallel_min_elements=0 if parallel else None)
    try:
        _check_fused_lazy_adam(dtype)
    finally:
        _optim._configure(**saved)


def _check_fused_lazy_adam(dtype):
    from moe import bindings

    rng = np.random.default_rng(3)
    p0 = {"w": rng.normal(size=(9, 3, 4)).astype(dtype), "b": rng.normal(size=(9, 4)).astype(dtype)}
    runs = {}
    for backend in ("numpy", "compiled"):
        params = {n: a.copy() for n, a in p0.items()}
        opt = Adam(params, AdamConfig(weight_decay=0.01), lazy_rows=True)
        steps = np.random.default_rng(4)
        with bindings.use_backend(backend):
            for _ in range(6):
                rows = np.sort(steps.choice(9, size=4, replace=False))
                grads = {n: steps.normal(size=a.shape).astype(dtype) for n, a in p0.items()}
                opt.step(grads, lr=0.01, scale=0.7, rows=rows)
        runs[backend] = (params, opt)
    (pn, on), (pc, oc) = runs["numpy"], runs["compiled"]
    np.testing.assert_array_equal(on.t, oc.t)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for n in p0:
        np.testing.assert_allclose(pc[n], pn[n], rtol=tol, atol=tol)
        np.testing.assert_allclose(oc.m[n], on.m[n], rtol=tol, atol=tol)
        np.testing.assert_allclose(oc.v[n], on.v[n], rtol=tol, atol=tol)
    assert not np.array_equal(pc["w"], p0["w"])
