"""Secure aggregation driven over Flower's Grid: five message exchanges per round.

    train                 global adapter + round parameters → signed round keys  (sites train first)
    train.secagg_share    signed keys (neighbours', or all)  → commitments, encrypted signed Shamir shares
    train.secagg_mask     shares and commitments addressed   → masked contribution, and proofs against
                          to the site                          dealers whose shares are off their commitments
    train.secagg_confirm  the survivor set S                 → the site's signature on S (consistency round)
    train.secagg_unmask   S + the signatures on S            → shares for survivors XOR dropped sites

The server (common.secagg.ServerAggregator) learns only the sum of the surviving sites' weighted
updates; their weights are public (equal, or declared by each site) and the server sums them
itself, so no site can fake the divisor. Every reply is untrusted: a site whose reply fails, is
late, or is malformed in any way (wrong types, missing or non-numeric keys, wrong sizes) is
dropped with a logged reason; nothing a site sends can raise out of the round. Below the
threshold the round ends without changing the model.

Cheats are kept out of the run's later rounds (:class:`Standing`; the caller persists it and names
them in its audit log): a site proven to have dealt a share off its own signed commitments, or to
have signed a key reveal whose proof fails (common.secagg.dleq), at once; a site with
:data:`STRIKES_TO_KEEP_OUT` strikes, after the round of the last one. A dispute is a holder
rejecting a dealer's shares with no proof (an AEAD failure, a bad signature): either may be lying,
so it is one strike on EACH side, per round and counterpart (counted against the accuser alone, one
dealer that encrypts garbage to everyone would get every honest site kept out in two rounds). A
holder whose "proof" shows the dealer's share was good takes the strike alone. So a site in disputes
with two peers in one round (a dealer of garbage to two holders, a holder rejecting two dealers) is
out after that round, a refuted accuser after its second refuted proof, and a site that disputes the
same honest peer in two rounds takes that one peer out with it: hostile sites can keep out at most
about as many honest sites as there are of them. Sites are told nothing beyond the round's site
list.

Distributed DP (privacy.dp-mode = distributed): before the train exchange the coordinator asks each site for its
public size (``query.public_size``: declared, or its DP estimate), sends their sum with the adapter, and runs the
same five exchanges in ring mode: each site's upload is its noisy integer gradient sum mod 2^b
(common/distributed_round.py), followed in an evaluation round by its noisy evaluation counts; the server's result
is the ring sum, the round's delta is the server step's direction (server/distributed_step.py), and the counts'
sum is the federated evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.adapter import AdapterState
from common.config import RunSettings, SecureAggSettings
from common.distributed_dp import DistributedDpPlan, rotation_seed
from common.distributed_round import ring_round, round_honest_sites
from common.records import (
    KeyAdvertisement,
    PrivacyReport,
    PublicSize,
    RoundNoise,
    WireError,
    pack_size_query,
    pack_stage,
    pack_train_request,
    unpack_identity,
    unpack_key_advertisement,
    unpack_public_size,
    unpack_stage,
)
from common.registry import FederationRegistry
from common.secagg import RoundAborted, SecAggParams, ServerAggregator
from common.secure_update import MAX_COUNT, SecureSum, decode_sum, params_to_bytes, round_params, secure_round_id
from server.distributed_step import distributed_delta
from server.ledger_watch import EPSILON_REFUSED, LedgerWatch
from server.strategy import (
    Failure,
    RoundOutcome,
    RoundSpec,
    SecureRoundDetails,
    exchange,
    failure_record,
    missing_replies,
    request_for,
)

log = logging.getLogger("fedtune.server")
T = TypeVar("T")
_SITE_KEY = re.compile(r"[0-9]{1,10}")
STRIKES_TO_KEEP_OUT = 2


@dataclasses.dataclass
class Standing:
    """A run's record of proven cheats and unsettled disputes, by site name: who is kept out of its
    later rounds, and why. Kept in the run's state as a JSON record (common.run_files.write_record, read_record)."""

    proven: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Site -> {"round", "why", "proof"}: the proof is self-contained (hex), common.secagg.proof or .dleq."""
    strikes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Site -> one line per unsettled dispute it was party to (per round and counterpart)."""

    def kept_out(self) -> dict[str, str]:
        """Site -> why it is not invited again in this run."""
        out = {site: f"proven cheat in round {entry['round']}: {entry['why']}" for site, entry in self.proven.items()}
        for site, strikes in sorted(self.strikes.items()):
            if len(strikes) >= STRIKES_TO_KEEP_OUT:
                out.setdefault(site, f"{len(strikes)} unsettled disputes: " + "; ".join(strikes))
        return out

    def record(self, server_round: int, aggregator: ServerAggregator, name_of: Callable[[int], str]) -> None:
        """Add what one round proved (cheats) and left unsettled (disputes, false accusations)."""
        for site, why in sorted(aggregator.cheats.items()):
            self.proven.setdefault(name_of(site), {"round": server_round, "why": why,
                                                   "proof": aggregator.evidence(site)})

        def strike(site: int, line: str) -> None:
            self.strikes.setdefault(name_of(site), []).append(f"round {server_round}: {line}")

        for holder, dealer in sorted(aggregator.unproven):
            strike(holder, f"rejected the shares of {name_of(dealer)} without a proof")
            strike(dealer, f"its shares were rejected by {name_of(holder)} without a proof")
        for holder, dealer in sorted(aggregator.false_accusers.items()):
            strike(holder, f"accused {name_of(dealer)} with a share that is on its commitments")


class SecureAggregation:
    name = "secure"

    def __init__(self, spec: RoundSpec, settings: SecureAggSettings, registry: FederationRegistry,
                 watch: LedgerWatch | None = None, distributed: RunSettings | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.distributed = distributed
        """The run's settings in distributed DP mode (ring rounds of one DP-SGD step); None: fixed-point rounds."""
        self.registry = registry
        self.watch = watch
        self.site_of_node: dict[int, int] = {}
        self.standing = Standing()

    # ------------------------------------------------------------------ who is who
    def identify(self, grid: Grid, node_ids: list[int]) -> list[Failure]:
        """Ask nodes we have not seen for their site name; unknown or malformed answers are refused and logged, and
        a node that does not answer is recorded by its node id (it is left out of the round, never silently)."""
        unknown = [node for node in node_ids if node not in self.site_of_node]
        messages = {node: Message(RecordDict({}), dst_node_id=node, message_type="query.identify") for node in unknown}
        replies = exchange(grid, messages, self.spec.stage_timeout) if messages else {}
        failures = missing_replies([f"node {node}" for node in unknown if node not in replies], self.spec.stage_timeout,
                                   "query.identify")
        for node, reply in replies.items():
            try:
                if (failure := failure_record(reply, str(node))) is not None:
                    failures.append(failure)
                    continue
                name = unpack_identity(reply.content)
            except (WireError, KeyError, TypeError, AttributeError, ValueError) as exc:
                failures.append(Failure(str(node), "protocol", f"malformed identify reply: {exc}"[:300]))
                log.warning("node %d sent a malformed identify reply: refused", node)
                continue
            if name not in self.registry.ids:
                failures.append(Failure(str(name)[:100], "unknown-site", "not in the federation's registry"))
                log.warning("node %d claims to be site %r, which is not in the registry: refused", node, name)
                continue
            self.site_of_node[node] = self.registry.ids[name]
        return failures

    # ------------------------------------------------------------------ one round
    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int) -> RoundOutcome:
        spec = self.spec
        started = time.perf_counter()
        failures = self.identify(grid, node_ids)
        seconds: dict[str, float] = {"identify": round(time.perf_counter() - started, 3)}  # per exchange
        kept_out = self.standing.kept_out()
        node_of_site = {}
        for node in node_ids:
            if (site := self.site_of_node.get(node)) is None:
                continue
            if (name := self.registry.name_of(site)) in kept_out:  # not invited: the sites learn only the site list
                failures.append(Failure(name, "kept-out", kept_out[name]))
                continue
            node_of_site[site] = node
        privacy: dict[str, PrivacyReport] = {}
        if len(node_of_site) < max(2, spec.min_sites):
            return self._aborted(server_round, f"{len(node_of_site)} identified site(s)", failures, privacy)
        ring, noise = None, None
        if self.distributed is not None:
            sizes = self._public_sizes(grid, node_of_site, server_round, failures, seconds)
            node_of_site = {site: node for site, node in node_of_site.items() if site in sizes}
            if len(node_of_site) < max(2, spec.min_sites):
                return self._aborted(server_round, f"{len(node_of_site)} site(s) sent a public size", failures,
                                     privacy)
            public_total = sum(size.units for size in sizes.values())
            ring = ring_round(self.distributed, dimension=spec.update_size, sites=len(node_of_site),
                              public_total=public_total, server_round=server_round)
        count_slots = spec.evaluation.slots_in(server_round) if spec.evaluation else 0
        params = round_params(self.settings, run_id=grid.run.run_id, server_round=server_round,
                              site_ids=sorted(node_of_site),  # ring mode: the counts follow the d' coordinates
                              vector_length=ring.vector_length if ring else spec.update_size,
                              members_digest=self.registry.digest, count_slots=0 if ring else count_slots,
                              ring_bits=ring.plan.ring_bits if ring else 0)
        if ring:  # one share μ/h for all: h the fewest honest sites any site assumes, bound into the round id
            noise = RoundNoise(public_total, round_honest_sites((sizes[site].honest_sites for site in node_of_site),
                                                                params.threshold))
            params = dataclasses.replace(params, round_id=secure_round_id(grid.run.run_id, server_round,
                                                                          ring.digest(noise.honest_sites)))
        aggregator = ServerAggregator(params, self.registry.keys)
        weights: dict[int, int] = {}  # public by construction; the server sums them itself

        def stage(message_type: str, content: Callable[[int], RecordDict],
                  only: Collection[int] | None = None) -> dict[int, dict[str, bytes]]:
            return self._exchange(grid, node_of_site, params, message_type, content, failures, only, unpack_stage,
                                  seconds)

        try:
            request = pack_train_request(state, server_round, params_to_bytes(params), noise)
            adverts = self._exchange(grid, node_of_site, params, "train",
                                     lambda site: request_for(request, self.watch, self.registry.name_of(site)),
                                     failures, None, functools.partial(_advertisement, max_weight=spec.max_weight),
                                     seconds)
            self._refuse_rolled_back(adverts, failures, server_round)
            privacy.update({self.registry.name_of(site): advert.privacy for site, advert in adverts.items()})
            weights.update({site: advert.weight for site, advert in adverts.items()})
            routed = aggregator.collect_bundles({site: advert.bundle for site, advert in adverts.items()})
            answers = stage("train.secagg_share", lambda site: pack_stage(
                params.round_id, {str(peer): bundle.to_bytes() for peer, bundle in routed[site].items()}), routed)
            inboxes = aggregator.route_shares(self._payloads(answers, "payload", "train.secagg_share", failures))
            answers = stage("train.secagg_mask", lambda site: pack_stage(
                params.round_id, {str(sender): ct for sender, ct in inboxes[site].items()}), inboxes)
            survivors = aggregator.collect_masked(self._payloads(answers, "payload", "train.secagg_mask", failures))
            confirm = pack_stage(params.round_id, {"payload": survivors.to_bytes()})
            answers = stage("train.secagg_confirm", lambda site: confirm, survivors.survivors)
            unmask_request = aggregator.collect_confirmations(
                self._payloads(answers, "payload", "train.secagg_confirm", failures))
            unmask = pack_stage(params.round_id, {"payload": unmask_request.to_bytes()})
            answers = stage("train.secagg_unmask", lambda site: unmask, unmask_request.signatures)
            started = time.perf_counter()
            result = aggregator.finish(self._payloads(answers, "payload", "train.secagg_unmask", failures))
            seconds["unmask_sum"] = round(time.perf_counter() - started, 3)
        except RoundAborted as exc:
            return self._aborted(server_round, str(exc), failures, privacy, aggregator)
        finally:
            self.standing.record(server_round, aggregator, self.registry.name_of)
        failures.extend(self._dropped(aggregator))
        contributors = len(result.survivors)
        if contributors < spec.min_sites:
            return self._aborted(server_round, f"{contributors} survivor(s)", failures, privacy)
        if ring and noise:
            total, counts = self._distributed_sum(ring.plan, result.sum_vector, grid.run.run_id, server_round,
                                                  contributors, noise.honest_sites)
        else:
            total = decode_sum(result, self.settings, params, sum(weights[site] for site in result.survivors))
            counts = result.counts
        details = SecureRoundDetails(
            survivors=sorted(self.registry.name_of(s) for s in result.survivors),
            dropped=sorted(self.registry.name_of(s) for s in result.dropped), total_weight=total.total_weight,
            clamped_elements=total.clamped_elements, mean_clipped=total.mean_clipped,
            error_bound=total.error_bound,
            modulus_bits=params.modulus_bits, value_bits=params.value_bits, neighbours=params.degree,
            threshold=params.threshold, all_pairs=params.all_pairs, upload_bytes=params.packed_bytes,
            exchange_seconds=seconds)
        return RoundOutcome(mean_delta=total.mean_delta, contributors=contributors, failures=failures,
                            privacy=privacy, details=details, evaluation_sum=tuple(counts),
                            evaluated_sites=contributors if counts else 0,
                            evaluation_share=noise.honest_sites if noise else 1)

    def _public_sizes(self, grid: Grid, node_of_site: dict[int, int], server_round: int, failures: list[Failure],
                      seconds: dict[str, float]) -> dict[int, PublicSize]:
        """Each site's public size (declared, or its DP estimate) and assumed honest sites, by site id; a site that
        fails or answers anything else is recorded and left out of the round."""
        query = pack_size_query(server_round, len(node_of_site))
        messages = {site: Message(query, dst_node_id=node, message_type="query.public_size")
                    for site, node in sorted(node_of_site.items())}
        started = time.perf_counter()
        replies = exchange(grid, messages, self.spec.stage_timeout)
        seconds["public_size"] = round(time.perf_counter() - started, 3)
        failures.extend(missing_replies([self.registry.name_of(s) for s in messages if s not in replies],
                                        self.spec.stage_timeout, "query.public_size"))
        sizes: dict[int, PublicSize] = {}
        for site, reply in sorted(replies.items()):
            name = self.registry.name_of(site)
            try:
                if (failure := failure_record(reply, name)) is not None:
                    failures.append(dataclasses.replace(failure, stage="query.public_size"))
                    continue
                sizes[site] = unpack_public_size(reply.content)
            except Exception as exc:  # any malformation of an untrusted reply leaves its site out
                detail = str(exc) if isinstance(exc, WireError) else f"malformed reply: {exc!r}"[:300]
                failures.append(Failure(name, "protocol", detail, "query.public_size"))
        return sizes

    @staticmethod
    def _distributed_sum(plan: DistributedDpPlan, ring_sum: np.ndarray, run_id: int, server_round: int,
                         contributors: int, honest_sites: int) -> tuple[SecureSum, list[int]]:
        """The round's delta from the ring sum's d' gradient coordinates (server/distributed_step.py): exact
        integers, so no error bound, the norm bounded by what honest uploads reach; and the sum of the evaluation
        counts after them (none outside an evaluation round), exact in the ring common.distributed_round.ring_round
        widened, each clamped to what the contributors' counts can reach (a hostile upload)."""
        ring = ring_sum.astype(np.uint64)
        delta, clipped = distributed_delta(plan, ring[:plan.padded_dimension], seed=rotation_seed(run_id, server_round),
                                           participants=contributors, honest_sites=honest_sites)
        counts = ring[plan.padded_dimension:]
        cap = np.uint64(contributors * MAX_COUNT)
        if clamped := int(np.count_nonzero(counts > cap)):
            log.warning("%d evaluation count(s) of the sum were out of range (a hostile upload) and were clamped",
                        clamped)
        return SecureSum(mean_delta=delta.astype(np.float32), total_weight=0, error_bound=0.0,
                         clamped_elements=clamped, mean_clipped=clipped), [int(c) for c in np.minimum(counts, cap)]

    def _exchange(self, grid: Grid, node_of_site: dict[int, int], params: SecAggParams, message_type: str,
                  content: Callable[[int], RecordDict], failures: list[Failure], only: Collection[int] | None,
                  parse: Callable[[RecordDict], tuple[bytes, T]], seconds: dict[str, float]) -> dict[int, T]:
        """Send one exchange to the sites still in the round; each reply parsed once, by site id. Its wall time
        goes into ``seconds`` (under the stage's short name: "train", "share", ...).

        A reply that is an error, a typed site failure, for another round, or malformed in any way is
        recorded as a failure and its site is left out (dropped); nothing raises.
        """
        messages = {site: Message(content(site), dst_node_id=node_of_site[site], message_type=message_type)
                    for site in sorted(node_of_site) if only is None or site in only}
        timeout = self.spec.train_timeout if message_type == "train" else self.spec.stage_timeout
        started = time.perf_counter()
        replies = exchange(grid, messages, timeout)
        seconds[message_type.removeprefix("train.secagg_")] = round(time.perf_counter() - started, 3)
        failures.extend(missing_replies([self.registry.name_of(s) for s in messages if s not in replies], timeout,
                                        message_type))
        answers: dict[int, T] = {}
        for site, reply in replies.items():
            name = self.registry.name_of(site)
            try:
                if (failure := failure_record(reply, name)) is not None:
                    failures.append(dataclasses.replace(failure, stage=message_type))
                    continue
                round_id, answers[site] = parse(reply.content)
                if round_id != params.round_id:
                    del answers[site]
                    raise WireError("reply is for another round")
            except Exception as exc:  # any malformation of an untrusted reply drops its site
                detail = str(exc) if isinstance(exc, WireError) else f"malformed reply: {exc!r}"[:300]
                failures.append(Failure(name, "protocol", detail, message_type))
                log.warning("site %s dropped at %s: %s", name, message_type, detail)
        return answers

    def _refuse_rolled_back(self, adverts: dict[int, KeyAdvertisement], failures: list[Failure],
                            server_round: int) -> None:
        """Reject at stage 1 the advertisement of a site whose ε fell, or stayed flat after it trained: its
        bundle is never collected, so nobody masks with it and its update cannot enter the sum."""
        for site, advert in sorted(adverts.items()):
            name = self.registry.name_of(site)
            if self.watch and (why := self.watch.refusal(name, advert.privacy)):
                del adverts[site]
                failures.append(Failure(name, EPSILON_REFUSED, why, "train"))
                log.warning("round %d: site %s refused: %s", server_round, name, why)

    def _payloads(self, answers: dict[int, dict[str, bytes]], key: str, stage: str,
                  failures: list[Failure]) -> dict[int, bytes]:
        """One named blob per site; a reply without it is recorded as a failure (its site is dropped)."""
        for site in sorted(s for s, blobs in answers.items() if key not in blobs):
            failures.append(Failure(self.registry.name_of(site), "protocol", f"reply lacks its {key!r} blob", stage))
        return {site: blobs[key] for site, blobs in answers.items() if key in blobs}

    def _dropped(self, aggregator: ServerAggregator) -> list[Failure]:
        """Protocol-level drops (bad bundle, rejected shares, bad signature...) as failure records."""
        return [Failure(self.registry.name_of(s), "protocol", why)
                for s, why in sorted(aggregator.dropped_reasons.items())] + [
                Failure(self.registry.name_of(s), "cheated", why)
                for s, why in sorted(aggregator.cheats.items())]

    def _aborted(self, server_round: int, why: str, failures: list[Failure], privacy: dict[str, PrivacyReport],
                 aggregator: ServerAggregator | None = None) -> RoundOutcome:
        log.warning("round %d: secure aggregation ended without a result (%s): model unchanged", server_round, why)
        if aggregator is not None:
            failures.extend(self._dropped(aggregator))
        failures.append(Failure("*", "round-aborted", why))
        return RoundOutcome(mean_delta=None, contributors=0, failures=failures, privacy=privacy)


def _advertisement(content: RecordDict, max_weight: int) -> tuple[bytes, KeyAdvertisement]:
    advert = unpack_key_advertisement(content, max_weight)
    return advert.round_id, advert

