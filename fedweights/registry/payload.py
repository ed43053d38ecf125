"""Hash a safetensors payload as it streams: whole-file sha256 plus one sha256 per tensor.

A safetensors file is ``u64 little-endian header length | JSON header | data``; the header maps
each tensor to ``{"dtype", "shape", "data_offsets": [begin, end]}`` within the data section.
``PayloadHasher`` consumes the bytes in chunks of any size (as they arrive over the network or
from disk), checks that the layout is a complete, well-formed safetensors file, and hashes each
tensor's raw bytes, so memory stays bounded by the chunk size whatever the model size.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

CHUNK_SIZE = 1 << 20  # 1 MiB: well under gRPC's 4 MiB message limit
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


# The whole-file hash of a chunk runs here while the caller hashes its tensors (hashlib releases
# the GIL), which nearly halves the time on two or more cores.
_FILE_HASH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")


class PayloadError(UserError):
    """The bytes are not a complete, well-formed safetensors file."""


@dataclass(frozen=True)
class TensorDigest:
    """One tensor: where it lies in the data section and the sha256 of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class PayloadDigest:
    """What a payload hashes to: the whole file and each tensor (in payload order)."""

    sha256: str
    size_bytes: int
    tensors: tuple[TensorDigest, ...]


@dataclass
class _Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    hasher: object = None


class PayloadHasher:
    """Feed chunks with ``update``; ``finish`` validates the layout and returns the digests."""

    def __init__(self) -> None:
        self._file = hashlib.sha256()
        self._pending: Future | None = None  # the whole-file hash of the previous chunk
        self._size = 0
        self._prefix = bytearray()  # length field + header, until the header is parsed
        self._header_end: int | None = None  # absolute offset where the data section starts
        self._slots: list[_Slot] = []
        self._slot = 0  # index of the tensor the next data byte belongs to

    def update(self, chunk: bytes) -> None:
        """Consume the next bytes of the payload."""
        self._wait()
        self._pending = _FILE_HASH_POOL.submit(self._file.update, chunk)
        start = self._size
        self._size += len(chunk)
        view = memoryview(chunk)
        if self._header_end is None:
            view = self._take_header(view)
            start = self._size - len(view)
            if self._header_end is None:
                return
        self._hash_data(view, start - self._header_end)

    def finish(self) -> PayloadDigest:
        """The digests; raises PayloadError if the payload was truncated or malformed."""
        self._wait()
        if self._header_end is None:
            raise PayloadError(f"not a safetensors file: only {self._size} bytes, the header is incomplete")
        data_len = self._slots[-1].end if self._slots else 0
        if self._size - self._header_end != data_len:
            raise PayloadError(
                f"not a complete safetensors file: the header describes {data_len} data bytes, "
                f"the payload has {self._size - self._header_end}"
            )
        tensors = tuple(
            TensorDigest(s.name, s.dtype, s.shape, (s.hasher or hashlib.sha256()).hexdigest(), s.end - s.begin)
            for s in self._slots
        )
        return PayloadDigest(self._file.hexdigest(), self._size, tensors)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _take_header(self, view: memoryview) -> memoryview:
        """Collect the length field and the header; return the bytes that follow them."""
        while self._header_end is None and view:
            need = 8 if len(self._prefix) < 8 else 8 + _header_len(self._prefix)
            take = min(len(view), need - len(self._prefix))
            self._prefix += view[:take]
            view = view[take:]
            if need > 8 and len(self._prefix) == need:
                self._slots = _parse_header(bytes(self._prefix[8:]))
                self._header_end = need
                self._prefix = bytearray()
        return view

    def _hash_data(self, view: memoryview, offset: int) -> None:
        while view:
            while self._slot < len(self._slots) and self._slots[self._slot].end <= offset:
                self._slot += 1
            if self._slot == len(self._slots):
                return  # bytes past the last tensor: reported by finish()
            slot = self._slots[self._slot]
            take = min(len(view), slot.end - offset)
            if slot.hasher is None:
                slot.hasher = hashlib.sha256()
            slot.hasher.update(view[:take])
            view, offset = view[take:], offset + take


def _header_len(prefix: bytearray) -> int:
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length == 0 or length > MAX_HEADER_BYTES:
        raise PayloadError(f"not a safetensors file: header length {length} is out of range")
    return length


def _parse_header(raw: bytes) -> list[_Slot]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PayloadError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise PayloadError("not a safetensors file: the header is not a JSON object")
    slots = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            slot = _Slot(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise PayloadError(f"not a safetensors file: bad header entry for tensor {name!r}") from None
        width = DTYPE_BYTES.get(slot.dtype)
        if width is not None and end - begin != width * math.prod(slot.shape):
            raise PayloadError(f"not a safetensors file: tensor {name!r} has {end - begin} bytes for its shape")
        slots.append(slot)
    slots.sort(key=lambda s: (s.begin, s.end))
    position = 0
    for slot in slots:
        if slot.begin != position or slot.end < slot.begin:
            raise PayloadError(f"not a safetensors file: tensor {slot.name!r} overlaps or leaves a gap")
        position = slot.end
    return slots


def iter_file(path: str | Path, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The file's bytes in chunks (memory bounded by ``chunk_size``)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def digest_file(path: str | Path) -> PayloadDigest:
    """Hash a safetensors file on disk (whole file and per tensor), streaming."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    hasher = PayloadHasher()
    try:
        for chunk in iter_file(path):
            hasher.update(chunk)
        return hasher.finish()
    except PayloadError as exc:
        raise PayloadError(f"{path}: {exc}") from None
