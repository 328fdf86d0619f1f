"""Expert part files: safetensors written and read in place, with their sha256.

The safetensors library serialises a whole file in memory before writing it and its
reader memory-maps the file (mapped pages count as resident while open), so a part file of
a few GB would cost its size again in RSS on save and on load. This module streams the same
format instead: `write` sends each array's own buffer to the file while hashing it, and
`PartReader` first hashes the whole file in chunks (the sha256 in the manifest protects
every byte that is then read), then copies just the wanted rows of each tensor into the
caller's arrays, a bounded chunk at a time.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back, little-endian, C order.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moe.checkpoint import CheckpointError

DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
_CODES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 32 << 20  # rows are read (and hashed) in chunks of about this size
MAX_HEADER = 100 << 20  # safetensors' own limit


def write(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write `tensors` (in this order) to path and fsync; return {"sha256", "bytes"}.

    No copy of a C-contiguous little-endian array is made: its buffer goes to the file."""
    header, offset = {}, 0
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        dt = a.dtype.newbyteorder("<")
        if dt not in _CODES:
            raise ValueError(f"part tensor {name!r}: dtype {a.dtype} is not one of {sorted(_CODES)}")
        a = np.ascontiguousarray(a, dtype=dt)
        header[name] = {"dtype": _CODES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[name] = a
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for block in (struct.pack("<Q", len(text)), text):
            f.write(block)
            digest.update(block)
        for a in arrays.values():
            view = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
            for s in range(0, len(view), CHUNK_BYTES):
                f.write(view[s : s + CHUNK_BYTES])
                digest.update(view[s : s + CHUNK_BYTES])
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": 8 + len(text) + offset}


class PartReader:
    """A part file checked against its manifest entry (size, then sha256 of every byte) on open.

    `read(name)` returns a whole (small) tensor; `read_rows_into(name, src, dst, dst_rows)`
    copies rows src[i] of a tensor into dst[dst_rows[i]] without holding the tensor. The file's
    identity (inode, size, mtime) is checked again on close, so a file rewritten while it was
    being read is refused rather than half-trusted.
    """

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        self.path, self.name = Path(path), Path(path).name
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {str(self.path.parent)!r}: file {self.name!r} is missing") from None
        try:
            self._stat = os.fstat(self._f.fileno())
            if self._stat.st_size != entry.get("bytes"):
                raise CheckpointError(f"{self.name} has {self._stat.st_size} bytes, manifest says "
                                      f"{entry.get('bytes')} (truncated?)")
            if hashlib.file_digest(self._f, "sha256").hexdigest() != entry.get("sha256"):
                raise CheckpointError(f"{self.name} does not match its sha256 (tampered or corrupt)")
            self.tensors = self._header()
        except BaseException:
            self._f.close()
            raise

    def _header(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
        """name -> (dtype, shape, absolute byte offset), every field checked."""
        size = self._stat.st_size
        raw = os.pread(self._f.fileno(), 8, 0)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.name} is not a valid safetensors file (header length {n})")
        try:
            header = json.loads(os.pread(self._f.fileno(), n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.name} is not a valid safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.name} is not a valid safetensors file (header is not a map)")
        header.pop("__metadata__", None)
        out, spans = {}, []
        for name, info in header.items():
            try:
                dt, shape, (b, e) = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]), info["data_offsets"]
                ok = all(s >= 0 for s in shape) and 0 <= b <= e and e - b == dt.itemsize * int(np.prod(shape, dtype=np.int64))
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise CheckpointError(f"{self.name}: tensor {name!r} has a malformed header entry {info!r}")
            out[name] = (dt, shape, 8 + n + int(b))
            spans.append((int(b), int(e)))
        spans.sort()
        end = 0
        for b, e in spans:
            if b != end:
                raise CheckpointError(f"{self.name}: tensor data overlaps or has holes")
            end = e
        if 8 + n + end != size:
            raise CheckpointError(f"{self.name}: tensors cover {end} bytes, the file holds {size - 8 - n}")
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._info(name)[0]

    def _info(self, name: str):
        if name not in self.tensors:
            raise CheckpointError(f"{self.name} holds no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        dt, shape, _ = self._info(name)
        out = np.empty(shape, dtype=dt.newbyteorder("="))
        self._read_span(name, 0, shape[0] if shape else 1, out.reshape(-1).view(np.uint8) if out.size else None)
        return out

    def read_rows_into(self, name: str, src: np.ndarray, dst: np.ndarray, dst_rows: np.ndarray) -> None:
        """dst[dst_rows[i]] = tensor[src[i]] for ascending src; dtype and row shape must match."""
        dt, shape, _ = self._info(name)
        if shape[1:] != dst.shape[1:] or dt != dst.dtype:
            raise CheckpointError(f"{self.name} tensor {name!r}: expected {dst.dtype}{list(dst.shape[1:])} rows, "
                                  f"got {dt}{list(shape[1:])}")
        src = np.asarray(src, dtype=np.int64)
        if src.size == 0:
            return
        row_bytes = dt.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        per = max(1, CHUNK_BYTES // max(row_bytes, 1))  # rows per chunk
        buf = np.empty((min(per, src.size),) + shape[1:], dtype=dst.dtype)  # [chunk, ...]
        i = 0
        while i < src.size:  # a run of rows that fits one chunk: one read
            r0 = src[i]
            j = int(np.searchsorted(src, r0 + per, side="left"))
            n = int(src[j - 1] - r0 + 1)
            if n > buf.shape[0]:
                buf = np.empty((n,) + shape[1:], dtype=dst.dtype)
            self._read_span(name, int(r0), n, buf[:n].reshape(-1).view(np.uint8) if row_bytes else None)
            dst[dst_rows[i:j]] = buf[src[i:j] - r0]
            i = j

    def _read_span(self, name: str, row0: int, n_rows: int, out: np.ndarray | None) -> None:
        if out is None:
            return
        dt, shape, offset = self.tensors[name]
        row_bytes = dt.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        got = os.preadv(self._f.fileno(), [memoryview(out)], offset + row0 * row_bytes)
        if got != out.nbytes:
            raise CheckpointError(f"{self.name}: short read of {name!r} (file changed while reading?)")

    def close(self) -> None:
        try:
            now = os.stat(self.path)
            same = (now.st_ino, now.st_size, now.st_mtime_ns) == (self._stat.st_ino, self._stat.st_size, self._stat.st_mtime_ns)
        except FileNotFoundError:
            same = False
        self._f.close()
        if not same:
            raise CheckpointError(f"{self.name} changed while it was being read")

    def abort(self) -> None:
        """Close after a failure elsewhere (no identity check: the read is being given up)."""
        self._f.close()

    def __enter__(self) -> PartReader:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
