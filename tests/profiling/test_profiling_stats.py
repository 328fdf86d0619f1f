"""LoadProfile / ModelProfile / cv against brute-force oracles written with Python loops."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from moe.profiling import stats
from moe.profiling.stats import LoadProfile, ModelProfile, cv
from moe.routing.types import Routing

pytestmark = pytest.mark.unit


# ---- oracle ----------------------------------------------------------------------------


def oracle(batches, E, T, names):
    """Everything LoadProfile.summary() reports, computed example by example."""
    counts, importance, load = [0] * E, [0.0] * E, [0.0] * E
    G = [[0.0] * E for _ in range(T)]
    C = [[0] * E for _ in range(T)]
    task_examples = [0] * T
    examples = assignments = dropped = 0
    cap_drops = [0] * len(stats.CAPACITY_FACTORS)
    for r, tasks in batches:
        B, k = r.expert_index.shape
        for i, cf in enumerate(stats.CAPACITY_FACTORS):
            cap = math.ceil(cf * B * k / E)
            for e in range(E):
                cap_drops[i] += max(0, int(np.sum(r.expert_index == e)) - cap)
        for e in range(E):
            counts[e] += int(r.counts[e])
            importance[e] += float(r.importance[e])
            load[e] += float(r.load[e])
        dropped += r.dropped
        for b in range(r.expert_index.shape[0]):
            t = int(tasks[b])
            task_examples[t] += 1
            examples += 1
            for j in range(r.expert_index.shape[1]):
                e = int(r.expert_index[b, j])
                G[t][e] += float(r.gates[b, j])
                C[t][e] += 1
                assignments += 1
    basis = load if any(load) else counts
    mean = sum(basis) / E
    per_task = {}
    for t, name in enumerate(names):
        row = G[t]
        ent = float(scipy.stats.entropy(row)) if sum(row) > 0 else 0.0
        top = sorted((e for e in range(E) if row[e] > 0), key=lambda e, row=row: (-row[e], e))[:5]
        mass = sum(row)
        per_task[name] = {"examples": task_examples[t], "entropy": ent, "top_experts": top,
                          "top_shares": [row[e] / mass for e in top],
                          "share": mass / sum(map(sum, G)) if mass else 0.0}
    hot = sorted(range(E), key=lambda e: (-basis[e], e))[:5] if mean else []
    hot_experts = []
    for e in hot:
        col = [C[t][e] for t in range(T)]
        tasks = sorted((t for t in range(T) if col[t] > 0), key=lambda t, col=col: (-col[t], t))[:3]
        hot_experts.append({"expert": e, "over_mean": basis[e] / mean,
                            "tasks": [[names[t], col[t] / sum(col)] for t in tasks]})
    return {
        "n_experts": E,
        "n_tasks": T,
        "examples": examples,
        "assignments": assignments,
        "dropped": dropped,
        "counts": counts,
        "importance": importance,
        "load": load,
        "cv_importance": float(np.std(importance) / np.mean(importance)) if any(importance) else 0.0,
        "cv_load": float(np.std(load) / np.mean(load)) if any(load) else 0.0,
        "max_mean_load": max(basis) / mean if mean else 0.0,
        "drop_rate": dropped / assignments if assignments else 0.0,
        "dead_experts": [e for e in range(E) if counts[e] == 0 and importance[e] == 0],
        "per_task": per_task,
        "hot_experts": hot_experts,
        "drops_by_capacity": [
            {"capacity_factor": cf, "dropped": d, "drop_rate": d / assignments if assignments else 0.0}
            for cf, d in zip(stats.CAPACITY_FACTORS, cap_drops, strict=True)
        ],
        "_G": np.array(G),
        "_C": np.array(C),
    }


def assert_summary_matches(got, want):
    for key in ("n_experts", "n_tasks", "examples", "assignments", "dropped", "counts", "dead_experts"):
        assert got[key] == want[key], key
    for key in ("importance", "load"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12)
    for key in ("cv_importance", "cv_load", "max_mean_load", "drop_rate"):
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    assert list(got["per_task"]) == list(want["per_task"])
    for name, w in want["per_task"].items():
        g = got["per_task"][name]
        assert g["examples"] == w["examples"]
        assert g["entropy"] == pytest.approx(w["entropy"], rel=1e-10, abs=1e-12)
        assert g["top_experts"] == w["top_experts"]
        np.testing.assert_allclose(g["top_shares"], w["top_shares"], rtol=1e-10, atol=1e-12)
        assert g["share"] == pytest.approx(w["share"], rel=1e-10, abs=1e-12)
    assert got["drops_by_capacity"] == want["drops_by_capacity"]
    assert [h["expert"] for h in got["hot_experts"]] == [h["expert"] for h in want["hot_experts"]]
    for g, w in zip(got["hot_experts"], want["hot_experts"], strict=True):
        assert g["over_mean"] == pytest.approx(w["over_mean"], rel=1e-10)
        assert [n for n, _ in g["tasks"]] == [n for n, _ in w["tasks"]]
        np.testing.assert_allclose([v for _, v in g["tasks"]], [v for _, v in w["tasks"]], rtol=1e-12)


def make_batches(make_routing, rng, n, E, T, k=2, B=None):
    out = []
    for _ in range(n):
        b = int(rng.integers(1, 40)) if B is None else B
        out.append((make_routing(rng, b, E, k), rng.integers(0, T, size=b).astype(np.int32)))
    return out


def dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


# ---- cv --------------------------------------------------------------------------------


def test_cv_matches_numpy_population_std():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.gamma(2.0, size=int(rng.integers(2, 50))).astype(np.float32)
        want = np.std(v.astype(np.float64), ddof=0) / np.mean(v.astype(np.float64))
        assert cv(v) == pytest.approx(want, rel=1e-12)
        assert cv(v) != pytest.approx(np.std(v.astype(np.float64), ddof=1) / np.mean(v.astype(np.float64)), rel=1e-6)


def test_cv_hand_examples():
    # [1,2,3,4]: mean 5/2, population variance 5/4 -> cv = sqrt(5/4) / (5/2) = 1/sqrt(5)
    assert cv(np.array([1, 2, 3, 4], dtype=np.float32)) == pytest.approx(1 / math.sqrt(5), rel=1e-12)
    # one-hot over E experts: cv = sqrt(E - 1)
    assert cv(np.array([0.0, 0.0, 4.0])) == pytest.approx(math.sqrt(2), rel=1e-12)
    assert cv(np.full(7, 3.0, dtype=np.float32)) == 0.0
    assert cv(np.zeros(5, dtype=np.float32)) == 0.0  # documented: all-zero -> 0.0
    assert isinstance(cv(np.array([1.0, 2.0])), float)


@pytest.mark.parametrize(
    ("values", "exc", "match"),
    [
        (np.array([]), ValueError, "non-empty 1-D"),
        (np.ones((2, 2)), ValueError, "non-empty 1-D"),
        (np.array([1.0, np.nan]), ValueError, "finite"),
        (np.array([True, False]), TypeError, "real numbers"),
        (np.array([-1.0, 1.0]), ValueError, "mean is 0"),
    ],
)
def test_cv_rejects_bad_input(values, exc, match):
    with pytest.raises(exc, match=match):
        cv(values)


# ---- LoadProfile against the oracle -----------------------------------------------------


@pytest.mark.parametrize("sparse_threshold", [4096, 0])
def test_load_profile_matches_bruteforce_oracle(make_routing, sparse_threshold):
    rng = np.random.default_rng(1)
    E, T = 24, 4
    names = ["wine", "iris", "digits", "mnist"]
    batches = make_batches(make_routing, rng, 6, E, T, k=3)
    p = LoadProfile(E, T, names, sparse_threshold=sparse_threshold)
    assert p.sparse == (sparse_threshold == 0)
    for r, tasks in batches:
        p.add(r, tasks)
    want = oracle(batches, E, T, names)
    got = p.summary()
    assert_summary_matches(got, want)
    assert want["dead_experts"], "the skewed generator should leave some experts dead"
    np.testing.assert_allclose(dense(p.task_expert_matrix("gates")), want["_G"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dense(p.task_expert_matrix("counts")), want["_C"])
    assert dense(p.task_expert_matrix("counts")).sum() == got["assignments"]
    json.dumps(got, allow_nan=False)  # JSON-safe


def test_dense_and_sparse_paths_agree_with_many_flushes(make_routing, monkeypatch):
    monkeypatch.setattr(stats, "_FLUSH_TRIPLETS", 16)  # flush into CSR many times
    rng = np.random.default_rng(2)
    E, T = 50, 3
    batches = make_batches(make_routing, rng, 12, E, T, k=2)
    d, s = LoadProfile(E, T), LoadProfile(E, T, sparse_threshold=10)
    for r, tasks in batches:
        d.add(r, tasks)
        s.add(r, tasks)
    assert not d.sparse and s.sparse
    assert isinstance(s.task_expert_matrix("gates"), sp.csr_matrix)
    assert isinstance(d.task_expert_matrix("gates"), np.ndarray)
    for kind in ("gates", "counts"):
        np.testing.assert_allclose(dense(s.task_expert_matrix(kind)), d.task_expert_matrix(kind), rtol=1e-12)
    assert_summary_matches(s.summary(), d.summary())


def test_dtypes_of_matrices_and_accumulators(make_routing):
    rng = np.random.default_rng(3)
    r = make_routing(rng, 10, 8, 2)
    assert r.gates.dtype == np.float32 and r.expert_index.dtype == np.int32
    for threshold in (4096, 0):
        p = LoadProfile(8, 2, sparse_threshold=threshold)
        p.add(r, np.zeros(10, dtype=np.int64))
        assert p.task_expert_matrix("gates").dtype == np.float64
        assert p.task_expert_matrix("counts").dtype == np.int64
    assert p.importance.dtype == np.float64 and p.counts.dtype == np.int64


def test_entropy_and_top_experts_hand_example():
    # task 0 spreads equal gate mass over experts 1,3,5,7 -> ln 4; task 1 uses only expert 2 -> 0
    index = np.array([[1, 3], [5, 7], [2, 0]], dtype=np.int32)
    gates = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], dtype=np.float32)
    E = 8
    r = Routing(index, gates, np.zeros(E, np.float32), np.zeros(E, np.float32),
                np.bincount(index.ravel(), minlength=E).astype(np.int32), 1, 0.0)
    p = LoadProfile(E, 3, ["a", "b", "c"])
    p.add(r, np.array([0, 0, 1]))
    per = p.summary()["per_task"]
    assert per["a"]["entropy"] == pytest.approx(math.log(4), rel=1e-12)
    assert per["a"]["top_experts"] == [1, 3, 5, 7]  # equal mass: lower id first
    assert per["a"]["top_shares"] == pytest.approx([0.25] * 4, rel=1e-12)
    assert per["a"]["share"] == pytest.approx(2 / 3, rel=1e-12)  # gate mass 2 of 3
    # expert 0 had gate 0; MI is over assignments: p(e) = 1/6 on experts 0,1,2,3,5,7
    assert per["b"] == {"examples": 1, "entropy": 0.0, "top_experts": [2], "top_shares": [1.0], "share": 1 / 3,
                        "mutual_information": pytest.approx(math.log(3), rel=1e-12)}
    assert per["c"] == {"examples": 0, "entropy": 0.0, "top_experts": [], "top_shares": [], "share": 0.0,
                        "mutual_information": 0.0}
    assert per["a"]["mutual_information"] == pytest.approx(math.log(1.5), rel=1e-12)
    s = p.summary()
    assert s["mutual_information"] == pytest.approx(4 / 6 * math.log(1.5) + 2 / 6 * math.log(3), rel=1e-12)
    # hot experts from counts (load is all 0): six experts at 1 / 0.75, lowest ids first; expert 0
    # was chosen (gate 0) only by task b
    assert [h["expert"] for h in s["hot_experts"]] == [0, 1, 2, 3, 5]
    assert s["hot_experts"][0] == {"expert": 0, "over_mean": pytest.approx(4 / 3), "tasks": [["b", 1.0]]}
    assert s["drop_rate"] == pytest.approx(1 / 6)
    # load all zero -> max/mean from counts: counts [1,1,1,1,0,1,0,1], mean 6/8 -> 1 / 0.75
    assert s["max_mean_load"] == pytest.approx(4 / 3)
    assert s["dead_experts"] == [4, 6]
    assert s["cv_load"] == 0.0 and s["cv_importance"] == 0.0


def test_drops_by_capacity_hand_example():
    # B=4, k=1, E=2, every example on expert 0: C = ceil(cf * 4 / 2) = 2, 3, 3, 4 -> drops 2, 1, 1, 0
    E = 2
    index = np.zeros((4, 1), dtype=np.int32)
    r = Routing(index, np.ones((4, 1), np.float32), np.array([4, 0], np.float32), np.array([4, 0], np.float32),
                np.array([4, 0], np.int32), 0, 0.0)
    p = LoadProfile(E, 1)
    p.add(r, np.zeros(4, dtype=np.int64))
    p.add(r, np.zeros(4, dtype=np.int64))  # per batch, then summed
    got = p.summary()["drops_by_capacity"]
    assert [d["capacity_factor"] for d in got] == list(stats.CAPACITY_FACTORS) == [1.0, 1.25, 1.5, 2.0]
    assert [d["dropped"] for d in got] == [4, 2, 2, 0]
    assert [d["drop_rate"] for d in got] == [0.5, 0.25, 0.25, 0.0]


def test_empty_profile_summary_is_json_safe():
    s = LoadProfile(4, 2).summary()
    assert s["examples"] == 0 and s["drop_rate"] == 0.0 and s["max_mean_load"] == 0.0
    assert s["dead_experts"] == [0, 1, 2, 3]
    assert list(s["per_task"]) == ["task0", "task1"]
    json.dumps(s, allow_nan=False)


# ---- merge and JSON ---------------------------------------------------------------------


@pytest.mark.parametrize(("t1", "t2"), [(4096, 4096), (0, 0), (0, 4096), (4096, 0)])
def test_merge_equals_adding_everything_to_one_profile(make_routing, t1, t2):
    rng = np.random.default_rng(4)
    E, T = 20, 3
    batches = make_batches(make_routing, rng, 8, E, T)
    whole, a, b = LoadProfile(E, T), LoadProfile(E, T, sparse_threshold=t1), LoadProfile(E, T, sparse_threshold=t2)
    for i, (r, tasks) in enumerate(batches):
        whole.add(r, tasks)
        (a if i % 3 else b).add(r, tasks)
    assert a.merge(b) is a
    assert_summary_matches(a.summary(), oracle(batches, E, T, whole.task_names))
    for kind in ("gates", "counts"):
        np.testing.assert_allclose(dense(a.task_expert_matrix(kind)), dense(whole.task_expert_matrix(kind)), rtol=1e-12)


def test_merge_rejects_mismatched_profiles():
    with pytest.raises(ValueError, match="10 experts .* into one over 8 experts"):
        LoadProfile(8, 2).merge(LoadProfile(10, 2))
    with pytest.raises(ValueError, match="different task names"):
        LoadProfile(8, 2, ["a", "b"]).merge(LoadProfile(8, 2, ["a", "c"]))
    with pytest.raises(TypeError, match="LoadProfile"):
        LoadProfile(8, 2).merge({"n_experts": 8})


@pytest.mark.parametrize("sparse_threshold", [4096, 0])
def test_json_round_trip_is_exact(make_routing, sparse_threshold):
    rng = np.random.default_rng(5)
    E, T = 16, 3
    p = LoadProfile(E, T, ["x", "y", "z"], sparse_threshold=sparse_threshold)
    for r, tasks in make_batches(make_routing, rng, 5, E, T):
        p.add(r, tasks)
    text = json.dumps(p.to_dict(), allow_nan=False)
    q = LoadProfile.from_dict(json.loads(text))
    assert q.sparse == p.sparse and q.task_names == p.task_names
    assert q.summary() == p.summary()  # bit-exact floats through JSON
    for kind in ("gates", "counts"):
        np.testing.assert_array_equal(dense(q.task_expert_matrix(kind)), dense(p.task_expert_matrix(kind)))
    r, tasks = make_batches(make_routing, rng, 1, E, T)[0]
    p.add(r, tasks)
    q.add(r, tasks)  # a re-read profile keeps accumulating
    assert q.summary() == p.summary()


def test_from_dict_rejects_corrupt_documents(make_routing):
    rng = np.random.default_rng(6)
    p = LoadProfile(6, 2, sparse_threshold=0)
    r, tasks = make_batches(make_routing, rng, 1, 6, 2)[0]
    p.add(r, tasks)
    good = json.loads(json.dumps(p.to_dict()))
    with pytest.raises(ValueError, match="format must be"):
        LoadProfile.from_dict({**good, "format": "other/1"})
    with pytest.raises(ValueError, match="missing"):
        LoadProfile.from_dict({k: v for k, v in good.items() if k != "load"})
    with pytest.raises(ValueError, match="'counts' must have 6 entries"):
        LoadProfile.from_dict({**good, "counts": [0] * 5})
    bad_csr = json.loads(json.dumps(good))
    bad_csr["task_expert"]["gates"]["indptr"] = [0, 1]
    with pytest.raises(ValueError, match="indptr"):
        LoadProfile.from_dict(bad_csr)
    bad_col = json.loads(json.dumps(good))
    bad_col["task_expert"]["counts"]["indices"][0] = 99
    with pytest.raises(ValueError, match=r"column indices must be in \[0, 6\)"):
        LoadProfile.from_dict(bad_col)
    with pytest.raises(ValueError, match="JSON object"):
        LoadProfile.from_dict([1, 2])
    with pytest.raises(ValueError, match="totals disagree"):
        LoadProfile.from_dict({**good, "assignments": good["assignments"] + 1})
    with pytest.raises(ValueError, match="totals disagree"):
        LoadProfile.from_dict({**good, "examples": good["examples"] + 1})
    negative = json.loads(json.dumps(good))
    negative["task_expert"]["counts"]["data"][0] = -1
    with pytest.raises(ValueError, match="counts must be >= 0"):
        LoadProfile.from_dict(negative)


# ---- large E ----------------------------------------------------------------------------


def test_sixty_five_thousand_experts(make_routing):
    rng = np.random.default_rng(7)
    E, T, B, k = 65_536, 8, 3000, 2
    p = LoadProfile(E, T)
    assert p.sparse  # > 4096 experts
    seen = []
    for _ in range(2):
        r = make_routing(rng, B, E, k, skew=0.25)
        tasks = rng.integers(0, T, size=B)
        p.add(r, tasks)
        seen.append((r, tasks))
    pairs = defaultdict(float)
    hits = defaultdict(int)
    for r, tasks in seen:  # brute-force oracle over (task, expert) pairs
        for b in range(B):
            for j in range(k):
                key = (int(tasks[b]), int(r.expert_index[b, j]))
                pairs[key] += float(r.gates[b, j])
                hits[key] += 1
    g, c = p.task_expert_matrix("gates"), p.task_expert_matrix("counts")
    assert isinstance(g, sp.csr_matrix) and c.nnz == len(hits)
    for (t, e), v in list(pairs.items())[:500]:
        assert g[t, e] == pytest.approx(v, rel=1e-12)
        assert c[t, e] == hits[(t, e)]
    s = p.summary()
    assert len(s["counts"]) == E and s["assignments"] == 2 * B * k
    assert sum(s["counts"]) == 2 * B * k - s["dropped"]
    assert s["dead_experts"] == np.flatnonzero((p.counts == 0) & (p.importance == 0)).tolist()


# ---- bad input --------------------------------------------------------------------------


def _routing(E=6, B=3, k=2, **override):
    fields = dict(
        expert_index=np.tile(np.arange(k, dtype=np.int32), (B, 1)),
        gates=np.full((B, k), 1.0 / k, dtype=np.float32),
        importance=np.zeros(E, np.float32),
        load=np.zeros(E, np.float32),
        counts=np.zeros(E, np.int32),
        dropped=0,
        aux_loss=0.0,
    )
    fields.update(override)
    return Routing(**fields)


@pytest.mark.parametrize(
    ("routing", "tasks", "exc", "match"),
    [
        (_routing(E=7, importance=np.zeros(7, np.float32), load=np.zeros(7, np.float32), counts=np.zeros(7, np.int32)),
         np.zeros(3, int), ValueError, r"routing.importance must have shape \(6,\) for this 6-expert profile, got \(7,\)"),
        (_routing(), np.zeros(4, int), ValueError, r"task_ids must have shape \(3,\) to match the batch, got \(4,\)"),
        (_routing(), np.array([0, 1, 2]), ValueError, r"task_ids must be in \[0, 2\), got values in \[0, 2\]"),
        (_routing(), np.array([0, -1, 0]), ValueError, r"task_ids must be in \[0, 2\)"),
        (_routing(), np.zeros(3, np.float32), TypeError, "task_ids must be an integer array, got dtype float32"),
        (_routing(expert_index=np.array([[0, 6]] * 3, np.int32)), np.zeros(3, int), ValueError,
         r"expert_index must be in \[0, 6\), got values in \[0, 6\]"),
        (_routing(expert_index=np.zeros((3, 2), np.float32)), np.zeros(3, int), TypeError, "integer array"),
        (_routing(expert_index=np.zeros(3, np.int32)), np.zeros(3, int), ValueError, r"2-D \[B, k\]"),
        (_routing(gates=np.ones((3, 1), np.float32)), np.zeros(3, int), ValueError, "gates must have expert_index's shape"),
        (_routing(gates=np.full((3, 2), -0.5, np.float32)), np.zeros(3, int), ValueError, "gates must be finite and >= 0"),
        (_routing(gates=np.full((3, 2), np.nan, np.float32)), np.zeros(3, int), ValueError, "gates must be finite"),
        (_routing(load=np.full(6, np.inf, np.float32)), np.zeros(3, int), ValueError, "load must be finite"),
        (_routing(counts=np.zeros(6, np.float32)), np.zeros(3, int), TypeError, "counts must be an integer array"),
        (_routing(dropped=7), np.zeros(3, int), ValueError, r"dropped must be in \[0, 6\] for a \[3, 2\] batch, got 7"),
        ((1, 2, 3), np.zeros(3, int), TypeError, "expects a moe.routing.Routing, got tuple"),
    ],
)
def test_add_rejects_bad_input_and_changes_nothing(routing, tasks, exc, match):
    p = LoadProfile(6, 2)
    p.add(_routing(), np.array([0, 1, 1]))
    before = json.dumps(p.to_dict())
    with pytest.raises(exc, match=match):
        p.add(routing, tasks)
    assert json.dumps(p.to_dict()) == before


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((0, 2), {}, ValueError, "n_experts must be >= 1, got 0"),
        ((4, 0), {}, ValueError, "n_tasks must be >= 1, got 0"),
        ((4.0, 2), {}, TypeError, "n_experts must be an int, got float"),
        ((4, 2, ["a"]), {}, ValueError, "must name all 2 tasks, got 1"),
        ((4, 2, ["a", "a"]), {}, ValueError, "unique"),
        ((4, 1, "a"), {}, TypeError, "single str"),
        ((4, 2), {"sparse_threshold": -1}, ValueError, "sparse_threshold must be >= 0"),
    ],
)
def test_constructor_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoadProfile(*args, **kwargs)


def test_task_expert_matrix_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'gates' or 'counts', got 'load'"):
        LoadProfile(4, 1).task_expert_matrix("load")


# ---- ModelProfile -----------------------------------------------------------------------


def test_model_profile_layers_and_headline(make_routing):
    rng = np.random.default_rng(8)
    T = 3
    m = ModelProfile(T, ["a", "b", "c"])
    singles = {"block0": LoadProfile(16, T, ["a", "b", "c"]), "block1": LoadProfile(40, T, ["a", "b", "c"])}
    for _ in range(4):
        for name, E, drop in (("block0", 16, 0.05), ("block1", 40, 0.4)):
            B = int(rng.integers(5, 30))
            r, tasks = make_routing(rng, B, E, 2, drop_p=drop), rng.integers(0, T, size=B)
            m.add(name, r, tasks)
            singles[name].add(r, tasks)
    s = m.summary()
    assert s["n_layers"] == 2 and list(s["layers"]) == ["block0", "block1"]
    for name, single in singles.items():
        assert s["layers"][name] == single.summary()
    h = s["headline"]
    for metric in ("cv_load", "cv_importance", "max_mean_load", "drop_rate"):
        values = {name: s["layers"][name][metric] for name in singles}
        worst = max(values, key=values.get)
        assert h[metric] == values[worst] and h["layer_of"][metric] == worst
    assert h["worst_layer"] == h["layer_of"]["cv_load"]
    assert h["layer_of"]["drop_rate"] == "block1"  # 40% vs 5% dropped
    assert h["dead_experts"] == sum(len(x["dead_experts"]) for x in s["layers"].values())
    json.dumps(s, allow_nan=False)
    again = ModelProfile.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.summary() == s
    merged = ModelProfile(T, ["a", "b", "c"]).merge(m).merge(again)
    assert merged.summary()["layers"]["block1"]["examples"] == 2 * s["layers"]["block1"]["examples"]
    assert m.summary() == s  # merging m into another profile left m untouched


def test_model_profile_rejects_bad_input(make_routing):
    rng = np.random.default_rng(9)
    m = ModelProfile(2)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 2\)"):
        m.add("block0", make_routing(rng, 4, 8, 2), np.full(4, 5))
    assert m.layers == {}  # a rejected first batch does not register the layer
    m.add("block0", make_routing(rng, 4, 8, 2), np.zeros(4, int))
    with pytest.raises(ValueError, match="8-expert profile, got \\(9,\\)"):
        m.add("block0", make_routing(rng, 4, 9, 2), np.zeros(4, int))
    with pytest.raises(TypeError, match="layer name"):
        m.add("", make_routing(rng, 4, 8, 2), np.zeros(4, int))
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        m.layer("nope")
    with pytest.raises(ValueError, match="has 8 experts, got 16"):
        m.layer("block0", 16)
    assert ModelProfile(2).summary()["headline"]["worst_layer"] is None


@pytest.mark.parametrize("gate,k", [("softmax_topk", 2), ("top1", 1), ("noisy_topk", 2)])
def test_drops_by_capacity_equal_what_a_layer_with_that_factor_drops(gate, k):
    """Oracle: the layer itself. The same gate weights with capacity_factor=cf drop exactly
    what the profile of the dropless layer predicts for cf."""
    from moe.layer import MoELayer

    d, E, B = 8, 6, 50
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, d), dtype=np.float32)
    skew = (rng.standard_normal((d, E)) * 2.0).astype(np.float32)  # a router with favourites
    dropless = MoELayer(d, E, 8, k=k, gate=gate, capacity_factor=None, rng=np.random.default_rng(0))
    dropless.params["gate.w_gate"][...] = skew
    p = LoadProfile(E, 1)
    _, r = dropless.forward(x, train=False)
    p.add(r, np.zeros(B, dtype=np.int64))
    predicted = p.summary()["drops_by_capacity"]
    assert any(row["dropped"] > 0 for row in predicted)  # the case is not trivial
    for row in predicted:
        layer = MoELayer(d, E, 8, k=k, gate=gate, capacity_factor=row["capacity_factor"], rng=np.random.default_rng(0))
        layer.params["gate.w_gate"][...] = skew
        _, routed = layer.forward(x, train=False)
        np.testing.assert_array_equal(routed.expert_index, r.expert_index)
        assert routed.dropped == row["dropped"], row


def test_model_profile_context_travels_and_guards_merges(make_routing):
    rng = np.random.default_rng(8)
    ctx = {"split": "test", "noise": False, "noise_seed": None}
    m = ModelProfile(2, ["a", "b"], context=ctx)
    m.add("block0", make_routing(rng, 20, 6, 2), rng.integers(0, 2, size=20))
    assert m.summary()["context"] == ctx
    again = ModelProfile.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.context == ctx and again.summary() == m.summary()
    old = m.to_dict()
    del old["context"]  # written before the context was recorded
    assert ModelProfile.from_dict(old).context == {}
    with pytest.raises(ValueError, match="cannot merge profiles routed differently"):
        m.merge(ModelProfile(2, ["a", "b"], context={**ctx, "noise": True}))
    with pytest.raises(ValueError, match="context must hold JSON values only"):
        ModelProfile(2, context={"x": np.float32(1)})
    with pytest.raises(TypeError, match="context must be a dict with str keys"):
        ModelProfile(2, context={1: "x"})


def test_capacity_drops_from_older_files_and_tampering(make_routing):
    rng = np.random.default_rng(9)
    p = LoadProfile(6, 2)
    p.add(make_routing(rng, 30, 6, 2), rng.integers(0, 2, size=30))
    doc = json.loads(json.dumps(p.to_dict()))
    old = {k: v for k, v in doc.items() if k not in ("capacity_factors", "capacity_drops")}
    q = LoadProfile.from_dict(old)
    assert q.summary()["drops_by_capacity"] is None  # not recorded: not made up
    assert q.merge(p).capacity_drops is None
    bad = {**doc, "capacity_drops": [0, 1, 2, 3]}  # more drops at a larger capacity
    with pytest.raises(ValueError, match="'capacity_drops' must fall as the capacity factor grows"):
        LoadProfile.from_dict(bad)
    with pytest.raises(ValueError, match="'capacity_factors' must be"):
        LoadProfile.from_dict({**doc, "capacity_factors": [1.0, 2.0]})
