"""The automatic training plan: the documented rule, computed from the site's own size; overrides win."""

import pytest

from client.plan import AUTO_LEARNING_RATE, plan_training
from common.config import ConfigError, PrivacySettings, TrainSettings

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
