"""Proofs of equal discrete logs (Chaum-Pedersen), made non-interactive with Fiat-Shamir over SHA-256:
how the masks between a proven cheat and the holders that masked with it come off without its key.

The limit they close: a dealer that deals good shares to fewer than ``threshold`` holders and bad
ones to the rest is proven and dropped at stage 3 (common.secagg.proof), but the holders that
accepted its shares masked with it, and fewer than ``threshold`` shares cannot rebuild its key.
Each such survivor ``h`` instead reveals, for the proven cheat ``c``, their Diffie-Hellman element
``K_hc = pk_c^{s_h}`` (the input of their pairwise seed, common.secagg.prg.pairwise_seed) with a
proof that ``log_G(pk_h) == log_{pk_c}(K_hc)`` (:func:`prove_shared`), signed with its identity key
(:class:`KeyReveal`); the server removes that pairwise mask with ``K_hc`` (the same seed derivation
as the masking).

Why it is safe:

* ``h`` reveals only for a dealer proven by the dealer's OWN signed share off its own signed
  commitments, which ``h`` checks itself (the proof comes with the unmask request): nobody can make
  such a proof against an honest dealer, so an honest dealer's pairwise masks never come off.
* ``K_hc`` opens only the mask between ``h`` and ``c``; ``c``'s input is not in the sum and ``h``'s
  self mask stays on, so nothing about ``h``'s input is exposed, as long as ``K_hc`` is not also the
  element ``h`` shares with an HONEST site. A cheat could arrange that: Feldman commitments do not
  show that the dealer knows its key, so ``c`` could commit to ``pk_c = pk_x`` (or ``pk_x^a``,
  ``pk_x·G^a``) for an honest ``x`` and deal "good" shares to fewer than ``threshold`` holders
  (``threshold - 1`` points fix a polynomial in the exponent whatever its constant), and each
  holder's reveal would then give away its mask with ``x``. Hence every dealer proves knowledge of
  its key (:func:`prove_key`, a Schnorr proof bound to its site id and the round) with its deal; the
  server drops a dealer whose proof fails, and a holder reveals only when the proof checks.
* The server verifies each reveal. An invalid one (the signature checks, the proof does not) is
  non-repudiable evidence that ``h`` is dishonest (an honest site's proof always checks; anyone can
  check it: :func:`check_reveal`): ``h`` is
  a proven cheat, and the mask between ``h`` and ``c`` is removed with ``c``'s key if ``threshold``
  of its key shares were revealed; else the round ends, with ``h`` proven. So a cheat alone no
  longer ends a round: that also takes a holder that accepted its shares and then reveals a bad
  element, withholds it, or drops out at unmask, while fewer than ``threshold`` holders can rebuild
  the cheat's key (a withheld element or a dropout is not provable, like any silence).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.secagg.errors import PayloadError, ProtocolError
from common.secagg.group import ELEMENT_BYTES, G, P, Q, element_from_bytes, element_to_bytes, exp, exp_g, product
from common.secagg.identity import SIGNATURE_BYTES, SignedKeyBundle, SiteIdentity
from common.secagg.prg import encode_context
from common.secagg.protocol import SecAggParams
from common.secagg.vss import Commitments

__all__ = [
    "PROOF_BYTES", "REVEAL_BYTES", "KeyReveal", "check_reveal", "key_proof_ok", "prove_key", "prove_shared",
    "shared_proof_ok",
]

_CHALLENGE_BYTES = 32
PROOF_BYTES = _CHALLENGE_BYTES + ELEMENT_BYTES
"""A proof: the challenge ``e`` (SHA-256), then the response ``z`` (modulo Q)."""
REVEAL_BYTES = ELEMENT_BYTES + PROOF_BYTES + SIGNATURE_BYTES
"""A :class:`KeyReveal` on the wire: the element, the proof, the revealer's signature."""

_Statement = Sequence[tuple[int, int]]  # (base, value) pairs that share one discrete log


def _challenge(context: bytes, statement: _Statement, nonces: Sequence[int]) -> int:
    elements = [element_to_bytes(e) for pair in statement for e in pair] + [element_to_bytes(a) for a in nonces]
    return int.from_bytes(hashlib.sha256(encode_context("dleq", context, *elements)).digest(), "big")


def _power(base: int, exponent: int) -> int:
    return exp_g(exponent) if base == G else exp(base, exponent)


def _prove(secret: int, statement: _Statement, context: bytes) -> bytes:
    """Prove that ``value == base^secret`` for every pair of ``statement``, with one log."""
    nonce = secrets.randbelow(Q)
    challenge = _challenge(context, statement, [_power(base, nonce) for base, _ in statement])
    response = (nonce + challenge * secret) % Q
    return challenge.to_bytes(_CHALLENGE_BYTES, "big") + element_to_bytes(response)


def _verify(proof: bytes, statement: _Statement, context: bytes) -> bool:
    """Whether ``proof`` (from :func:`_prove`) shows one log for every pair of ``statement``."""
    if len(proof) != PROOF_BYTES:
        return False
    challenge = int.from_bytes(proof[:_CHALLENGE_BYTES], "big")
    response = int.from_bytes(proof[_CHALLENGE_BYTES:], "big")
    if response >= Q:
        return False
    nonces = [product([_power(base, response), pow(exp(value, challenge), -1, P)]) for base, value in statement]
    return challenge == _challenge(context, statement, nonces)


def prove_key(secret: int, public: int, params_digest: bytes, site: int) -> bytes:
    """A dealer's proof that it knows ``secret = log_G(public)``, its mask-agreement key (Schnorr)."""
    return _prove(secret, [(G, public)], encode_context("key-proof", params_digest, site))


def key_proof_ok(proof: bytes, public: int, params_digest: bytes, site: int) -> bool:
    """Whether ``proof`` shows that ``site`` knows the log of its mask public key ``public``."""
    return _verify(proof, [(G, public)], encode_context("key-proof", params_digest, site))


def _shared_context(params_digest: bytes, holder: int, dealer: int) -> bytes:
    return encode_context("shared-element", params_digest, holder, dealer)


def prove_shared(secret: int, own_public: int, other_public: int, params_digest: bytes, holder: int,
                 dealer: int) -> tuple[int, bytes]:
    """``(K, proof)``: the element ``K = other_public^secret`` that ``holder`` shares with ``dealer``
    and a proof that ``log_G(own_public) == log_{other_public}(K)``."""
    shared = exp(other_public, secret)
    proof = _prove(secret, [(G, own_public), (other_public, shared)], _shared_context(params_digest, holder, dealer))
    return shared, proof


def shared_proof_ok(proof: bytes, shared: int, own_public: int, other_public: int, params_digest: bytes,
                    holder: int, dealer: int) -> bool:
    """Whether ``proof`` shows that ``shared`` is ``other_public`` raised to ``holder``'s key."""
    return _verify(proof, [(G, own_public), (other_public, shared)], _shared_context(params_digest, holder, dealer))


def _reveal_message(params_digest: bytes, holder: int, dealer: int, shared: int, proof: bytes) -> bytes:
    return encode_context("key-reveal", params_digest, holder, dealer, element_to_bytes(shared), proof)


@dataclass(frozen=True)
class KeyReveal:
    """``holder``'s element shared with the proven cheat ``dealer``, its proof, and ``holder``'s
    identity signature on both (so an invalid proof is evidence against the holder)."""

    holder: int
    dealer: int
    shared: int
    proof: bytes
    signature: bytes

    @classmethod
    def make(cls, identity: SiteIdentity, secret: int, own_public: int, other_public: int, params_digest: bytes,
             holder: int, dealer: int) -> KeyReveal:
        """Compute, prove and sign the element ``holder`` shares with ``dealer``."""
        shared, proof = prove_shared(secret, own_public, other_public, params_digest, holder, dealer)
        signature = identity.private_key.sign(_reveal_message(params_digest, holder, dealer, shared, proof))
        return cls(holder, dealer, shared, proof, signature)

    def signature_ok(self, holder_key: Ed25519PublicKey, params_digest: bytes) -> bool:
        """Whether ``holder_key`` (the holder's REGISTERED identity key) signed this reveal in this round."""
        try:
            holder_key.verify(self.signature, _reveal_message(params_digest, self.holder, self.dealer, self.shared,
                                                              self.proof))
        except InvalidSignature:
            return False
        return True

    def proof_ok(self, own_public: int, other_public: int, params_digest: bytes) -> bool:
        """Whether the proof shows ``shared == other_public^{log_G(own_public)}``."""
        return shared_proof_ok(self.proof, self.shared, own_public, other_public, params_digest, self.holder,
                               self.dealer)

    def to_bytes(self) -> bytes:
        """:data:`REVEAL_BYTES`: element, proof, signature (the ids travel with it in the response)."""
        return element_to_bytes(self.shared) + self.proof + self.signature

    @classmethod
    def from_bytes(cls, data: bytes, holder: int, dealer: int) -> KeyReveal:
        """Parse :meth:`to_bytes` output; a wrong size or a non-element is a :class:`PayloadError`."""
        if len(data) != REVEAL_BYTES:
            raise PayloadError(f"a key reveal must be {REVEAL_BYTES} bytes")
        shared = element_from_bytes(data[:ELEMENT_BYTES])
        return cls(holder, dealer, shared, data[ELEMENT_BYTES:ELEMENT_BYTES + PROOF_BYTES],
                   data[ELEMENT_BYTES + PROOF_BYTES:])


def check_reveal(reveal: KeyReveal, params: SecAggParams, holder_key: Ed25519PublicKey,
                 bundles: tuple[SignedKeyBundle, SignedKeyBundle],
                 commitments: tuple[Commitments, Commitments]) -> None:
    """Raise :class:`ProtocolError` unless ``reveal`` proves its holder dishonest in this round: signed
    with ``holder_key`` (its REGISTERED identity key), with a proof that fails between the mask public
    keys of the holder's and the dealer's signed commitments. ``bundles`` and ``commitments`` are the
    holder's then the dealer's; both bundles already verified against their sites' registered keys."""
    for site, bundle, committed in zip((reveal.holder, reveal.dealer), bundles, commitments, strict=True):
        if bundle.site_id != site or bundle.params_digest != params.digest:
            raise ProtocolError("reveal is checked against another site's or round's key bundle")
        if committed.digest != bundle.commitments_digest:
            raise ProtocolError("reveal is checked against commitments the site did not sign")
    if not reveal.signature_ok(holder_key, params.digest):
        raise ProtocolError(f"the reveal is not signed by site {reveal.holder}")
    if reveal.proof_ok(commitments[0].mask_public, commitments[1].mask_public, params.digest):
        raise ProtocolError(f"site {reveal.holder}'s reveal of the element it shares with site {reveal.dealer} "
                            "checks: no cheating proven")
