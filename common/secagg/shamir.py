"""Shamir secret sharing over ``Z_Q``, the exponents of the round's group (common.secagg.group), so
that every share can be checked against Feldman commitments (common.secagg.vss) to its polynomial.

A dealer fixes its polynomial (secret and coefficients) once per round; :func:`evaluate` gives each
holder its point, :func:`combine` recovers the secret from any ``threshold`` points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.secagg.errors import ShamirError
from common.secagg.group import ELEMENT_BYTES, Q

__all__ = ["SHARE_BYTES", "Share", "combine", "evaluate"]

_X_BYTES = 4
SHARE_BYTES = _X_BYTES + ELEMENT_BYTES
"""Serialised size of one share: a 4-byte x-coordinate and a 256-byte value modulo Q."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is never 0 (that is the secret)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x < 1 << (8 * _X_BYTES):
            raise ShamirError(f"share x-coordinate {self.x} is outside [1, 2^32)")
        if not 0 <= self.y < Q:
            raise ShamirError("share value is outside Z_Q")

    def to_bytes(self) -> bytes:
        """Fixed-length big-endian encoding (:data:`SHARE_BYTES` bytes)."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(ELEMENT_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output; raises :class:`ShamirError` on any malformation."""
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"share is {len(data)} bytes, expected {SHARE_BYTES}")
        return cls(int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big"))


def evaluate(coefficients: Sequence[int], share_ids: Sequence[int]) -> list[Share]:
    """The points at ``share_ids`` of the polynomial ``sum(c_k x^k)`` (``coefficients[0]`` is the
    secret; ``len(coefficients)`` is the threshold). Shares come back in the order of ``share_ids``."""
    if len(set(share_ids)) != len(share_ids):
        raise ShamirError("duplicate share ids")
    if not coefficients:
        raise ShamirError("a sharing polynomial needs at least its secret")
    shares = []
    for x in share_ids:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % Q
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> int:
    """The secret of the first ``threshold`` shares, by Lagrange interpolation at 0.

    Raises :class:`ShamirError` for too few or duplicate shares. It cannot tell a wrong share:
    check shares against the dealer's commitments (common.secagg.vss) first, or the result after.
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
                num = num * xj % Q
                den = den * (xj - share.x) % Q
        secret = (secret + share.y * num * pow(den, -1, Q)) % Q
    return secret
