"""Feldman verifiable secret sharing: each dealer publishes ``C_k = G^{a_k}`` for the coefficients of
each of its two sharing polynomials, so every holder checks its share before it masks with the
dealer (``G^y == prod C_k^{x^k}``), and any ``threshold`` checked shares recover exactly the
committed secret.

The mask-key polynomial's constant term is the dealer's mask-agreement secret ``s``, so its
commitment ``C_0 = G^s`` IS the dealer's mask public key: a holder cannot accept shares of one key
and agree masks with another. The self-mask polynomial's ``C_0 = G^b`` commits to the self-mask
secret. A dealer signs a digest of both vectors in its stage-1 key bundle (common.secagg.identity);
the vectors themselves travel with its shares at stage 2, the same bytes to every holder.

Dealing is deterministic: the coefficients other than the secret come from a dealing key drawn at
stage 1 and kept in the session, expanded over the round's parameter digest and the secret's kind,
so a session restored from any saved state can only deal the same shares again.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from common.secagg.errors import PayloadError
from common.secagg.group import (
    ELEMENT_BYTES,
    Q,
    element_from_bytes,
    element_to_bytes,
    exp,
    exp_g,
    product,
    scalar_from_key,
)
from common.secagg.prg import encode_context
from common.secagg.shamir import Share

__all__ = ["KINDS", "Commitments", "commitments_digest", "polynomial", "share_ok", "shares_ok"]

KINDS = ("seed", "key")
"""The two secrets a dealer shares: its self-mask secret and its mask-agreement key."""
_BATCH_WEIGHT_BITS = 64


def polynomial(secret: int, dealing_key: bytes, params_digest: bytes, kind: str, threshold: int) -> list[int]:
    """The coefficients of a dealer's ``kind`` polynomial: ``secret``, then ``threshold - 1`` values
    uniform modulo Q derived from its dealing key (HKDF over the params digest, kind and index)."""
    return [secret] + [scalar_from_key(dealing_key, encode_context("deal", params_digest, kind, k))
                       for k in range(1, threshold)]


def commitments_digest(raw: bytes) -> bytes:
    """SHA-256 of a commitments encoding: what the dealer signs in its key bundle."""
    return hashlib.sha256(encode_context("commitments", raw)).digest()


@dataclass(frozen=True)
class Commitments:
    """A dealer's Feldman commitments, one vector of ``threshold`` group elements per kind."""

    seed: tuple[int, ...]
    key: tuple[int, ...]

    @classmethod
    def of_polynomials(cls, seed: Sequence[int], key: Sequence[int]) -> Commitments:
        """Commit to two polynomials' coefficients (``2t`` exponentiations of G)."""
        return cls(tuple(exp_g(a) for a in seed), tuple(exp_g(a) for a in key))

    def of(self, kind: str) -> tuple[int, ...]:
        """The vector of one kind."""
        return self.seed if kind == "seed" else self.key

    @property
    def mask_public(self) -> int:
        """``G^s``: the dealer's mask-agreement public key."""
        return self.key[0]

    @staticmethod
    def size(threshold: int) -> int:
        """Bytes of the encoding for this threshold."""
        return 2 * threshold * ELEMENT_BYTES

    def to_bytes(self) -> bytes:
        """The seed vector then the key vector, each element fixed-length."""
        return b"".join(element_to_bytes(c) for c in (*self.seed, *self.key))

    @classmethod
    def from_bytes(cls, data: object, threshold: int) -> Commitments:
        """Parse :meth:`to_bytes` output; a wrong size or a non-element is a :class:`PayloadError`."""
        if not isinstance(data, bytes) or len(data) != cls.size(threshold):
            raise PayloadError(f"commitments must be {cls.size(threshold)} bytes for threshold {threshold}")
        elements = [element_from_bytes(data[i:i + ELEMENT_BYTES]) for i in range(0, len(data), ELEMENT_BYTES)]
        return cls(tuple(elements[:threshold]), tuple(elements[threshold:]))

    @cached_property
    def digest(self) -> bytes:
        """:func:`commitments_digest` of the encoding."""
        return commitments_digest(self.to_bytes())


def _committed_at(commitments: Sequence[int], x: int) -> int:
    """``prod C_k^{x^k}``: Horner in the exponent (``x`` is a small site coordinate: cheap)."""
    acc = 1
    for c in reversed(commitments):
        acc = product([exp(acc, x), c])
    return acc


def share_ok(share: Share, commitments: Sequence[int]) -> bool:
    """Whether ``share`` lies on the polynomial committed to by ``commitments``."""
    return exp_g(share.y) == _committed_at(commitments, share.x)


def shares_ok(checks: Sequence[tuple[Share, Sequence[int]]]) -> bool:
    """Whether EVERY share lies on its committed polynomial, with one exponentiation of G for all:
    the small-exponent batch test (Bellare, Garay, Rabin 1998) with random 64-bit weights, sound in
    a prime-order group: a batch holding a bad share passes with probability 2^-64, and a dealer gets
    one try per holder and round.
    Call :func:`share_ok` on each to find the bad one when it fails."""
    weights = [secrets.randbits(_BATCH_WEIGHT_BITS) for _ in checks]
    left = exp_g(sum(w * share.y for w, (share, _) in zip(weights, checks, strict=True)) % Q)
    right = product([exp(_committed_at(c, share.x), w) for w, (share, c) in zip(weights, checks, strict=True)])
    return left == right
