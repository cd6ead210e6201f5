"""The wire format: one pack/unpack for both sides, pinned by round trips and refusals."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.records import (
    FAILURE_MESSAGES,
    KeyAdvertisement,
    PrivacyReport,
    SiteFailure,
    TrainReply,
    WireError,
    pack_failure,
    pack_identity,
    pack_key_advertisement,
    pack_stage,
    pack_train_reply,
    pack_train_request,
    unpack_failure,
    unpack_identity,
    unpack_key_advertisement,
    unpack_privacy,
    unpack_stage,
    unpack_train_reply,
    unpack_train_request,
)

PRIVACY = PrivacyReport("site-1", True, 1.5, 1e-5, 8.0, "prv")


def _state():
    rng = np.random.default_rng(0)
    return {"b.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
            "a.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
            "classifier.bias": np.zeros(3, np.float32)}


def test_train_request_round_trip_keeps_keys_sorted_and_values_exact():
    state = _state()
    unpacked, server_round, params = unpack_train_request(pack_train_request(state, 7))
    assert server_round == 7 and params is None
    assert unpack_train_request(pack_train_request(state, 7, b"{params}"))[2] == b"{params}"
    assert list(unpacked) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(unpacked[key], state[key])
        assert unpacked[key].dtype == np.float32


def test_the_adapter_travels_as_one_vector_and_a_bad_layout_is_refused():
    request = pack_train_request(_state(), 7)
    assert list(request.array_records["adapter"]) == ["values"]  # one array: a handful of objects to fetch
    for layout, fragment in [
        ({"keys": ["a", "b", "c"], "shapes": ["2x4", "4x2", "4"]}, "describes 20 values"),
        ({"keys": ["a", "a", "c"], "shapes": ["2x4", "4x2", "3"]}, "distinct tensor name"),
        ({"keys": ["a", "b"], "shapes": ["2x4", "4x2", "3"]}, "one shape per"),
        ({"keys": ["a", "b", "c"], "shapes": ["2x4", "4xtwo", "3"]}, "malformed adapter shape"),
        ({"keys": ["a", "b", "c"], "shapes": ["2x4", "-4x-2", "3"]}, "negative dimension"),
    ]:
        request["layout"] = ConfigRecord(layout)
        with pytest.raises(WireError, match=fragment):
            unpack_train_request(request)
    request = pack_train_request(_state(), 7)
    request["adapter"] = ArrayRecord({"values": Array(np.zeros(19, np.float64))})
    with pytest.raises(WireError, match="float32 vector"):
        unpack_train_request(request)


def test_train_reply_round_trip():
    delta = np.arange(10, dtype=np.float32) / 3
    back = unpack_train_reply(pack_train_reply(TrainReply(delta, 42, PRIVACY)), expected_values=10, max_weight=100)
    assert isinstance(back, TrainReply)
    np.testing.assert_array_equal(back.delta, delta)
    assert back.weight == 42 and back.privacy == PRIVACY


def test_failure_round_trip_carries_only_the_fixed_message():
    content = pack_failure(SiteFailure("budget-exhausted"))
    assert dict(content.config_records["failure"]) == {"kind": "budget-exhausted",
                                                        "detail": FAILURE_MESSAGES["budget-exhausted"]}
    assert unpack_train_reply(content, expected_values=10, max_weight=100) == SiteFailure("budget-exhausted")
    content.config_records["failure"]["kind"] = 17  # a hostile or newer site: still a failure, never a crash
    assert unpack_failure(content) == SiteFailure("unknown")


@pytest.mark.parametrize("delta, fragment", [
    (np.zeros(11, np.float32), "expected float32[10]"),
    (np.zeros(10, np.float64), "expected float32[10]"),
    (np.zeros((2, 5), np.float32), "expected float32[10]"),
    (np.array([np.nan] + [0.0] * 9, np.float32), "NaN or infinite"),
])
def test_malformed_updates_are_refused(delta, fragment):
    content = pack_train_reply(TrainReply(np.zeros(10, np.float32), 3, PRIVACY))
    content["update"] = ArrayRecord({"delta": Array(delta)})
    with pytest.raises(WireError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        unpack_train_reply(content, expected_values=10, max_weight=100)


@pytest.mark.parametrize("weight", [0, 101, -1, 2.5])
def test_a_weight_outside_one_to_w_is_refused(weight):
    reply = pack_train_reply(TrainReply(np.zeros(3, np.float32), 1, PRIVACY))
    reply.metric_records["train"]["weight"] = weight
    with pytest.raises(WireError, match="weight"):
        unpack_train_reply(reply, expected_values=3, max_weight=100)


def test_reply_without_update_or_privacy_report_is_refused():
    with pytest.raises(WireError, match="lacks"):
        unpack_train_reply(RecordDict({}), expected_values=3, max_weight=100)
    reply = pack_train_reply(TrainReply(np.zeros(3, np.float32), 1, PRIVACY))
    reply.config_records["privacy"]["dp"] = "yes"
    assert unpack_privacy(reply) is None
    with pytest.raises(WireError, match="privacy report"):
        unpack_train_reply(reply, expected_values=3, max_weight=100)


def test_stage_round_trip_and_refusal():
    round_id, blobs = unpack_stage(pack_stage(b"run-1/round-2", {"3": b"\x00\x01", "payload": b"abc"}))
    assert round_id == b"run-1/round-2" and blobs == {"3": b"\x00\x01", "payload": b"abc"}
    with pytest.raises(WireError, match="secure-aggregation message lacks"):
        unpack_stage(RecordDict({}))


def test_identity_and_key_advertisement_round_trip_and_refusals():
    assert unpack_identity(pack_identity("site-a")) == "site-a"
    for bad in (RecordDict({}), RecordDict({"site": ConfigRecord({"name": 7})}),
                RecordDict({"site": ConfigRecord({"name": "x" * 200})})):
        with pytest.raises(WireError, match="names no site"):
            unpack_identity(bad)
    advert = KeyAdvertisement(b"round", b"bundle", 3, PRIVACY)
    assert unpack_key_advertisement(pack_key_advertisement(advert), 10) == advert
    with pytest.raises(WireError, match="not a whole number"):
        unpack_key_advertisement(pack_key_advertisement(advert), 2)  # weight above W
    no_privacy = pack_stage(b"round", {"bundle": b"bundle"})
    no_privacy["train"] = pack_key_advertisement(advert).metric_records["train"]
    with pytest.raises(WireError, match="privacy report"):
        unpack_key_advertisement(no_privacy, 10)
    with pytest.raises(WireError, match="'bundle' blob"):
        unpack_key_advertisement(_without_bundle(advert), 10)


def _without_bundle(advert: KeyAdvertisement) -> RecordDict:
    content = pack_key_advertisement(advert)
    content["secagg"] = pack_stage(advert.round_id, {"other": b"x"}).config_records["secagg"]
    return content


def test_a_receipt_travels_with_the_train_request_typed_and_a_malformed_one_is_refused():
    from common.records import ChargeReceipt, SignedReceipt, unpack_receipt, with_receipt

    request = pack_train_request(_state(), 7)
    assert with_receipt(request, None) is request and unpack_receipt(request) is None
    signed = SignedReceipt(ChargeReceipt(3, 6, "site-1", 1.5, 1e-5), b"\x07" * 64)
    carrying = with_receipt(request, signed)
    assert unpack_receipt(carrying) == signed and "receipt" not in request  # the shared request is untouched
    assert unpack_train_request(carrying)[1] == 7
    good = dict(carrying.config_records["receipt"])
    for field, bad in [("run-id", -1), ("round", True), ("round", 1.5), ("site", ""), ("site", "x" * 200),
                       ("epsilon", float("nan")), ("epsilon", "1.5"), ("delta", -1e-5), ("signature", b"\x07" * 63),
                       ("signature", "07" * 64)]:
        carrying["receipt"] = ConfigRecord(good | {field: bad})
        with pytest.raises(WireError, match="receipt is malformed"):
            unpack_receipt(carrying)


def test_a_privacy_report_says_whether_it_resends_and_defaults_to_trained():
    from common.records import pack_privacy

    for resent in (True, False):
        report = PrivacyReport("site-1", True, 1.5, 1e-5, 8.0, "prv", "record", resent)
        assert unpack_privacy(RecordDict({"privacy": pack_privacy(report)})) == report
    record = pack_privacy(PRIVACY)
    record["resent"] = "yes"  # anything but True is a trained round
    assert unpack_privacy(RecordDict({"privacy": record})).resent is False


def test_a_privacy_report_carries_the_sites_audit_and_drops_a_malformed_one():
    from common.records import pack_privacy

    audited = PrivacyReport("site-1", True, 1.5, 1e-5, 8.0, "prv", "record", False, 0.42, 200, 40, 31)
    assert unpack_privacy(RecordDict({"privacy": pack_privacy(audited)})) == audited
    assert unpack_privacy(RecordDict({"privacy": pack_privacy(PRIVACY)})).audited_epsilon is None
    record = pack_privacy(audited)
    record["audit_canaries"], record["audited_epsilon"] = -3, "high"
    back = unpack_privacy(RecordDict({"privacy": record}))
    assert back.audit_canaries is None and back.audited_epsilon is None and back.audit_guesses == 40
