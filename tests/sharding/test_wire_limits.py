"""Every wire limit of docs/PROTOCOL.md §11 and §3, exactly at the limit (accepted) and one past
it (refused), on the decoding side and, where a sender could exceed it, on the encoding side.

Messages are hand-built msgpack (independent of the encoder). A limit whose comparison is
turned from `>` into `>=` (or the other way) fails one of the two halves of its test.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from moe.sharding import wire
from moe.sharding.wire import Header, Limits, WireError, decode, encode

pytestmark = pytest.mark.unit

RUN = "r"
SMALL = Limits(max_header_bytes=4096, max_message_bytes=8192, max_array_elements=1000, max_arrays=3,
               max_dims=3, max_experts=10, max_meta_items=4, max_str_len=40)


def head(op: str = "ping", **fields) -> dict:
    h = {"v": 2, "op": op, "run": RUN, "gen": 0, "step": 0, "layer": 0, "seq": 1, "experts": [], "offsets": [0],
         "arrays": [], "meta": {}}
    h.update(fields)
    return h


def pack(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def accepts(frames, limits=SMALL) -> wire.Message:
    return decode(frames, limits=limits)


def refuses(frames, code: str = "too_large", limits=SMALL) -> WireError:
    with pytest.raises(WireError) as info:
        decode(frames, limits=limits)
    assert info.value.code == code, str(info.value)
    return info.value


def _spec(n: int, dtype: str = "|u1") -> dict:
    return {"dtype": dtype, "shape": [n]}


# ----------------------------------------------------------------------------- Limits


def test_frames_per_message_at_and_past_one_plus_max_arrays():
    arrays = [_spec(0)] * SMALL.max_arrays
    accepts([pack(head(arrays=arrays))] + [b""] * SMALL.max_arrays)
    refuses([pack(head(arrays=arrays))] + [b""] * (SMALL.max_arrays + 1))


def test_arrays_per_message_at_and_past_max_arrays():
    accepts([pack(head(arrays=[_spec(0)] * SMALL.max_arrays))] + [b""] * SMALL.max_arrays)
    e = refuses([pack(head(arrays=[_spec(0)] * (SMALL.max_arrays + 1)))], limits=Limits(
        max_header_bytes=4096, max_message_bytes=8192, max_array_elements=1000, max_arrays=3, max_dims=3,
        max_experts=10, max_meta_items=4, max_str_len=40))
    assert "arrays per message" in str(e)
    encode(Header(op="ping", run=RUN, gen=0), [np.zeros(0, np.uint8)] * SMALL.max_arrays, limits=SMALL)
    with pytest.raises(WireError, match="arrays per message"):
        encode(Header(op="ping", run=RUN, gen=0), [np.zeros(0, np.uint8)] * (SMALL.max_arrays + 1), limits=SMALL)


def _header_of_size(n: int) -> bytes:
    """A valid ping header of exactly n bytes (a meta string pads it)."""
    for pad in range(0, n):
        b = pack(head(meta={"p": "x" * pad}))
        if len(b) == n:
            return b
    raise AssertionError(f"no header of {n} bytes")


def test_header_bytes_at_and_past_max_header_bytes():
    limits = Limits(max_header_bytes=300, max_str_len=400)
    accepts([_header_of_size(300)], limits)
    assert "limit 300" in str(refuses([_header_of_size(301)], limits=limits))
    meta_at = msgpack.unpackb(_header_of_size(300))["meta"]
    encode(Header(op="ping", run=RUN, gen=0, seq=1, meta=meta_at), limits=limits)
    with pytest.raises(WireError, match="header is 301 bytes, limit 300"):
        encode(Header(op="ping", run=RUN, gen=0, seq=1, meta={"p": meta_at["p"] + "x"}), limits=limits)


def test_message_bytes_at_and_past_max_message_bytes():
    h = pack(head(arrays=[_spec(0)]))
    body = SMALL.max_message_bytes - len(h)
    ok = pack(head(arrays=[_spec(body)]))
    assert len(ok) == len(h) + (len(ok) - len(h))  # the spec grows with the number's width
    body = SMALL.max_message_bytes - len(ok)
    frames = [pack(head(arrays=[_spec(body)]))]
    assert len(frames[0]) == len(ok)
    limits = Limits(max_header_bytes=4096, max_message_bytes=8192, max_array_elements=10_000)
    accepts(frames + [b"\x00" * body], limits)
    refuses([pack(head(arrays=[_spec(body + 1)])), b"\x00" * (body + 1)], limits=limits)  # one byte more
    header = Header(op="ping", run=RUN, gen=0, seq=1)
    encode(header, [np.zeros(body, np.uint8)], limits=limits)
    with pytest.raises(WireError, match="8192-byte"):
        encode(header, [np.zeros(body + 1, np.uint8)], limits=limits)


def test_the_arrays_a_header_announces_at_and_past_max_message_bytes():
    """Refused from the header alone, before any frame is looked at (here: none is sent)."""
    limits = Limits(max_message_bytes=8192, max_array_elements=10_000)
    n = limits.max_message_bytes
    assert refuses([pack(head(arrays=[_spec(n)]))], code="bad_request", limits=limits)  # only the frame is missing
    assert "message limit" in str(refuses([pack(head(arrays=[_spec(n - 4), _spec(5)]))], limits=limits))


def test_array_elements_at_and_past_max_array_elements():
    n = SMALL.max_array_elements
    accepts([pack(head(arrays=[_spec(n)])), b"\x00" * n])
    assert "elements" in str(refuses([pack(head(arrays=[_spec(n + 1)])), b"\x00" * (n + 1)]))
    assert "elements" in str(refuses([pack(head(arrays=[{"dtype": "|u1", "shape": [n + 1, 1]}]))]))


def test_dims_at_and_past_max_dims():
    accepts([pack(head(arrays=[{"dtype": "|u1", "shape": [1] * SMALL.max_dims}])), b"\x00"])
    assert "dims" in str(refuses([pack(head(arrays=[{"dtype": "|u1", "shape": [1] * (SMALL.max_dims + 1)}])),
                                  b"\x00"]))


def _forward(n_experts: int) -> dict:
    return head("forward", experts=list(range(n_experts)), offsets=[0] * (n_experts + 1),
                arrays=[{"dtype": "<f4", "shape": [0, 2]}])


def test_experts_at_and_past_max_experts():
    accepts([pack(_forward(SMALL.max_experts)), b""])
    refuses([pack(_forward(SMALL.max_experts + 1)), b""])  # msgpack's bound on the offsets list comes first
    ok = Header(op="forward", run=RUN, gen=0, experts=tuple(range(10)), offsets=(0,) * 11)
    encode(ok, [np.zeros((0, 2), np.float32)], limits=SMALL)
    with pytest.raises(WireError, match="experts"):
        encode(Header(op="forward", run=RUN, gen=0, experts=tuple(range(11)), offsets=(0,) * 12),
               [np.zeros((0, 2), np.float32)], limits=SMALL)


def test_meta_items_at_and_past_max_meta_items():
    n = SMALL.max_meta_items
    accepts([pack(head(meta={f"k{i}": i for i in range(n)}))])
    refuses([pack(head(meta={f"k{i}": i for i in range(n + 1)}))])
    accepts([pack(head(meta={"l": list(range(n))}))])
    refuses([pack(head(meta={"l": list(range(n + 1))}))])


def test_meta_strings_at_and_past_max_str_len():
    n = SMALL.max_str_len
    accepts([pack(head(meta={"s": "x" * n}))])
    refuses([pack(head(meta={"s": "x" * (n + 1)}))])  # msgpack refuses to read the string at all
    accepts([pack(head(meta={"l": ["x" * n]}))])
    limits = Limits(max_str_len=n)
    encode(Header(op="ping", run=RUN, gen=0, meta={"s": "x" * n}), limits=limits)
    with pytest.raises(WireError, match=f"at most {n} characters"):
        encode(Header(op="ping", run=RUN, gen=0, meta={"s": "x" * (n + 1)}), limits=limits)


def test_max_frame_bytes_is_the_largest_frame_a_valid_message_can_have():
    assert SMALL.max_frame_bytes == max(4096, min(8192, 8 * 1000))
    assert Limits().max_frame_bytes == 1 << 29
    assert Limits(max_message_bytes=1 << 40, max_array_elements=10).max_frame_bytes == 1 << 20


# ----------------------------------------------------------------------------- fixed bounds of §3


@pytest.mark.parametrize("field,at,past", [
    ("gen", 2**63 - 1, 2**63), ("step", 2**63 - 1, 2**63), ("layer", 2**63 - 1, 2**63),
    ("seq", 2**63 - 1, 2**63), ("gen", 0, -1), ("seq", 0, -1),
])
def test_counters_at_and_past_their_range(field, at, past):
    accepts([pack(head(**{field: at}))])
    refuses([pack(head(**{field: past}))], code="bad_request")


def test_run_length_at_and_past_128():
    accepts([pack(head(run="r" * 128))], wire.DEFAULT_LIMITS)
    refuses([pack(head(run="r" * 129))], limits=wire.DEFAULT_LIMITS)
    refuses([pack(head(run=""))], code="bad_request", limits=wire.DEFAULT_LIMITS)


def test_meta_key_length_at_and_past_64():
    accepts([pack(head(meta={"k" * 64: 1}))], wire.DEFAULT_LIMITS)
    refuses([pack(head(meta={"k" * 65: 1}))], limits=wire.DEFAULT_LIMITS)


def test_meta_ints_at_and_past_their_range():
    """-2**63 - 1 cannot be written in msgpack at all; 2**63 can (uint 64) and is refused."""
    accepts([pack(head(meta={"a": 2**63 - 1, "b": -(2**63)}))])
    refuses([pack(head(meta={"a": 2**63}))], code="bad_request")


def test_expert_ids_at_and_past_2_31_minus_1():
    top = 2**31 - 1
    accepts([pack(head("forward", experts=[top], offsets=[0, 0], arrays=[{"dtype": "<f4", "shape": [0, 1]}])), b""])
    refuses([pack(head("forward", experts=[top + 1], offsets=[0, 0], arrays=[{"dtype": "<f4", "shape": [0, 1]}])),
             b""], code="bad_request")


def test_error_messages_are_cut_at_2000_characters():
    at = decode(wire.encode_error(None, "x" * 2000)).header.meta["message"]
    assert at == "x" * 2000
    past = decode(wire.encode_error(None, "x" * 2001)).header.meta["message"]
    assert len(past) == 2000 and past.endswith("...")
