"""A second local client against a live run over loopback tcp: it can neither read, change,
stop nor slow down anything (docs/PROTOCOL.md §7.1).

The run trains 30 steps on 2 tcp shards while another thread attacks them as a local process
would (the trainer waits at its middle step until two full rounds of attacks have been made, so
they overlap the run however fast it trains): without the transport password, with a guessed one, and (the worst case: a leaked
transport password and the real run id) with every op, replayed sequence numbers meant to
evict the coordinator's cached replies, and wrong proofs. Oracles: the uninterrupted
in-process run (the final checkpoint is bit-identical), the spec's generic refusal (every
reply it gets, byte for byte apart from its own fields), and the shards' own counters.
"""

from __future__ import annotations

import logging
import secrets
import threading

import numpy as np
import pytest
from shardkit import (
    STEPS,
    assert_same_checkpoint,
    dealer,
    header,
    mac,
    reply,
    shard_config,
    wait_until,
)

from moe.sharding import session, wire
from moe.sharding.coordinator import open_expert_groups
from moe.train import Trainer

pytestmark = pytest.mark.distributed

REFUSAL = "unauthorized: prove the run secret with 'hello' and 'auth' first"


class Hijacker(threading.Thread):
    """Keeps attacking every shard until told to stop; records every reply it ever gets."""

    def __init__(self, endpoints: list[str], run: str, password: bytes, tmp: str) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.run_id, self.password, self.tmp = endpoints, run, password, tmp
        self.done = threading.Event()
        self.replies: list[list[bytes]] = []
        self.sent = 0
        self.rounds = 0  # full rounds: every attack on every shard, then the blind probes
        self.silent_without_password = 0

    def attacks(self, seq: int):
        D = 16
        rows = np.ones((2, D), dtype=np.float32)
        yield [header("stats", self.run_id, seq=seq)]
        yield [header("ping", self.run_id, seq=seq, meta={"t": 1.0})]
        yield [header("shutdown", self.run_id, seq=seq)]
        yield [header("update", self.run_id, seq=seq, step=10_000, meta={"lr": 1e3})]
        yield [header("save", self.run_id, seq=seq, meta={"dir": self.tmp, "tag": "l0"})]
        yield [header("load", self.run_id, gen=10**6, seq=seq, meta={"dir": self.tmp, "tag": "l0", "files": [],
                                                                  "sha256": []})]
        yield [header("forward", self.run_id, seq=seq, experts=[0], offsets=[0, 2],
                      arrays=[{"dtype": "<f4", "shape": [2, D]}]), rows.tobytes()]
        yield [b"\xc1 garbage"]
        nonce = secrets.token_hex(32)
        yield [header("hello", self.run_id, seq=seq, meta={"nonce": nonce})]
        yield [header("auth", self.run_id, seq=seq + 1, meta={"proof": mac(b"guess" * 8, "client", self.run_id,
                                                                         "0" * 64, nonce)})]

    def run(self) -> None:
        socks = [dealer(ep, self.password) for ep in self.endpoints]
        blind = [dealer(ep, None) for ep in self.endpoints] + [dealer(ep, b"0" * 64) for ep in self.endpoints]
        try:
            seq = 1
            while not self.done.is_set():
                for s in socks:
                    for frames in self.attacks(seq):
                        s.send_multipart(frames)
                        self.sent += 1
                        got = reply(s, 5.0, raw=True)
                        if got is not None:
                            self.replies.append(got)
                    seq = (seq % 70) + 1  # the same small seqs over and over: the old eviction attack
                for s in blind:
                    try:
                        s.send(header("stats", self.run_id, seq=1), flags=1)  # NOBLOCK
                    except Exception:  # noqa: BLE001 - never connected: nothing is even queued
                        pass
                    self.silent_without_password += reply(s, 0.2) is None
                self.rounds += 1
        finally:
            for s in socks + blind:
                s.close(linger=0)


class WaitAtStep(logging.Handler):
    """Holds the trainer when it enters step `step` until the attacker made `rounds` full rounds."""

    def __init__(self, attacker: Hijacker, step: int, rounds: int) -> None:
        super().__init__(logging.DEBUG)
        self.attacker, self.step, self.rounds, self.waited = attacker, step, rounds, False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == f"phase step at step {self.step}":
            self.waited = wait_until(lambda: self.attacker.rounds >= self.rounds, 120.0)


@pytest.mark.timeout(300)
def test_a_second_local_client_can_neither_read_change_stop_nor_slow_a_run(data, reference, tmp_path):
    config = shard_config(2, transport="tcp")
    out = tmp_path / "run"
    said: list[str] = []
    with open_expert_groups(config, out, echo=said.append) as (groups, on_failure):
        links = groups[0].links
        assert all(ep.startswith("tcp://127.0.0.1:") for ep in links.endpoints)
        # The worst case: the transport password leaked (it is derived from the secret, which did not).
        password = session.transport_password(links.access.secret)
        attacker = Hijacker(links.endpoints, links.run, password, str(out))
        hold = WaitAtStep(attacker, STEPS // 2, rounds=2)
        log = logging.getLogger("moe.train")
        level = log.level
        log.addHandler(hold)
        log.setLevel(logging.DEBUG)
        attacker.start()
        try:
            trainer = Trainer(config, data, out, expert_groups=groups, on_failure=on_failure, echo=said.append)
            result = trainer.train()
        finally:
            attacker.done.set()
            attacker.join(timeout=60)
            log.removeHandler(hold)
            log.setLevel(level)
        counters = [m.header.meta for m in links.call("stats", {i: ((), (0,), (), {}) for i in range(2)}).values()]
    assert result.step == STEPS and hold.waited
    assert not [s for s in said if "failed" in s], said  # never slowed into a deadline, never rolled back
    assert_same_checkpoint(result.checkpoint, reference)  # nothing changed: the same bits
    assert attacker.sent > 30 and len(attacker.replies) == attacker.sent  # each attempt was answered ...
    refusals = 0
    for frames in attacker.replies:  # ... by the generic refusal, or a hello's fresh challenge
        msg = wire.decode(frames)
        h = msg.header
        assert h.run in ("", links.run) and h.gen in (0, 10**6)  # its own fields, never the shard's
        if h.op == "ok":
            assert h.reply_to == "hello" and set(h.meta) == {"nonce"}
            continue
        assert h.op == "error" and dict(h.meta) == {"code": "unauthorized", "message": REFUSAL}
        refusals += 1
    assert refusals == sum(c["refused"] for c in counters)  # refused by the I/O thread: nothing executed
    assert attacker.silent_without_password > 0  # without the password: not even a refusal
