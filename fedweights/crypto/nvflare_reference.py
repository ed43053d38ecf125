"""NVIDIA FLARE's TenSEAL path, rebuilt with TenSEAL exactly as NVFlare configures it (for benchmarks).

* Keys (``nvflare.lighter.impl.he.HEBuilder`` defaults): CKKS, N=8192, coeff [60, 40, 40],
  ``global_scale`` 2^40, symmetric encryption, relinearisation keys; the server context is
  serialised with relin keys and without secret/public/Galois keys.
* Client (``HEModelEncryptor``): every layer is flattened and encrypted as one ``ckks_vector``
  and serialised on its own.
* Server (``HEInTimeAccumulateWeightedAggregator``): ``ckks_vector_from`` each layer, multiply it
  by the client's aggregation weight, add it into the running total, serialise the result.
* Client (``HEModelDecryptor``): ``ckks_vector_from`` with the secret context and ``decrypt``.

No NVFlare install is needed: only its TenSEAL calls and parameters are reproduced.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = [60, 40, 40]
SCALE_BITS = 40


def make_contexts() -> tuple[bytes, bytes]:
    """(client context with secret key, server context without it), serialised as NVFlare does."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=COEFF_MOD_BIT_SIZES,
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.generate_relin_keys()
    context.global_scale = 2**SCALE_BITS
    client = context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=True)
    server = context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    return client, server


def encrypt_layers(context: ts.Context, layers: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """One serialised CKKS vector per layer (NVFlare's HEModelEncryptor)."""
    with _quiet():  # TenSEAL prints a warning for every vector longer than one ciphertext
        return {name: ts.ckks_vector(context, values.ravel()).serialize() for name, values in layers.items()}


class WeightedSum:
    """NVFlare's in-time accumulator: deserialise, multiply by the weight, add."""

    def __init__(self, context: ts.Context) -> None:
        self.context = context
        self.total: dict[str, ts.CKKSVector] = {}

    def add(self, payload: Mapping[str, bytes], weight: float) -> None:
        """Accept one client's payload with its aggregation weight."""
        with _quiet():
            for name, data in payload.items():
                value = ts.ckks_vector_from(self.context, data) * weight
                self.total[name] = self.total[name] + value if name in self.total else value

    def add_unweighted(self, payload: Mapping[str, bytes]) -> None:
        """NVFlare's other pairing (clients pre-weight): deserialise and add only."""
        with _quiet():
            for name, data in payload.items():
                value = ts.ckks_vector_from(self.context, data)
                self.total[name] = self.total[name] + value if name in self.total else value

    def scale(self, factor: float) -> None:
        """Multiply the total once (NVFlare's final ``* 1/count`` when clients pre-weight)."""
        with _quiet():
            self.total = {name: v * factor for name, v in self.total.items()}

    def result(self) -> dict[str, bytes]:
        """The serialised total."""
        with _quiet():
            return {name: v.serialize() for name, v in self.total.items()}


def decrypt_layers(context: ts.Context, payload: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """Decrypt each layer with the client (secret) context (NVFlare's HEModelDecryptor)."""
    with _quiet():
        return {name: np.asarray(ts.ckks_vector_from(context, data).decrypt()) for name, data in payload.items()}


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield
