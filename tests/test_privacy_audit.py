"""The privacy audit: the one-run bound of Steinke, Nasr & Jagielski 2023 against hand computations, the site's
gradient canaries in its real DP-SGD step, and the audit failing a DP step whose noise is off."""

from __future__ import annotations

import dataclasses
import itertools
import math
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.canaries import CANARY_DIR, RunCanaries, draw_canaries, included_coordinates, joining
from client.per_unit_grads import PerUnitDPSGD
from client.privacy import fresh_generator, noise_multiplier_for
from common.privacy_audit import (
    AUDIT_RESULT_FILE,
    SIGNIFICANCE,
    AuditError,
    audit,
    epsilon_lower_bound,
    guess_counts,
    membership_auc,
    p_value,
    read_audit_result,
    write_audit_result,
)
from simulations.benchmarks.privacy_audit import ACCOUNTANT, DELTA, Setting, audited_training

BROKEN = Setting(0.0, units=200, sample_rate=0.1, steps=100)
"""A DP step whose noise is off; the site still claims the ε of the σ it planned."""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: torch's intra-op threads only fight the busy machine's other work for its cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_p_value_is_the_papers_bound_computed_by_hand() -> None:
    """m=10, r=v=2, ε=1, δ=0.01: q = e/(1+e), β = q², α = max(P[B=1], P[B≤1]/2) = 2q(1−q); p = β + 2mδα."""
    q = math.e / (1 + math.e)
    assert p_value(10, 2, 2, 1.0, 0.01) == pytest.approx(q * q + 2 * 10 * 0.01 * 2 * q * (1 - q), rel=1e-12)
    # δ = 0 and every guess right: p = q^r, so the bound is the logit of 0.05^(1/r)
    q20 = SIGNIFICANCE ** (1 / 20)
    assert epsilon_lower_bound(1000, 20, 20, 0.0) == pytest.approx(math.log(q20 / (1 - q20)), abs=2e-4)


def test_all_correct_guesses_bound_more_the_more_there_are() -> None:
    bounds = [epsilon_lower_bound(1000, r, r, 1e-5) for r in (10, 20, 50, 100, 200, 500)]
    assert all(a < b for a, b in itertools.pairwise(bounds)), bounds
    assert 1.0 < bounds[0] and bounds[-1] < 6.0  # one run of m canaries can show only so much
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) < epsilon_lower_bound(1000, 100, 100, 0.0)  # δ costs


def test_the_bound_rises_with_the_correct_guesses_and_half_right_is_nothing() -> None:
    bounds = [epsilon_lower_bound(200, 100, v, 1e-5) for v in range(50, 101)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0 and bounds[-1] > 3.0


def test_random_scores_audit_to_about_zero() -> None:
    m = 1000
    result = audit([secrets.randbits(32) for _ in range(m)], [secrets.randbits(1) == 1 for _ in range(m)], 1e-5)
    assert result.epsilon < 0.5 and 0.4 < result.auc < 0.6 and result.canaries == m


def test_guesses_take_the_top_and_bottom_k_and_the_grid_is_paid_for() -> None:
    scores, included = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [True, False, True, False, False, True]
    assert guess_counts(scores, included, 1) == (2, 1)  # top: in (right); bottom: out (wrong)
    assert guess_counts(scores, included, 3) == (6, 4)  # in: 5, 3 right; out: 2, 1 right
    assert membership_auc([3.0, 2.0, 1.0], [True, True, False]) == 1.0
    assert membership_auc([1.0, 1.0], [True, False]) == 0.5
    m = 200  # perfect scores: the best k is m/2, tested at 5 % / 4 (Bonferroni over the grid of 4)
    result = audit([float(i) for i in range(m)], [i >= m // 2 for i in range(m)], 1e-5)
    assert (result.guesses, result.correct) == (m, m)
    assert result.epsilon == pytest.approx(epsilon_lower_bound(m, m, m, 1e-5, SIGNIFICANCE / 4))
    assert result.epsilon < epsilon_lower_bound(m, m, m, 1e-5)
    with pytest.raises(AuditError, match="2k"):
        guess_counts(scores, included, 4)


def test_the_result_file_round_trips_and_a_missing_one_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="--audit-canaries"):
        read_audit_result(tmp_path)
    result = audit([float(i) for i in range(20)], [i >= 10 for i in range(20)], 1e-5, epsilon_accounted=8.0,
                   rounds=3)
    write_audit_result(tmp_path, result)
    assert stat.S_IMODE((tmp_path / AUDIT_RESULT_FILE).stat().st_mode) == 0o600
    assert read_audit_result(tmp_path) == result
    assert result.line().startswith("ε accounted 8.00 — ε audited ≥ ")


def test_an_included_canary_is_one_more_unit_of_gradient_c_on_its_coordinate() -> None:
    """Noise off, empty batch: only the canary moves the model, by C / (expected batch) on its coordinate."""
    model = torch.nn.Linear(8, 4, bias=False)
    torch.nn.init.zeros_(model.weight)
    clip, batch = 0.5, 4
    step = PerUnitDPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                        max_grad_norm=clip, expected_batch_size=batch, generator=torch.Generator())
    step.step([], lambda chunk: torch.zeros(()), [(model.weight, 13)])
    expected = torch.zeros(32)
    expected[13] = -clip / batch
    assert torch.equal(model.weight.detach().flatten(), expected)


def test_canaries_are_distinct_trainable_coordinates_half_included_and_join_at_rate_q() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 16))
    model[0].requires_grad_(False)
    canaries = draw_canaries(model, 400)
    assert {c.parameter for c in canaries} <= {"1.weight", "1.bias"}
    assert len({(c.parameter, c.index) for c in canaries}) == 400
    assert 150 < sum(c.included for c in canaries) < 250  # Binomial(400, 1/2): ±5 standard deviations
    included = included_coordinates(model, canaries)
    generator = fresh_generator()
    joined = sum(len(joining(included, 0.1, generator)) for _ in range(100))
    expected = 0.1 * 100 * len(included)
    assert abs(joined - expected) < 5 * math.sqrt(expected)
    with pytest.raises(AuditError, match="between 2 and"):
        draw_canaries(model, 10_000)


def test_a_runs_canaries_stay_owner_only_and_fixed_and_audit_from_the_second_adapter(tmp_path: Path) -> None:
    model = torch.nn.Linear(16, 16)
    canaries = RunCanaries.open(tmp_path, 7, model, 20)
    path = tmp_path / CANARY_DIR / "run-7.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    canaries.observe(1, model)
    assert canaries.audit(1e-5, 1.0) is None  # one adapter: nothing moved yet
    with torch.no_grad():
        model.weight.add_(1.0)
    reopened = RunCanaries.open(tmp_path, 7, model, 50)  # a later round: the same canaries, whatever the count
    assert reopened.canaries == canaries.canaries and reopened.observed == canaries.observed
    reopened.observe(2, model)
    result = reopened.audit(1e-5, 1.0)
    assert result is not None and result.canaries == 20 and result.rounds == 1 and result.epsilon_accounted == 1.0
    path.write_text("{")
    with pytest.raises(AuditError, match="unreadable"):
        RunCanaries.open(tmp_path, 7, model, 20)


@pytest.mark.parametrize("rows_per_unit", [1, 3])  # per record; per person (a canary is one person's clipped sum)
def test_with_dp_on_the_audit_stays_below_the_claimed_epsilon(one_thread: None, rows_per_unit: int) -> None:
    sigma = noise_multiplier_for(ACCOUNTANT, 1.0, DELTA, BROKEN.sample_rate, BROKEN.steps)
    setting = Setting(sigma, units=BROKEN.units, sample_rate=BROKEN.sample_rate, steps=BROKEN.steps,
                      rows_per_unit=rows_per_unit)
    claimed = setting.claimed_epsilon()
    assert claimed == pytest.approx(1.0, abs=0.01)
    result = audited_training(setting, claimed_epsilon=claimed).result
    assert result.epsilon <= claimed, result.line()


@pytest.mark.parametrize("rows_per_unit", [1, 3])
def test_the_audit_fails_a_dp_step_whose_noise_is_off(one_thread: None, rows_per_unit: int) -> None:
    """The step claims ε = 1 (the σ it planned) but adds no noise: the audit shows ε above what it claims."""
    claimed = BROKEN.claimed_epsilon(noise_multiplier_for(ACCOUNTANT, 1.0, DELTA, BROKEN.sample_rate, BROKEN.steps))
    result = audited_training(dataclasses.replace(BROKEN, rows_per_unit=rows_per_unit),
                              claimed_epsilon=claimed).result
    assert result.epsilon > claimed + 1.0, result.line()
    # The canaries' AUC with the noise off: 0.96-0.98 per record and 0.885-0.96 per person over 9 runs each; with
    # the noise on 0.50-0.57. 0.9 failed one clean-clone run per person (0.885); 0.8 still sits far from both.
    assert result.auc > 0.8, result.line()


def test_the_sites_policy_turns_the_audit_on_and_refuses_a_single_canary() -> None:
    from client.policy import SitePolicy
    from common.config import ConfigError
    from fedtune.cli import build_parser, site_policy_options

    args = build_parser()[0].parse_args(["client", "start", "--kit", "k", "--keys", "k", "--data", "d", "--state",
                                         "s", "--superlink", "h:1", "--labels", "no,yes", "--audit-canaries", "200"])
    policy = SitePolicy.from_mapping({opt.key: getattr(args, opt.dest) for opt in site_policy_options()}, "test")
    assert policy.audit_canaries == 200 and SitePolicy().audit_canaries == 0  # off unless the site asks
    assert SitePolicy.from_mapping(policy.to_mapping(), "node config") == policy
    with pytest.raises(ConfigError, match="audit-canaries must be 0"):
        SitePolicy(audit_canaries=1)
