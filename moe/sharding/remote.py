"""The coordinator side: links to the shards and RemoteExperts, the ExpertGroup over them.

`ShardLinks` holds one DEALER per shard (shared by every layer's RemoteExperts), the
per-shard sequence counters and the generation. `call` scatters one request per shard before
waiting for any reply (the shards compute concurrently), then gathers, resending the identical
request on silence and raising `ShardFailure` (an ExpertGroupFailure) when a shard is dead
(its process exited, or it missed its heartbeats) or stalled (no reply within the deadline).
A separate heartbeat thread, with its own DEALERs, pings every shard so both sides notice
silence even while the trainer is busy elsewhere.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from moe.checkpoint import MANIFEST
from moe.experts import state
from moe.experts.protocol import ExpertGroupFailure
from moe.sharding import wire
from moe.sharding.security import ClientCurve
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, Message, WireError

log = logging.getLogger("moe.sharding")

Liveness = Callable[[int], "str | None"]  # shard index -> why it is dead, or None


class ShardFailure(ExpertGroupFailure):
    """A shard died or stalled mid-request; the step is void (the trainer rolls back)."""

    def __init__(self, message: str, *, shard: int, op: str, waited_s: float) -> None:
        super().__init__(message)
        self.shard, self.op, self.waited_s = shard, op, waited_s


class ShardError(RuntimeError):
    """A shard refused a request (a bug, a bad checkpoint, a wrong address): not transient."""

    def __init__(self, message: str, *, shard: int, code: str) -> None:
        super().__init__(message)
        self.shard, self.code = shard, code


def contiguous_placement(n_experts: int, n_shards: int) -> np.ndarray:
    """Expert e -> shard floor(e * S / E): S contiguous, near-equal ranges. int32[E]."""
    if not 1 <= n_shards <= n_experts:
        raise ValueError(f"need 1 <= shards <= n_experts={n_experts}, got {n_shards} shards")
    return (np.arange(n_experts, dtype=np.int64) * n_shards // n_experts).astype(np.int32)


def load_placement_file(path: str, n_experts: int, n_shards: int) -> np.ndarray:
    """A placement JSON written by the profiler (moe.profiling.placement), checked against S."""
    from moe.profiling.placement import load_placement

    a = load_placement(path, n_experts)
    bins = int(a.max()) + 1
    if bins != n_shards:
        raise ValueError(f"placement file {path} places experts on {bins} shards, the run has {n_shards}")
    return a.astype(np.int32)


# ----------------------------------------------------------------------------- heartbeats


class Heartbeat(threading.Thread):
    """Pings every shard each interval on its own link and answers the shards' pings."""

    def __init__(self, ctx: zmq.Context, endpoints: Sequence[str], *, run: str, interval: float,
                 curve: ClientCurve | None, limits: Limits) -> None:
        super().__init__(name="moe-heartbeat", daemon=True)
        self.ctx, self.endpoints, self.run_id, self.interval = ctx, list(endpoints), run, interval
        self.curve, self.limits = curve, limits
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
        socks = [_dealer(self.ctx, ep, self.curve, self.limits) for ep in self.endpoints]
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(socks)}
        last_sent = 0.0
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                if now - last_sent >= self.interval:
                    last_sent = now
                    for s in socks:
                        h = Header(op="ping", run=self.run_id, gen=self.gen, seq=next(self._seq), meta={"t": time.time()})
                        _try_send(s, wire.encode(h, limits=self.limits))
                for s, _ in poller.poll(int(min(self.interval / 4, 0.1) * 1000)):
                    self._drain(s, index[s])
        finally:
            for s in socks:
                s.close(linger=0)

    def _drain(self, s: zmq.Socket, i: int) -> None:
        while True:
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.heard[i] = time.monotonic()
            try:
                msg = wire.decode(frames, limits=self.limits)
            except WireError:
                continue
            if msg.header.op == "ping":
                _try_send(s, wire.encode_reply(msg.header, list(msg.arrays), limits=self.limits))


def _dealer(ctx: zmq.Context, endpoint: str, curve: ClientCurve | None, limits: Limits) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    wire.configure_socket(s, limits)
    s.setsockopt(zmq.RECONNECT_IVL, 50)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
    if curve is not None:
        curve.apply(s)
    s.connect(endpoint)
    return s


def _try_send(s: zmq.Socket, frames: list) -> bool:
    try:
        s.send_multipart(frames, zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


# ----------------------------------------------------------------------------- links


class ShardLinks:
    """One DEALER per shard, sequence numbers, the run and generation, deadlines and retries."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        run: str,
        gen: int = 0,
        deadline_s: float = 5.0,
        retries: int = 2,
        heartbeat_s: float = wire.HEARTBEAT_INTERVAL_S,
        curve: ClientCurve | None = None,
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
        self.curve, self.liveness, self.limits = curve, liveness, limits
        self.ctx = ctx or zmq.Context.instance()
        self._seq = [itertools.count(1) for _ in self.endpoints]  # survives reconnects and rollbacks
        self.socks = [_dealer(self.ctx, ep, curve, limits) for ep in self.endpoints]
        self.bytes_sent = self.bytes_received = 0
        self.launcher: Any = None  # the LocalShards that started these shards, if any
        self.hb: Heartbeat | None = None
        if heartbeat:
            self.hb = Heartbeat(self.ctx, self.endpoints, run=run, interval=heartbeat_s, curve=curve, limits=limits)
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

    def bump_generation(self) -> int:
        """A rollback: new generation, fresh sockets (queued stale requests are discarded)."""
        self.gen += 1
        for i, s in enumerate(self.socks):
            s.close(linger=0)
            self.socks[i] = _dealer(self.ctx, self.endpoints[i], self.curve, self.limits)
        if self.hb is not None:
            self.hb.gen = self.gen
            for i in range(self.n_shards):
                self.hb.reset(i)
        return self.gen

    # ------------------------------------------------------------------ requests
    def call(
        self,
        op: str,
        requests: Mapping[int, tuple[Sequence[int], Sequence[int], Sequence[np.ndarray], Mapping[str, Any]]],
        *,
        layer: int = 0,
        step: int = 0,
        deadline_s: float | None = None,
    ) -> dict[int, Message]:
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
        poller = zmq.Poller()
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
        if why is None and op != "ping" and self.hb is not None and self.hb.silent_for(i) > self.hb_timeout:
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
                _try_send(sock, wire.encode_reply(h, list(msg.arrays), limits=self.limits))
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
        if code in ("internal", "future_generation"):
            raise ShardFailure(message, shard=i, op=request.op, waited_s=0.0)
        raise ShardError(message, shard=i, code=str(code))

    # ------------------------------------------------------------------ helpers
    def ping_all(self, timeout_s: float) -> None:
        """Every shard answers a ping within timeout_s (used to wait for readiness)."""
        self.call("ping", {i: ((), (0,), (), {"t": time.time()}) for i in range(self.n_shards)},
                  deadline_s=timeout_s)

    def hosted(self, layer: int = 0) -> list[np.ndarray]:
        """The expert ids each shard hosts (from 'stats')."""
        replies = self.call("stats", {i: ((), (0,), (), {}) for i in range(self.n_shards)}, layer=layer)
        return [np.asarray(replies[i].arrays[0], dtype=np.int64) for i in range(self.n_shards)]


# ----------------------------------------------------------------------------- the group


class RemoteExperts:
    """ExpertGroup for one MoE layer whose experts live on shard servers.

    `placement[e]` is the shard of expert e. Each shard gets, in ascending id order, the rows of
    its experts (every shard gets a request each step, possibly empty, so its state stays in
    lock-step). The reply rows go back to their places in the packed order.
    """

    def __init__(self, links: ShardLinks, layer: int, n_experts: int, d_model: int, placement: np.ndarray) -> None:
        placement = np.asarray(placement)
        if placement.shape != (n_experts,) or placement.dtype.kind not in "iu":
            raise ValueError(f"placement must be int [{n_experts}], got {placement.dtype} {list(placement.shape)}")
        if placement.size and (placement.min() < 0 or placement.max() >= links.n_shards):
            raise ValueError(f"placement must name shards in [0, {links.n_shards}), got "
                             f"[{placement.min()}, {placement.max()}]")
        self.links, self.layer, self.n_experts, self.d_model = links, layer, n_experts, d_model
        self.placement = placement.astype(np.int64)
        self.shard_experts = [np.flatnonzero(self.placement == s) for s in range(links.n_shards)]  # ascending
        self.step = 0
        self._fwd: tuple | None = None
        self._sq: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ data path
    def _split(self, offsets: np.ndarray):
        """Per shard: (experts with rows, their offsets, row selector) in ascending id order."""
        plan = {}
        for s, ids in enumerate(self.shard_experts):
            counts = offsets[ids + 1] - offsets[ids]  # [n_s]
            nz = counts > 0
            ex, lo, n = ids[nz], offsets[ids[nz]], counts[nz]
            offs = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            if ex.size == 0:
                sel: Any = slice(0, 0)
            elif np.all(lo[1:] == lo[:-1] + n[:-1]):
                sel = slice(int(lo[0]), int(lo[0] + offs[-1]))  # contiguous rows: send a view
            else:
                sel = np.concatenate([np.arange(a, a + c) for a, c in zip(lo, n, strict=True)])
            plan[s] = (ex.tolist(), offs.tolist(), sel)
        return plan

    def forward(self, packed: np.ndarray, offsets: np.ndarray, keep: bool = True) -> np.ndarray:
        """packed [N, d] grouped by expert -> out [N, d], computed on the shards.

        keep is accepted for the protocol; a shard keeps its latest forward's activations
        either way (they live on the shard, and an evaluation forward replaces them)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (self.n_experts + 1,):
            raise ValueError(f"offsets must be [{self.n_experts + 1}], got {list(offsets.shape)}")
        if packed.ndim != 2 or packed.shape != (int(offsets[-1]), self.d_model) or packed.dtype != np.float32:
            raise ValueError(f"packed must be float32 [{int(offsets[-1])}, {self.d_model}], "
                             f"got {packed.dtype} {list(packed.shape)}")
        plan = self._split(offsets)
        req = {s: (ex, offs, [np.ascontiguousarray(packed[sel])], {}) for s, (ex, offs, sel) in plan.items()}
        replies = self.links.call("forward", req, layer=self.layer, step=self.step)
        out = np.empty_like(packed)  # [N, d]
        for s, (_, offs, sel) in plan.items():
            out[sel] = self._rows(replies[s], s, offs[-1])  # [n_s, d]
        self._fwd = (plan, packed.shape[0])
        self._sq = None
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out [N, d] -> grad of the packed rows [N, d]; weight grads stay on the shards."""
        if self._fwd is None:
            raise ValueError("experts backward called before forward")
        plan, n = self._fwd
        if grad_out.shape != (n, self.d_model) or grad_out.dtype != np.float32:
            raise ValueError(f"grad_out must be float32 [{n}, {self.d_model}], got {grad_out.dtype} {list(grad_out.shape)}")
        self._fwd = None
        req = {s: (ex, offs, [np.ascontiguousarray(grad_out[sel])], {}) for s, (ex, offs, sel) in plan.items()}
        replies = self.links.call("backward", req, layer=self.layer, step=self.step)
        dx = np.empty_like(grad_out)  # [N, d]
        ids, sq = [], []
        for s, (ex, offs, sel) in plan.items():
            msg = replies[s]
            dx[sel] = self._rows(msg, s, offs[-1])
            if len(msg.arrays) != 2:
                raise ShardError(f"shard {s} sent no squared gradient norms with its backward reply",
                                 shard=s, code="bad_request")
            ids.append(np.asarray(ex, dtype=np.int64))
            sq.append(msg.arrays[1])
        ids_all, sq_all = np.concatenate(ids), np.concatenate(sq).astype(np.float64)
        order = np.argsort(ids_all, kind="stable")
        self._sq = (ids_all[order], sq_all[order])
        return dx

    def _rows(self, msg: Message, s: int, n: int) -> np.ndarray:
        y = msg.arrays[0]
        if y.shape != (n, self.d_model) or y.dtype != np.float32:
            raise ShardError(f"shard {s} replied float32 [{n}, {self.d_model}] expected, got {y.dtype} "
                             f"{list(y.shape)}", shard=s, code="bad_request")
        return y

    def expert_sq_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, float64 squared grad norm of each expert that got rows), as LocalExperts."""
        if self._sq is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return self._sq

    def grad_sq_norm(self) -> float:
        # Sum over ascending global ids: the same array, so the same bits, as LocalExperts.
        return float(np.sum(self.expert_sq_norms()[1]))

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None:
        meta = {"lr": float(lr), "scale": float(grad_scale)}
        self.links.call("update", {s: ((), (0,), (), meta) for s in self._active()}, layer=self.layer,
                        step=self.step + 1)
        self.step += 1

    def _active(self) -> list[int]:
        return [s for s, ids in enumerate(self.shard_experts) if ids.size]

    # ------------------------------------------------------------------ checkpoints
    def save_part(self, folder: Path, layer: int) -> dict[str, dict]:
        """Each shard writes experts-l{layer}-s{shard}.safetensors and its .adam.safetensors
        into folder (shared file system)."""
        meta = {"dir": str(Path(folder).resolve()), "tag": f"l{layer}"}
        replies = self.links.call("save", {s: ((), (0,), (), meta) for s in self._active()}, layer=layer,
                                  step=self.step)
        entries = {}
        for _, msg in sorted(replies.items(), key=lambda kv: kv[0]):
            m = msg.header.meta
            for pre, kind in (("", state.WEIGHTS), ("adam_", state.ADAM)):
                entries[str(m[f"{pre}file"])] = {"sha256": m[f"{pre}sha256"], "bytes": int(m[f"{pre}bytes"]),
                                                 "kind": kind, "layer": int(layer),
                                                 "n_experts": int(m[f"{pre}n_experts"])}
        return entries

    def load_part(self, folder: Path, entries: dict[str, dict], layer: int) -> None:
        """Each shard reads its experts' rows from whichever part files hold them (any sharding)."""
        parts = sorted((f, e) for f, e in entries.items()
                       if e.get("kind") in (state.WEIGHTS, state.ADAM) and e.get("layer") == layer)
        lim = self.links.limits.max_meta_items
        if len(parts) > lim:
            raise ValueError(f"layer {layer} is split over {len(parts)} part files; a load names at most {lim}")
        step = _manifest_step(Path(folder))
        meta = {"dir": str(Path(folder).resolve()), "tag": f"l{layer}", "files": [f for f, _ in parts],
                "sha256": [str(e["sha256"]) for _, e in parts]}
        self.links.call("load", {s: ((), (0,), (), meta) for s in self._active()}, layer=layer,
                        step=self.step if step is None else step)
        if step is not None:
            self.step = step
        self._fwd, self._sq = None, None

    def state_dict(self) -> dict[str, np.ndarray]:
        """All experts' params and Adam state, as LocalExperts.state_dict (via temporary parts)."""
        with tempfile.TemporaryDirectory(prefix="moe-state-") as tmp:
            return state.read_rows(Path(tmp), self.save_part(Path(tmp), self.layer), self.layer,
                                   np.arange(self.n_experts))

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        """Load a LocalExperts.state_dict (lazy Adam) into the shards (via temporary parts)."""
        ids = np.arange(self.n_experts, dtype=np.int64)
        t = np.asarray(tensors["adam.t"], dtype=np.int64)
        rows = {"ids": ids, **{n: tensors[n] for n in state.PARAM_NAMES}, "adam.ids": ids[t > 0],
                "adam.t": t[t > 0], **{k: v for k, v in tensors.items() if k.startswith(("adam.m.", "adam.v."))}}
        with tempfile.TemporaryDirectory(prefix="moe-state-") as tmp:
            entries = state.write_part(Path(tmp), state.part_stem(self.layer), rows, self.layer)
            self.load_part(Path(tmp), entries, self.layer)

    def stats(self, reset: bool = False) -> np.ndarray:
        """Rows each expert processed in forward since the last reset, int64[E]."""
        replies = self.links.call("stats", {s: ((), (0,), (), {"reset": reset}) for s in self._active()},
                                  layer=self.layer)
        rows = np.zeros(self.n_experts, dtype=np.int64)
        for msg in replies.values():
            rows[np.asarray(msg.arrays[0], dtype=np.int64)] = msg.arrays[1]
        return rows


def _manifest_step(folder: Path) -> int | None:
    """The step of the checkpoint in folder, when it is one (a staging folder has no manifest)."""
    try:
        step = json.loads((folder / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None
