"""Model tensors ⇄ fixed-point integers ⇄ BFV ciphertexts ⇄ envelopes.

A client with ``n_k`` examples encodes every weight ``w`` of its model as the integer
``round(2^F · n_k/N · w)`` (F: the key's scale bits, N: the round's public weight normaliser),
packs N_slots integers per ciphertext and encrypts each with the shared secret key (symmetric
BFV; seeded, i.e. half the bytes, with ``compact``). Summing the updates of clients whose counts add up to ``S <= N`` gives
``Σ round(2^F n_k/N w_k)``; dividing by ``2^F · S/N`` yields the example-weighted average with an
absolute error of at most ``K / (2^(F+1) · S/N)`` for K summands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from tenseal import sealapi

from ..errors import UserError
from ..proto import update_pb2 as pb
from . import seal_io
from .envelope import (
    EnvelopeError,
    Header,
    TensorInfo,
    iter_chunks,
    layout_difference,
    layout_from_proto,
    layout_to_proto,
    pack,
    read_header,
)
from .keys import HEKey


@dataclass(frozen=True)
class _Tools:
    """SEAL objects reused for every ciphertext of one key."""

    seal_context: Any
    data_level: Any  # parms_id of the level fresh ciphertexts live at
    encoder: Any
    encryptor: Any | None
    decryptor: Any | None
    evaluator: Any


@lru_cache(maxsize=8)
def tools(key: HEKey) -> _Tools:
    """Encoder, encryptor/decryptor (secret keys only) and evaluator for ``key``."""
    sc = key.seal_context
    secret = key.context.secret_key().data if key.is_secret else None
    return _Tools(
        seal_context=sc,
        data_level=sc.first_parms_id(),
        encoder=sealapi.BatchEncoder(sc),
        encryptor=sealapi.Encryptor(sc, secret) if secret is not None else None,
        decryptor=sealapi.Decryptor(sc, secret) if secret is not None else None,
        evaluator=sealapi.Evaluator(sc),
    )


def layout_of(state: Mapping[str, torch.Tensor]) -> tuple[TensorInfo, ...]:
    """The packing order of a state_dict; only floating-point tensors can be averaged."""
    layout = []
    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise UserError(
                f"tensor {name!r} has dtype {tensor.dtype}: encrypted aggregation (--he) averages floating-point "
                "tensors only. BatchNorm keeps an integer step counter (num_batches_tracked): replace it by "
                "GroupNorm or LayerNorm (as --dp does), or give it track_running_stats=False"
            )
        layout.append(TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    if not layout:
        raise UserError("the model has no tensors to aggregate")
    return tuple(layout)


def flatten(state: Mapping[str, torch.Tensor], layout: Sequence[TensorInfo]) -> np.ndarray:
    """All tensors as one vector in layout order (float32 unless a tensor needs float64)."""
    tensors = [state[t.name].detach().reshape(-1) for t in layout]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.cat([t.to(dtype) for t in tensors]).cpu().numpy()


def unflatten(values: np.ndarray, layout: Sequence[TensorInfo]) -> dict[str, torch.Tensor]:
    """The inverse of ``flatten``: a state_dict with each tensor's shape and dtype."""
    state, pos = {}, 0
    for t in layout:
        piece = values[pos : pos + t.size].reshape(t.shape)
        state[t.name] = torch.from_numpy(np.ascontiguousarray(piece)).to(getattr(torch, t.dtype))
        pos += t.size
    return state


def encode_fixed_point(values: np.ndarray, weight: float, key: HEKey, layout: Sequence[TensorInfo]) -> np.ndarray:
    """``round(2^F · weight · values)`` as int64, refusing values outside the encodable range."""
    limit = key.params.max_abs_value
    if not np.max(np.abs(values)) <= limit:  # also catches NaN
        index = int(np.argmax(~(np.abs(values) <= limit)))
        name, offset = _locate(index, layout)
        raise UserError(
            f"weight {name}[{offset}] = {float(values[index])!r} is outside the encrypted range ±{limit:.4f} "
            f"(fixed point 2^{key.params.scale_bits}); it would wrap around. Keep weights in range "
            f"(e.g. weight decay/clipping) or make keys with fewer scale bits (`fedweights keys he --scale-bits`)"
        )
    scaled = np.multiply(values, 2.0**key.params.scale_bits * weight, dtype=np.float64)
    return np.rint(scaled, out=scaled).astype(np.int64)


def encrypt_update(
    key: HEKey,
    state: Mapping[str, torch.Tensor],
    num_examples: int,
    normaliser: int,
    server_round: int,
    compact: bool = False,
) -> ArrayRecord:
    """A client's encrypted, example-weighted update as an envelope ready to send.

    ``compact``: seeded ciphertexts (half the bytes; the coordinator re-expands each seed).
    """
    if not 1 <= num_examples <= normaliser:
        raise UserError(
            f"this client has {num_examples} examples but the coordinator's weight normaliser is {normaliser}: "
            "its weight would not fit (it must be between 1 and the normaliser); restart the run so counts are re-queried"
        )
    layout = layout_of(state)
    ints = encode_fixed_point(flatten(state, layout), num_examples / normaliser, key, layout)
    header = make_header(key, pb.PAYLOAD_KIND_CLIENT_UPDATE, server_round, layout, normaliser, num_examples, 1)
    return pack(header, encrypt_ints(key, ints, compact))


def encrypt_ints(key: HEKey, ints: np.ndarray, compact: bool = False) -> list[bytes]:
    """Symmetric BFV ciphertexts (serialised), one per ``poly_modulus_degree`` values.

    SEAL stores a ``compact`` (seeded) ciphertext as its first polynomial plus the 64-byte seed of
    the second, uniformly random one, which the reader regenerates.
    """
    t = tools(key)
    if t.encryptor is None:
        raise UserError(f"{key.path} holds no secret key; only clients can encrypt updates")
    slots = key.params.poly_modulus_degree
    out = []
    for start in range(0, len(ints), slots):
        plain = sealapi.Plaintext()
        t.encoder.encode(ints[start : start + slots].tolist(), plain)
        if compact:
            out.append(seal_io.dump(t.encryptor.encrypt_symmetric(plain)))
        else:
            ciphertext = sealapi.Ciphertext()
            t.encryptor.encrypt_symmetric(plain, ciphertext)
            out.append(seal_io.dump(ciphertext))
    return out


def decrypt_envelope(
    key: HEKey, arrays: ArrayRecord, layout: Sequence[TensorInfo] | None = None
) -> dict[str, torch.Tensor]:
    """Decrypt an aggregate (or update) envelope into the weighted-average state_dict.

    ``layout``: the model's own layout; a payload for a different model is refused.
    """
    header = read_header(arrays)
    check_key(header, key)
    if not 1 <= header.num_summands <= key.params.max_summands:
        raise EnvelopeError(
            f"a sum of {header.num_summands} updates is outside the noise budget (1..{key.params.max_summands}): "
            "its decryption would not be exact"
        )
    got = layout_from_proto(header.layout)
    if layout is not None and (diff := layout_difference(got, layout)):
        raise EnvelopeError(f"the encrypted model does not fit this model: {diff}")
    if not 1 <= header.num_examples <= header.normaliser:
        raise EnvelopeError(f"corrupt header: {header.num_examples} examples for normaliser {header.normaliser}")
    ints = decrypt_ints(key, arrays, header)
    weight = header.num_examples / header.normaliser
    return unflatten(ints / (2.0**header.scale_bits * weight), got)


def decrypt_ints(key: HEKey, arrays: ArrayRecord, header: Header) -> np.ndarray:
    """The decrypted integers of an envelope (centered, in (-t/2, t/2))."""
    t = tools(key)
    if t.decryptor is None:
        raise UserError(f"{key.path} holds no secret key: the coordinator cannot decrypt (by design)")
    out = []
    for chunk in iter_chunks(arrays, header, max_ciphertext_bytes(key)):
        for data in chunk:
            plain = sealapi.Plaintext()
            t.decryptor.decrypt(load_checked(key, data), plain)
            out.append(np.asarray(t.encoder.decode_int64(plain), dtype=np.int64))
    return np.concatenate(out)[: header.num_values]


def load_checked(key: HEKey, data: bytes) -> Any:
    """Deserialise one ciphertext and check it is a fresh-size ciphertext at the data level."""
    t = tools(key)
    try:
        ct = seal_io.load_ciphertext(t.seal_context, data)
    except ValueError as exc:
        raise EnvelopeError(f"corrupt ciphertext: {exc}") from None
    if ct.size() != 2 or ct.parms_id() != t.data_level:
        raise EnvelopeError("ciphertext has an unexpected size or modulus level (not made by fedweights)")
    if ct.is_ntt_form():  # SEAL loads it, but a BFV sum or decryption with it would fail or be garbage
        raise EnvelopeError("ciphertext is in NTT form, which BFV ciphertexts never are (not made by fedweights)")
    if ct.is_transparent():  # its second polynomial is zero: the values are not encrypted at all
        raise EnvelopeError("transparent ciphertext: the values are not encrypted (not made by fedweights)")
    return ct


def check_key(header: Header, key: HEKey) -> None:
    """Refuse payloads made under another key pair or fixed-point scale."""
    if header.key_fingerprint != key.fingerprint:
        raise EnvelopeError(
            f"encrypted under another key (fingerprint {header.key_fingerprint.hex()[:16]}…, "
            f"this key is {key.fingerprint.hex()[:16]}…): all parties must use one key pair from `fedweights keys he`"
        )
    if header.scale_bits != key.params.scale_bits or header.slots_per_ciphertext != key.params.poly_modulus_degree:
        raise EnvelopeError("fixed-point scale or slot count differs from the key's parameters")


def max_ciphertext_bytes(key: HEKey) -> int:
    """Upper bound on one serialised ciphertext: both polynomials uncompressed plus SEAL's headers."""
    data_primes = len(key.params.coeff_mod_bit_sizes) - 1
    return 2 * key.params.poly_modulus_degree * data_primes * 8 + 1024


def make_header(
    key: HEKey, kind: int, server_round: int, layout: Sequence[TensorInfo], normaliser: int, num_examples: int, summands: int
) -> Header:
    """A header for a payload under ``key`` (chunk digests are filled in by ``pack``)."""
    return Header(
        scheme=pb.SCHEME_BFV,
        kind=kind,
        key_fingerprint=key.fingerprint,
        server_round=server_round,
        layout=layout_to_proto(layout),
        scale_bits=key.params.scale_bits,
        normaliser=normaliser,
        num_examples=num_examples,
        num_summands=summands,
        num_values=sum(t.size for t in layout),
        slots_per_ciphertext=key.params.poly_modulus_degree,
    )



def _locate(index: int, layout: Sequence[TensorInfo]) -> tuple[str, int]:
    pos = 0
    for t in layout:
        if index < pos + t.size:
            return t.name, index - pos
        pos += t.size
    return "?", index
