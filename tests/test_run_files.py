"""The files a run writes: each record round-trips through its writer and reader, files of an older version
still load, and a damaged file is named with its line and field."""

import json
from pathlib import Path

import pytest

from common.run_files import (
    BaselinePoint,
    Failure,
    MetricsLine,
    PrivacyFile,
    PrivacyReport,
    RoundInfo,
    RunFileError,
    RunInfo,
    SecureRoundDetails,
    append_metrics,
    drop_partial_metrics_line,
    read_baselines,
    read_metrics,
    read_privacy,
    read_round_info,
    read_run_info,
    write_baselines,
    write_privacy,
    write_round_info,
    write_run_info,
)

SCORES = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.2, "examples": 30}
DETAILS = SecureRoundDetails(survivors=["site-0", "site-1", "site-2"], dropped=[], total_weight=3,
                             clamped_elements=0, mean_clipped=False, error_bound=1e-6, modulus_bits=40, value_bits=30,
                             neighbours=2, threshold=2, all_pairs=True, upload_bytes=4096,
                             exchange_seconds={"train": 3.5, "share": 0.25})
ROUND = MetricsLine(round=1, server=SCORES, aggregation="secure", contributors=3,
                    failures=(Failure("site-3", "protocol", "late", stage="mask"),), model_updated=True,
                    secure_aggregation=DETAILS, dp=True, privacy_unit="patient_id",
                    epsilon={"site-0": 2.5, "site-3": None}, duration_s=12.5, checkpoint="round-0001")


def test_every_record_round_trips_through_its_writer_and_reader(tmp_path: Path):
    run = RunInfo(majority_baseline={"accuracy": 0.3}, aggregation="secure", dp=True, task="classification",
                  labels=("no", "yes"), update_values=1234, sites=3, rounds=2, privacy_unit="column:patient_id",
                  server_optimizer="fedadam", epsilon_budget=8.0)
    write_run_info(tmp_path, run)
    assert read_run_info(tmp_path) == run
    for line in (MetricsLine(0, SCORES), ROUND):
        append_metrics(tmp_path, line)
    assert read_metrics(tmp_path) == [MetricsLine(0, SCORES), ROUND]
    assert read_metrics(tmp_path, start=1) == [ROUND]
    privacy = PrivacyFile(True, {"site-0": PrivacyReport("site-0", True, 2.5, 1e-5, 8.0, "prv", "patient_id")})
    write_privacy(tmp_path, privacy)
    assert read_privacy(tmp_path) == privacy
    info = RoundInfo(round=1, adapter_sha256="ab" * 32, contributors=3, parent_sha256="cd" * 32, metrics=ROUND)
    write_round_info(tmp_path, info)
    assert read_round_info(tmp_path) == info
    curves = {"local": [BaselinePoint(1, {"accuracy": 0.2, "macro_f1": 0.15})]}
    write_baselines(tmp_path, curves)
    assert read_baselines(tmp_path) == curves
    assert json.loads((tmp_path / "baselines.json").read_text()) == {  # the format stays flat
        "local": [{"round": 1, "accuracy": 0.2, "macro_f1": 0.15}]}


def test_the_keys_on_disk_are_the_ones_earlier_versions_wrote(tmp_path: Path):
    append_metrics(tmp_path, ROUND)
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {"round", "server", "aggregation", "contributors", "failures", "model_updated", "secure_aggregation", "dp",
            "privacy_unit", "epsilon", "duration_s", "checkpoint", "federated_evaluation"} == set(written)
    assert written["failures"][0]["kind"] == "protocol" and written["secure_aggregation"]["upload_bytes"] == 4096


def test_files_of_an_older_version_still_load(tmp_path: Path):
    """Round 0 with only its scores, run.json before task/privacy_unit/budget, reports before ``resent``, and
    keys this version no longer writes (an older metrics line's "federated")."""
    (tmp_path / "run.json").write_text(json.dumps({"majority_baseline": {"accuracy": 0.3}, "dp": True,
                                                   "aggregation": "plain", "update_values": 10}))
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 0, "server": SCORES}) + "\n"
        + json.dumps({"round": 1, "server": SCORES, "contributors": 2, "failures": [{"site": "s", "kind": "bad-data",
                      "detail": "x"}], "model_updated": True, "federated": {"accuracy": 0.9}}) + "\n")
    (tmp_path / "privacy.json").write_text(json.dumps({"dp": True, "sites": {"s": {"site": "s", "dp": True,
                                                                                    "epsilon": 1.5}}}))
    run = read_run_info(tmp_path)
    assert (run.task, run.privacy_unit, run.epsilon_budget) == ("classification", "record", None)
    zero, one = read_metrics(tmp_path)
    assert zero == MetricsLine(0, SCORES) and one.failures == (Failure("s", "bad-data", "x"),)
    assert read_privacy(tmp_path).sites["s"].resent is False
    assert read_privacy(tmp_path / "absent") is None and read_baselines(tmp_path) == {}


@pytest.mark.parametrize("text, fragment", [
    ('{"server": {}}', "metrics.jsonl line 2: 'round' is missing"),
    ('{"round": 1, "server": {}, "contributors": "three"}',
     "metrics.jsonl line 2: contributors must be a whole number, got 'three'"),
    ('{"round": 1, "server": {}, "failures": [{"site": "s", "kind": "k"}]}',
     "metrics.jsonl line 2: 'failures[0].detail' is missing"),
    ('{"round": 1, "server": {}, "secure_aggregation": {"survivors": "all"}}',
     "metrics.jsonl line 2: secure_aggregation.survivors must be a list"),
    ("{not json", "metrics.jsonl line 2: not a JSON object"),
    ("[1, 2]", "metrics.jsonl line 2: the value must be a mapping"),
])
def test_a_damaged_metrics_line_is_named_with_its_line_and_field(tmp_path: Path, text: str, fragment: str):
    append_metrics(tmp_path, MetricsLine(0, SCORES))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write(text + "\n")
    with pytest.raises(RunFileError) as info:
        read_metrics(tmp_path)
    assert fragment in str(info.value) and "the run directory is damaged" in str(info.value)


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path):
    with pytest.raises(RunFileError, match=r"round-0003/round.json is missing — the run directory is damaged"):
        read_round_info(tmp_path / "round-0003")
    (tmp_path / "privacy.json").write_text('{"dp": true, "sites": ')
    with pytest.raises(RunFileError, match=r"privacy.json is not readable JSON"):
        read_privacy(tmp_path)
    (tmp_path / "run.json").write_text('{"dp": true, "aggregation": "secure"}')
    with pytest.raises(RunFileError, match=r"run.json: 'majority_baseline' is missing"):
        read_run_info(tmp_path)
    (tmp_path / "baselines.json").write_text('{"local": [{"accuracy": 0.5}]}')
    with pytest.raises(RunFileError, match=r"baselines.json: local\[0\]: 'round' is missing"):
        read_baselines(tmp_path)


def test_a_half_written_last_line_waits_and_is_dropped_on_resume(tmp_path: Path):
    append_metrics(tmp_path, MetricsLine(0, SCORES))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 1, "ser')  # the crash came mid-write
    assert read_metrics(tmp_path) == [MetricsLine(0, SCORES)]  # a follower waits for the rest
    drop_partial_metrics_line(tmp_path)
    append_metrics(tmp_path, ROUND)
    assert read_metrics(tmp_path) == [MetricsLine(0, SCORES), ROUND]
