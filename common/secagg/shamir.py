"""Shamir secret sharing of 32-byte secrets over the prime field of the Mersenne prime 2^521 - 1.

The field is far larger than the secrets, which buys a free integrity check: interpolating a
set of shares that contains a corrupted one yields a uniformly random field element, which is
below 2^256 (a valid secret) with probability about 2^-265. :func:`combine` rejects it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from common.secagg.errors import ShamirError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "Share", "combine", "consistent_secret", "split"]

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
_X_BYTES = 4
_Y_BYTES = (PRIME.bit_length() + 7) // 8
SHARE_BYTES = _X_BYTES + _Y_BYTES
"""Serialised size of one share: a 4-byte x-coordinate and a 66-byte field element."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is never 0 (that is the secret)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x < 1 << (8 * _X_BYTES):
            raise ShamirError(f"share x-coordinate {self.x} is outside [1, 2^32)")
        if not 0 <= self.y < PRIME:
            raise ShamirError("share value is outside the field")

    def to_bytes(self) -> bytes:
        """Fixed-length big-endian encoding (:data:`SHARE_BYTES` bytes)."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output; raises :class:`ShamirError` on any malformation."""
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"share is {len(data)} bytes, expected {SHARE_BYTES}")
        return cls(int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big"))


def split(secret: bytes, share_ids: Sequence[int], threshold: int) -> list[Share]:
    """Share ``secret`` among the x-coordinates ``share_ids``; any ``threshold`` of them recover it.

    Coefficients are drawn with :mod:`secrets`. Shares come back in the order of ``share_ids``.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(share_ids)) != len(share_ids):
        raise ShamirError("duplicate share ids")
    if not 1 <= threshold <= len(share_ids):
        raise ShamirError(f"threshold {threshold} must be in [1, {len(share_ids)} share ids]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in share_ids:
        if not 1 <= x < 1 << (8 * _X_BYTES):
            raise ShamirError(f"share id {x} is outside [1, 2^32)")
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Recover the secret from the first ``threshold`` shares by Lagrange interpolation at 0.

    Raises :class:`ShamirError` for too few or duplicate shares, and when the interpolated
    value is not a valid 32-byte secret (some share was corrupted).
    """
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed")
    points = list(shares[:threshold])
    xs = [s.x for s in points]
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate share x-coordinates")
    secret = 0
    for i, share in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - share.x) % PRIME
        secret = (secret + share.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ShamirError("shares are inconsistent (interpolated value is not a valid secret)")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(points: Sequence[Share], weights: Sequence[int], z: int) -> int:
    """Value at ``z`` of the polynomial of degree < len(points) through ``points`` (Lagrange form,
    precomputed barycentric ``weights``; prefix/suffix products, so O(len) per point)."""
    diffs = [(z - p.x) % PRIME for p in points]
    suffix = [1] * (len(points) + 1)
    for i in range(len(points) - 1, -1, -1):
        suffix[i] = suffix[i + 1] * diffs[i] % PRIME
    total, prefix = 0, 1
    for i, point in enumerate(points):
        total = (total + point.y * weights[i] % PRIME * prefix % PRIME * suffix[i + 1]) % PRIME
        prefix = prefix * diffs[i] % PRIME
    return total


def consistent_secret(shares: Sequence[Share], threshold: int) -> bytes | None:
    """The secret of the ONE polynomial of degree < ``threshold`` through ALL ``shares``, or None
    when no such polynomial exists (some ``threshold``-subsets disagree) or its constant is not a
    valid 32-byte secret. An honest dealer's shares always give its secret.

    Raises :class:`ShamirError` for fewer than ``threshold`` shares or duplicate x-coordinates.
    """
    if threshold < 1 or len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed")
    if len({s.x for s in shares}) != len(shares):
        raise ShamirError("duplicate share x-coordinates")
    base = list(shares[:threshold])
    weights = []
    for i, share in enumerate(base):
        den = 1
        for j, other in enumerate(base):
            if j != i:
                den = den * (share.x - other.x) % PRIME
        weights.append(pow(den, -1, PRIME))
    if any(_evaluate(base, weights, extra.x) != extra.y for extra in shares[threshold:]):
        return None
    secret = _evaluate(base, weights, 0)
    return None if secret >> (8 * SECRET_BYTES) else secret.to_bytes(SECRET_BYTES, "big")
