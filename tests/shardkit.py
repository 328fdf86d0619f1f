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
from pathlib import Path

import msgpack
import numpy as np
import zmq

import moe.api
from moe import checkpoint as ckpt
from moe.config import Config, ModelConfig, ShardConfig, TrainConfig
from moe.experts import state
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


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} has no VmRSS")


# ----------------------------------------------------------------------------- checkpoints


def _expert_rows(where: Path, n_layers: int, n_experts: int) -> list[dict[str, np.ndarray]]:
    manifest = ckpt.read_manifest(where)
    return [state.read_rows(where, manifest["files"], layer, np.arange(n_experts)) for layer in range(n_layers)]


def assert_same_checkpoint(got: Path, want: Path) -> None:
    a, b = moe.api.load(got), moe.api.load(want)
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:  # dense params and (loaded in-process) expert params
        assert a.params[name].dtype == np.float32
        assert np.array_equal(a.params[name], b.params[name]), name
    for la, lb in zip(a.layers, b.layers, strict=True):
        for n in state.PARAM_NAMES:
            assert np.array_equal(la.experts.params[n], lb.experts.params[n]), n
    rows_a = _expert_rows(got, len(a.layers), a.layers[0].n_experts)
    rows_b = _expert_rows(want, len(b.layers), b.layers[0].n_experts)
    for ra, rb in zip(rows_a, rows_b, strict=True):  # Adam moments and step counts too
        for k in rb:
            assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k], rb[k]), k
    _, fa, _ = ckpt.load_checkpoint(got)
    _, fb, _ = ckpt.load_checkpoint(want)
    for k in fb["optim"]:  # dense Adam state and data cursor arrays
        assert np.array_equal(fa["optim"][k], fb["optim"][k]), k


# ----------------------------------------------------------------------------- small sharded runs

STEPS = 30


def shard_config(local: int = 0, n_layers: int = 2, **shards) -> Config:
    """The small run of the sharded-training tests (evaluations every 5 steps, checkpoints every 10)."""
    return Config(
        model=ModelConfig(d_model=16, n_experts=6, d_hidden=16, k=2, n_layers=n_layers),
        train=TrainConfig(steps=STEPS, batch_size=64, checkpoint_every=10, eval_every=5, warmup=5,
                          progress=False, keep_last=10),
        shards=ShardConfig(local=local, deadline_s=3.0, heartbeat_s=0.5, **shards),
    )
