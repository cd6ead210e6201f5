"""--select-round best and --early-stop: choosing among the federated evaluations (server/selection.py)."""

from __future__ import annotations

import pytest

from common.config import ConfigError, FederationSettings
from common.run_files import FederatedScores, MetricsLine
from server.selection import best_round, stalled


def line(server_round: int, score: float | None, metric: str = "accuracy") -> MetricsLine:
    """Round ``server_round``'s metrics line: the sites scored the model of the round before."""
    evaluation = FederatedScores(model_round=server_round - 1, sites=3, examples=100.0, scores={metric: score},
                                 intervals={metric: [score - 0.05, score + 0.05]} if score is not None else {})
    return MetricsLine(round=server_round, server={}, federated_evaluation=evaluation)


def test_the_best_scored_model_is_chosen_with_its_interval_and_the_earliest_of_equals() -> None:
    lines = [MetricsLine(round=0, server={}), line(1, 0.40), line(2, 0.62), line(3, 0.55), line(4, 0.62)]
    chosen = best_round(lines, "classification")
    assert chosen is not None and (chosen.round, chosen.score, chosen.evaluations) == (1, 0.62, 4)
    assert chosen.interval == (pytest.approx(0.57), pytest.approx(0.67))
    assert chosen.passport_entry()["rule"] == "best federated accuracy"
    assert "round 1's model" in chosen.describe()


def test_a_language_model_is_chosen_on_its_lowest_federated_loss() -> None:
    lines = [line(1, 2.9, "loss"), line(2, 2.1, "loss"), line(3, 2.4, "loss")]
    chosen = best_round(lines, "causal-lm")
    assert chosen is not None and (chosen.round, chosen.metric) == (1, "loss")


def test_nothing_is_chosen_without_a_scored_evaluation() -> None:
    assert best_round([MetricsLine(round=0, server={}), line(1, None)], "classification") is None
    assert best_round([MetricsLine(round=1, server={"accuracy": 0.9})], "classification") is None


@pytest.mark.parametrize(("scores", "patience", "stops"), [
    ([0.4, 0.5, 0.45, 0.48], 2, True),   # two evaluations in a row below 0.5
    ([0.4, 0.5, 0.45, 0.51], 2, False),  # the last one beat it
    ([0.4, 0.5, 0.5, 0.5], 2, True),     # equal is no improvement
    ([0.4, 0.5], 2, False),              # not enough evaluations yet
    ([0.4, 0.3, 0.2], 0, False),         # 0 = never
])
def test_early_stop_waits_for_k_evaluations_without_improvement(scores: list[float], patience: int,
                                                                stops: bool) -> None:
    lines = [line(i + 1, score) for i, score in enumerate(scores)]
    assert stalled(lines, "classification", patience) is stops


def test_early_stop_on_loss_counts_a_lower_loss_as_improvement() -> None:
    lines = [line(1, 3.0, "loss"), line(2, 2.5, "loss"), line(3, 2.4, "loss")]
    assert not stalled(lines, "causal-lm", 1)
    assert stalled([*lines, line(4, 2.6, "loss")], "causal-lm", 1)


@pytest.mark.parametrize(("settings", "says"), [
    ({"select_round": "first"}, "select-round must be one of last, best"),
    ({"early_stop": -1}, "early-stop must be >= 0"),
    ({"early_stop": 2}, "early-stop needs federation.select-round = best"),
    ({"early_stop": 2, "select_round": "best", "eval_every": 0}, "early-stop needs"),
    ({"checkpoint_every": 0}, "checkpoint-every must be >= 1"),
    ({"checkpoint_every": 5, "select_round": "best"}, "best chooses among every round's checkpoint"),
])
def test_bad_selection_settings_are_refused_saying_why(settings: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        FederationSettings(**settings)
