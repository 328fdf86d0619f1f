"""A real shard, driven by the rules of docs/PROTOCOL.md alone.

Messages are built with plain msgpack from the spec's key table (tests/shardkit.py), never
with moe's encoder; the handshake's HMACs are computed here from §7.1. Oracles: LocalExperts
holding the same weights, and the spec's words. Each disagreement found between the v1
server and its spec is a test here (§5 train = false, pending gradients, update applies once,
§4 '<f8', §6 order, the pong's meta bytes, empty backward, correlated errors), next to the
session rules of §7 and the finite-number rules of §5 / §15.1.
"""

from __future__ import annotations

import itertools
import secrets
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from shardkit import dealer, handshake, header, mac, reply, transport_password

from moe.experts.local import LocalExperts
from moe.sharding import session, wire
from moe.sharding.launch import LocalShards

pytestmark = pytest.mark.distributed

RUN, E, D, H = "conformance-run", 4, 8, 16
SECRET = session.new_secret()
REFUSAL = "unauthorized: prove the run secret with 'hello' and 'auth' first"  # §7.1, verbatim


@pytest.fixture(scope="module")
def shard():
    with LocalShards([list(range(E))], n_layers=2, d_model=D, d_hidden=H, run=RUN, secret=SECRET,
                     transport="tcp", heartbeat_s=5.0) as shards:
        yield shards


GENERATIONS = itertools.count(1)  # every test loads its weights in a new generation


class Link:
    """One admitted DEALER with its own seq counter: requests from the spec, decoded replies."""

    def __init__(self, endpoint: str, *, join: str | None = None) -> None:
        self.sock = dealer(endpoint, transport_password(SECRET), routing_id=b"\x81" + secrets.token_bytes(15))
        self.seq = itertools.count(1)
        got = handshake(self.sock, SECRET, RUN, seq=next(self.seq), join=join)
        next(self.seq)
        assert got.header.op == "ok", dict(got.header.meta)
        self.session = got.header.meta["session"]
        self.gen = 0

    def send(self, op: str, arrays=(), **fields) -> int:
        seq = fields.pop("seq", None) or next(self.seq)
        specs = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
        self.sock.send_multipart([header(op, RUN, gen=fields.pop("gen", self.gen), seq=seq, arrays=specs,
                                         **fields), *(a.tobytes() for a in arrays)])
        return seq

    def recv(self) -> wire.Message:
        got = reply(self.sock, 30.0)
        assert got is not None, "no reply within 30 s"
        return got

    def ask(self, op: str, arrays=(), **fields) -> wire.Message:
        seq = self.send(op, arrays, **fields)
        got = self.recv()
        assert got.header.seq == seq and got.header.reply_to == op, got.header
        return got

    def ok(self, op: str, arrays=(), **fields) -> wire.Message:
        got = self.ask(op, arrays, **fields)
        assert got.header.op == "ok", dict(got.header.meta)
        return got

    def load(self, oracle: LocalExperts, folder: Path, layer: int = 0) -> None:
        """Put the oracle's weights into the shard, in a new generation (§5 load)."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = oracle.save_part(folder, layer)  # the weights file and the Adam file
        self.gen = next(GENERATIONS)
        self.ok("load", layer=layer, meta={"dir": str(folder), "tag": f"l{layer}", "files": list(entries),
                                           "sha256": [e["sha256"] for e in entries.values()]})

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture()
def link(shard, tmp_path):
    lk = Link(shard.endpoints[0])  # a new session per test
    lk.load(_oracle(0), tmp_path / "start")  # and the shard's generation moves to a fresh one
    yield lk
    lk.close()


def _oracle(seed: int) -> LocalExperts:
    return LocalExperts(E, D, H, rng=np.random.default_rng(seed))


def _rows(seed: int, counts) -> tuple[list[int], list[int], np.ndarray]:
    experts = [i for i, c in enumerate(counts) if c]
    offsets = np.concatenate([[0], np.cumsum([c for c in counts if c])]).astype(int).tolist()
    x = np.random.default_rng(seed).standard_normal((offsets[-1], D)).astype(np.float32)
    return experts, offsets, x


def _full_offsets(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _weights(link: Link, tmp: Path) -> dict[str, np.ndarray]:
    """The shard's expert state, from a save (§5 save) into tmp."""
    from moe.experts import state

    tmp.mkdir(exist_ok=True)
    got = link.ok("save", meta={"dir": str(tmp), "tag": "l0"}).header.meta
    entries = {got[f"{pre}file"]: {"kind": kind, "layer": 0, "sha256": got[f"{pre}sha256"], "bytes": got[f"{pre}bytes"]}
               for pre, kind in (("", state.WEIGHTS), ("adam_", state.ADAM))}
    return state.read_rows(tmp, entries, 0, np.arange(E))


# ----------------------------------------------------------------------------- §5 forward / backward / update


def test_a_train_false_forward_keeps_nothing(link, tmp_path):
    """§5: "with train = false it keeps nothing" — the pending training stash survives it."""
    oracle = _oracle(1)
    link.load(oracle, tmp_path)
    counts = [3, 0, 2, 1]
    ex, off, x = _rows(2, counts)
    y = link.ok("forward", [x], experts=ex, offsets=off, step=0).arrays[0]
    assert np.array_equal(y, oracle.forward(x, _full_offsets(counts)))
    ex2, off2, x2 = _rows(3, [0, 4, 0, 0])
    link.ok("forward", [x2], experts=ex2, offsets=off2, step=0, meta={"train": False})  # an evaluation
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    dx = link.ok("backward", [dy], experts=ex, offsets=off, step=0).arrays[0]  # matches the training forward
    assert np.array_equal(dx, oracle.backward(dy))


def test_a_backward_replaces_the_pending_gradients(link, tmp_path):
    """§5: the pending gradients are those of the most recent backward since the last update."""
    oracle = _oracle(5)
    link.load(oracle, tmp_path / "w")
    for seed in (6, 7):  # two forward/backward pairs, then one update
        counts = [2, 1, 0, 3] if seed == 6 else [0, 2, 2, 0]
        ex, off, x = _rows(seed, counts)
        link.ok("forward", [x], experts=ex, offsets=off, step=0)
        dy = np.ones_like(x)
        link.ok("backward", [dy], experts=ex, offsets=off, step=0)
    oracle.forward(x, _full_offsets(counts))
    oracle.backward(dy)
    link.ok("update", step=1, meta={"lr": 0.01})
    oracle.apply_update(0.01)
    got = _weights(link, tmp_path / "out")
    for k, v in oracle.state_dict().items():
        assert np.array_equal(got[k], v), k


def test_an_update_applies_the_gradients_once_then_nothing(link, tmp_path):
    """§5: after an update nothing is pending; an update without a backward changes nothing."""
    oracle = _oracle(8)
    link.load(oracle, tmp_path / "w")
    ex, off, x = _rows(9, [1, 2, 3, 4])
    link.ok("forward", [x], experts=ex, offsets=off, step=0)
    link.ok("backward", [np.ones_like(x)], experts=ex, offsets=off, step=0)
    assert link.ok("update", step=1, meta={"lr": 0.01}).header.meta["experts_updated"] == 4
    second = link.ok("update", step=2, meta={"lr": 0.01})
    assert second.header.meta["experts_updated"] == 0
    oracle.forward(x, _full_offsets([1, 2, 3, 4]))
    oracle.backward(np.ones_like(x))
    oracle.apply_update(0.01)  # once
    got = _weights(link, tmp_path / "out")
    for k, v in oracle.state_dict().items():
        assert np.array_equal(got[k], v), k  # Adam t and moments too: the second update did nothing
    refused = link.ask("update", step=2, meta={"lr": 0.01})  # a step already applied
    assert refused.header.meta["code"] == "bad_request" and "already applied" in refused.header.meta["message"]


def test_an_empty_forward_and_backward_are_valid(link, tmp_path):
    """§5: experts = [] with N = 0 is valid (a shard with no rows this step)."""
    link.load(_oracle(10), tmp_path)
    empty = np.zeros((0, D), dtype=np.float32)
    y = link.ok("forward", [empty], experts=[], offsets=[0], step=0).arrays[0]
    assert y.shape == (0, D) and y.dtype == np.float32
    got = link.ok("backward", [empty], experts=[], offsets=[0], step=0)
    assert got.arrays[0].shape == (0, D) and got.arrays[1].shape == (0,) and got.arrays[1].dtype == np.float64
    assert link.ok("update", step=1, meta={"lr": 0.1}).header.meta["experts_updated"] == 0


def test_float64_rows_are_refused_naming_the_dtype_the_shard_computes_in(link, tmp_path):
    """§4: '<f8' is valid on the wire; this shard computes in '<f4' and says so."""
    link.load(_oracle(11), tmp_path)
    ex, off, x = _rows(12, [2, 0, 0, 0])
    got = link.ask("forward", [x.astype("<f8")], experts=ex, offsets=off)
    assert got.header.op == "error" and got.header.meta["code"] == "bad_request"
    assert "'<f4'" in got.header.meta["message"] and got.header.seq > 0


def test_save_needs_an_existing_folder(link, tmp_path):
    got = link.ask("save", meta={"dir": str(tmp_path / "missing"), "tag": "l0"})
    assert got.header.meta["code"] == "not_found" and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- §6 order, §5 ping


def test_replies_of_a_link_keep_the_order_of_its_requests(link, tmp_path):
    """§6: a stats and a ping sent after a forward are answered after it; stats counts its rows."""
    link.load(_oracle(13), tmp_path)
    counts = [20_000, 0, 0, 0]  # long enough that an overtaking reply would come first
    ex, off, x = _rows(14, counts)
    before = link.ok("stats").arrays[1].copy()
    seqs = [link.send("forward", [x], experts=ex, offsets=off), link.send("stats"),
            link.send("ping", meta={"t": 1.0})]
    got = [link.recv() for _ in seqs]
    assert [(m.header.seq, m.header.reply_to) for m in got] == list(zip(seqs, ["forward", "stats", "ping"],
                                                                          strict=True))
    assert got[1].arrays[1][0] - before[0] == 20_000  # the forward's rows are counted


def _header_with_raw_meta(fields: dict, meta: bytes) -> bytes:
    """A header map whose 'meta' value is exactly these msgpack bytes."""
    p = msgpack.Packer()
    out = p.pack_map_header(len(fields) + 1)
    for k, v in fields.items():
        out += p.pack(k) + p.pack(v)
    return out + p.pack("meta") + meta


def test_the_pong_echoes_meta_byte_for_byte(link):
    """§5: the pong's meta is the ping's meta bytes, not decoded and re-encoded."""
    meta = msgpack.packb({"t": 1.5, "n": 7}, use_single_float=True)  # a float32 value on the wire
    assert struct.pack(">f", 1.5) in meta
    fields = {**msgpack.unpackb(header("ping", RUN, seq=99)), "arrays": [{"dtype": "<i4", "shape": [6]}]}
    del fields["meta"]
    payload = np.arange(6, dtype=np.int32)
    link.sock.send_multipart([_header_with_raw_meta(fields, meta), payload.tobytes()])
    frames = reply(link.sock, 30.0, raw=True)
    assert frames is not None and wire.decode(frames).header.op == "pong"
    assert frames[0].endswith(b"\xa4meta" + meta) and frames[1] == payload.tobytes()


# ----------------------------------------------------------------------------- §10 correlation


@pytest.mark.parametrize("op,fields", [
    ("update", {"meta": {}}),
    ("update", {"meta": {"lr": -0.5}}),
    ("save", {"meta": {"dir": "/tmp", "tag": "../up"}}),
    ("forward", {"experts": [1, 1], "offsets": [0, 1, 2]}),
    ("stats", {"meta": {"reset": "yes"}}),
])
def test_request_level_mistakes_get_a_correlated_error(link, op, fields):
    """§10: only a message whose addressing cannot be read gets an uncorrelated error."""
    got = link.ask(op, step=3, layer=1, **fields)
    h = got.header
    assert h.op == "error" and h.meta["code"] == "bad_request"
    assert (h.reply_to, h.run, h.gen, h.step, h.layer) == (op, RUN, link.gen, 3, 1)


def test_unreadable_addressing_gets_an_uncorrelated_error(link):
    link.sock.send(msgpack.packb({**msgpack.unpackb(header("stats", RUN)), "seq": -1}))
    got = link.recv()
    assert got.header.op == "error" and got.header.reply_to is None and got.header.run == ""


def test_replies_carry_the_request_generation(link, tmp_path):
    """§3.2: a reply carries the request's gen (a load moving to a newer one included)."""
    oracle = _oracle(15)
    link.load(oracle, tmp_path)
    assert link.ok("stats").header.gen == link.gen
    stale = link.ask("stats", gen=link.gen - 1)
    assert stale.header.meta["code"] == "stale_generation" and stale.header.gen == link.gen - 1


# ----------------------------------------------------------------------------- §7 sessions


def _refusals_reveal_nothing(frames: list[bytes]) -> None:
    """The generic refusal of §7.1: its fields are the sender's own (or empty), never the shard's."""
    msg = wire.decode(frames)
    assert msg.header.op == "error" and msg.header.meta["code"] == "unauthorized"
    assert msg.header.meta["message"] == REFUSAL and set(msg.header.meta) == {"code", "message"}
    assert RUN.encode() not in frames[0] and msg.header.gen == 0  # neither the run id nor the generation


def test_a_link_without_the_proof_gets_only_the_generic_refusal(shard, link, tmp_path):
    link.load(_oracle(16), tmp_path)  # the shard now has a run and a generation to leak, if it would
    stranger = dealer(shard.endpoints[0], transport_password(SECRET))  # past the transport, not admitted
    try:
        for op, fields in [("stats", {}), ("ping", {}), ("shutdown", {}), ("update", {"meta": {"lr": 0.1}}),
                           ("save", {"meta": {"dir": str(tmp_path), "tag": "l0"}}),
                           ("forward", {"experts": [0], "offsets": [0, 0],
                                        "arrays": [{"dtype": "<f4", "shape": [0, D]}]})]:
            stranger.send_multipart([header(op, "guess", seq=5, **fields)] + ([b""] if op == "forward" else []))
            frames = reply(stranger, 30.0, raw=True)
            _refusals_reveal_nothing(frames)
            assert wire.decode(frames).header.seq == 5  # correlated to what it sent, nothing more
        stranger.send(b"\xc1 not msgpack")
        _refusals_reveal_nothing(reply(stranger, 30.0, raw=True))
    finally:
        stranger.close(linger=0)
    assert link.ok("stats").header.op == "ok"  # the session is untouched


def test_a_wrong_proof_is_refused_and_uses_up_the_challenge(shard):
    s = dealer(shard.endpoints[0], transport_password(SECRET))
    try:
        nonce = secrets.token_hex(32)
        s.send(header("hello", "guess", seq=1, meta={"nonce": nonce}))
        shard_nonce = reply(s).header.meta["nonce"]
        wrong = mac(b"x" * 32, "client", "guess", shard_nonce, nonce)
        s.send(header("auth", "guess", seq=2, meta={"proof": wrong}))
        _refusals_reveal_nothing(reply(s, raw=True))
        right = mac(SECRET, "client", RUN, shard_nonce, nonce)
        s.send(header("auth", RUN, seq=3, meta={"proof": right}))  # the challenge was used up
        assert reply(s).header.meta["message"] == REFUSAL
        s.send(header("hello", "another-run", seq=4, meta={"nonce": nonce}))
        shard_nonce = reply(s).header.meta["nonce"]
        other_run = mac(SECRET, "client", "another-run", shard_nonce, nonce)  # the secret, but another run
        s.send(header("auth", "another-run", seq=5, meta={"proof": other_run}))
        assert reply(s).header.meta["message"] == REFUSAL
    finally:
        s.close(linger=0)


def test_a_new_session_displaces_the_old_links_and_they_cannot_rejoin(shard, link):
    old_session = link.session
    newer = Link(shard.endpoints[0])  # another holder of the secret starts a new session
    newer.gen = link.gen
    try:
        got = link.ask("stats")
        assert got.header.meta["code"] == "unauthorized" and got.header.meta["message"] == REFUSAL
        s = dealer(shard.endpoints[0], transport_password(SECRET))
        try:
            refused = handshake(s, SECRET, RUN, join=old_session)
            assert refused.header.op == "error" and refused.header.meta["reason"] == "other_session"
        finally:
            s.close(linger=0)
        joined = Link(shard.endpoints[0], join=newer.session)  # joining the current session works
        joined.gen = link.gen
        assert joined.ok("stats").header.op == "ok" and newer.ok("stats").header.op == "ok"
        joined.close()
    finally:
        newer.close()


def test_the_replay_cache_is_per_session(shard, link, tmp_path):
    """§8: a new session starts with an empty replay cache, so a request of it that reuses an
    old session's (gen, step, layer, seq, op) is executed, not answered with the old reply."""
    oracle = _oracle(5)
    link.load(oracle, tmp_path)
    counts = [2, 1, 0, 3]
    ex, off, x = _rows(6, counts)
    first = link.ok("forward", [x], experts=ex, offsets=off, step=0, seq=900, meta={"train": False}).arrays[0]
    assert np.array_equal(first, oracle.forward(x, _full_offsets(counts)))
    newer = Link(shard.endpoints[0])
    newer.gen = link.gen
    try:
        x2 = (x * 2 + 1).astype(np.float32)
        got = newer.ok("forward", [x2], experts=ex, offsets=off, step=0, seq=900, meta={"train": False}).arrays[0]
        assert np.array_equal(got, oracle.forward(x2, _full_offsets(counts)))
    finally:
        newer.close()


def test_connections_without_the_transport_password_deliver_nothing(shard):
    """§1: PLAIN with the derived password; NULL or a wrong password get no reply at all."""
    for password in (None, transport_password(b"y" * 32)):
        s = dealer(shard.endpoints[0], password)
        try:
            try:
                s.send(header("hello", RUN, seq=1, meta={"nonce": secrets.token_hex(32)}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # never connected: nothing can even be queued
            assert reply(s, 2.0) is None
        finally:
            s.close(linger=0)


# ----------------------------------------------------------------------------- §5 / §15.1 numbers


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_and_gradients_are_refused(link, tmp_path, bad):
    link.load(_oracle(17), tmp_path)
    ex, off, x = _rows(18, [2, 1, 0, 0])
    x_bad = x.copy()
    x_bad[1, 3] = bad
    got = link.ask("forward", [x_bad], experts=ex, offsets=off)  # refused before use, not by its outcome
    assert got.header.meta["code"] == "bad_request" and "forward rows must be finite" in got.header.meta["message"]
    link.ok("forward", [x], experts=ex, offsets=off)
    dy = np.ones_like(x)
    dy[0, 0] = bad
    got = link.ask("backward", [dy], experts=ex, offsets=off)
    assert got.header.meta["code"] == "bad_request" and "backward gradients must be finite" in got.header.meta["message"]


@pytest.mark.parametrize("meta", [{"lr": 1e308}, {"lr": 0.01, "scale": 1e308}, {"lr": 1e30, "scale": 1e30}])
def test_an_update_that_could_make_weights_non_finite_is_refused_and_changes_nothing(link, tmp_path, meta):
    oracle = _oracle(19)
    link.load(oracle, tmp_path / "w")
    ex, off, x = _rows(20, [3, 3, 3, 3])
    link.ok("forward", [x], experts=ex, offsets=off)
    link.ok("backward", [np.ones_like(x)], experts=ex, offsets=off)
    before = _weights(link, tmp_path / "before")
    got = link.ask("update", step=1, meta=meta)
    assert got.header.meta["code"] == "bad_request" and "nothing changed" in got.header.meta["message"]
    after = _weights(link, tmp_path / "after")
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    link.ok("update", step=1, meta={"lr": 0.01})  # the gradients are still pending: a sane update applies them
    oracle.forward(x, _full_offsets([3, 3, 3, 3]))
    oracle.backward(np.ones_like(x))
    oracle.apply_update(0.01)
    final = _weights(link, tmp_path / "final")
    for k, v in oracle.state_dict().items():
        assert np.array_equal(final[k], v) and np.all(np.isfinite(final[k])), k
