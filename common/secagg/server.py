"""Server side of the protocol: :class:`ServerAggregator`, a pure state machine (no Flower).

It relays keys and ciphertexts, sums masked vectors as they are accepted (individual vectors
are not kept), asks each survivor for exactly one kind of share per neighbour, and removes the
masks. Misbehaving or silent sites are dropped and logged; when fewer than ``threshold`` sites
remain, or a secret cannot be recovered, the round raises :class:`RoundAborted`.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.errors import ProtocolError, RoundAborted, SecAggError, ShamirError
from common.secagg.fixedpoint import decode_sum, error_bound, unpack_bits
from common.secagg.identity import SignedKeyBundle, check_bundle_keys, verify_key_bundle, x25519_shared_secret
from common.secagg.messages import MaskedUpload, UnmaskRequest, UnmaskResponse
from common.secagg.prg import (
    expand_mask,
    pairwise_mask_context,
    pairwise_seed,
    seed_commitment,
    self_mask_context,
)
from common.secagg.protocol import SecAggParams
from common.secagg.shamir import Share, combine

__all__ = ["AggregateResult", "ServerAggregator"]

log = logging.getLogger(__name__)

_MAX_COMBINE_TRIES = 128


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


def _seed_matches(bundle: SignedKeyBundle, seed: bytes) -> bool:
    return seed_commitment(seed, bundle.round_id, bundle.site_id) == bundle.seed_commitment


def _key_matches(bundle: SignedKeyBundle, private: bytes) -> bool:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw() == bundle.mask_public


def _subsets(shares: Sequence[Share], t: int) -> Iterator[list[Share]]:
    """Distinct ``t``-subsets: the first ``t`` shares, then those leaving out one of them, two..."""
    yield list(shares[:t])
    for r in range(1, len(shares) - t + 1):
        # Subsets of the first t + r shares that contain share t + r - 1 (new at this level).
        for excluded in itertools.combinations(range(t + r - 1), r):
            yield [shares[i] for i in range(t + r) if i not in excluded]


class _Stage(enum.IntEnum):
    BUNDLES = 0
    SHARES = 1
    MASKED = 2
    UNMASK = 3
    DONE = 4
    ABORTED = 5


class ServerAggregator:
    """One round of secure aggregation, server side. Call the four stages in order."""

    def __init__(self, params: SecAggParams, registry: Mapping[int, Ed25519PublicKey] | None = None) -> None:
        self.params = params
        self._registry = registry
        self._stage = _Stage.BUNDLES
        self._bundles: dict[int, SignedKeyBundle] = {}
        self._sent_to: dict[int, frozenset[int]] = {}
        self._partners: dict[int, frozenset[int]] = {}
        self._masked_with: dict[int, frozenset[int]] = {}
        self._survivors: frozenset[int] = frozenset()
        self._to_unmask: frozenset[int] = frozenset()
        self._requests: dict[int, UnmaskRequest] = {}
        self._total: npt.NDArray[np.uint64] | None = None

    def _enter(self, stage: _Stage, name: str) -> None:
        if self._stage is _Stage.ABORTED:
            raise RoundAborted("the round was aborted")
        if self._stage is not stage:
            raise ProtocolError(f"out-of-order {name}: server is at stage {self._stage.name}")

    def _require(self, alive: int, when: str) -> None:
        if alive < self.params.threshold:
            self._stage = _Stage.ABORTED
            self._total = None
            raise RoundAborted(f"only {alive} sites left {when}; threshold is {self.params.threshold}")

    # ------------------------------------------------------------------ stage 1
    def collect_bundles(self, bundles: Mapping[int, SignedKeyBundle | bytes]) -> dict[int, dict[int, SignedKeyBundle]]:
        """Stage 1: accept key bundles, return for each site the bundles of its live neighbours."""
        self._enter(_Stage.BUNDLES, "collect_bundles")
        for site, raw in bundles.items():
            if site not in self.params.site_ids:
                log.warning("ignoring key bundle from uninvited site %d", site)
                continue
            try:
                bundle = SignedKeyBundle.from_bytes(raw) if isinstance(raw, bytes) else raw
                if self._registry is not None:
                    verify_key_bundle(bundle, self._registry, round_id=self.params.round_id, site_id=site)
                elif bundle.site_id != site or bundle.round_id != self.params.round_id:
                    raise ProtocolError(f"bundle claims site {bundle.site_id} or another round")
                else:
                    check_bundle_keys(bundle)
            except SecAggError as exc:
                log.warning("site %d dropped at key advertisement: %s", site, exc)
                continue
            self._bundles[site] = bundle
        self._require(len(self._bundles), "after key advertisement")
        self._stage = _Stage.SHARES
        return {
            site: {peer: self._bundles[peer] for peer in self.params.neighbours(site) if peer in self._bundles}
            for site in self._bundles
        }

    # ------------------------------------------------------------------ stage 2
    def route_shares(self, outgoing: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2: route encrypted shares to per-receiver inboxes.

        A ciphertext from ``a`` to ``b`` is delivered only if ``b`` also sent one to ``a``, so
        both sides of a pair agree on whether to mask with each other.
        """
        self._enter(_Stage.SHARES, "route_shares")
        for site, cts in outgoing.items():
            if site not in self._bundles:
                log.warning("ignoring shares from site %d, which advertised no keys", site)
                continue
            allowed = self.params.neighbours(site) & self._bundles.keys()
            self._sent_to[site] = frozenset(r for r in cts if r in allowed)
        inbox: dict[int, dict[int, bytes]] = {site: {} for site in self._sent_to}
        for site, receivers in self._sent_to.items():
            for receiver in receivers:
                if site in self._sent_to.get(receiver, ()):
                    inbox[receiver][site] = outgoing[site][receiver]
        self._partners = {site: frozenset(box) for site, box in inbox.items()}
        self._require(len(self._sent_to), "after share exchange")
        self._stage = _Stage.MASKED
        return inbox

    # ------------------------------------------------------------------ stage 3
    def collect_masked(self, uploads: Mapping[int, bytes]) -> dict[int, UnmaskRequest]:
        """Stage 3: validate and sum masked vectors; return the unmask request for each survivor.

        A malformed upload (wrong round, wrong size, bad padding, impossible mask list) drops
        its sender. When two survivors disagree on whether they masked with each other (one
        rejected the other's shares), one of them is dropped (see :meth:`_resolve_unmatched`).
        """
        self._enter(_Stage.MASKED, "collect_masked")
        accepted: dict[int, MaskedUpload] = {}
        for site, raw in uploads.items():
            if site not in self._sent_to:
                log.warning("ignoring masked input from site %d, which shared no keys", site)
                continue
            try:
                upload = MaskedUpload.from_bytes(raw, self.params)
                if upload.site_id != site or not upload.masked_with <= self._partners[site]:
                    raise ProtocolError("upload names the wrong site or impossible mask partners")
            except SecAggError as exc:
                log.warning("site %d dropped at masked input: %s", site, exc)
                continue
            accepted[site] = upload
        self._masked_with = {s: up.masked_with for s, up in accepted.items()}
        survivors = self._resolve_unmatched(set(accepted))
        self._require(len(survivors), "after masked input")
        self._survivors = frozenset(survivors)
        self._masked_with = {s: self._masked_with[s] for s in survivors}
        self._to_unmask = frozenset().union(*self._masked_with.values()) - self._survivors
        self._check_recoverable()
        total = np.zeros(self.params.total_length, dtype=np.uint64)
        for site in sorted(self._survivors):
            total += unpack_bits(accepted[site].body, self.params.total_length, self.params.modulus_bits)
            total &= np.uint64(self.params.modulus_mask)
        self._total = total
        self._requests = {
            site: UnmaskRequest(
                round_id=self.params.round_id,
                site_id=site,
                survivors=self._survivors & self.params.holders(site),
                dropped=self._to_unmask & self.params.neighbours(site),
            )
            for site in self._survivors
        }
        self._stage = _Stage.UNMASK
        return dict(self._requests)

    def _valid_holders(self, site: int, survivors: set[int] | frozenset[int]) -> int:
        """Survivors other than ``site`` holding its shares intact (they masked with it)."""
        return sum(1 for h in survivors if h != site and site in self._masked_with[h])

    def _resolve_unmatched(self, survivors: set[int]) -> set[int]:
        """Drop one site of each pair where only one side added the pairwise mask.

        That happens when a receiver rejected the sender's shares (tampered in transit, or a
        malicious sender). The sender, whose vector holds the unmatched mask, is dropped if
        enough intact holders of its key remain; otherwise the receiver is.
        """
        for site in sorted(survivors):
            for peer in sorted(self._masked_with[site]):
                if site not in survivors:
                    break
                if peer in survivors and site not in self._masked_with[peer]:
                    sender_ok = self._valid_holders(site, survivors) >= self.params.threshold
                    victim = site if sender_ok else peer
                    log.warning("site %d dropped: site %d rejected the shares of site %d", victim, peer, site)
                    survivors.discard(victim)
        return survivors

    def _check_recoverable(self) -> None:
        for site in sorted(self._survivors):
            held = self._valid_holders(site, self._survivors) + 1
            self._require(held, f"holding shares of site {site}'s self mask")
        for site in sorted(self._to_unmask):
            self._require(self._valid_holders(site, self._survivors), f"holding shares of dropped site {site}'s key")

    # ------------------------------------------------------------------ stage 4
    def finish(self, responses: Mapping[int, UnmaskResponse | bytes]) -> AggregateResult:
        """Stage 4: recover secrets from the survivors' shares, remove every mask, decode."""
        self._enter(_Stage.UNMASK, "finish")
        params, total = self.params, self._total
        assert total is not None
        seed_shares, key_shares = self._collect_shares(responses)
        modmask = np.uint64(params.modulus_mask)
        length, bits, round_id = params.total_length, params.modulus_bits, params.round_id
        for site in sorted(self._survivors):
            bundle = self._bundles[site]
            seed = self._recover(
                seed_shares.get(site, []), f"self-mask seed of site {site}",
                functools.partial(_seed_matches, bundle),
            )
            total -= expand_mask(seed, length, bits, self_mask_context(round_id, site))
            total &= modmask
        for dropped in sorted(self._to_unmask):
            raw = self._recover(
                key_shares.get(dropped, []), f"mask key of dropped site {dropped}",
                functools.partial(_key_matches, self._bundles[dropped]),
            )
            key = X25519PrivateKey.from_private_bytes(raw)
            for site in sorted(s for s in self._survivors if dropped in self._masked_with[s]):
                shared = x25519_shared_secret(key, self._bundles[site].mask_public)
                seed = pairwise_seed(shared, round_id, site, dropped)
                pair = expand_mask(seed, length, bits, pairwise_mask_context(round_id, site, dropped))
                total = (total - pair if site < dropped else total + pair) & modmask
        return self._decode(total)

    def _collect_shares(
        self, responses: Mapping[int, UnmaskResponse | bytes]
    ) -> tuple[dict[int, list[Share]], dict[int, list[Share]]]:
        seeds: dict[int, list[Share]] = {}
        keys: dict[int, list[Share]] = {}
        for site, raw in sorted(responses.items()):
            request = self._requests.get(site)
            if request is None:
                log.warning("ignoring unmask response from non-survivor %d", site)
                continue
            try:
                resp = UnmaskResponse.from_bytes(raw) if isinstance(raw, bytes) else raw
                if resp.round_id != self.params.round_id or resp.site_id != site:
                    raise ProtocolError("response is for another round or site")
            except SecAggError as exc:
                log.warning("unmask response of site %d rejected: %s", site, exc)
                continue
            for shares, allowed, out in ((resp.self_mask_shares, request.survivors, seeds),
                                         (resp.key_shares, request.dropped, keys)):
                for owner, blob in shares.items():
                    try:
                        share = Share.from_bytes(blob)
                    except ShamirError as exc:
                        log.warning("malformed share of %d from site %d skipped: %s", owner, site, exc)
                        continue
                    if owner in allowed and share.x == site + 1:
                        out.setdefault(owner, []).append(share)
                    else:
                        log.warning("unrequested or misaddressed share of %d from site %d skipped", owner, site)
        return seeds, keys

    def _recover(self, shares: Sequence[Share], what: str, check: Callable[[bytes], bool]) -> bytes:
        """Combine ``threshold`` shares, trying other subsets until ``check`` accepts the secret."""
        t = self.params.threshold
        if len(shares) < t:
            self._require(len(shares), f"holding shares of the {what}")
        for subset in itertools.islice(_subsets(shares, t), _MAX_COMBINE_TRIES):
            try:
                secret = combine(subset, t)
            except ShamirError:
                continue
            if check(secret):
                return secret
        self._stage = _Stage.ABORTED
        raise RoundAborted(f"could not recover the {what}: shares are inconsistent")

    def _decode(self, total: npt.NDArray[np.uint64]) -> AggregateResult:
        params, n = self.params, len(self._survivors)
        values, counts = total[: params.vector_length], total[params.vector_length:]
        too_big = int(values.max()) > n * ((1 << params.value_bits) - 1) or (
            counts.size > 0 and int(counts.max()) > n * params.max_count
        )
        self._total = None
        if too_big:
            self._stage = _Stage.ABORTED
            raise RoundAborted("unmasked sum is out of range: a share or an input was corrupted")
        self._stage = _Stage.DONE
        return AggregateResult(
            sum_vector=decode_sum(values, n, value_bits=params.value_bits, clip=params.clip),
            counts=[int(c) for c in counts],
            survivors=self._survivors,
            dropped=frozenset(params.site_ids) - self._survivors,
            error_bound=error_bound(n, params.value_bits, params.clip, params.rounding),
        )
