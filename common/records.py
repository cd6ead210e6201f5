"""Everything that crosses the wire, packed and unpacked in one place.

Both sides call these functions; a round-trip test pins them. Key order is sorted, dtypes are
fixed (float32 adapter values, int64 counts), and an update is ``after - before`` of the
trainable keys in :func:`common.adapter.trainable_keys` order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.adapter import AdapterState
from common.evaluation import EvalCounts



class WireError(ValueError):
    """A message does not have the shape this protocol version sends."""


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train request."""

    delta: np.ndarray
    num_examples: int
    loss: float
    steps: int
    evaluation: EvalCounts
    """The received global adapter on the site's held-out examples (federated evaluation)."""
    privacy: dict[str, Any] = field(default_factory=dict)
    """The site's accounting report (ε spent, δ, budget, σ, ...); empty when DP is off."""


@dataclass(frozen=True)
class SiteFailure:
    """A site that could not take part says why, as data the server logs and counts."""

    kind: str
    """"budget-exhausted", "bad-data", "bad-config", "training-failed", "protocol"."""
    detail: str


def pack_adapter(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(state[key], dtype=np.float32)) for key in sorted(state)})


def unpack_adapter(record: ArrayRecord) -> AdapterState:
    return {key: record[key].numpy().astype(np.float32, copy=False) for key in sorted(record.keys())}


def pack_train_request(state: AdapterState, server_round: int, secagg_params: bytes | None = None) -> RecordDict:
    """The global adapter; with secure aggregation also the round's public parameters."""
    content = RecordDict({"adapter": pack_adapter(state), "round": ConfigRecord({"server-round": server_round})})
    if secagg_params is not None:
        content["secagg"] = ConfigRecord({"params": secagg_params})
    return content


def unpack_train_request(content: RecordDict) -> tuple[AdapterState, int, bytes | None]:
    try:
        state = unpack_adapter(content.array_records["adapter"])
        server_round = int(content.config_records["round"]["server-round"])
    except KeyError as exc:
        raise WireError(f"train request lacks {exc}") from exc
    secagg = content.config_records.get("secagg")
    return state, server_round, (bytes(secagg["params"]) if secagg is not None else None)


def pack_stage(round_id: bytes, blobs: dict[str, bytes]) -> RecordDict:
    """A secure-aggregation stage message: opaque protocol bytes, keyed by site id or name."""
    return RecordDict({"secagg": ConfigRecord({"round-id": round_id, **{f"blob:{k}": v for k, v in blobs.items()}})})


def unpack_stage(content: RecordDict) -> tuple[bytes, dict[str, bytes]]:
    try:
        record = content.config_records["secagg"]
        round_id = bytes(record["round-id"])
        blobs = {key.removeprefix("blob:"): bytes(value) for key, value in record.items() if key.startswith("blob:")}
    except (KeyError, TypeError) as exc:
        raise WireError(f"secure-aggregation message lacks {exc}") from exc
    return round_id, blobs


def pack_privacy(report: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({key: _config_value(value) for key, value in report.items()})


def pack_train_reply(reply: TrainReply) -> RecordDict:
    return RecordDict({
        "update": ArrayRecord({"delta": Array(np.ascontiguousarray(reply.delta, dtype=np.float32))}),
        "train": MetricRecord({"num-examples": reply.num_examples, "loss": reply.loss, "steps": reply.steps}),
        "eval": _pack_eval(reply.evaluation),
        "privacy": pack_privacy(reply.privacy),
    })


def pack_failure(failure: SiteFailure) -> RecordDict:
    return RecordDict({"failure": ConfigRecord({"kind": failure.kind, "detail": failure.detail})})


def unpack_failure(content: RecordDict) -> SiteFailure | None:
    if "failure" not in content.config_records:
        return None
    record = content.config_records["failure"]
    return SiteFailure(str(record.get("kind", "unknown")), str(record.get("detail", "")))


def unpack_train_reply(content: RecordDict, expected_values: int, num_labels: int) -> TrainReply | SiteFailure:
    """Decode a site's reply; a malformed or wrongly sized update raises WireError."""
    if (failure := unpack_failure(content)) is not None:
        return failure
    try:
        array = content.array_records["update"]["delta"]
        train = content.metric_records["train"]
        privacy = dict(content.config_records["privacy"])
        evaluation = content.metric_records["eval"]
    except KeyError as exc:
        raise WireError(f"train reply lacks {exc}") from exc
    if array.dtype != "float32" or len(array.shape) != 1 or array.shape[0] != expected_values:
        raise WireError(f"update is {array.dtype}{list(array.shape)}, expected float32[{expected_values}]")
    delta = array.numpy()
    if not np.isfinite(delta).all():
        raise WireError("update holds NaN or infinite values")
    num_examples = int(train["num-examples"])
    if num_examples <= 0:
        raise WireError(f"update claims {num_examples} examples")
    return TrainReply(delta, num_examples, float(train["loss"]), int(train["steps"]),
                      _unpack_eval(evaluation, num_labels), privacy)


def _pack_eval(counts: EvalCounts) -> MetricRecord:
    return MetricRecord({"loss-sum": counts.loss_sum, "confusion": [int(v) for v in counts.confusion.ravel()]})


def _unpack_eval(record: MetricRecord, num_labels: int) -> EvalCounts:
    try:
        confusion = np.asarray(record["confusion"], dtype=np.int64)
        loss_sum = float(record["loss-sum"])
    except KeyError as exc:
        raise WireError(f"evaluation counts lack {exc}") from exc
    if confusion.size != num_labels * num_labels or (confusion < 0).any():
        raise WireError(f"confusion matrix of {confusion.size} counts, expected {num_labels}x{num_labels}")
    return EvalCounts(loss_sum, confusion.reshape(num_labels, num_labels))


def _config_value(value: Any) -> Any:
    """ConfigRecord holds scalars, strings and flat lists; nested accounting history becomes flat."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        flat = np.asarray(value, dtype=np.float64).ravel()
        return [float(v) for v in flat]
    return value
