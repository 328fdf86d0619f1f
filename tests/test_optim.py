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
    np.testing.assert_array_equal(opt.state_rows(), [0, 3])  # only touched rows have moments
    m, v = opt.moments("w")
    assert not m[[1, 2, 4]].any() and not v[[1, 2, 4]].any()
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
    assert params["w"].dtype == np.float32 and opt.state_dict()["m.w"].dtype == np.float32


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
    sn, sc = on.state_dict(), oc.state_dict()
    for n in p0:  # the same float operations in the same order: the same bits
        np.testing.assert_array_equal(pc[n], pn[n])
        np.testing.assert_array_equal(sc[f"m.{n}"], sn[f"m.{n}"])
        np.testing.assert_array_equal(sc[f"v.{n}"], sn[f"v.{n}"])
    assert not np.array_equal(pc["w"], p0["w"])


# ----------------------------------------------------------------------------- lazy moment storage
def _lazy(n_rows=6, seed=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(n_rows, 3, 2)).astype(dtype), "b": rng.normal(size=(n_rows, 2)).astype(dtype)}
    return params, Adam(params, AdamConfig(weight_decay=0.01), lazy_rows=True), rng


def test_lazy_adam_allocates_moments_only_for_rows_it_updates():
    params, opt, rng = _lazy()
    assert opt.state_bytes() == 0 and opt.state_rows().size == 0  # built: no moments at all
    row_bytes = 2 * 4 * (3 * 2 + 2)  # m and v of one row of w and b, float32
    for rows, have in (([1, 4], [1, 4]), ([4, 5], [1, 4, 5]), ([1], [1, 4, 5])):
        g = {n: rng.normal(size=p.shape).astype(p.dtype) for n, p in params.items()}
        opt.step(g, 0.01, rows=np.array(rows))
        np.testing.assert_array_equal(opt.state_rows(), have)
        assert opt.state_bytes() == row_bytes * len(have)
    sd = opt.state_dict("x.")
    assert sd["x.m.w"].shape == (3, 3, 2) and sd["x.v.b"].shape == (3, 2)  # absent rows: absent
    np.testing.assert_array_equal(np.flatnonzero(sd["x.t"]), [1, 4, 5])


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_packed_gradients_give_the_bits_of_full_ones(backend):
    from moe import bindings

    if backend == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    (pa, oa, rng), (pb, ob, _) = _lazy(), _lazy()
    with bindings.use_backend(backend):
        for rows in ([0, 2, 5], [2, 3], [0, 5]):
            rows = np.array(rows)
            full = {n: rng.normal(size=p.shape).astype(p.dtype) for n, p in pa.items()}
            oa.step(full, 0.02, 0.5, rows=rows)
            ob.step({n: g[rows].copy() for n, g in full.items()}, 0.02, 0.5, rows=rows, packed=True)
    for n in pa:
        np.testing.assert_array_equal(pa[n], pb[n])
    for k, v in oa.state_dict().items():
        np.testing.assert_array_equal(ob.state_dict()[k], v)


def test_lazy_state_round_trip_continues_like_an_uninterrupted_run():
    (pa, oa, rng), (pb, _, _) = _lazy(), _lazy()
    steps = [(np.array(r), {n: rng.normal(size=p.shape).astype(p.dtype) for n, p in pa.items()})
             for r in ([1, 2], [2], [0, 2, 5], [5])]
    for rows, g in steps[:2]:
        oa.step(g, 0.01, rows=rows)
    sd = {k: v.copy() for k, v in oa.state_dict().items()}
    for n in pb:
        pb[n][...] = pa[n]
    ob = Adam(pb, AdamConfig(weight_decay=0.01), lazy_rows=True)
    ob.load_state_dict(sd)
    np.testing.assert_array_equal(ob.state_rows(), [1, 2])
    for rows, g in steps[2:]:
        oa.step(g, 0.01, rows=rows)
        ob.step(g, 0.01, rows=rows)
    for n in pa:
        np.testing.assert_array_equal(pa[n], pb[n])
    for k, v in oa.state_dict().items():
        np.testing.assert_array_equal(ob.state_dict()[k], v)


def test_lazy_adam_refuses_bad_rows_and_bad_state():
    params, opt, rng = _lazy()
    g = {n: np.zeros_like(p) for n, p in params.items()}
    with pytest.raises(ValueError, match="distinct"):
        opt.step(g, 0.1, rows=np.array([2, 1, 2]))
    with pytest.raises(ValueError, match=r"row ids in \[0, 6\)"):
        opt.step(g, 0.1, rows=np.array([6]))
    with pytest.raises(ValueError, match=r"gradient 'w': expected float32\[2, 3, 2\], got float32\[6, 3, 2\]"):
        opt.step(g, 0.1, rows=np.array([0, 1]), packed=True)
    assert opt.state_rows().size == 0 and not opt.t.any(), "a refused step changes nothing"
    opt.step(g, 0.1, rows=np.array([0, 1]))
    sd = opt.state_dict()
    sd["t"][3] = 1  # claims a third row with state, but the moments hold two
    with pytest.raises(ValueError, match=r"'m.w': expected float32\[3, 3, 2\], got float32\[2, 3, 2\]"):
        opt.load_state_dict(sd)
    sd["t"][3] = -1
    with pytest.raises(ValueError, match="step counts must be >= 0"):
        opt.load_state_dict(sd)


@pytest.mark.kernels
def test_dense_adam_through_the_fused_kernel_gives_the_numpy_bits():
    from moe import bindings

    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    rng = np.random.default_rng(8)
    p0 = {"w": rng.normal(size=(5, 3, 4)).astype(np.float32), "g": rng.normal(size=7).astype(np.float32),
          "view": rng.normal(size=(4, 6)).astype(np.float32)[:, ::2]}  # not contiguous: numpy path
    grads = [{n: rng.normal(size=a.shape).astype(np.float32) for n, a in p0.items()} for _ in range(4)]
    runs = {}
    for backend in ("numpy", "compiled"):
        params = {n: a.copy() for n, a in p0.items()}
        params["view"] = np.zeros((4, 6), np.float32)[:, ::2]
        params["view"][...] = p0["view"]
        assert not params["view"].flags.c_contiguous
        opt = Adam(params, AdamConfig(weight_decay=0.1))
        with bindings.use_backend(backend):
            for g in grads:
                opt.step(g, 0.01, 0.8)
        runs[backend] = (params, opt)
    (pn, on), (pc, oc) = runs["numpy"], runs["compiled"]
    for n in p0:
        np.testing.assert_array_equal(pc[n], pn[n])
        np.testing.assert_array_equal(oc.m[n], on.m[n])
        np.testing.assert_array_equal(oc.v[n], on.v[n])
    assert not np.array_equal(pc["w"], p0["w"])


def test_lazy_moments_growing_over_many_steps_keep_each_row_plain_adam():
    """Rows touched for the first time over many steps (the moments grow block by block):
    every row is still plain Adam over its own steps, and a state round trip (one block)
    continues with the same bits as the grown layout."""
    rng = np.random.default_rng(9)
    p0 = rng.normal(size=(300, 2, 3))
    params = {"w": p0.copy()}
    opt = Adam(params, AdamConfig(), lazy_rows=True)
    seen: dict[int, list[np.ndarray]] = {}
    steps = []
    for i in range(40):
        rows = np.unique(np.concatenate([rng.choice(300, size=9, replace=False), [i % 7]]))
        steps.append((rows, rng.normal(size=(300, 2, 3))))
    for rows, g in steps[:30]:
        opt.step({"w": g}, lr=0.05, rows=rows)
        for r in rows:
            seen.setdefault(int(r), []).append(g[r])
    assert opt.state_rows().size > 150  # grown many times from 16 places
    for r, gs in seen.items():
        np.testing.assert_allclose(params["w"][r], reference_adam(p0[r], gs, 0.05), rtol=1e-12)
    untouched = np.setdiff1d(np.arange(300), list(seen))
    np.testing.assert_array_equal(params["w"][untouched], p0[untouched])
    again = {"w": params["w"].copy()}
    packed = Adam(again, AdamConfig(), lazy_rows=True)
    packed.load_state_dict({k: v.copy() for k, v in opt.state_dict().items()})
    for rows, g in steps[30:]:
        opt.step({"w": g}, lr=0.05, rows=rows)
        packed.step({"w": g}, lr=0.05, rows=rows)
    np.testing.assert_array_equal(again["w"], params["w"])
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(packed.state_dict()[k], v)


# ----------------------------------------------------------------------------- low-rank gradients
def _lowrank(rng, dtype, n_rows=7, a=3, b=5):
    """Gradients of 4 of n_rows rows as sums of 1..4 outer products (one row with u = ones)."""
    from moe.optim import LowRank

    counts = np.array([1, 3, 4, 2])
    starts = np.array([0, 1, 4, 8])
    N = int(starts[-1] + counts[-1]) + 1  # one unused factor row at the end
    u, v = rng.normal(size=(N, a)).astype(dtype), rng.normal(size=(N, b)).astype(dtype)
    return LowRank(u, v, starts, counts, (a, b)), LowRank(None, v, starts, counts, (b,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lowrank_gradients_are_sums_of_outer_products_and_their_norms(dtype):
    from moe import bindings

    w, bias = _lowrank(np.random.default_rng(10), dtype)
    for g in (w, bias):
        want = np.stack([sum(np.outer(np.ones(1) if g.u is None else g.u[s + r], g.v[s + r]).reshape(g.row_shape)
                             for r in range(c)) for s, c in zip(g.starts, g.counts, strict=True)])
        with bindings.use_backend("numpy"):
            got = g.materialize()
        assert got.dtype == dtype and got.shape == (4, *g.row_shape)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
        if bindings.HAVE_COMPILED:  # the same additions in the same order: the same bits
            np.testing.assert_array_equal(g.materialize(), got)
        sq = np.sum(got.reshape(4, -1).astype(np.float64) ** 2, axis=1)
        np.testing.assert_allclose(g.sq_norms(), sq, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_squared_norm_kernels_equal_float64_sums_of_squares(backend, dtype):
    """row_sq_norms and lowrank_sq_norms (the clipping norm's parts) on both paths against
    sums of squares formed in float64 from the built rows: row lengths that are not a
    multiple of the kernel's 8 lanes, a zero row, counts 1 to 8, u None."""
    from moe import bindings

    if backend == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    rng = np.random.default_rng(12)
    with bindings.use_backend(backend):
        for size in (1, 7, 8, 9, 8192 + 3):
            g = rng.normal(size=(5, size)).astype(dtype)
            g[2] = 0
            got = bindings.row_sq_norms(g, np.empty(5))
            np.testing.assert_allclose(got, np.sum(g.astype(np.float64) ** 2, axis=1), rtol=1e-13, atol=0)
            assert got[2] == 0.0
        assert bindings.row_sq_norms(np.zeros((0, 4), dtype), np.empty(0)).shape == (0,)
        counts = np.arange(1, 9)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        N = int(counts.sum())
        u, v = rng.normal(size=(N, 9)).astype(dtype), rng.normal(size=(N, 13)).astype(dtype)
        for uu in (u, None):
            want = [np.sum(sum(np.outer(np.ones(1) if uu is None else uu[s + r].astype(np.float64),
                                        v[s + r].astype(np.float64)) for r in range(c)) ** 2)
                    for s, c in zip(starts, counts, strict=True)]
            got = bindings.lowrank_sq_norms(uu, v, starts, counts, np.empty(8))
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_squared_norm_kernels_refuse_bad_buffers():
    from moe import bindings

    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    from moe.bindings import _optim

    g = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"row_sq_norms: g must be C-contiguous float32/float64 \[n, size\], got int64"):
        _optim.row_sq_norms(np.ones((3, 4), np.int64), np.empty(3))
    with pytest.raises(ValueError, match=r"row_sq_norms: out must be writeable float64 \[3\]"):
        _optim.row_sq_norms(g, np.empty(3, np.float32))
    with pytest.raises(ValueError, match=r"row_sq_norms: g must be C-contiguous"):
        _optim.row_sq_norms(np.ones((4, 3), np.float32).T, np.empty(3))
    v = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"lowrank_sq_norms: out must be writeable float64 \[2\]"):
        _optim.lowrank_sq_norms(None, v, np.array([0, 1]), np.array([1, 3]), np.empty(3))
    with pytest.raises(ValueError, match=r"lowrank_sq_norms: each row needs 1 <= count and start \+ count <= N = 4"):
        _optim.lowrank_sq_norms(None, v, np.array([0, 3]), np.array([1, 2]), np.empty(2))
    with pytest.raises(ValueError, match=r"lowrank_sq_norms: u must be C-contiguous float32 \[N, a\] with N = 4"):
        _optim.lowrank_sq_norms(np.ones((3, 2), np.float32), v, np.array([0]), np.array([1]), np.empty(1))


@pytest.mark.parametrize(("which", "bad"), [(w, b) for w in ("rows", "places", "g_rows") for b in (-1, "bound")]
                         + [("t", -1)])  # t's only upper bound is int64's
def test_the_fused_adam_kernel_refuses_an_index_out_of_range_and_changes_nothing(which, bad):
    from moe import bindings

    if not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    from moe.bindings import _optim

    p, m, v, g = (np.ones((4, 3), np.float32) for _ in range(4))
    m, v, g = m[:3].copy(), v[:3].copy(), g[:2].copy()  # bounds: p 4 rows, m/v 3, g 2
    idx = {"rows": np.array([0, 3]), "places": np.array([2, 0]), "g_rows": np.array([1, 0]), "t": np.array([1, 5])}
    bound = {"rows": 4, "places": 3, "g_rows": 2, "t": None}[which]
    idx[which] = np.array([0, -1 if bad == -1 else bound])
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(ValueError, match=rf"adam_rows: {which} must be in \[0, "):
        _optim.adam_rows(p, m, v, g, idx["rows"], idx["places"], idx["g_rows"], idx["t"], 0.1, 1.0, 0.9, 0.999, 1e-8, 0.0)
    for a, b in zip((p, m, v), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lazy_adam_on_lowrank_gradients_gives_the_bits_of_materialized_ones(backend, dtype):
    from moe import bindings

    if backend == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("compiled kernels not built (MOE_ALLOW_PURE_PYTHON run)")
    rng = np.random.default_rng(11)
    p0 = {"w": rng.normal(size=(7, 3, 5)).astype(dtype), "b": rng.normal(size=(7, 5)).astype(dtype)}
    (pa, pb) = ({n: a.copy() for n, a in p0.items()} for _ in range(2))
    oa, ob = (Adam(p, AdamConfig(weight_decay=0.01), lazy_rows=True) for p in (pa, pb))
    with bindings.use_backend(backend):
        for rows in ([0, 2, 3, 6], [1, 2, 4, 6], [0, 3, 5, 6]):
            w, bias = _lowrank(rng, dtype)
            with bindings.use_backend("numpy"):  # the oracle's own bits
                full = {"w": w.materialize(), "b": bias.materialize()}
            oa.step({"w": w, "b": bias}, 0.02, 0.6, rows=np.array(rows), packed=True)
            ob.step(full, 0.02, 0.6, rows=np.array(rows), packed=True)
    for n in p0:
        np.testing.assert_array_equal(pa[n], pb[n])
        assert not np.array_equal(pa[n], p0[n])
    for k, v in oa.state_dict().items():
        np.testing.assert_array_equal(ob.state_dict()[k], v)


def test_lowrank_gradients_are_checked():
    from moe.optim import LowRank

    params, opt, rng = _lazy()
    u, v = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    good = {"w": LowRank(u, v, np.array([0, 2]), np.array([2, 2]), (3, 2)),
            "b": LowRank(None, v, np.array([0, 2]), np.array([2, 2]), (2,))}
    with pytest.raises(ValueError, match="a LowRank gradient is packed"):
        opt.step(good, 0.1, rows=np.array([1, 3]))
    with pytest.raises(ValueError, match=r"start \+ count <= N = 4"):
        LowRank(u, v, np.array([0, 3]), np.array([2, 2]), (3, 2))
    with pytest.raises(ValueError, match=r"outer products of \[3\] and \[2\] do not give rows of \[4\]"):
        LowRank(u, v, np.array([0, 2]), np.array([2, 2]), (4,))
    with pytest.raises(ValueError, match=r"gradient 'w': expected float32\[2, 3, 2\], got float32\[2, 2, 6\]"):
        opt.step(dict(good, w=LowRank(u, np.ones((4, 4), np.float32), np.array([0, 2]), np.array([2, 2]), (2, 6))),
                 0.1, rows=np.array([1, 3]), packed=True)
    opt.step(good, 0.1, rows=np.array([1, 3]), packed=True)
    np.testing.assert_array_equal(opt.state_rows(), [1, 3])


def test_lowrank_factors_of_the_wrong_shape_are_refused():
    from moe.optim import LowRank

    v = np.zeros((4, 3), np.float32)
    one, four = np.array([0]), np.array([4])
    LowRank(np.zeros((4, 2), np.float32), v, one, four, (2, 3))  # consistent: accepted
    bad = [
        (np.zeros((5, 2), np.float32), v, "must share N and dtype"),  # u has another N
        (np.zeros((4, 2), np.float64), v, "must share N and dtype"),  # another dtype
        (np.zeros((4, 2, 1), np.float32), v, "must share N and dtype"),  # u not 2-D
        (None, np.zeros(4, np.float32), "must share N and dtype"),  # v not 2-D
    ]
    for u, vv, msg in bad:
        with pytest.raises(ValueError, match=msg):
            LowRank(u, vv, one, four, (2, 3) if u is not None else (3,))


def test_packed_gradients_need_lazy_rows_and_dense_state_covers_every_row():
    p = {"w": np.ones((3, 2), np.float32)}
    dense = Adam(p, AdamConfig())
    with pytest.raises(ValueError, match=r"packed gradients need rows= \(lazy mode\)"):
        dense.step({"w": np.ones((3, 2), np.float32)}, 0.1, packed=True)
    assert dense.state_rows().tolist() == [0, 1, 2]
    assert Adam({}, AdamConfig()).state_rows().tolist() == []


def test_lazy_adam_gives_the_same_bits_whatever_its_moment_blocks(monkeypatch):
    """Moments live in blocks (a first one sized for every row when that is small, then a
    quarter more each time): the layout is storage only. With the first block capped at 50
    rows the same steps give the same parameters and state as with one block."""
    rng = np.random.default_rng(11)
    init = {"w": rng.standard_normal((200, 3, 2)).astype(np.float32), "b": rng.standard_normal((200, 2)).astype(np.float32)}
    steps = [np.sort(rng.choice(200, 40, replace=False)) for _ in range(12)]
    grads = [{n: rng.standard_normal(p.shape).astype(np.float32) for n, p in init.items()} for _ in steps]

    def run():
        params = {n: p.copy() for n, p in init.items()}
        opt = Adam(params, AdamConfig(weight_decay=0.01), lazy_rows=True)
        for rows, g in zip(steps, grads, strict=True):
            opt.step(g, 1e-2, 0.5, rows=rows)
        return params, opt

    one_p, one = run()
    row = init["w"][:1].nbytes  # the widest row: 24 bytes
    monkeypatch.setattr(Adam, "FIRST_BLOCK_BYTES", 50 * row + 1)  # room for 50 rows, not 50.04
    many_p, many = run()
    assert len(one._blocks) == 1 and len(many._blocks) > 3 and many._blocks[0][1]["w"].shape[0] == 50
    for n in init:
        assert np.array_equal(one_p[n], many_p[n]), n
    a, b = one.state_dict(), many.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_both_paths_match_the_reference_for_odd_1d_params_and_scaled_gradients(backend):
    """A 1-D parameter of odd length (dense and lazy), gradients scaled by 2 and by 0.5, with
    decay: each path against the hand-written reference."""
    from moe import bindings

    if backend == "compiled" and not bindings.HAVE_COMPILED:
        pytest.fail("the compiled kernels are not built (make test builds them)")
    rng = np.random.default_rng(12)
    for scale in (2.0, 0.5):
        b0, w0 = rng.normal(size=5), rng.normal(size=(3, 5, 2))
        gb, gw = [rng.normal(size=5) for _ in range(3)], [rng.normal(size=(3, 5, 2)) for _ in range(3)]
        dense, lazy = {"b": b0.copy()}, {"w": w0.copy()}
        with bindings.use_backend(backend):
            d, z = Adam(dense, AdamConfig(weight_decay=0.1)), Adam(lazy, AdamConfig(weight_decay=0.1), lazy_rows=True)
            for g1, g2 in zip(gb, gw, strict=True):
                d.step({"b": g1}, 0.01, scale)
                z.step({"w": g2}, 0.01, scale, rows=np.arange(3))
        np.testing.assert_allclose(dense["b"], reference_adam(b0, gb, 0.01, wd=0.1, scale=scale), rtol=1e-12)
        np.testing.assert_allclose(lazy["w"], reference_adam(w0, gw, 0.01, wd=0.1, scale=scale), rtol=1e-12)


def test_lazy_rows_may_come_in_any_order_but_not_twice():
    p = {"w": np.zeros((4, 2))}
    opt = Adam(p, AdamConfig(), lazy_rows=True)
    g = {"w": np.ones((4, 2))}
    opt.step(g, 0.1, rows=np.array([3, 1]))  # distinct, unsorted: fine
    assert opt.state_rows().tolist() == [1, 3]
    for dup in ([1, 1], [2, 0, 2]):
        with pytest.raises(ValueError, match="rows must be distinct"):
            opt.step(g, 0.1, rows=np.array(dup))
    assert Adam({}, AdamConfig(), lazy_rows=True).state_dict()["t"].shape == (0,)


def test_loading_optimizer_state_checks_every_key_and_the_step_counts():
    p = {"w": np.zeros((3, 2))}
    opt = Adam(p, AdamConfig(), lazy_rows=True)
    opt.step({"w": np.ones((3, 2))}, 0.1, rows=np.array([0, 2]))
    good = opt.state_dict()
    with pytest.raises(ValueError, match=r"optimizer state is missing \['m.w', 't', 'v.w'\]"):
        Adam(p, AdamConfig(), lazy_rows=True).load_state_dict({})
    for bad_t in (good["t"].astype(np.int32), good["t"][:2]):  # wrong dtype alone, wrong shape alone
        with pytest.raises(ValueError, match=r"optimizer state 't': expected int64\[3\]"):
            Adam(p, AdamConfig(), lazy_rows=True).load_state_dict({**good, "t": bad_t})
    again = Adam(p, AdamConfig(), lazy_rows=True)
    again.load_state_dict(good)
    assert again.state_rows().tolist() == [0, 2]


def test_the_reference_kernels_refuse_factors_without_a_buffer_and_build_one_row():
    from moe.bindings import reference

    u, v = np.arange(6, dtype=np.float64).reshape(3, 2), np.ones((3, 4))
    out = np.empty((1, 2, 4))
    reference.lowrank_rows(u, v, np.array([1]), np.array([2]), out)  # one row: rows 1 and 2 summed
    np.testing.assert_array_equal(out[0], np.outer(u[1], v[1]) + np.outer(u[2], v[2]))
    assert reference.lowrank_rows(u, v, np.zeros(0, np.int64), np.zeros(0, np.int64), np.empty((0, 2, 4))).shape == (0, 2, 4)
    z = np.zeros
    with pytest.raises(ValueError, match=r"implicit > 0 leaves gradients as factors: pass d_pre"):
        reference.ffn_backward(z((2, 3)), z((2, 3)), np.array([0, 2]), z((1, 3, 4)), z((1, 4, 3)), z((2, 4)),
                               z((2, 4)), "relu", z((0, 3, 4)), z((0, 4)), z((0, 4, 3)), z((0, 3)), implicit=1)
