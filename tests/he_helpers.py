"""Helpers shared by the encrypted-aggregation tests."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord


def model_states(count: int, seed: int, scale: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """``count`` state_dicts of a small two-tensor model (≈20k values: three ciphertexts)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"fc.weight": torch.randn(200, 100, generator=g) * scale, "fc.bias": torch.randn(200, generator=g) * scale}
        for _ in range(count)
    ]


def replace_entry(record: ArrayRecord, key: str, data: bytes) -> ArrayRecord:
    """A copy of ``record`` with entry ``key`` holding ``data``."""
    entries = {k: Array(dtype="bytes", shape=(len(v.data),), stype=v.stype, data=v.data) for k, v in record.items()}
    entries[key] = Array(dtype="bytes", shape=(len(data),), stype="raw", data=data)
    return ArrayRecord(entries)


def copy_record(record: ArrayRecord, drop: str) -> ArrayRecord:
    """A copy of ``record`` without entry ``drop``."""
    return ArrayRecord({k: v for k, v in record.items() if k != drop})


def rebuild(envelope: ArrayRecord, edit_ciphertexts=None, edit_header=None) -> ArrayRecord:
    """A copy of a one-chunk ``envelope`` with its ciphertext list and/or header edited in place by
    the given functions; the chunk digest is recomputed, so only the edit itself is wrong."""
    import hashlib

    from fedweights.crypto.envelope import HEADER_KEY, chunk_key
    from fedweights.proto import update_pb2 as pb

    header = pb.EncryptedHeader.FromString(envelope[HEADER_KEY].data)
    chunk = pb.CiphertextChunk.FromString(envelope[chunk_key(0)].data)
    if edit_ciphertexts:
        edited = edit_ciphertexts(list(chunk.ciphertexts))
        del chunk.ciphertexts[:]
        chunk.ciphertexts.extend(edited)
    data = chunk.SerializeToString()
    header.chunk_sha256[0] = hashlib.sha256(data).digest()
    if edit_header:
        edit_header(header)
    return replace_entry(replace_entry(envelope, chunk_key(0), data), HEADER_KEY, header.SerializeToString())


def uncompressed(key, data: bytes, zero_second_polynomial: bool = False) -> bytes:
    """SEAL's uncompressed (compr_mode none) serialisation of a serialised ciphertext, which SEAL
    loads like any other (TenSEAL's ``save`` only writes compressed ones, so it is built here
    from SEAL 4's layout: header, parms_id, NTT flag, sizes, scale, correction factor, data).

    ``zero_second_polynomial``: make it transparent (the values stand unencrypted)."""
    import struct

    from fedweights.crypto import seal_io
    from fedweights.crypto.codec import tools

    ct = seal_io.load_ciphertext(tools(key).seal_context, data)
    magic, _, major, minor, _, _, _ = struct.unpack("<HBBBBHQ", data[:16])
    array = ct.dyn_array()
    coeffs = [array.at(i) for i in range(array.size())]
    if zero_second_polynomial:
        half = len(coeffs) // 2
        coeffs[half:] = [0] * (len(coeffs) - half)

    def sealed(body: bytes) -> bytes:
        return struct.pack("<HBBBBHQ", magic, 16, major, minor, 0, 0, 16 + len(body)) + body

    values = sealed(struct.pack(f"<Q{len(coeffs)}Q", len(coeffs), *coeffs))
    meta = struct.pack("<4Q", *ct.parms_id()) + bytes([int(ct.is_ntt_form())])
    meta += struct.pack("<QQQdQ", ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size(), ct.scale, 1)
    return sealed(meta + values)
