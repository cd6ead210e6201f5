"""What a site releases, tried from the coordinator's side: the ClientApp's real handlers, called
with Flower messages as the coordinator would send them (plain aggregation, so every field of the
reply is visible), on a deployed site's node config.

Nothing computed on the site's records may reach the coordinator except the DP update and its noisy
evaluation counts: no record count, no loss, no error text; a repeated round resends the sealed update for no
new ε; a run asking for less than the site's policy is refused before anything is spent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from client.policy import SitePolicy
from common.config import RunSettings
from common.records import FAILURE_MESSAGES, pack_train_request
from fedtune.cli import default_run_config
from tests.conftest import write_csv

LABELS = "negative,neutral,positive"


def run_config(tmp_path: Path, **overrides) -> dict:
    return default_run_config() | {
        "out-dir": str(tmp_path / "coordinator"), "data.labels": LABELS, "data.max-length": 16,
        "federation.secure-aggregation": False, "federation.rounds": 2, "train.local-epochs": 1,
        "train.batch-size": 4, "train.physical-batch-tokens": 4 * 16,
        "privacy.accountant": "rdp",  # plans σ in a few seconds; PRV (the default) has tests of its own
    } | overrides


def node_config(tmp_path: Path, name: str, data: Path, **policy) -> dict:
    policy = {"require-secure-aggregation": False, "labels": LABELS} | policy
    return {"site-name": name, "data-path": str(data), "state-dir": str(tmp_path / name),
            "kit-dir": str(tmp_path / name / "kit"), "keys-dir": str(tmp_path / name / "keys"),
            **{f"policy.{k}": v for k, v in policy.items()}}


def call(handler, content: RecordDict, config: dict, nodes: dict, *, run_id: int = 7) -> RecordDict:
    metadata = Metadata(run_id=run_id, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=600.0,
                        message_type="train")
    context = Context(run_id=run_id, node_id=1, node_config=nodes, state=RecordDict(), run_config=config)
    return handler(Message(metadata=metadata, content=content), context).content


def initial_adapter(config: dict):
    from common.adapter import get_adapter_state
    from common.model import build_model

    settings = RunSettings.from_flat(config)
    return get_adapter_state(build_model("", 3, settings.lora))


def clear_values(reply: RecordDict) -> list:
    """Every value of the reply outside the update array itself."""
    values = []
    for record in [*reply.config_records.values(), *reply.metric_records.values()]:
        for value in record.values():
            values.extend(value if isinstance(value, list) else [value])
    return values


@pytest.fixture()
def two_sites(tmp_path: Path, drug_reviews) -> dict[str, Path]:
    return {"site-a": write_csv(tmp_path / "a.csv", drug_reviews[:5]),
            "site-b": write_csv(tmp_path / "b.csv", drug_reviews[5:14])}


@pytest.mark.model
def test_a_plain_reply_holds_the_update_a_public_weight_and_epsilon_only(tmp_path: Path, two_sites):
    from client.app import train

    config = run_config(tmp_path)
    request = pack_train_request(initial_adapter(config), 1)
    replies = {name: call(train, request, config, node_config(tmp_path, name, data))
               for name, data in two_sites.items()}
    for name, reply in replies.items():
        assert "failure" not in reply.config_records, reply.config_records["failure"]
        # the update, and the noisy evaluation counts of the adapter it received (tests/test_federated_evaluation.py)
        assert set(reply.array_records) == {"update", "evaluation"} and set(reply.metric_records) == {"train"}
        counts = reply.array_records["evaluation"]["counts"].numpy()
        assert counts.dtype == np.int64 and counts.shape == (3 * 3 + 2,)
        assert dict(reply.metric_records["train"]) == {"weight": 10_000}  # equal weights: W, not 5 or 9
        privacy = dict(reply.config_records["privacy"])
        audit = {"audited_epsilon", "audit_canaries", "audit_guesses", "audit_correct"}  # empty: no audit asked for
        own_noise = "own_noise_epsilon"  # distributed DP only: empty here, as the audit fields of a site not auditing
        assert set(privacy) == {"site", "dp", "epsilon", "delta", "budget", "accountant", "unit", "resent", own_noise,
                                *audit}
        assert all(privacy[key] == "" for key in (*audit, own_noise))
        assert privacy["unit"] == "record" and privacy["site"] == name and privacy["dp"] is True
        assert privacy["resent"] is False  # trained for this request: its ε must have risen
        assert 0 < privacy["epsilon"] <= 8.0
        assert set(reply.config_records) == {"privacy"}
    # Besides its name and ε, nothing in the clear tells the sites (5 and 9 records) apart.
    a, b = ({k: v for k, v in dict(replies[n].config_records["privacy"]).items() if k not in ("site", "epsilon")}
            for n in ("site-a", "site-b"))
    assert a == b and dict(replies["site-a"].metric_records["train"]) == dict(replies["site-b"].metric_records["train"])


@pytest.mark.model
def test_a_declared_weight_is_the_sites_own_choice_capped_at_w(tmp_path: Path, two_sites):
    from client.app import train

    config = run_config(tmp_path, **{"secagg.max-examples": 100})
    request = pack_train_request(initial_adapter(config), 1)
    reply = call(train, request, config, node_config(tmp_path, "site-a", two_sites["site-a"],
                                                      **{"declared-examples": 500}))
    assert dict(reply.metric_records["train"]) == {"weight": 100}


@pytest.mark.model
def test_a_failure_reply_carries_a_kind_and_a_fixed_message_never_the_record(tmp_path: Path):
    """A record whose label the site never agreed to is the site's own problem (found locally): the
    coordinator learns a kind and a fixed text, never the record, its line or its label."""
    from client.app import train

    secret = "Patient 4711 took Zyprexa for my psychosis"
    data = write_csv(tmp_path / "odd.csv", [{"text": "fine", "label": "positive"},
                                            {"text": secret, "label": "psychosis-relapse"}])
    config = run_config(tmp_path)
    reply = call(train, pack_train_request(initial_adapter(config), 1), config, node_config(tmp_path, "site-a", data))
    failure = dict(reply.config_records["failure"])
    assert failure == {"kind": "bad-data", "detail": FAILURE_MESSAGES["bad-data"]}
    text = json.dumps(clear_values(reply))
    for leak in ("4711", "Zyprexa", "psychosis", "example", "line"):
        assert leak not in text


@pytest.mark.model
def test_a_repeated_round_resends_the_sealed_update_and_spends_nothing(tmp_path: Path, two_sites):
    """A coordinator that crashed after the sites trained round 1 and resumed (a new Flower run)
    asks again: the site resends what it released, and its ε is what it would be without the crash."""
    from client.app import train
    from client.privacy import PrivacyLedger

    config = run_config(tmp_path)
    nodes = node_config(tmp_path, "site-a", two_sites["site-a"])
    state = initial_adapter(config)
    first = call(train, pack_train_request(state, 1), config, nodes, run_id=7)
    ledger_path = tmp_path / "site-a" / "privacy-ledger.json"
    spent = PrivacyLedger(ledger_path, RunSettings.from_flat(config).privacy).spent()
    again = call(train, pack_train_request(state, 1), config, nodes, run_id=8)  # the resumed run
    update = first.array_records["update"]["delta"].numpy()
    assert np.array_equal(again.array_records["update"]["delta"].numpy(), update)
    assert PrivacyLedger(ledger_path, RunSettings.from_flat(config).privacy).spent() == spent
    assert dict(again.config_records["privacy"])["epsilon"] == dict(first.config_records["privacy"])["epsilon"]
    assert dict(again.config_records["privacy"])["resent"] is True  # so the coordinator accepts a flat ε
    # Another adapter is another release: trained and charged.
    moved = {key: value + 0.01 for key, value in state.items()}
    fresh = call(train, pack_train_request(moved, 2), config, nodes, run_id=8)
    assert not np.array_equal(fresh.array_records["update"]["delta"].numpy(), update)
    assert PrivacyLedger(ledger_path, RunSettings.from_flat(config).privacy).spent() > spent


@pytest.mark.model
@pytest.mark.parametrize(("overrides", "policy"), [
    ({"privacy.delta": 0.5}, {}),
    ({"privacy.epsilon": 20.0}, {"max-epsilon": 8}),
    ({"privacy.enabled": False}, {}),
    ({"privacy.accountant": "rdp"}, {"accountants": "prv"}),
    ({"data.labels": "negative,positive"}, {}),
    ({"model-path": "/etc"}, {}),
    ({"privacy.unit": "record"}, {"privacy-unit": "column:condition"}),  # per-patient site asked for per-row ε
    ({"privacy.unit": "column:condition"}, {}),
])
def test_a_run_below_the_sites_policy_is_refused_before_anything_is_spent(tmp_path: Path, two_sites, overrides,
                                                                           policy):
    from client.app import train

    config = run_config(tmp_path, **overrides)
    reply = call(train, pack_train_request(initial_adapter(config), 1), config,
                 node_config(tmp_path, "site-a", two_sites["site-a"], **policy))
    assert dict(reply.config_records["failure"])["kind"] == "site-policy"
    assert not (tmp_path / "site-a" / "privacy-ledger.json").exists()
    assert not (tmp_path / "site-a" / "released").exists()


@pytest.mark.model
def test_a_site_whose_data_lacks_its_privacy_unit_column_says_so_locally_and_sends_a_kind(tmp_path: Path,
                                                                                         two_sites):
    from client.app import train
    from common.data import DataError, read_records, unit_indices

    config = run_config(tmp_path, **{"privacy.unit": "column:patient_id"})
    reply = call(train, pack_train_request(initial_adapter(config), 1), config,
                 node_config(tmp_path, "site-a", two_sites["site-a"], **{"privacy-unit": "column:patient_id"}))
    assert dict(reply.config_records["failure"]) == {"kind": "bad-data", "detail": FAILURE_MESSAGES["bad-data"]}
    with pytest.raises(DataError, match="the privacy unit column 'patient_id' is not in the data"):
        unit_indices(read_records(str(two_sites["site-a"])), "patient_id", "a.csv")


def test_policy_default_delta_is_not_an_oracle_for_the_record_count():
    from client.policy import PolicyError, default_max_delta

    # The default δ ceiling never exceeds 1/(10·m) for the site's public size m (declared, or its DP estimate),
    # and below 10,000 it does not depend on m at all; it never reads the true count.
    assert {default_max_delta(n) for n in (1, 50, 999, 10_000)} == {1e-5}
    assert default_max_delta(12_345) == 1e-6 and default_max_delta(10**6) == 1e-7
    assert all(default_max_delta(n) <= 1 / (10 * n) for n in (1, 7, 10_001, 99_999, 123_456_789))
    settings = RunSettings.from_flat(default_run_config() | {"privacy.delta": 2e-5, "secagg.registry": "r.json",
                                                             "data.labels": LABELS})
    policy = SitePolicy(labels=tuple(LABELS.split(",")))
    with pytest.raises(PolicyError, match="δ"):  # above every size's ceiling: refused before the size is known
        policy.check(settings)
    loose = SitePolicy(labels=policy.labels, max_delta=1e-4)
    loose.check(settings)
    loose.check_plan(settings, public_units=50_000)
    usual = dataclasses.replace(settings, privacy=dataclasses.replace(settings.privacy, delta=1e-5))
    policy.check(usual)
    policy.check_plan(usual, public_units=5_000)
    with pytest.raises(PolicyError, match="δ=1e-05; this site allows at most δ=1e-06"):
        policy.check_plan(usual, public_units=12_345)
    with pytest.raises(ValueError, match="unknown site policy setting"):
        SitePolicy.from_mapping({"max-epsilom": 3}, "node config")
    with pytest.raises(ValueError, match="min-sites must be >= 2"):
        SitePolicy.from_mapping({"min-sites": 1}, "node config")
