"""Wire protocol between the coordinator and expert shard servers (the spec is docs/PROTOCOL.md).

A message is one msgpack header frame followed by one raw frame per array. Array bytes are
never msgpack-packed, so a ZeroMQ peer can send them with ``copy=False`` and the receiver can
view them with ``np.frombuffer`` without copying. Everything here is pure (no sockets, except
``configure_socket``) so it can be tested byte by byte.

The decoder treats every byte as hostile: every field is type- and range-checked, every size is
bounded before anything is allocated, and every failure is a single exception type, ``WireError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "ERROR_CODES",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TIMEOUT_S",
    "OPS",
    "PROTOCOL_VERSION",
    "REPLY_KINDS",
    "Header",
    "Limits",
    "Message",
    "WireError",
    "check_session",
    "configure_socket",
    "decode",
    "encode",
    "encode_error",
    "encode_pong",
    "encode_reply",
    "reply_header",
]

PROTOCOL_VERSION = 2
OPS = ("hello", "auth", "forward", "backward", "update", "save", "load", "stats", "ping", "shutdown")
HANDSHAKE_OPS = ("hello", "auth")  # the only ops a link may send before it is admitted (§7)
REPLY_KINDS = ("ok", "pong", "error")
ERROR_CODES = (
    "bad_request",  # malformed or inconsistent message; fix the sender
    "version",  # protocol version not spoken by the receiver
    "too_large",  # a size limit was exceeded
    "wrong_run",  # the message belongs to another run
    "stale_generation",  # the message is from an older generation than the receiver's
    "future_generation",  # the message is from a newer generation; the shard needs a 'load'
    "not_found",  # a named expert, file or checkpoint does not exist
    "internal",  # the receiver failed; the connection stays usable
    "unauthorized",  # the link has not proven the run secret (one generic refusal, §7)
)
# Canonical numpy dtype strings: explicit little-endian ('|' for one-byte types, as numpy spells it).
DTYPES = ("<f4", "<f8", "<i4", "<i8", "|u1")
FLOAT_DTYPES = ("<f4", "<f8")
ROW_OPS = ("forward", "backward")  # the ops that carry packed rows with experts/offsets

HEARTBEAT_INTERVAL_S = 1.0  # send a ping on a link after this long without sending on it
HEARTBEAT_TIMEOUT_S = 5.0  # declare the peer dead after this long without any message

MAX_INT = 2**63 - 1  # counters fit a signed 64-bit integer in every language
MAX_EXPERT_ID = 2**31 - 1  # expert ids are int32 on the data path
MAX_RUN_LEN = 128
MAX_META_KEY_LEN = 64
MAX_ERROR_MESSAGE_LEN = 2000
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")  # handshake nonces and proofs: 32 bytes, lowercase hex
_HEX32_RE = re.compile(r"[0-9a-f]{32}")  # session ids: 16 bytes

REQUEST_KEYS = frozenset(
    ("v", "op", "run", "gen", "step", "layer", "seq", "experts", "offsets", "arrays", "meta")
)
REPLY_KEYS = REQUEST_KEYS | {"re"}
_SPEC_KEYS = frozenset(("dtype", "shape"))


class WireError(ValueError):
    """A message that breaks the protocol; ``code`` is one of ERROR_CODES for the error reply.

    ``header`` is the decoded header when the header itself was valid (so a server can still
    address its error reply to the right ``seq``), otherwise None.
    """

    def __init__(self, message: str, *, code: str = "bad_request", header: Header | None = None):
        super().__init__(message)
        self.code = code
        self.header = header


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before allocating anything; a sender checks the same."""

    max_header_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 29  # header + all array frames
    max_array_elements: int = 1 << 27
    max_arrays: int = 8
    max_dims: int = 8
    max_experts: int = 1 << 16
    max_meta_items: int = 32  # keys in meta, and items in a list inside meta
    max_str_len: int = 4096  # any string in the header (paths, messages)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")

    @property
    def max_frame_bytes(self) -> int:
        """The largest single frame a valid message can contain (for ZMQ_MAXMSGSIZE)."""
        largest_array = min(self.max_message_bytes, self.max_array_elements * 8)
        return max(self.max_header_bytes, largest_array)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Header:
    """The header frame of a request (``op`` in OPS) or a reply (``op`` in REPLY_KINDS).

    ``reply_to`` (wire key ``re``) is the request op a reply answers; None for requests and for
    an error reply to a request that could not be decoded at all. Construction validates
    structure and types; size limits are checked by ``encode``/``decode``.
    """

    op: str
    run: str
    gen: int
    step: int = 0
    layer: int = 0
    seq: int = 0
    experts: tuple[int, ...] = ()
    offsets: tuple[int, ...] = (0,)
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    reply_to: str | None = None

    def __post_init__(self) -> None:
        _check_op(self.op, self.reply_to)
        uncorrelated = self.op == "error" and self.reply_to is None
        _check_run(self.run, allow_empty=uncorrelated)
        for name in ("gen", "step", "layer", "seq"):
            object.__setattr__(self, name, _check_int(_py(getattr(self, name)), name, 0, MAX_INT))
        experts = _int_tuple(self.experts, "experts", 0, MAX_EXPERT_ID)
        offsets = _int_tuple(self.offsets, "offsets", 0, MAX_INT)
        _check_offsets(experts, offsets)
        if experts and self.kind not in ROW_OPS:
            raise WireError(
                f"only forward/backward carry experts, got {len(experts)} for {self.kind!r}"
            )
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "meta", MappingProxyType(_check_meta(self.meta)))
        _check_op_meta(self)

    @classmethod
    def address(cls, op: str, run: Any, gen: Any, step: Any, layer: Any, seq: Any) -> Header:
        """A request's addressing fields only (experts, offsets and meta left empty), to
        correlate the error reply to a request whose other fields are wrong (§10). Raises
        WireError when the addressing fields themselves are wrong."""
        if op not in OPS:
            raise WireError(f"op must be one of {OPS}, got {op!r}")
        _check_run(run, allow_empty=False)
        h = object.__new__(cls)
        fields = {"op": op, "run": run, "experts": (), "offsets": (0,), "meta": MappingProxyType({}),
                  "reply_to": None}
        for name, value in (("gen", gen), ("step", step), ("layer", layer), ("seq", seq)):
            fields[name] = _check_int(value, name, 0, MAX_INT)
        for name, value in fields.items():
            object.__setattr__(h, name, value)
        return h

    @property
    def is_reply(self) -> bool:
        return self.op in REPLY_KINDS

    @property
    def kind(self) -> str:
        """'error' for errors, else the request op this message is or answers."""
        if self.op == "error":
            return "error"
        return self.reply_to if self.is_reply else self.op

    @property
    def replay_key(self) -> tuple[str, int, int, int, int, str]:
        """(run, gen, step, layer, seq, op): a request seen twice with this key is a replay."""
        op = self.reply_to if self.is_reply else self.op
        return (self.run, self.gen, self.step, self.layer, self.seq, op or "")


@dataclass(frozen=True)
class Message:
    """A decoded message. Arrays are read-only views on the frame memory: copy before writing."""

    header: Header
    arrays: tuple[np.ndarray, ...]
    raw_meta: bytes | None = None  # a ping's meta exactly as it came, for the pong (§5)


# ----------------------------------------------------------------------------- field checks


def _py(value: Any) -> Any:
    """A numpy bool/int/float scalar from a caller becomes the Python scalar the wire carries."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    return value


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if type(value) is not int:  # bool and float are refused: 1.0 and true are not 1
        raise WireError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise WireError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _int_tuple(value: Any, name: str, lo: int, hi: int) -> tuple[int, ...]:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        value = value.tolist()  # e.g. offsets straight from the dispatch kernel
    if not isinstance(value, list | tuple):
        raise WireError(f"{name} must be a list of ints, got {type(value).__name__}")
    return tuple(_check_int(_py(v), f"{name}[{i}]", lo, hi) for i, v in enumerate(value))


def _check_str(value: Any, name: str, max_len: int, *, allow_empty: bool = False) -> str:
    if type(value) is not str:
        raise WireError(f"{name} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise WireError(f"{name} must be a non-empty str")
    if len(value) > max_len:
        raise WireError(
            f"{name} must be at most {max_len} characters, got {len(value)}", code="too_large"
        )
    return value


def _check_op(op: Any, reply_to: Any) -> None:
    if type(op) is not str or op not in OPS + REPLY_KINDS:
        raise WireError(f"op must be one of {OPS + REPLY_KINDS}, got {op!r}")
    if op in OPS:
        if reply_to is not None:
            raise WireError(f"a request ({op!r}) has no 're', got {reply_to!r}")
        return
    if reply_to is None and op != "error":
        raise WireError(f"a {op!r} reply must name the request op in 're', got None")
    if reply_to is not None and (type(reply_to) is not str or reply_to not in OPS):
        raise WireError(f"'re' must be one of {OPS} or nil, got {reply_to!r}")
    if op == "pong" and reply_to != "ping":
        raise WireError(f"'pong' answers 'ping', got re={reply_to!r}")
    if op == "ok" and reply_to == "ping":
        raise WireError("a 'ping' is answered with 'pong', got 'ok'")


def _check_run(run: Any, *, allow_empty: bool) -> None:
    _check_str(run, "run", MAX_RUN_LEN, allow_empty=allow_empty)


def _check_offsets(experts: tuple[int, ...], offsets: tuple[int, ...]) -> None:
    if len(set(experts)) != len(experts):
        raise WireError(f"experts must be distinct, got {list(experts)[:16]}")
    if len(offsets) != len(experts) + 1:
        raise WireError(
            f"offsets must have len(experts)+1 = {len(experts) + 1} entries, got {len(offsets)}"
        )
    if offsets[0] != 0:
        raise WireError(f"offsets must start at 0, got {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise WireError(
                f"offsets must be non-decreasing, got {offsets[i - 1]} then {offsets[i]} at {i}"
            )


def _check_scalar(value: Any, name: str) -> Any:
    value = _py(value)
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        return _check_int(value, name, -(2**63), MAX_INT)
    if type(value) is float:
        if not math.isfinite(value):
            raise WireError(f"{name} must be a finite number, got {value}")
        return value
    raise WireError(f"{name} must be nil, bool, int, float or str, got {type(value).__name__}")


def _check_meta(meta: Any) -> dict[str, Any]:
    """Meta is a flat map of scalars (or lists of scalars): small, and safe to log."""
    if not isinstance(meta, Mapping):
        raise WireError(f"meta must be a map, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    for key, value in meta.items():
        _check_str(key, "meta key", MAX_META_KEY_LEN)
        if isinstance(value, list | tuple):
            out[key] = tuple(_check_scalar(v, f"meta[{key!r}][{i}]") for i, v in enumerate(value))
        else:
            out[key] = _check_scalar(value, f"meta[{key!r}]")
    return out


def _number(meta: Mapping[str, Any], key: str, op: str) -> float:
    if key not in meta:
        raise WireError(f"{op!r} needs meta[{key!r}], got keys {sorted(meta)}")
    value = meta[key]
    if type(value) not in (int, float):
        raise WireError(f"{op!r} meta[{key!r}] must be a number, got {type(value).__name__}")
    return float(value)


def _check_op_meta(h: Header) -> None:
    meta, op = h.meta, h.op
    if op == "error":
        code = meta.get("code")
        if code not in ERROR_CODES:
            raise WireError(f"error meta['code'] must be one of {ERROR_CODES}, got {code!r}")
        if type(meta.get("message")) is not str:
            raise WireError(
                f"error meta['message'] must be a str, got {type(meta.get('message')).__name__}"
            )
    elif op == "update":
        if _number(meta, "lr", op) < 0:
            raise WireError(f"'update' meta['lr'] must be >= 0, got {meta['lr']}")
    elif op in HANDSHAKE_OPS:
        key = "nonce" if op == "hello" else "proof"
        value = meta.get(key)
        if type(value) is not str or not _HEX64_RE.fullmatch(value):
            raise WireError(f"{op!r} meta[{key!r}] must be 64 lowercase hex digits, got {value!r}")
        join = meta.get("session")
        if op == "auth" and join is not None and (type(join) is not str or not _HEX32_RE.fullmatch(join)):
            raise WireError(f"'auth' meta['session'] must be 32 lowercase hex digits, got {join!r}")
    elif op in ("save", "load"):
        dir_ = meta.get("dir")
        if type(dir_) is not str or not dir_ or "\x00" in dir_:
            raise WireError(f"{op!r} meta['dir'] must be a non-empty str without NUL, got {dir_!r}")
        tag = meta.get("tag")
        if type(tag) is not str or not _TAG_RE.fullmatch(tag):
            raise WireError(f"{op!r} meta['tag'] must match {_TAG_RE.pattern}, got {tag!r}")
    flag = {"forward": "train", "stats": "reset"}.get(op)  # optional bool switches
    if flag is not None and flag in meta and type(meta[flag]) is not bool:
        raise WireError(f"{op!r} meta[{flag!r}] must be a bool, got {type(meta[flag]).__name__}")


def _check_limits(h: Header, limits: Limits) -> None:
    """The size checks that depend on the receiver's Limits (structure is checked by Header)."""
    if len(h.experts) > limits.max_experts:
        raise WireError(
            f"at most {limits.max_experts} experts per message, got {len(h.experts)}",
            code="too_large",
        )
    if len(h.meta) > limits.max_meta_items:
        raise WireError(
            f"at most {limits.max_meta_items} meta items, got {len(h.meta)}", code="too_large"
        )
    for key, value in h.meta.items():
        items = value if isinstance(value, tuple) else (value,)
        if len(items) > limits.max_meta_items:
            raise WireError(
                f"meta[{key!r}] may hold at most {limits.max_meta_items} items, got {len(items)}",
                code="too_large",
            )
        for item in items:
            if type(item) is str and len(item) > limits.max_str_len:
                raise WireError(
                    f"meta[{key!r}] strings may be at most {limits.max_str_len} characters, got {len(item)}",
                    code="too_large",
                )


# ----------------------------------------------------------------------------- array specs


def _check_specs(specs: Sequence[tuple[str, tuple[int, ...]]], limits: Limits) -> list[int]:
    """Validate (dtype, shape) pairs with Python ints (no overflow); return each array's byte size."""
    if len(specs) > limits.max_arrays:
        raise WireError(
            f"at most {limits.max_arrays} arrays per message, got {len(specs)}", code="too_large"
        )
    sizes, total = [], 0
    for i, (dtype, shape) in enumerate(specs):
        if dtype not in DTYPES:
            raise WireError(f"arrays[{i}] dtype must be one of {DTYPES}, got {dtype!r}")
        if len(shape) > limits.max_dims:
            raise WireError(
                f"arrays[{i}] may have at most {limits.max_dims} dims, got {len(shape)}",
                code="too_large",
            )
        for d, n in enumerate(shape):
            _check_int(n, f"arrays[{i}].shape[{d}]", 0, MAX_INT)
        elements = math.prod(shape)
        if elements > limits.max_array_elements:
            raise WireError(
                f"arrays[{i}] may have at most {limits.max_array_elements} elements, got {elements}",
                code="too_large",
            )
        nbytes = elements * np.dtype(dtype).itemsize
        total += nbytes
        if total > limits.max_message_bytes:
            raise WireError(
                f"arrays need more than the {limits.max_message_bytes}-byte message limit (at least {total})",
                code="too_large",
            )
        sizes.append(nbytes)
    return sizes


def _check_op_arrays(h: Header, specs: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Each op carries a fixed set of arrays; see the op table in docs/PROTOCOL.md."""
    kind = h.kind
    if kind in ROW_OPS:
        if kind == "backward" and h.is_reply and len(specs) == 2:
            _check_sq_norms(h, specs[1])  # optional per-expert squared gradient norms
            specs = specs[:1]
        _expect_count(h, specs, 1)
        dtype, shape = specs[0]
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            raise WireError(
                f"{kind!r} carries one 2-D float array {FLOAT_DTYPES}, got {dtype!r} shape {list(shape)}"
            )
        if shape[0] != h.offsets[-1]:
            raise WireError(
                f"{kind!r} array has {shape[0]} rows but offsets[-1] is {h.offsets[-1]}"
            )
    elif kind == "ping":
        return  # any arrays: a ping may carry a payload, and its pong echoes it (bandwidth probes)
    elif kind == "stats" and h.is_reply:
        _expect_count(h, specs, 2)
        for i, (want, (dtype, shape)) in enumerate(zip(("<i4", "<i8"), specs, strict=True)):
            if dtype != want or len(shape) != 1:
                raise WireError(
                    f"stats reply arrays[{i}] must be 1-D {want!r}, got {dtype!r} shape {list(shape)}"
                )
        if specs[0][1] != specs[1][1]:
            raise WireError(
                f"stats reply arrays must have equal lengths, got {specs[0][1][0]} and {specs[1][1][0]}"
            )
    else:
        _expect_count(h, specs, 0)


def _check_sq_norms(h: Header, spec: tuple[str, tuple[int, ...]]) -> None:
    """A backward reply may add `sq` "<f8" [len(experts)]: each expert's squared grad norm."""
    dtype, shape = spec
    if dtype != "<f8" or list(shape) != [len(h.experts)]:
        raise WireError(
            f"a backward reply's second array must be '<f8' [{len(h.experts)}] (one squared "
            f"norm per expert), got {dtype!r} shape {list(shape)}"
        )


def _expect_count(h: Header, specs: Sequence[Any], n: int) -> None:
    if len(specs) != n:
        what = f"{h.op!r} reply to {h.reply_to!r}" if h.is_reply else f"{h.op!r} request"
        raise WireError(f"a {what} carries {n} arrays, got {len(specs)}")


def _parse_specs(raw: Any) -> list[tuple[str, tuple[int, ...]]]:
    if not isinstance(raw, list):
        raise WireError(f"arrays must be a list, got {type(raw).__name__}")
    specs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != _SPEC_KEYS:
            got = sorted(map(repr, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise WireError(f"arrays[{i}] must be a map with keys ['dtype', 'shape'], got {got}")
        dtype = _check_str(entry["dtype"], f"arrays[{i}].dtype", 8)
        if not isinstance(entry["shape"], list):
            raise WireError(
                f"arrays[{i}].shape must be a list of ints, got {type(entry['shape']).__name__}"
            )
        specs.append((dtype, tuple(entry["shape"])))  # ints checked by _check_specs
    return specs


# ----------------------------------------------------------------------------- encode


def encode(
    header: Header, arrays: Sequence[np.ndarray] = (), *, limits: Limits = DEFAULT_LIMITS
) -> list:
    """Frames for ``send_multipart(frames, copy=False)``: [header bytes, one memoryview per array].

    Arrays are made C-contiguous (no copy when they already are) and then shared, not copied:
    do not modify them until the send has completed (zmq's ``track=True`` tells when).
    """
    return _encode(header, arrays, limits, None)


def encode_pong(ping: Message, *, limits: Limits = DEFAULT_LIMITS) -> list:
    """The pong to a decoded ping: its arrays echoed and its meta echoed byte for byte (§5)."""
    return _encode(reply_header(ping.header), ping.arrays, limits, ping.raw_meta)


def _encode(header: Header, arrays: Sequence[np.ndarray], limits: Limits, raw_meta: bytes | None) -> list:
    if not isinstance(header, Header):
        raise TypeError(f"header must be a moe.sharding.wire.Header, got {type(header).__name__}")
    contiguous = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays[{i}] must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype.str not in DTYPES:
            raise WireError(f"arrays[{i}] dtype must be one of {DTYPES}, got {a.dtype.str!r}")
        contiguous.append(a if a.flags.c_contiguous else a.copy(order="C"))
    specs = [(a.dtype.str, tuple(int(n) for n in a.shape)) for a in contiguous]
    _check_limits(header, limits)
    _check_specs(specs, limits)
    _check_op_arrays(header, specs)
    head = _pack_header(_header_map(header, specs), raw_meta)
    if len(head) > limits.max_header_bytes:
        raise WireError(
            f"header is {len(head)} bytes, limit {limits.max_header_bytes}", code="too_large"
        )
    if len(head) + sum(a.nbytes for a in contiguous) > limits.max_message_bytes:
        raise WireError(
            f"message exceeds the {limits.max_message_bytes}-byte limit", code="too_large"
        )
    return [head, *(memoryview(a.reshape(-1).view(np.uint8)) for a in contiguous)]


def _header_map(h: Header, specs: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "op": h.op,
        "run": h.run,
        "gen": h.gen,
        "step": h.step,
        "layer": h.layer,
        "seq": h.seq,
    }
    if h.is_reply:
        out["re"] = h.reply_to
    out["experts"] = list(h.experts)
    out["offsets"] = list(h.offsets)
    out["arrays"] = [{"dtype": d, "shape": list(s)} for d, s in specs]
    out["meta"] = {k: list(v) if isinstance(v, tuple) else v for k, v in h.meta.items()}
    return out


def _pack_header(fields: dict[str, Any], raw_meta: bytes | None) -> bytes:
    """msgpack of the header map; with raw_meta, the 'meta' value (the last key) is those bytes."""
    if raw_meta is None:
        return msgpack.packb(fields, use_bin_type=True)
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields))]
    for key, value in fields.items():
        parts += [packer.pack(key), raw_meta if key == "meta" else packer.pack(value)]
    return b"".join(parts)


def _raw_meta(view: memoryview) -> bytes:
    """The bytes of the 'meta' value in a header frame that has already been decoded."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(view.nbytes, 1))
    unpacker.feed(view)
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        start = unpacker.tell()
        unpacker.skip()
        if key == "meta":
            return bytes(view[start : unpacker.tell()])
    raise WireError("header has no 'meta'")  # unreachable: decode checked the keys


def reply_header(request: Header, *, meta: Mapping[str, Any] | None = None) -> Header:
    """The success reply to ``request``: 'pong' for a ping (echoing its meta), else 'ok'."""
    if not isinstance(request, Header) or request.is_reply:
        raise WireError(
            f"can only reply to a request header, got {getattr(request, 'op', request)!r}"
        )
    if request.op == "ping":
        kind, meta = "pong", request.meta if meta is None else meta
    else:
        kind, meta = "ok", {} if meta is None else meta
    return Header(
        op=kind,
        run=request.run,
        gen=request.gen,
        step=request.step,
        layer=request.layer,
        seq=request.seq,
        experts=request.experts,
        offsets=request.offsets,
        meta=meta,
        reply_to=request.op,
    )


def encode_reply(
    request: Header,
    arrays: Sequence[np.ndarray] = (),
    *,
    meta: Mapping[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list:
    """Frames of the success reply to ``request`` (forward/backward: echoes experts and offsets)."""
    return encode(reply_header(request, meta=meta), arrays, limits=limits)


def encode_error(
    request: Header | None,
    message: str,
    *,
    code: str = "bad_request",
    limits: Limits = DEFAULT_LIMITS,
    extra: Mapping[str, Any] | None = None,
) -> list:
    """Frames of an error reply; ``request`` None when the request could not be decoded at all.
    ``extra``: further meta keys (§6 allows them), e.g. the reason of a refused join."""
    if code not in ERROR_CODES:
        raise ValueError(f"error code must be one of {ERROR_CODES}, got {code!r}")
    message = str(message)
    max_len = min(MAX_ERROR_MESSAGE_LEN, limits.max_str_len)
    if len(message) > max_len:
        message = message[: max_len - 3] + "..."
    meta = {**(extra or {}), "code": code, "message": message}
    if request is None:
        header = Header(op="error", run="", gen=0, meta=meta)
    elif isinstance(request, Header) and not request.is_reply:
        header = Header(
            op="error",
            run=request.run,
            gen=request.gen,
            step=request.step,
            layer=request.layer,
            seq=request.seq,
            meta=meta,
            reply_to=request.op,
        )
    else:
        raise WireError(
            f"can only reply to a request header, got {getattr(request, 'op', request)!r}"
        )
    return encode(header, (), limits=limits)


# ----------------------------------------------------------------------------- decode


def decode(frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode [header, array frames...] (a ROUTER strips the identity frame first).

    Frames may be bytes, bytearray, memoryview or zmq.Frame (its ``.buffer`` is used). Arrays are
    read-only ``np.frombuffer`` views on the frames, so they keep the frames alive. Any protocol
    violation raises WireError; nothing larger than ``limits`` is allocated.
    """
    if isinstance(frames, bytes | bytearray | memoryview | str) or not isinstance(frames, Sequence):
        raise WireError(
            f"frames must be a sequence of frames (header first), got {type(frames).__name__}"
        )
    if not frames:
        raise WireError("a message needs a header frame, got 0 frames")
    if len(frames) > 1 + limits.max_arrays:
        raise WireError(
            f"at most {1 + limits.max_arrays} frames per message, got {len(frames)}",
            code="too_large",
        )
    views = [_frame_view(f, i) for i, f in enumerate(frames)]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise WireError(
            f"message is {total} bytes, limit {limits.max_message_bytes}", code="too_large"
        )
    header, raw_specs = _parse_header(_unpack_header(views[0], limits))
    try:  # from here on the header is valid, so the error can name the request it refuses
        _check_limits(header, limits)
        specs = _parse_specs(raw_specs)
        sizes = _check_specs(specs, limits)
        _check_op_arrays(header, specs)
        arrays = _arrays_from_frames(specs, sizes, views[1:])
    except WireError as e:
        e.header = header
        raise
    raw_meta = _raw_meta(views[0]) if header.op == "ping" else None
    return Message(header=header, arrays=arrays, raw_meta=raw_meta)


def _frame_view(frame: Any, i: int) -> memoryview:
    obj = frame.buffer if hasattr(frame, "buffer") else frame  # zmq.Frame exposes its bytes here
    try:
        view = memoryview(obj)
    except TypeError:
        raise WireError(
            f"frame {i} must be bytes-like or a zmq.Frame, got {type(frame).__name__}"
        ) from None
    if not view.c_contiguous:
        raise WireError(f"frame {i} must be a contiguous buffer")
    return view if (view.ndim == 1 and view.format == "B") else view.cast("B")


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Build a plain dict, refusing duplicate keys (msgpack would silently keep the last one)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("a header map has a duplicate key")
    return out


def _unpack_header(view: memoryview, limits: Limits) -> Any:
    if view.nbytes > limits.max_header_bytes:
        raise WireError(
            f"header frame is {view.nbytes} bytes, limit {limits.max_header_bytes}",
            code="too_large",
        )
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        object_pairs_hook=_pairs_to_dict,
        max_buffer_size=limits.max_header_bytes,
        max_str_len=limits.max_str_len,
        max_bin_len=0,
        max_ext_len=0,
        max_array_len=max(
            limits.max_experts + 1, limits.max_meta_items, limits.max_arrays, limits.max_dims
        ),
        max_map_len=max(len(REPLY_KEYS), limits.max_meta_items),
    )
    try:
        unpacker.feed(view)
        obj = unpacker.unpack()
    except WireError:
        raise
    except msgpack.OutOfData:
        raise WireError(f"header frame is truncated ({view.nbytes} bytes)") from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as e:
        code = "too_large" if "exceeds max_" in str(e) else "bad_request"  # a bounded length, crossed
        raise WireError(
            f"header frame is not valid msgpack within limits: {type(e).__name__}: {e}", code=code
        ) from None
    if unpacker.tell() != view.nbytes:
        raise WireError(
            f"header frame has {view.nbytes - unpacker.tell()} trailing bytes after the header map"
        )
    return obj


def _parse_header(raw: Any) -> tuple[Header, Any]:
    """The validated Header and the still-raw 'arrays' entry."""
    if not isinstance(raw, dict):
        raise WireError(f"header must be a msgpack map, got {type(raw).__name__}")
    if "v" not in raw:
        raise WireError("header has no protocol version 'v'", code="version")
    if type(raw["v"]) is not int or raw["v"] != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version must be {PROTOCOL_VERSION}, got {raw['v']!r}", code="version"
        )
    op = raw.get("op")
    if type(op) is not str or op not in OPS + REPLY_KINDS:
        raise WireError(f"op must be one of {OPS + REPLY_KINDS}, got {op!r}")
    try:
        expected = REPLY_KEYS if op in REPLY_KINDS else REQUEST_KEYS
        if set(raw) != expected:
            missing, unknown = sorted(expected - set(raw)), sorted(map(str, set(raw) - expected))
            raise WireError(f"{op!r} header keys: missing {missing}, unknown {unknown}")
        header = Header(
            op=op,
            run=raw["run"],
            gen=raw["gen"],
            step=raw["step"],
            layer=raw["layer"],
            seq=raw["seq"],
            experts=raw["experts"],
            offsets=raw["offsets"],
            meta=raw["meta"],
            reply_to=raw.get("re"),
        )
    except WireError as e:
        e.header = _address(raw, op)  # a request with readable addressing gets a correlated error
        raise
    return header, raw["arrays"]


def _address(raw: dict, op: str) -> Header | None:
    if op not in OPS:
        return None
    try:
        return Header.address(op, *(raw.get(k) for k in ("run", "gen", "step", "layer", "seq")))
    except WireError:
        return None


def _arrays_from_frames(
    specs: Sequence[tuple[str, tuple[int, ...]]], sizes: Sequence[int], views: Sequence[memoryview]
) -> tuple[np.ndarray, ...]:
    if len(views) != len(specs):
        raise WireError(f"header lists {len(specs)} arrays, got {len(views)} array frames")
    arrays = []
    for i, ((dtype, shape), nbytes, view) in enumerate(zip(specs, sizes, views, strict=True)):
        if view.nbytes != nbytes:
            raise WireError(
                f"arrays[{i}] {dtype} {list(shape)} needs {nbytes} bytes, frame has {view.nbytes}"
            )
        dt = np.dtype(dtype)
        a = np.frombuffer(view, dtype=dt, count=nbytes // dt.itemsize).reshape(shape)  # zero copy
        a.flags.writeable = False
        arrays.append(a)
    return tuple(arrays)


# ----------------------------------------------------------------------------- session, sockets


def check_session(header: Header, *, run: str, gen: int) -> None:
    """Refuse a message from another run or another generation (only 'load' may move gen forward)."""
    if header.run != run:
        raise WireError(
            f"message is for run {header.run!r}, this is run {run!r}",
            code="wrong_run",
            header=header,
        )
    if header.gen < gen:
        raise WireError(
            f"message is from generation {header.gen}, current generation is {gen}",
            code="stale_generation",
            header=header,
        )
    if header.gen > gen and header.op != "load":
        raise WireError(
            f"message is from generation {header.gen}, ahead of current generation {gen}; "
            f"only 'load' may move to a newer generation",
            code="future_generation",
            header=header,
        )


def configure_socket(sock: Any, limits: Limits = DEFAULT_LIMITS) -> None:
    """Bound inbound frame size (ZMQ_MAXMSGSIZE applies per frame) and never block on close."""
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
