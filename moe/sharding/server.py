"""The expert shard server: a ROUTER socket in front of an `ExpertHost` (docs/PROTOCOL.md).

Two threads. The I/O thread owns the socket: it decodes and validates every message, admits
links that prove the run secret (`session.Admission`; everything else gets one generic
refusal), keeps the session's replay cache (a duplicated request gets its cached reply and is
never executed twice), answers each link's requests in the order they arrived, sends
heartbeats to admitted links and watches for a vanished coordinator. The worker thread runs
the ops that touch expert state (forward, backward, update, save, load) one at a time.

What a shard buffers is bounded (§15.6): frames by ZMQ_MAXMSGSIZE, messages per connection
by ZMQ_RCVHWM, requests taken off the socket by MAX_QUEUED, and replies kept by the replay
cache's byte budget. A peer without the run's transport password delivers nothing at all.
The command line is `moe shard serve` (moe/sharding/serve.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from moe.rss import resident
from moe.sharding import security, session, wire
from moe.sharding.host import ExpertHost, HostError
from moe.sharding.replay import ReplayCache
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, Message, WireError

log = logging.getLogger("moe.shard")

WORKER_OPS = ("forward", "backward", "update", "save", "load")  # the rest: the I/O thread, in the link's order
MAX_QUEUED = 8  # requests taken off the socket and not yet answered (any op), over all links
RCVHWM = 16  # messages libzmq queues per connection before it stops reading that connection
FAULT_OPS = ("start", *WORKER_OPS)


@dataclass(frozen=True)
class ServerOptions:
    """Everything a shard needs; see `moe shard serve --help` for the meaning of each."""

    bind: str
    experts: tuple[int, ...]
    n_layers: int
    d_model: int
    d_hidden: int
    secret: bytes = field(default=b"", repr=False)
    activation: str = "relu"
    run: str | None = None  # None: bind to the run of the first 'load'
    gen: int = 0
    index: int = 0
    heartbeat_s: float = wire.HEARTBEAT_INTERVAL_S
    parent_pid: int | None = None  # launched by a coordinator: exit when it goes away
    idle_exit_s: float | None = None  # exit after this long without hearing from an admitted link
    root: str | None = None  # save/load only below this folder
    curve_dir: str | None = None
    # testing aid: SIGKILL self on (op, step, gen); gen None = any; op 'start' = before READY at attempt `step`
    faults: tuple[tuple[str, int, int | None], ...] = ()
    attempt: int = 0  # how many times the launcher started this shard before (for 'start' faults)
    seed: int = 0
    limits: Limits = field(default=DEFAULT_LIMITS)


@dataclass(eq=False)
class _Entry:
    """One request of a link, from arrival until its reply is sent (replies leave in order)."""

    msg: Message | None  # None once only the reply is needed
    frames: list | None = None  # the reply, once known
    job: bool = False  # run by the worker (else by the I/O thread when it reaches the head)
    submitted: bool = False
    session: int = 0  # the session it arrived in: a newer session cancels it
    cancelled: bool = False


@dataclass(eq=False)
class _Link:
    """An admitted link: its queue of requests and when we last heard from it / sent to it."""

    ident: bytes
    heard: float
    sent: float
    queue: deque = field(default_factory=deque)


class ShardServer:
    """Serves one run until shutdown, SIGTERM, or (when launched) the coordinator's death."""

    def __init__(self, options: ServerOptions, *, ctx: zmq.Context | None = None) -> None:
        o = options
        security.check_bind(o.bind, curve=o.curve_dir is not None)
        self.o = o
        self.admission = session.Admission(o.secret)
        self.run, self.gen = o.run, o.gen
        self.host = ExpertHost(o.experts, o.n_layers, o.d_model, o.d_hidden, activation=o.activation,
                               rng=np.random.default_rng(o.seed))
        self.ctx = ctx or zmq.Context.instance()
        self.cache = ReplayCache(o.gen)
        self.inflight: set[tuple] = set()  # replay keys queued or running
        self.links: dict[bytes, _Link] = {}
        self.queued = 0
        self.last_heard = time.monotonic()
        self.seq = itertools.count(1)
        self.counters = {"requests": 0, "bytes_in": 0, "bytes_out": 0, "refused": 0}
        self.started = time.monotonic()
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.stopping = False
        self.sock = self.ctx.socket(zmq.ROUTER)
        wire.configure_socket(self.sock, o.limits)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.RCVHWM, RCVHWM)
        if o.curve_dir is not None:
            curve = security.ServerCurve.from_dir(o.curve_dir)
            self.auth = security.start_authenticator(self.ctx, log, curve=curve)
            curve.apply(self.sock)
        else:
            self.auth = security.start_authenticator(self.ctx, log, password=session.transport_password(o.secret))
            security.apply_plain_server(self.sock)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.sock.bind(o.bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        wake = f"inproc://moe-shard-wake-{id(self)}"
        self.wake_rx = self.ctx.socket(zmq.PAIR)
        self.wake_rx.bind(wake)
        self.worker = threading.Thread(target=self._work, args=(wake,), name="shard-worker", daemon=True)

    # ------------------------------------------------------------------ main loop
    def serve(self) -> None:
        """Run until shutdown; always closes the sockets."""
        self.worker.start()
        poller = zmq.Poller()
        for s in (self.sock, self.wake_rx, self.monitor):
            poller.register(s, zmq.POLLIN)
        tick = max(0.01, min(self.o.heartbeat_s / 2, 0.25))
        log.info("shard %d serving %d experts of %d layers on %s (run %s, gen %d)", self.o.index,
                 len(self.o.experts), self.o.n_layers, self.endpoint, self.run, self.gen)
        try:
            while not self.stopping:
                events = dict(poller.poll(int(tick * 1000)))
                if self.sock in events:
                    self._drain_socket()
                if self.wake_rx in events:
                    self._drain_results()
                if self.monitor in events:
                    self._drain_monitor()
                self._housekeeping()
        finally:
            self.close()

    def close(self) -> None:
        self.stopping = True
        self.jobs.put(None)
        if self.monitor is not None and not self.sock.closed:
            self.sock.disable_monitor()
        for s in (self.sock, self.wake_rx, self.monitor):
            if s is not None and not s.closed:
                s.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def _drain_socket(self) -> None:
        for _ in range(1000):  # bounded, so results and heartbeats are never starved
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames)
            if self.stopping:
                return

    def _send(self, ident: bytes, frames: list) -> None:
        try:
            self.sock.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            self.counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
        except zmq.Again:
            log.warning("link %s is not reading; reply dropped", ident.hex())
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone (a reconnect keeps a client-set id)
            if self.links.pop(ident, None) is not None:
                log.info("link %s unreachable (%s)", ident.hex(), e)
            return
        link = self.links.get(ident)
        if link is not None:
            link.sent = time.monotonic()

    def _error(self, request: Header | None, message: str, code: str) -> list:
        log.warning("refused %s: %s (%s)", request.op if request is not None else "message", message, code)
        return wire.encode_error(request, message, code=code, limits=self.o.limits)

    def _refuse(self, ident: bytes, request: Header | None) -> None:
        """The one generic refusal for a link that has not proven the secret: it reveals nothing."""
        self.counters["refused"] += 1
        if self.counters["refused"] & (self.counters["refused"] - 1) == 0:  # 1, 2, 4, ...: no log flood
            log.warning("refused %d message(s) from links without the run secret", self.counters["refused"])
        self._send(ident, wire.encode_error(request, session.REFUSAL, code="unauthorized", limits=self.o.limits))

    # ------------------------------------------------------------------ one message
    def _on_message(self, raw: list) -> None:
        if len(raw) < 2:
            return  # nothing routable
        ident = bytes(raw[0].buffer)
        admitted = self.admission.admitted(ident)
        try:
            msg = wire.decode(raw[1:], limits=self.o.limits)
        except WireError as e:
            request = e.header if e.header is not None and not e.header.is_reply else None
            if not admitted:
                self._refuse(ident, request)
            else:
                self._answer(self._link(ident), self._error(request, str(e), e.code))
            return
        h = msg.header
        if not admitted:
            if h.op in wire.HANDSHAKE_OPS:
                self._handshake(ident, h)
            elif not h.is_reply:
                self._refuse(ident, h)
            return
        link = self._link(ident)
        self.last_heard = link.heard = time.monotonic()
        self.counters["bytes_in"] += sum(f.buffer.nbytes for f in raw[1:])
        if h.is_reply:  # a pong to our heartbeat, or an error a client sent us
            if h.op == "error":
                log.warning("link %s sent an error: %s", ident.hex(), dict(h.meta))
            return
        self.counters["requests"] += 1
        if h.op in wire.HANDSHAKE_OPS:
            self._handshake(ident, h)
            return
        why = self._session_refusal(h)
        if why is not None:
            self._answer(link, self._error(h, *why))
            return
        key = h.replay_key
        cached = self.cache.get(key) if h.op in WORKER_OPS else None
        if cached is not None:
            log.info("replaying the reply to %s seq %d", h.op, h.seq)
            self._answer(link, cached)
            return
        if key in self.inflight:
            return  # a resend of a request still queued or running: its reply is on the way
        conflict = self.cache.conflict(key) if h.op in WORKER_OPS else None
        if conflict is not None:
            self._answer(link, self._error(h, conflict, "bad_request"))
            return
        if self.queued >= MAX_QUEUED:  # answered at once, out of order: the bound on what we hold
            self._send(ident, self._error(h, f"{self.queued} requests are queued, limit {MAX_QUEUED}",
                                          "too_large"))
            return
        job = h.op in WORKER_OPS
        if job:
            self._maybe_fault(h.op, h.step)
            self.inflight.add(key)
        self._enqueue(link, _Entry(msg, job=job, session=self.admission.sessions))

    def _link(self, ident: bytes) -> _Link:
        link = self.links.get(ident)
        if link is None:
            now = time.monotonic()
            link = self.links[ident] = _Link(ident, now, now)
        return link

    def _answer(self, link: _Link, frames: list) -> None:
        """A reply known at once, sent in the link's order (after the replies still pending);
        when MAX_QUEUED requests are waiting it is sent at once instead (no unbounded queue)."""
        if self.queued >= MAX_QUEUED:
            self._send(link.ident, frames)
        else:
            self._enqueue(link, _Entry(None, frames=frames))

    def _handshake(self, ident: bytes, h: Header) -> None:
        """hello: a challenge; auth: admit this link (or the one generic refusal)."""
        if h.op == "hello":
            nonce = self.admission.hello(ident, str(h.meta["nonce"]))
            self._send(ident, wire.encode_reply(h, meta={"nonce": nonce}, limits=self.o.limits))
            return
        run = self.run if self.run is not None else h.run
        join = h.meta.get("session")
        got = self.admission.auth(ident, run, str(h.meta["proof"]), None if join is None else str(join))
        if got is None:
            self._refuse(ident, h)
            return
        if isinstance(got, str):  # the proof was right: this client may know why it cannot join
            why = "this shard has no session to join" if got == session.NO_SESSION else \
                "this shard serves another coordinator session"
            self._send(ident, wire.encode_error(h, why, code="unauthorized", extra={"reason": got},
                                                limits=self.o.limits))
            return
        proof, sid = got
        if join is None:
            log.info("coordinator session %d started by link %s", self.admission.sessions, ident.hex())
            self.cache.clear(self.gen)
            self.inflight.clear()
            for other in [i for i in self.links if not self.admission.admitted(i)]:
                queue = self.links.pop(other).queue
                self.queued -= len(queue)
                for entry in queue:  # displaced: its requests do nothing
                    entry.cancelled = True
        self._link(ident)
        self._send(ident, wire.encode_reply(h, meta={"proof": proof, "session": sid}, limits=self.o.limits))

    def _session_refusal(self, h: Header) -> tuple[str, str] | None:
        """§7: (message, code) when run or generation refuse the request; a shard not yet bound
        to a run accepts only load, stats and ping."""
        if self.run is None:
            if h.op in ("load", "stats", "ping"):
                return None  # the first load binds run and gen (see _drain_results)
            return "this shard is not bound to a run yet; send 'load' first", "bad_request"
        if h.op == "ping" and h.run == self.run:
            return None  # heartbeats carry no state: any generation (§9)
        try:
            wire.check_session(h, run=self.run, gen=self.gen)
        except WireError as e:
            return str(e), e.code
        return None

    def _maybe_fault(self, op: str, step: int) -> None:
        for f_op, f_step, f_gen in self.o.faults:
            if (f_op, f_step) == (op, step) and f_gen in (None, self.gen):
                log.warning("fault injection: SIGKILL on %s at step %d (generation %d)", op, step, self.gen)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ per-link order
    def _enqueue(self, link: _Link, entry: _Entry) -> None:
        link.queue.append(entry)
        self.queued += 1
        self._pump(link)

    def _pump(self, link: _Link) -> None:
        """Send the replies that are next in the link's order; start the jobs no earlier
        link op waits in front of (a stats after a forward sees the forward's rows)."""
        q = link.queue
        while q and not self.stopping:
            head = q[0]
            if head.frames is None and not head.job:
                head.frames = self._link_op(head.msg)
            if head.frames is None:
                break  # a job still running
            q.popleft()
            self.queued -= 1
            self._send(link.ident, head.frames)
        for entry in q:
            if not entry.job and entry.frames is None:
                break
            if entry.job and not entry.submitted:
                entry.submitted = True
                self.jobs.put((link, entry))

    def _link_op(self, msg: Message) -> list:
        h = msg.header
        if h.op == "ping":
            return wire.encode_pong(msg, limits=self.o.limits)
        if h.op == "stats":
            return self._stats(h)
        log.info("shutdown requested")
        self.stopping = True
        return wire.encode_reply(h, limits=self.o.limits)

    def _stats(self, h: Header) -> list:
        if not 0 <= h.layer < self.o.n_layers:
            return self._error(h, f"layer must be in [0, {self.o.n_layers}), got {h.layer}", "bad_request")
        rows = self.host.rows[h.layer].copy()
        if h.meta.get("reset", False):
            self.host.rows[h.layer][:] = 0
        meta = {**self.counters, "uptime_s": time.monotonic() - self.started, "index": self.o.index,
                "n_layers": self.o.n_layers, "d_model": self.o.d_model, "gen": self.gen,
                "session": self.admission.sessions, **self.host.banks[h.layer].memory(), **resident()}
        return wire.encode_reply(h, [self.host.ids.astype(np.int32), rows], meta=meta, limits=self.o.limits)

    # ------------------------------------------------------------------ worker
    def _work(self, wake: str) -> None:
        tx = self.ctx.socket(zmq.PAIR)
        tx.connect(wake)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                link, entry = job
                if entry.cancelled:  # its session ended while it waited
                    frames, adopt = wire.encode_error(entry.msg.header, session.REFUSAL, code="unauthorized",
                                                      limits=self.o.limits), False
                else:
                    frames, adopt = self._execute(entry.msg)
                self.results.put((link, entry, frames, adopt))
                tx.send(b"")
        finally:
            tx.close(linger=0)

    def _execute(self, msg: Message) -> tuple[list, bool]:
        """(reply frames, whether a successful load moves this shard to the request's run/gen)."""
        h, lim = msg.header, self.o.limits
        try:
            if h.op == "forward":
                y = self.host.forward(h.layer, h.experts, h.offsets, msg.arrays[0], h.step,
                                      train=bool(h.meta.get("train", True)))
                return wire.encode_reply(h, [y], limits=lim), False
            if h.op == "backward":
                dx, sq = self.host.backward(h.layer, h.experts, h.offsets, msg.arrays[0], h.step)
                return wire.encode_reply(h, [dx, sq], limits=lim), False
            if h.op == "update":
                n = self.host.update(h.layer, h.step, float(h.meta["lr"]), _num(h.meta, "scale", 1.0))
                return wire.encode_reply(h, meta={"experts_updated": n}, limits=lim), False
            folder = self._folder(h.meta["dir"])
            if h.op == "save":
                return wire.encode_reply(h, meta=self.host.save(h.layer, folder, self.o.index), limits=lim), False
            files, hashes = _str_list(h.meta, "files"), _str_list(h.meta, "sha256")
            self.host.load(h.layer, folder, files, hashes)
            if h.gen != self.gen or self.run is None:
                self.host.drop_stashes()
            return wire.encode_reply(h, limits=lim), True
        except (HostError, WireError) as e:
            return self._error_frames(h, str(e), e.code), False
        except Exception as e:  # noqa: BLE001 - the shard must stay up whatever one op does
            log.exception("%s failed", h.op)
            return self._error_frames(h, f"{type(e).__name__}: {e}", "internal"), False

    def _error_frames(self, h: Header, message: str, code: str) -> list:
        log.warning("%s (layer %d, step %d) failed: %s (%s)", h.op, h.layer, h.step, message, code)
        return wire.encode_error(h, message, code=code, limits=self.o.limits)

    def _folder(self, text: str) -> Path:
        folder = Path(text).resolve()
        if self.o.root is not None:
            root = Path(self.o.root).resolve()
            if folder != root and root not in folder.parents:
                raise HostError(f"folder {text!r} is outside this shard's checkpoint root {str(root)!r}")
        return folder

    def _drain_results(self) -> None:
        while True:
            try:
                self.wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                link, entry, frames, adopt = self.results.get_nowait()
            except queue.Empty:
                return
            h = entry.msg.header
            entry.msg, entry.frames = None, frames
            if entry.cancelled:
                self._send(link.ident, frames)
                continue
            self.inflight.discard(h.replay_key)
            if adopt and (h.run != self.run or h.gen != self.gen):
                log.info("adopting run %s generation %d (was %s, %d)", h.run, h.gen, self.run, self.gen)
                self.run, self.gen = h.run, h.gen
                self.cache.clear(h.gen)
                self.inflight = {k for k in self.inflight if k[1] == h.gen}
            if h.gen == self.gen and h.run == self.run and entry.session == self.admission.sessions:
                self.cache.put(h.replay_key, frames)
            self._pump(link)

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            log.warning("refused a connection: handshake failed (event %d, value %d)", event["event"],
                        event["value"])

    # ------------------------------------------------------------------ heartbeats, parent
    def _housekeeping(self) -> None:
        now = time.monotonic()
        hb = self.o.heartbeat_s
        timeout = hb * wire.HEARTBEAT_TIMEOUT_S / wire.HEARTBEAT_INTERVAL_S
        for link in list(self.links.values()):
            if not self.admission.admitted(link.ident):
                del self.links[link.ident]  # displaced by a newer session
            elif now - link.heard <= timeout and now - link.sent >= hb and self.run is not None:
                ping = Header(op="ping", run=self.run, gen=self.gen, seq=next(self.seq), meta={"t": time.time()})
                self._send(link.ident, wire.encode(ping, limits=self.o.limits))
        if self.o.parent_pid is not None and os.getppid() != self.o.parent_pid:
            log.warning("coordinator (pid %d) is gone; exiting", self.o.parent_pid)
            self.stopping = True
        if self.o.idle_exit_s is not None and now - self.last_heard > self.o.idle_exit_s:
            log.warning("no client for %.0f s; exiting", now - self.last_heard)
            self.stopping = True


def _num(meta: Any, key: str, default: float) -> float:
    v = meta.get(key, default)
    if type(v) not in (int, float):
        raise HostError(f"meta[{key!r}] must be a number, got {type(v).__name__}")
    return float(v)


def _str_list(meta: Any, key: str) -> tuple:
    v = meta.get(key, ())
    if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
        raise HostError(f"meta[{key!r}] must be a list of str, got {v!r}")
    return v


# ----------------------------------------------------------------------------- process entry


def die_with_parent(parent_pid: int) -> bool:
    """Linux: get SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); the poll is the fallback.
    Returns False when the parent is already gone (it died before prctl took effect)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM, so we still clean up
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent_pid


def return_freed_memory() -> None:
    """glibc: serve every allocation >= 1 MiB by mmap, so freed message buffers go back to the
    system at once (glibc's default threshold rises with use, and the heap then keeps them)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, which also stops the adjustment)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_server(options: ServerOptions, *, ready=print) -> int:
    """Build, announce (a 'READY <endpoint>' line) and serve; SIGTERM stops it cleanly."""
    if options.parent_pid is not None:
        if not die_with_parent(options.parent_pid):
            remove_launch_folder(options.bind, orphaned=True)
            return 0
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which stops us
    if any(op == "start" and step == options.attempt and gen in (None, options.gen)
           for op, step, gen in options.faults):
        os.kill(os.getpid(), signal.SIGKILL)  # testing aid: die before READY
    return_freed_memory()

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: never interrupt the cleanup
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = ShardServer(options)
    why = "shutdown or coordinator gone"
    try:
        ready(f"READY {server.endpoint} pid={os.getpid()}")
        server.serve()
    except SystemExit:
        alive = options.parent_pid is None or os.getppid() == options.parent_pid
        why = f"SIGTERM ({'parent alive' if alive else 'parent gone'})"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.close()
        log.info("stopped on %s", why)
        if options.parent_pid is not None:
            remove_launch_folder(server.endpoint, orphaned=os.getppid() != options.parent_pid)
    return 0


def remove_launch_folder(endpoint: str, orphaned: bool) -> None:
    """A launched ipc shard removes its socket file, and the launcher's folder once it is empty.

    When the coordinator is gone (killed with -9, so it cannot tidy up) every shard of the
    folder is exiting too, so each one out removes the whole folder: a sibling that died
    without running its own cleanup must not leave its socket file behind. Removing is
    idempotent, so two shards doing it at once leave nothing either."""
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    path.unlink(missing_ok=True)
    if not path.parent.name.startswith("moe-shards-"):
        return
    if orphaned:
        log.info("removing the launch folder %s (the coordinator is gone)", path.parent)
        shutil.rmtree(path.parent, ignore_errors=True)
        return
    try:
        path.parent.rmdir()
    except OSError:
        pass  # not empty yet: another shard's socket; the launcher removes the folder
