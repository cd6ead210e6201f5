"""The prime-order group of the mask-key agreement and of the verifiable (Feldman) sharing.

RFC 3526 group 14: the 2048-bit safe prime ``P = 2Q + 1`` (``Q`` prime), about 112-bit security,
the smallest MODP group NIST still allows; a larger one would cost every exponentiation of the
round about (size ratio)^2.6 more time. Exponentiations run in GMP's constant-time ``mpz_powm_sec``
(gmpy2): the time does not depend on a secret exponent, and it is about 6x faster than Python's ``pow``.

Elements are the classes ``{x, -x}`` of ``Z_P^*``: the quotient group ``Z_P^* / {±1}`` has prime
order ``Q`` and is isomorphic to the quadratic residues (``{±x} -> x^2``; Hofheinz-Kiltz "signed"
residues), so its discrete logs are as hard. Each class is written by its representative in
``[1, Q]``, so any integer in that range IS a group element: checking a peer's element is a range
check, not the exponentiation ``x^Q`` a subgroup test needs (which would cost as much as the
Feldman check itself, 2t times per dealer). ``G = 2`` generates it (the group has prime order and
2 is not ±1).

Exponents: the two secrets a site shares (its mask-agreement key and its self-mask secret) are
uniform ``SECRET_BITS``-bit integers: short exponents, within the 220 to 320 bits RFC 3526's
security considerations give for this group (a discrete log in a 256-bit interval costs 2^128);
every other coefficient of a sharing polynomial is uniform modulo ``Q``, which keeps Shamir's
shares perfectly hiding.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import gmpy2

from common.secagg.errors import PayloadError
from common.secagg.prg import hkdf

__all__ = [
    "ELEMENT_BYTES",
    "SECRET_BITS",
    "G",
    "P",
    "Q",
    "element_from_bytes",
    "element_to_bytes",
    "exp",
    "exp_g",
    "new_secret",
    "product",
    "scalar_from_key",
]

P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
Q = (P - 1) // 2
G = 2
ELEMENT_BYTES = 256
SECRET_BITS = 256


def _canonical(x: int) -> int:
    return min(x, P - x)


def exp(base: int, exponent: int) -> int:
    """``base ** exponent`` in the group (``base`` a representative, any exponent >= 0), in time that does
    not depend on the exponent's value."""
    exponent %= Q  # the group has order Q; GMP's constant-time power needs a positive exponent
    return _canonical(int(gmpy2.powmod_sec(base, exponent, P))) if exponent else 1


def exp_g(exponent: int) -> int:
    """``G ** exponent``."""
    return exp(G, exponent)


def product(elements: Sequence[int]) -> int:
    """The group product of ``elements``."""
    acc = 1
    for element in elements:
        acc = acc * element % P
    return _canonical(acc)


def new_secret() -> int:
    """A fresh secret exponent from the OS CSPRNG: uniform in ``[1, 2**SECRET_BITS)``."""
    return 1 + secrets.randbelow((1 << SECRET_BITS) - 1)


def scalar_from_key(key: bytes, info: bytes) -> int:
    """A uniform exponent modulo ``Q`` derived from ``key`` (HKDF with ``info``; 128 extra bits
    make the reduction's bias negligible)."""
    return int.from_bytes(hkdf(key, info, ELEMENT_BYTES + 16), "big") % Q


def element_to_bytes(element: int) -> bytes:
    """Fixed-length big-endian encoding."""
    return element.to_bytes(ELEMENT_BYTES, "big")


def element_from_bytes(data: bytes) -> int:
    """Parse :func:`element_to_bytes` output; anything but a representative in ``[1, Q]`` is a
    :class:`PayloadError` (that range check is the whole membership test)."""
    if len(data) != ELEMENT_BYTES:
        raise PayloadError(f"group element is {len(data)} bytes, expected {ELEMENT_BYTES}")
    element = int.from_bytes(data, "big")
    if not 1 <= element <= Q:
        raise PayloadError("group element is not a canonical representative in [1, Q]")
    return element
