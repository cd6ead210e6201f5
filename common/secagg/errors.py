"""Typed exceptions of the secure-aggregation core.

Every failure a peer can provoke (a bad signature, a garbage share, a payload of the wrong size,
a contradictory request) raises one of these, so callers can log it, count it and carry on
instead of crashing the round.
"""

from __future__ import annotations

__all__ = [
    "DecryptionError",
    "ModulusError",
    "ParameterError",
    "PayloadError",
    "ProtocolError",
    "RoundAborted",
    "SecAggError",
    "ShamirError",
    "SignatureError",
]


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class ParameterError(SecAggError, ValueError):
    """Public parameters are invalid or unsafe (raised at construction)."""


class ModulusError(ParameterError):
    """No modulus of at most ``MAX_MODULUS_BITS`` bits can hold the sum without wrapping."""


class PayloadError(SecAggError):
    """A wire payload is malformed: truncated, oversized, bad header, non-canonical bits."""


class ShamirError(SecAggError):
    """Shamir shares are malformed, duplicated, too few, or inconsistent."""


class SignatureError(SecAggError):
    """A signed key bundle does not verify against the site registry."""


class DecryptionError(SecAggError):
    """An AEAD ciphertext failed authentication or carried an unexpected plaintext."""


class ProtocolError(SecAggError):
    """A stage was called out of order, or a request is contradictory, replayed or unsafe."""


class RoundAborted(SecAggError):
    """Too few sites remain to finish the round; no partial result is released."""
