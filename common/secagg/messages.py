"""Wire formats of the messages that client and server exchange (one place packs and unpacks).

Stage 1 sends a :class:`~common.secagg.identity.SignedKeyBundle`; stage 2 a :class:`Deal` up (the
dealer's commitments, its proof that it knows its mask key, and one opaque AEAD ciphertext per
holder) and, to each holder, each dealer's ciphertext followed by its commitments; stage 3 a
:class:`MaskedUpload` (with proofs against dealers whose shares failed their commitments); stage 4
(consistency) a :class:`SurvivorSet` down and a 64-byte signature up; stage 5 one
:class:`UnmaskRequest` (the same for every site, with the evidence against each proven cheat) down
and an :class:`UnmaskResponse` (with signed key reveals for proven cheats, common.secagg.dleq) up.
All integers are big-endian; id lists are sorted and unique. Every parser takes untrusted input: a
non-bytes value or any malformation is a :class:`PayloadError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from common.secagg.dleq import PROOF_BYTES, REVEAL_BYTES
from common.secagg.errors import PayloadError
from common.secagg.fixedpoint import check_packed
from common.secagg.identity import SIGNATURE_BYTES
from common.secagg.proof import CheatProof
from common.secagg.protocol import SecAggParams
from common.secagg.shamir import SHARE_BYTES
from common.secagg.vss import KINDS

__all__ = [
    "SHARE_CIPHERTEXT_BYTES", "SHARE_PLAINTEXT_BYTES", "SIGNED_SHARE_BYTES", "Deal", "MaskedUpload", "ProvenCheat",
    "SurvivorSet", "UnmaskRequest", "UnmaskResponse",
]

_DEAL_MAGIC = b"FSD2"
_UPLOAD_MAGIC = b"FSU2"
_SURVIVORS_MAGIC = b"FSS1"
_REQUEST_MAGIC = b"FSQ4"
_RESPONSE_MAGIC = b"FSR4"
SIGNED_SHARE_BYTES = SHARE_BYTES + SIGNATURE_BYTES
"""A revealed share: the Shamir share then its dealer's signature."""
SHARE_PLAINTEXT_BYTES = 8 + len(KINDS) * SIGNED_SHARE_BYTES
"""What a dealer encrypts to one holder: dealer and holder ids, then its signed seed and key shares."""
SHARE_CIPHERTEXT_BYTES = 12 + SHARE_PLAINTEXT_BYTES + 16
"""Exact size of one stage-2 ciphertext: nonce, plaintext, AEAD tag."""


def _ids_to_bytes(ids: Iterable[int]) -> bytes:
    ordered = sorted(ids)
    return len(ordered).to_bytes(4, "big") + b"".join(i.to_bytes(4, "big") for i in ordered)


def _head(magic: bytes, round_id: bytes) -> bytes:
    """Every round message starts with its magic and the length-prefixed round id."""
    return magic + len(round_id).to_bytes(2, "big") + round_id


class _Reader:
    """Bounds-checked cursor over a payload; every shortfall is a :class:`PayloadError`."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, bytes):
            raise PayloadError(f"{what} is {type(data).__name__}, not bytes")
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PayloadError(f"{self.what} is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int = 4) -> int:
        return int.from_bytes(self.take(n), "big")

    def ids(self) -> frozenset[int]:
        count = self.uint()
        raw = self.take(4 * count)
        ids = [int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(count)]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise PayloadError(f"{self.what} has an unsorted or duplicated id list")
        return frozenset(ids)

    def magic(self, magic: bytes) -> None:
        if self.take(len(magic)) != magic:
            raise PayloadError(f"{self.what} has a bad header")

    def head(self, magic: bytes) -> bytes:
        """The magic, then the round id (see :func:`_head`)."""
        self.magic(magic)
        return self.take(self.uint(2))

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.data):
            raise PayloadError(f"{self.what} has {len(self.data) - self.pos} trailing bytes")


@dataclass(frozen=True)
class Deal:
    """Stage-2 reply: the dealer's Feldman commitments (encoded, common.secagg.vss.Commitments), one
    :data:`SHARE_CIPHERTEXT_BYTES` ciphertext per holder, and the dealer's :data:`PROOF_BYTES` proof
    that it knows its mask key (common.secagg.dleq.prove_key)."""

    round_id: bytes
    commitments: bytes
    ciphertexts: Mapping[int, bytes]
    key_proof: bytes

    def to_bytes(self) -> bytes:
        """Wire encoding: holders in id order."""
        out = bytearray(_head(_DEAL_MAGIC, self.round_id))
        out += len(self.commitments).to_bytes(4, "big") + self.commitments + self.key_proof
        out += len(self.ciphertexts).to_bytes(4, "big")
        for holder in sorted(self.ciphertexts):
            out += holder.to_bytes(4, "big") + self.ciphertexts[holder]
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Deal:
        """Parse :meth:`to_bytes` output (the commitments are parsed and checked by their users)."""
        reader = _Reader(data, "deal")
        round_id = reader.head(_DEAL_MAGIC)
        commitments = reader.take(reader.uint())
        key_proof = reader.take(PROOF_BYTES)
        ciphertexts: dict[int, bytes] = {}
        for _ in range(reader.uint()):
            holder = reader.uint()
            if ciphertexts and holder <= max(ciphertexts):
                raise PayloadError("deal has unsorted or repeated holder ids")
            ciphertexts[holder] = reader.take(SHARE_CIPHERTEXT_BYTES)
        reader.end()
        return cls(round_id, commitments, ciphertexts, key_proof)


@dataclass(frozen=True)
class MaskedUpload:
    """Stage-3 upload: the packed masked vector, the neighbours whose pairwise masks it holds, and
    a proof against each dealer whose shares this site rejected because they failed the dealer's
    commitments (the proofs' holder is ``site_id``)."""

    site_id: int
    masked_with: frozenset[int]
    body: bytes
    accusations: tuple[CheatProof, ...] = ()

    def to_bytes(self, params: SecAggParams) -> bytes:
        """Header (magic, round tag, site id, neighbour ids, proofs by dealer) then the packed vector."""
        out = bytearray(_UPLOAD_MAGIC + params.round_tag + self.site_id.to_bytes(4, "big"))
        out += _ids_to_bytes(self.masked_with) + len(self.accusations).to_bytes(4, "big")
        for proof in sorted(self.accusations, key=lambda p: p.dealer):
            out += proof.dealer.to_bytes(4, "big") + bytes([KINDS.index(proof.kind)]) + proof.share + proof.signature
        return bytes(out + self.body)

    @classmethod
    def from_bytes(cls, data: bytes, params: SecAggParams) -> MaskedUpload:
        """Parse and check header and size; the body is unpacked later by the server, the proofs checked."""
        reader = _Reader(data, "masked upload")
        reader.magic(_UPLOAD_MAGIC)
        if reader.take(16) != params.round_tag:
            raise PayloadError("masked upload is for another round")
        site_id = reader.uint()
        masked_with = reader.ids()
        proofs: list[CheatProof] = []
        for _ in range(reader.uint()):
            dealer, kind = reader.uint(), reader.uint(1)
            if kind >= len(KINDS) or (proofs and dealer <= proofs[-1].dealer):
                raise PayloadError("masked upload has a proof of a bad kind, or unsorted or repeated dealers")
            proofs.append(CheatProof(dealer, site_id, KINDS[kind], reader.take(SHARE_BYTES),
                                     reader.take(SIGNATURE_BYTES)))
        body = reader.rest()
        check_packed(body, params.total_length, params.modulus_bits)
        return cls(site_id, masked_with, body, tuple(proofs))


@dataclass(frozen=True)
class SurvivorSet:
    """Consistency round: the sites whose masked inputs are in the sum, the same list for all."""

    round_id: bytes
    survivors: frozenset[int]

    def to_bytes(self) -> bytes:
        """Wire encoding."""
        return _head(_SURVIVORS_MAGIC, self.round_id) + _ids_to_bytes(self.survivors)

    @classmethod
    def from_bytes(cls, data: bytes) -> SurvivorSet:
        """Parse :meth:`to_bytes` output."""
        reader = _Reader(data, "survivor set")
        round_id = reader.head(_SURVIVORS_MAGIC)
        survivors = reader.ids()
        reader.end()
        return cls(round_id, survivors)


@dataclass(frozen=True)
class ProvenCheat:
    """What a holder needs to check, itself, that ``proof.dealer`` is a proven cheat before it reveals
    the element it shares with it: the proof (common.secagg.proof), the dealer's encoded commitments
    (checked against the digest the dealer signed) and its proof that it knows its mask key."""

    proof: CheatProof
    commitments: bytes
    key_proof: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Unmask request, identical for every site: the global survivor set, the consistency-round
    signatures collected on it, and the evidence against each cheat proven at stage 3 that some
    survivor masked with. Each site derives its own survivors/dropped lists from them."""

    round_id: bytes
    survivors: frozenset[int]
    signatures: Mapping[int, bytes]
    cheats: tuple[ProvenCheat, ...] = ()

    def to_bytes(self) -> bytes:
        """Wire encoding: proven cheats in dealer order, each proof then length-prefixed commitments."""
        out = bytearray(_head(_REQUEST_MAGIC, self.round_id))
        out += _ids_to_bytes(self.survivors) + _ids_to_bytes(self.signatures)
        for signer in sorted(self.signatures):
            out += self.signatures[signer]
        out += len(self.cheats).to_bytes(4, "big")
        for cheat in sorted(self.cheats, key=lambda c: c.proof.dealer):
            proof = cheat.proof
            out += proof.dealer.to_bytes(4, "big") + proof.holder.to_bytes(4, "big") + bytes([KINDS.index(proof.kind)])
            out += proof.share + proof.signature + len(cheat.commitments).to_bytes(4, "big") + cheat.commitments
            out += cheat.key_proof
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parse :meth:`to_bytes` output (the evidence is checked by each site, commitments included)."""
        reader = _Reader(data, "unmask request")
        round_id = reader.head(_REQUEST_MAGIC)
        survivors, signers = reader.ids(), reader.ids()
        signatures = {signer: reader.take(SIGNATURE_BYTES) for signer in sorted(signers)}
        cheats: list[ProvenCheat] = []
        for _ in range(reader.uint()):
            dealer, holder, kind = reader.uint(), reader.uint(), reader.uint(1)
            if kind >= len(KINDS) or (cheats and dealer <= cheats[-1].proof.dealer):
                raise PayloadError("unmask request has a proof of a bad kind, or unsorted or repeated dealers")
            proof = CheatProof(dealer, holder, KINDS[kind], reader.take(SHARE_BYTES), reader.take(SIGNATURE_BYTES))
            cheats.append(ProvenCheat(proof, reader.take(reader.uint()), reader.take(PROOF_BYTES)))
        reader.end()
        return cls(round_id, survivors, signatures, tuple(cheats))


@dataclass(frozen=True)
class UnmaskResponse:
    """Unmask answer: revealed shares held by ``site_id``, keyed by their owner, each
    :data:`SIGNED_SHARE_BYTES` long (share then the owner's signature on it), and for each proven
    cheat of the request that this site masked with, a :data:`REVEAL_BYTES` key reveal
    (common.secagg.dleq.KeyReveal: the element they share, its proof, this site's signature).

    ``self_mask_shares`` are for survivors, ``key_shares`` (mask-agreement keys) for dropped
    sites, proven cheats among them; an owner never appears in both, nor a survivor in ``reveals``.
    """

    round_id: bytes
    site_id: int
    self_mask_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]
    reveals: Mapping[int, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Wire encoding."""
        out = bytearray(_head(_RESPONSE_MAGIC, self.round_id))
        out += self.site_id.to_bytes(4, "big")
        for shares in (self.self_mask_shares, self.key_shares, self.reveals):
            out += len(shares).to_bytes(4, "big")
            for owner in sorted(shares):
                out += owner.to_bytes(4, "big") + shares[owner]
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        """Parse :meth:`to_bytes` output (shares, signatures and proofs are checked by the server later)."""
        reader = _Reader(data, "unmask response")
        round_id = reader.head(_RESPONSE_MAGIC)
        site_id = reader.uint()
        parts: list[dict[int, bytes]] = []
        for size in (SIGNED_SHARE_BYTES, SIGNED_SHARE_BYTES, REVEAL_BYTES):
            shares: dict[int, bytes] = {}
            for _ in range(reader.uint()):
                owner = reader.uint()
                if owner in shares:
                    raise PayloadError("unmask response repeats an owner")
                shares[owner] = reader.take(size)
            parts.append(shares)
        reader.end()
        if parts[0].keys() & (parts[1].keys() | parts[2].keys()):
            raise PayloadError("unmask response reveals both secrets of one owner, or a survivor's shared element")
        return cls(round_id, site_id, parts[0], parts[1], parts[2])
