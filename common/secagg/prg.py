"""Mask expansion and seed derivation: HKDF-SHA256 then a ChaCha20 keystream, never numpy RNG.

Every derivation binds a *context* (protocol version, purpose, round id, site ids) in HKDF's
``info`` so that no two masks of a federation share a keystream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.secagg.errors import ParameterError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "SEED_BYTES",
    "encode_context",
    "expand_mask",
    "hkdf",
    "pairwise_mask_context",
    "pairwise_seed",
    "self_mask_context",
    "self_mask_seed",
]

SEED_BYTES = 32
_DOMAIN = b"fedtune/secagg/v1"
_ZERO_NONCE = bytes(16)


def encode_context(*parts: bytes | str | int) -> bytes:
    """Unambiguous encoding of context fields: each one type-tagged and length-prefixed."""
    out = bytearray(_DOMAIN)
    for part in parts:
        if isinstance(part, bool):
            raise TypeError("booleans are not context fields")
        if isinstance(part, int):
            tag, raw = b"i", part.to_bytes(8, "big", signed=True)
        elif isinstance(part, str):
            tag, raw = b"s", part.encode("utf-8")
        else:
            tag, raw = b"b", bytes(part)
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def hkdf(key_material: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 with no salt (inputs are uniformly random keys or DH outputs)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key_material)


def expand_mask(seed: bytes, length: int, modulus_bits: int, context: bytes) -> npt.NDArray[np.uint64]:
    """Expand a 32-byte seed into ``length`` uniform integers modulo ``2**modulus_bits``.

    The ChaCha20 key is ``HKDF(seed, info=context)``; the keystream (8 bytes per element) is read
    as little-endian uint64 and reduced by masking, which is exactly uniform because
    ``2**modulus_bits`` divides ``2**64``.
    """
    import numpy as np  # here, not at import: the key and registry commands load this module without numpy

    if len(seed) != SEED_BYTES:
        raise ParameterError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if not 1 <= modulus_bits <= 64:
        raise ParameterError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    key = hkdf(seed, encode_context("mask", context))
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    if modulus_bits < 64:
        words &= np.uint64((1 << modulus_bits) - 1)
    return words


def self_mask_seed(secret: bytes, round_id: bytes, site_id: int) -> bytes:
    """Seed of a site's self mask from its (encoded) self-mask secret, the one it shares."""
    return hkdf(secret, encode_context("self-seed", round_id, site_id))


def pairwise_seed(shared_secret: bytes, round_id: bytes, site_a: int, site_b: int) -> bytes:
    """Seed of the pairwise mask of two sites from their full (encoded) Diffie-Hellman secret.

    Symmetric in ``(site_a, site_b)``: both sides derive the same seed.
    """
    low, high = sorted((site_a, site_b))
    return hkdf(shared_secret, encode_context("pair-seed", round_id, low, high))


def pairwise_mask_context(round_id: bytes, site_a: int, site_b: int) -> bytes:
    """Context of the mask shared by two sites (symmetric)."""
    low, high = sorted((site_a, site_b))
    return encode_context("pair-mask", round_id, low, high)


def self_mask_context(round_id: bytes, site_id: int) -> bytes:
    """Context of a site's self mask."""
    return encode_context("self-mask", round_id, site_id)

