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


def pack_train_request(state: AdapterState, server_round: int) -> RecordDict:
    return RecordDict({"adapter": pack_adapter(state), "round": ConfigRecord({"server-round": server_round})})


def unpack_train_request(content: RecordDict) -> tuple[AdapterState, int]:
    try:
        return unpack_adapter(content.array_records["adapter"]), int(content.config_records["round"]["server-round"])
    except KeyError as exc:
        raise WireError(f"train request lacks {exc}") from exc


def pack_train_reply(reply: TrainReply) -> RecordDict:
    privacy = ConfigRecord({key: _config_value(value) for key, value in reply.privacy.items()})
    return RecordDict({
        "update": ArrayRecord({"delta": Array(np.ascontiguousarray(reply.delta, dtype=np.float32))}),
        "train": MetricRecord({"num-examples": reply.num_examples, "loss": reply.loss, "steps": reply.steps}),
        "privacy": privacy,
    })


def pack_failure(failure: SiteFailure) -> RecordDict:
    return RecordDict({"failure": ConfigRecord({"kind": failure.kind, "detail": failure.detail})})


def unpack_failure(content: RecordDict) -> SiteFailure | None:
    if "failure" not in content.config_records:
        return None
    record = content.config_records["failure"]
    return SiteFailure(str(record.get("kind", "unknown")), str(record.get("detail", "")))


def unpack_train_reply(content: RecordDict, expected_values: int) -> TrainReply | SiteFailure:
    """Decode a site's reply; a malformed or wrongly sized update raises WireError."""
    if (failure := unpack_failure(content)) is not None:
        return failure
    try:
        array = content.array_records["update"]["delta"]
        train = content.metric_records["train"]
        privacy = dict(content.config_records["privacy"])
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
    return TrainReply(delta, num_examples, float(train["loss"]), int(train["steps"]), privacy)


def pack_eval_reply(counts: EvalCounts) -> RecordDict:
    return RecordDict({"eval": MetricRecord({
        "loss-sum": counts.loss_sum, "confusion": [int(v) for v in counts.confusion.ravel()],
    })})


def unpack_eval_reply(content: RecordDict, num_labels: int) -> EvalCounts | SiteFailure:
    if (failure := unpack_failure(content)) is not None:
        return failure
    try:
        record = content.metric_records["eval"]
        confusion = np.asarray(record["confusion"], dtype=np.int64)
    except KeyError as exc:
        raise WireError(f"evaluation reply lacks {exc}") from exc
    if confusion.size != num_labels * num_labels or (confusion < 0).any():
        raise WireError(f"confusion matrix of {confusion.size} counts, expected {num_labels}x{num_labels}")
    return EvalCounts(float(record["loss-sum"]), confusion.reshape(num_labels, num_labels))


def _config_value(value: Any) -> Any:
    """ConfigRecord holds scalars, strings and flat lists; nested accounting history becomes flat."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        flat = np.asarray(value, dtype=np.float64).ravel()
        return [float(v) for v in flat]
    return value
