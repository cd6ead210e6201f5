"""ε and the plan depend only on public values (issue 19, findings 3 and 4), tried from the coordinator's side.

The coordinator knows the plan rule and sets every run setting; the ε a site reports after each round is in the
clear. If the plan (B, q, steps, σ) or the accounting read the site's number of units n, that ε would be a lookup
table for n (before: batch 16 and one epoch pinned n exactly from rounds 1 and 2). Sites of n and n + 1 units
with the same public size, declared or the same DP estimate, must report the same bits after every round.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.config import RunSettings
from common.records import pack_train_request
from tests.conftest import write_csv
from tests.test_site_releases import call, initial_adapter, node_config, run_config

SIZES = (33, 34)
"""Above 32, where the old automatic plan's q = 32/n moved with n (batch 16: q = 16/n)."""
PLANS = {"batch 16, one epoch, rdp": {"train.batch-size": 16, "train.local-epochs": 1, "privacy.accountant": "rdp"},
         "automatic, prv": {"train.batch-size": 0, "train.local-epochs": 0, "train.learning-rate": 0.0}}


def _config(tmp_path: Path, plan: dict) -> dict:
    """A 30-round run (the automatic plan: one epoch per round, so a short test), of which two rounds are tried."""
    return run_config(tmp_path, **plan, **{"train.physical-batch-tokens": 4096, "federation.rounds": 30})


def _epsilons(tmp_path: Path, config: dict, name: str, data: Path, **policy) -> list[float]:
    """ε the site reports after rounds 1 and 2, through the ClientApp's real train handler."""
    from client.app import train

    nodes = node_config(tmp_path, name, data, **policy)
    adapter = initial_adapter(config)
    epsilons = []
    for server_round in (1, 2):
        reply = call(train, pack_train_request(adapter, server_round), config, nodes)
        assert "failure" not in reply.config_records, dict(reply.config_records["failure"])
        epsilons.append(dict(reply.config_records["privacy"])["epsilon"])
    return epsilons


def _pin_estimate(tmp_path: Path, config: dict, units: int, *names: str) -> int:
    """The first site draws its estimate ñ for ``units`` (the real draw, persisted and charged as the site does);
    its state (ledger and audit log) is copied to the other sites, which so hold the same ñ."""
    from client.privacy import PrivacyLedger

    first = tmp_path / names[0]
    ledger = PrivacyLedger(first / "privacy-ledger.json", RunSettings.from_flat(config).privacy)
    estimate = ledger.estimated_units(units, run_id=7, server_round=1)
    for name in names[1:]:
        shutil.copytree(first, tmp_path / name)
    return estimate


@pytest.mark.model
@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("public", ["declared", "estimated"])
def test_sites_of_n_and_n_plus_1_with_the_same_public_size_report_the_same_epsilon(tmp_path: Path, drug_reviews,
                                                                                    plan: str, public: str):
    config = _config(tmp_path, PLANS[plan])
    names = [f"site-{n}" for n in SIZES]
    if public == "declared":
        policy = {"declared-examples": SIZES[1]}
    else:
        policy = {}
        _pin_estimate(tmp_path, config, SIZES[0], *names)
    reported = [_epsilons(tmp_path, config, name, write_csv(tmp_path / f"{name}.csv", drug_reviews[:n]), **policy)
                for name, n in zip(names, SIZES, strict=True)]
    assert reported[0] == reported[1]  # bit for bit, after round 1 and after round 2
    assert 0 < reported[0][0] < reported[0][1] <= 8.0


@pytest.mark.model
def test_the_estimate_is_charged_and_a_site_whose_data_changes_keeps_its_plan(tmp_path: Path, drug_reviews):
    """ñ is drawn once, by the first round (ε after it includes ε_n = ε/50), and kept: a site whose data grows
    or shrinks between rounds trains every round at the same q and steps, and spends what it would have."""
    from client.app import train
    from client.privacy import PrivacyLedger, epsilon_of

    config = _config(tmp_path, PLANS["batch 16, one epoch, rdp"])
    privacy = RunSettings.from_flat(config).privacy
    adapter = initial_adapter(config)
    ledger_path = tmp_path / "site-a" / "privacy-ledger.json"
    for server_round, records in ((1, 20), (2, 27), (3, 14)):  # the site's data file, re-read each round
        data = write_csv(tmp_path / f"data-{records}.csv", drug_reviews[:records])
        reply = call(train, pack_train_request(adapter, server_round), config, node_config(tmp_path, "site-a", data))
        reported = dict(reply.config_records["privacy"])["epsilon"]
        ledger = PrivacyLedger(ledger_path, privacy)
        assert ledger.estimate is not None and ledger.estimate.epsilon == pytest.approx(8.0 / 50)
        dp_sgd = epsilon_of(privacy.accountant, tuple(ledger.history), privacy.delta)
        assert reported == pytest.approx(ledger.estimate.epsilon + dp_sgd, abs=1e-4) and reported >= ledger.spent()
    estimate = ledger.estimate.units
    batch = min(16, estimate)
    steps = -(-estimate // batch)  # one epoch of ñ at B = min(16, ñ)
    assert [(entry.sample_rate, entry.steps) for entry in ledger.rounds] == [(batch / estimate, steps)] * 3
    assert ledger.history == [(ledger.plan.noise_multiplier, batch / estimate, 3 * steps)]
