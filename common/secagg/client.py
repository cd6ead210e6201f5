"""Client side of the protocol: one :class:`ClientSession` per site and round, five stages.

    NEW --advertise_keys--> ADVERTISED --share_keys--> SHARED --masked_input--> MASKED
        --confirm_survivors--> CONFIRMED --unmask--> DONE          (any refusal: ABORTED)

Stages must be called in order, each at most once. A peer that misbehaves (bad signature,
tampered share, a share off its commitments) is logged and treated as dropped; a server request
that could leak an input (another round or parameters, a survivor set other than the one this site
signed, too few signatures or survivors) is refused with :class:`ProtocolError`, after which the
session is over and every secret wiped.

Verifiable shares (common.secagg.vss): at stage 1 a site fixes both sharing polynomials (its
secrets drawn with :mod:`secrets`, the other coefficients from a dealing key kept in the session)
and signs the digest of their Feldman commitments; at stage 3 each holder checks every share
against its dealer's commitments BEFORE masking with the dealer (whose mask public key is the
commitments' first key element), masks only with dealers whose shares check, and uploads the
dealer's own signed share as the proof against each dealer whose share does not
(common.secagg.proof). Hence any ``threshold`` shares an honest holder reveals open exactly the
committed secret: a dealer cannot make the round fail at unmask. A dealer proven at stage 3 that
dealt good shares to fewer than ``threshold`` holders leaves a key nobody can rebuild: each holder
that masked with it reveals, at unmask, the Diffie-Hellman element they share, with a proof and
signed (common.secagg.dleq), but only for a dealer whose proof (its own signed share off its own
signed commitments) and proof of knowledge of its key this site checks itself.

Secret lifetime: every round secret (private keys, dealing key, every held share) is wiped when
unmask is answered, or at any refusal.

Why the consistency round is enough (Bonawitz et al. 2017, round 3): a site reveals shares only
for the ONE survivor set S it signed, backed by ``threshold`` signatures of its own share holders
on that same S, and it derives "survived" and "dropped" itself (S ∩ its mask partners, partners −
S). Every honest holder therefore answers for the same S, so no site's self-mask secret and mask
key are both revealed; and to strip a victim's pairwise masks a server must leave ALL the victim's
partners (at least t − 1) out of S, which leaves at most h − t < t holders able to return the
victim's seed share (t > h/2 for h holders; t > 2h/3 against colluders, see default_threshold).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.dleq import KeyReveal, key_proof_ok, prove_key
from common.secagg.errors import ParameterError, PayloadError, ProtocolError, SecAggError
from common.secagg.fixedpoint import clip_l2, pack_bits, quantize
from common.secagg.group import element_to_bytes, exp, new_secret
from common.secagg.identity import (
    SIGNATURE_BYTES,
    SignedKeyBundle,
    SiteIdentity,
    check_bundle_keys,
    decrypt_from_peer,
    encrypt_for_peer,
    share_signature_ok,
    sign_key_bundle,
    sign_share,
    sign_survivors,
    survivors_signature_ok,
    verify_key_bundle,
)
from common.secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
    SHARE_PLAINTEXT_BYTES,
    Deal,
    MaskedUpload,
    ProvenCheat,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from common.secagg.prg import expand_mask, pairwise_mask_context, pairwise_seed, self_mask_context, self_mask_seed
from common.secagg.proof import CheatProof, check_proof
from common.secagg.protocol import SecAggParams, Stage, graph_seed
from common.secagg.shamir import SHARE_BYTES, Share, evaluate
from common.secagg.vss import KINDS, Commitments, commitments_digest, polynomial, share_ok, shares_ok

__all__ = ["ClientSession"]

log = logging.getLogger(__name__)

_Held = tuple[Share, bytes]  # a share dealt to this site and its dealer's signature on it
_DEALING_KEY_BYTES = 32


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
        if site_id not in params.site_ids:
            raise ParameterError(f"site {site_id} is not part of round {params.round_id!r}")
        self.params = params
        self.site_id = site_id
        self._identity = identity
        self._registry = registry
        self._stage = Stage.NEW
        self._share_key: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._secrets: dict[str, int] = {kind: new_secret() for kind in KINDS}  # self-mask secret b, mask key s
        self._dealing_key = secrets.token_bytes(_DEALING_KEY_BYTES)
        self._commitments: Commitments | None = None
        self._own_bundle: SignedKeyBundle | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._peers: dict[int, SignedKeyBundle] = {}
        self._held_seed: dict[int, _Held] = {}
        self._held_key: dict[int, _Held] = {}
        self._masked_with: frozenset[int] = frozenset()
        self._confirmed: frozenset[int] | None = None

    @property
    def stage(self) -> Stage:
        """The last completed stage (or ``ABORTED``)."""
        return self._stage

    @property
    def masked_with(self) -> frozenset[int]:
        """Neighbours whose pairwise masks this site added at stage 3."""
        return self._masked_with

    @property
    def neighbours(self) -> frozenset[int]:
        """This site's neighbours in the round's graph (known after :meth:`share_keys`)."""
        return self._neighbours

    @property
    def holds_secrets(self) -> bool:
        """Whether any round secret (private keys, dealing key, held shares) is still in memory."""
        return self.holds_own_secrets or bool(self._held_seed or self._held_key)

    @property
    def holds_own_secrets(self) -> bool:
        """Whether this site's own round secrets (private keys, dealing key) are still in memory."""
        return bool(self._share_key or self._secrets or self._dealing_key)

    @contextmanager
    def _stage_guard(self, expected: Stage, name: str) -> Iterator[None]:
        if self._stage is not expected:
            kind = ("aborted-session" if self._stage is Stage.ABORTED
                    else "replayed" if self._stage > expected else "out-of-order")
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
        self._secrets.clear()
        self._dealing_key = b""
        self._share_key = None

    def _refuse(self, what: str, problem: str) -> None:
        log.warning("site %d refused %s: %s", self.site_id, what, problem)
        raise ProtocolError(f"{what} refused: {problem}")

    def _polynomial(self, kind: str) -> list[int]:
        """This site's ``kind`` sharing polynomial: the same every time it is asked for (deterministic dealing)."""
        return polynomial(self._secrets[kind], self._dealing_key, self.params.digest, kind, self.params.threshold)

    # ------------------------------------------------------------------ stage 1
    def advertise_keys(self) -> SignedKeyBundle:
        """Stage 1: fix both sharing polynomials and commit to them; sign the X25519 share key and the
        commitments' digest with the identity key over the digest of all round parameters."""
        with self._stage_guard(Stage.NEW, "advertise_keys"):
            assert self._share_key is not None
            self._commitments = Commitments.of_polynomials(self._polynomial("seed"), self._polynomial("key"))
            self._own_bundle = sign_key_bundle(
                self._identity,
                round_id=self.params.round_id,
                site_id=self.site_id,
                params_digest=self.params.digest,
                share_public=self._share_key.public_key().public_bytes_raw(),
                commitments_digest=self._commitments.digest,
            )
            return self._own_bundle
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, bundles: Mapping[int, SignedKeyBundle | bytes]) -> Deal:
        """Stage 2: verify the bundles, derive the graph, deal the shares of both secrets to the
        neighbours, each share signed by this site together with its commitments' digest.

        Complete graph: neighbours with a missing or invalid bundle are logged and treated as
        dropped. Sparse graph: the bundles of EVERY invited site are needed (their hash seeds the
        graph), else the stage is refused. Returns the commitments and one AEAD ciphertext per valid
        neighbour.
        """
        with self._stage_guard(Stage.ADVERTISED, "share_keys"):
            params = self.params
            valid: dict[int, SignedKeyBundle] = {}
            for peer in params.site_ids:
                if peer == self.site_id:
                    continue
                try:
                    valid[peer] = self._verified(peer, bundles.get(peer))
                except SecAggError as exc:
                    if not params.all_pairs:
                        self._refuse("share_keys", f"sparse graph needs every site's bundle: {exc}")
                    log.warning("site %d: neighbour %d treated as dropped: %s", self.site_id, peer, exc)
            if params.all_pairs:
                self._neighbours = frozenset(params.site_ids) - {self.site_id}
            else:
                assert self._own_bundle is not None
                everyone = {**valid, self.site_id: self._own_bundle}
                seed = graph_seed(params.digest, [everyone[s].to_bytes() for s in params.site_ids])
                self._neighbours = params.graph(seed)[self.site_id]
            for peer in sorted(self._neighbours & valid.keys()):
                try:
                    check_bundle_keys(valid[peer])
                except SecAggError as exc:
                    log.warning("site %d: neighbour %d treated as dropped: %s", self.site_id, peer, exc)
                    continue
                self._peers[peer] = valid[peer]
            holders = [*sorted(self._peers), self.site_id]
            self._require_holders(len(holders), "valid neighbour key bundles")
            return self._deal(holders)
        raise AssertionError("unreachable")  # pragma: no cover

    def _verified(self, peer: int, raw: SignedKeyBundle | bytes | None) -> SignedKeyBundle:
        if raw is None:
            raise PayloadError("no bundle")
        bundle = raw if isinstance(raw, SignedKeyBundle) else SignedKeyBundle.from_bytes(raw)
        verify_key_bundle(bundle, self._registry, round_id=self.params.round_id, site_id=peer,
                          params_digest=self.params.digest, check_keys=False)
        return bundle

    def _deal(self, holders: list[int]) -> Deal:
        params = self.params
        assert self._share_key is not None and self._commitments is not None
        xs = [h + 1 for h in holders]
        dealt = {kind: evaluate(self._polynomial(kind), xs) for kind in KINDS}
        out: dict[int, bytes] = {}
        for i, holder in enumerate(holders):
            signed = [
                (share, sign_share(self._identity, kind, params_digest=params.digest, dealer=self.site_id,
                                   holder=holder, commitments_digest=self._commitments.digest, share=share.to_bytes()))
                for kind, share in ((kind, dealt[kind][i]) for kind in KINDS)
            ]
            if holder == self.site_id:
                self._held_seed[holder], self._held_key[holder] = signed
                continue
            plaintext = self.site_id.to_bytes(4, "big") + holder.to_bytes(4, "big") + b"".join(
                share.to_bytes() + sig for share, sig in signed)
            out[holder] = encrypt_for_peer(
                self._share_key, self._peers[holder].share_public, round_id=params.round_id,
                sender=self.site_id, receiver=holder, plaintext=plaintext,
            )
        key_proof = prove_key(self._secrets["key"], self._commitments.mask_public, params.digest, self.site_id)
        return Deal(params.round_id, self._commitments.to_bytes(), out, key_proof)

    def _require_holders(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise ProtocolError(
                f"site {self.site_id}: only {count - 1} {what}; threshold {self.params.threshold} "
                "needs at least threshold - 1"
            )

    # ------------------------------------------------------------------ stage 3
    def masked_input(
        self, inbox: Mapping[int, bytes], update: npt.ArrayLike, counts: Sequence[int] = ()
    ) -> bytes:
        """Stage 3: check every received share against its dealer's commitments, then quantise, mask
        and pack the contribution.

        ``inbox`` maps each dealer to its ciphertext followed by its commitments (as the server
        relays them). ``update`` has ``vector_length`` floats and is L2-clipped to ``clip`` here if
        needed (callers should already have clipped it); ``counts`` has ``count_slots`` integers in
        ``[0, max_count]``. Pairwise masks are added only for dealers whose shares arrived intact,
        correctly signed and on their committed polynomials (the returned upload lists them); a
        dealer whose signed share is off its commitments is accused, with that share as the proof.
        """
        with self._stage_guard(Stage.SHARED, "masked_input"):
            params = self.params
            values = self._encode(update, counts)
            received: dict[int, tuple[list[_Held], Commitments]] = {}
            for sender in sorted(inbox):
                if sender not in self._peers:
                    log.warning("site %d: ignoring shares from non-peer %r", self.site_id, sender)
                    continue
                try:
                    received[sender] = self._open_shares(sender, inbox[sender])
                except SecAggError as exc:
                    log.warning("site %d: shares of %d rejected, treated as dropped: %s", self.site_id, sender, exc)
            accusations = self._check_commitments(received)
            for sender, (held, _) in received.items():
                self._held_seed[sender], self._held_key[sender] = held
            partners = frozenset(received)
            self._require_holders(len(partners) + 1, "neighbours with valid shares")
            length, bits, round_id = params.total_length, params.modulus_bits, params.round_id
            own_seed = self_mask_seed(element_to_bytes(self._secrets["seed"]), round_id, self.site_id)
            masked = values + expand_mask(own_seed, length, bits, self_mask_context(round_id, self.site_id))
            for peer in sorted(partners):
                shared = exp(received[peer][1].mask_public, self._secrets["key"])
                seed = pairwise_seed(element_to_bytes(shared), round_id, self.site_id, peer)
                pair = expand_mask(seed, length, bits, pairwise_mask_context(round_id, self.site_id, peer))
                masked = masked + pair if self.site_id < peer else masked - pair
            masked &= np.uint64(params.modulus_mask)
            self._masked_with = partners
            return MaskedUpload(self.site_id, partners, pack_bits(masked, bits), accusations).to_bytes(params)
        raise AssertionError("unreachable")  # pragma: no cover

    def _encode(self, update: npt.ArrayLike, counts: Sequence[int]) -> npt.NDArray[np.uint64]:
        params = self.params
        if params.ring_bits:  # already integers in the ring: nothing to quantise
            ring = np.asarray(update).ravel()
            if ring.shape[0] != params.vector_length or ring.dtype != np.uint64 or counts \
                    or int(ring.max(initial=0)) >= 1 << params.ring_bits:
                raise ParameterError(f"a ring-mode update must be {params.vector_length} uint64 integers below "
                                     f"2^{params.ring_bits}, and no counts")
            return ring
        vec = np.asarray(update, dtype=np.float64).ravel()
        if vec.shape[0] != params.vector_length or not np.isfinite(vec).all():
            raise ParameterError(f"update must be {params.vector_length} finite values, got {vec.shape[0]}")
        clipped, scaled = clip_l2(vec, params.clip)
        if scaled:
            log.warning("site %d: update L2 norm exceeded clip %g and was scaled down", self.site_id, params.clip)
        if len(counts) != params.count_slots:
            raise ParameterError(f"got {len(counts)} counts, expected {params.count_slots}")
        if any(int(c) != c or not 0 <= c <= params.max_count for c in counts):
            raise ParameterError(f"counts must be integers in [0, {params.max_count}]")
        q = quantize(clipped, value_bits=params.value_bits, clip=params.clip, rounding=params.rounding)
        return np.concatenate([q, np.asarray([int(c) for c in counts], dtype=np.uint64)])

    def _open_shares(self, sender: int, blob: bytes) -> tuple[list[_Held], Commitments]:
        """Decrypt one dealer's shares, check their signatures and the commitments' digest (not yet
        whether the shares are on the commitments: see :meth:`_check_commitments`)."""
        if not isinstance(blob, bytes) or len(blob) != SHARE_CIPHERTEXT_BYTES + Commitments.size(self.params.threshold):
            raise PayloadError("shares and commitments have the wrong size")
        ciphertext, raw = blob[:SHARE_CIPHERTEXT_BYTES], blob[SHARE_CIPHERTEXT_BYTES:]
        digest = self._peers[sender].commitments_digest
        if commitments_digest(raw) != digest:
            raise PayloadError("the relayed commitments are not the ones the dealer signed")
        assert self._share_key is not None
        plaintext = decrypt_from_peer(
            self._share_key, self._peers[sender].share_public, round_id=self.params.round_id,
            sender=sender, receiver=self.site_id, ciphertext=ciphertext,
        )
        if len(plaintext) != SHARE_PLAINTEXT_BYTES:
            raise PayloadError("share plaintext has the wrong length")
        if plaintext[:8] != sender.to_bytes(4, "big") + self.site_id.to_bytes(4, "big"):
            raise PayloadError("share plaintext names the wrong sender or receiver")
        held: list[_Held] = []
        step = SHARE_BYTES + SIGNATURE_BYTES
        for i, kind in enumerate(KINDS):
            chunk = plaintext[8 + i * step:8 + (i + 1) * step]
            share, sig = Share.from_bytes(chunk[:SHARE_BYTES]), chunk[SHARE_BYTES:]
            if share.x != self.site_id + 1:
                raise PayloadError("share is not addressed to this site's x-coordinate")
            if not share_signature_ok(self._registry[sender], sig, kind, params_digest=self.params.digest,
                                      dealer=sender, holder=self.site_id, commitments_digest=digest,
                                      share=share.to_bytes()):
                raise PayloadError(f"{kind} share is not signed by its dealer")
            held.append((share, sig))
        return held, Commitments.from_bytes(raw, self.params.threshold)

    def _check_commitments(self, received: dict[int, tuple[list[_Held], Commitments]]) -> tuple[CheatProof, ...]:
        """Drop from ``received`` every dealer with a share off its commitments; return the proofs.
        One batch check for all shares; share by share only when the batch fails."""
        checks = [(share, c.of(kind)) for held, c in received.values()
                  for kind, (share, _) in zip(KINDS, held, strict=True)]
        if not checks or shares_ok(checks):
            return ()
        proofs = []
        for sender, (held, c) in sorted(received.items()):
            for kind, (share, sig) in zip(KINDS, held, strict=True):
                if not share_ok(share, c.of(kind)):
                    log.warning("site %d: the %s share of %d is not on its commitments: proven cheat, not masked "
                                "with", self.site_id, kind, sender)
                    proofs.append(CheatProof(sender, self.site_id, kind, share.to_bytes(), sig))
                    del received[sender]
                    break
        return tuple(proofs)

    # ------------------------------------------------------------------ stage 4
    def confirm_survivors(self, survivors: SurvivorSet | bytes | frozenset[int]) -> bytes:
        """Stage 4 (consistency round): sign the survivor set S, once per round.

        Refused unless S is for this round, lists only invited sites, contains this site, and at
        least ``threshold`` of S are this site or its mask partners (so it could answer unmask).
        """
        with self._stage_guard(Stage.MASKED, "confirm_survivors"):
            if isinstance(survivors, (bytes, SurvivorSet)):
                parsed = SurvivorSet.from_bytes(survivors) if isinstance(survivors, bytes) else survivors
                if parsed.round_id != self.params.round_id:
                    self._refuse("survivor set", "it is for another round")
                survivors = parsed.survivors
            s = frozenset(survivors)
            if not s <= frozenset(self.params.site_ids):
                self._refuse("survivor set", "it lists sites that were not invited")
            if self.site_id not in s:
                self._refuse("survivor set", "this site is not listed as a survivor")
            self._local_view(s, "survivor set")
            self._confirmed = s
            return sign_survivors(self._identity, self.params.digest, s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _local_view(self, s: frozenset[int], what: str) -> tuple[frozenset[int], frozenset[int]]:
        """(survivors, dropped) as THIS site sees them: S ∩ (partners ∪ self), partners − S."""
        survived = s & (self._masked_with | {self.site_id})
        if len(survived) < self.params.threshold:
            self._refuse(what, f"{len(survived)} survivors among this site and its mask partners is below "
                               f"the threshold {self.params.threshold}")
        return survived, self._masked_with - s

    # ------------------------------------------------------------------ stage 5
    def unmask(self, request: UnmaskRequest | bytes) -> UnmaskResponse:
        """Stage 5: reveal, per mask partner, the self-mask share (survived) OR the key share (dropped),
        and for each dropped partner that the request PROVES a cheat (checked here, :meth:`_proven`)
        the element this site shares with it (common.secagg.dleq); then wipe every secret of the round.

        Answered at most once, only for the survivor set this site signed at stage 4, and only when
        the request carries at least ``threshold`` valid signatures on that same set by distinct
        registered sites in it that hold this site's shares (its neighbours or itself).
        """
        with self._stage_guard(Stage.CONFIRMED, "unmask"):
            req = UnmaskRequest.from_bytes(request) if isinstance(request, bytes) else request
            if req.round_id != self.params.round_id:
                self._refuse("unmask request", "it is for another round")
            if req.survivors != self._confirmed:
                self._refuse("unmask request", "its survivor set differs from the one this site signed")
            s = req.survivors
            electors = s & (self._neighbours | {self.site_id})
            signers = {
                signer for signer, sig in req.signatures.items()
                if signer in electors and signer in self._registry
                and survivors_signature_ok(self._registry[signer], sig, self.params.digest, s)
            }
            if len(signers) < self.params.threshold:
                self._refuse("unmask request", f"only {len(signers)} valid survivor-set signatures from this "
                                               f"site's share holders; threshold is {self.params.threshold}")
            survived, dropped = self._local_view(s, "unmask request")
            assert self._commitments is not None
            reveals = {
                cheat: KeyReveal.make(self._identity, self._secrets["key"], self._commitments.mask_public, pk,
                                      self.params.digest, self.site_id, cheat).to_bytes()
                for cheat, pk in self._proven(req.cheats, dropped).items()
            }
            response = UnmaskResponse(
                round_id=self.params.round_id,
                site_id=self.site_id,
                self_mask_shares={o: sh.to_bytes() + sig for o, (sh, sig) in self._held_seed.items() if o in survived},
                key_shares={o: sh.to_bytes() + sig for o, (sh, sig) in self._held_key.items() if o in dropped},
                reveals=reveals,
            )
            self._forget_secrets()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _proven(self, cheats: Sequence[ProvenCheat], dropped: frozenset[int]) -> dict[int, int]:
        """Dropped mask partner -> its mask public key, for each one whose evidence this site checks
        itself: its own signed share off the commitments it signed, and its proof that it knows the
        key of those commitments. Anything else is logged and gets no reveal."""
        proven: dict[int, int] = {}
        for cheat in cheats:
            dealer = cheat.proof.dealer
            if dealer not in dropped:
                continue  # the request is the same for every site: not this site's mask partner
            try:
                bundle = self._peers[dealer]
                if commitments_digest(cheat.commitments) != bundle.commitments_digest:
                    raise ProtocolError("the commitments are not the ones it signed")
                commitments = Commitments.from_bytes(cheat.commitments, self.params.threshold)
                check_proof(cheat.proof, self.params, self._registry[dealer], bundle, commitments)
                if not key_proof_ok(cheat.key_proof, commitments.mask_public, self.params.digest, dealer):
                    raise ProtocolError("its proof of knowledge of its mask key does not check")
            except SecAggError as exc:
                log.warning("site %d: no key reveal for site %d: %s", self.site_id, dealer, exc)
                continue
            proven[dealer] = commitments.mask_public
        return proven

    # ------------------------------------------------------------------ persistence
    def export_state(self) -> bytes:
        """Serialise the session for local storage between stages; secrets only until unmask is answered.

        The blob holds secrets until then: keep it on the site, never send it. Persist it after
        every stage (durably before an unmask answer leaves), or a replay check is lost. A session
        restored from any saved state deals exactly the shares it dealt (or would have).
        """
        def shares(d: dict[int, _Held]) -> dict[str, list[str]]:
            return {str(k): [s.to_bytes().hex(), sig.hex()] for k, (s, sig) in d.items()}

        return json.dumps({
            "round_id": self.params.round_id.hex(),
            "params_digest": self.params.digest.hex(),
            "site_id": self.site_id,
            "stage": int(self._stage),
            "share_key": None if self._share_key is None else self._share_key.private_bytes_raw().hex(),
            "secrets": {kind: hex(value) for kind, value in self._secrets.items()},
            "dealing_key": self._dealing_key.hex(),
            "commitments": self._commitments.to_bytes().hex() if self._commitments else None,
            "own_bundle": self._own_bundle.to_bytes().hex() if self._own_bundle else None,
            "neighbours": sorted(self._neighbours),
            "peers": {str(k): v.to_bytes().hex() for k, v in self._peers.items()},
            "held_seed": shares(self._held_seed),
            "held_key": shares(self._held_key),
            "masked_with": sorted(self._masked_with),
            "confirmed": None if self._confirmed is None else sorted(self._confirmed),
        }).encode()

    @classmethod
    def from_state(
        cls, params: SecAggParams, identity: SiteIdentity, registry: Mapping[int, Ed25519PublicKey], state: bytes
    ) -> ClientSession:
        """Restore a session saved by :meth:`export_state` (same params, identity and registry)."""
        data = json.loads(state)
        if bytes.fromhex(data["params_digest"]) != params.digest:
            raise ProtocolError("saved session is for another round or other parameters")

        def shares(d: dict[str, list[str]]) -> dict[int, _Held]:
            return {int(k): (Share.from_bytes(bytes.fromhex(s)), bytes.fromhex(sig)) for k, (s, sig) in d.items()}

        session = cls(params, int(data["site_id"]), identity, registry)
        session._stage = Stage(data["stage"])
        share_key = data["share_key"] and X25519PrivateKey.from_private_bytes(bytes.fromhex(data["share_key"]))
        session._share_key = share_key or None
        session._secrets = {kind: int(value, 16) for kind, value in data["secrets"].items()}
        session._dealing_key = bytes.fromhex(data["dealing_key"])
        raw = data["commitments"]
        session._commitments = Commitments.from_bytes(bytes.fromhex(raw), params.threshold) if raw else None
        own = data["own_bundle"]
        session._own_bundle = SignedKeyBundle.from_bytes(bytes.fromhex(own)) if own else None
        session._neighbours = frozenset(data["neighbours"])
        session._peers = {int(k): SignedKeyBundle.from_bytes(bytes.fromhex(v)) for k, v in data["peers"].items()}
        session._held_seed, session._held_key = shares(data["held_seed"]), shares(data["held_key"])
        session._masked_with = frozenset(data["masked_with"])
        confirmed = data["confirmed"]
        session._confirmed = None if confirmed is None else frozenset(confirmed)
        return session
