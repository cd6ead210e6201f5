"""The automatic training plan: the documented rule, computed from the site's public size (declared, or its DP
estimate), never its true count; overrides win, within the site's policy."""

import dataclasses
from pathlib import Path

import pytest

from client.plan import plan_training
from client.policy import PolicyError, SitePolicy
from client.privacy import PrivacyLedger
from client.train import public_size
from common.config import (
    AUTO_LEARNING_RATE,
    ConfigError,
    DataSettings,
    FederationSettings,
    PrivacySettings,
    RunSettings,
    SecureAggSettings,
    TrainSettings,
)

AUTO = TrainSettings()


@pytest.mark.parametrize(("units", "rounds", "batch", "steps"), [
    (2_000, 10, 500, 12),      # a quarter of the site per step; 30 epochs over the run: 3 per round
    (2_000, 1, 500, 120),
    (100, 4, 32, 24),          # small sites: at least 32 per step (⌈30·100/(4·32)⌉ = 24)
    (10, 2, 10, 15),           # a site smaller than 32: the whole site, q = 1
    (100_000, 10, 2_048, 147),  # large sites: at most 2,048 per step
])
def test_the_automatic_plan_follows_its_rule(units, rounds, batch, steps):
    plan = plan_training(units, AUTO, PrivacySettings(), rounds)
    assert (plan.batch_size, plan.steps) == (batch, steps)
    assert plan.sample_rate == pytest.approx(batch / units)
    assert plan.learning_rate == AUTO_LEARNING_RATE and plan.max_grad_norm == 1.0
    # The run covers about 30 epochs of the site, whatever the number of rounds.
    assert plan.steps * rounds * plan.sample_rate == pytest.approx(30, rel=0.1)


def test_every_value_can_be_set_by_hand():
    manual = TrainSettings(learning_rate=0.1, local_epochs=2, batch_size=64)
    plan = plan_training(1_000, manual, PrivacySettings(max_grad_norm=0.5), 10)
    assert (plan.batch_size, plan.steps, plan.learning_rate, plan.max_grad_norm) == (64, 32, 0.1, 0.5)
    assert plan_training(10, manual, PrivacySettings(), 1).batch_size == 10  # never more than the site holds


def test_bad_plan_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="train.batch-size must be >= 0"):
        TrainSettings(batch_size=-1)
    with pytest.raises(ConfigError, match="train.max-rows-per-unit must be >= 1"):
        TrainSettings(max_rows_per_unit=0)
    with pytest.raises(ConfigError, match="privacy.unit must be 'record' or 'column:NAME'"):
        PrivacySettings(unit="patient_id")


def test_the_public_size_is_the_declared_one_else_the_ledgers_estimate_and_the_true_count_only_without_dp(
        tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0))
    assert public_size(40, 500, ledger, run_id=1, server_round=1) == 500
    assert ledger.estimate is None and not ledger.path.exists()  # a declared size is free: nothing drawn or spent
    estimate = public_size(40, None, ledger, run_id=1, server_round=1)
    assert estimate == ledger.estimate.units >= 1 and ledger.spent() == pytest.approx(8.0 / 50)
    assert public_size(41, None, PrivacyLedger(ledger.path, ledger.settings), run_id=1, server_round=2) == estimate
    assert public_size(40, None, None, run_id=1, server_round=1) == 40  # no DP: nothing to protect


def _settings(rounds: int = 4, **train) -> RunSettings:
    return RunSettings(train=TrainSettings(**train), data=DataSettings(labels=("a",)),
                       federation=FederationSettings(rounds=rounds), secagg=SecureAggSettings(registry="r.json"))


def test_the_coordinators_plan_settings_are_bounded_by_the_sites_policy():
    policy = SitePolicy(labels=("a",), max_rounds=10, max_steps_per_round=500)
    policy.check(_settings())
    with pytest.raises(PolicyError, match="11 rounds; this site allows at most 10 .policy max-rounds"):
        policy.check(_settings(rounds=11))
    # Distributed DP takes one step per round: the most rounds is the most steps, max-rounds × max-steps-per-round.
    distributed = SitePolicy(labels=("a",), max_rounds=10, max_steps_per_round=30, dp_modes=("local", "distributed"))
    distributed.check(dataclasses.replace(_settings(rounds=300), privacy=PrivacySettings(dp_mode="distributed")))
    with pytest.raises(PolicyError, match="301 distributed-DP rounds .one step each.; this site allows at most 300"):
        distributed.check(dataclasses.replace(_settings(rounds=301), privacy=PrivacySettings(dp_mode="distributed")))
    # Steps follow from the run's batch size and epochs at the site's public size: 100 epochs of 1 unit per step.
    policy.check_plan(_settings(), public_units=2_000)
    with pytest.raises(PolicyError, match="takes 1000 steps per round; this site allows at most 500"):
        policy.check_plan(_settings(batch_size=1, local_epochs=100), public_units=10)
    policy.check_plan(_settings(batch_size=1, local_epochs=100), public_units=5)
    with pytest.raises(ConfigError, match="max-rounds and max-steps-per-round must be >= 1"):
        SitePolicy(labels=("a",), max_steps_per_round=0)
