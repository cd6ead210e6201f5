"""Client side of the protocol: one :class:`ClientSession` per site and round, five stages and
an optional sixth.

    NEW --advertise_keys--> ADVERTISED --share_keys--> SHARED --masked_input--> MASKED
        --confirm_survivors--> CONFIRMED --unmask--> DONE --expose_liar | close--> CLOSED
                                                                   (any refusal: ABORTED)

Stages must be called in order, each at most once. A peer that misbehaves (bad signature,
tampered share) is logged and treated as dropped; a server request that could leak an input
(another round or parameters, a survivor set other than the one this site signed, too few
signatures or survivors, a proof that does not prove) is refused with :class:`ProtocolError`,
after which the session is over and every secret wiped.

Secret lifetime: the site's own private keys, its self seed and every held self-mask share are
wiped when unmask is answered. The held mask-key shares of the OTHER survivors are kept (stage
DONE) until :meth:`expose_liar` answers or :meth:`close` runs (client/secure.py closes every DONE
session when the site's next round starts): they are what lets a proven liar be removed, and they
leave the site only against a proof that their owner cheated.

Expose (stage 6): a dealer whose signed self-mask shares do not open its signed seed commitment
is proven dishonest by those shares alone (common.secagg.proof). Its upload is in the sum but its
self mask cannot be removed, so the server removes its whole upload and needs its mask key to
strip the pairwise masks it shares with the survivors. Each holder checks the proof ITSELF and
only then reveals its share of the liar's mask key, once. An honest dealer's shares always open
its commitment, so no server can obtain both secrets of an honest site this way.

Why the consistency round is enough (Bonawitz et al. 2017, round 3): a site reveals shares only
for the ONE survivor set S it signed, backed by ``threshold`` signatures of its own share holders
on that same S, and it derives "survived" and "dropped" itself (S ∩ its mask partners, partners −
S). Every honest holder therefore answers for the same S, so no site's self-mask seed and mask key
are both revealed; and to strip a victim's pairwise masks a server must leave ALL the victim's
partners (at least t − 1) out of S, which leaves at most h − t < t holders able to return the
victim's seed share (t > h/2 for h holders; t > 2h/3 against colluders, see default_threshold).
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
    x25519_shared_secret,
)
from common.secagg.messages import (
    ExposeRequest,
    ExposeResponse,
    MaskedUpload,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from common.secagg.prg import (
    expand_mask,
    new_self_seed,
    pairwise_mask_context,
    pairwise_seed,
    seed_commitment,
    self_mask_context,
)
from common.secagg.proof import check_proof
from common.secagg.protocol import SecAggParams, Stage, graph_seed
from common.secagg.shamir import SHARE_BYTES, Share, split

__all__ = ["ClientSession"]

log = logging.getLogger(__name__)

_Held = tuple[Share, bytes]  # a share dealt to this site and its dealer's signature on it
_PLAINTEXT = 8 + 2 * (SHARE_BYTES + SIGNATURE_BYTES)


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
        self._mask_key: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._self_seed = new_self_seed()
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
        """Whether any round secret (private keys, self seed, held shares) is still in memory."""
        return bool(self._share_key or self._mask_key or self._self_seed or self._held_seed or self._held_key)

    @property
    def holds_own_secrets(self) -> bool:
        """Whether this site's own round secrets (private keys, self seed) are still in memory."""
        return bool(self._share_key or self._mask_key or self._self_seed)

    @property
    def retained_key_shares(self) -> frozenset[int]:
        """Owners whose mask-key shares this site still holds (after unmask: the other survivors)."""
        return frozenset(self._held_key)

    @contextmanager
    def _stage_guard(self, expected: Stage, name: str, after: Stage | None = None) -> Iterator[None]:
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
        self._stage = Stage(expected + 1) if after is None else after

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._forget_secrets()

    def _forget_secrets(self, keep_key_shares_of: frozenset[int] = frozenset()) -> None:
        self._held_seed.clear()
        self._held_key = {o: h for o, h in self._held_key.items() if o in keep_key_shares_of and o != self.site_id}
        self._self_seed = b""
        self._share_key = self._mask_key = None

    def close(self) -> None:
        """End the session for good: wipe every secret (the retained key shares too). A DONE session
        becomes CLOSED, an unfinished one ABORTED; a closed or aborted one is left as it is."""
        if self._stage is Stage.DONE:
            self._stage = Stage.CLOSED
            self._forget_secrets()
        elif self._stage not in (Stage.CLOSED, Stage.ABORTED):
            self._abort()

    def _refuse(self, what: str, problem: str) -> None:
        log.warning("site %d refused %s: %s", self.site_id, what, problem)
        raise ProtocolError(f"{what} refused: {problem}")

    # ------------------------------------------------------------------ stage 1
    def advertise_keys(self) -> SignedKeyBundle:
        """Stage 1: this round's two X25519 public keys, signed with the identity key over the
        digest of all round parameters."""
        with self._stage_guard(Stage.NEW, "advertise_keys"):
            assert self._share_key is not None and self._mask_key is not None
            self._own_bundle = sign_key_bundle(
                self._identity,
                round_id=self.params.round_id,
                site_id=self.site_id,
                params_digest=self.params.digest,
                share_public=self._share_key.public_key().public_bytes_raw(),
                mask_public=self._mask_key.public_key().public_bytes_raw(),
                seed_commitment=seed_commitment(self._self_seed, self.params.round_id, self.site_id),
            )
            return self._own_bundle
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, bundles: Mapping[int, SignedKeyBundle | bytes]) -> dict[int, bytes]:
        """Stage 2: verify the bundles, derive the graph, Shamir-share the self-mask seed and the
        mask key among the neighbours, each share signed by this site.

        Complete graph: neighbours with a missing or invalid bundle are logged and treated as
        dropped. Sparse graph: the bundles of EVERY invited site are needed (their hash seeds the
        graph), else the stage is refused. Returns one AEAD ciphertext per valid neighbour.
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

    def _deal(self, holders: list[int]) -> dict[int, bytes]:
        params = self.params
        assert self._mask_key is not None and self._share_key is not None
        xs = [h + 1 for h in holders]
        seed_shares = split(self._self_seed, xs, params.threshold)
        key_shares = split(self._mask_key.private_bytes_raw(), xs, params.threshold)
        out: dict[int, bytes] = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            signed = [
                (share, sign_share(self._identity, kind, params_digest=params.digest, dealer=self.site_id,
                                   holder=holder, share=share.to_bytes()))
                for kind, share in (("seed", seed_share), ("key", key_share))
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
        return out

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
        """Stage 3: decrypt and check received shares, then quantise, mask and pack the contribution.

        ``update`` has ``vector_length`` floats and is L2-clipped to ``clip`` here if needed
        (callers should already have clipped it); ``counts`` has ``count_slots`` integers in
        ``[0, max_count]``. Pairwise masks are added only for neighbours whose shares arrived
        intact and correctly signed (the returned upload lists them).
        """
        with self._stage_guard(Stage.SHARED, "masked_input"):
            params = self.params
            values = self._encode(update, counts)
            for sender in sorted(ciphertexts):
                if sender not in self._peers:
                    log.warning("site %d: ignoring shares from non-peer %r", self.site_id, sender)
                    continue
                try:
                    self._accept_shares(sender, ciphertexts[sender])
                except SecAggError as exc:
                    log.warning("site %d: shares of %d rejected, treated as dropped: %s", self.site_id, sender, exc)
            partners = frozenset(self._held_seed) - {self.site_id}
            self._require_holders(len(partners) + 1, "neighbours with valid shares")
            assert self._mask_key is not None
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

    def _accept_shares(self, sender: int, ciphertext: bytes) -> None:
        if not isinstance(ciphertext, bytes):
            raise PayloadError("share ciphertext is not bytes")
        assert self._share_key is not None
        plaintext = decrypt_from_peer(
            self._share_key, self._peers[sender].share_public, round_id=self.params.round_id,
            sender=sender, receiver=self.site_id, ciphertext=ciphertext,
        )
        if len(plaintext) != _PLAINTEXT:
            raise PayloadError("share plaintext has the wrong length")
        if plaintext[:8] != sender.to_bytes(4, "big") + self.site_id.to_bytes(4, "big"):
            raise PayloadError("share plaintext names the wrong sender or receiver")
        held: list[_Held] = []
        step = SHARE_BYTES + SIGNATURE_BYTES
        for i, kind in enumerate(("seed", "key")):
            chunk = plaintext[8 + i * step:8 + (i + 1) * step]
            share, sig = Share.from_bytes(chunk[:SHARE_BYTES]), chunk[SHARE_BYTES:]
            if share.x != self.site_id + 1:
                raise PayloadError("share is not addressed to this site's x-coordinate")
            if not share_signature_ok(self._registry[sender], sig, kind, params_digest=self.params.digest,
                                      dealer=sender, holder=self.site_id, share=share.to_bytes()):
                raise PayloadError(f"{kind} share is not signed by its dealer")
            held.append((share, sig))
        self._held_seed[sender], self._held_key[sender] = held

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
        """Stage 5: reveal, per mask partner, the self-mask share (survived) OR the key share (dropped).

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
            response = UnmaskResponse(
                round_id=self.params.round_id,
                site_id=self.site_id,
                self_mask_shares={o: sh.to_bytes() + sig for o, (sh, sig) in self._held_seed.items() if o in survived},
                key_shares={o: sh.to_bytes() + sig for o, (sh, sig) in self._held_key.items() if o in dropped},
            )
            self._forget_secrets(keep_key_shares_of=survived)  # only for a proven liar (expose_liar)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ stage 6 (only with a proven liar)
    def expose_liar(self, request: ExposeRequest | bytes) -> ExposeResponse:
        """Stage 6: reveal this site's share of each proven liar's MASK KEY, once, then wipe everything.

        Every proof in the request must be checked here (check_proof: the liar's registered identity
        key, this round's digest, at least ``threshold`` distinct holders, shares that do not open the
        commitment in the liar's bundle as THIS site received it) and be about a survivor whose key
        share this site retained; otherwise the whole request is refused (and the session aborted).
        Only self-mask-seed proofs are accepted: their owner's seed shares were revealed at unmask.
        """
        with self._stage_guard(Stage.DONE, "expose_liar", after=Stage.CLOSED):
            req = ExposeRequest.from_bytes(request) if isinstance(request, bytes) else request
            if req.round_id != self.params.round_id:
                self._refuse("expose request", "it is for another round")
            if not req.proofs:
                self._refuse("expose request", "it carries no proof")
            for proof in req.proofs:
                if proof.kind != "seed" or proof.dealer not in self._held_key:
                    self._refuse("expose request", f"no retained key share of site {proof.dealer} to reveal "
                                                   f"for a {proof.kind} proof")
                try:
                    check_proof(proof, self.params, self._registry[proof.dealer], self._peers[proof.dealer])
                except ProtocolError as exc:
                    self._refuse("expose request", f"the proof against site {proof.dealer} fails: {exc}")
            log.warning("site %d reveals its mask-key shares of proven liars %s", self.site_id,
                        sorted(p.dealer for p in req.proofs))
            response = ExposeResponse(self.params.round_id, self.site_id, {
                p.dealer: self._held_key[p.dealer][0].to_bytes() + self._held_key[p.dealer][1] for p in req.proofs})
            self._forget_secrets()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ persistence
    def export_state(self) -> bytes:
        """Serialise the session for local storage between stages; secrets only while the round runs
        (private keys until unmask, the other survivors' mask-key shares until CLOSED).

        The blob holds secrets until the session is closed: keep it on the site, never send it.
        Persist it after every stage (durably before an unmask answer leaves), or a replay check is lost.
        """
        def shares(d: dict[int, _Held]) -> dict[str, list[str]]:
            return {str(k): [s.to_bytes().hex(), sig.hex()] for k, (s, sig) in d.items()}

        def key(k: X25519PrivateKey | None) -> str | None:
            return None if k is None else k.private_bytes_raw().hex()

        return json.dumps({
            "round_id": self.params.round_id.hex(),
            "params_digest": self.params.digest.hex(),
            "site_id": self.site_id,
            "stage": int(self._stage),
            "share_key": key(self._share_key),
            "mask_key": key(self._mask_key),
            "self_seed": self._self_seed.hex(),
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

        def key(raw: str | None) -> X25519PrivateKey | None:
            return None if raw is None else X25519PrivateKey.from_private_bytes(bytes.fromhex(raw))

        session = cls(params, int(data["site_id"]), identity, registry)
        session._stage = Stage(data["stage"])
        session._share_key, session._mask_key = key(data["share_key"]), key(data["mask_key"])
        session._self_seed = bytes.fromhex(data["self_seed"])
        own = data["own_bundle"]
        session._own_bundle = SignedKeyBundle.from_bytes(bytes.fromhex(own)) if own else None
        session._neighbours = frozenset(data["neighbours"])
        session._peers = {int(k): SignedKeyBundle.from_bytes(bytes.fromhex(v)) for k, v in data["peers"].items()}
        session._held_seed, session._held_key = shares(data["held_seed"]), shares(data["held_key"])
        session._masked_with = frozenset(data["masked_with"])
        confirmed = data["confirmed"]
        session._confirmed = None if confirmed is None else frozenset(confirmed)
        return session
