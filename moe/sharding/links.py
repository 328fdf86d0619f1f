"""The coordinator's connections to its shards: admitted links, deadlines, retries, heartbeats.

`ShardLinks` holds one DEALER per shard (shared by every layer's RemoteExperts), the per-shard
sequence counters, sessions and the generation. Each link proves the run secret before it
sends anything else (`moe.sharding.session`). `call` scatters one request per shard before
waiting for any reply (the shards compute concurrently), then gathers, resending the
identical request on silence and raising `ShardFailure` (an ExpertGroupFailure) when a shard
is dead (its process exited, or it missed its heartbeats) or stalled (no reply within the
deadline). A separate heartbeat thread, with its own admitted DEALERs, pings every shard so
both sides notice silence even while the trainer is busy elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from moe.experts.protocol import ExpertGroupFailure
from moe.sharding import security, session, wire
from moe.sharding.security import ClientCurve
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, Message, WireError

log = logging.getLogger("moe.sharding")

Liveness = Callable[[int], "str | None"]  # shard index -> why it is dead, or None
Request = tuple[Sequence[int], Sequence[int], Sequence[np.ndarray], Mapping[str, Any]]  # experts, offsets, arrays, meta


class ShardFailure(ExpertGroupFailure):
    """A shard died or stalled mid-request; the step is void (the trainer rolls back)."""

    def __init__(self, message: str, *, shard: int, op: str, waited_s: float) -> None:
        super().__init__(message)
        self.shard, self.op, self.waited_s = shard, op, waited_s


class ShardError(RuntimeError):
    """A shard refused a request (a bug, a bad checkpoint, a wrong address or secret): not transient."""

    def __init__(self, message: str, *, shard: int, code: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.shard, self.code, self.reason = shard, code, reason


@dataclass(frozen=True)
class Access:
    """What a coordinator needs to reach its shards: the run secret, and CURVE keys beyond loopback."""

    secret: bytes = field(repr=False)
    curve: ClientCurve | None = None

    def dealer(self, ctx: zmq.Context, endpoint: str, limits: Limits) -> zmq.Socket:
        """A DEALER with a random routing id (its admission survives reconnects), PLAIN or CURVE."""
        s = ctx.socket(zmq.DEALER)
        wire.configure_socket(s, limits)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.ROUTING_ID, session.new_routing_id())
        if self.curve is not None:
            self.curve.apply(s)
        else:
            security.apply_plain_client(s, session.transport_password(self.secret))
        s.connect(endpoint)
        return s


class Handshake:
    """One link's proof of the run secret, client side: hello, then auth, then check the shard's proof."""

    def __init__(self, access: Access, run: str, join: str | None) -> None:
        self.access, self.run, self.join = access, run, join
        self.nonce = session.new_nonce()
        self.shard_nonce: str | None = None

    def hello_meta(self) -> dict[str, Any]:
        return {"nonce": self.nonce}

    def auth_meta(self, hello_reply: Header) -> dict[str, Any]:
        self.shard_nonce = str(hello_reply.meta.get("nonce"))
        proof = session.client_proof(self.access.secret, self.run, self.shard_nonce, self.nonce)
        return {"proof": proof} if self.join is None else {"proof": proof, "session": self.join}

    def session(self, auth_reply: Header) -> str | None:
        """The session id, when the shard proved that it holds the secret too; else None."""
        sid, proof = auth_reply.meta.get("session"), auth_reply.meta.get("proof")
        if not (isinstance(sid, str) and isinstance(proof, str) and self.shard_nonce is not None):
            return None
        want = session.shard_proof(self.access.secret, self.run, self.nonce, self.shard_nonce, sid)
        return sid if session.same(proof, want) else None


def _try_send(s: zmq.Socket, frames: list) -> bool:
    try:
        s.send_multipart(frames, zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


# ----------------------------------------------------------------------------- heartbeats


@dataclass(eq=False)
class _Beat:
    """The heartbeat thread's link to one shard: admitted, or a handshake in progress."""

    sock: zmq.Socket
    admitted: bool = False
    handshake: Handshake | None = None
    waiting: Header | None = None  # the hello or auth request we wait for an answer to
    tried: float = float("-inf")


class Heartbeat(threading.Thread):
    """Pings every shard each interval on its own admitted links and answers the shards' pings.

    Its links join the data links' sessions (`sessions`, shared with ShardLinks); a link that is
    refused (the shard restarted and has no session yet) tries again an interval later."""

    def __init__(self, ctx: zmq.Context, endpoints: Sequence[str], *, run: str, interval: float,
                 access: Access, sessions: list[str | None], limits: Limits) -> None:
        super().__init__(name="moe-heartbeat", daemon=True)
        self.ctx, self.endpoints, self.run_id, self.interval = ctx, list(endpoints), run, interval
        self.access, self.sessions, self.limits = access, sessions, limits
        now = time.monotonic()
        self.heard = [now] * len(self.endpoints)
        self.gen = 0
        self._stop_event = threading.Event()
        self._seq = itertools.count(1 << 62)  # disjoint from the data links' seq (pings are not cached)

    def silent_for(self, i: int) -> float:
        return time.monotonic() - self.heard[i]

    def reset(self, i: int) -> None:
        self.heard[i] = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        beats = [_Beat(self.access.dealer(self.ctx, ep, self.limits)) for ep in self.endpoints]
        poller = zmq.Poller()
        for b in beats:
            poller.register(b.sock, zmq.POLLIN)
        index = {b.sock: i for i, b in enumerate(beats)}
        last_sent = float("-inf")
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                if now - last_sent >= self.interval:
                    last_sent = now
                    for i, b in enumerate(beats):
                        self._beat(i, b, now)
                for s, _ in poller.poll(int(min(self.interval / 4, 0.1) * 1000)):
                    self._drain(beats[index[s]], index[s])
        finally:
            for b in beats:
                b.sock.close(linger=0)

    def _send(self, b: _Beat, op: str, meta: dict[str, Any]) -> Header:
        h = Header(op=op, run=self.run_id, gen=self.gen, seq=next(self._seq), meta=meta)
        _try_send(b.sock, wire.encode(h, limits=self.limits))
        return h

    def _beat(self, i: int, b: _Beat, now: float) -> None:
        if b.admitted:
            self._send(b, "ping", {"t": time.time()})
        elif self.sessions[i] is not None and now - b.tried >= self.interval:
            b.tried = now
            b.handshake = Handshake(self.access, self.run_id, self.sessions[i])
            b.waiting = self._send(b, "hello", b.handshake.hello_meta())

    def _drain(self, b: _Beat, i: int) -> None:
        while True:
            try:
                frames = b.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.heard[i] = time.monotonic()
            try:
                msg = wire.decode(frames, limits=self.limits)
            except WireError:
                continue
            h = msg.header
            if h.op == "ping":
                if b.admitted:
                    _try_send(b.sock, wire.encode_pong(msg, limits=self.limits))
            elif h.op == "error" and h.meta.get("code") == "unauthorized":
                b.admitted, b.waiting = False, None  # e.g. the shard restarted: join again
            elif b.waiting is not None and h.seq == b.waiting.seq and h.op == "ok" and b.handshake is not None:
                if h.reply_to == "hello":
                    b.waiting = self._send(b, "auth", b.handshake.auth_meta(h))
                elif h.reply_to == "auth":
                    b.admitted, b.waiting = b.handshake.session(h) is not None, None


# ----------------------------------------------------------------------------- links


class ShardLinks:
    """One admitted DEALER per shard, sequence numbers, sessions, the run and generation,
    deadlines and retries."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        run: str,
        access: Access,
        gen: int = 0,
        deadline_s: float = 5.0,
        retries: int = 2,
        heartbeat_s: float = wire.HEARTBEAT_INTERVAL_S,
        liveness: Liveness | None = None,
        limits: Limits = DEFAULT_LIMITS,
        ctx: zmq.Context | None = None,
        heartbeat: bool = True,
    ) -> None:
        if not endpoints:
            raise ValueError("need at least one shard endpoint, got none")
        self.endpoints, self.run, self.gen = list(endpoints), run, gen
        self.deadline_s, self.retries, self.heartbeat_s = deadline_s, retries, heartbeat_s
        self.hb_timeout = heartbeat_s * wire.HEARTBEAT_TIMEOUT_S / wire.HEARTBEAT_INTERVAL_S
        self.access, self.liveness, self.limits = access, liveness, limits
        self.ctx = ctx or zmq.Context.instance()
        self._seq = [itertools.count(1) for _ in self.endpoints]  # survives reconnects and rollbacks
        self.sessions: list[str | None] = [None] * self.n_shards  # shared with the heartbeat thread
        self.socks = [access.dealer(self.ctx, ep, limits) for ep in self.endpoints]
        self.bytes_sent = self.bytes_received = 0
        self.launcher: Any = None  # the LocalShards that started these shards, if any
        self.hb: Heartbeat | None = None
        try:
            self.admit(range(self.n_shards), new=True)
        except BaseException:
            self.close()
            raise
        if heartbeat:
            self.hb = Heartbeat(self.ctx, self.endpoints, run=run, interval=heartbeat_s, access=access,
                                sessions=self.sessions, limits=limits)
            self.hb.gen = gen
            self.hb.start()

    @property
    def n_shards(self) -> int:
        return len(self.endpoints)

    @property
    def pids(self) -> list[int]:
        """Process ids of the shards, when this process launched them."""
        return self.launcher.pids() if self.launcher is not None else []

    def close(self) -> None:
        if self.hb is not None:
            self.hb.stop()
            self.hb = None
        for s in self.socks:
            if not s.closed:
                s.close(linger=0)

    def __enter__(self) -> ShardLinks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def admit(self, shards: Sequence[int] | range, *, new: bool = False) -> None:
        """Prove the run secret on the data links of `shards` (all at once). new: start new
        sessions (this coordinator takes the shards over); else join ours, or start one on a
        shard that has none (it was restarted). Raises ShardError when a shard refuses."""
        shards = list(shards)
        joins = {i: None if new else self.sessions[i] for i in shards}
        while True:
            hs = {i: Handshake(self.access, self.run, joins[i]) for i in shards}
            hello = self.call("hello", {i: ((), (0,), (), hs[i].hello_meta()) for i in shards})
            try:
                auth = self.call("auth", {i: ((), (0,), (), hs[i].auth_meta(hello[i].header)) for i in shards})
            except ShardError as e:
                if e.reason == session.NO_SESSION and joins.get(e.shard) is not None:
                    joins[e.shard] = None  # restarted: it has no session yet, so start ours
                    continue
                raise
            for i in shards:
                sid = hs[i].session(auth[i].header)
                if sid is None:
                    raise ShardError(f"shard {i} ({self.endpoints[i]}) did not prove the run secret: "
                                     f"not the shard this run started", shard=i, code="unauthorized")
                self.sessions[i] = sid
            return

    def bump_generation(self, restarted: Sequence[int] = ()) -> int:
        """A rollback: new generation, fresh admitted sockets (queued stale requests are
        discarded). Shards in `restarted` are new processes: their links start a new session."""
        self.gen += 1
        for i, s in enumerate(self.socks):
            s.close(linger=0)
            self.socks[i] = self.access.dealer(self.ctx, self.endpoints[i], self.limits)
        if self.hb is not None:
            self.hb.gen = self.gen
            for i in range(self.n_shards):
                self.hb.reset(i)
        for i in restarted:
            self.sessions[i] = None  # the heartbeat waits until the data link has a session again
        restarted = set(restarted)
        if restarted:
            self.admit(sorted(restarted), new=True)
        others = [i for i in range(self.n_shards) if i not in restarted]
        if others:
            self.admit(others)
        return self.gen

    # ------------------------------------------------------------------ requests
    def call(self, op: str, requests: Mapping[int, Request], *, layer: int = 0, step: int = 0,
             deadline_s: float | None = None) -> dict[int, Message]:
        """Send every shard its request (experts, offsets, arrays, meta), then gather the replies."""
        deadline_s = self.deadline_s if deadline_s is None else deadline_s
        start = time.monotonic()
        pending: dict[int, list] = {}
        for i, (experts, offsets, arrays, meta) in requests.items():
            self._check_alive(i, op, start)
            h = Header(op=op, run=self.run, gen=self.gen, step=step, layer=layer, seq=next(self._seq[i]),
                       experts=experts, offsets=offsets, meta=meta)
            frames = wire.encode(h, arrays, limits=self.limits)
            self._send(i, frames)
            pending[i] = [h, frames, start]
        replies: dict[int, Message] = {}
        resend_every = deadline_s / (self.retries + 1)
        while pending:
            now = time.monotonic()
            for i, p in pending.items():
                self._check_alive(i, op, start, layer=layer, step=step)
                if now - start >= deadline_s:
                    raise ShardFailure(
                        f"shard {i} ({self.endpoints[i]}) did not answer {op!r} (layer {layer}, step {step}) "
                        f"within the {deadline_s:g} s deadline ({self.retries} resends): stalled or dead",
                        shard=i, op=op, waited_s=now - start)
                if now - p[2] >= resend_every:
                    log.info("resending %s seq %d to shard %d", op, p[0].seq, i)
                    self._send(i, p[1])
                    p[2] = now
            poller = zmq.Poller()
            for i in pending:
                poller.register(self.socks[i], zmq.POLLIN)
            wait = min(0.05, max(0.0, deadline_s - (now - start)))
            for sock, _ in poller.poll(int(wait * 1000) + 1):
                i = self.socks.index(sock)
                got = self._drain(i, pending[i][0]) if i in pending else None
                if got is not None:
                    replies[i] = got
                    del pending[i]
        return replies

    def _send(self, i: int, frames: list) -> None:
        if not _try_send(self.socks[i], frames):
            log.info("shard %d is not accepting messages (queue full)", i)
            return
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)

    def _check_alive(self, i: int, op: str, start: float, *, layer: int = 0, step: int = 0) -> None:
        why = self.liveness(i) if self.liveness is not None else None
        if why is None and op not in ("ping", *wire.HANDSHAKE_OPS) and self.hb is not None \
                and self.hb.silent_for(i) > self.hb_timeout:
            why = f"missed heartbeats for {self.hb.silent_for(i):.1f} s (timeout {self.hb_timeout:g} s)"
        if why is not None:
            waited = time.monotonic() - start
            raise ShardFailure(f"shard {i} ({self.endpoints[i]}) failed during {op!r} (layer {layer}, "
                               f"step {step}) after {waited:.2f} s: {why}", shard=i, op=op, waited_s=waited)

    def _drain(self, i: int, request: Header) -> Message | None:
        """Read what shard i sent; the reply to `request`, if it is among it."""
        sock, found = self.socks[i], None
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return found
            self.bytes_received += sum(f.buffer.nbytes for f in frames)
            try:
                msg = wire.decode(frames, limits=self.limits)
            except WireError as e:
                log.warning("dropped an undecodable message from shard %d: %s", i, e)
                continue
            h = msg.header
            if h.op == "ping":  # the shard's heartbeat
                _try_send(sock, wire.encode_pong(msg, limits=self.limits))
                continue
            if h.op == "error" and h.reply_to is None:
                raise ShardError(f"shard {i} could not decode a request: {h.meta.get('message')}",
                                 shard=i, code=str(h.meta.get("code")))
            if not h.is_reply or h.run != self.run or h.gen != self.gen:
                continue  # another run or generation: a leftover
            if h.seq != request.seq or h.reply_to != request.op:
                continue  # a late answer to something we no longer wait for
            if h.op == "error":
                self._raise_error(i, request, h)
            found = msg

    def _raise_error(self, i: int, request: Header, h: Header) -> None:
        code, text = h.meta.get("code"), h.meta.get("message")
        message = f"shard {i} ({self.endpoints[i]}) refused {request.op!r} (layer {request.layer}): {text} [{code}]"
        # lost admission mid-run (the shard restarted): roll back, which proves the secret again
        transient = code in ("internal", "future_generation") or (
            code == "unauthorized" and request.op not in wire.HANDSHAKE_OPS)
        if transient:
            raise ShardFailure(message, shard=i, op=request.op, waited_s=0.0)
        reason = h.meta.get("reason")
        raise ShardError(message, shard=i, code=str(code), reason=reason if isinstance(reason, str) else None)

    # ------------------------------------------------------------------ helpers
    def ping_all(self, timeout_s: float) -> None:
        """Every shard answers a ping within timeout_s (used to wait for readiness)."""
        self.call("ping", {i: ((), (0,), (), {"t": time.time()}) for i in range(self.n_shards)},
                  deadline_s=timeout_s)

    def hosted(self, layer: int = 0) -> list[np.ndarray]:
        """The expert ids each shard hosts (from 'stats')."""
        replies = self.call("stats", {i: ((), (0,), (), {}) for i in range(self.n_shards)}, layer=layer)
        return [np.asarray(replies[i].arrays[0], dtype=np.int64) for i in range(self.n_shards)]
