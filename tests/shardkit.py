"""Helpers for the tests that drive real shard processes: raw links that follow docs/PROTOCOL.md
(transport password, hello/auth handshake) written from the spec, replies, and waiting on
events with generous outer timeouts (never asserting on time)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable

import msgpack
import zmq

from moe.sharding import wire

SPEC_VERSION = 2


def transport_password(secret: bytes) -> bytes:
    """§7: hex(HMAC-SHA256(secret, "moe-shard-transport/2")), written from the spec."""
    return hmac.new(secret, b"moe-shard-transport/2", hashlib.sha256).hexdigest().encode()


def mac(secret: bytes, *fields: str) -> str:
    return hmac.new(secret, "\n".join(("moe-shard-auth/2", *fields)).encode(), hashlib.sha256).hexdigest()


def dealer(endpoint: str, password: bytes | None, routing_id: bytes | None = None) -> zmq.Socket:
    """A DEALER that connects with PLAIN (user "moe") when given a password, else NULL."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    if password is not None:
        s.plain_username = b"moe"
        s.plain_password = password
    s.connect(endpoint)
    return s


def header(op: str, run: str, *, gen: int = 0, seq: int = 1, step: int = 0, layer: int = 0, experts=(),
           offsets=(0,), arrays=(), meta=None) -> bytes:
    """A request header as plain msgpack, from the spec's key table (not from the encoder)."""
    return msgpack.packb({"v": SPEC_VERSION, "op": op, "run": run, "gen": gen, "step": step, "layer": layer,
                          "seq": seq, "experts": list(experts), "offsets": list(offsets),
                          "arrays": list(arrays), "meta": meta or {}}, use_bin_type=True)


def reply(sock: zmq.Socket, timeout_s: float = 10.0, *, raw: bool = False):
    """The next message that is not a shard heartbeat ping (decoded, or its raw frames), or None."""
    end = time.monotonic() + timeout_s
    while (left := end - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        frames = sock.recv_multipart()
        msg = wire.decode(frames)
        if msg.header.op == "ping":
            continue
        return frames if raw else msg
    return None


def handshake(sock: zmq.Socket, secret: bytes, run: str, *, seq: int = 1, join: str | None = None,
              gen: int = 0) -> wire.Message:
    """hello then auth, as §7 describes; returns the auth reply (ok or error)."""
    nonce = secrets.token_hex(32)
    sock.send(header("hello", run, gen=gen, seq=seq, meta={"nonce": nonce}))
    hello = reply(sock)
    assert hello is not None and hello.header.op == "ok", hello
    shard_nonce = hello.header.meta["nonce"]
    meta = {"proof": mac(secret, "client", run, shard_nonce, nonce)}
    if join is not None:
        meta["session"] = join
    sock.send(header("auth", run, gen=gen, seq=seq + 1, meta=meta))
    got = reply(sock)
    assert got is not None
    if got.header.op == "ok":
        sid = got.header.meta["session"]
        assert got.header.meta["proof"] == mac(secret, "shard", run, nonce, shard_nonce, sid)  # mutual
    return got


def admitted(endpoint: str, secret: bytes, run: str, *, join: str | None = None, seq: int = 1) -> zmq.Socket:
    s = dealer(endpoint, transport_password(secret), routing_id=b"\x81" + os.urandom(15))
    got = handshake(s, secret, run, join=join, seq=seq)
    assert got.header.op == "ok", dict(got.header.meta)
    return s


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0, every_s: float = 0.02) -> bool:
    """Poll an event until it holds; the timeout only stops a hang (it is not a measurement)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(every_s)
    return check()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} has no VmRSS")
