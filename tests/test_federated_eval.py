"""Federated evaluation's arithmetic (common.federated_eval, common.discrete_noise): the exact discrete Gaussian,
the noise the run's ε needs, the sensitivity of the count layout, and the coordinator's decoding of noisy sums."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from common.config import RunSettings
from common.discrete_noise import discrete_gaussian
from common.evaluation import EvalCounts, metrics
from common.federated_eval import (
    SIGMA_SQ_STEP,
    EvalLayout,
    causal_lm_counts,
    classification_counts,
    decode,
    plan_evaluation,
    release,
    thin_evaluation,
    zcdp_epsilon,
)
from common.secure_update import MAX_COUNT
from fedtune.cli import default_run_config


def settings(**overrides) -> RunSettings:
    return RunSettings.from_flat(default_run_config() | {"data.labels": "a,b,c", "federation.secure-aggregation": False}
                                 | overrides)


def test_the_discrete_gaussian_is_centred_with_variance_sigma_squared_and_fresh_each_call() -> None:
    sigma_sq = Fraction(25)
    draws = np.array([discrete_gaussian(sigma_sq) for _ in range(4_000)])
    assert draws.dtype.kind == "i"
    # mean 0 ± 5 standard errors; the variance of N_Z(0, 25) is 25 − 1e-20 or so (CKS 2020, Corollary 9)
    assert abs(draws.mean()) < 5 * 5 / math.sqrt(len(draws))
    assert 25 * 0.9 < draws.var() < 25 * 1.1
    assert [discrete_gaussian(sigma_sq) for _ in range(30)] != [discrete_gaussian(sigma_sq) for _ in range(30)]
    with pytest.raises(ValueError, match="σ²"):
        discrete_gaussian(Fraction(0))


@pytest.mark.parametrize(("epsilon", "rounds", "every", "unit"), [
    (1.0, 4, 1, "record"), (0.5, 20, 1, "record"), (3.0, 10, 3, "record"), (1.0, 4, 1, "column:patient")])
def test_sigma_is_the_least_noise_that_meets_the_runs_eval_epsilon(epsilon: float, rounds: int, every: int,
                                                                   unit: str) -> None:
    plan = plan_evaluation(settings(**{"federation.eval-epsilon": epsilon, "federation.rounds": rounds,
                                       "federation.eval-every": every, "privacy.unit": unit}))
    assert plan is not None and plan.evaluations == -(-rounds // every)
    spent = zcdp_epsilon(plan.rho * plan.evaluations, plan.delta)
    assert 0.995 * epsilon < spent <= epsilon
    assert plan.layout.sensitivity_sq == (64 * 3 if unit != "record" else 3)  # m = 8 rows of a person
    assert plan.offset >= 14 * plan.sigma
    assert [r for r in range(1, rounds + 1) if plan.evaluates(r)] == list(range(1, rounds + 1, every))
    assert plan_evaluation(settings(**{"federation.eval-every": 0})) is None


@pytest.mark.parametrize(("epsilon", "honest"), [(1.0, 3), (8.0, 5), (100.0, 5), (1.0, 1)])
def test_sites_sharing_the_evaluation_noise_each_add_about_one_hth_and_are_charged_no_more(epsilon: float,
                                                                                           honest: int) -> None:
    """Distributed DP: each of h honest sites adds σ_s² ≈ σ²/h. Their summed noise's ρ (the distributed discrete
    Gaussian's bound, τ included) is at most the unshared release's, so the evaluation budget holds; a site's own
    release alone has about h times the ρ. Where σ_s² is small τ is not negligible, and σ_s² grows to cover it."""
    plan = plan_evaluation(settings(**{"federation.eval-epsilon": epsilon, "federation.rounds": 10}))
    assert plan is not None
    share = plan.shared(honest)
    assert share.rho <= plan.rho and share.sigma_sq >= plan.sigma_sq / honest
    assert share.offset == plan.offset and share.honest_sites == honest
    if honest == 1:
        assert share is plan
    elif epsilon < 10:  # τ ≈ 0: the share is σ²/h on the grid, and alone it is h times as revealing
        assert share.sigma_sq - plan.sigma_sq / honest < SIGMA_SQ_STEP
        assert share.own_rho == pytest.approx(honest * plan.rho, rel=1e-3)
    else:
        assert share.sigma_sq > plan.sigma_sq / honest + SIGMA_SQ_STEP  # grown past σ²/h to pay for τ
    with pytest.raises(ValueError, match="honest_sites"):
        plan.shared(0)


def test_the_honest_sites_shares_sum_to_the_whole_noise() -> None:
    """Three sites' shares of an evaluation's noise add up to the unshared variance (±10 %: a 4,000-draw sample's
    variance, ±2.2 % per standard deviation, is off by more with probability below 1e-5)."""
    plan = plan_evaluation(settings(**{"federation.eval-epsilon": 2.0, "federation.rounds": 4}))
    assert plan is not None
    share = plan.shared(3)
    summed = np.array([sum(discrete_gaussian(share.sigma_sq) for _ in range(3)) for _ in range(4_000)])
    assert 0.9 * float(plan.sigma_sq) < summed.var() < 1.1 * float(plan.sigma_sq)
    decoded = decode([share.offset * 3] * plan.layout.slots, 3, share, model_round=1)
    assert decoded.noise_sigma == share.sigma  # the interval is drawn over the sites' shares, not the whole


def test_one_record_moves_the_classification_counts_by_at_most_root_three() -> None:
    labels = 4
    base = np.arange(16, dtype=np.int64).reshape(labels, labels)
    assert len(classification_counts(base)) == EvalLayout("classification", labels, 1).slots
    for true, predicted in itertools.product(range(labels), repeat=2):
        added = base.copy()
        added[true, predicted] += 1
        moved = np.subtract(classification_counts(added), classification_counts(base))
        assert set(np.abs(moved)) <= {0, 1}
        assert float(np.sum(moved ** 2)) == EvalLayout("classification", labels, 1).sensitivity_sq == 3


def test_one_example_moves_each_causal_lm_count_by_at_most_one() -> None:
    one = causal_lm_counts([50.0], [1000], [True], [1.0], max_tokens=64)  # clipped: never more than 1 per slot
    assert one == [1, 1, 1, 1, 1]
    assert causal_lm_counts([], [], [], [], max_tokens=64) == [0] * 5
    draws = [causal_lm_counts([2.0] * 100, [16] * 100, [False] * 100, [0.5] * 100, max_tokens=64)
             for _ in range(40)]
    loss = np.mean([d[1] for d in draws]) / 100 * 8.0  # stochastic rounding is unbiased
    assert abs(loss - 2.0) < 0.25


def test_a_record_whose_scores_overflow_counts_as_the_worst_record_and_cannot_fail_the_evaluation() -> None:
    """A hostile adapter can drive one record's logits to inf: its loss and ROUGE-L come back NaN or inf. The
    counts must come out as for a record scored worst (loss at the clip, ROUGE-L 0), never raise: a failure would
    change the kind of what the site sends exactly when that record is in its split."""
    nan, inf = float("nan"), float("inf")
    for loss, rouge in ((nan, nan), (inf, inf), (nan, 0.0)):
        assert causal_lm_counts([loss], [64], [False], [rouge], max_tokens=64) == \
            causal_lm_counts([1e9], [64], [False], [0.0], max_tokens=64)
    mixed = causal_lm_counts([nan, 1.0, inf], [4, 4, 4], [False, True, False], [nan, 1.0, inf], max_tokens=8)
    assert mixed[0] == 3 and mixed[1] >= 2 and mixed[3] == 1 and mixed[4] == 1  # each record moves a slot by <= 1


def test_a_release_is_counts_plus_noise_plus_offset_in_range() -> None:
    plan = plan_evaluation(settings())
    assert plan is not None
    counts = classification_counts(np.array([[5, 1, 0], [0, 7, 2], [1, 0, 9]]))
    released = [release(counts, plan) for _ in range(200)]
    assert all(0 <= value <= MAX_COUNT and isinstance(value, int) for row in released for value in row)
    noise = np.array(released) - counts - plan.offset
    assert abs(noise.mean()) < 5 * plan.sigma / math.sqrt(noise.size)
    assert 0.8 < noise.std() / plan.sigma < 1.2
    with pytest.raises(ValueError, match="slots"):
        release(counts[:-1], plan)


def test_the_decoded_scores_cover_the_true_scores_at_the_known_noise() -> None:
    """Sites' releases with Gaussian noise of the plan's σ (seeded here: what is tested is the decoding), summed:
    the 95 % intervals hold the true accuracy and macro-F1 in about 95 % of trials."""
    plan = plan_evaluation(settings(**{"federation.rounds": 4}))
    assert plan is not None
    sites = [np.array([[60, 10, 5], [8, 40, 12], [3, 6, 80]]) * (i + 1) for i in range(3)]
    truth = metrics(EvalCounts(0.0, sum(sites)))
    rng = np.random.default_rng(7)
    covered = {"accuracy": 0, "macro_f1": 0}
    gaps = []
    trials = 200
    for _ in range(trials):
        noisy = sum(np.array(classification_counts(s)) + plan.offset
                    + np.rint(rng.normal(0, plan.sigma, plan.layout.slots)).astype(int) for s in sites)
        scores = decode(noisy.tolist(), 3, plan, model_round=2)
        assert scores.model_round == 2 and scores.sites == 3
        assert abs(scores.examples - truth["examples"]) < 6 * 2 * plan.sigma
        for name in covered:
            low, high = scores.intervals[name]
            covered[name] += low <= truth[name] <= high
        gaps.append(abs(scores.scores["macro_f1"] - truth["macro_f1"]))
    assert all(0.88 * trials <= hits for hits in covered.values()), covered
    assert np.mean(gaps) < 0.05


def test_decoding_sums_of_pure_noise_gives_no_score_rather_than_a_made_up_one() -> None:
    plan = plan_evaluation(settings())
    assert plan is not None
    empty = decode([3 * plan.offset - 100] * plan.layout.slots, 3, plan, model_round=0)
    assert empty.examples == 0.0 and empty.scores == {"accuracy": None, "macro_f1": None}
    with pytest.raises(ValueError, match="slots"):
        decode([0] * 3, 3, plan, model_round=0)


def test_macro_f1_is_withheld_when_the_per_label_counts_drown_in_the_noise() -> None:
    """77 labels, 5 sites of 400 evaluation examples, ε = 1 over 20 evaluations: a label's counts (about 26 in all)
    are far below the noise (σ ≈ 38 per site), so no macro-F1 is made up; accuracy (two large counts) still is."""
    labels = ",".join(f"l{i}" for i in range(77))
    plan = plan_evaluation(settings(**{"data.labels": labels, "federation.rounds": 20}))
    assert plan is not None
    counts = np.array(classification_counts(np.diag(np.full(77, 26))))  # 2,002 examples, all right
    scores = decode((counts + 5 * plan.offset).tolist(), 5, plan, model_round=3)
    assert scores.scores["macro_f1"] is None and "macro_f1" not in scores.intervals
    assert scores.scores["accuracy"] == 1.0


def test_a_run_that_evaluates_every_one_of_120_rounds_is_warned_with_the_noise_of_fewer() -> None:
    every_round = plan_evaluation(settings(**{"federation.rounds": 120, "federation.eval-every": 1}))
    warning = thin_evaluation(every_round, 120)
    assert warning is not None and "120 times" in warning and "--eval-every 12 (10 evaluations)" in warning
    fewer = plan_evaluation(settings(**{"federation.rounds": 120, "federation.eval-every": 12}))
    assert f"σ={every_round.sigma:.0f}" in warning and f"σ≈{fewer.sigma:.0f}" in warning
    assert thin_evaluation(fewer, 120) is None and thin_evaluation(None, 120) is None
