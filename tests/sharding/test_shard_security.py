"""CURVE on shards: allowed keys are served; unknown keys and NULL clients get nothing and are logged;
exposed binds without keys are refused; old or CURVE-less libzmq is refused when auth is asked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq
from shardkit import handshake, wait_until

from moe.sharding import security, session, wire
from moe.sharding.launch import LocalShards
from moe.sharding.links import Access, ShardLinks
from moe.sharding.security import ClientCurve
from moe.sharding.wire import Header

pytestmark = pytest.mark.distributed

RUN = "secure-run"
SECRET = session.new_secret()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    made = security.generate_keys(folder)
    assert sorted(made) == ["client", "server"]
    assert (folder / "authorized" / "client.key").is_file()
    assert (folder / "client.key_secret").stat().st_mode & 0o077 == 0  # secret keys are private
    return folder


@pytest.fixture(scope="module")
def shard(keys):
    with LocalShards([[0, 1]], n_layers=1, d_model=4, d_hidden=4, run=RUN, secret=SECRET, transport="tcp",
                     curve_dir=str(keys), heartbeat_s=5.0) as shards:
        assert shards.endpoints[0].startswith("tcp://127.0.0.1:")
        yield shards


def _ping(sock: zmq.Socket, timeout_s: float) -> wire.Message | None:
    sock.send_multipart(wire.encode(Header(op="ping", run=RUN, gen=0, seq=1)))
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return wire.decode(sock.recv_multipart())


def _dealer(endpoint: str, curve: ClientCurve | None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(s)
    s.connect(endpoint)
    return s


def _log_has(shard: LocalShards, text: str) -> bool:
    """The event "the shard logged this", waited for (the timeout only stops a hang)."""
    return wait_until(lambda: text in shard.log_path(0).read_text(errors="replace"), timeout_s=60.0)


@pytest.mark.timeout(60)
def test_an_allowed_client_is_served(shard, keys):
    curve = ClientCurve.from_dir(keys)
    with ShardLinks(shard.endpoints, run=RUN, access=Access(SECRET, curve), deadline_s=5.0) as links:
        links.ping_all(5.0)
    s = _dealer(shard.endpoints[0], curve)
    try:  # CURVE admits the connection; the run secret still has to be proven before anything else
        got = _ping(s, 5.0)
        assert got is not None and got.header.meta["code"] == "unauthorized"
        assert handshake(s, SECRET, RUN, seq=2).header.op == "ok"
        got = _ping(s, 5.0)
        assert got is not None and got.header.op == "pong"
    finally:
        s.close(linger=0)


@pytest.mark.timeout(60)
def test_an_unknown_key_gets_nothing_and_is_logged(shard, keys):
    public, secret = zmq.curve_keypair()
    server_public = ClientCurve.from_dir(keys).server_public
    s = _dealer(shard.endpoints[0], ClientCurve(public, secret, server_public))
    try:
        assert _ping(s, 1.0) is None
    finally:
        s.close(linger=0)
    assert _log_has(shard, f"unknown CURVE key {public.decode()}")
    assert shard.alive(0) is None


@pytest.mark.timeout(60)
def test_a_null_client_gets_nothing_and_is_logged(shard):
    s = _dealer(shard.endpoints[0], None)
    try:
        assert _ping(s, 1.0) is None
    finally:
        s.close(linger=0)
    assert _log_has(shard, "handshake failed")
    assert shard.alive(0) is None


@pytest.mark.timeout(60)
def test_a_non_loopback_bind_without_keys_is_refused_by_the_process(tmp_path):
    # The address is only checked and refused: nothing is bound and no traffic is sent to it.
    secret = session.write_secret(tmp_path / "run.secret", session.new_secret())
    cmd = [sys.executable, "-m", "moe.sharding.serve", "--bind", "tcp://0.0.0.0:59999", "--experts", "0-3",
           "--layers", "1", "--d-model", "4", "--d-hidden", "4", "--secret-file", str(secret)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to bind tcp://0.0.0.0:59999" in done.stderr
    assert "READY" not in done.stdout
