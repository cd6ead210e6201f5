"""Aggregation of one training round: send the global adapter, combine the sites' contributions.

Every aggregator returns the same :class:`RoundOutcome`; the federation loop does not know
whether it saw individual updates (plain) or only their sum (secure, server/secure_agg.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.adapter import AdapterState
from common.config import SecureAggSettings
from common.federated_eval import EvalPlan
from common.records import (
    PrivacyReport,
    TrainReply,
    WireError,
    pack_train_request,
    unpack_failure,
    unpack_train_reply,
    with_receipt,
)
from common.run_files import Failure as Failure  # metrics.jsonl's records of a round
from common.run_files import SecureRoundDetails as SecureRoundDetails
from common.secure_update import MAX_COUNT, bounded_mean, encode_contribution
from server.ledger_watch import EPSILON_REFUSED, LedgerWatch

log = logging.getLogger("fedtune.server")
K = TypeVar("K")


@dataclass(frozen=True)
class RoundSpec:
    """What every round of this run shares."""

    update_size: int
    max_weight: int
    """W: the largest weight a site may declare (secagg.max-examples)."""
    min_sites: int
    train_timeout: float
    stage_timeout: float
    evaluation: EvalPlan | None = None
    """The run's federated evaluation (common.federated_eval), None without it."""


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced. ``mean_delta`` is None when too few sites contributed."""

    mean_delta: np.ndarray | None
    contributors: int
    failures: list[Failure] = field(default_factory=list)
    privacy: dict[str, PrivacyReport] = field(default_factory=dict)
    """Each site's privacy report (ε, δ), keyed by site name."""
    details: SecureRoundDetails | None = None
    evaluation_sum: tuple[int, ...] = ()
    """In an evaluation round, the sum of the contributing sites' noisy evaluation counts (never one site's)."""
    evaluated_sites: int = 0
    """The sites whose release is in ``evaluation_sum``."""
    evaluation_share: int = 1
    """h: each site added 1/h of the evaluation noise (distributed DP; 1: all of it, local mode)."""


class Aggregator(Protocol):
    name: str

    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int) -> RoundOutcome: ...


def weighted_mean(updates: list[np.ndarray], weights: list[int]) -> np.ndarray:
    """Σ w_i·u_i / Σ w_i, accumulated in float64."""
    if not updates or sum(weights) <= 0:
        raise ValueError("no updates to average")
    total = np.zeros(updates[0].shape, dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        total += weight * update.astype(np.float64)
    return (total / sum(weights)).astype(np.float32)


def exchange(grid: Grid, messages: dict[K, Message], timeout: float, max_poll: float = 0.1) -> dict[K, Message]:
    """Send each message and collect the replies that arrive within ``timeout``, keyed like ``messages``.

    Replies are matched by the id of the message they answer, so an error reply the SuperLink
    writes for an unreachable site (whose source is the SuperLink, not the site) is still that site's.
    Polling starts at 10 ms and backs off to ``max_poll``: a quick stage is not rounded up to a second.
    """
    keys = list(messages)
    pushed = list(grid.push_messages([messages[key] for key in keys]))
    pending = {message_id: key for message_id, key in zip(pushed, keys, strict=True) if message_id}
    replies: dict[K, Message] = {}
    deadline = time.monotonic() + timeout
    poll = 0.01
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                replies[key] = reply
        if pending:
            time.sleep(poll)
            poll = min(max_poll, poll * 1.5)
    return replies


def request_for(request: RecordDict, watch: LedgerWatch | None, site: str | None) -> RecordDict:
    """The train request as sent to ``site``: with the coordinator's latest receipt of its charge, if any."""
    return with_receipt(request, watch.receipt_for(site) if watch is not None and site is not None else None)


def failure_record(reply: Message, site: str | None = None) -> Failure | None:
    """A reply that is a Flower error or a typed site failure, as a record; None for a real answer."""
    who = site or str(reply.metadata.src_node_id)
    if reply.has_error():
        return Failure(who, "error", str(reply.error.reason)[:300])
    failure = unpack_failure(reply.content)
    return None if failure is None else Failure(who, failure.kind, failure.detail)


def missing_replies(silent: list[str], timeout: float, stage: str) -> list[Failure]:
    """One failure per site that did not answer ``stage`` within ``timeout``."""
    return [Failure(site, "timeout", f"no answer to {stage} in {timeout:.0f}s") for site in silent]


class PlainAggregation:
    """The server sees each site's update. Only when asked for by name: it weakens privacy."""

    name = "plain"

    def __init__(self, spec: RoundSpec, settings: SecureAggSettings, watch: LedgerWatch | None = None) -> None:
        self.spec, self.settings, self.watch = spec, settings, watch
        self.site_of_node: dict[int, str] = {}
        """The name each node's last accepted reply gave (plain rounds identify no one): where its receipt goes."""

    def run_round(self, grid: Grid, node_ids: list[int], state: AdapterState, server_round: int) -> RoundOutcome:
        spec = self.spec
        request = pack_train_request(state, server_round)
        messages = {node: Message(request_for(request, self.watch, self.site_of_node.get(node)), dst_node_id=node,
                                  message_type="train") for node in node_ids}
        replies = exchange(grid, messages, spec.train_timeout)
        accepted: list[TrainReply] = []
        failures = missing_replies([str(n) for n in messages if n not in replies], spec.train_timeout, "train")
        for node, reply in replies.items():
            if (failure := failure_record(reply, str(node))) is not None:
                failures.append(failure)
                continue
            try:
                decoded = unpack_train_reply(reply.content, spec.update_size, spec.max_weight,
                                             spec.evaluation.slots_in(server_round) if spec.evaluation else 0,
                                             MAX_COUNT)
            except Exception as exc:  # any malformation of an untrusted reply drops its site
                detail = str(exc) if isinstance(exc, WireError) else f"malformed reply: {exc!r}"[:300]
                failures.append(Failure(str(node), "malformed-update", detail))
                continue
            assert isinstance(decoded, TrainReply)
            if self.watch and (why := self.watch.refusal(decoded.privacy.site, decoded.privacy)):
                failures.append(Failure(decoded.privacy.site, EPSILON_REFUSED, why))
                log.warning("round %d: site %s refused: %s", server_round, decoded.privacy.site, why)
                continue
            self.site_of_node[node] = decoded.privacy.site
            accepted.append(decoded)
        privacy = {r.privacy.site: r.privacy for r in accepted}
        evaluated = [r.evaluation for r in accepted if r.evaluation]
        total = tuple(int(c) for c in np.sum(evaluated, axis=0)) if evaluated else ()
        if len(accepted) < spec.min_sites:
            log.warning("round %d: %d site(s) contributed, fewer than min-sites=%d: model unchanged",
                        server_round, len(accepted), spec.min_sites)
            return RoundOutcome(None, len(accepted), failures, privacy, evaluation_sum=total,
                                evaluated_sites=len(evaluated))
        # Each update weighted and clipped as a secure round's contribution is, the mean bounded alike.
        contributions = [encode_contribution(r.delta, r.weight, self.settings)[0] for r in accepted]
        mean, clipped = bounded_mean(np.sum(contributions, axis=0), self.settings, len(accepted),
                                     sum(r.weight for r in accepted))
        if clipped:  # cannot happen: every contribution was clipped here
            raise AssertionError("a mean of clipped contributions exceeded the honest bound")
        return RoundOutcome(mean, len(accepted), failures, privacy, evaluation_sum=total,
                            evaluated_sites=len(evaluated))
