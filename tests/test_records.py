"""The wire format: one pack/unpack for both sides, pinned by round trips and refusals."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from common.evaluation import EvalCounts
from common.records import (
    SiteFailure, TrainReply, WireError, pack_failure, pack_stage, pack_train_reply, pack_train_request,
    unpack_stage, unpack_train_reply, unpack_train_request,
)

EVAL = EvalCounts(2.5, np.array([[3, 1], [0, 4]], dtype=np.int64))


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


def test_train_reply_round_trip():
    delta = np.arange(10, dtype=np.float32) / 3
    reply = TrainReply(delta, 42, 0.5, 6, EVAL, {"site": "site-1", "epsilon": 1.5, "history": [[1.1, 0.1, 6]]})
    back = unpack_train_reply(pack_train_reply(reply), expected_values=10, num_labels=2)
    assert isinstance(back, TrainReply)
    assert back.evaluation.loss_sum == 2.5 and np.array_equal(back.evaluation.confusion, EVAL.confusion)
    np.testing.assert_array_equal(back.delta, delta)
    assert (back.num_examples, back.loss, back.steps) == (42, 0.5, 6)
    assert back.privacy["site"] == "site-1" and back.privacy["history"] == [1.1, 0.1, 6.0]


def test_failure_round_trip():
    back = unpack_train_reply(pack_failure(SiteFailure("budget-exhausted", "ε 8 spent")), expected_values=10,
                              num_labels=2)
    assert back == SiteFailure("budget-exhausted", "ε 8 spent")


@pytest.mark.parametrize("delta, fragment", [
    (np.zeros(11, np.float32), "expected float32[10]"),
    (np.zeros(10, np.float64), "expected float32[10]"),
    (np.zeros((2, 5), np.float32), "expected float32[10]"),
    (np.array([np.nan] + [0.0] * 9, np.float32), "NaN or infinite"),
])
def test_malformed_updates_are_refused(delta, fragment):
    content = pack_train_reply(TrainReply(np.zeros(10, np.float32), 3, 0.1, 1, EVAL))
    content["update"] = ArrayRecord({"delta": Array(delta)})
    with pytest.raises(WireError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        unpack_train_reply(content, expected_values=10, num_labels=2)


def test_reply_without_update_or_with_no_examples_is_refused():
    with pytest.raises(WireError, match="lacks"):
        unpack_train_reply(RecordDict({}), expected_values=3, num_labels=2)
    reply = pack_train_reply(TrainReply(np.zeros(3, np.float32), 1, 0.0, 1, EVAL))
    reply.metric_records["train"]["num-examples"] = 0
    with pytest.raises(WireError, match="claims 0 examples"):
        unpack_train_reply(reply, expected_values=3, num_labels=2)


def test_evaluation_counts_of_the_wrong_shape_are_refused():
    reply = pack_train_reply(TrainReply(np.zeros(3, np.float32), 1, 0.0, 1, EVAL))
    with pytest.raises(WireError, match="expected 3x3"):
        unpack_train_reply(reply, expected_values=3, num_labels=3)


def test_stage_round_trip_and_refusal():
    round_id, blobs = unpack_stage(pack_stage(b"run-1/round-2", {"3": b"\x00\x01", "payload": b"abc"}))
    assert round_id == b"run-1/round-2" and blobs == {"3": b"\x00\x01", "payload": b"abc"}
    with pytest.raises(WireError, match="secure-aggregation message lacks"):
        unpack_stage(RecordDict({}))
