"""Proofs of misbehaviour: a dealer's own signed shares that an honest dealer could not have signed.

An honest dealer deals each round once (sites refuse replayed rounds), so all the shares it signs
for one parameter digest lie on ONE polynomial of degree < t whose constant is the secret it
committed to in its signed key bundle (seed commitment, or mask public key). Hence any ``t`` or
more shares, each carrying the dealer's signature (over kind, params digest, dealer, holder, share)
at the holder's own x-coordinate, that are NOT all on such a polynomial prove the dealer cheated:
either some ``t``-subset interpolates to something else, or different subsets disagree. Nobody but
the dealer can make one, so a server cannot frame an honest site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.errors import ProtocolError, ShamirError
from common.secagg.identity import SIGNATURE_BYTES, SignedKeyBundle, share_signature_ok
from common.secagg.prg import seed_commitment
from common.secagg.protocol import SecAggParams
from common.secagg.shamir import SHARE_BYTES, Share, consistent_secret

__all__ = ["KINDS", "LiarProof", "check_proof", "opens_commitment"]

KINDS = ("seed", "key")
"""Secret kinds a dealer shares: its self-mask seed and its mask-agreement private key."""


@dataclass(frozen=True)
class LiarProof:
    """``dealer``'s signed shares of one secret (``kind``), by holder: share bytes then signature."""

    dealer: int
    kind: str
    shares: Mapping[int, bytes]


def opens_commitment(kind: str, secret: bytes, bundle: SignedKeyBundle) -> bool:
    """Whether ``secret`` is the one committed to in ``bundle`` (seed commitment or mask public key)."""
    if kind == "seed":
        return seed_commitment(secret, bundle.round_id, bundle.site_id) == bundle.seed_commitment
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw() == bundle.mask_public


def check_proof(proof: LiarProof, params: SecAggParams, dealer_key: Ed25519PublicKey,
                bundle: SignedKeyBundle) -> None:
    """Raise :class:`ProtocolError` unless ``proof`` proves that the dealer of ``bundle`` (already
    verified against ``dealer_key``, the dealer's REGISTERED identity key) cheated in this round."""
    if proof.kind not in KINDS:
        raise ProtocolError(f"proof is about an unknown secret kind {proof.kind!r}")
    if bundle.site_id != proof.dealer or bundle.params_digest != params.digest:
        raise ProtocolError("proof is checked against another site's or round's key bundle")
    if len(proof.shares) < params.threshold:
        raise ProtocolError(f"proof has {len(proof.shares)} shares; threshold is {params.threshold}")
    points = []
    for holder, blob in sorted(proof.shares.items()):
        if holder not in params.site_set or len(blob) != SHARE_BYTES + SIGNATURE_BYTES:
            raise ProtocolError(f"proof share of holder {holder} is malformed")
        try:
            share = Share.from_bytes(blob[:SHARE_BYTES])
        except ShamirError as exc:
            raise ProtocolError(f"proof share of holder {holder} is malformed") from exc
        if share.x != holder + 1 or not share_signature_ok(
                dealer_key, blob[SHARE_BYTES:], proof.kind, params_digest=params.digest, dealer=proof.dealer,
                holder=holder, share=blob[:SHARE_BYTES]):
            raise ProtocolError(f"proof share of holder {holder} is not the dealer's signed share")
        points.append(share)
    secret = consistent_secret(points, params.threshold)
    if secret is not None and opens_commitment(proof.kind, secret, bundle):
        raise ProtocolError(f"site {proof.dealer}'s shares open its commitment: no misbehaviour proven")
