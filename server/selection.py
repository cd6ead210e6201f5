"""Which checkpoint a run publishes, from the federated evaluation alone (``federation.select-round``).

The sites score the model they receive, so round r's metrics line scores the checkpoint of an earlier
round (``FederatedScores.model_round``). Choosing among those scores is post-processing of the sites'
DP releases: it costs no ε. The published adapter was chosen after every round, so its passport
carries the ε the sites spent in the whole run, not only up to the chosen round.

Early stop (``federation.early-stop`` K): the run ends once K federated evaluations in a row did not
beat the best one; the sites' ledgers keep the budget of the rounds never played.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.run_files import MetricsLine

SELECTION_METRIC: dict[str, tuple[str, bool]] = {"classification": ("accuracy", True), "causal-lm": ("loss", False)}
"""The federated score each task selects on, and whether higher is better (accuracy has the least noise of the
classification scores: two counts; macro-F1 may be withheld)."""


@dataclass(frozen=True)
class Selection:
    """The checkpoint a run publishes as its final adapter, and why."""

    round: int
    """The chosen checkpoint's round."""
    metric: str
    score: float
    interval: tuple[float, float] | None
    evaluations: int
    """How many federated evaluations it was chosen from."""

    def passport_entry(self) -> dict:
        return {"rule": f"best federated {self.metric}", "round": self.round, "score": round(self.score, 6),
                "interval": [round(x, 6) for x in self.interval] if self.interval else None,
                "evaluations": self.evaluations}

    def describe(self) -> str:
        interval = f" [{self.interval[0]:.3f}, {self.interval[1]:.3f}]" if self.interval else ""
        return (f"round {self.round}'s model, best federated {self.metric} {self.score:.3f}{interval} of "
                f"{self.evaluations} evaluation(s)")


def scored(lines: list[MetricsLine], task: str) -> list[tuple[int, float, tuple[float, float] | None]]:
    """(model round, score, 95 % interval) of every federated evaluation with a score, in the order played."""
    metric, _ = SELECTION_METRIC[task]
    found = []
    for line in lines:
        evaluation = line.federated_evaluation
        score = evaluation.scores.get(metric) if evaluation else None
        if evaluation is None or score is None:
            continue
        interval = evaluation.intervals.get(metric)
        found.append((evaluation.model_round, float(score),
                      (float(interval[0]), float(interval[1])) if interval else None))
    return found


def best_round(lines: list[MetricsLine], task: str) -> Selection | None:
    """The best-scored model (the earliest of equals: fewer rounds); None when no evaluation has a score."""
    metric, higher_better = SELECTION_METRIC[task]
    evaluations = scored(lines, task)
    if not evaluations:
        return None
    sign = 1.0 if higher_better else -1.0
    model_round, score, interval = max(evaluations, key=lambda e: (sign * e[1], -e[0]))
    return Selection(model_round, metric, score, interval, len(evaluations))


def stalled(lines: list[MetricsLine], task: str, patience: int) -> bool:
    """Whether the last ``patience`` federated evaluations all failed to beat the best before them."""
    if patience < 1:
        return False
    _, higher_better = SELECTION_METRIC[task]
    values = [score if higher_better else -score for _, score, _ in scored(lines, task)]
    if len(values) <= patience:
        return False
    return max(values[-patience:]) <= max(values[:-patience])
