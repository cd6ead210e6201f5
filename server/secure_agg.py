"""Secure aggregation driven over Flower's Grid: four message exchanges per round.

    train               global adapter + round parameters → signed round keys  (sites train first)
    train.secagg_share  neighbours' signed keys           → encrypted Shamir shares
    train.secagg_mask   shares addressed to the site      → masked contribution
    train.secagg_unmask survivors / dropped               → shares for one or the other, never both

The server (common.secagg.ServerAggregator) learns only the sum over surviving sites: the
weighted update, the example count, the training loss and the federated-evaluation counts.
A site that fails or stays silent at any stage is dropped; below the threshold the round
ends without changing the model.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.adapter import AdapterState
from common.config import SecureAggSettings
from common.records import WireError, pack_stage, pack_train_request, unpack_stage
from common.registry import FederationRegistry
from common.secagg import RoundAborted, ServerAggregator
from common.secure_update import decode_sum, params_to_bytes, round_params
from server.strategy import RoundOutcome, RoundSpec, exchange, failure_record, missing_replies

log = logging.getLogger("fedtune.server")


class SecureAggregation:
    name = "secure"

    def __init__(self, spec: RoundSpec, settings: SecureAggSettings, registry: FederationRegistry) -> None:
        self.spec = spec
        self.settings = settings
        self.registry = registry
        self.site_of_node: dict[int, int] = {}

    # ------------------------------------------------------------------ who is who
    def identify(self, grid: Grid, node_ids: list[int]) -> list[dict[str, str]]:
        """Ask nodes we have not seen for their site name; unknown sites are refused and logged."""
        unknown = [node for node in node_ids if node not in self.site_of_node]
        failures = []
        messages = {node: Message(RecordDict({}), dst_node_id=node, message_type="query.identify") for node in unknown}
        for node, reply in (exchange(grid, messages, self.spec.stage_timeout) if messages else {}).items():
            if (failure := failure_record(reply, str(node))) is not None:
                failures.append(failure)
                continue
            name = str(reply.content.config_records["site"]["name"])
            if name not in self.registry.ids:
                failures.append({"site": name, "kind": "unknown-site", "detail": "not in the federation's registry"})
                log.warning("node %d claims to be site %r, which is not in the registry: refused", node, name)
                continue
            self.site_of_node[node] = self.registry.ids[name]
        return failures

    # ------------------------------------------------------------------ one round
    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int) -> RoundOutcome:
        spec = self.spec
        failures = self.identify(grid, node_ids)
        node_of_site = {self.site_of_node[n]: n for n in node_ids if n in self.site_of_node}
        privacy: dict[str, dict] = {}
        if len(node_of_site) < max(2, spec.min_sites):
            return self._aborted(server_round, f"{len(node_of_site)} identified site(s)", failures, privacy)
        params = round_params(self.settings, run_id=grid.run.run_id, server_round=server_round,
                              site_ids=sorted(node_of_site), vector_length=spec.update_size,
                              num_labels=spec.num_labels)
        aggregator = ServerAggregator(params, self.registry.keys)
        timings: dict[str, float] = {}
        try:
            started = time.perf_counter()
            request = pack_train_request(state, server_round, params_to_bytes(params))
            answers = self._exchange(grid, node_of_site, "train", lambda site: request, failures, privacy)
            timings["train_and_keys_s"] = time.perf_counter() - started
            routed = aggregator.collect_bundles(_payloads(answers, "bundle"))

            started = time.perf_counter()
            answers = self._exchange(grid, node_of_site, "train.secagg_share", lambda site: pack_stage(
                params.round_id, {str(peer): bundle.to_bytes() for peer, bundle in routed[site].items()}),
                failures, only=routed)
            inboxes = aggregator.route_shares({site: {int(k): v for k, v in blobs.items()}
                                               for site, blobs in answers.items()})
            answers = self._exchange(grid, node_of_site, "train.secagg_mask", lambda site: pack_stage(
                params.round_id, {str(sender): ct for sender, ct in inboxes[site].items()}), failures, only=inboxes)
            requests = aggregator.collect_masked(_payloads(answers, "payload"))
            answers = self._exchange(grid, node_of_site, "train.secagg_unmask", lambda site: pack_stage(
                params.round_id, {"payload": requests[site].to_bytes()}), failures, only=requests)
            started_unmask = time.perf_counter()
            result = aggregator.finish(_payloads(answers, "payload"))
            timings["unmask_s"] = time.perf_counter() - started_unmask
            timings["secagg_stages_s"] = time.perf_counter() - started
        except RoundAborted as exc:
            return self._aborted(server_round, str(exc), failures, privacy)
        total = decode_sum(result, self.settings, spec.num_labels, params)
        contributors = len(result.survivors)
        if contributors < spec.min_sites:
            return self._aborted(server_round, f"{contributors} survivor(s)", failures, privacy)
        if total.clipped_sites:
            log.warning("round %d: %d site update(s) exceeded secagg.clip=%g and were scaled down",
                        server_round, total.clipped_sites, self.settings.clip)
        details = {"survivors": sorted(self.registry.name_of(s) for s in result.survivors),
                   "dropped": sorted(self.registry.name_of(s) for s in result.dropped),
                   "clipped_sites": total.clipped_sites, "error_bound": total.error_bound,
                   "modulus_bits": params.modulus_bits, "value_bits": params.value_bits,
                   "neighbours": params.degree, "threshold": params.threshold,
                   "upload_bytes": params.packed_bytes, **{k: round(v, 3) for k, v in timings.items()}}
        return RoundOutcome(total.mean_delta, total.num_examples, contributors, total.train_loss, total.evaluation,
                            failures, privacy, details)

    def _exchange(self, grid: Grid, node_of_site: dict[int, int], message_type: str, content, failures: list,
                  privacy: dict | None = None, only=None) -> dict[int, dict[str, bytes]]:
        """Send one stage to the sites still in the round; their payloads by site id. Failures are recorded."""
        messages = {site: Message(content(site), dst_node_id=node_of_site[site], message_type=message_type)
                    for site in sorted(node_of_site) if only is None or site in only}
        timeout = self.spec.train_timeout if message_type == "train" else self.spec.stage_timeout
        replies = exchange(grid, messages, timeout)
        failures.extend(missing_replies([self.registry.name_of(s) for s in messages if s not in replies], timeout,
                                        message_type))
        answers: dict[int, dict[str, bytes]] = {}
        for site, reply in replies.items():
            name = self.registry.name_of(site)
            if (failure := failure_record(reply, name)) is not None:
                failures.append(failure | {"stage": message_type})
                continue
            try:
                _, blobs = unpack_stage(reply.content)
            except WireError as exc:
                failures.append({"site": name, "kind": "protocol", "detail": str(exc), "stage": message_type})
                continue
            if privacy is not None and "privacy" in reply.content.config_records:
                privacy[name] = dict(reply.content.config_records["privacy"])
            answers[site] = blobs
        return answers

    def _aborted(self, server_round: int, why: str, failures: list, privacy: dict) -> RoundOutcome:
        log.warning("round %d: secure aggregation ended without a result (%s): model unchanged", server_round, why)
        failures.append({"site": "*", "kind": "round-aborted", "detail": why})
        return RoundOutcome(None, 0, 0, None, None, failures, privacy)



def _payloads(answers: dict[int, dict[str, bytes]], key: str) -> dict[int, bytes]:
    """One named blob per site; a site whose reply lacks it is simply not in the result (dropped)."""
    return {site: blobs[key] for site, blobs in answers.items() if key in blobs}
