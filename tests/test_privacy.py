"""DP-SGD and the per-site ε ledger: exact against a manual reference, composed, persisted, enforced."""

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.per_unit_grads import PerUnitDPSGD
from client.plan import TrainingPlan
from client.privacy import BudgetExhausted, LedgerError, PrivacyLedger, fresh_generator
from client.train import Chunk, UnitBatches
from common.config import PrivacySettings, TrainSettings

BUDGET = PrivacySettings(epsilon=2.0, delta=1e-5, max_grad_norm=0.5)


def test_accountants_match_pinned_reference_values(tmp_path: Path):
    # Reference (DESIGN.md): N=1000, batch 32 (q=0.032), σ=1, 10 rounds of 32 steps, δ=1e-5.
    for accountant, expected in [("prv", 3.721), ("rdp", 4.188)]:
        ledger = PrivacyLedger(tmp_path / f"{accountant}.json", PrivacySettings(epsilon=10, accountant=accountant))
        ledger.history = [(1.0, 0.032, 320)]
        assert ledger.spent() == pytest.approx(expected, abs=2e-3)


def test_dp_step_equals_manual_per_sample_clipping_reference(tmp_path: Path):
    torch.manual_seed(0)
    features, labels = torch.randn(8, 5) * 3, torch.randint(0, 3, (8,))
    model = torch.nn.Linear(5, 3)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    ledger = PrivacyLedger(tmp_path / "ledger.json", BUDGET)
    ledger.charge_round(run_id=1, server_round=1, sample_rate=1.0, steps=1, planned_rounds=1)
    plan = TrainingPlan(batch_size=8, units=8, steps=1, learning_rate=1.0, max_grad_norm=BUDGET.max_grad_norm)
    dp_sgd = PerUnitDPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0),
                          noise_multiplier=ledger.plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                          expected_batch_size=plan.batch_size,
                          generator=torch.Generator().manual_seed(123))  # a test may replay the noise; no coordinator

    # Execute: one DP-SGD step on the full batch.
    dp_sgd.step([_rows(features, labels)], lambda chunk: F.cross_entropy(model(chunk.input_ids), chunk.labels))

    # Reference: per-sample grads, each clipped to C, summed, Gaussian noise σ·C, divided by the batch.
    sigma, clip = ledger.plan.noise_multiplier, BUDGET.max_grad_norm
    per_sample = []
    for x, y in zip(features, labels, strict=True):
        w = reference["weight"].clone().requires_grad_(True)
        b = reference["bias"].clone().requires_grad_(True)
        F.cross_entropy((x @ w.T + b)[None], y[None]).backward()
        per_sample.append((w.grad, b.grad))
    generator = torch.Generator().manual_seed(123)
    for index, name in enumerate(["weight", "bias"]):
        clipped = []
        for grads in per_sample:
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            clipped.append(grads[index] * min(1.0, clip / (norm.item() + 1e-6)))
        noise = torch.normal(0.0, sigma * clip, size=reference[name].shape, generator=generator)
        expected = reference[name] - (torch.stack(clipped).sum(0) + noise) / 8
        got = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _rows(features: torch.Tensor, labels: torch.Tensor) -> Chunk:
    """A chunk of rows that are each their own unit."""
    n = len(labels)
    return Chunk(features, torch.ones(n, 1), labels, torch.arange(n), n)


def test_sigma_is_planned_once_from_the_whole_budget(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.json", BUDGET)
    first = ledger.charge_round(run_id=1, server_round=1, sample_rate=0.25, steps=8, planned_rounds=3)
    plan = ledger.plan
    # Later rounds keep σ whatever they ask for; spending the whole plan lands at (not over) the budget.
    ledger.charge_round(run_id=1, server_round=2, sample_rate=0.25, steps=8, planned_rounds=1)
    last = PrivacyLedger(tmp_path / "l.json", BUDGET).charge_round(run_id=1, server_round=3, sample_rate=0.25,
                                                                    steps=8, planned_rounds=1)
    assert PrivacyLedger(tmp_path / "l.json", BUDGET).plan == plan and plan.rounds == 3
    assert 0 < first.epsilon < last.epsilon and 0.9 * BUDGET.epsilon < last.epsilon <= BUDGET.epsilon + 1e-6


def _spend_round(ledger: PrivacyLedger, server_round: int) -> None:
    ledger.charge_round(run_id=7, server_round=server_round, sample_rate=0.25, steps=8, planned_rounds=2)


def test_ledger_composes_across_rounds_and_a_restart_then_refuses(tmp_path: Path):
    path = tmp_path / "site" / "ledger.json"
    ledger = PrivacyLedger(path, BUDGET)
    _spend_round(ledger, 1)
    after_one = ledger.spent()
    assert 0 < after_one < BUDGET.epsilon

    restarted = PrivacyLedger(path, BUDGET)  # a new process reads the site's disk
    assert restarted.spent() == pytest.approx(after_one)
    assert restarted.plan == ledger.plan
    _spend_round(restarted, 2)
    assert after_one < restarted.spent() <= BUDGET.epsilon + 1e-6

    third = PrivacyLedger(path, BUDGET)
    with pytest.raises(BudgetExhausted) as info:
        _spend_round(third, 3)
    message = str(info.value)
    assert f"budget ε={BUDGET.epsilon:g}" in message and f"from {third.spent():.3f}" in message
    assert PrivacyLedger(path, BUDGET).spent() == pytest.approx(third.spent())  # the refusal spent nothing
    saved = json.loads(path.read_text())
    assert [entry["round"] for entry in saved["rounds"]] == [1, 2]


def test_ledger_refuses_a_changed_budget_and_a_corrupt_file(tmp_path: Path):
    path = tmp_path / "ledger.json"
    _spend_round(PrivacyLedger(path, BUDGET), 1)
    with pytest.raises(LedgerError, match="A budget cannot change silently"):
        PrivacyLedger(path, PrivacySettings(epsilon=50.0, delta=1e-5))
    path.write_text("{ not json")
    with pytest.raises(LedgerError, match="restore it from backup"):
        PrivacyLedger(path, BUDGET)


def test_noise_and_poisson_sampling_cannot_be_replayed_from_the_global_seed(tmp_path: Path):
    # The coordinator knows everything but the site's OS entropy: it seeds torch's global RNG as it likes.
    features, labels = torch.randn(64, 5), torch.randint(0, 3, (64,))
    ledger = PrivacyLedger(tmp_path / "l.json", BUDGET)
    ledger.plan_noise(sample_rate=0.125, steps_per_round=8, rounds=1)
    data = _encoded(64)
    plan = TrainingPlan(batch_size=8, units=64, steps=8, learning_rate=1.0, max_grad_norm=0.5)

    def one_round() -> tuple[torch.Tensor, list[list[int]]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        dp_sgd = PerUnitDPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0),
                              noise_multiplier=ledger.plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                              expected_batch_size=plan.batch_size, generator=fresh_generator())
        torch.manual_seed(0)
        batches = [sorted(int(u) for c in chunks for u in c.labels) for chunks in
                   UnitBatches(data, plan, TrainSettings(), poisson=True)]
        dp_sgd.step([_rows(features, labels)], lambda chunk: F.cross_entropy(model(chunk.input_ids), chunk.labels))
        return model.weight.detach().clone(), batches

    (weight_a, batches_a), (weight_b, batches_b) = one_round(), one_round()
    assert not torch.equal(weight_a, weight_b)  # different Gaussian noise
    assert batches_a != batches_b  # different Poisson batches


def _encoded(n: int):
    """n one-token rows whose label is their own index (so a batch shows which rows it drew)."""
    from common.encoding import EncodedData

    ids = torch.ones(n, 1, dtype=torch.long)
    return EncodedData(TensorDataset(ids, torch.ones_like(ids), torch.arange(n)), np.arange(n), np.arange(n))


@pytest.mark.parametrize(("units", "batch", "steps"), [(1000, 32, 400), (10, 10, 50), (33, 8, 300)])
def test_poisson_sampling_takes_exactly_the_charged_steps_at_rate_q(units: int, batch: int, steps: int):
    """The ledger charges (q = B/n, steps); the sampler must take exactly that many steps, each unit joining
    each batch independently with probability q (so batch sizes vary, and may be 0)."""
    plan = TrainingPlan(batch_size=batch, units=units, steps=steps, learning_rate=1.0, max_grad_norm=1.0)
    sizes = [sum(c.units for c in chunks) for chunks in UnitBatches(_encoded(units), plan, TrainSettings(),
                                                                      poisson=True)]
    assert len(sizes) == steps
    mean, spread = np.mean(sizes), np.sqrt(batch * (1 - plan.sample_rate) / steps)
    assert abs(mean - batch) < 5 * spread + 1e-9
    assert batch == units or len(set(sizes)) > 1


@pytest.mark.parametrize("epsilon", [Fraction(1), Fraction(4, 25), Fraction(0.3)])
def test_the_size_noise_is_the_discrete_laplace_distribution(epsilon: Fraction):
    """P(Y = y) = (1 − e^−ε)/(1 + e^−ε)·e^−ε|y|: n + Y is ε-DP for a count (one unit moves it by 1)."""
    from client.privacy import discrete_laplace

    draws = np.array([discrete_laplace(epsilon) for _ in range(4_000)])
    r = math.exp(-float(epsilon))
    p0, variance = (1 - r) / (1 + r), 2 * r / (1 - r) ** 2
    assert abs(np.mean(draws == 0) - p0) < 5 * math.sqrt(p0 * (1 - p0) / len(draws))
    assert abs(draws.mean()) < 5 * math.sqrt(variance / len(draws))
    assert abs(draws.var() / variance - 1) < 0.15
    assert abs(np.mean(draws > 0) - np.mean(draws < 0)) < 0.05


def test_sigma_is_planned_for_the_budget_left_after_the_size_estimate(tmp_path: Path):
    from client.privacy import noise_multiplier_for

    ledger = PrivacyLedger(tmp_path / "l.json", BUDGET)
    ledger.estimated_units(500, run_id=1, server_round=1)
    last = None
    for server_round in (1, 2):
        last = ledger.charge_round(run_id=1, server_round=server_round, sample_rate=0.25, steps=8, planned_rounds=2)
    assert ledger.plan.noise_multiplier == noise_multiplier_for(BUDGET.accountant, BUDGET.epsilon * 49 / 50,
                                                                BUDGET.delta, 0.25, 16)
    assert 0.9 * BUDGET.epsilon < last.epsilon <= BUDGET.epsilon + 1e-6  # ε_n + DP-SGD's ε land at the budget
