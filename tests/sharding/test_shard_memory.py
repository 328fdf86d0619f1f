"""What a shard buffers is bounded (docs/PROTOCOL.md §15.6), and a flood keeps RSS under the bound;
a shard's memory is its experts' weights plus what training touched, and `stats` says so (§15.1).

Oracles: the documented bound, computed from the server's constants; the kernel's own memory
accounting of the shard process (VmHWM, the peak, and VmRSS from /proc); the spec's replies;
the byte count of the rows a shard must hold, and an in-process LocalExperts bank given the
same requests.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from shardkit import admitted, dealer, header, reply, rss_bytes

from moe.experts.local import LocalExperts
from moe.sharding import replay, server, session
from moe.sharding.launch import LocalShards
from moe.sharding.links import Access, ShardLinks
from moe.sharding.remote import RemoteExperts

pytestmark = pytest.mark.distributed

RUN, E, D, H = "memory-run", 4, 64, 16
SECRET = session.new_secret()
MESSAGE = 8 << 20  # each flood message: 8 MiB of rows


def _peak_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


@pytest.fixture(scope="module")
def shard():
    with LocalShards([list(range(E))], n_layers=1, d_model=D, d_hidden=H, run=RUN, secret=SECRET,
                     transport="tcp", heartbeat_s=5.0) as shards:
        s = admitted(shards.endpoints[0], SECRET, RUN)
        with tempfile.TemporaryDirectory() as tmp:
            entries = LocalExperts(E, D, H, rng=np.random.default_rng(0)).save_part(Path(tmp), 0)
            s.send(header("load", RUN, gen=1, seq=2, meta={"dir": tmp, "tag": "l0", "files": list(entries),
                                                           "sha256": [e["sha256"] for e in entries.values()]}))
            assert reply(s, 30.0).header.op == "ok"
        yield shards, s
        s.close(linger=0)


@pytest.mark.timeout(180)
def test_a_pipelined_flood_of_forwards_stays_under_the_documented_bound(shard):
    shards, link = shard
    pid = shards.procs[0].pid
    rows = MESSAGE // (4 * D)
    x = np.ones((rows, D), dtype=np.float32).tobytes()
    for _ in range(2):  # warm up: the first forward's buffers, the allocator's arenas
        link.send_multipart([header("forward", RUN, gen=1, seq=3 + _, experts=[0], offsets=[0, rows],
                                    arrays=[{"dtype": "<f4", "shape": [rows, D]}]), x])
        assert reply(link, 60.0).header.op == "ok"
    base = rss_bytes(pid)
    _reset_peak(pid)
    n = 48
    for i in range(n):  # all sent before any reply is read
        link.send_multipart([header("forward", RUN, gen=1, seq=100 + i, experts=[0], offsets=[0, rows],
                                    arrays=[{"dtype": "<f4", "shape": [rows, D]}]), x])
    answers = [reply(link, 120.0) for _ in range(n)]
    kinds = [m.header.op if m.header.op == "ok" else m.header.meta["code"] for m in answers]
    assert set(kinds) <= {"ok", "too_large"} and kinds.count("ok") >= server.MAX_QUEUED, kinds
    refused = [m for m in answers if m.header.op == "error"]
    assert all("requests are queued, limit 8" in m.header.meta["message"] for m in refused)
    # §15.6 for one admitted connection: queued requests and libzmq's queue of this connection,
    # the replies kept for replays, and one forward's working memory (rows in, out, hidden x 2).
    per_message = MESSAGE + 4096
    working = MESSAGE * (2 + 2 * H / D)
    bound = (server.MAX_QUEUED + server.RCVHWM) * per_message + replay.REPLAY_BYTES + working
    grew = _peak_bytes(pid) - base
    assert grew <= bound, (grew >> 20, bound >> 20)
    after = rss_bytes(pid) - base
    assert after <= replay.REPLAY_BYTES + working, (after >> 20)  # freed message memory went back
    link.send(header("ping", RUN, gen=1, seq=1000))
    assert reply(link, 30.0).header.op == "pong"


@pytest.mark.timeout(120)
def test_connections_without_the_password_cannot_make_the_shard_buffer_anything(shard):
    shards, link = shard
    pid = shards.procs[0].pid
    host, port = shards.endpoints[0][len("tcp://"):].rsplit(":", 1)
    base = rss_bytes(pid)
    junk = os.urandom(1 << 20)
    sent = 0
    with socket.create_connection((host, int(port))) as raw:  # not even ZMTP: 64 MiB of noise
        try:
            for _ in range(64):
                raw.sendall(junk)
                sent += len(junk)
        except OSError:
            pass  # libzmq dropped the connection at the bad greeting
    big = np.zeros((3, (64 << 20) // 4), dtype=np.float32)  # a 3-frame, 192 MiB message, no password
    for password in (None, b"0" * 64):
        s = dealer(shards.endpoints[0], password)
        try:
            try:
                s.send_multipart([header("ping", RUN, seq=1), *big], flags=1)  # NOBLOCK: never connected
            except Exception:  # noqa: BLE001 - zmq.Again: there is no admitted pipe to queue it on
                pass
            assert reply(s, 2.0) is None
        finally:
            s.close(linger=0)
    assert rss_bytes(pid) - base < 10 << 20
    link.send(header("ping", RUN, gen=1, seq=2000))
    assert reply(link, 30.0).header.op == "pong"


SE, SD, SH = 8, 4, 8  # the stats test's experts
ROW = 4 * (2 * SD * SH + SH + SD)  # float32 bytes of one expert


def _memory(links: ShardLinks) -> dict:
    replies = links.call("stats", {0: ((), (0,), (), {})}, layer=0)
    return replies[0].header.meta


@pytest.mark.timeout(60)
def test_stats_report_weights_then_only_what_training_touched():
    with LocalShards([list(range(SE))], n_layers=1, d_model=SD, d_hidden=SH, run=RUN, secret=SECRET,
                     heartbeat_s=5.0) as shards:
        with ShardLinks(shards.endpoints, run=RUN, access=Access(SECRET), gen=0, deadline_s=5.0, heartbeat_s=5.0,
                        liveness=shards.alive) as links:
            m = _memory(links)
            assert (m["weights_bytes"], m["grad_bytes"], m["adam_bytes"], m["experts_with_adam"]) == (SE * ROW, 0, 0, 0)
            assert m["peak_rss_bytes"] >= m["rss_bytes"] >= SE * ROW

            local = LocalExperts(SE, SD, SH, rng=np.random.default_rng(3))
            remote = RemoteExperts(links, 0, SE, SD, np.zeros(SE, dtype=np.int32))
            with tempfile.TemporaryDirectory() as tmp:
                remote.load_part(Path(tmp), local.save_part(Path(tmp), 0), 0)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((6, SD)).astype(np.float32)
            remote.forward(x, np.array([0, 6, 6, 6, 6, 6, 6, 6, 6]))  # a forward alone: no gradients
            assert _memory(links)["grad_bytes"] == 0

            updated: set[int] = set()
            for offsets in ([0, 2, 2, 5, 5, 5, 6, 6, 6], [0, 0, 0, 3, 3, 3, 3, 6, 6]):
                offsets = np.array(offsets)
                for group in (remote, local):
                    group.forward(x, offsets)
                    group.backward(np.ones_like(x))
                    group.apply_update(0.1)
                updated |= set(np.flatnonzero(np.diff(offsets)).tolist())
                m = _memory(links)
                assert m["experts_with_adam"] == len(updated) < SE
                assert m["adam_bytes"] == 2 * len(updated) * ROW  # m and v of the updated experts only
                assert 0 < m["grad_bytes"] <= 3 * ROW  # the largest backward touched three experts
                assert {k: v for k, v in local.memory().items() if k != "grad_bytes"} == {
                    k: m[k] for k in ("weights_bytes", "adam_bytes", "experts_with_adam")}
