"""Compiled gate kernels (moe.bindings._gates) against the numpy oracle (GroupedTopK's numpy path).

Inputs are dyadic (x multiples of 1/4, weights multiples of 1/8), so both paths compute the same
logits to the bit whatever their GEMM's summation order; the routing decisions (integer outputs)
must then be identical, and every float output equal norm-wise: max|ours - oracle| <= rtol *
max|oracle| with rtol 1e-5 (float32) and 1e-12 (float64). The kernels' own bits must not depend
on the thread count. Gradients are checked against finite differences in tests/routing.
"""

import numpy as np
import pytest

from moe import bindings
from moe.routing.gates import GroupedTopK

_gates = pytest.importorskip("moe.bindings._gates")

pytestmark = pytest.mark.kernels

FLOATS = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
FIELDS = ("index", "gates", "importance", "counts", "load", "p_sum", "lse", "dx", "dw_gate", "dw_noise")
EXACT = ("index", "counts")


def case(dt, n, G, P=150, d=6, seed=0, empty_group=False):
    rng = np.random.default_rng(seed)
    x = (rng.integers(-8, 9, size=(P, d)) / 4).astype(dt)
    wg = (rng.integers(-4, 5, size=(G, d, n)) / 8).astype(dt)
    wn = (rng.integers(-4, 5, size=(G, d, n)) / 8).astype(dt)
    share = np.ones(G)
    if empty_group and G > 1:
        share[1] = 0
    sizes = rng.multinomial(P, share / share.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    eps = rng.standard_normal((P, n)).astype(dt)
    return rng, x, wg, wn, offsets, eps


def route(backend, dt, k, n, G, *, noise="train", softmax_clean=False, logsumexp=False, scale=1.0,
          upstream=("importance", "load"), parallel=False, **kw):
    """One forward + backward on `backend`; noise: "train" | "eval" (w_noise, no eps) | "none"."""
    rng, x, wg, wn, offsets, eps = case(dt, n, G, **kw)
    gate = GroupedTopK(k, n)
    saved = _gates._configure(parallel_min_logits=0 if parallel else None)
    try:
        with bindings.use_backend(backend):
            index, gates, sums = gate.forward(
                x, wg, None if noise == "none" else wn, offsets, eps if noise == "train" else None,
                noise_scale=scale, softmax_clean=softmax_clean, logsumexp=logsumexp,
            )
            grads = {"d_importance": rng.standard_normal((G, n)).astype(dt) if "importance" in upstream else None,
                     "d_load": rng.standard_normal((G, n)).astype(dt) if "load" in upstream else None,
                     "d_psum": rng.standard_normal((G, n)).astype(dt) if softmax_clean else None,
                     "d_lse": rng.standard_normal(x.shape[0]).astype(dt) if logsumexp else None}
            dw_gate = np.full_like(wg, 7.0)  # groups without rows must keep this
            dw_noise = None if noise == "none" else np.full_like(wn, 7.0)
            dx = gate.backward(rng.standard_normal((x.shape[0], k)).astype(dt), dw_gate=dw_gate,
                               dw_noise=dw_noise, **grads)
    finally:
        _gates._configure(**saved)
    return {"index": index, "gates": gates, "importance": sums.importance, "counts": sums.counts,
            "load": sums.load, "p_sum": sums.p_sum, "lse": sums.lse, "dx": dx, "dw_gate": dw_gate,
            "dw_noise": dw_noise}


def assert_matches_oracle(ours: dict, want: dict, dt) -> None:
    for f in FIELDS:
        a, b = ours[f], want[f]
        assert (a is None) == (b is None), f"{f}: one path returned None"
        if a is None:
            continue
        assert a.shape == b.shape, f"{f}: shape {a.shape} != {b.shape}"
        if f in EXACT:
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{f} differs"
            continue
        if f in ("gates", "lse", "dx", "dw_gate", "dw_noise"):
            assert a.dtype == np.dtype(dt), f"{f}: dtype {a.dtype}"
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
        err = float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
        assert err <= RTOL[np.dtype(dt)] * scale, f"{f}: max error {err:.3e} vs scale {scale:.3e}"


CONFIGS = [  # (k, n, G, noise, softmax_clean, logsumexp, scale)
    (2, 6, 1, "train", False, False, 1.0),  # the default noisy top-2
    (1, 5, 1, "train", False, True, 1.0),  # noisy k = 1: full-softmax gate, with z-loss
    (3, 9, 3, "train", False, False, 1.0),  # grouped (hierarchical secondary gates)
    (2, 6, 1, "train", False, True, 0.5),  # noise std multiplier
    (4, 4, 1, "train", False, False, 1.0),  # k = n: P = 1, no smooth-load gradient
    (2, 6, 1, "eval", False, True, 1.0),  # a noisy gate in eval mode
    (2, 6, 3, "eval", False, False, 1.0),  # grouped, eval mode: each group's dw_noise is 0
    (2, 7, 1, "none", True, False, 1.0),  # softmax top-2 with the Switch surrogate
    (1, 7, 1, "none", True, True, 1.0),  # top-1: probs double as softmax(clean)
    (2, 64, 2, "train", True, True, 1.0),  # wider rows, every term at once
]


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("k,n,G,noise,sc,lse,scale", CONFIGS)
def test_forward_and_backward_match_the_numpy_oracle(dt, k, n, G, noise, sc, lse, scale):
    want = route("numpy", dt, k, n, G, noise=noise, softmax_clean=sc, logsumexp=lse, scale=scale)
    ours = route("compiled", dt, k, n, G, noise=noise, softmax_clean=sc, logsumexp=lse, scale=scale)
    assert_matches_oracle(ours, want, dt)
    if noise == "train" and k < n:
        assert ours["load"] is not None and not np.allclose(ours["load"], np.round(ours["load"]))


@pytest.mark.parametrize("dt", FLOATS)
def test_an_empty_group_keeps_its_weight_gradients_untouched(dt):
    ours = route("compiled", dt, 2, 5, 4, empty_group=True)
    assert_matches_oracle(ours, route("numpy", dt, 2, 5, 4, empty_group=True), dt)
    assert (ours["counts"][1] == 0).all() and (ours["load"][1] == 0).all()
    assert (ours["dw_gate"][1] == 7.0).all() and (ours["dw_noise"][1] == 7.0).all()
    assert not (ours["dw_gate"][0] == 7.0).any()


@pytest.mark.parametrize("dt", FLOATS)
def test_one_input_feature_with_several_groups(dt):
    """d = 1 with G = 3: w_gate is [3, 1, n], so the number of groups is its first axis only."""
    want = route("numpy", dt, 2, 5, 3, d=1)
    assert_matches_oracle(route("compiled", dt, 2, 5, 3, d=1), want, dt)
    assert want["dw_gate"].shape == (3, 1, 5) and not (want["dw_gate"] == 7.0).any()


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("G", [1, 3])
def test_backward_leaves_its_inputs_unchanged(backend, G):
    """The caller's d_gates (and the upstream sums) are read, never written: the layer reuses them."""
    rng, x, wg, wn, offsets, eps = case(np.float64, 6, G)
    gate = GroupedTopK(2, 6)
    with bindings.use_backend(backend):
        gate.forward(x, wg, wn, offsets, eps)
        d_gates = rng.standard_normal((x.shape[0], 2))
        d_imp, d_load = rng.standard_normal((G, 6)), rng.standard_normal((G, 6))
        kept = d_gates.copy(), d_imp.copy(), d_load.copy()
        gate.backward(d_gates, d_importance=d_imp, d_load=d_load, dw_gate=np.zeros_like(wg),
                      dw_noise=np.zeros_like(wn))
    for a, b in zip((d_gates, d_imp, d_load), kept, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dt", FLOATS)
def test_without_the_balance_gradients(dt):
    for upstream in ((), ("importance",), ("load",)):
        want = route("numpy", dt, 2, 8, 1, upstream=upstream)
        assert_matches_oracle(route("compiled", dt, 2, 8, 1, upstream=upstream), want, dt)


@pytest.mark.parametrize("k,n,G,noise,sc,lse,scale", CONFIGS)
def test_bits_do_not_depend_on_the_thread_count(k, n, G, noise, sc, lse, scale):
    kw = dict(noise=noise, softmax_clean=sc, logsumexp=lse, scale=scale, P=700)
    one = route("compiled", np.float32, k, n, G, **kw)
    par = route("compiled", np.float32, k, n, G, parallel=True, **kw)
    for f in FIELDS:
        assert (one[f] is None and par[f] is None) or np.array_equal(one[f], par[f]), f


def test_large_rows_span_several_blocks_and_match():
    """n = 600 logits a row: blocks of 128 rows, logits in tiles of 64 experts (the last one
    padded), several weight-gradient column chunks."""
    assert _gates.block_rows(600) < 700
    kw = dict(noise="train", logsumexp=True, P=700, d=5)
    want = route("numpy", np.float64, 2, 600, 1, **kw)
    assert_matches_oracle(route("compiled", np.float64, 2, 600, 1, parallel=True, **kw), want, np.float64)


def test_noise_scale_zero_routes_like_the_clean_logits():
    quiet = route("compiled", np.float64, 2, 6, 1, scale=0.0, upstream=("importance",))
    clean = route("compiled", np.float64, 2, 6, 1, noise="eval", upstream=("importance",))
    noisy = route("compiled", np.float64, 2, 6, 1, upstream=("importance",))
    np.testing.assert_array_equal(quiet["index"], clean["index"])
    np.testing.assert_allclose(quiet["gates"], clean["gates"], rtol=1e-15)
    assert not np.array_equal(noisy["index"], clean["index"])


# ----------------------------------------------------------------------------- bad input
def _args(dt=np.float32, P=6, d=3, n=4, G=1):
    rng, x, wg, wn, offsets, eps = case(dt, n, G, P=P, d=d)
    return x, wg, wn, np.array([0, P]), eps


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].astype(np.int64)}, r"x must be float32 or float64 \[P, d\], got int64 \[6, 3\]"),
        (lambda a: {**a, "w_gate": a["w_gate"].astype(np.float64)}, r"w_gate must be float32 \[G, d, n\], got float64"),
        (lambda a: {**a, "w_gate": a["w_gate"][:, :2]}, r"w_gate must be \[G, d = 3, n\]"),
        (lambda a: {**a, "w_noise": a["w_noise"][:, :, :3]}, r"w_noise must be \[1, 3, 4\] like w_gate"),
        (lambda a: {**a, "eps": a["eps"][:5]}, r"eps must be \[P, n\] = \[6, 4\], got float32 \[5, 4\]"),
        (lambda a: {**a, "w_noise": None}, "eps given, but this gate has no w_noise"),
        (lambda a: {**a, "offsets": np.array([0, 5])}, r"offsets must run from 0 to P = 6 rows, got 0 .. 5"),
        (lambda a: {**a, "offsets": np.array([0, 6, 6])}, r"offsets must be an integer array \[G\+1\] = \[2\]"),
        (lambda a: {**a, "k": 5}, r"k must be in \[1, n = 4\], got 5"),
        (lambda a: {**a, "k": 0}, r"k must be in \[1, n = 4\], got 0"),
        (lambda a: {**a, "k": 1.5}, "k must be an integer, got float"),
        (lambda a: {**a, "noise_scale": -1.0}, "noise_scale must be a finite number >= 0, got -1.0"),
    ],
)
def test_forward_rejects_bad_input(change, message):
    x, wg, wn, offsets, eps = _args()
    a = change({"x": x, "w_gate": wg, "w_noise": wn, "offsets": offsets, "eps": eps, "k": 2,
                "noise_scale": 1.0})
    with pytest.raises(ValueError, match=message):
        _gates.forward(a["x"], a["w_gate"], a["w_noise"], a["offsets"], a["eps"], a["k"],
                       noise_scale=a["noise_scale"])


def test_decreasing_offsets_are_rejected():
    x, wg, wn, _, eps = _args(G=2)
    with pytest.raises(ValueError, match=r"offsets must not decrease, got offsets\[0\] = 0 > offsets\[1\] = -1"):
        _gates.forward(x, wg, None, np.array([0, -1, 6]), None, 2)


def test_backward_rejects_bad_input_and_a_second_call():
    x, wg, wn, offsets, eps = _args()
    st = _gates.forward(x, wg, wn, offsets, eps, 2)
    dg = np.ones((6, 2), np.float32)
    dw = np.zeros_like(wg)
    with pytest.raises(ValueError, match=r"d_gates must be float32 \[P, k\] = \[6, 2\], got float32 \[6, 3\]"):
        _gates.backward(st, np.ones((6, 3), np.float32), dw_gate=dw, dw_noise=np.zeros_like(wn))
    with pytest.raises(ValueError, match="d_psum given, but forward did not keep softmax"):
        _gates.backward(st, dg, d_psum=np.ones((1, 4), np.float32), dw_gate=dw, dw_noise=np.zeros_like(wn))
    with pytest.raises(ValueError, match="this gate has w_noise: dw_noise is required"):
        _gates.backward(st, dg, dw_gate=dw)
    with pytest.raises(ValueError, match=r"dw_gate must be a float32 array \[1, 3, 4\], got float64"):
        _gates.backward(st, dg, dw_gate=dw.astype(np.float64), dw_noise=np.zeros_like(wn))
    with pytest.raises(ValueError, match=r"d_load must be float32 \[1, 4\], got float32 \[4\]"):
        _gates.backward(st, dg, d_load=np.ones(4, np.float32), dw_gate=dw, dw_noise=np.zeros_like(wn))
    _gates.backward(st, dg, dw_gate=dw, dw_noise=np.zeros_like(wn))
    with pytest.raises(ValueError, match="gate backward called twice for one forward"):
        _gates.backward(st, dg, dw_gate=dw, dw_noise=np.zeros_like(wn))


def test_grouped_topk_reaches_the_compiled_kernels(monkeypatch):
    x, wg, wn, offsets, eps = _args()
    calls = []
    real = _gates.forward
    monkeypatch.setattr(_gates, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gate = GroupedTopK(2, 4)
    gate.forward(x, wg, wn, offsets, eps)
    assert calls == [1]
    with bindings.use_backend("numpy"):
        gate.forward(x, wg, wn, offsets, eps)
    assert calls == [1], "the numpy backend must not call the kernels"
