"""BFV parameters for encrypted aggregation: the defaults, their validation, and what they allow.

fedweights encrypts with BFV (exact integer arithmetic mod a plain modulus t) and encodes each
weight as a fixed-point integer ``round(2^scale_bits * n_k/N * w)``. The coordinator only ADDS
ciphertexts, so one data prime suffices; the last prime of the chain is SEAL's special prime.

Two limits follow from the parameters and are enforced, never left to silent wraparound:

* range: the decrypted sum must stay inside ``(-t/2, t/2)``. With weights n_k/N summing to at
  most 1, that holds when every ``|w| <= max_abs_value`` (≈ 7.998 for the defaults).
* noise: each fresh ciphertext carries noise of at most ``NOISE_BOUND`` (+1/2 from rounding);
  decryption is exact while the summed noise stays below ``q / (2t)`` (q: the data modulus), so
  at most ``max_summands`` updates (93 for the defaults) may be added into one aggregate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from tenseal import sealapi

from ..errors import UserError

#: Largest |e| of SEAL's fresh-encryption noise: centered binomial on [-21, 21] (SEAL 4 default;
#: the clipped-Gaussian build stops at 6 sigma = 19.2).
NOISE_BOUND = 21
SUPPORTED_DEGREES = (4096, 8192, 16384, 32768)
MIN_SCALE_BITS = 16


@dataclass(frozen=True)
class HEParams:
    """BFV encryption parameters plus the fixed-point scale; immutable and validated on demand."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (40, 60)
    plain_modulus: int = 268369921  # the 28-bit batching prime for N=8192 (SEAL PlainModulus.Batching)
    scale_bits: int = 24

    @classmethod
    def create(
        cls,
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: tuple[int, ...] | list[int] = (40, 60),
        plain_modulus_bits: int = 28,
        scale_bits: int = 24,
    ) -> HEParams:
        """Parameters from sizes: picks the largest ``plain_modulus_bits``-bit prime t with t ≡ 1 mod 2N.

        Raises ``UserError`` naming what is insecure or unusable.
        """
        _check_degree(poly_modulus_degree)
        if not 17 <= plain_modulus_bits <= 60:
            raise UserError(f"plain modulus bits must be between 17 and 60, got {plain_modulus_bits}")
        try:
            t = sealapi.PlainModulus.Batching(poly_modulus_degree, plain_modulus_bits).value()
        except Exception as exc:  # SEAL: no suitable prime of that size
            reason = f"no {plain_modulus_bits}-bit batching prime exists for N={poly_modulus_degree}: {exc}"
            raise UserError(reason) from None
        params = cls(poly_modulus_degree, tuple(int(b) for b in coeff_mod_bit_sizes), t, scale_bits)
        params.validate()
        return params

    def validate(self) -> None:
        """Refuse insecure or unusable parameters with the reason (``UserError``)."""
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        _check_degree(n)
        if len(bits) < 2:
            raise UserError(
                "unusable coefficient modulus: give at least two primes (e.g. 40,60); "
                "the last one is SEAL's special prime and TenSEAL rejects single-prime chains"
            )
        smallest = math.ceil(math.log2(2 * n)) + 2
        if any(not smallest <= b <= 60 for b in bits):
            raise UserError(f"unusable coefficient modulus {list(bits)}: each prime needs {smallest}..60 bits for N={n}")
        limit = sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)
        if sum(bits) > limit:
            raise UserError(
                f"insecure parameters: N={n} allows at most {limit} bits of coefficient modulus for 128-bit "
                f"security (HomomorphicEncryption.org standard), got {sum(bits)} ({'+'.join(map(str, bits))}); "
                "use fewer/smaller primes or a larger poly modulus degree"
            )
        t = self.plain_modulus
        if t % (2 * n) != 1 or not sealapi.Modulus(t).is_prime():
            raise UserError(f"unusable plain modulus {t}: batching needs a prime t with t ≡ 1 mod {2 * n}")
        if self.max_summands < 2:
            raise UserError(
                f"unusable parameters: the data modulus ({sum(bits[:-1])} bits) leaves noise room for "
                f"{self.max_summands} update(s) per aggregate with a {t.bit_length()}-bit plain modulus; "
                "make the first prime(s) larger or the plain modulus smaller"
            )
        top = t.bit_length() - 2
        if not MIN_SCALE_BITS <= self.scale_bits <= top:
            raise UserError(
                f"unusable scale bits {self.scale_bits}: must be between {MIN_SCALE_BITS} (resolution "
                f"2^-{MIN_SCALE_BITS}) and {top} (so that weights of magnitude 1 still fit under t={t})"
            )

    @cached_property
    def data_modulus(self) -> int:
        """q: the product of the primes ciphertexts live under (all but SEAL's special prime)."""
        primes = sealapi.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_mod_bit_sizes))
        return math.prod(p.value() for p in primes[:-1])

    @property
    def max_summands(self) -> int:
        """How many fresh ciphertexts can be added with decryption still guaranteed exact."""
        return int(self.data_modulus // (2 * self.plain_modulus) // (NOISE_BOUND + 1))

    @property
    def half_range(self) -> int:
        """Largest |integer| the decrypted sum can hold: (t - 1) / 2."""
        return (self.plain_modulus - 1) // 2

    @property
    def max_abs_value(self) -> float:
        """Largest |weight| a client may encode (the documented range), leaving room for rounding."""
        return (self.half_range - math.ceil(self.max_summands / 2)) / 2**self.scale_bits

    def error_bound(self, summands: int, weight_fraction: float = 1.0) -> float:
        """Worst-case |decoded average - true average| from fixed-point rounding.

        ``weight_fraction`` is (sum of the accepted n_k) / N: below 1 when sampled clients drop out.
        """
        return summands / (2 ** (self.scale_bits + 1) * weight_fraction)

    def describe(self) -> dict:
        """The parameters and what they allow, as recorded next to the keys."""
        return {
            "scheme": "BFV",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "plain_modulus": self.plain_modulus,
            "scale_bits": self.scale_bits,
            "security": "128-bit (HomomorphicEncryption.org standard, ternary secret)",
            "max_abs_value": self.max_abs_value,
            "max_summands": self.max_summands,
            "rounding_error_per_update": 2.0 ** -(self.scale_bits + 1),
        }


def _check_degree(n: int) -> None:
    if n not in SUPPORTED_DEGREES:
        raise UserError(
            f"unusable poly modulus degree {n}: choose one of {', '.join(map(str, SUPPORTED_DEGREES))} "
            "(smaller rings cannot hold a data prime larger than the plain modulus at 128-bit security)"
        )
