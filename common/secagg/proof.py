"""Proofs of cheating: a dealer's own signed share that is not on the polynomial its own signed
commitments fix.

A dealer signs the digest of its Feldman commitments in its stage-1 key bundle, and each share it
deals together with that same digest (common.secagg.identity.sign_share). An honest dealer's shares
always satisfy ``G^y == prod C_k^{x^k}`` for those commitments, so ONE signed share that does not
is a proof against its dealer, checkable by anyone who has the dealer's registered identity key,
its signed bundle and the commitments (the server relays them all). Nobody but the dealer can make
one, so neither a server nor a holder can frame an honest site: an accusation whose share checks
(or whose signature does not) proves nothing but the accuser's word.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.secagg.errors import ProtocolError, ShamirError
from common.secagg.identity import SignedKeyBundle, share_signature_ok
from common.secagg.protocol import SecAggParams
from common.secagg.shamir import Share
from common.secagg.vss import KINDS, Commitments, share_ok

__all__ = ["CheatProof", "check_proof"]


@dataclass(frozen=True)
class CheatProof:
    """The ``kind`` share ``dealer`` dealt to ``holder`` (share bytes) and the dealer's signature on it."""

    dealer: int
    holder: int
    kind: str
    share: bytes
    signature: bytes


def check_proof(proof: CheatProof, params: SecAggParams, dealer_key: Ed25519PublicKey, bundle: SignedKeyBundle,
                commitments: Commitments) -> None:
    """Raise :class:`ProtocolError` unless ``proof`` proves that the dealer of ``bundle`` (already
    verified against ``dealer_key``, the dealer's REGISTERED identity key) cheated in this round."""
    if proof.kind not in KINDS:
        raise ProtocolError(f"proof is about an unknown secret kind {proof.kind!r}")
    if bundle.site_id != proof.dealer or bundle.params_digest != params.digest:
        raise ProtocolError("proof is checked against another site's or round's key bundle")
    if commitments.digest != bundle.commitments_digest:
        raise ProtocolError("proof is checked against commitments the dealer did not sign")
    if proof.holder not in params.site_set:
        raise ProtocolError(f"proof names holder {proof.holder}, who is not in the round")
    try:
        share = Share.from_bytes(proof.share)
    except ShamirError as exc:
        raise ProtocolError(f"proof share of holder {proof.holder} is malformed") from exc
    if share.x != proof.holder + 1 or not share_signature_ok(
            dealer_key, proof.signature, proof.kind, params_digest=params.digest, dealer=proof.dealer,
            holder=proof.holder, commitments_digest=bundle.commitments_digest, share=proof.share):
        raise ProtocolError(f"proof share of holder {proof.holder} is not the dealer's signed share")
    if share_ok(share, commitments.of(proof.kind)):
        raise ProtocolError(f"site {proof.dealer}'s share to site {proof.holder} is on its committed polynomial: "
                            "no cheating proven")
