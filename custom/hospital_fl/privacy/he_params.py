"""CKKS parameters of a consortium's HE contexts: plain, validated data (no TenSEAL needed).

Provisioning renders them into FLARE's HEBuilder arguments; jobs carry them so each site
checks its kit's context against them; hospital_fl.privacy.he encrypts with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hospital_fl.errors import InputError
from hospital_fl.privacy.he_packing import PackingConfig

__all__ = ["CKKSParams", "SECURITY_MAX_BITS"]

# Largest total coefficient-modulus bits at 128-bit security (HomomorphicEncryption.org
# standard, ternary secret), per poly_modulus_degree.
SECURITY_MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of a consortium, as provisioned by FLARE's HEBuilder.

    Precision: the circuit is additions only (no multiplication, so no rescale), and a
    fresh ciphertext lives at the first prime alone (the last prime is the special prime
    of key switching), so one data prime suffices and a ciphertext is the smallest
    possible. A slot carries fields_per_slot signed fields of field_bits =
    (first prime bits - 1 - scale_bits) // fields_per_slot bits, so a slot times the scale
    stays below half the first prime (the capacity rule). The decoding error of a sum of
    8 ciphertexts at the defaults is measured (tests) well below 0.25, far under the 0.5
    that rounding tolerates, so the integer fields are recovered exactly; the only error
    left is the fixed-point step 2**e_t / 2**magnitude_bits of each tensor's frame
    (magnitude_bits = field_bits - 2, 16 at the defaults: about 1.5e-5 of the frame).

    Size: a ciphertext at one data prime is two polynomials of poly_modulus_degree 64-bit
    coefficients, 16 bytes per slot; two fp32 values per slot make it ~3.7x their bytes
    (serialization compresses a little). More data primes multiply that size.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (52, 52)
    scale_bits: int = 15
    fields_per_slot: int = 2
    headroom_bits: int = 2

    def __post_init__(self):
        if isinstance(self.coeff_mod_bit_sizes, (list, tuple)):
            object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        degree, primes = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if not _is_int(degree) or degree not in SECURITY_MAX_BITS:
            raise InputError(
                "ckks.poly_modulus_degree", degree, f"it must be one of {tuple(SECURITY_MAX_BITS)}", "use 8192"
            )
        if not isinstance(primes, tuple) or len(primes) < 2 or not all(_is_int(b) for b in primes):
            raise InputError(
                "ckks.coeff_mod_bit_sizes",
                primes,
                "it must list >= 2 prime sizes (the last is the special prime of key switching)",
                "use [52, 52]",
            )
        if not all(20 <= b <= 60 for b in primes):
            raise InputError("ckks.coeff_mod_bit_sizes", primes, "each prime must have 20..60 bits", "use [52, 52]")
        if sum(primes) > SECURITY_MAX_BITS[degree]:
            raise InputError(
                "ckks.coeff_mod_bit_sizes",
                primes,
                f"their {sum(primes)} bits exceed {SECURITY_MAX_BITS[degree]}, the 128-bit security bound "
                f"of the HE standard for poly_modulus_degree {degree}",
                "use fewer or smaller primes, or a larger poly_modulus_degree",
            )
        if not _is_int(self.scale_bits) or not 12 <= self.scale_bits <= 40:
            raise InputError("ckks.scale_bits", self.scale_bits, "it must be an integer in 12..40", "use 15")
        if not _is_int(self.fields_per_slot) or not 1 <= self.fields_per_slot <= 4:
            raise InputError("ckks.fields_per_slot", self.fields_per_slot, "it must be an integer in 1..4", "use 2")
        if not _is_int(self.headroom_bits) or not 0 <= self.headroom_bits <= 8:
            raise InputError("ckks.headroom_bits", self.headroom_bits, "it must be an integer in 0..8", "use 2")
        field_bits = self.field_bits
        if not 12 <= field_bits <= 30 or self.fields_per_slot * field_bits + self.scale_bits + 1 > primes[0]:
            raise InputError(
                "ckks.fields_per_slot",
                self.fields_per_slot,
                f"each field gets (first prime {primes[0]} - 1 - scale_bits {self.scale_bits}) // "
                f"{self.fields_per_slot} = {field_bits} bits, and needs 12..30 (precision) with "
                "fields_per_slot * field_bits + scale_bits + 1 <= first prime bits (capacity)",
                "use fewer fields per slot, a smaller scale_bits or a larger first prime (e.g. [52, 52], scale 15, 2 fields)",
            )

    @property
    def field_bits(self) -> int:
        """Bits of one packed field: what the first prime leaves above scale and sign."""
        return (self.coeff_mod_bit_sizes[0] - 1 - self.scale_bits) // self.fields_per_slot

    @property
    def slots(self) -> int:
        """Values one CKKS ciphertext encodes (poly_modulus_degree / 2)."""
        return self.poly_modulus_degree // 2

    def packing(self) -> PackingConfig:
        """The packing these parameters allow."""
        return PackingConfig(
            slots=self.slots,
            field_bits=self.field_bits,
            fields_per_slot=self.fields_per_slot,
            headroom_bits=self.headroom_bits,
        )

    def builder_args(self) -> dict:
        """The arguments of FLARE's HEBuilder that provision contexts for these parameters."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    def to_json(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "fields_per_slot": self.fields_per_slot,
            "headroom_bits": self.headroom_bits,
        }

    @classmethod
    def from_json(cls, data: object) -> CKKSParams:
        """Parameters from to_json(); missing keys take the defaults, unknown keys are refused."""
        known = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "fields_per_slot", "headroom_bits")
        if not isinstance(data, Mapping) or set(data) - set(known):
            shown = sorted(set(data) - set(known)) if isinstance(data, Mapping) else type(data).__name__
            raise InputError("ckks", shown, f"it must be a dict with keys among {known}", "use CKKSParams.to_json()")
        return cls(**dict(data))
