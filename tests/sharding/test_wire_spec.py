"""The wire module against docs/PROTOCOL.md where the other wire tests left it unpinned
(found by `tools/mutate.py moe/sharding/wire.py`: these kill its survivors).

Oracles: the spec's limits table and heartbeat constants, read from the document itself;
the spec's rules for requests, replies, handshakes and the ping echo; frames written by hand.
"""

import dataclasses
import pathlib
import re

import msgpack
import numpy as np
import pytest

from moe.sharding import wire
from moe.sharding.wire import DEFAULT_LIMITS, Header, Limits, WireError, decode, encode

pytestmark = pytest.mark.unit

RUN = "run-a"
SPEC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
HEX64, HEX32 = "ab" * 32, "cd" * 16


def raw(op: str = "ping", **fields) -> dict:
    h = {"v": 2, "op": op, "run": RUN, "gen": 0, "step": 0, "layer": 0, "seq": 1,
         "experts": [], "offsets": [0], "arrays": [], "meta": {}}
    h.update(fields)
    return h


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def refused(frames, match: str, code: str | None = None) -> WireError:
    with pytest.raises(WireError, match=match) as e:
        decode(frames)
    if code is not None:
        assert e.value.code == code
    return e.value


# ------------------------------------------------------------------------ the spec's numbers
def _table_default(name: str) -> int:
    row = re.search(rf"^\| `{name}` \| ([^|]+) \|", SPEC, re.M)
    assert row, f"docs/PROTOCOL.md has no row for {name}"
    cell = row.group(1)
    exact = re.search(r"\(([\d,]+)\)", cell)  # "1 MiB (1,048,576)"
    if exact is None:
        exact = re.search(r"([\d,]+)(?!.*\d)", cell.replace("2²⁷", ""))
    return int(exact.group(1).replace(",", ""))


@pytest.mark.parametrize("name", ["max_header_bytes", "max_message_bytes", "max_array_elements", "max_arrays",
                                  "max_dims", "max_experts", "max_meta_items", "max_str_len"])
def test_the_default_limits_are_the_specs(name):
    assert getattr(DEFAULT_LIMITS, name) == _table_default(name)


def test_the_heartbeat_constants_are_the_specs():
    interval = float(re.search(r"`HEARTBEAT_INTERVAL_S` = ([\d.]+) s", SPEC).group(1))
    timeout = float(re.search(r"`HEARTBEAT_TIMEOUT_S` = ([\d.]+) s", SPEC).group(1))
    assert (wire.HEARTBEAT_INTERVAL_S, wire.HEARTBEAT_TIMEOUT_S) == (interval, timeout)


def test_a_limit_of_one_is_valid_and_zero_is_not():
    assert Limits(max_arrays=1).max_arrays == 1
    with pytest.raises(ValueError, match="Limits.max_arrays must be a positive int, got 0"):
        Limits(max_arrays=0)


def test_a_wire_error_says_what_it_refuses():
    e = WireError("offsets must start at 0, got 3")
    assert str(e) == "offsets must start at 0, got 3" and e.code == "bad_request" and e.header is None


# ------------------------------------------------------------------------ headers
def test_a_header_addresses_step_layer_seq_zero_and_no_rows_by_default():
    h = Header(op="ping", run=RUN, gen=4)
    assert (h.step, h.layer, h.seq, h.experts, h.offsets) == (0, 0, 0, (), (0,))
    assert decode(encode(h)).header.seq == 0


def test_address_refuses_an_unknown_op_and_leaves_rows_empty():
    with pytest.raises(WireError, match="op must be one of"):
        Header.address("pong", RUN, 0, 0, 0, 1)  # a reply kind is not a request op
    h = Header.address("forward", RUN, 1, 2, 3, 4)
    assert (h.op, h.gen, h.step, h.layer, h.seq, h.experts, h.offsets) == ("forward", 1, 2, 3, 4, (), (0,))


def test_a_request_may_not_name_a_request_it_answers():
    with pytest.raises(WireError, match=r"a request \('ping'\) has no 're', got 'stats'"):
        Header(op="ping", run=RUN, gen=0, reply_to="stats")


def test_meta_ints_span_signed_64_bits_and_no_more():
    assert Header(op="ping", run=RUN, gen=0, meta={"x": -(2**63)}).meta["x"] == -(2**63)
    with pytest.raises(WireError, match=r"meta\['x'\]"):
        Header(op="ping", run=RUN, gen=0, meta={"x": -(2**63) - 1})


def test_update_lr_zero_is_allowed_and_negative_is_not():
    assert Header(op="update", run=RUN, gen=0, meta={"lr": 0.0}).meta["lr"] == 0.0
    with pytest.raises(WireError, match=r"'update' meta\['lr'\] must be >= 0"):
        Header(op="update", run=RUN, gen=0, meta={"lr": -1e-3})


def test_hello_carries_a_nonce_and_auth_a_proof_of_64_hex_digits():
    assert Header(op="hello", run=RUN, gen=0, meta={"nonce": HEX64}).meta["nonce"] == HEX64
    for op, key in (("hello", "nonce"), ("auth", "proof")):
        for bad in ("AB" * 32, "ab" * 31, 7):
            with pytest.raises(WireError, match=rf"'{op}' meta\['{key}'\] must be 64 lowercase hex digits"):
                Header(op=op, run=RUN, gen=0, meta={key: bad})


def test_auth_may_join_a_session_of_32_hex_digits_and_hello_does_not_check_it():
    assert Header(op="auth", run=RUN, gen=0, meta={"proof": HEX64, "session": HEX32}).meta["session"] == HEX32
    with pytest.raises(WireError, match=r"'auth' meta\['session'\] must be 32 lowercase hex digits"):
        Header(op="auth", run=RUN, gen=0, meta={"proof": HEX64, "session": "xyz"})
    assert Header(op="hello", run=RUN, gen=0, meta={"nonce": HEX64, "session": "xyz"}).meta["session"] == "xyz"


def test_replies_answer_requests_only():
    request = Header(op="stats", run=RUN, gen=1, seq=5)
    reply = wire.reply_header(request)
    with pytest.raises(WireError, match="can only reply to a request header, got 'ok'"):
        wire.reply_header(reply)
    with pytest.raises(WireError, match="can only reply to a request header, got 'ok'"):
        wire.encode_error(reply, "no")
    err = decode(wire.encode_error(request, "nope", code="not_found")).header
    assert (err.op, err.reply_to, err.gen, err.seq, err.meta["code"]) == ("error", "stats", 1, 5, "not_found")
    blind = decode(wire.encode_error(None, "unreadable")).header
    assert (blind.run, blind.gen, blind.reply_to) == ("", 0, None)


# ------------------------------------------------------------------------ arrays
def test_a_stats_reply_carries_its_two_arrays_and_other_ops_none():
    stats = Header(op="stats", run=RUN, gen=0)
    ok = [np.arange(3, dtype="<i4"), np.arange(3, dtype="<i8")]
    assert len(decode(wire.encode_reply(stats, ok)).arrays) == 2
    with pytest.raises(WireError, match=r"a 'ok' reply to 'stats' carries 2 arrays, got 1"):
        wire.encode_reply(stats, ok[:1])
    with pytest.raises(WireError, match=r"a 'stats' request carries 0 arrays, got 1"):
        encode(stats, [np.zeros(2, "<f4")])


def test_array_specs_are_maps_with_a_short_dtype_and_a_list_shape():
    refused([pack(raw(arrays=[["<f4", [2]]])), b"\0" * 8],
            r"^arrays\[0\] must be a map with keys \['dtype', 'shape'\], got list$")
    refused([pack(raw(arrays=[{"dtype": "<f4"}])), b"\0" * 8],
            r"^arrays\[0\] must be a map with keys \['dtype', 'shape'\], got \[\"'dtype'\"\]$")
    e = refused([pack(raw(arrays=[{"dtype": "<f4xxxxxx", "shape": [2]}])), b"\0" * 8],
                r"arrays\[0\]\.dtype must be at most 8 characters")
    assert e.code == "too_large"
    refused([pack(raw(arrays=[{"dtype": "<f4", "shape": 2}])), b"\0" * 8],
            r"arrays\[0\]\.shape must be a list of ints, got int")
    refused([pack(raw(arrays=[{"dtype": "<f4", "shape": [-2]}])), b""], r"arrays\[0\]\.shape\[0\]")


def test_the_encoder_refuses_a_dtype_the_spec_does_not_list():
    with pytest.raises(WireError, match=r"arrays\[0\] dtype must be one of .*got '<f2'"):
        encode(Header(op="ping", run=RUN, gen=0), [np.zeros(2, np.float16)])


# ------------------------------------------------------------------------ decoding
def test_an_op_that_is_not_a_string_is_refused():
    refused([pack(raw(op=5))], r"op must be one of .*got 5")


def test_only_a_ping_keeps_its_meta_bytes_and_its_pong_echoes_them_exactly():
    # meta written with a non-canonical int width (uint64 for 1): a re-encoder would shrink it
    meta = b"\x81" + msgpack.packb("k") + b"\xcf" + (1).to_bytes(8, "big")
    h = pack(raw())
    assert h.endswith(b"\xa4meta\x80")
    ping = decode([h[: -1] + meta])
    assert ping.raw_meta == meta and ping.header.meta == {"k": 1}
    pong = wire.encode_pong(ping)
    assert bytes(pong[0]).endswith(b"\xa4meta" + meta)
    assert decode(pong).header.op == "pong"
    assert decode([pack(raw("stats"))]).raw_meta is None


def test_frames_of_any_buffer_format_are_read_as_bytes():
    x = np.arange(4, dtype="<f4")
    header = pack(raw(arrays=[{"dtype": "<f4", "shape": [4]}]))
    m = decode([header, memoryview(x)])  # a float32 buffer, not bytes
    assert np.array_equal(m.arrays[0], x)
    m = decode([np.frombuffer(header, np.uint8), memoryview(x.view(np.uint8))])
    assert np.array_equal(m.arrays[0], x)


def test_the_header_decoder_refuses_bin_and_ext_and_takes_max_experts():
    refused([pack(raw(meta={"k": b"\x00"}))], "not valid msgpack within limits")
    ext = msgpack.packb(raw(meta={"k": msgpack.ExtType(1, b"x")}), use_bin_type=True)
    refused([ext], "not valid msgpack within limits")
    small = Limits(max_experts=3, max_meta_items=3, max_arrays=3, max_dims=3)
    h = raw("forward", experts=[0, 1, 2], offsets=[0, 1, 2, 3], arrays=[{"dtype": "<f4", "shape": [3, 1]}])
    m = decode([pack(h), np.zeros(3, "<f4").tobytes()], limits=small)
    assert m.header.offsets == (0, 1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.raw_meta = b""  # a decoded message is read-only, like its arrays
    too_long = raw("forward", experts=[0, 1, 2], offsets=[0, 1, 2, 3, 3], arrays=[{"dtype": "<f4", "shape": [3, 1]}])
    with pytest.raises(WireError) as e:
        decode([pack(too_long), np.zeros(3, "<f4").tobytes()], limits=small)
    assert e.value.code == "too_large"  # the msgpack array bound is max_experts + 1, not more
