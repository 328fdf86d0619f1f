"""The expert shard server: a ROUTER socket in front of a bank of experts for every MoE layer.

Two threads. The I/O thread owns the socket: it decodes and validates every message, answers
`ping` and `stats` itself (so a long forward is never mistaken for death), keeps the replay
cache (a duplicated request gets its cached reply and is never executed twice), sends
heartbeats to its clients and watches for a vanished coordinator. The worker thread runs the
ops that touch expert state (forward, backward, update, save, load) one at a time, in arrival
order. The math is the in-process math: each layer is a `LocalExperts` holding only this
shard's experts, fed the same rows in the same per-expert order, so results are bit-identical.
Run it with `python -m moe.sharding.server ...` or `moe shard serve ...`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from moe.checkpoint import CheckpointError, fsync_dir
from moe.experts import state
from moe.experts.local import LocalExperts
from moe.optim import Adam
from moe.rss import resident
from moe.sharding import security, wire
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, Message, WireError

log = logging.getLogger("moe.shard")

WORKER_OPS = ("forward", "backward", "update", "save", "load")
PART_FILE = re.compile(r"experts-l(\d+)(-s\d+)?(\.adam)?\.safetensors")
REPLAY_ENTRIES = 64
REPLAY_BYTES = 256 << 20


class HostError(Exception):
    """An op that cannot be executed; `code` is the wire error code of the reply."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


def parse_experts(text: str) -> tuple[int, ...]:
    """'0-31', '0,5,7' or '0-3,8' -> sorted distinct expert ids."""
    ids: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"experts must look like '0-31' or '0,5,7', got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"expert range {part!r} is empty (end before start)")
        ids.update(range(lo, hi + 1))
    if not ids:
        raise ValueError(f"experts must name at least one expert, got {text!r}")
    return tuple(sorted(ids))


def format_experts(ids: Any) -> str:
    """The shortest '0-3,8' spelling of a set of expert ids (for command lines)."""
    ids = sorted(int(i) for i in ids)
    runs, start = [], None
    for a, b in itertools.zip_longest(ids, ids[1:]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ",".join(runs)


def parse_fault(text: str) -> tuple[str, int]:
    """'forward@7' -> ('forward', 7): a testing aid, see ServerOptions.faults."""
    m = re.fullmatch(r"(forward|backward|update|save|load)@(\d+)", text)
    if not m:
        raise ValueError(f"a fault must look like 'forward@7' (op@step), got {text!r}")
    return m.group(1), int(m.group(2))


# ----------------------------------------------------------------------------- compute


class ExpertHost:
    """This shard's experts for every layer: one LocalExperts per layer over the hosted ids.

    Local index i holds global expert ids[i]; ids ascend, so local order is global order. Each
    layer keeps the activations of its most recent forward (as an in-process bank does: the
    ExpertGroup API has no train flag, and evaluation forwards come between steps); a backward
    must name the same step, experts and offsets, and frees them.
    """

    def __init__(self, experts: tuple[int, ...], n_layers: int, d_model: int, d_hidden: int, *,
                 activation: str = "relu", rng: np.random.Generator) -> None:
        if not experts:
            raise ValueError("a shard must host at least one expert, got none")
        self.ids = np.asarray(sorted(experts), dtype=np.int64)  # [n]
        if np.unique(self.ids).size != self.ids.size:
            raise ValueError(f"hosted experts must be distinct, got {list(experts)[:16]}")
        self.d_model = d_model
        self.banks = [LocalExperts(self.ids.size, d_model, d_hidden, activation=activation, rng=rng)
                      for _ in range(n_layers)]
        self.stash: list[tuple | None] = [None] * n_layers  # (experts, offsets, perm) of the last forward
        self.last_update = [-1] * n_layers  # step of the last applied update, per layer
        self.rows = [np.zeros(self.ids.size, dtype=np.int64) for _ in range(n_layers)]

    # -- helpers
    def _bank(self, layer: int) -> LocalExperts:
        if not 0 <= layer < len(self.banks):
            raise HostError(f"layer must be in [0, {len(self.banks)}), got {layer}")
        return self.banks[layer]

    def _local(self, experts: tuple[int, ...]) -> np.ndarray:
        g = np.asarray(experts, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, g), 0, self.ids.size - 1)
        bad = g[self.ids[pos] != g] if g.size else g
        if bad.size:
            raise HostError(f"experts {bad[:8].tolist()} are not hosted by this shard", "not_found")
        return pos  # [n_req]

    def _plan(self, experts: tuple[int, ...], offsets: tuple[int, ...]):
        """Local offsets [n+1] and, when the request is not in ascending id order, a row permutation."""
        li = self._local(experts)
        o = np.asarray(offsets, dtype=np.int64)
        counts = np.zeros(self.ids.size, dtype=np.int64)
        counts[li] = np.diff(o)
        local_offsets = np.concatenate([[0], np.cumsum(counts)])  # [n+1]
        perm = None
        if li.size > 1 and np.any(np.diff(li) < 0):
            order = np.argsort(li, kind="stable")
            perm = np.concatenate([np.arange(o[i], o[i + 1]) for i in order])  # [N] local row -> request row
        return li, local_offsets, perm

    def _check_rows(self, x: np.ndarray, what: str) -> np.ndarray:
        if x.dtype != np.float32 or x.shape[1] != self.d_model:
            raise HostError(f"{what} must be float32 [N, {self.d_model}], got {x.dtype} {list(x.shape)}")
        return x

    # -- ops
    def forward(self, layer: int, experts: tuple, offsets: tuple, x: np.ndarray, step: int = 0) -> np.ndarray:
        bank = self._bank(layer)
        self._check_rows(x, "forward rows")
        li, local_offsets, perm = self._plan(experts, offsets)
        xl = x if perm is None else x[perm]  # [N, d] in local expert order
        yl = bank.forward(xl, local_offsets)  # [N, d]
        self.stash[layer] = (tuple(experts), tuple(offsets), perm, step)
        self.rows[layer][li] += np.diff(np.asarray(offsets, dtype=np.int64))
        if perm is None:
            return yl
        y = np.empty_like(yl)
        y[perm] = yl
        return y

    def backward(self, layer: int, experts: tuple, offsets: tuple, dy: np.ndarray, step: int = 0):
        bank = self._bank(layer)
        self._check_rows(dy, "backward rows")
        st = self.stash[layer]
        if st is None:
            raise HostError(f"backward for layer {layer} without a forward to match")
        if st[0] != tuple(experts) or st[1] != tuple(offsets) or st[3] != step:
            raise HostError(f"backward (step {step}) experts/offsets differ from the last forward of layer "
                            f"{layer} (step {st[3]})")
        self.stash[layer] = None
        perm = st[2]
        dxl = bank.backward(dy if perm is None else dy[perm])  # [N, d]
        if perm is None:
            dx = dxl
        else:
            dx = np.empty_like(dxl)
            dx[perm] = dxl
        touched, sq = bank.expert_sq_norms()  # local ids ascending, float64
        sq_local = np.zeros(self.ids.size, dtype=np.float64)
        sq_local[touched] = sq
        return dx, sq_local[self._local(experts)]  # [N, d], [n_req] in request order

    def update(self, layer: int, step: int, lr: float, scale: float) -> int:
        bank = self._bank(layer)
        if step <= self.last_update[layer]:
            raise HostError(f"update for step {step} of layer {layer}, but step "
                            f"{self.last_update[layer]} was already applied")
        bank.apply_update(lr, scale)
        self.last_update[layer] = step
        return int(bank.bank.touched.size)

    def save(self, layer: int, folder: Path, index: int) -> dict[str, Any]:
        bank = self._bank(layer)
        if not folder.is_dir():
            raise HostError(f"save folder {str(folder)!r} does not exist", "not_found")
        stem = state.part_stem(layer, index)
        rows = state.export_rows(bank.params, bank.optimizer, self.ids)
        tmp = folder / f".{stem}.tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        try:
            entries = state.write_part(tmp, stem, rows, layer)  # written and fsynced
            for name in entries:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder)
        (name, w), (adam_name, a) = sorted(entries.items(), key=lambda kv: kv[1]["kind"])
        return {"file": name, "sha256": w["sha256"], "bytes": w["bytes"], "n_experts": w["n_experts"],
                "adam_file": adam_name, "adam_sha256": a["sha256"], "adam_bytes": a["bytes"],
                "adam_n_experts": a["n_experts"]}

    def load(self, layer: int, folder: Path, files: tuple, hashes: tuple) -> None:
        bank = self._bank(layer)
        if len(files) != len(hashes):
            raise HostError(f"load needs one sha256 per file, got {len(files)} files and {len(hashes)} hashes")
        entries = {}
        for f, h in zip(files, hashes, strict=True):
            m = PART_FILE.fullmatch(f) if isinstance(f, str) else None
            if m is None or int(m.group(1)) != layer or not isinstance(h, str):
                raise HostError(f"load files must be expert parts 'experts-l{layer}[-sN][.adam].safetensors', got {f!r}")
            try:
                size = os.stat(folder / f).st_size  # the sha256 is what protects the bytes
            except FileNotFoundError:
                raise HostError(f"load layer {layer} from {str(folder)!r}: {f} is missing", "not_found") from None
            entries[f] = {"kind": state.ADAM if m.group(3) else state.WEIGHTS, "layer": layer, "sha256": h, "bytes": size}
        try:
            # verify everything before changing anything: a failed load keeps the old state
            weights = {n: np.empty_like(p) for n, p in bank.params.items()}
            state.load_weights(folder, entries, layer, self.ids, weights)
            fresh = Adam(weights, bank.optimizer.config, lazy_rows=True)
            state.load_adam(folder, entries, layer, self.ids, fresh)
            bank.load_state_dict({**weights, **fresh.state_dict("adam.")})
        except (CheckpointError, FileNotFoundError) as e:
            raise HostError(f"load layer {layer} from {str(folder)!r}: {e}", "not_found") from None
        self.stash[layer] = None
        bank.bank._cache = None
        self.last_update[layer] = -1

    def drop_stashes(self) -> None:
        for i, bank in enumerate(self.banks):
            self.stash[i] = None
            bank.bank._cache = None


# ----------------------------------------------------------------------------- replay cache


class ReplayCache:
    """Replies by replay key for the current generation; evicted keys are remembered by seq."""

    def __init__(self, gen: int = 0, entries: int = REPLAY_ENTRIES, budget: int = REPLAY_BYTES) -> None:
        self.entries, self.budget = entries, budget
        self.clear(gen)

    def clear(self, gen: int) -> None:
        """Forget everything: a new generation starts (its seq numbers are checked afresh)."""
        self.gen = gen
        self.replies: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
        self.by_seq: dict[int, tuple] = {}
        self.bytes = 0
        self.evicted_seq = 0  # every seq <= this one was evicted (or never cached)

    def get(self, key: tuple) -> list | None:
        hit = self.replies.get(key)
        return None if hit is None else hit[0]

    def conflict(self, key: tuple) -> str | None:
        """Why a new request with this key may not run, or None."""
        seq = key[4]
        if key[1] != self.gen:
            return None  # a 'load' moving to a newer generation: the old cache does not apply
        if seq in self.by_seq and self.by_seq[seq] != key:
            return f"seq {seq} was already used for another request ({self.by_seq[seq][5]!r})"
        if seq <= self.evicted_seq:
            return f"seq {seq} is at or below the evicted replies (<= {self.evicted_seq}): reply evicted"
        return None

    def put(self, key: tuple, frames: list) -> None:
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        self.replies[key] = (frames, size)
        self.by_seq[key[4]] = key
        self.bytes += size
        while len(self.replies) > self.entries or (self.bytes > self.budget and len(self.replies) > 1):
            old, (_, n) = self.replies.popitem(last=False)
            self.bytes -= n
            self.by_seq.pop(old[4], None)
            self.evicted_seq = max(self.evicted_seq, old[4])


# ----------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerOptions:
    """Everything a shard needs; see `moe shard serve --help` for the meaning of each."""

    bind: str
    experts: tuple[int, ...]
    n_layers: int
    d_model: int
    d_hidden: int
    activation: str = "relu"
    run: str | None = None  # None: bind to the run of the first 'load'
    gen: int = 0
    index: int = 0
    heartbeat_s: float = wire.HEARTBEAT_INTERVAL_S
    parent_pid: int | None = None  # launched by a coordinator: exit when it goes away
    idle_exit_s: float | None = None  # exit after this long without hearing from any client
    root: str | None = None  # save/load only below this folder
    curve_dir: str | None = None
    faults: tuple[tuple[str, int], ...] = ()  # testing aid: SIGKILL self on (op, step) in gen 0
    seed: int = 0
    limits: Limits = field(default=DEFAULT_LIMITS)


class ShardServer:
    """Serves one run until shutdown, SIGTERM, or (when launched) the coordinator's death."""

    def __init__(self, options: ServerOptions, *, ctx: zmq.Context | None = None) -> None:
        o = options
        security.check_bind(o.bind, curve=o.curve_dir is not None)
        self.o = o
        self.run, self.gen = o.run, o.gen
        self.host = ExpertHost(o.experts, o.n_layers, o.d_model, o.d_hidden, activation=o.activation,
                               rng=np.random.default_rng(o.seed))
        self.ctx = ctx or zmq.Context.instance()
        self.cache = ReplayCache(o.gen)
        self.inflight: set[tuple] = set()
        self.clients: dict[bytes, list[float]] = {}  # identity -> [last heard, last sent]
        self.last_heard = time.monotonic()
        self.seq = itertools.count(1)
        self.counters = {"requests": 0, "bytes_in": 0, "bytes_out": 0}
        self.started = time.monotonic()
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.stopping = False
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        wire.configure_socket(self.sock, o.limits)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = None
        if o.curve_dir is not None:
            curve = security.ServerCurve.from_dir(o.curve_dir)
            self.auth = security.start_authenticator(self.ctx, curve, log)
            curve.apply(self.sock)
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
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake_rx, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        tick = max(0.01, min(self.o.heartbeat_s / 2, 0.25))
        log.info("shard %d serving experts %s of %d layers on %s (run %s, gen %d)", self.o.index,
                 format_experts(self.o.experts), self.o.n_layers, self.endpoint, self.run, self.gen)
        try:
            while not self.stopping:
                events = dict(poller.poll(int(tick * 1000)))
                if self.sock in events:
                    self._drain_socket()
                if self.wake_rx in events:
                    self._drain_results()
                if self.monitor is not None and self.monitor in events:
                    self._drain_monitor()
                self._housekeeping()
        finally:
            self.close()

    def close(self) -> None:
        self.stopping = True
        self.jobs.put(None)
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
            log.warning("client %s is not reading; reply dropped", ident.hex())
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client went away
            log.info("client %s unreachable (%s); forgetting it", ident.hex(), e)
            self.clients.pop(ident, None)
            return
        if ident in self.clients:
            self.clients[ident][1] = time.monotonic()

    def _error(self, ident: bytes, request: Header | None, message: str, code: str) -> list:
        log.warning("refused %s: %s (%s)", request.op if request is not None else "message", message, code)
        frames = wire.encode_error(request, message, code=code, limits=self.o.limits)
        self._send(ident, frames)
        return frames

    # ------------------------------------------------------------------ one message
    def _on_message(self, raw: list) -> None:
        if len(raw) < 2:
            return  # nothing routable
        ident = bytes(raw[0].buffer)
        now = time.monotonic()
        self.last_heard = now
        self.clients.setdefault(ident, [now, now])[0] = now
        self.counters["bytes_in"] += sum(f.buffer.nbytes for f in raw[1:])
        try:
            msg = wire.decode(raw[1:], limits=self.o.limits)
        except WireError as e:
            request = e.header if e.header is not None and not e.header.is_reply else None
            self._error(ident, request, str(e), e.code)
            return
        h = msg.header
        if h.is_reply:  # a pong to our heartbeat, or an error a client sent us
            if h.op == "error":
                log.warning("client %s sent an error: %s", ident.hex(), dict(h.meta))
            return
        self.counters["requests"] += 1
        if h.op == "ping":
            self._on_ping(ident, msg)
            return
        if not self._session_ok(ident, h):
            return
        if h.op == "stats":
            self._send(ident, self._stats(h))
            return
        if h.op == "shutdown":
            self._send(ident, wire.encode_reply(h, limits=self.o.limits))
            log.info("shutdown requested by %s", ident.hex())
            self.stopping = True
            return
        key = h.replay_key
        cached = self.cache.get(key)
        if cached is not None:
            log.info("replaying the reply to %s seq %d", h.op, h.seq)
            self._send(ident, cached)
            return
        if key in self.inflight:
            return  # a resend of a request still running: its reply is on the way
        why = self.cache.conflict(key)
        if why is not None:
            self._error(ident, h, why, "bad_request")
            return
        self._maybe_fault(h)
        self.inflight.add(key)
        self.jobs.put((ident, msg))

    def _on_ping(self, ident: bytes, msg: Message) -> None:
        h = msg.header
        if self.run is not None and h.run != self.run:  # pings ignore the generation (§9)
            self._error(ident, h, f"message is for run {h.run!r}, this is run {self.run!r}", "wrong_run")
            return
        self._send(ident, wire.encode_reply(h, list(msg.arrays), limits=self.o.limits))

    def _session_ok(self, ident: bytes, h: Header) -> bool:
        if self.run is None:
            if h.op == "stats":
                return True
            if h.op != "load":
                self._error(ident, h, "this shard is not bound to a run yet; send 'load' first", "bad_request")
                return False
            return True  # the first load binds run and gen (see _finish)
        try:
            wire.check_session(h, run=self.run, gen=self.gen)
        except WireError as e:
            self._error(ident, h, str(e), e.code)
            return False
        return True

    def _maybe_fault(self, h: Header) -> None:
        if self.gen == 0 and (h.op, h.step) in self.o.faults:
            log.warning("fault injection: SIGKILL on %s at step %d (layer %d)", h.op, h.step, h.layer)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _stats(self, h: Header) -> list:
        if not 0 <= h.layer < self.o.n_layers:
            return wire.encode_error(h, f"layer must be in [0, {self.o.n_layers}), got {h.layer}",
                                     limits=self.o.limits)
        rows = self.host.rows[h.layer].copy()
        if h.meta.get("reset", False):
            self.host.rows[h.layer][:] = 0
        meta = {**self.counters, "uptime_s": time.monotonic() - self.started, "index": self.o.index,
                "n_layers": self.o.n_layers, "d_model": self.o.d_model, "gen": self.gen,
                **self.host.banks[h.layer].memory(), **resident()}
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
                ident, msg = job
                frames, adopt = self._execute(msg)
                self.results.put((ident, msg.header, frames, adopt))
                tx.send(b"")
        finally:
            tx.close(linger=0)

    def _execute(self, msg: Message) -> tuple[list, bool]:
        """(reply frames, whether a successful load moves this shard to the request's run/gen)."""
        h, lim = msg.header, self.o.limits
        try:
            if h.op == "forward":
                y = self.host.forward(h.layer, h.experts, h.offsets, msg.arrays[0], h.step)
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
            if h.gen != self.gen or self.run is None:
                self.host.drop_stashes()
            self.host.load(h.layer, folder, files, hashes)
            return wire.encode_reply(h, limits=lim), True
        except HostError as e:
            return self._error_frames(h, str(e), e.code), False
        except WireError as e:
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
                ident, h, frames, adopt = self.results.get_nowait()
            except queue.Empty:
                return
            self.inflight.discard(h.replay_key)
            if adopt and (h.run != self.run or h.gen != self.gen):
                log.info("adopting run %s generation %d (was %s, %d)", h.run, h.gen, self.run, self.gen)
                self.run, self.gen = h.run, h.gen
                self.cache.clear(h.gen)
                self.inflight = {k for k in self.inflight if k[1] == h.gen}
            if h.gen == self.gen and h.run == self.run:
                self.cache.put(h.replay_key, frames)
            self._send(ident, frames)

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            log.warning("refused a connection: handshake failed (event %d, value %d) from %s",
                        event["event"], event["value"], event.get("endpoint"))

    # ------------------------------------------------------------------ heartbeats, parent
    def _housekeeping(self) -> None:
        now = time.monotonic()
        hb = self.o.heartbeat_s
        timeout = hb * wire.HEARTBEAT_TIMEOUT_S / wire.HEARTBEAT_INTERVAL_S
        for ident, (heard, sent) in list(self.clients.items()):
            if now - heard > 10 * timeout:
                self.clients.pop(ident, None)  # silent for long: forget its routing id
            elif now - heard <= timeout and now - sent >= hb and self.run is not None:
                ping = Header(op="ping", run=self.run, gen=self.gen, seq=next(self.seq), meta={"t": time.time()})
                self._send(ident, wire.encode(ping, limits=self.o.limits))
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


def die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); the poll is the fallback."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM, so we still clean up
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def run_server(options: ServerOptions, *, ready=print) -> int:
    """Build, announce (a 'READY <endpoint>' line) and serve; SIGTERM stops it cleanly."""
    if options.parent_pid is not None:
        die_with_parent(options.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which stops us

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = ShardServer(options)
    try:
        ready(f"READY {server.endpoint} pid={os.getpid()}")
        server.serve()
    except SystemExit:
        pass
    finally:
        server.close()
        if options.parent_pid is not None:
            _remove_launch_folder(server.endpoint, orphaned=os.getppid() != options.parent_pid)
    return 0


def _remove_launch_folder(endpoint: str, orphaned: bool) -> None:
    """A launched ipc shard removes its socket file, and the launcher's folder once it is empty.

    When the coordinator is gone (killed with -9, so it cannot tidy up) every shard of the
    folder is exiting too, so the first one out removes the whole folder: a sibling that
    died without running its own cleanup must not leave its socket file behind."""
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    path.unlink(missing_ok=True)
    if not path.parent.name.startswith("moe-shards-"):
        return
    if orphaned:
        shutil.rmtree(path.parent, ignore_errors=True)
        return
    try:
        path.parent.rmdir()
    except OSError:
        pass  # not empty yet: another shard's socket; the launcher removes the folder


if __name__ == "__main__":
    import sys

    from moe.sharding.cli import serve_main

    sys.exit(serve_main())
