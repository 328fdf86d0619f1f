"""A live shard process: hostile frames, duplicated requests, a stalled shard.

One shard process per module (ipc in a temp folder), driven by RemoteExperts and by a raw
DEALER socket that sends hand-made frames. Oracles: LocalExperts with the same weights (for
"applied once"), the protocol's error codes, and a ping that must still work afterwards.
"""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from shardkit import admitted, reply

from moe.experts.local import LocalExperts
from moe.sharding import session, wire
from moe.sharding.launch import LocalShards
from moe.sharding.links import Access, ShardFailure, ShardLinks
from moe.sharding.remote import RemoteExperts
from moe.sharding.wire import Header

pytestmark = pytest.mark.distributed

RUN, E, D, H = "test-run", 4, 4, 8
MAX_MESSAGE = 1 << 20
SECRET = session.new_secret()


@pytest.fixture(scope="module")
def shard():
    with LocalShards([list(range(E))], n_layers=1, d_model=D, d_hidden=H, run=RUN, secret=SECRET, heartbeat_s=5.0,
                     extra_args=lambda i: ["--max-message-bytes", str(MAX_MESSAGE)]) as shards:
        yield shards
    assert all(p.poll() is not None for p in shards.procs if p is not None)


GENERATIONS = itertools.count(0, 10)  # each test's links start past every earlier generation


@pytest.fixture()
def links(shard):
    with ShardLinks(shard.endpoints, run=RUN, access=Access(SECRET), gen=next(GENERATIONS), deadline_s=5.0,
                    heartbeat_s=5.0, liveness=shard.alive) as links:
        yield links


@pytest.fixture()
def raw(shard, links):
    """A second link of the test's session (joined, so the links fixture stays admitted)."""
    s = admitted(shard.endpoints[0], SECRET, RUN, join=links.sessions[0], seq=1 << 40)
    yield s
    s.close(linger=0)


def _reply(sock: zmq.Socket, timeout_s: float = 5.0) -> wire.Message | None:
    return reply(sock, timeout_s)


def _header(op: str = "forward", gen: int = 0, seq: int = 1, **over) -> dict:
    h = {"v": 2, "op": op, "run": RUN, "gen": gen, "step": 0, "layer": 0, "seq": seq, "experts": [0],
         "offsets": [0, 2], "arrays": [{"dtype": "<f4", "shape": [2, D]}], "meta": {}}
    h.update(over)
    return h


def _ping_works(sock: zmq.Socket) -> None:
    sock.send_multipart(wire.encode(Header(op="ping", run=RUN, gen=0, seq=99, meta={"t": 1.5})))
    got = _reply(sock)
    assert got is not None and got.header.op == "pong" and got.header.meta["t"] == 1.5


def _adopt(links: ShardLinks, seed: int) -> tuple[RemoteExperts, LocalExperts]:
    """A RemoteExperts and a LocalExperts oracle holding the same fresh weights."""
    local = LocalExperts(E, D, H, rng=np.random.default_rng(seed))
    remote = RemoteExperts(links, 0, E, D, np.zeros(E, dtype=np.int32))
    with tempfile.TemporaryDirectory() as tmp:
        remote.load_part(Path(tmp), local.save_part(Path(tmp), 0), 0)
    return remote, local


GOOD_BODY = np.ones((2, D), dtype=np.float32).tobytes()
MALFORMED = {
    "truncated msgpack": [msgpack.packb(_header())[:-5], GOOD_BODY],
    "byte 0xc1": [b"\xc1", GOOD_BODY],
    "trailing bytes": [msgpack.packb(_header()) + b"\x00", GOOD_BODY],
    "array claiming 2**32 entries": [b"\xdd\xff\xff\xff\xff", GOOD_BODY],
    "map claiming 2**32 entries": [b"\xdf\xff\xff\xff\xff", GOOD_BODY],
    "2**32 elements": [msgpack.packb(_header(offsets=[0, 65536], arrays=[{"dtype": "<f4", "shape": [65536, 65536]}])),
                       GOOD_BODY],
    "dtype O": [msgpack.packb(_header(arrays=[{"dtype": "O", "shape": [2, D]}])), GOOD_BODY],
    "shape/bytes mismatch": [msgpack.packb(_header()), GOOD_BODY[:-4]],
    "oversized string": [msgpack.packb(_header(meta={"x": "a" * 5000})), GOOD_BODY],
    "oversized message": [msgpack.packb(_header(offsets=[0, 40000], arrays=[{"dtype": "<f4", "shape": [40000, D]}] * 2)),
                          bytes(40000 * D * 4), bytes(40000 * D * 4)],
    "unknown op": [msgpack.packb(_header(op="explode")), GOOD_BODY],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_get_an_error_and_the_shard_keeps_serving(case, raw, shard):
    raw.send_multipart(MALFORMED[case])
    got = _reply(raw)
    assert got is not None and got.header.op == "error", case
    assert got.header.meta["code"] in ("bad_request", "too_large")
    _ping_works(raw)
    assert shard.alive(0) is None


@pytest.mark.timeout(60)
def test_a_frame_over_the_size_limit_is_dropped_and_the_shard_keeps_serving(raw, shard, links):
    big = np.zeros((2 * MAX_MESSAGE // (4 * D), D), dtype=np.float32)
    h = _header(offsets=[0, big.shape[0]], arrays=[{"dtype": "<f4", "shape": list(big.shape)}])
    raw.send_multipart([msgpack.packb(h), big.tobytes()])  # ZMQ_MAXMSGSIZE: libzmq drops the connection
    fresh = admitted(shard.endpoints[0], SECRET, RUN, join=links.sessions[0], seq=1 << 41)
    try:
        _ping_works(fresh)  # a new connection is served
    finally:
        fresh.close(linger=0)
    assert shard.alive(0) is None


@pytest.mark.timeout(60)
def test_wrong_run_and_stale_generation_are_refused(raw, links):
    remote, local = _adopt(links, seed=3)
    raw.send_multipart([msgpack.packb(_header(run="another-run")), GOOD_BODY])
    got = _reply(raw)
    assert got.header.op == "error" and got.header.meta["code"] == "wrong_run"
    links.bump_generation()  # a rollback: the next load moves the shard to generation 1
    with tempfile.TemporaryDirectory() as tmp:
        remote.load_part(Path(tmp), local.save_part(Path(tmp), 0), 0)
    raw.send_multipart([msgpack.packb(_header(gen=0, seq=7)), GOOD_BODY])
    got = _reply(raw)
    assert got.header.op == "error" and got.header.meta["code"] == "stale_generation"
    assert got.header.seq == 7  # a correlated error: the client can match it
    raw.send_multipart([msgpack.packb(_header(gen=links.gen + 5, seq=8)), GOOD_BODY])
    assert _reply(raw).header.meta["code"] == "future_generation"
    _ping_works(raw)


@pytest.mark.timeout(60)
def test_a_duplicated_update_is_applied_once(raw, links):
    remote, local = _adopt(links, seed=1)
    rng = np.random.default_rng(0)
    offsets = np.array([0, 3, 3, 7, 8], dtype=np.int64)
    x = rng.standard_normal((8, D)).astype(np.float32)
    g = rng.standard_normal((8, D)).astype(np.float32)
    assert np.array_equal(remote.forward(x, offsets), local.forward(x, offsets))
    assert np.array_equal(remote.backward(g), local.backward(g))
    assert remote.grad_sq_norm() == local.grad_sq_norm()
    update = wire.encode(Header(op="update", run=RUN, gen=links.gen, step=1, seq=10_000,
                                meta={"lr": 0.05, "scale": 1.0}))
    raw.send_multipart(update)
    first = _reply(raw)
    raw.send_multipart(update)  # the same request again (a resend after a lost reply)
    second = _reply(raw)
    assert first.header.op == second.header.op == "ok"
    assert first.header.replay_key == second.header.replay_key
    again = wire.encode(Header(op="update", run=RUN, gen=links.gen, step=1, seq=10_001, meta={"lr": 0.05}))
    raw.send_multipart(again)  # a new request for an already applied step: refused
    refused = _reply(raw)
    assert refused.header.op == "error" and "already applied" in refused.header.meta["message"]
    local.apply_update(0.05, 1.0)
    once = local.state_dict()
    got = remote.state_dict()
    for k, v in once.items():
        assert np.array_equal(got[k], v), k
    local.apply_update(0.05, 1.0)  # applied twice would differ: the test can fail
    assert not np.array_equal(local.state_dict()["w1"], got["w1"])


@pytest.mark.timeout(60)
def test_sigstop_is_detected_by_the_deadline(shard):
    """A stopped shard answers nothing: the request fails by its deadline (an event: the
    ShardFailure names the deadline path), and the shard serves again once continued."""
    with ShardLinks(shard.endpoints, run=RUN, access=Access(SECRET), gen=next(GENERATIONS), deadline_s=1.0,
                    retries=2, heartbeat_s=5.0, liveness=shard.alive) as links:
        remote, _ = _adopt(links, seed=2)
        offsets = np.array([0, 1, 2, 3, 4], dtype=np.int64)
        x = np.ones((4, D), dtype=np.float32)
        remote.forward(x, offsets)
        pid = shard.procs[0].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(ShardFailure, match="did not answer 'forward' .* within the 1 s deadline") as info:
                remote.forward(x, offsets)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert info.value.shard == 0 and info.value.op == "forward"
        links.ping_all(10.0)  # it serves again once continued


@pytest.mark.timeout(60)
def test_missed_heartbeats_are_detected_while_the_trainer_is_elsewhere(shard):
    """With a long deadline, a stopped shard is noticed through the heartbeat link's silence."""
    with ShardLinks(shard.endpoints, run=RUN, access=Access(SECRET), gen=next(GENERATIONS), deadline_s=60.0,
                    heartbeat_s=0.2, liveness=shard.alive) as links:
        remote, _ = _adopt(links, seed=2)
        pid = shard.procs[0].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(ShardFailure, match="missed heartbeats"):
                remote.forward(np.ones((1, D), dtype=np.float32), np.array([0, 1, 1, 1, 1]))
        finally:
            os.kill(pid, signal.SIGCONT)
        links.ping_all(10.0)
