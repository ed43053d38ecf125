"""The encrypted envelope (protos/fedweights/v1/update.proto) inside a Flower ArrayRecord.

An envelope is an ``ArrayRecord`` of raw-bytes Arrays: ``fedweights.he/header`` (an
``EncryptedHeader``) and ``fedweights.he/chunk/000000``… (``CiphertextChunk``s). Reading one
checks its structure and every chunk's SHA-256 before anything is deserialised; every problem
raises ``EnvelopeError`` with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord
from google.protobuf.message import DecodeError

from ..fileio import atomic_write_bytes
from ..proto import update_pb2 as pb

HEADER_KEY = "fedweights.he/header"
CHUNK_PREFIX = "fedweights.he/chunk/"
FORMAT_VERSION = 1
CIPHERTEXTS_PER_CHUNK = 64  # ≈3 MB per chunk for seeded ciphertexts at N=8192
MAX_HEADER_BYTES = 16 * 2**20
_FILE_MAGIC = b"FWHE1\n"

Header = pb.EncryptedHeader


class EnvelopeError(ValueError):
    """An encrypted payload is malformed, corrupt, foreign or does not fit what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one model tensor, in the order tensors are packed."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of values."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def is_encrypted(arrays: ArrayRecord | None) -> bool:
    """True when ``arrays`` is an encrypted envelope rather than plaintext tensors."""
    return arrays is not None and HEADER_KEY in arrays


def layout_to_proto(layout: Sequence[TensorInfo]) -> list[pb.TensorSpec]:
    """TensorInfo → protobuf TensorSpec."""
    return [pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in layout]


def layout_from_proto(specs: Sequence[pb.TensorSpec]) -> tuple[TensorInfo, ...]:
    """Protobuf TensorSpec → TensorInfo."""
    return tuple(TensorInfo(s.name, tuple(int(d) for d in s.shape), s.dtype) for s in specs)


def layout_difference(got: Sequence[TensorInfo], expected: Sequence[TensorInfo]) -> str | None:
    """None when the layouts match, else the first difference in words."""
    if len(got) != len(expected):
        return f"{len(got)} tensors where {len(expected)} were expected"
    for a, b in zip(got, expected):
        if a != b:
            return f"tensor {a.name!r} {list(a.shape)} {a.dtype} where {b.name!r} {list(b.shape)} {b.dtype} belongs"
    return None


def pack(header: Header, ciphertexts: Sequence[bytes]) -> ArrayRecord:
    """Group ciphertexts into chunks, record their digests in ``header``, and build the record."""
    per_chunk = CIPHERTEXTS_PER_CHUNK
    chunks = [
        pb.CiphertextChunk(index=i, ciphertexts=ciphertexts[start : start + per_chunk]).SerializeToString()
        for i, start in enumerate(range(0, len(ciphertexts), per_chunk))
    ]
    header.version = FORMAT_VERSION
    header.ciphertexts_per_chunk = per_chunk
    del header.chunk_sha256[:]
    header.chunk_sha256.extend(hashlib.sha256(c).digest() for c in chunks)
    entries = {HEADER_KEY: _entry(HEADER_KEY, header.SerializeToString())}
    for i, chunk in enumerate(chunks):
        entries[chunk_key(i)] = _entry(chunk_key(i), chunk)
    return ArrayRecord(entries)


def chunk_key(index: int) -> str:
    """Record key of chunk ``index``."""
    return f"{CHUNK_PREFIX}{index:06d}"


def read_header(arrays: ArrayRecord) -> Header:
    """Parse and sanity-check the header of an envelope (no deserialisation of ciphertexts)."""
    if HEADER_KEY not in arrays:
        raise EnvelopeError("not an encrypted update (no fedweights.he/header): was the client run without --he?")
    data = arrays[HEADER_KEY].data
    if len(data) > MAX_HEADER_BYTES:
        raise EnvelopeError(f"oversize header: {len(data)} bytes > {MAX_HEADER_BYTES}")
    header = Header()
    try:
        header.ParseFromString(data)
    except DecodeError as exc:
        raise EnvelopeError(f"corrupt header: {exc}") from None
    if header.version != FORMAT_VERSION:
        raise EnvelopeError(f"unsupported envelope version {header.version} (this fedweights reads {FORMAT_VERSION})")
    if header.scheme != pb.SCHEME_BFV:
        raise EnvelopeError(f"unsupported scheme {enum_name(pb.Scheme, header.scheme)} (expected SCHEME_BFV)")
    if not header.slots_per_ciphertext or not header.ciphertexts_per_chunk:
        raise EnvelopeError("corrupt header: zero slots per ciphertext or ciphertexts per chunk")
    layout = layout_from_proto(header.layout)
    if sum(t.size for t in layout) != header.num_values or header.num_values == 0:
        held = sum(t.size for t in layout)
        raise EnvelopeError(f"corrupt header: layout holds {held} values, header says {header.num_values}")
    expected_keys = {HEADER_KEY, *(chunk_key(i) for i in range(len(header.chunk_sha256)))}
    if len(header.chunk_sha256) != num_chunks(header) or set(arrays.keys()) != expected_keys:
        raise EnvelopeError(
            f"truncated or padded payload: {len(arrays) - 1} chunk entries and {len(header.chunk_sha256)} digests "
            f"for {num_ciphertexts(header)} ciphertexts ({num_chunks(header)} chunks expected)"
        )
    return header


def enum_name(enum, value: int) -> str:
    """The name of ``value`` in a protobuf enum, or the number when this version does not know it
    (proto3 keeps unknown values; ``Name`` would raise a plain ValueError)."""
    try:
        return enum.Name(value)
    except ValueError:
        return f"unknown ({value})"


def num_ciphertexts(header: Header) -> int:
    """Ciphertexts an envelope with this header must hold."""
    return -(-header.num_values // header.slots_per_ciphertext)


def num_chunks(header: Header) -> int:
    """Chunks an envelope with this header must hold."""
    return -(-num_ciphertexts(header) // header.ciphertexts_per_chunk)


def iter_chunks(arrays: ArrayRecord, header: Header, max_ciphertext_bytes: int) -> Iterator[list[bytes]]:
    """Yield each chunk's ciphertext bytes after checking its digest, index, count and sizes."""
    total = num_ciphertexts(header)
    for i, digest in enumerate(header.chunk_sha256):
        data = arrays[chunk_key(i)].data
        want = min(header.ciphertexts_per_chunk, total - i * header.ciphertexts_per_chunk)
        if len(data) > want * (max_ciphertext_bytes + 16):
            raise EnvelopeError(f"oversize chunk {i}: {len(data)} bytes for {want} ciphertexts")
        if hashlib.sha256(data).digest() != digest:
            raise EnvelopeError(f"corrupt chunk {i}: SHA-256 does not match the header (truncated or altered in transit)")
        chunk = pb.CiphertextChunk()
        try:
            chunk.ParseFromString(data)
        except DecodeError as exc:
            raise EnvelopeError(f"corrupt chunk {i}: {exc}") from None
        if chunk.index != i or len(chunk.ciphertexts) != want:
            raise EnvelopeError(
                f"chunk {i} holds index {chunk.index} with {len(chunk.ciphertexts)} ciphertexts; expected {want}"
            )
        for j, ct in enumerate(chunk.ciphertexts):
            if len(ct) > max_ciphertext_bytes:
                raise EnvelopeError(f"oversize ciphertext {i}/{j}: {len(ct)} bytes > {max_ciphertext_bytes}")
        yield list(chunk.ciphertexts)


def save_envelope(path: str | Path, arrays: ArrayRecord) -> Path:
    """Write an envelope to one file (length-prefixed entries); read it back with ``load_envelope``."""
    parts = [_FILE_MAGIC]
    for key, array in arrays.items():
        name = key.encode()
        parts += [struct.pack(">HQ", len(name), len(array.data)), name, array.data]
    return atomic_write_bytes(path, b"".join(parts))


def load_envelope(path: str | Path) -> ArrayRecord:
    """Read a file written by ``save_envelope``."""
    data = Path(path).read_bytes()
    if not data.startswith(_FILE_MAGIC):
        raise EnvelopeError(f"{path} is not an encrypted fedweights model (bad magic)")
    entries, pos = {}, len(_FILE_MAGIC)
    while pos < len(data):
        if pos + 10 > len(data):
            raise EnvelopeError(f"{path} is truncated")
        name_len, data_len = struct.unpack_from(">HQ", data, pos)
        pos += 10
        end = pos + name_len + data_len
        if end > len(data):
            raise EnvelopeError(f"{path} is truncated")
        try:
            name = data[pos : pos + name_len].decode()
        except UnicodeDecodeError:
            raise EnvelopeError(f"{path} is corrupt (an entry name is not text)") from None
        entries[name] = _entry(name, data[pos + name_len : end])
        pos = end
    return ArrayRecord(entries)


def _entry(key: str, data: bytes) -> Array:
    """A raw-bytes Array whose ``stype`` names the protobuf message it holds."""
    stype = "fedweights.v1.EncryptedHeader" if key == HEADER_KEY else "fedweights.v1.CiphertextChunk"
    return Array(dtype="bytes", shape=(len(data),), stype=stype, data=data)
