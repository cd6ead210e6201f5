"""Aggregation of one training round: send the global adapter, combine the sites' updates.

Every aggregator returns the same :class:`RoundOutcome`; the federation loop does not know
whether it saw individual updates (plain) or only their sum (secure aggregation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from common.adapter import AdapterState
from common.records import SiteFailure, TrainReply, WireError, pack_train_request, unpack_train_reply

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced. ``mean_delta`` is None when too few sites contributed."""

    mean_delta: np.ndarray | None
    num_examples: int
    contributors: int
    train_loss: float | None
    failures: list[dict[str, str]] = field(default_factory=list)
    privacy: dict[str, dict] = field(default_factory=dict)
    """Each contributing site's accounting report, keyed by site name."""


class Aggregator(Protocol):
    name: str

    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int,
                  update_size: int, min_sites: int, timeout: float) -> RoundOutcome: ...


def weighted_mean(updates: list[np.ndarray], weights: list[int]) -> np.ndarray:
    """Σ w_i·u_i / Σ w_i, accumulated in float64."""
    if not updates or sum(weights) <= 0:
        raise ValueError("no updates to average")
    total = np.zeros(updates[0].shape, dtype=np.float64)
    for update, weight in zip(updates, weights):
        total += weight * update.astype(np.float64)
    return (total / sum(weights)).astype(np.float32)


def failure_of(reply: Message) -> dict[str, str]:
    """A Flower error reply, as the same record a typed site failure becomes."""
    return {"node": str(reply.metadata.src_node_id), "kind": "error", "detail": reply.error.reason}


class PlainAggregation:
    """The server sees each site's update. Only when asked for by name: it weakens privacy."""

    name = "plain"

    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int,
                  update_size: int, min_sites: int, timeout: float) -> RoundOutcome:
        messages = [Message(pack_train_request(state, server_round), dst_node_id=node, message_type="train")
                    for node in node_ids]
        updates, weights, losses, failures, privacy = [], [], [], [], {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                failures.append(failure_of(reply))
                continue
            try:
                decoded = unpack_train_reply(reply.content, update_size)
            except WireError as exc:
                decoded = SiteFailure("malformed-update", str(exc))
            if isinstance(decoded, SiteFailure):
                failures.append({"node": str(reply.metadata.src_node_id), "kind": decoded.kind, "detail": decoded.detail})
                continue
            assert isinstance(decoded, TrainReply)
            updates.append(decoded.delta)
            weights.append(decoded.num_examples)
            losses.append(decoded.loss)
            privacy[str(decoded.privacy.get("site", reply.metadata.src_node_id))] = decoded.privacy
        missing = len(node_ids) - len(updates) - len(failures)
        if missing:
            failures.append({"node": "?", "kind": "timeout", "detail": f"{missing} site(s) did not reply in {timeout:.0f}s"})
        if len(updates) < min_sites:
            log.warning("round %d: %d site(s) contributed, fewer than min-sites=%d: model unchanged",
                        server_round, len(updates), min_sites)
            return RoundOutcome(None, sum(weights), len(updates), None, failures, privacy)
        loss = float(np.average(losses, weights=weights))
        return RoundOutcome(weighted_mean(updates, weights), sum(weights), len(updates), loss, failures, privacy)
