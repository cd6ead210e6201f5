"""Everything that crosses the wire, packed and unpacked in one place.

Both sides call these functions; a round-trip test pins them. Key order is sorted, dtypes are
fixed (float32 adapter values, int64 counts), and an update is ``after - before`` of the
trainable keys in :func:`common.adapter.trainable_keys` order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.adapter import AdapterState
from common.run_files import PrivacyReport as PrivacyReport  # a site's report is also what privacy.json keeps


class WireError(ValueError):
    """A message does not have the shape this protocol version sends."""


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train request under plain aggregation (the server sees the update)."""

    delta: np.ndarray
    weight: int
    """Public by construction: equal, or the size the site declares in its policy; never its record count."""
    privacy: PrivacyReport
    evaluation: tuple[int, ...] = ()
    """In an evaluation round, the site's noisy evaluation counts (common.federated_eval.release), else ()."""


FAILURE_MESSAGES: dict[str, str] = {
    "budget-exhausted": "this round would take the site past its privacy budget; it will not train again",
    "ledger": "the site's privacy ledger is missing, altered, rolled back or unreadable; the site's operator must "
              "restore it",
    "site-policy": "the run asks for less protection than this site's own policy accepts",
    "bad-data": "the site's data cannot be used with this run's settings",
    "bad-config": "the run's configuration cannot be used at this site",
    "registry": "the site's identity or the member list it pinned is missing, altered or does not match",
    "protocol": "the site refused a secure-aggregation request",
    "training-failed": "local training did not produce a usable update",
    "internal": "the site hit an unexpected error",
}
"""A failure reply carries its kind and one of these fixed texts: details (which may describe
records) stay in the site's own log."""


@dataclass(frozen=True)
class SiteFailure:
    """A site that could not take part says why, as data the server logs and counts."""

    kind: str
    """One of FAILURE_MESSAGES (anything else arrives as "unknown")."""

    @property
    def detail(self) -> str:
        return FAILURE_MESSAGES.get(self.kind, "the site replied with an unknown failure kind")


MAX_ADAPTER_TENSORS = 1 << 12
"""Most tensors an adapter may name (LoRA on every projection of a large LLM stays far below)."""


def pack_train_request(state: AdapterState, server_round: int, secagg_params: bytes | None = None,
                       noise: RoundNoise | None = None) -> RecordDict:
    """The global adapter as ONE float32 vector plus its layout (each tensor would otherwise travel, and be
    fetched, as objects of its own), the round; with secure aggregation the round's public parameters; in distributed
    DP mode the round's public total and h (common/distributed_round.py)."""
    keys = sorted(state)
    values = np.concatenate([np.asarray(state[key], dtype=np.float32).ravel() for key in keys])
    content = RecordDict({
        "adapter": ArrayRecord({"values": Array(values)}),
        "layout": ConfigRecord({"keys": keys, "shapes": ["x".join(map(str, state[key].shape)) for key in keys]}),
        "round": ConfigRecord({"server-round": server_round})})
    if secagg_params is not None:
        content["secagg"] = ConfigRecord({"params": secagg_params})
    if noise is not None:
        content[DISTRIBUTED_RECORD] = ConfigRecord({PUBLIC_SIZE: noise.public_total, HONEST_SITES: noise.honest_sites})
    return content


DISTRIBUTED_RECORD, PUBLIC_SIZE, HONEST_SITES = "distributed", "public-size", "honest-sites"


@dataclass(frozen=True)
class PublicSize:
    """A site's answer to a distributed-DP size query."""

    units: int
    """Its public size in privacy units: declared in its policy, or its DP estimate (already charged)."""
    honest_sites: int
    """The fewest honest sites its policy assumes in a round (min-honest-sites); 0: the round's threshold."""


@dataclass(frozen=True)
class RoundNoise:
    """What a distributed-DP train request carries beside the adapter (common/distributed_round.py)."""

    public_total: int
    """N, the sum of the round's sites' public sizes."""
    honest_sites: int
    """h, the honest sites every site's noise share assumes: each adds 1/h of the noise. The fewest any of the
    round's sites assumes, so that every site's own assumption holds."""


def _whole(record: ConfigRecord | None, key: str, what: str, least: int) -> int:
    value = record.get(key) if record is not None else None
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise WireError(f"{what} {value!r} is not a whole number >= {least}")
    return value


def unpack_round_noise(content: RecordDict) -> RoundNoise:
    """A distributed-DP train request's public total and h; WireError when absent or malformed."""
    record = content.config_records.get(DISTRIBUTED_RECORD)
    return RoundNoise(_whole(record, PUBLIC_SIZE, "the sites' public total size", 1),
                      _whole(record, HONEST_SITES, "the round's honest sites", 1))


def pack_size_query(server_round: int, sites: int) -> RecordDict:
    """``query.public_size``: the coordinator asks the ``sites`` sites of a distributed-DP round for their public
    sizes before it starts."""
    return RecordDict({"round": ConfigRecord({"server-round": server_round, "sites": sites})})


def unpack_size_query(content: RecordDict) -> tuple[int, int]:
    """(the round, the sites asked) of a size query; WireError when malformed."""
    try:
        record = content.config_records["round"]
        return int(record["server-round"]), int(record["sites"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed size query: {exc}") from exc


def pack_public_size(size: PublicSize) -> RecordDict:
    return RecordDict({DISTRIBUTED_RECORD: ConfigRecord({PUBLIC_SIZE: size.units,
                                                         HONEST_SITES: size.honest_sites})})


def unpack_public_size(content: RecordDict) -> PublicSize:
    record = content.config_records.get(DISTRIBUTED_RECORD)
    return PublicSize(_whole(record, PUBLIC_SIZE, "the site's public size", 1),
                      _whole(record, HONEST_SITES, "the site's assumed honest sites", 0))


def _unpack_adapter(content: RecordDict) -> AdapterState:
    values = content.array_records["adapter"]["values"].numpy()
    keys, shapes = list(content.config_records["layout"]["keys"]), list(content.config_records["layout"]["shapes"])
    if not (values.ndim == 1 and values.dtype == np.float32 and len(keys) == len(shapes) <= MAX_ADAPTER_TENSORS
            and len(set(keys)) == len(keys) and all(isinstance(k, str) for k in keys)):
        raise WireError("the adapter is not one float32 vector with one shape per distinct tensor name")
    try:
        dims = [tuple(int(d) for d in shape.split("x")) if shape else () for shape in shapes]
    except (AttributeError, ValueError) as exc:
        raise WireError(f"malformed adapter shape: {exc}") from exc
    if any(d < 0 for shape in dims for d in shape):
        raise WireError("an adapter shape has a negative dimension")
    sizes = [int(np.prod(shape)) for shape in dims]
    if sum(sizes) != values.size:
        raise WireError(f"the adapter layout describes {sum(sizes)} values; the vector has {values.size}")
    parts = np.split(values, np.cumsum(sizes)[:-1])
    return {key: part.reshape(shape) for key, part, shape in zip(keys, parts, dims, strict=True)}


def unpack_train_request(content: RecordDict) -> tuple[AdapterState, int, bytes | None]:
    try:
        state = _unpack_adapter(content)
        server_round = int(content.config_records["round"]["server-round"])
    except KeyError as exc:
        raise WireError(f"train request lacks {exc}") from exc
    secagg = content.config_records.get("secagg")
    return state, server_round, (bytes(secagg["params"]) if secagg is not None else None)


@dataclass(frozen=True)
class ChargeReceipt:
    """The coordinator's statement that ``site`` reported ε (rounded up, as reported) and δ after training
    round ``round`` of run ``run_id``: signed with the passport key (common/receipts.py), kept by the site
    outside its state directory as the anchor of its ledger (client/rollback.py)."""

    run_id: int
    round: int
    site: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class SignedReceipt:
    receipt: ChargeReceipt
    signature: bytes
    """Ed25519 over :func:`common.receipts.receipt_bytes` of the receipt."""


RECEIPT_RECORD = "receipt"
SIGNATURE_BYTES = 64


def with_receipt(request: RecordDict, receipt: SignedReceipt | None) -> RecordDict:
    """A train request carrying the site's latest receipt (the request itself when there is none); the
    adapter's records are shared, not copied."""
    if receipt is None:
        return request
    fields = dataclasses.asdict(receipt.receipt)
    return RecordDict({**request, RECEIPT_RECORD: ConfigRecord({**{k.replace("_", "-"): v for k, v in fields.items()},
                                                                "signature": receipt.signature})})


def unpack_receipt(content: RecordDict) -> SignedReceipt | None:
    """The train request's receipt, type-checked (its signature is the site's to check); None when absent,
    WireError when malformed."""
    record = content.config_records.get(RECEIPT_RECORD)
    if record is None:
        return None
    run_id, server_round, site = record.get("run-id"), record.get("round"), record.get("site")
    epsilon, delta, signature = record.get("epsilon"), record.get("delta"), record.get("signature")
    whole = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (run_id, server_round))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0
                  for v in (epsilon, delta))
    if not (whole and numbers and isinstance(site, str) and 0 < len(site) <= MAX_SITE_NAME
            and isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise WireError("the train request's receipt is malformed (run-id and round whole numbers, site a name, "
                        "epsilon and delta finite numbers >= 0, a 64-byte signature)")
    receipt = ChargeReceipt(int(run_id), int(server_round), site, float(epsilon), float(delta))
    return SignedReceipt(receipt, signature)


MAX_STAGE_BLOBS = 1 << 16
"""Most blobs one stage message may carry (a site's neighbours, or every site of a sparse round)."""


def pack_stage(round_id: bytes, blobs: dict[str, bytes]) -> RecordDict:
    """A secure-aggregation stage message: opaque protocol bytes, keyed by site id or name."""
    if not isinstance(round_id, bytes) or not all(isinstance(k, str) and isinstance(v, bytes)
                                                  for k, v in blobs.items()):
        raise WireError("a stage message carries bytes keyed by strings")
    return RecordDict({"secagg": ConfigRecord({"round-id": round_id, **{f"blob:{k}": v for k, v in blobs.items()}})})


def unpack_stage(content: RecordDict) -> tuple[bytes, dict[str, bytes]]:
    """Round id and blobs of a stage message; anything but bytes keyed by strings raises WireError
    (never ``bytes(int)``, which would allocate that many bytes)."""
    try:
        record = content.config_records["secagg"]
        items = list(record.items())
    except (KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"secure-aggregation message lacks {exc}") from exc
    if len(items) > MAX_STAGE_BLOBS + 1:
        raise WireError(f"secure-aggregation message has {len(items)} entries")
    round_id = dict(items).get("round-id")
    if not isinstance(round_id, bytes) or not 0 < len(round_id) <= 0xFFFF:
        raise WireError("secure-aggregation message has no valid round id")
    blobs: dict[str, bytes] = {}
    for key, value in items:
        if isinstance(key, str) and key.startswith("blob:"):
            if not isinstance(value, bytes):
                raise WireError(f"secure-aggregation blob {key[5:]!r} is {type(value).__name__}, not bytes")
            blobs[key.removeprefix("blob:")] = value
    return round_id, blobs


def pack_privacy(report: PrivacyReport) -> ConfigRecord:
    return ConfigRecord({key: ("" if value is None else value) for key, value in report.as_dict().items()})


def unpack_privacy(content: RecordDict) -> PrivacyReport | None:
    """A reply's privacy report, type-checked; None when absent or malformed (never raises)."""
    record = content.config_records.get("privacy")
    if record is None:
        return None

    def number(key: str) -> float | None:
        value = record.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def text(key: str, limit: int) -> str | None:
        value = record.get(key)
        return value[:limit] if isinstance(value, str) and value else None

    def count(key: str) -> int | None:
        value = record.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    site, dp = record.get("site"), record.get("dp")
    if not isinstance(site, str) or not isinstance(dp, bool):
        return None
    return PrivacyReport(site[:128], dp, number("epsilon"), number("delta"), number("budget"), text("accountant", 16),
                         text("unit", 64), record.get("resent") is True, number("audited_epsilon"),
                         count("audit_canaries"), count("audit_guesses"), count("audit_correct"),
                         number("own_noise_epsilon"))


def pack_weight(weight: int) -> MetricRecord:
    """A site's public weight (secure and plain replies alike)."""
    return MetricRecord({"weight": weight})


def unpack_weight(content: RecordDict, max_weight: int) -> int:
    """The reply's weight, a whole number in [1, W]; WireError otherwise."""
    record = content.metric_records.get("train")
    weight = record.get("weight") if record is not None else None
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= max_weight:
        raise WireError(f"update weight {weight!r} is not a whole number in [1, {max_weight}]")
    return weight


MAX_SITE_NAME = 128


def pack_identity(name: str) -> RecordDict:
    """A site's answer to ``query.identify``: its registered name."""
    return RecordDict({"site": ConfigRecord({"name": name})})


def unpack_identity(content: RecordDict) -> str:
    """The name a node claims; WireError when there is none, or it is not a short string."""
    record = content.config_records.get("site")
    name = record.get("name") if record is not None else None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SITE_NAME:
        raise WireError(f"identify reply names no site ({str(name)[:100]!r})")
    return name


@dataclass(frozen=True)
class KeyAdvertisement:
    """A site's answer to a train request under secure aggregation: its signed round keys (stage 1), its
    public weight and its privacy report; the update itself is only ever sent masked, later."""

    round_id: bytes
    bundle: bytes
    weight: int
    privacy: PrivacyReport


def pack_key_advertisement(reply: KeyAdvertisement) -> RecordDict:
    content = pack_stage(reply.round_id, {"bundle": reply.bundle})
    content["privacy"] = pack_privacy(reply.privacy)
    content["train"] = pack_weight(reply.weight)
    return content


def unpack_key_advertisement(content: RecordDict, max_weight: int) -> KeyAdvertisement:
    """WireError for a missing or malformed bundle, weight or privacy report."""
    round_id, blobs = unpack_stage(content)
    privacy = unpack_privacy(content)
    if "bundle" not in blobs or privacy is None:
        raise WireError("key advertisement lacks its " + ("'bundle' blob" if privacy else "privacy report"))
    return KeyAdvertisement(round_id, blobs["bundle"], unpack_weight(content, max_weight), privacy)


def pack_train_reply(reply: TrainReply) -> RecordDict:
    return RecordDict({
        "update": ArrayRecord({"delta": Array(np.ascontiguousarray(reply.delta, dtype=np.float32))}),
        "train": pack_weight(reply.weight),
        "privacy": pack_privacy(reply.privacy),
        **({"evaluation": ArrayRecord({"counts": Array(np.asarray(reply.evaluation, dtype=np.int64))})}
           if reply.evaluation else {}),
    })


def pack_failure(failure: SiteFailure) -> RecordDict:
    return RecordDict({"failure": ConfigRecord({"kind": failure.kind, "detail": failure.detail})})


def unpack_failure(content: RecordDict) -> SiteFailure | None:
    if "failure" not in content.config_records:
        return None
    kind = content.config_records["failure"].get("kind")
    return SiteFailure(kind if isinstance(kind, str) and kind in FAILURE_MESSAGES else "unknown")


def unpack_train_reply(content: RecordDict, expected_values: int, max_weight: int, evaluation_slots: int = 0,
                       max_count: int = 0) -> TrainReply | SiteFailure:
    """Decode a site's reply; a malformed or wrongly sized update, or evaluation counts other than
    ``evaluation_slots`` integers in [0, ``max_count``], raise WireError."""
    if (failure := unpack_failure(content)) is not None:
        return failure
    try:
        array = content.array_records["update"]["delta"]
    except KeyError as exc:
        raise WireError(f"train reply lacks {exc}") from exc
    privacy = unpack_privacy(content)
    if privacy is None:
        raise WireError("train reply lacks a well-formed privacy report")
    if array.dtype != "float32" or len(array.shape) != 1 or array.shape[0] != expected_values:
        raise WireError(f"update is {array.dtype}{list(array.shape)}, expected float32[{expected_values}]")
    delta = array.numpy()
    if not np.isfinite(delta).all():
        raise WireError("update holds NaN or infinite values")
    return TrainReply(delta, unpack_weight(content, max_weight), privacy,
                      _evaluation_counts(content, evaluation_slots, max_count))


def _evaluation_counts(content: RecordDict, slots: int, max_count: int) -> tuple[int, ...]:
    if not slots:
        if "evaluation" in content.array_records:
            raise WireError("train reply carries evaluation counts in a round without evaluation")
        return ()
    try:
        counts = content.array_records["evaluation"]["counts"]
    except KeyError as exc:
        raise WireError(f"train reply lacks its evaluation counts ({exc})") from exc
    values = counts.numpy()
    if counts.dtype != "int64" or values.shape != (slots,) or not ((values >= 0) & (values <= max_count)).all():
        raise WireError(f"evaluation counts are {counts.dtype}{list(values.shape)}, expected {slots} integers in "
                        f"[0, {max_count}]")
    return tuple(int(v) for v in values)
