"""The coordinator's side: check each encrypted update and add it into a running ciphertext sum.

``EncryptedSum`` holds one accumulator (one model's worth of ciphertexts) and takes updates one
at a time: memory is O(model), not O(clients × model). It never decrypts — it is built from the
server context, which has no secret key. An update that fails any check is rejected with a
reason and leaves the sum untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from ..proto import update_pb2 as pb
from . import seal_io
from .codec import check_key, load_checked, make_header, max_ciphertext_bytes, tools
from .envelope import (
    EnvelopeError,
    TensorInfo,
    enum_name,
    iter_chunks,
    layout_difference,
    layout_from_proto,
    num_ciphertexts,
    pack,
    read_header,
)
from .keys import HEKey


@dataclass(frozen=True)
class RoundExpectation:
    """What every update of a round must match."""

    server_round: int
    layout: tuple[TensorInfo, ...]
    normaliser: int


class EncryptedSum:
    """Streaming sum of validated encrypted updates for one round."""

    def __init__(self, key: HEKey, expect: RoundExpectation) -> None:
        self.key = key
        self.expect = expect
        self.num_examples = 0
        self.num_summands = 0
        self._sum: list[Any] | None = None
        self._num_values = sum(t.size for t in expect.layout)

    @property
    def ciphertexts_held(self) -> int:
        """Ciphertexts in the accumulator (one model's worth once anything was added)."""
        return len(self._sum) if self._sum is not None else 0

    def add(self, arrays: ArrayRecord) -> int:
        """Check one client's envelope and add it; return its example count.

        Raises ``EnvelopeError`` with the reason when the update is rejected (the sum is unchanged).
        """
        self._check_size(arrays)
        header = read_header(arrays)
        self._check_header(header)
        ciphertexts = [
            load_checked(self.key, data)
            for chunk in iter_chunks(arrays, header, max_ciphertext_bytes(self.key))
            for data in chunk
        ]
        if self._sum is None:
            self._sum = ciphertexts
        else:
            self._add_all(ciphertexts)
        self.num_examples += header.num_examples
        self.num_summands += 1
        return header.num_examples

    def result(self) -> ArrayRecord | None:
        """The encrypted sum as an aggregate envelope (None when nothing was accepted)."""
        if self._sum is None:
            return None
        header = make_header(
            self.key,
            pb.PAYLOAD_KIND_AGGREGATE,
            self.expect.server_round,
            self.expect.layout,
            self.expect.normaliser,
            self.num_examples,
            self.num_summands,
        )
        return pack(header, [seal_io.dump(ct) for ct in self._sum])

    def _add_all(self, ciphertexts: list[Any]) -> None:
        """Add ``ciphertexts`` into the sum, all or nothing.

        SEAL refuses a sum that comes out transparent (e.g. an update that is another's negation)
        after it has written it; every addition made is then undone, so the sum is unchanged.
        """
        evaluator = tools(self.key).evaluator
        done = 0
        try:
            for total, ct in zip(self._sum, ciphertexts):
                evaluator.add_inplace(total, ct)
                done += 1
        except Exception as exc:
            if done < len(self._sum) and self._sum[done].is_transparent():  # SEAL wrote the refused sum
                done += 1
            for total, ct in zip(self._sum[:done], ciphertexts[:done]):
                evaluator.sub_inplace(total, ct)
            raise EnvelopeError(f"adding the update failed ({exc}); it would cancel the encryption of the sum") from None

    def _check_size(self, arrays: ArrayRecord) -> None:
        cts = -(-self._num_values // self.key.params.poly_modulus_degree)
        limit = cts * (max_ciphertext_bytes(self.key) + 64) + 2**20 + 64 * len(self.expect.layout)
        size = sum(len(array.data) for array in arrays.values())
        if size > limit:
            raise EnvelopeError(f"oversize update: {size} bytes, at most {limit} for this model and key")

    def _check_header(self, header: pb.EncryptedHeader) -> None:
        expect, params = self.expect, self.key.params
        check_key(header, self.key)
        if header.kind != pb.PAYLOAD_KIND_CLIENT_UPDATE:
            raise EnvelopeError(f"payload kind {enum_name(pb.PayloadKind, header.kind)} is not a client update")
        if header.server_round != expect.server_round:
            raise EnvelopeError(f"update is for round {header.server_round}, this is round {expect.server_round}")
        diff = layout_difference(layout_from_proto(header.layout), expect.layout)
        if diff:
            raise EnvelopeError(f"wrong layout: {diff}")
        if num_ciphertexts(header) != -(-self._num_values // params.poly_modulus_degree):
            raise EnvelopeError("wrong number of ciphertexts for the model")
        if header.num_summands != 1:
            raise EnvelopeError(f"a client update must be one fresh encryption, header says {header.num_summands}")
        if header.normaliser != expect.normaliser:
            raise EnvelopeError(f"weighted with normaliser {header.normaliser}, the round announced {expect.normaliser}")
        if header.num_examples < 1:
            raise EnvelopeError("update claims 0 examples")
        if self.num_examples + header.num_examples > expect.normaliser:
            raise EnvelopeError(
                f"range: accepted updates would weigh {self.num_examples + header.num_examples} examples, more than "
                f"the normaliser {expect.normaliser}; the sum could wrap around the plain modulus"
            )
        if self.num_summands + 1 > params.max_summands:
            raise EnvelopeError(f"noise budget: at most {params.max_summands} updates can be summed with these parameters")
