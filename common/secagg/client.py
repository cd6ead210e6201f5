"""Client side of the protocol: one :class:`ClientSession` per site and round, four stages.

Stages must be called in order; each is a method. A peer that misbehaves (bad signature,
tampered share) is logged and treated as dropped; a server request that could leak an input
(contradictory, replayed, too few survivors) is refused with :class:`ProtocolError`, after which
the session is over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.errors import ParameterError, PayloadError, ProtocolError, SecAggError
from common.secagg.fixedpoint import clip_l2, pack_bits, quantize
from common.secagg.identity import (
    SignedKeyBundle,
    SiteIdentity,
    decrypt_from_peer,
    encrypt_for_peer,
    sign_key_bundle,
    verify_key_bundle,
    x25519_shared_secret,
)
from common.secagg.messages import MaskedUpload, UnmaskRequest, UnmaskResponse
from common.secagg.prg import (
    expand_mask,
    new_self_seed,
    pairwise_mask_context,
    pairwise_seed,
    seed_commitment,
    self_mask_context,
)
from common.secagg.protocol import SecAggParams, Stage
from common.secagg.shamir import SHARE_BYTES, Share, split

__all__ = ["ClientSession"]

log = logging.getLogger(__name__)


class ClientSession:
    """One site's state for one round. Not thread-safe; persist it between stages with
    :meth:`export_state` when stages run in separate processes."""

    def __init__(
        self,
        params: SecAggParams,
        site_id: int,
        identity: SiteIdentity,
        registry: Mapping[int, Ed25519PublicKey],
    ) -> None:
        self.params = params
        self.site_id = site_id
        self._neighbours = params.neighbours(site_id)
        self._identity = identity
        self._registry = registry
        self._stage = Stage.NEW
        self._share_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = new_self_seed()
        self._peers: dict[int, SignedKeyBundle] = {}
        self._held_seed: dict[int, Share] = {}
        self._held_key: dict[int, Share] = {}
        self._masked_with: frozenset[int] = frozenset()

    @property
    def stage(self) -> Stage:
        """The last completed stage (or ``ABORTED``)."""
        return self._stage

    @property
    def masked_with(self) -> frozenset[int]:
        """Neighbours whose pairwise masks this site added at stage 3."""
        return self._masked_with

    @contextmanager
    def _stage_guard(self, expected: Stage, name: str) -> Iterator[None]:
        if self._stage is not expected:
            kind = "replayed" if self._stage is Stage.DONE else "out-of-order"
            log.warning("site %d refused %s %s call (stage is %s)", self.site_id, kind, name, self._stage.name)
            raise ProtocolError(f"{kind} {name}: session is at stage {self._stage.name}")
        try:
            yield
        except BaseException:
            self._abort()
            raise
        self._stage = Stage(expected + 1)

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._forget_secrets()

    def _forget_secrets(self) -> None:
        self._held_seed.clear()
        self._held_key.clear()
        self._self_seed = b""

    # ------------------------------------------------------------------ stage 1
    def advertise_keys(self) -> SignedKeyBundle:
        """Stage 1: this round's two X25519 public keys, signed with the identity key."""
        with self._stage_guard(Stage.NEW, "advertise_keys"):
            return sign_key_bundle(
                self._identity,
                round_id=self.params.round_id,
                site_id=self.site_id,
                share_public=self._share_key.public_key().public_bytes_raw(),
                mask_public=self._mask_key.public_key().public_bytes_raw(),
                seed_commitment=seed_commitment(self._self_seed, self.params.round_id, self.site_id),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, bundles: Mapping[int, SignedKeyBundle | bytes]) -> dict[int, bytes]:
        """Stage 2: verify neighbours' bundles, Shamir-share the self-mask seed and the mask key.

        Returns one AEAD ciphertext per neighbour with a valid bundle. Neighbours with a missing,
        malformed or wrongly signed bundle are logged and treated as dropped.
        """
        with self._stage_guard(Stage.ADVERTISED, "share_keys"):
            params = self.params
            for peer in sorted(self._neighbours):
                raw = bundles.get(peer)
                if raw is None:
                    continue
                try:
                    bundle = SignedKeyBundle.from_bytes(raw) if isinstance(raw, bytes) else raw
                    verify_key_bundle(bundle, self._registry, round_id=params.round_id, site_id=peer)
                except SecAggError as exc:
                    log.warning("site %d: neighbour %d treated as dropped: %s", self.site_id, peer, exc)
                    continue
                self._peers[peer] = bundle
            holders = [*sorted(self._peers), self.site_id]
            self._require_holders(len(holders), "valid neighbour key bundles")
            xs = [h + 1 for h in holders]
            seed_shares = split(self._self_seed, xs, params.threshold)
            key_shares = split(self._mask_key.private_bytes_raw(), xs, params.threshold)
            out: dict[int, bytes] = {}
            for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
                if holder == self.site_id:
                    self._held_seed[holder], self._held_key[holder] = seed_share, key_share
                    continue
                plaintext = (
                    self.site_id.to_bytes(4, "big") + holder.to_bytes(4, "big")
                    + seed_share.to_bytes() + key_share.to_bytes()
                )
                out[holder] = encrypt_for_peer(
                    self._share_key, self._peers[holder].share_public, round_id=params.round_id,
                    sender=self.site_id, receiver=holder, plaintext=plaintext,
                )
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    def _require_holders(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise ProtocolError(
                f"site {self.site_id}: only {count - 1} {what}; threshold {self.params.threshold} "
                "needs at least threshold - 1"
            )

    # ------------------------------------------------------------------ stage 3
    def masked_input(
        self, ciphertexts: Mapping[int, bytes], update: npt.ArrayLike, counts: Sequence[int] = ()
    ) -> bytes:
        """Stage 3: decrypt received shares, then quantise, mask and pack the contribution.

        ``update`` has ``vector_length`` floats and is L2-clipped to ``clip`` here if needed
        (callers should already have clipped it); ``counts`` has ``count_slots`` integers in
        ``[0, max_count]``. Pairwise masks are added only for neighbours whose shares arrived
        intact (the returned upload lists them).
        """
        with self._stage_guard(Stage.SHARED, "masked_input"):
            params = self.params
            values = self._encode(update, counts)
            for sender in sorted(ciphertexts):
                if sender not in self._peers:
                    log.warning("site %d: ignoring shares from non-peer %d", self.site_id, sender)
                    continue
                try:
                    self._accept_shares(sender, ciphertexts[sender])
                except SecAggError as exc:
                    log.warning("site %d: shares of %d rejected, treated as dropped: %s", self.site_id, sender, exc)
            partners = frozenset(self._held_seed) - {self.site_id}
            self._require_holders(len(partners) + 1, "neighbours with valid shares")
            mask = np.uint64(params.modulus_mask)
            length, bits = params.total_length, params.modulus_bits
            masked = values + expand_mask(
                self._self_seed, length, bits, self_mask_context(params.round_id, self.site_id)
            )
            for peer in sorted(partners):
                shared = x25519_shared_secret(self._mask_key, self._peers[peer].mask_public)
                seed = pairwise_seed(shared, params.round_id, self.site_id, peer)
                pair = expand_mask(seed, length, bits, pairwise_mask_context(params.round_id, self.site_id, peer))
                masked = masked + pair if self.site_id < peer else masked - pair
            masked &= mask
            self._masked_with = partners
            return MaskedUpload(self.site_id, partners, pack_bits(masked, bits)).to_bytes(params)
        raise AssertionError("unreachable")  # pragma: no cover

    def _encode(self, update: npt.ArrayLike, counts: Sequence[int]) -> npt.NDArray[np.uint64]:
        params = self.params
        vec = np.asarray(update).ravel()
        if vec.shape[0] != params.vector_length:
            raise ParameterError(f"update has {vec.shape[0]} values, expected {params.vector_length}")
        clipped, scaled = clip_l2(vec, params.clip)
        if scaled:
            log.warning("site %d: update L2 norm exceeded clip %g and was scaled down", self.site_id, params.clip)
        if len(counts) != params.count_slots:
            raise ParameterError(f"got {len(counts)} counts, expected {params.count_slots}")
        if any(int(c) != c or not 0 <= c <= params.max_count for c in counts):
            raise ParameterError(f"counts must be integers in [0, {params.max_count}]")
        q = quantize(clipped, value_bits=params.value_bits, clip=params.clip, rounding=params.rounding)
        return np.concatenate([q, np.asarray([int(c) for c in counts], dtype=np.uint64)])

    def _accept_shares(self, sender: int, ciphertext: bytes) -> None:
        plaintext = decrypt_from_peer(
            self._share_key, self._peers[sender].share_public, round_id=self.params.round_id,
            sender=sender, receiver=self.site_id, ciphertext=ciphertext,
        )
        if len(plaintext) != 8 + 2 * SHARE_BYTES:
            raise PayloadError("share plaintext has the wrong length")
        if plaintext[:8] != sender.to_bytes(4, "big") + self.site_id.to_bytes(4, "big"):
            raise PayloadError("share plaintext names the wrong sender or receiver")
        seed_share = Share.from_bytes(plaintext[8:8 + SHARE_BYTES])
        key_share = Share.from_bytes(plaintext[8 + SHARE_BYTES:])
        if seed_share.x != self.site_id + 1 or key_share.x != self.site_id + 1:
            raise PayloadError("share is not addressed to this site's x-coordinate")
        self._held_seed[sender], self._held_key[sender] = seed_share, key_share

    # ------------------------------------------------------------------ stage 4
    def unmask(self, request: UnmaskRequest | bytes) -> UnmaskResponse:
        """Stage 4: reveal, per neighbour, the self-mask share (survivor) OR the key share (dropped).

        Answered at most once per round. Refused (:class:`ProtocolError`, logged, session over)
        when the request is for another round or site, lists a site as both survivor and
        dropped, lists a non-neighbour, names this site as dropped, or has fewer than
        ``threshold`` survivors in this site's neighbourhood.
        """
        with self._stage_guard(Stage.MASKED, "unmask"):
            req = UnmaskRequest.from_bytes(request) if isinstance(request, bytes) else request
            self._check_request(req)
            response = UnmaskResponse(
                round_id=self.params.round_id,
                site_id=self.site_id,
                self_mask_shares={o: s.to_bytes() for o, s in self._held_seed.items() if o in req.survivors},
                key_shares={o: s.to_bytes() for o, s in self._held_key.items() if o in req.dropped},
            )
            self._forget_secrets()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_request(self, req: UnmaskRequest) -> None:
        problem = None
        if req.round_id != self.params.round_id or req.site_id != self.site_id:
            problem = "request is for another round or site"
        elif req.survivors & req.dropped:
            problem = f"sites {sorted(req.survivors & req.dropped)} listed as both survived and dropped"
        elif self.site_id not in req.survivors:
            problem = "this site is not listed as a survivor"
        elif not req.survivors <= self._neighbours | {self.site_id} or not req.dropped <= self._neighbours:
            problem = "request lists sites that are not neighbours"
        elif len(req.survivors) < self.params.threshold:
            problem = f"{len(req.survivors)} survivors is below the threshold {self.params.threshold}"
        if problem:
            log.warning("site %d refused unmask request: %s", self.site_id, problem)
            raise ProtocolError(f"unmask request refused: {problem}")

    # ------------------------------------------------------------------ persistence
    def export_state(self) -> bytes:
        """Serialise the session, secrets included, for local storage between stages.

        The blob holds private keys: keep it on the site (e.g. Flower's node-local context
        state), never send it. Persist it after every stage, or a replay check is lost.
        """
        def shares(d: dict[int, Share]) -> dict[str, str]:
            return {str(k): v.to_bytes().hex() for k, v in d.items()}

        return json.dumps({
            "round_id": self.params.round_id.hex(),
            "site_id": self.site_id,
            "stage": int(self._stage),
            "share_key": self._share_key.private_bytes_raw().hex(),
            "mask_key": self._mask_key.private_bytes_raw().hex(),
            "self_seed": self._self_seed.hex(),
            "peers": {str(k): v.to_bytes().hex() for k, v in self._peers.items()},
            "held_seed": shares(self._held_seed),
            "held_key": shares(self._held_key),
            "masked_with": sorted(self._masked_with),
        }).encode()

    @classmethod
    def from_state(
        cls, params: SecAggParams, identity: SiteIdentity, registry: Mapping[int, Ed25519PublicKey], state: bytes
    ) -> ClientSession:
        """Restore a session saved by :meth:`export_state` (same params, identity and registry)."""
        data = json.loads(state)
        if bytes.fromhex(data["round_id"]) != params.round_id:
            raise ProtocolError("saved session is for another round")
        session = cls(params, int(data["site_id"]), identity, registry)
        session._stage = Stage(data["stage"])
        session._share_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(data["share_key"]))
        session._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(data["mask_key"]))
        session._self_seed = bytes.fromhex(data["self_seed"])
        session._peers = {int(k): SignedKeyBundle.from_bytes(bytes.fromhex(v)) for k, v in data["peers"].items()}
        session._held_seed = {int(k): Share.from_bytes(bytes.fromhex(v)) for k, v in data["held_seed"].items()}
        session._held_key = {int(k): Share.from_bytes(bytes.fromhex(v)) for k, v in data["held_key"].items()}
        session._masked_with = frozenset(data["masked_with"])
        return session
