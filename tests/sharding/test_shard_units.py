"""Pure pieces of the sharding package: expert lists, placement, bind policy, the replay cache,
the shard's compute host against LocalExperts, the backward reply's norms on the wire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zmq

from moe.experts.local import LocalExperts
from moe.sharding import security, wire
from moe.sharding.host import ExpertHost, HostError
from moe.sharding.remote import contiguous_placement
from moe.sharding.replay import ReplayCache
from moe.sharding.security import SecurityError
from moe.sharding.serve import format_experts, parse_experts, parse_fault
from moe.sharding.wire import Header, WireError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,ids", [("0-3", (0, 1, 2, 3)), ("0,5,7", (0, 5, 7)), ("7,0-2,2", (0, 1, 2, 7)),
                                      ("4", (4,))])
def test_parse_and_format_experts(text, ids):
    assert parse_experts(text) == ids
    assert parse_experts(format_experts(ids)) == ids


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1,,2", "-1"])
def test_bad_expert_lists_are_refused(bad):
    with pytest.raises(ValueError, match="expert"):
        parse_experts(bad)


def test_parse_fault():
    assert parse_fault("forward@7") == ("forward", 7, 0)
    assert parse_fault("load@10:*") == ("load", 10, None)
    assert parse_fault("start@1:3") == ("start", 1, 3)
    for bad in ("explode@1", "forward@", "forward@7:x"):
        with pytest.raises(ValueError, match="op@step"):
            parse_fault(bad)


def test_contiguous_placement_is_contiguous_and_balanced():
    p = contiguous_placement(10, 3)
    assert p.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # floor(e * 3 / 10), by hand
    assert np.all(np.diff(p) >= 0)
    with pytest.raises(ValueError, match="shards"):
        contiguous_placement(2, 3)


@pytest.mark.parametrize("endpoint,local", [
    ("ipc:///tmp/x.ipc", True), ("tcp://127.0.0.1:5701", True), ("tcp://127.0.0.2:*", True),
    ("tcp://localhost:1", True), ("tcp://[::1]:5", True), ("tcp://0.0.0.0:5701", False),
    ("tcp://10.0.0.2:5701", False), ("tcp://eth0:5701", False), ("tcp://*:5701", False),
])
def test_only_local_binds_are_allowed_without_curve(endpoint, local):
    assert security.is_local_endpoint(endpoint) is local
    if local:
        security.check_bind(endpoint, curve=False)
    else:
        with pytest.raises(SecurityError, match="needs CURVE"):
            security.check_bind(endpoint, curve=False)


def test_curve_is_refused_on_old_or_curveless_libzmq(monkeypatch):
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 4))
    with pytest.raises(SecurityError, match="4.3.5"):
        security.check_bind("tcp://0.0.0.0:1", curve=True)
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 5))
    monkeypatch.setattr(zmq, "has", lambda what: False)
    with pytest.raises(SecurityError, match="CURVE"):
        security.check_curve_support()


def test_replay_cache_replays_evicts_and_remembers():
    c = ReplayCache(gen=0, entries=2, budget=1 << 20)
    key = lambda seq, op="forward": ("r", 0, 0, 0, seq, op)  # noqa: E731
    c.put(key(1), [b"a"])
    assert c.get(key(1)) == [b"a"] and c.conflict(key(2)) is None
    assert "already used" in c.conflict(key(1, "update"))
    c.put(key(2), [b"b"])
    c.put(key(3), [b"c"])  # evicts seq 1
    assert c.get(key(1)) is None and "evicted" in c.conflict(key(1))
    assert c.conflict(("r", 1, 0, 0, 1, "load")) is None  # a newer generation is not this cache's
    c.clear(1)
    assert c.get(key(3)) is None and c.conflict(("r", 1, 0, 0, 1, "forward")) is None


def _pair(seed=0, E=5, d=3, h=4):
    """A host of experts (1, 3, 4) and an in-process oracle bank of those three experts."""
    host = ExpertHost((4, 1, 3), 1, d, h, rng=np.random.default_rng(9))
    oracle = LocalExperts(3, d, h, rng=np.random.default_rng(seed))
    for n, p in host.banks[0].params.items():
        p[...] = oracle.params[n]
    return host, oracle


def test_host_matches_local_experts_for_any_request_order():
    host, oracle = _pair()
    rng = np.random.default_rng(1)
    # request order 4, 1, 3 (not ascending) with 2, 3, 1 rows; local order is 1, 3, 4
    x = rng.standard_normal((6, 3)).astype(np.float32)
    y = host.forward(0, (4, 1, 3), (0, 2, 5, 6), x)
    perm = np.array([2, 3, 4, 5, 0, 1])  # rows of experts 1, 3, 4 in the request
    want = oracle.forward(x[perm], np.array([0, 3, 4, 6]))
    assert y.dtype == np.float32 and np.array_equal(y[perm], want)
    g = rng.standard_normal((6, 3)).astype(np.float32)
    dx, sq = host.backward(0, (4, 1, 3), (0, 2, 5, 6), g)
    assert np.array_equal(dx[perm], oracle.backward(g[perm]))
    ids, want_sq = oracle.expert_sq_norms()
    assert ids.tolist() == [0, 1, 2]
    assert sq.dtype == np.float64 and np.array_equal(sq, want_sq[[2, 0, 1]])  # request order 4, 1, 3
    host.update(0, 1, 0.1, 0.5)
    oracle.apply_update(0.1, 0.5)
    for n, p in oracle.params.items():
        assert np.array_equal(host.banks[0].params[n], p)
    with pytest.raises(HostError, match="already applied"):
        host.update(0, 1, 0.1, 0.5)


def test_host_refuses_foreign_experts_and_mismatched_backward():
    host, _ = _pair()
    x = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(HostError, match="not hosted") as e:
        host.forward(0, (0,), (0, 2), x)
    assert e.value.code == "not_found"
    host.forward(0, (1,), (0, 2), x)
    with pytest.raises(HostError, match="differ"):
        host.backward(0, (3,), (0, 2), x)
    with pytest.raises(HostError, match="float32"):
        host.forward(0, (1,), (0, 2), x.astype(np.float64))


def test_host_save_and_load_by_global_id(tmp_path: Path):
    host, oracle = _pair()
    x = np.ones((2, 3), dtype=np.float32)
    host.forward(0, (3,), (0, 2), x, step=1)  # train expert 3 only: it alone gets Adam state
    host.backward(0, (3,), (0, 2), x, step=1)
    host.update(0, 1, 0.1, 1.0)
    entry = host.save(0, tmp_path, index=2)
    assert entry["file"] == "experts-l0-s2.safetensors" and entry["n_experts"] == 3
    assert entry["adam_file"] == "experts-l0-s2.adam.safetensors" and entry["adam_n_experts"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry["adam_file"], entry["file"]]  # no temp left
    other = ExpertHost((3, 4), 1, 3, 4, rng=np.random.default_rng(5))  # a different sharding
    other.load(0, tmp_path, (entry["file"], entry["adam_file"]), (entry["sha256"], entry["adam_sha256"]))
    assert np.array_equal(other.banks[0].params["w1"], host.banks[0].params["w1"][[1, 2]])
    assert np.array_equal(other.banks[0].params["w2"][1], oracle.params["w2"][2])  # expert 4: untrained
    assert other.banks[0].optimizer.t.tolist() == [1, 0]  # expert 3 stepped once, expert 4 never
    assert other.banks[0].memory()["experts_with_adam"] == 1
    with pytest.raises(HostError, match="expert parts"):
        other.load(0, tmp_path, ("../etc/passwd",), ("0" * 64,))
    with pytest.raises(HostError) as e:
        other.load(0, tmp_path, (entry["file"],), ("0" * 64,))
    assert e.value.code == "not_found" and "sha256" in str(e.value)


def test_backward_reply_may_carry_one_float64_norm_per_expert():
    req = Header(op="backward", run="r", gen=0, experts=(3, 1), offsets=(0, 2, 3))
    dx = np.ones((3, 2), dtype=np.float32)
    got = wire.decode(wire.encode_reply(req, [dx, np.array([1.5, 2.0])]))
    assert got.arrays[1].tolist() == [1.5, 2.0]
    with pytest.raises(WireError, match="squared"):
        wire.encode_reply(req, [dx, np.array([1.5, 2.0, 3.0])])
    with pytest.raises(WireError, match="squared"):
        wire.encode_reply(req, [dx, np.array([1.5, 2.0], dtype=np.float32)])
