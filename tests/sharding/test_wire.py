"""Wire protocol: byte-level agreement with hand-built msgpack, zero copy, and hostile input.

Oracles are independent of moe.sharding.wire: headers are built and read with plain
``msgpack.packb``/``unpackb`` on hand-written dicts, arrays with ``ndarray.tobytes``.
"""

import math
import pathlib
import re

import msgpack
import numpy as np
import pytest
import zmq

from moe.sharding import wire
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, Message, WireError, decode, encode

pytestmark = pytest.mark.unit

RUN = "run-a"
PROTOCOL_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def raw_header(op: str = "ping", **fields) -> dict:
    """A valid request header as a plain dict, written from the spec, not from the encoder."""
    h = {
        "v": 2,
        "op": op,
        "run": RUN,
        "gen": 0,
        "step": 0,
        "layer": 0,
        "seq": 1,
        "experts": [],
        "offsets": [0],
        "arrays": [],
        "meta": {},
    }
    h.update(fields)
    return h


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def forward_frames(rows: np.ndarray, experts=(3, 7), offsets=(0, 1, 2), **fields) -> list:
    spec = {"dtype": rows.dtype.str, "shape": list(rows.shape)}
    h = raw_header("forward", experts=list(experts), offsets=list(offsets), arrays=[spec], **fields)
    return [pack(h), rows.tobytes()]


# ------------------------------------------------------------------------ agreement with the spec


def test_encoder_writes_the_spec_header_and_raw_array_bytes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = Header(
        op="forward", run=RUN, gen=2, step=5, layer=1, seq=9, experts=(4, 0), offsets=(0, 2, 3)
    )
    frames = encode(h, [x], limits=DEFAULT_LIMITS)
    assert len(frames) == 2
    assert msgpack.unpackb(bytes(frames[0]), raw=False) == {
        "v": 2, "op": "forward", "run": RUN, "gen": 2, "step": 5, "layer": 1, "seq": 9,
        "experts": [4, 0], "offsets": [0, 2, 3],
        "arrays": [{"dtype": "<f4", "shape": [3, 4]}], "meta": {},
    }  # fmt: skip
    assert bytes(frames[1]) == x.astype("<f4").tobytes(order="C")


def test_decoder_reads_a_hand_built_message():
    rows = np.array([[1.5, -2.0], [0.25, 8.0]], dtype="<f8")
    m = decode(forward_frames(rows, step=4, layer=2, seq=11, meta={"train": False}))
    h = m.header
    assert (h.op, h.run, h.gen, h.step, h.layer, h.seq) == ("forward", RUN, 0, 4, 2, 11)
    assert h.experts == (3, 7) and h.offsets == (0, 1, 2) and h.reply_to is None
    assert dict(h.meta) == {"train": False}
    assert m.arrays[0].dtype == np.float64 and m.arrays[0].shape == (2, 2)
    assert m.arrays[0].tolist() == [[1.5, -2.0], [0.25, 8.0]]


def _doc_example_frames() -> list[bytes]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    blocks = re.findall(r"frame (\d+) \([^)]*\):\n((?:[0-9a-f]{2}(?: [0-9a-f]{2})*\n)+)", text)
    assert [int(i) for i, _ in blocks] == [0, 1], "docs/PROTOCOL.md example frames not found"
    return [bytes.fromhex(hexes.replace("\n", " ")) for _, hexes in blocks]


def test_protocol_md_example_decodes_to_the_documented_values():
    frames = _doc_example_frames()
    m = decode(frames)
    h = m.header
    assert (h.op, h.run, h.gen, h.step, h.layer, h.seq) == ("forward", "demo", 1, 7, 0, 42)
    assert h.experts == (5, 2) and h.offsets == (0, 2, 3)
    assert m.arrays[0].dtype == np.float32
    np.testing.assert_array_equal(m.arrays[0], [[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]])
    assert encode(h, m.arrays) == frames  # the reference key order is the encoder's order


# ------------------------------------------------------------------------ round trips


def _same(a: Message, b_header: Header, b_arrays) -> None:
    assert a.header == b_header
    assert len(a.arrays) == len(b_arrays)
    for got, want in zip(a.arrays, b_arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _rows(rng: np.random.Generator, n: int, d: int, dtype) -> np.ndarray:
    return rng.standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("counts", [(2, 0, 3), (0, 0), (), (1,)])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_row_ops_round_trip_request_and_reply(op, counts, dtype):
    rng = np.random.default_rng(0)
    experts = tuple(int(e) for e in rng.permutation(50)[: len(counts)])
    offsets = (0, *np.cumsum(counts, dtype=np.int64).tolist())
    x = _rows(rng, offsets[-1], 6, dtype)
    req = Header(op=op, run=RUN, gen=3, step=8, layer=2, seq=5, experts=experts, offsets=offsets)
    got = decode(encode(req, [x]))
    _same(got, req, [x])
    assert got.arrays[0].dtype == dtype
    y = (x * 2).astype(dtype)
    rep = decode(wire.encode_reply(got.header, [y]))
    assert rep.header.op == "ok" and rep.header.reply_to == op
    assert rep.header.replay_key == req.replay_key
    assert (rep.header.experts, rep.header.offsets) == (experts, offsets)
    np.testing.assert_array_equal(rep.arrays[0], y)


REQUESTS = [
    Header(op="update", run=RUN, gen=1, step=3, seq=4, meta={"lr": 1e-3, "beta1": 0.9, "clip": 1}),
    Header(op="save", run=RUN, gen=1, step=3, seq=5, meta={"dir": "/tmp/ck", "tag": "step-3"}),
    Header(op="load", run=RUN, gen=2, step=3, seq=6, meta={"dir": "/tmp/ck", "tag": "step_3.a"}),
    Header(op="stats", run=RUN, gen=1, seq=7, meta={"reset": True}),
    Header(op="ping", run=RUN, gen=1, seq=8, meta={"t": 12.5, "from": "coordinator"}),
    Header(op="shutdown", run=RUN, gen=1, seq=9),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda h: h.op)
def test_control_ops_round_trip_request_ok_and_error(req):
    _same(decode(encode(req)), req, [])
    payload = [np.zeros(0, np.int32), np.zeros(0, np.int64)] if req.op == "stats" else []
    rep = decode(wire.encode_reply(req, payload)).header
    assert rep.op == ("pong" if req.op == "ping" else "ok") and rep.reply_to == req.op
    assert (rep.run, rep.gen, rep.step, rep.layer, rep.seq) == (
        req.run,
        req.gen,
        req.step,
        req.layer,
        req.seq,
    )
    assert dict(rep.meta) == (dict(req.meta) if req.op == "ping" else {})
    err = decode(wire.encode_error(req, "disk full", code="internal")).header
    assert err.op == "error" and err.reply_to == req.op and err.seq == req.seq
    assert dict(err.meta) == {"code": "internal", "message": "disk full"}


@pytest.mark.parametrize(
    "dtype,shape",
    [
        ("<f4", (0, 5)),
        ("<f8", (2, 3)),
        ("<i4", (7,)),
        ("<i8", (2, 2, 2)),
        ("|u1", (300,)),
        ("<f4", ()),
    ],
)
def test_ping_payload_of_every_dtype_round_trips_and_pong_echoes_it(dtype, shape):
    rng = np.random.default_rng(1)
    a = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    ping = Header(op="ping", run=RUN, gen=0, seq=1, meta={"t": 1.0})
    got = decode(encode(ping, [a, a[..., ::-1] if a.ndim else a]))
    _same(got, ping, [a, a[..., ::-1] if a.ndim else a])
    pong = decode(wire.encode_reply(got.header, got.arrays))
    assert pong.header.op == "pong"
    np.testing.assert_array_equal(pong.arrays[0], a)


def test_stats_reply_round_trips_ids_and_row_counts():
    req = Header(op="stats", run=RUN, gen=0, seq=2)
    ids = np.array([3, 4, 9], dtype=np.int32)
    rows = np.array([10, 0, 2**40], dtype=np.int64)
    m = decode(wire.encode_reply(req, [ids, rows], meta={"requests": 17, "uptime_s": 3.5}))
    assert m.header.op == "ok" and m.header.reply_to == "stats"
    assert m.arrays[0].dtype == np.int32 and m.arrays[1].dtype == np.int64
    assert m.arrays[1].tolist() == [10, 0, 2**40]
    with pytest.raises(WireError, match="stats reply"):
        wire.encode_reply(req, [ids.astype(np.int64), rows])
    with pytest.raises(WireError, match="equal lengths"):
        wire.encode_reply(req, [ids, rows[:2]])


def test_uncorrelated_error_reply_round_trips():
    m = decode(wire.encode_error(None, "header frame is truncated"))
    h = m.header
    assert h.op == "error" and h.reply_to is None and h.run == ""
    assert h.meta["code"] == "bad_request"


def test_long_error_message_is_truncated_to_a_valid_reply():
    m = decode(wire.encode_error(None, "x" * 100_000)).header.meta["message"]
    assert len(m) == wire.MAX_ERROR_MESSAGE_LEN and m.endswith("...")
    with pytest.raises(ValueError, match="error code"):
        wire.encode_error(None, "boom", code="oops")


# ------------------------------------------------------------------------ zero copy and ownership


def test_decoded_arrays_are_readonly_views_on_the_frame_memory():
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    frames = [
        bytes(f)
        for f in encode(Header(op="forward", run=RUN, gen=0, experts=(1,), offsets=(0, 5)), [x])
    ]
    buf = bytearray(frames[1])
    m = decode([frames[0], buf])
    a = m.arrays[0]
    assert np.shares_memory(a, np.frombuffer(buf, dtype=np.uint8))
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    buf[0:4] = np.float32(99.0).tobytes()  # the sender's memory, not a copy, backs the array
    assert a[0, 0] == np.float32(99.0)


def test_decode_accepts_memoryview_and_zmq_frame_without_copying():
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    head, body = encode(Header(op="backward", run=RUN, gen=0, experts=(0,), offsets=(0, 3)), [x])
    frame = zmq.Frame(bytes(body))
    m = decode([memoryview(bytes(head)), frame])
    assert np.shares_memory(m.arrays[0], np.frombuffer(frame.buffer, dtype=np.uint8))
    np.testing.assert_array_equal(m.arrays[0], x)


def test_encode_shares_contiguous_arrays_and_copies_strided_ones():
    x = np.ones((4, 6), dtype=np.float32)
    req = Header(op="forward", run=RUN, gen=0, experts=(2,), offsets=(0, 4))
    assert np.shares_memory(np.frombuffer(encode(req, [x])[1], dtype=np.uint8), x)
    strided = np.arange(48, dtype=np.float32).reshape(4, 12)[:, ::2]
    body = encode(req, [strided])[1]
    assert bytes(body) == np.ascontiguousarray(strided).tobytes()


def test_round_trip_through_real_zmq_router_dealer_frames():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            wire.configure_socket(s)
            s.setsockopt(zmq.RCVTIMEO, 5000)
        router.bind("inproc://wire-test")
        dealer.connect("inproc://wire-test")
        x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
        req = Header(op="forward", run=RUN, gen=0, seq=1, experts=(1, 2), offsets=(0, 3, 5))
        dealer.send_multipart(encode(req, [x]), copy=False)
        identity, *frames = router.recv_multipart(copy=False)
        got = decode(frames)
        _same(got, req, [x])
        router.send_multipart(
            [identity, *wire.encode_reply(got.header, [got.arrays[0] + 1])], copy=False
        )
        rep = decode(dealer.recv_multipart(copy=False))
        np.testing.assert_array_equal(rep.arrays[0], x + 1)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_configure_socket_sets_maxmsgsize_and_linger():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        limits = Limits(max_header_bytes=1000, max_message_bytes=5000, max_array_elements=100)
        wire.configure_socket(sock, limits)
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.MAXMSGSIZE) == max(1000, min(5000, 100 * 8))
    finally:
        sock.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------------ hostile input


def _spec_header(dtype="<f4", shape=(2, 2), **fields) -> bytes:
    fields.setdefault("experts", [1])
    fields.setdefault("offsets", [0, shape[0] if shape else 0])
    return pack(raw_header("forward", arrays=[{"dtype": dtype, "shape": list(shape)}], **fields))


def _bad(frames, match=None, code=None, limits=DEFAULT_LIMITS) -> WireError:
    with pytest.raises(WireError, match=match) as info:
        decode(frames, limits=limits)
    assert type(info.value) is WireError
    if code is not None:
        assert info.value.code == code
    return info.value


VALID_HEAD = pack(raw_header("ping"))


@pytest.mark.parametrize(
    "head,match",
    [
        (VALID_HEAD[:-3], "truncated"),
        (b"", "truncated"),
        (b"\xc1", "msgpack"),
        (VALID_HEAD[:3] + b"\xc1" + VALID_HEAD[4:], "FormatError"),  # 0xc1 as the value of "v"
        (VALID_HEAD + b"\x00", "trailing"),
        (VALID_HEAD + VALID_HEAD, "trailing"),
        (b"\xdf\xff\xff\xff\xff", "msgpack"),  # map32 claiming 2**32-1 entries
        (b"\xdd\xff\xff\xff\xff", "msgpack"),  # array32 claiming 2**32-1 items
        (b"\xdb\xff\xff\xff\xff" + b"x" * 64, "truncated|msgpack"),  # str32 claiming 4 GiB
        (b"\xc6\x00\x00\x00\x01x", "msgpack"),  # bin of any length
        (b"\xd6\xff\x00\x00\x00\x00", "msgpack"),  # ext (a timestamp)
        (b"\x91" * 5000 + b"\x80", "msgpack"),  # nesting deeper than the unpacker's stack
        (b"\xa2\xff\xfe", "msgpack"),  # invalid UTF-8 in a str
        (b"\x81\x01\x02", "msgpack"),  # non-str map key
        (pack([1, 2, 3]), "must be a msgpack map"),
        (pack(7), "must be a msgpack map"),
        (pack("forward"), "must be a msgpack map"),
        (pack(None), "must be a msgpack map"),
    ],
)
def test_malformed_header_bytes(head, match):
    _bad([head], match)


def test_huge_list_inside_the_header_is_refused_before_reading_it():
    head = VALID_HEAD.replace(pack("experts") + b"\x90", pack("experts") + b"\xdd\x00\xff\xff\xff")
    assert head != VALID_HEAD
    _bad([head], "msgpack")


def test_duplicate_key_is_refused():
    body = b"".join(pack(k) + pack(v) for k, v in raw_header("ping").items())
    head = b"\x8c" + body + pack("seq") + pack(2)  # 12 entries, "seq" twice
    _bad([head], "duplicate")


@pytest.mark.parametrize(
    "dtype", ["|O", "O", "|V8", ">f4", ">i8", "<f2", "float32", "<U4", "|b1", "<c8", "<u4", "<u1"]
)
def test_dtypes_outside_the_allowlist_are_refused(dtype):
    _bad([_spec_header(dtype=dtype), b"\x00" * 16], "dtype")


def test_header_claiming_2_32_elements_is_refused_before_allocation():
    e = _bad([_spec_header(shape=(2**16, 2**16)), b"\x00" * 16], "elements", code="too_large")
    assert e.header is not None and e.header.op == "forward"  # still addressable for a reply
    _bad(
        [pack(raw_header("ping", arrays=[{"dtype": "|u1", "shape": [2**32]}])), b"\x00"], "elements"
    )
    _bad(
        [pack(raw_header("ping", arrays=[{"dtype": "<f8", "shape": [2**62, 2**62]}])), b""],
        "elements",
    )


@pytest.mark.parametrize("nbytes", [0, 15, 17, 32])
def test_shape_and_frame_size_mismatch(nbytes):
    _bad([_spec_header(shape=(2, 2)), b"\x00" * nbytes], "needs 16 bytes")


def test_frame_count_mismatch():
    head = _spec_header(shape=(2, 2))
    _bad([head], "1 arrays, got 0")
    _bad([head, b"\x00" * 16, b"\x00" * 16], "1 arrays, got 2")
    _bad([pack(raw_header("ping")), b"\x00"], "0 arrays, got 1")
    _bad([], "header frame")


def test_message_over_the_limits_is_refused():
    small = Limits(max_message_bytes=2000, max_header_bytes=200, max_arrays=2, max_experts=4)
    _bad([_spec_header(shape=(25, 25)), b"\x00" * 2500], "limit", code="too_large", limits=small)
    _bad(
        [pack(raw_header("ping", meta={"pad": "x" * 300}))],
        "limit 200",
        code="too_large",
        limits=small,
    )
    _bad([b"\xc1", b"\x00" * 2001], "message is 2002 bytes", code="too_large", limits=small)
    _bad(
        [_spec_header(shape=(25, 25)), b"\x00" * 16],
        "message limit",
        code="too_large",
        limits=small,
    )
    _bad([VALID_HEAD] + [b""] * 3, "frames per message", limits=small)
    spec = {"dtype": "|u1", "shape": [0]}
    _bad([pack(raw_header("ping", arrays=[spec] * 3))], "arrays per message", limits=small)
    with pytest.raises(WireError, match="arrays per message"):
        encode(Header(op="ping", run=RUN, gen=0), [np.zeros(0, np.uint8)] * 3, limits=small)
    many = list(range(5))
    head = pack(raw_header("forward", experts=many, offsets=[0] * 6,
                           arrays=[{"dtype": "<f4", "shape": [0, 1]}]))  # fmt: skip
    _bad([head, b""], "experts", code="too_large", limits=small)
    with pytest.raises(WireError, match="limit"):
        encode(Header(op="ping", run=RUN, gen=0), [np.zeros(600, np.float32)], limits=small)


def test_too_many_dims_and_meta_items_are_refused():
    limits = Limits(max_dims=3, max_meta_items=4)
    shape = [1, 1, 1, 1]
    _bad(
        [pack(raw_header("ping", arrays=[{"dtype": "|u1", "shape": shape}])), b"\x00"],
        "dims",
        limits=limits,
    )
    _bad(
        [pack(raw_header("ping", meta={str(i): i for i in range(5)}))],
        "msgpack|meta",
        limits=limits,
    )
    _bad(
        [pack(raw_header("ping", meta={"l": list(range(4)) + [9]}))], "msgpack|items", limits=limits
    )


def test_wrong_version():
    _bad([pack(raw_header("ping", v=1))], "version", code="version")
    _bad([pack(raw_header("ping", v=3))], "version", code="version")
    _bad([pack(raw_header("ping", v=True))], "version", code="version")
    _bad([pack(raw_header("ping", v="2"))], "version", code="version")
    head = raw_header("ping")
    del head["v"]
    _bad([pack(head)], "version", code="version")


@pytest.mark.parametrize("op", ["Forward", "reply", "", "pong2", 3, None])
def test_unknown_op(op):
    _bad([pack(raw_header(op))], "op must be")


@pytest.mark.parametrize(
    "field,value",
    [
        ("gen", True), ("gen", 1.0), ("gen", "1"), ("gen", -1), ("gen", 2**63), ("gen", None),
        ("step", False), ("layer", 0.0), ("seq", [1]), ("seq", -5),
        ("run", 5), ("run", ""), ("run", "r" * 129), ("run", None),
        ("experts", "ab"), ("experts", {"a": 1}), ("experts", 3),
        ("offsets", None), ("offsets", [0.0]), ("offsets", [True]),
        ("meta", []), ("meta", None), ("meta", {"k": {"nested": 1}}), ("meta", {"k": [[1]]}),
        ("meta", {"k": float("nan")}), ("meta", {"k": float("inf")}), ("meta", {"k": 2**64 - 1}),
        ("meta", {"": 1}), ("meta", {"k" * 65: 1}),
        ("arrays", {}), ("arrays", [[]]), ("arrays", [{"dtype": "<f4"}]),
        ("arrays", [{"dtype": "<f4", "shape": [1], "x": 0}]), ("arrays", [{"dtype": 5, "shape": [1]}]),
        ("arrays", [{"dtype": "<f4", "shape": "3"}]), ("arrays", [{"dtype": "<f4", "shape": [-1]}]),
        ("arrays", [{"dtype": "<f4", "shape": [True]}]), ("arrays", [{"dtype": "<f4", "shape": [1.0]}]),
    ],
)  # fmt: skip
def test_wrong_field_types_and_ranges(field, value):
    e = _bad([pack(raw_header("ping", **{field: value}))])
    # Only a request whose addressing fields cannot be read gets an uncorrelated error (§10);
    # with readable addressing the error reply names the request's seq.
    addressing = field in ("run", "gen", "step", "layer", "seq")
    assert (e.header is None) == addressing
    if not addressing:
        assert (e.header.op, e.header.run, e.header.seq) == ("ping", RUN, 1)


def test_unknown_and_missing_keys():
    _bad([pack(raw_header("ping", extra=1))], "unknown \\['extra'\\]")
    head = raw_header("ping")
    del head["meta"]
    _bad([pack(head)], "missing \\['meta'\\]")
    _bad([pack(raw_header("ping", re="ping"))], "unknown \\['re'\\]")  # requests carry no 're'
    ok = raw_header("ok")
    _bad([pack(ok)], "missing \\['re'\\]")


@pytest.mark.parametrize(
    "op,re_,meta,match",
    [
        ("ok", None, {}, "must name the request"),
        ("ok", "ping", {}, "answered with 'pong'"),
        ("pong", "update", {}, "answers 'ping'"),
        ("ok", "bogus", {}, "'re' must be"),
        ("ok", 3, {}, "'re' must be"),
        ("error", "ping", {"code": "nope", "message": "m"}, "code"),
        ("error", "ping", {"code": "internal"}, "message"),
        ("error", "ping", {"code": "internal", "message": 3}, "message"),
    ],
)  # fmt: skip
def test_inconsistent_replies(op, re_, meta, match):
    _bad([pack(raw_header(op, re=re_, meta=meta))], match)


@pytest.mark.parametrize(
    "op,fields,n_frames,match",
    [
        ("forward", {"experts": [1], "offsets": [0, 2]}, 0, "carries 1 arrays, got 0"),
        ("forward", {"experts": [1, 1], "offsets": [0, 1, 2]}, 1, "distinct"),
        ("forward", {"experts": [1, 2], "offsets": [0, 3, 2]}, 1, "non-decreasing"),
        ("forward", {"experts": [1, 2], "offsets": [1, 2, 2]}, 1, "start at 0"),
        ("forward", {"experts": [1, 2], "offsets": [0, 2]}, 1, "len\\(experts\\)\\+1"),
        ("forward", {"experts": [2**31], "offsets": [0, 2]}, 1, "experts\\[0\\]"),
        ("forward", {"experts": [-1], "offsets": [0, 2]}, 1, "experts\\[0\\]"),
        ("forward", {"experts": [1], "offsets": [0, 2], "meta": {"train": 1}}, 1, "train"),
        ("ping", {"experts": [1], "offsets": [0, 0]}, 0, "only forward/backward"),
        ("update", {}, 0, "needs meta\\['lr'\\]"),
        ("update", {"meta": {"lr": -0.1}}, 0, ">= 0"),
        ("update", {"meta": {"lr": "0.1"}}, 0, "number"),
        ("update", {"meta": {"lr": True}}, 0, "number"),
        ("save", {"meta": {"dir": "/ck"}}, 0, "tag"),
        ("save", {"meta": {"dir": "/ck", "tag": "../up"}}, 0, "tag"),
        ("save", {"meta": {"dir": "/ck", "tag": "a/b"}}, 0, "tag"),
        ("save", {"meta": {"tag": "t"}}, 0, "dir"),
        ("load", {"meta": {"dir": "", "tag": "t"}}, 0, "dir"),
        ("load", {"meta": {"dir": "/c\x00k", "tag": "t"}}, 0, "dir"),
        ("stats", {"meta": {"reset": "yes"}}, 0, "reset"),
    ],
)
def test_op_rules(op, fields, n_frames, match):
    arrays = [{"dtype": "<f4", "shape": [2, 1]}] * n_frames
    _bad([pack(raw_header(op, arrays=arrays, **fields))] + [b"\x00" * 8] * n_frames, match)


@pytest.mark.parametrize(
    "dtype,shape,offsets",
    [
        ("<i4", [2, 1], [0, 2]),
        ("<f4", [2], [0, 2]),
        ("<f4", [2, 1, 1], [0, 2]),
        ("<f4", [3, 1], [0, 2]),
    ],
)
def test_row_op_arrays_must_be_2d_float_matching_offsets(dtype, shape, offsets):
    n = math.prod(shape) * 4
    head = pack(
        raw_header(
            "backward", experts=[0], offsets=offsets, arrays=[{"dtype": dtype, "shape": shape}]
        )
    )
    e = _bad([head, b"\x00" * n], "backward")
    assert e.header is not None and e.header.op == "backward"


@pytest.mark.parametrize("frames", [b"abc", "abc", 5, None, [5], [object()], [VALID_HEAD, 1.5]])
def test_non_frame_inputs_raise_wire_error(frames):
    _bad(frames)


def test_strided_memoryview_frame_is_refused():
    strided = memoryview(np.zeros(8, np.uint8))[::2]
    _bad([strided], "contiguous")
    _bad([VALID_HEAD, strided], "contiguous")


# ------------------------------------------------------------------------ session


def test_check_session():
    h = Header(op="forward", run=RUN, gen=3, experts=(0,), offsets=(0, 0))
    wire.check_session(h, run=RUN, gen=3)
    with pytest.raises(WireError, match="run 'run-a', this is run 'run-b'") as info:
        wire.check_session(h, run="run-b", gen=3)
    assert info.value.code == "wrong_run"
    with pytest.raises(WireError, match="generation 3, current generation is 4") as info:
        wire.check_session(h, run=RUN, gen=4)
    assert info.value.code == "stale_generation" and info.value.header is h
    with pytest.raises(WireError, match="ahead") as info:
        wire.check_session(h, run=RUN, gen=2)
    assert info.value.code == "future_generation"
    load = Header(op="load", run=RUN, gen=5, meta={"dir": "/ck", "tag": "t"})
    wire.check_session(load, run=RUN, gen=4)  # a rollback reaches the shard through 'load'
    with pytest.raises(WireError):
        wire.check_session(load, run=RUN, gen=6)


def test_replay_key_of_request_and_reply_agree():
    req = Header(op="update", run=RUN, gen=1, step=2, layer=3, seq=4, meta={"lr": 0.1})
    assert req.replay_key == (RUN, 1, 2, 3, 4, "update")
    assert decode(wire.encode_reply(req)).header.replay_key == req.replay_key
    assert hash(req) == hash(decode(encode(req)).header)


# ------------------------------------------------------------------------ construction and limits


def test_encode_refuses_what_decode_would_refuse():
    req = Header(op="forward", run=RUN, gen=0, experts=(1,), offsets=(0, 2))
    with pytest.raises(TypeError, match="ndarray"):
        encode(req, [[[1.0]] * 2])
    with pytest.raises(TypeError, match="Header"):
        encode({"op": "ping"})
    for bad in (np.zeros((2, 2), np.float16), np.zeros((2, 2), ">f4"), np.zeros((2, 2), bool)):
        with pytest.raises(WireError, match="dtype"):
            encode(req, [bad])
    with pytest.raises(WireError, match="rows"):
        encode(req, [np.zeros((3, 2), np.float32)])
    with pytest.raises(WireError, match="op must be"):
        Header(op="bogus", run=RUN, gen=0)
    with pytest.raises(WireError, match="gen must be an int"):
        Header(op="ping", run=RUN, gen=np.float64(1))
    with pytest.raises(WireError, match="offsets must be a list"):
        Header(op="forward", run=RUN, gen=0, experts=(1,), offsets=np.array([0.0, 2.0]))


def test_numpy_scalars_and_index_arrays_from_callers_become_python_ints():
    offsets = np.array([0, 2, 5], dtype=np.int64)
    h = Header(op="forward", run=RUN, gen=np.int32(3), experts=np.array([7, 1], np.int32),
               offsets=offsets, meta={"train": np.bool_(True)})  # fmt: skip
    assert h.gen == 3 and type(h.gen) is int
    assert h.experts == (7, 1) and h.offsets == (0, 2, 5)
    assert all(type(v) is int for v in h.experts + h.offsets)
    assert h.meta["train"] is True
    lr = Header(op="update", run=RUN, gen=0, meta={"lr": np.float32(0.5)}).meta["lr"]
    assert type(lr) is float and lr == 0.5
    head = msgpack.unpackb(bytes(encode(h, [np.zeros((5, 2), np.float32)])[0]), raw=False)
    assert head["gen"] == 3 and head["offsets"] == [0, 2, 5] and head["meta"] == {"train": True}


def test_limits_validate_themselves():
    with pytest.raises(ValueError, match="max_arrays"):
        Limits(max_arrays=0)
    with pytest.raises(ValueError, match="max_dims"):
        Limits(max_dims=True)


# ------------------------------------------------------------------------ fuzz


def _valid_message() -> list[bytes]:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    h = Header(op="forward", run=RUN, gen=1, step=2, layer=0, seq=3, experts=(4, 1), offsets=(0, 1, 3),
               meta={"train": True, "note": "abc", "xs": (1, 2.5, None)})  # fmt: skip
    return [bytes(f) for f in encode(h, [x])]


def _check_outcome(frames) -> bool:
    """Decode must raise WireError or give a message that re-encodes to an equal message."""
    try:
        m = decode(frames)
    except WireError:
        return False
    again = decode(encode(m.header, m.arrays))
    assert again.header == m.header
    for a, b in zip(again.arrays, m.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    return True


def test_fuzz_random_byte_flips_only_raise_wire_error():
    rng = np.random.default_rng(20240611)
    head, body = _valid_message()
    decoded = 0
    for _ in range(3000):
        b = bytearray(head)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        decoded += _check_outcome([bytes(b), body])
    for _ in range(300):
        cut = int(rng.integers(len(head)))
        decoded += _check_outcome([head[:cut] + rng.bytes(int(rng.integers(0, 8))), body])
        decoded += _check_outcome([rng.bytes(int(rng.integers(1, 64)))])
    assert decoded > 0  # some flips (e.g. inside strings) leave a valid message
