"""Server side of the protocol: :class:`ServerAggregator`, a pure state machine (no Flower).

    BUNDLES --collect_bundles--> SHARES --route_shares--> MASKED --collect_masked--> CONFIRM
        --collect_confirmations--> UNMASK --collect_unmask--> READY --finish--> DONE
                         proven liars: UNMASK --collect_unmask--> EXPOSE --collect_exposures--> READY
                                                                  (too few sites: ABORTED)

It relays keys and ciphertexts, keeps each accepted masked vector (packed) until the end, fixes
the survivor set S, collects the survivors' signatures on S (consistency round), sends ONE unmask
request (S and the signatures) to every signer, and removes the masks from the shares they
reveal. Every input is untrusted: a malformed or misbehaving site is dropped with a logged reason
(never an exception out of the round); when fewer than ``threshold`` sites remain for some
secret, the round raises :class:`RoundAborted`.

Revealed shares carry their dealer's signature and are checked one by one, so a holder's corrupt
share is discarded (and named) without any combinatorial search; a set of correctly signed shares
that does not open the dealer's commitment proves the DEALER cheated (:attr:`liars`, :attr:`proofs`).
A survivor L proven to have dealt a bad self-mask seed is removed, not fatal: the server sends the
proof to L's share holders among the survivors (expose stage), each checks it and reveals its
share of L's mask key; the server then leaves L's whole upload out of the sum and strips the
pairwise masks between L and the survivors, as for a dropped site. A liar whose mask key cannot be
recovered (fewer than t holders, or key shares that do not open its mask public key) ends the round.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.errors import ProtocolError, RoundAborted, SecAggError, ShamirError
from common.secagg.fixedpoint import decode_sum, error_bound, unpack_bits
from common.secagg.identity import (
    SIGNATURE_BYTES,
    SignedKeyBundle,
    check_bundle_keys,
    share_signature_ok,
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
from common.secagg.prg import expand_mask, pairwise_mask_context, pairwise_seed, self_mask_context
from common.secagg.proof import LiarProof, check_proof, opens_commitment
from common.secagg.protocol import SecAggParams, graph_seed
from common.secagg.shamir import SHARE_BYTES, Share, combine

__all__ = ["SHARE_CIPHERTEXT_BYTES", "AggregateResult", "ServerAggregator"]

_R = TypeVar("_R", ExposeResponse, UnmaskResponse)
log = logging.getLogger(__name__)

SHARE_CIPHERTEXT_BYTES = 12 + 8 + 2 * (SHARE_BYTES + SIGNATURE_BYTES) + 16
"""Exact size of one stage-2 ciphertext: nonce, (dealer, holder, 2 signed shares), AEAD tag."""


@dataclass(frozen=True)
class AggregateResult:
    """The only thing the round reveals: the sum over survivors, and who they were."""

    sum_vector: npt.NDArray[np.float64]
    """Decoded sum of the survivors' values (length ``vector_length``)."""
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
    DONE = 5
    ABORTED = 6
    EXPOSE = 7
    READY = 8


_Signed = dict[int, bytes]  # holder -> a share of one owner's secret, then the owner's signature on it
_LIAR_REASON = "dealt shares inconsistent with its commitment"


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
        self._graph: dict[int, frozenset[int]] = {}
        self._live: set[int] = set()
        self._sent_to: dict[int, frozenset[int]] = {}
        self._partners: dict[int, frozenset[int]] = {}
        self._masked_with: dict[int, frozenset[int]] = {}
        self._survivors: frozenset[int] = frozenset()
        self._to_unmask: frozenset[int] = frozenset()
        self._request: UnmaskRequest | None = None
        self._uploads: dict[int, bytes] = {}
        self._seeds: dict[int, bytes] = {}
        self._keys: dict[int, bytes] = {}
        self._expose_to: dict[int, frozenset[int]] = {}
        self.dropped_reasons: dict[int, str] = {}
        """Why each site left the round or had an answer ignored (first reason), for failure reports."""
        self.liars: dict[int, str] = {}
        """Sites proven to have cheated (their own signatures are the proof)."""
        self.proofs: dict[int, LiarProof] = {}
        """The proof against each liar: its own signed shares that do not open its commitment."""

    def _enter(self, stage: _Stage, name: str) -> None:
        if self._stage is _Stage.ABORTED:
            raise RoundAborted("the round was aborted")
        if self._stage is not stage:
            raise ProtocolError(f"out-of-order {name}: server is at stage {self._stage.name}")

    def _abort(self, why: str) -> RoundAborted:
        self._stage = _Stage.ABORTED
        self._uploads.clear()
        self._seeds.clear()
        self._keys.clear()
        return RoundAborted(why)

    def _require(self, alive: int, when: str) -> None:
        if alive < self.params.threshold:
            raise self._abort(f"only {alive} sites left {when}; threshold is {self.params.threshold}")

    def _drop(self, site: int, stage: str, why: object) -> None:
        log.warning("site %d dropped at %s: %s", site, stage, why)
        self.dropped_reasons.setdefault(site, f"{stage}: {why}")

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
        """Stage 2: route encrypted shares to per-receiver inboxes.

        A ciphertext from ``a`` to ``b`` is delivered only if ``b`` also sent one to ``a``, so
        both sides of a pair agree on whether to mask with each other. A site whose reply is not
        a map of neighbour ids to ciphertexts of the exact size is dropped.
        """
        self._enter(_Stage.SHARES, "route_shares")
        clean: dict[int, dict[int, bytes]] = {}
        for key, cts in outgoing.items():
            site = _site_id(self.params, key)
            if site is None or site not in self._live:
                log.warning("ignoring shares from site %r, which advertised no valid keys", key)
                continue
            allowed = self._graph[site] & self._live
            if not isinstance(cts, Mapping) or not all(
                    _site_id(self.params, r) in allowed and isinstance(c, bytes) and len(c) == SHARE_CIPHERTEXT_BYTES
                    for r, c in cts.items()):
                self._drop(site, "share exchange", "malformed share ciphertexts")
                continue
            clean[site] = dict(cts)
            self._sent_to[site] = frozenset(clean[site])
        inbox: dict[int, dict[int, bytes]] = {site: {} for site in self._sent_to}
        for site, receivers in self._sent_to.items():
            for receiver in receivers:
                if site in self._sent_to.get(receiver, ()):
                    inbox[receiver][site] = clean[site][receiver]
        self._partners = {site: frozenset(box) for site, box in inbox.items()}
        self._require(len(self._sent_to), "after share exchange")
        self._stage = _Stage.MASKED
        return inbox

    # ------------------------------------------------------------------ stage 3
    def collect_masked(self, uploads: Mapping[Any, object]) -> SurvivorSet:
        """Stage 3: validate and sum masked vectors; return the survivor set S to send to all of S.

        A malformed upload (wrong round, wrong size, bad padding, impossible mask list) drops its
        sender. When only one side of a pair masked (the other rejected its shares), the sender
        of the rejected shares is dropped; sites whose masks could then not be removed follow.
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
                if upload.site_id != site or not upload.masked_with <= self._partners[site]:
                    raise ProtocolError("upload names the wrong site or impossible mask partners")
            except SecAggError as exc:
                self._drop(site, "masked input", exc)
                continue
            accepted[site] = upload
        self._masked_with = {s: up.masked_with for s, up in accepted.items()}
        survivors = self._settle(set(accepted))
        self._require(len(survivors), "after masked input")
        self._survivors = frozenset(survivors)
        self._masked_with = {s: self._masked_with[s] for s in survivors}
        self._to_unmask = frozenset().union(*self._masked_with.values()) - self._survivors
        self._uploads = {site: accepted[site].body for site in self._survivors}  # packed, until finish
        self._stage = _Stage.CONFIRM
        return SurvivorSet(self.params.round_id, self._survivors)

    def _held_by(self, among: set[int] | frozenset[int]) -> dict[int, set[int]]:
        """Owner -> the sites in ``among`` that masked with it, hence hold its shares intact."""
        held: dict[int, set[int]] = {}
        for holder in among:
            for owner in self._masked_with[holder]:
                held.setdefault(owner, set()).add(holder)
        return held

    def _settle(self, alive: set[int]) -> set[int]:
        """Resolve pairs where only one side masked (the receiver rejected the sender's shares), then
        drop sites whose self-mask or whose partners' masks could not be removed.

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
            for gone in sorted(held.keys() - alive):
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
            self._require(len(held.get(gone, ())), f"to reveal dropped site {gone}'s key shares")
        self._request = UnmaskRequest(self.params.round_id, self._survivors, valid)
        self._stage = _Stage.UNMASK
        return self._request

    # ------------------------------------------------------------------ stage 5
    def collect_unmask(self, responses: Mapping[Any, object]) -> dict[int, ExposeRequest]:
        """Stage 5: check each revealed share's dealer signature and recover every needed secret.

        Returns the expose request for each holder of a proven liar's shares (stage 6), or ``{}``
        when nothing was proven (then call :meth:`finish`). Aborts when some secret has fewer than
        ``threshold`` valid shares, when a dropped site's key shares are proven bad (the pairwise
        masks it shares with survivors cannot be removed), or when fewer than ``threshold``
        survivors hold a liar's mask-key shares.
        """
        self._enter(_Stage.UNMASK, "collect_unmask")
        seed_shares, key_shares = self._collect_shares(responses)
        for site in sorted(self._survivors):
            if (seed := self._open(site, "seed", seed_shares.get(site, {}))) is not None:
                self._seeds[site] = seed
        for dropped in sorted(self._to_unmask):
            if (key := self._open(dropped, "key", key_shares.get(dropped, {}))) is None:
                raise self._abort(f"dropped site {dropped} cheated: {self.liars[dropped]}; the pairwise masks "
                                  "it shares with the survivors cannot be removed")
            self._keys[dropped] = key
        liars = sorted(self._survivors - self._seeds.keys())
        for liar in liars:
            holders = frozenset(s for s in self._survivors if s != liar and liar in self._masked_with[s])
            if len(holders) < self.params.threshold:
                raise self._abort(f"site {liar} cheated ({self.liars[liar]}) and only {len(holders)} survivors hold "
                                  f"its mask-key shares; threshold is {self.params.threshold}")
            for holder in holders:
                self._expose_to[holder] = self._expose_to.get(holder, frozenset()) | {liar}
        self._stage = _Stage.EXPOSE if liars else _Stage.READY
        return {holder: ExposeRequest(self.params.round_id, tuple(self.proofs[liar] for liar in sorted(owners)))
                for holder, owners in sorted(self._expose_to.items())}

    # ------------------------------------------------------------------ stage 6 (only with proven liars)
    def collect_exposures(self, responses: Mapping[Any, object]) -> None:
        """Stage 6: recover each liar's mask key from its holders' signed shares; aborts when fewer
        than ``threshold`` valid shares arrive or they do not open the liar's mask public key."""
        self._enter(_Stage.EXPOSE, "collect_exposures")
        digest = self.params.digest
        shares: dict[int, dict[int, bytes]] = {}
        for key, raw in responses.items():
            if (parsed := self._response(key, raw, ExposeResponse, self._expose_to, "expose")) is None:
                continue
            site, resp = parsed
            for owner, blob in resp.key_shares.items():
                if owner in self._expose_to[site] and self._share_ok(site, owner, "key", blob, digest):
                    shares.setdefault(owner, {})[site] = blob
                else:
                    self._drop(site, "expose", f"unrequested, misaddressed or forged key share of site {owner} "
                                               "(skipped)")
        for liar in sorted(self._survivors - self._seeds.keys()):
            if (key := self._open(liar, "key", shares.get(liar, {}))) is None:
                raise self._abort(f"site {liar} cheated on its mask key too: it cannot be removed from the sum")
            self._keys[liar] = key
        self._stage = _Stage.READY

    def finish(self, responses: Mapping[Any, object] | None = None) -> AggregateResult:
        """Remove every mask and decode the sum over the honest survivors.

        Called when READY; or at UNMASK with the unmask responses, as a shortcut for
        :meth:`collect_unmask` that raises :class:`ProtocolError` (state kept) if it proves a liar.
        """
        if self._stage is _Stage.UNMASK and responses is not None and self.collect_unmask(responses):
            raise ProtocolError(f"sites {sorted(self._survivors - self._seeds.keys())} were proven to cheat: "
                                "run the expose stage (collect_exposures) before finish")
        self._enter(_Stage.READY, "finish")
        params = self.params
        honest = frozenset(self._seeds)
        modmask = np.uint64(params.modulus_mask)
        length, bits, round_id = params.total_length, params.modulus_bits, params.round_id
        total = np.zeros(length, dtype=np.uint64)
        for site in sorted(honest):
            total = (total + unpack_bits(self._uploads[site], length, bits)
                     - expand_mask(self._seeds[site], length, bits, self_mask_context(round_id, site))) & modmask
        for gone, raw in sorted(self._keys.items()):  # dropped sites and removed liars
            key = X25519PrivateKey.from_private_bytes(raw)
            for site in sorted(s for s in honest if gone in self._masked_with[s]):
                shared = x25519_shared_secret(key, self._bundles[site].mask_public)
                seed = pairwise_seed(shared, round_id, site, gone)
                pair = expand_mask(seed, length, bits, pairwise_mask_context(round_id, site, gone))
                total = (total - pair if site < gone else total + pair) & modmask
        return self._decode(total, honest)

    def _share_ok(self, holder: int, owner: int, kind: str, blob: bytes, digest: bytes) -> bool:
        """Whether ``blob`` is ``owner``'s signed ``kind`` share at ``holder``'s x-coordinate."""
        try:
            share = Share.from_bytes(blob[:SHARE_BYTES])
        except ShamirError:
            return False
        return share.x == holder + 1 and share_signature_ok(
            self._registry[owner], blob[SHARE_BYTES:], kind, params_digest=digest, dealer=owner, holder=holder,
            share=blob[:SHARE_BYTES])

    def _response(self, key: object, raw: object, kind: type[_R], eligible: Collection[int],
                  stage: str) -> tuple[int, _R] | None:
        """(site, parsed response) of a site that was asked; None when ignored or dropped (logged)."""
        site = _site_id(self.params, key)
        if site is None or site not in eligible:
            log.warning("ignoring %s response from %r, which was not asked for one", stage, key)
            return None
        try:
            if isinstance(raw, kind):
                resp = raw
            elif isinstance(raw, bytes):
                resp = kind.from_bytes(raw)
            else:
                raise ProtocolError(f"response is {type(raw).__name__}, not bytes")
            if resp.round_id != self.params.round_id or resp.site_id != site:
                raise ProtocolError("response is for another round or site")
        except SecAggError as exc:
            self._drop(site, stage, f"response rejected: {exc}")
            return None
        return site, resp

    def _collect_shares(self, responses: Mapping[Any, object]) -> tuple[dict[int, _Signed], dict[int, _Signed]]:
        """Shares whose dealer signature verifies, by owner then holder; anything else is logged and skipped."""
        seeds: dict[int, _Signed] = {}
        keys: dict[int, _Signed] = {}
        digest = self.params.digest
        signers = self._request.signatures if self._request is not None else {}
        for key, raw in responses.items():
            if (parsed := self._response(key, raw, UnmaskResponse, signers, "unmask")) is None:
                continue
            site, resp = parsed
            partners = self._masked_with[site]
            survived, dropped = self._survivors & (partners | {site}), partners - self._survivors
            for kind, shares, allowed, out in (("seed", resp.self_mask_shares, survived, seeds),
                                               ("key", resp.key_shares, dropped, keys)):
                for owner, blob in shares.items():
                    if owner not in allowed or not self._share_ok(site, owner, kind, blob, digest):
                        self._drop(site, "unmask", f"unrequested, misaddressed or forged {kind} share of site "
                                                   f"{owner} (skipped)")
                        continue
                    out.setdefault(owner, {})[site] = blob
        return seeds, keys

    def _open(self, owner: int, kind: str, shares: _Signed) -> bytes | None:
        """The secret of ``threshold`` dealer-signed shares (no subset search is ever needed), or None
        when they do not open the owner's commitment: then the shares are the proof (:attr:`proofs`)."""
        t, what = self.params.threshold, "self-mask seed" if kind == "seed" else "mask key"
        if len(shares) < t:
            raise self._abort(f"only {len(shares)} valid shares of site {owner}'s {what}; threshold is {t}")
        try:
            secret = combine([Share.from_bytes(shares[h][:SHARE_BYTES]) for h in sorted(shares)], t)
        except ShamirError:
            secret = None
        if secret is not None and opens_commitment(kind, secret, self._bundles[owner]):
            return secret
        proof = LiarProof(owner, kind, dict(shares))
        check_proof(proof, self.params, self._registry[owner], self._bundles[owner])  # holds by construction
        self.proofs[owner] = proof
        self.liars[owner] = f"dealt signed {what} shares inconsistent with its signed commitment"
        self.dropped_reasons[owner] = f"unmask: {_LIAR_REASON}"
        log.error("site %d %s", owner, self.liars[owner])
        return None

    def _decode(self, total: npt.NDArray[np.uint64], honest: frozenset[int]) -> AggregateResult:
        params, n = self.params, len(honest)
        values, counts = total[: params.vector_length], total[params.vector_length:]
        # Masks and shares are verified, so a sum beyond what n honest inputs can reach is a hostile
        # input: clamp it into range (its influence is then that of an in-range input) and say so.
        value_cap, count_cap = np.uint64(n * ((1 << params.value_bits) - 1)), np.uint64(n * params.max_count)
        clamped = int(np.count_nonzero(values > value_cap)) + int(np.count_nonzero(counts > count_cap))
        if clamped:
            log.warning("%d element(s) of the unmasked sum were out of range (a hostile input) and were clamped",
                        clamped)
        values, counts = np.minimum(values, value_cap), np.minimum(counts, count_cap)
        self._uploads.clear()
        self._seeds.clear()
        self._keys.clear()
        self._stage = _Stage.DONE
        return AggregateResult(
            sum_vector=decode_sum(values, n, value_bits=params.value_bits, clip=params.clip),
            counts=[int(c) for c in counts],
            survivors=honest,
            dropped=frozenset(params.site_ids) - honest,
            error_bound=error_bound(n, params.value_bits, params.clip, params.rounding),
            clamped=clamped,
        )
