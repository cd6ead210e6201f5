"""Server side of the protocol: :class:`ServerAggregator`, a pure state machine (no Flower).

    BUNDLES --collect_bundles--> SHARES --route_shares--> MASKED --collect_masked--> CONFIRM
        --collect_confirmations--> UNMASK --collect_unmask--> READY --finish--> DONE
                                                                  (too few sites: ABORTED)

It relays keys, commitments and ciphertexts, keeps each accepted masked vector (packed) until the
end, fixes the survivor set S, collects the survivors' signatures on S (consistency round), sends
ONE unmask request (S and the signatures) to every signer, and removes the masks from the shares
they reveal. Every input is untrusted: a malformed or misbehaving site is dropped with a logged
reason (never an exception out of the round); when fewer than ``threshold`` sites remain for some
secret, the round raises :class:`RoundAborted`.

Cheats (common.secagg.proof): a dealer's commitments must match the digest it signed (else it is
dropped when it deals); a holder that rejects a dealer's shares because they are off the dealer's
commitments uploads the dealer's signed share, and the server, which holds the same commitments,
checks it: the dealer is then a proven cheat (:attr:`cheats`, :attr:`proofs`), dropped, and its
pairwise masks removed with the elements the survivors that masked with it reveal at unmask, each
signed and proven (common.secagg.dleq), so it does not matter how few holders accepted its shares;
its key, rebuilt from ``threshold`` key shares, serves only for a reveal that is missing or fails
(a signed reveal that fails proves its sender a cheat: :attr:`bad_reveals`). Every dealer proves
with its deal that it knows its mask key, or is dropped. A rejection without a proof that checks is
an :attr:`unproven` dispute between holder and dealer (:attr:`false_accusers` when the "proof" shows
the share was good); the caller keeps count across rounds. Revealed shares carry their dealer's
signature (checked one by one, so a holder's forged share is named and skipped), and the recovered
secret is checked against the dealer's commitment; only a dealer that colludes with a holder that
skipped its stage-3 check can get past that, and then its own signed share is the proof and the
remaining shares still open the committed secret.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.secagg.dleq import KeyReveal, key_proof_ok
from common.secagg.errors import PayloadError, ProtocolError, RoundAborted, SecAggError, ShamirError
from common.secagg.fixedpoint import decode_sum, error_bound, unpack_bits
from common.secagg.group import element_to_bytes, exp, exp_g
from common.secagg.identity import (
    SignedKeyBundle,
    check_bundle_keys,
    share_signature_ok,
    survivors_signature_ok,
    verify_key_bundle,
)
from common.secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
    Deal,
    MaskedUpload,
    ProvenCheat,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from common.secagg.prg import expand_mask, pairwise_mask_context, pairwise_seed, self_mask_context, self_mask_seed
from common.secagg.proof import CheatProof, check_proof
from common.secagg.protocol import SecAggParams, graph_seed
from common.secagg.shamir import SHARE_BYTES, Share, combine
from common.secagg.vss import Commitments, share_ok

__all__ = ["AggregateResult", "ServerAggregator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregateResult:
    """The only thing the round reveals: the sum over survivors, and who they were."""

    sum_vector: npt.NDArray[np.float64]
    """Decoded sum of the survivors' values (length ``vector_length``); in ring mode the sum mod 2^ring_bits, exact
    integers (below 2^35)."""
    counts: list[int]
    """Exact sums of the count slots."""
    survivors: frozenset[int]
    dropped: frozenset[int]
    error_bound: float
    """Per-element bound on ``|sum_vector - true sum|`` (:func:`fixedpoint.error_bound`)."""
    clamped: int = 0
    """Elements of the sum that were out of the range honest inputs can reach, clamped into it."""


class _Stage(enum.IntEnum):
    BUNDLES = 0
    SHARES = 1
    MASKED = 2
    CONFIRM = 3
    UNMASK = 4
    READY = 5
    DONE = 6
    ABORTED = 7


_Signed = dict[int, bytes]  # holder -> a share of one owner's secret, then the owner's signature on it


def _site_id(params: SecAggParams, key: object) -> int | None:
    """``key`` as an invited site id, or None (a bool, a str, a stranger...)."""
    return key if type(key) is int and key in params.site_set else None


class ServerAggregator:
    """One round of secure aggregation, server side. Call the stages in order (see the module doc)."""

    def __init__(self, params: SecAggParams, registry: Mapping[int, Ed25519PublicKey]) -> None:
        self.params = params
        self._registry = registry
        self._stage = _Stage.BUNDLES
        self._bundles: dict[int, SignedKeyBundle] = {}
        self._commitments: dict[int, Commitments] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._live: set[int] = set()
        self._sent_to: dict[int, frozenset[int]] = {}
        self._partners: dict[int, frozenset[int]] = {}
        self._masked_with: dict[int, frozenset[int]] = {}
        self._survivors: frozenset[int] = frozenset()
        self._to_unmask: frozenset[int] = frozenset()
        self._request: UnmaskRequest | None = None
        self._key_proofs: dict[int, bytes] = {}
        self._uploads: dict[int, bytes] = {}
        self._seeds: dict[int, int] = {}
        self._shared: dict[tuple[int, int], int] = {}  # (survivor, dropped partner) -> their DH element
        self.dropped_reasons: dict[int, str] = {}
        """Why each site left the round or had an answer ignored (first reason), for failure reports."""
        self.cheats: dict[int, str] = {}
        """Sites proven to have cheated (their own signatures are the proof)."""
        self.proofs: dict[int, CheatProof] = {}
        """The proof against each cheat: its own signed share, off its own signed commitments."""
        self.bad_reveals: dict[int, KeyReveal] = {}
        """The proof against each cheat that revealed, signed, an element its proof does not show."""
        self.unproven: set[tuple[int, int]] = set()
        """(holder, dealer): the holder rejected the dealer's shares without a proof (AEAD failure,
        bad signature...): either side may be lying. The dealer is no proven cheat."""
        self.false_accusers: dict[int, int] = {}
        """Holder -> the dealer it accused with a "proof" that shows the dealer's share was good."""

    def _enter(self, stage: _Stage, name: str) -> None:
        if self._stage is _Stage.ABORTED:
            raise RoundAborted("the round was aborted")
        if self._stage is not stage:
            raise ProtocolError(f"out-of-order {name}: server is at stage {self._stage.name}")

    def _abort(self, why: str) -> RoundAborted:
        self._stage = _Stage.ABORTED
        self._uploads.clear()
        self._seeds.clear()
        self._shared.clear()
        return RoundAborted(why)

    def _require(self, alive: int, when: str) -> None:
        if alive < self.params.threshold:
            raise self._abort(f"only {alive} sites left {when}; threshold is {self.params.threshold}")

    def _drop(self, site: int, stage: str, why: object) -> None:
        log.warning("site %d dropped at %s: %s", site, stage, why)
        self.dropped_reasons.setdefault(site, f"{stage}: {why}")

    def _prove(self, proof: CheatProof) -> None:
        """Record a proof (checked by the caller) against its dealer: a cheat for the rest of the run."""
        dealer = proof.dealer
        if dealer in self.cheats:
            return
        self.proofs[dealer] = proof
        self.cheats[dealer] = (f"its signed {proof.kind} share to site {proof.holder} is not on the polynomial "
                               "its signed commitments fix")
        log.error("site %d cheated: %s", dealer, self.cheats[dealer])

    def evidence(self, cheat: int) -> dict[str, str | int]:
        """The proof against a proven cheat, self-contained (hex): with the cheat's REGISTERED identity
        key, anyone can check it (common.secagg.proof.check_proof; for a bad key reveal,
        common.secagg.dleq.check_reveal, with both sites' bundles checked against their registered keys)."""
        if cheat in self.bad_reveals:
            reveal = self.bad_reveals[cheat]
            return {"holder": cheat, "dealer": reveal.dealer, "kind": "key-reveal", "reveal": reveal.to_bytes().hex(),
                    "params_digest": self.params.digest.hex(), "key_bundle": self._bundles[cheat].to_bytes().hex(),
                    "commitments": self._commitments[cheat].to_bytes().hex(),
                    "dealer_key_bundle": self._bundles[reveal.dealer].to_bytes().hex(),
                    "dealer_commitments": self._commitments[reveal.dealer].to_bytes().hex()}
        proof = self.proofs[cheat]
        return {"dealer": cheat, "holder": proof.holder, "kind": proof.kind, "share": proof.share.hex(),
                "signature": proof.signature.hex(), "params_digest": self.params.digest.hex(),
                "key_bundle": self._bundles[cheat].to_bytes().hex(),
                "commitments": self._commitments[cheat].to_bytes().hex()}

    def neighbours(self, site: int) -> frozenset[int]:
        """The site's neighbours (known after :meth:`collect_bundles`)."""
        return self._graph.get(site, frozenset())

    # ------------------------------------------------------------------ stage 1
    def collect_bundles(self, bundles: Mapping[Any, object]) -> dict[int, dict[int, SignedKeyBundle]]:
        """Stage 1: accept key bundles; return for each site the bundles it must see.

        Complete graph: its live neighbours' bundles. Sparse graph: every invited site's bundle
        (each site hashes them all into the graph seed), so one missing bundle aborts the round.
        """
        self._enter(_Stage.BUNDLES, "collect_bundles")
        params = self.params
        for key, raw in bundles.items():
            site = _site_id(params, key)
            if site is None:
                log.warning("ignoring key bundle from uninvited site %r", key)
                continue
            try:
                bundle = raw if isinstance(raw, SignedKeyBundle) else SignedKeyBundle.from_bytes(raw)  # type: ignore[arg-type]
                verify_key_bundle(bundle, self._registry, round_id=params.round_id, site_id=site,
                                  params_digest=params.digest, check_keys=False)
            except SecAggError as exc:
                self._drop(site, "key advertisement", exc)
                continue
            self._bundles[site] = bundle
        if params.all_pairs:
            self._graph = params.graph()
        else:
            missing = sorted(set(params.site_ids) - self._bundles.keys())
            if missing:
                raise self._abort(f"a sparse round needs every invited site's key bundle; missing {missing[:10]}")
            signed = [self._bundles[s].to_bytes() for s in params.site_ids]
            self._graph = params.graph(graph_seed(params.digest, signed))
        for site, bundle in sorted(self._bundles.items()):
            try:
                check_bundle_keys(bundle)
            except SecAggError as exc:
                self._drop(site, "key advertisement", exc)
                continue
            self._live.add(site)
        self._require(len(self._live), "after key advertisement")
        self._stage = _Stage.SHARES
        if params.all_pairs:
            return {s: {p: self._bundles[p] for p in self._graph[s] if p in self._live} for s in self._live}
        return {s: {p: b for p, b in self._bundles.items() if p != s} for s in self._live}

    # ------------------------------------------------------------------ stage 2
    def route_shares(self, outgoing: Mapping[Any, object]) -> dict[int, dict[int, bytes]]:
        """Stage 2: check each dealer's commitments, route its encrypted shares to per-receiver inboxes.

        A dealer whose reply is not a :class:`Deal` of exact-size ciphertexts to its neighbours, whose
        commitments are not the ones its signed bundle names, or whose proof that it knows its mask
        key does not check (common.secagg.dleq), is dropped. A ciphertext from
        ``a`` to ``b`` is delivered (followed by ``a``'s commitments, the same bytes to every
        holder) only if ``b`` also sent one to ``a``, so both sides of a pair agree on whether to
        mask with each other.
        """
        self._enter(_Stage.SHARES, "route_shares")
        params = self.params
        deals: dict[int, Deal] = {}
        for key, raw in outgoing.items():
            site = _site_id(params, key)
            if site is None or site not in self._live:
                log.warning("ignoring shares from site %r, which advertised no valid keys", key)
                continue
            try:
                deal = raw if isinstance(raw, Deal) else Deal.from_bytes(raw)  # type: ignore[arg-type]
                if deal.round_id != params.round_id or not deal.ciphertexts.keys() <= self._graph[site] & self._live:
                    raise ProtocolError("shares for another round or for sites that are not its live neighbours")
                if any(len(c) != SHARE_CIPHERTEXT_BYTES for c in deal.ciphertexts.values()):
                    raise PayloadError("share ciphertexts of the wrong size")
                commitments = Commitments.from_bytes(deal.commitments, params.threshold)
                if commitments.digest != self._bundles[site].commitments_digest:
                    raise ProtocolError("its commitments are not the ones its signed key bundle names")
                if not key_proof_ok(deal.key_proof, commitments.mask_public, params.digest, site):
                    raise ProtocolError("its proof that it knows its mask key does not check")
            except SecAggError as exc:
                self._drop(site, "share exchange", exc)
                continue
            deals[site], self._commitments[site], self._key_proofs[site] = deal, commitments, deal.key_proof
            self._sent_to[site] = frozenset(deal.ciphertexts)
        inbox: dict[int, dict[int, bytes]] = {site: {} for site in self._sent_to}
        for site, receivers in self._sent_to.items():
            for receiver in receivers:
                if site in self._sent_to.get(receiver, ()):
                    inbox[receiver][site] = deals[site].ciphertexts[receiver] + deals[site].commitments
        self._partners = {site: frozenset(box) for site, box in inbox.items()}
        self._require(len(self._sent_to), "after share exchange")
        self._stage = _Stage.MASKED
        return inbox

    # ------------------------------------------------------------------ stage 3
    def collect_masked(self, uploads: Mapping[Any, object]) -> SurvivorSet:
        """Stage 3: validate masked vectors and the proofs they carry; return the survivor set S to
        send to all of S.

        A malformed upload (wrong round, wrong size, bad padding, impossible mask list, a proof
        about a dealer it masked with or never got shares from) drops its sender. A proof that
        checks makes its dealer a proven cheat, dropped; one that does not drops its sender (a false
        accuser). When only one side of a pair masked and the other has no proof, the dispute is
        recorded (:attr:`unproven`) and the sender of the rejected shares is dropped (see
        :meth:`_settle`); sites whose masks could then not be removed follow.
        """
        self._enter(_Stage.MASKED, "collect_masked")
        accepted: dict[int, MaskedUpload] = {}
        for key, raw in uploads.items():
            site = _site_id(self.params, key)
            if site is None or site not in self._sent_to:
                log.warning("ignoring masked input from site %r, which shared no keys", key)
                continue
            try:
                upload = MaskedUpload.from_bytes(raw, self.params)  # type: ignore[arg-type]
                rejected = self._partners[site] - upload.masked_with
                if upload.site_id != site or not upload.masked_with <= self._partners[site]:
                    raise ProtocolError("upload names the wrong site or impossible mask partners")
                if not {proof.dealer for proof in upload.accusations} <= rejected:
                    raise ProtocolError("upload accuses a site it masked with or got no shares from")
            except SecAggError as exc:
                self._drop(site, "masked input", exc)
                continue
            accepted[site] = upload
            for proof in upload.accusations:
                self._judge(proof)
        for site, upload in sorted(accepted.items()):
            accused = {proof.dealer for proof in upload.accusations}
            self.unproven |= {(site, dealer) for dealer in self._partners[site] - upload.masked_with - accused
                              if dealer not in self.cheats}
        for cheat in sorted(self.cheats):
            self._drop(cheat, "masked input", f"proven cheat: {self.cheats[cheat]}")
        self._masked_with = {s: up.masked_with for s, up in accepted.items()}
        survivors = self._settle(set(accepted) - self.cheats.keys() - self.false_accusers.keys())
        self._require(len(survivors), "after masked input")
        self._survivors = frozenset(survivors)
        self._masked_with = {s: self._masked_with[s] for s in survivors}
        self._to_unmask = frozenset().union(*self._masked_with.values()) - self._survivors
        self._uploads = {site: accepted[site].body for site in self._survivors}  # packed, until finish
        self._stage = _Stage.CONFIRM
        return SurvivorSet(self.params.round_id, self._survivors)

    def _judge(self, proof: CheatProof) -> None:
        """A proof that checks convicts its dealer; one that does not makes its holder a false accuser."""
        try:
            check_proof(proof, self.params, self._registry[proof.dealer], self._bundles[proof.dealer],
                        self._commitments[proof.dealer])
        except ProtocolError as exc:
            self.false_accusers.setdefault(proof.holder, proof.dealer)
            self._drop(proof.holder, "masked input", f"its accusation of site {proof.dealer} proves nothing: {exc}")
            return
        self._prove(proof)

    def _held_by(self, among: set[int] | frozenset[int]) -> dict[int, set[int]]:
        """Owner -> the sites in ``among`` that masked with it, hence hold its checked shares."""
        held: dict[int, set[int]] = {}
        for holder in among:
            for owner in self._masked_with[holder]:
                held.setdefault(owner, set()).add(holder)
        return held

    def _settle(self, alive: set[int]) -> set[int]:
        """Resolve pairs where only one side masked (the receiver rejected the sender's shares without
        proof), then drop sites whose self-mask or whose partners' masks could not be removed.

        The sender of rejected shares is dropped, unless some (but fewer than ``threshold``) sites
        accepted its shares: then its mask key could not be recovered, and the rejecting receivers
        are dropped instead so the round goes on (the server cannot tell which side lied).
        """
        t = self.params.threshold
        for site in sorted(alive):
            if site not in alive:
                continue
            rejected_by = {p for p in self._masked_with[site] if p in alive and site not in self._masked_with[p]}
            if not rejected_by:
                continue
            accepted = len(self._held_by(alive).get(site, ()))
            if accepted == 0 or accepted >= t:
                self._drop(site, "masked input", f"its shares were rejected by sites {sorted(rejected_by)}")
                alive.discard(site)
            else:
                for receiver in sorted(rejected_by):
                    self._drop(receiver, "masked input", f"rejected the shares of site {site}, whose key would "
                                                          "otherwise be unrecoverable")
                alive -= rejected_by
        changed = True
        while changed:
            changed = False
            held = self._held_by(alive)
            for site in sorted(alive):
                if len(held.get(site, ())) + 1 < t:
                    self._drop(site, "masked input", "too few sites hold its self-mask shares")
                    alive.discard(site)
                    changed = True
            held = self._held_by(alive)
            for gone in sorted(held.keys() - alive - self.cheats.keys()):  # a cheat's masks come off by reveals
                holders = held[gone]
                if len(holders) < t:
                    for site in sorted(holders):
                        self._drop(site, "masked input", f"the mask key of dropped site {gone} is unrecoverable")
                    alive -= holders
                    changed = True
        return alive

    # ------------------------------------------------------------------ stage 4
    def collect_confirmations(self, signatures: Mapping[Any, object]) -> UnmaskRequest:
        """Stage 4 (consistency round): keep valid signatures on S; return the ONE unmask request
        for every signer. Aborts unless every needed secret has ``threshold`` willing holders."""
        self._enter(_Stage.CONFIRM, "collect_confirmations")
        valid: dict[int, bytes] = {}
        for key, sig in signatures.items():
            site = _site_id(self.params, key)
            if site is None or site not in self._survivors:
                log.warning("ignoring survivor-set signature from non-survivor %r", key)
            elif not isinstance(sig, bytes) or not survivors_signature_ok(
                    self._registry[site], sig, self.params.digest, self._survivors):
                self._drop(site, "consistency round", "invalid signature on the survivor set")
            else:
                valid[site] = sig
        t = self.params.threshold
        responders = {s for s in valid if len(valid.keys() & (self._graph[s] | {s})) >= t}
        held = self._held_by(responders)
        for site in sorted(self._survivors):
            self._require(len(held.get(site, set()) | ({site} & responders)),
                          f"to reveal site {site}'s self-mask shares")
        for gone in sorted(self._to_unmask):
            if gone in self.cheats and self._holders_of(gone) <= responders:
                continue  # every survivor that masked with this proven cheat is asked for their element
            self._require(len(held.get(gone, ())), f"to reveal dropped site {gone}'s key shares")
        cheats = tuple(ProvenCheat(self.proofs[c], self._commitments[c].to_bytes(), self._key_proofs[c])
                       for c in sorted(self.cheats.keys() & self._to_unmask))
        self._request = UnmaskRequest(self.params.round_id, self._survivors, valid, cheats)
        self._stage = _Stage.UNMASK
        return self._request

    def _holders_of(self, gone: int) -> frozenset[int]:
        """The survivors that masked with ``gone``."""
        return frozenset(s for s in self._survivors if gone in self._masked_with[s])

    # ------------------------------------------------------------------ stage 5
    def collect_unmask(self, responses: Mapping[Any, object]) -> None:
        """Stage 5: check each revealed share's dealer signature and each key reveal's signature and
        proof, and recover every needed secret: each survivor's self-mask secret, and the element each
        survivor shares with each dropped partner: revealed by the survivor when the partner is a cheat
        proven at stage 3 (common.secagg.dleq), else from the partner's mask key. Aborts when some
        secret has fewer than ``threshold`` shares on its dealer's committed polynomial."""
        self._enter(_Stage.UNMASK, "collect_unmask")
        seed_shares, key_shares, revealed = self._collect_shares(responses)
        for site in sorted(self._survivors):
            self._seeds[site] = self._open(site, "seed", seed_shares.get(site, {}))
        for gone in sorted(self._to_unmask):
            holders = self._holders_of(gone)
            if gone in self.cheats and all((site, gone) in revealed for site in holders):
                self._shared.update({(site, gone): revealed[site, gone] for site in holders})
                continue
            for site in sorted(holders):
                if gone in self.cheats and (site, gone) not in revealed:
                    self._drop(site, "unmask", f"no valid element shared with proven cheat {gone}: its key is needed")
            key = self._open(gone, "key", key_shares.get(gone, {}))
            self._shared.update({(site, gone): exp(self._commitments[site].mask_public, key) for site in holders})
        self._stage = _Stage.READY

    def finish(self, responses: Mapping[Any, object] | None = None) -> AggregateResult:
        """Remove every mask and decode the sum over the survivors (called when READY; or at UNMASK
        with the unmask responses, as a shortcut for :meth:`collect_unmask` then this)."""
        if self._stage is _Stage.UNMASK and responses is not None:
            self.collect_unmask(responses)
        self._enter(_Stage.READY, "finish")
        params = self.params
        modmask = np.uint64(params.modulus_mask)
        length, bits, round_id = params.total_length, params.modulus_bits, params.round_id
        total = np.zeros(length, dtype=np.uint64)
        for site in sorted(self._survivors):
            seed = self_mask_seed(element_to_bytes(self._seeds[site]), round_id, site)
            total = (total + unpack_bits(self._uploads[site], length, bits)
                     - expand_mask(seed, length, bits, self_mask_context(round_id, site))) & modmask
        for (site, gone), shared in sorted(self._shared.items()):  # survivor, dropped partner (or proven cheat)
            seed = pairwise_seed(element_to_bytes(shared), round_id, site, gone)
            pair = expand_mask(seed, length, bits, pairwise_mask_context(round_id, site, gone))
            total = (total - pair if site < gone else total + pair) & modmask
        return self._decode(total, self._survivors)

    def _share_ok(self, holder: int, owner: int, kind: str, blob: bytes) -> bool:
        """Whether ``blob`` is ``owner``'s signed ``kind`` share at ``holder``'s x-coordinate."""
        try:
            share = Share.from_bytes(blob[:SHARE_BYTES])
        except ShamirError:
            return False
        return share.x == holder + 1 and share_signature_ok(
            self._registry[owner], blob[SHARE_BYTES:], kind, params_digest=self.params.digest, dealer=owner,
            holder=holder, commitments_digest=self._bundles[owner].commitments_digest, share=blob[:SHARE_BYTES])

    def _response(self, key: object, raw: object) -> tuple[int, UnmaskResponse] | None:
        """(site, parsed response) of a site that was asked; None when ignored or dropped (logged)."""
        site = _site_id(self.params, key)
        signers = self._request.signatures if self._request is not None else {}
        if site is None or site not in signers:
            log.warning("ignoring unmask response from %r, which was not asked for one", key)
            return None
        try:
            if isinstance(raw, UnmaskResponse):
                resp = raw
            elif isinstance(raw, bytes):
                resp = UnmaskResponse.from_bytes(raw)
            else:
                raise ProtocolError(f"response is {type(raw).__name__}, not bytes")
            if resp.round_id != self.params.round_id or resp.site_id != site:
                raise ProtocolError("response is for another round or site")
        except SecAggError as exc:
            self._drop(site, "unmask", f"response rejected: {exc}")
            return None
        return site, resp

    def _collect_shares(self, responses: Mapping[Any, object]
                        ) -> tuple[dict[int, _Signed], dict[int, _Signed], dict[tuple[int, int], int]]:
        """Shares whose dealer signature verifies, by owner then holder, and the elements survivors
        share with proven cheats whose reveals verify; anything else is logged and skipped."""
        seeds: dict[int, _Signed] = {}
        keys: dict[int, _Signed] = {}
        revealed: dict[tuple[int, int], int] = {}
        asked = {cheat.proof.dealer for cheat in self._request.cheats} if self._request is not None else set()
        for key, raw in responses.items():
            if (parsed := self._response(key, raw)) is None:
                continue
            site, resp = parsed
            partners = self._masked_with[site]
            survived, dropped = self._survivors & (partners | {site}), partners - self._survivors
            for kind, shares, allowed, out in (("seed", resp.self_mask_shares, survived, seeds),
                                               ("key", resp.key_shares, dropped, keys)):
                for owner, blob in shares.items():
                    if owner not in allowed or not self._share_ok(site, owner, kind, blob):
                        self._drop(site, "unmask", f"unrequested, misaddressed or forged {kind} share of site "
                                                   f"{owner} (skipped)")
                        continue
                    out.setdefault(owner, {})[site] = blob
            for cheat, blob in resp.reveals.items():
                if (shared := self._revealed(site, cheat, blob, cheat in asked and cheat in dropped)) is not None:
                    revealed[site, cheat] = shared
        return seeds, keys, revealed

    def _revealed(self, site: int, cheat: int, blob: bytes, asked: bool) -> int | None:
        """The element ``site`` shares with ``cheat`` if its reveal was asked for and its signature and
        proof check; a signed reveal whose proof fails proves ``site`` a cheat (:attr:`bad_reveals`)."""
        try:
            reveal = KeyReveal.from_bytes(blob, site, cheat) if asked else None
        except PayloadError:
            reveal = None
        if reveal is None or not reveal.signature_ok(self._registry[site], self.params.digest):
            self._drop(site, "unmask", f"unrequested, malformed or forged element shared with site {cheat} (skipped)")
            return None
        if not reveal.proof_ok(self._commitments[site].mask_public, self._commitments[cheat].mask_public,
                               self.params.digest):
            if site not in self.cheats:
                self.bad_reveals[site] = reveal
                self.cheats[site] = (f"its signed element shared with proven cheat site {cheat} is not the one its "
                                     "proof shows")
                log.error("site %d cheated: %s", site, self.cheats[site])
            return None
        return reveal.shared

    def _open(self, owner: int, kind: str, shares: _Signed) -> int:
        """The committed secret of ``owner`` from ``threshold`` of its dealer-signed shares.

        The first ``threshold`` shares open it unless one is off the committed polynomial, which only
        a holder that skipped its stage-3 check can return: then each share is checked, the bad
        ones are proofs against the dealer (:attr:`proofs`), and the good ones open the secret."""
        t, what = self.params.threshold, "self-mask secret" if kind == "seed" else "mask key"
        if len(shares) < t:
            raise self._abort(f"only {len(shares)} valid shares of site {owner}'s {what}; threshold is {t}")
        committed = self._commitments[owner].of(kind)
        points = {holder: Share.from_bytes(blob[:SHARE_BYTES]) for holder, blob in sorted(shares.items())}
        secret = combine(list(points.values()), t)
        if exp_g(secret) == committed[0]:
            return secret
        good = {holder: point for holder, point in points.items() if share_ok(point, committed)}
        for holder in sorted(points.keys() - good.keys()):
            self._prove(CheatProof(owner, holder, kind, shares[holder][:SHARE_BYTES], shares[holder][SHARE_BYTES:]))
        if len(good) < t:
            raise self._abort(f"only {len(good)} shares of site {owner}'s {what} are on its commitments; "
                              f"threshold is {t}")
        return combine(list(good.values()), t)

    def _decode(self, total: npt.NDArray[np.uint64], honest: frozenset[int]) -> AggregateResult:
        params, n = self.params, len(honest)
        values, counts = total[: params.vector_length], total[params.vector_length:]
        self._uploads.clear()
        self._seeds.clear()
        self._shared.clear()
        self._stage = _Stage.DONE
        dropped = frozenset(params.site_ids) - honest
        if params.ring_bits:  # every element of the ring is a possible sum: nothing to clamp or dequantise
            return AggregateResult(sum_vector=values.astype(np.float64), counts=[], survivors=honest, dropped=dropped,
                                   error_bound=0.0)
        # Masks and shares are verified, so a sum beyond what n honest inputs can reach is a hostile
        # input: clamp it into range (its influence is then that of an in-range input) and say so.
        value_cap, count_cap = np.uint64(n * ((1 << params.value_bits) - 1)), np.uint64(n * params.max_count)
        clamped = int(np.count_nonzero(values > value_cap)) + int(np.count_nonzero(counts > count_cap))
        if clamped:
            log.warning("%d element(s) of the unmasked sum were out of range (a hostile input) and were clamped",
                        clamped)
        values, counts = np.minimum(values, value_cap), np.minimum(counts, count_cap)
        return AggregateResult(
            sum_vector=decode_sum(values, n, value_bits=params.value_bits, clip=params.clip),
            counts=[int(c) for c in counts],
            survivors=honest,
            dropped=dropped,
            error_bound=error_bound(n, params.value_bits, params.clip, params.rounding),
            clamped=clamped,
        )
