"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023). Pure math and the site's result file: light (no torch, numpy or scipy).

m canaries are each included in training independently with probability 1/2. After the run the auditor ranks
them by a score, guesses "in" for the k highest and "out" for the k lowest and abstains on the rest: r = 2k
guesses, v of them correct. If the training algorithm is (ε, δ)-DP with respect to each canary, the paper's
Theorem 3 bounds P[≥ v correct] by β + 2mδ·α (β the binomial tail of r trials at e^ε/(1+e^ε), α from its
pmf, their Algorithm 2); the largest ε that this p-value rejects at level 5 % is the audited lower bound:
if the algorithm were only that private, a result this good would happen less than 5 % of the time.

k is chosen after the scores are seen, from a small grid fixed in advance; each candidate is tested at
5 %/(grid size) (Bonferroni), so the reported bound holds at 95 % for the chosen k too.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_json
from common.typed import BadInput

AUDIT_RESULT_FILE = "audit-result.json"
"""A site's latest audit, in its state dir: what it may release (synthetic canaries: nothing about records)."""
SIGNIFICANCE = 0.05
AUDIT_FIELDS = ("audited_epsilon", "audit_canaries", "audit_guesses", "audit_correct")
"""What a site releases of its audit, as its PrivacyReport and the passport name them (see AuditResult.report)."""
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)
"""k (guesses "in", and as many "out") as a share of the canaries: the grid the bound is chosen from."""


class AuditError(BadInput):
    """An audit's inputs or its result file are not what an audit needs."""


def _softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _binomial_pmf(trials: int, epsilon: float) -> list[float]:
    """P[Binomial(trials, e^ε/(1+e^ε)) = k] for k = 0..trials, in log space (exact up to rounding)."""
    log_q, log_not_q = -_softplus(-epsilon), -_softplus(epsilon)
    log_n = math.lgamma(trials + 1)
    return [math.exp(log_n - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_q + (trials - k) * log_not_q)
            for k in range(trials + 1)]


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability that an (ε, δ)-DP algorithm lets an auditor make ≥ ``correct`` right guesses out of
    ``guesses`` on ``canaries`` canaries, each included with probability 1/2 (Theorem 3, Algorithm 2 of the paper):
    β + 2mδ·α, with β = P[B ≥ v] and α = max_i P[v − i ≤ B < v] / i for B ~ Binomial(r, e^ε/(1+e^ε))."""
    if not 0 <= correct <= guesses <= canaries:
        raise AuditError(f"need 0 ≤ correct ≤ guesses ≤ canaries, got {correct}, {guesses}, {canaries}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise AuditError(f"need ε ≥ 0 and 0 ≤ δ ≤ 1, got ε={epsilon}, δ={delta}")
    pmf = _binomial_pmf(guesses, epsilon)
    tail = math.fsum(pmf[correct:])
    alpha, below = 0.0, 0.0  # below = P[v − i ≤ B < v]
    for i in range(1, correct + 1):
        below += pmf[correct - i]
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                        significance: float = SIGNIFICANCE) -> float:
    """The largest ε at which ``correct`` of ``guesses`` is rejected at level ``significance`` (0 when even ε = 0
    is not): binary search, as the paper's Algorithm 2, to 1e-4."""
    if not 0 < significance < 1:
        raise AuditError(f"significance must be in (0, 1), got {significance}")
    if p_value(canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0  # p(low) < significance ≤ p(high)
    while p_value(canaries, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
    while high - low > 1e-4:
        middle = (low + high) / 2
        if p_value(canaries, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def guess_counts(scores: Sequence[float], included: Sequence[bool], k: int) -> tuple[int, int]:
    """(guesses, correct) when the k highest scores are guessed "in" and the k lowest "out" (ties in index order,
    which the canaries' random directions make meaningless)."""
    if not 0 < 2 * k <= len(scores) == len(included):
        raise AuditError(f"need 0 < 2k ≤ m scores, one per canary: k={k}, {len(scores)} scores, "
                         f"{len(included)} canaries")
    ranked = sorted(range(len(scores)), key=lambda j: -scores[j])
    correct = sum(included[j] for j in ranked[:k]) + sum(not included[j] for j in ranked[-k:])
    return 2 * k, correct


def membership_auc(scores: Sequence[float], included: Sequence[bool]) -> float:
    """P[an included canary scores above an excluded one] (ties count half): 0.5 = no signal. NaN when either
    side is empty."""
    ins = [s for s, member in zip(scores, included, strict=True) if member]
    outs = [s for s, member in zip(scores, included, strict=True) if not member]
    if not ins or not outs:
        return math.nan
    ranked = sorted(outs)
    total = 0.0
    for score in ins:
        lower = _count_below(ranked, score, strict=True)
        total += lower + 0.5 * (_count_below(ranked, score, strict=False) - lower)
    return total / (len(ins) * len(outs))


def _count_below(ranked: list[float], score: float, *, strict: bool) -> int:
    return bisect.bisect_left(ranked, score) if strict else bisect.bisect_right(ranked, score)


@dataclass(frozen=True)
class AuditResult:
    """What a site may release of its audit: all of it is about synthetic canaries, none about records."""

    canaries: int
    guesses: int
    correct: int
    epsilon: float
    """The audited lower bound: the algorithm is NOT (ε', δ)-DP for any ε' below it, at ``confidence``."""
    delta: float
    confidence: float
    auc: float
    """Canary membership AUC (a sanity number, no guarantee)."""
    epsilon_accounted: float | None = None
    """What the site's accountant says it spent when the audit was computed."""
    rounds: int = 0
    """Rounds of training between the two global adapters the scores compare."""
    run_id: int | None = None

    def report(self) -> dict[str, Any]:
        """What the site's PrivacyReport carries of it (common/run_files.py)."""
        return dict(zip(AUDIT_FIELDS, (self.epsilon, self.canaries, self.guesses, self.correct), strict=True))

    def line(self) -> str:
        return (audit_line(self.epsilon_accounted, self.report(), self.confidence)
                + f" — membership AUC {self.auc:.2f}, run {self.run_id}")


def audit_line(accounted: float | None, released: dict[str, Any], confidence: float = 1 - SIGNIFICANCE) -> str:
    """"ε accounted X — ε audited ≥ Y at 95 % (m canaries, r guesses, v correct)", from what a site releases
    (:meth:`AuditResult.report`)."""
    return (f"ε accounted {'n/a' if accounted is None else f'{accounted:.2f}'} — ε audited ≥ "
            f"{released['audited_epsilon']:.2f} at {confidence * 100:.0f} % ({released['audit_canaries']} canaries, "
            f"{released['audit_guesses']} guesses, {released['audit_correct']} correct)")


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, *,
          significance: float = SIGNIFICANCE, epsilon_accounted: float | None = None, rounds: int = 0,
          run_id: int | None = None) -> AuditResult:
    """The one-run audit of canaries' ``scores`` (higher = more likely included): the best bound over the k grid
    (:data:`GUESS_FRACTIONS`), each k tested at ``significance`` / (grid size), so the result holds at
    1 − ``significance`` whichever k it picked."""
    m = len(scores)
    if m < 2 or len(included) != m:
        raise AuditError(f"an audit needs at least 2 canaries and one inclusion bit each, got {m} scores and "
                         f"{len(included)} bits")
    grid = sorted({max(1, min(m // 2, round(fraction * m))) for fraction in GUESS_FRACTIONS})
    best = AuditResult(m, 0, 0, 0.0, delta, 1 - significance, membership_auc(scores, included), epsilon_accounted,
                       rounds, run_id)
    for k in grid:
        guesses, correct = guess_counts(scores, included, k)
        epsilon = epsilon_lower_bound(m, guesses, correct, delta, significance / len(grid))
        if epsilon > best.epsilon or best.guesses == 0:
            best = dataclasses.replace(best, guesses=guesses, correct=correct, epsilon=epsilon)
    return best


def write_audit_result(state_dir: Path, result: AuditResult) -> Path:
    path = state_dir / AUDIT_RESULT_FILE
    write_json(path, dataclasses.asdict(result))
    return path


def read_audit_result(state_dir: Path) -> AuditResult:
    """The site's latest audit; AuditError naming the file and how to get one."""
    path = Path(state_dir) / AUDIT_RESULT_FILE
    if not path.is_file():
        raise AuditError(f"{path} does not exist: this site has no privacy audit yet (start it with "
                         "`fedtune client start --audit-canaries 200`; the audit is computed from the second round on)")
    try:
        saved = json.loads(path.read_text())
        return AuditResult(**{f.name: saved[f.name] for f in dataclasses.fields(AuditResult) if f.name in saved})
    except (OSError, ValueError, TypeError) as exc:
        raise AuditError(f"{path} is unreadable ({exc}); it is rewritten at the site's next round") from exc


def run_audit(state_dir: Path, run_id: int) -> AuditResult | None:
    """The site's latest audit of run ``run_id`` (None when it has none yet, or only of another run)."""
    try:
        result = read_audit_result(state_dir)
    except AuditError:
        return None
    return result if result.run_id == run_id else None
