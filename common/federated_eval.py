"""Federated evaluation, private by construction: what a site releases about the global model on its own evaluation
split, and what the coordinator makes of the noisy sums. Light: no torch.

A site scores the adapter it received (the model of the previous round) on its evaluation split, a set of units
that never train (client.eval_split), and releases one vector of bounded counts per evaluation round:

    classification, K labels   TP_c, FP_c, FN_c for each label c (3K), correct, examples
                               one record moves at most 3 slots by 1 (right: TP_y, correct, examples;
                               wrong: FP_ŷ, FN_y, examples): L2 sensitivity √3
    causal-lm                  examples, loss, answer_tokens, exact_match, rouge_l: one record moves each by at
                               most 1 (its mean answer-token loss clipped to [0, LOSS_MAX] / LOSS_MAX, its answer
                               length / max-length, its ROUGE-L, stochastically rounded to 0 or 1 with OS
                               randomness: unbiased): L2 sensitivity √5

With a per-person unit at most m = train.max-rows-per-unit rows of a person are evaluated, so one person moves
each slot by at most m: the sensitivity is m·√3 (m·√5), since Σ_j (Σ_rows δ_rj)² ≤ m·Σ_rows Σ_j δ_rj² ≤ m²·c.

Each slot gets independent discrete Gaussian noise of variance parameter σ² (common.discrete_noise, exact, OS
entropy): the release is ρ-zCDP with ρ = Δ₂²/(2σ²) (CKS 2020, Theorem 4 per coordinate; Rényi divergences add over
independent coordinates, so no extra term), whatever the coordinator sees: secure aggregation only hides it further.
In distributed DP mode the sites share the noise as they share the gradient's (:meth:`EvalPlan.shared`): each adds
σ_s² ≈ σ²/h for the round's h, and the h honest sites' sum of d independent discrete Gaussians is ρ-zCDP against the
coordinator with ρ = ½(Δ₂/√(h·σ_s²) + √d·τ)², τ = 10·Σ_{k=1}^{h−1} exp(−2π²σ_s²·k/(k+1)) (Kairouz, Liu & Steinke
2021, the distributed discrete Gaussian, Proposition 14); σ_s² is the smallest on the grid whose ρ is at most the
unshared release's, so each evaluation is charged no more than in local mode, and a site's own release alone is
about h times that (``own_rho``). Over the run's E planned evaluations ρ composes to E·ρ, which is (ε, δ)-DP with ε
= Eρ + 2√(Eρ·ln(1/δ)) (Bun & Steinke 2016, Proposition 1.3); σ is the smallest that meets the run's
federation.eval-epsilon at privacy.delta. Each noisy count is shifted by a public OFFSET (so it stays non-negative
in the secure sum's ring) and clamped to [0, MAX_COUNT]: post-processing. σ and OFFSET are functions of the run's
settings only, so the coordinator and every site agree on them.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from common.config import ConfigError, RunSettings, TaskKind, unit_column
from common.discrete_noise import discrete_gaussian
from common.run_files import FederatedScores
from common.secure_update import MAX_COUNT

LOSS_MAX = 8.0
"""Causal-lm: each example's mean answer-token loss is clipped to [0, LOSS_MAX] nats before it is counted."""
OFFSET_SIGMAS = 14
"""OFFSET = ⌈14σ⌉: a noisy count falls below −OFFSET with probability below e^-98 (and is then clamped)."""
SIGMA_SQ_STEP = Fraction(1, 1000)
"""σ² is rounded UP to this grid: a rational σ² for the exact sampler, never less noise than planned."""
MACRO_F1_MIN_SIGNAL = 4.0
"""Macro-F1 is a mean of per-label ratios, biased once a label's counts are not large next to the noise: it is
reported only when a label's mean F1 denominator (2TP + FP + FN, 2·examples/K on average) is at least this many
standard deviations of its noise (√(6s)·σ for s sites). Below that the bias is larger than the interval admits
(77 labels, 5 sites of 400 examples, σ = 5: mean error 0.1, no interval covering the truth)."""
INTERVAL_DRAWS = 400
INTERVAL_SEED = 20_250_605
"""The coordinator's interval is a parametric bootstrap over the known noise: post-processing of the release,
so its randomness may be (and is, for reproducible reports) seeded."""
CAUSAL_LM_SLOTS = ("examples", "loss", "answer_tokens", "exact_match", "rouge_l")


@dataclass(frozen=True)
class EvalLayout:
    """Which count is in which slot, and how far one privacy unit moves them."""

    task: TaskKind
    labels: int
    """K, the number of classification labels (0 for causal-lm)."""
    rows_per_unit: int
    """m: the most rows of one unit that are evaluated (1 with record units)."""

    @property
    def slots(self) -> int:
        return 3 * self.labels + 2 if self.task == "classification" else len(CAUSAL_LM_SLOTS)

    @property
    def sensitivity_sq(self) -> int:
        """Δ₂²: the squared L2 distance one unit can move the count vector."""
        return self.rows_per_unit ** 2 * (3 if self.task == "classification" else len(CAUSAL_LM_SLOTS))


@dataclass(frozen=True)
class EvalPlan:
    """A run's federated evaluation: public, so the coordinator and the sites compute the same one."""

    layout: EvalLayout
    every: int
    """Sites evaluate in rounds 1, 1 + every, 1 + 2·every, ... (the model each round receives)."""
    evaluations: int
    """E: the evaluations the run plans (its rounds / every, rounded up)."""
    epsilon: float
    """ε of the E evaluations together, at ``delta``, per unit of a site's evaluation split."""
    delta: float
    sigma_sq: Fraction
    """The discrete Gaussian variance parameter each site adds to each count."""
    offset: int
    honest_sites: int = 1
    """h: the honest sites whose noise adds up (1: each site adds all of it, local mode; :meth:`shared`)."""

    @property
    def rho(self) -> float:
        """ρ of one evaluation (zCDP), against the coordinator: of one site's release, or with h > 1 of the h honest
        sites' summed noise (module docstring)."""
        if self.honest_sites == 1:
            return self.own_rho
        tau = 10 * sum(math.exp(-2 * math.pi ** 2 * float(self.sigma_sq) * k / (k + 1))
                       for k in range(1, self.honest_sites))
        total = math.sqrt(self.layout.sensitivity_sq / (self.honest_sites * float(self.sigma_sq)))
        return 0.5 * (total + math.sqrt(self.layout.slots) * tau) ** 2

    @property
    def own_rho(self) -> float:
        """ρ of one site's release alone: what is left if secure aggregation or the honesty assumption fails."""
        return self.layout.sensitivity_sq / (2 * float(self.sigma_sq))

    @property
    def own_epsilon(self) -> float:
        """ε at δ of one site's releases alone over the E planned evaluations (E·own_rho): with h > 1, what is left
        if secure aggregation or the honesty assumption fails; with h = 1, the plan's ε."""
        return zcdp_epsilon(self.evaluations * self.own_rho, self.delta)

    @property
    def sigma(self) -> float:
        """Each site's noise σ per count."""
        return math.sqrt(float(self.sigma_sq))

    def shared(self, honest_sites: int) -> EvalPlan:
        """The plan when each site adds its share for ``honest_sites`` honest sites (distributed DP): the smallest
        σ_s² on the grid, from σ²/h up, whose ρ against the coordinator is at most this plan's."""
        if honest_sites < 1:
            raise ValueError(f"honest_sites must be >= 1, got {honest_sites}")
        if honest_sites == 1:
            return self
        share = dataclasses.replace(self, sigma_sq=_on_grid(self.sigma_sq / honest_sites), honest_sites=honest_sites)
        while share.rho > self.rho:  # τ: negligible once σ_s² ≥ 1, where this takes a step or two
            share = dataclasses.replace(share, sigma_sq=share.sigma_sq + SIGMA_SQ_STEP)
        return share

    def evaluates(self, server_round: int) -> bool:
        return (server_round - 1) % self.every == 0

    def slots_in(self, server_round: int) -> int:
        """The count slots the round's secure sum carries (0 in a round without evaluation)."""
        return self.layout.slots if self.evaluates(server_round) else 0


def _on_grid(sigma_sq: Fraction) -> Fraction:
    """σ² rounded UP to the grid (never less noise than asked)."""
    return Fraction(math.ceil(sigma_sq / SIGMA_SQ_STEP)) * SIGMA_SQ_STEP


def zcdp_epsilon(rho: float, delta: float) -> float:
    """ε of a ρ-zCDP mechanism at δ: ρ + 2√(ρ·ln(1/δ)) (Bun & Steinke 2016, Proposition 1.3)."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def zcdp_rho(epsilon: float, delta: float) -> float:
    """The largest ρ with :func:`zcdp_epsilon` (ρ, δ) ≤ ε: (√(L + ε) − √L)², L = ln(1/δ)."""
    log_inv = math.log(1 / delta)
    return (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2


def plan_evaluation(settings: RunSettings) -> EvalPlan | None:
    """The run's evaluation plan from its settings alone; None when federation.eval-every is 0. In distributed DP
    mode the counts follow the gradient coordinates in the ring (common.distributed_round.ring_round)."""
    federation = settings.federation
    if not federation.eval_every:
        return None
    rows = settings.train.max_rows_per_unit if unit_column(settings.privacy.unit) else 1
    layout = EvalLayout(settings.task, len(settings.data.labels) if settings.task == "classification" else 0, rows)
    evaluations = -(-federation.rounds // federation.eval_every)
    rho = zcdp_rho(federation.eval_epsilon, settings.privacy.delta) / evaluations
    sigma_sq = _on_grid(Fraction(layout.sensitivity_sq) / (2 * Fraction(rho)))
    offset = math.ceil(OFFSET_SIGMAS * math.sqrt(float(sigma_sq)))
    if offset >= MAX_COUNT // 2:
        raise ConfigError(f"federation.eval-epsilon={federation.eval_epsilon:g} over {evaluations} evaluations needs "
                         f"noise of σ={math.sqrt(float(sigma_sq)):.0f} per count, too much to sum: raise "
                         "federation.eval-epsilon or federation.eval-every")
    return EvalPlan(layout, federation.eval_every, evaluations, federation.eval_epsilon, settings.privacy.delta,
                    sigma_sq, offset)


MANY_EVALUATIONS = 20
"""Past this many evaluations in a run the coordinator warns: federation.eval-epsilon is spread thin over them."""


def thin_evaluation(plan: EvalPlan | None, rounds: int) -> str | None:
    """A warning when the run's evaluations are so many that each count drowns in its noise (a distributed-DP
    run of 120 one-step rounds evaluating every round), with the σ of about 10 evaluations; None otherwise."""
    if plan is None or plan.evaluations <= MANY_EVALUATIONS:
        return None
    every = -(-rounds // 10)
    fewer = -(-rounds // every)
    return (f"federated evaluation {plan.evaluations} times spreads federation.eval-epsilon={plan.epsilon:g} thin: "
            f"each count gets noise of σ={plan.sigma:.0f}; --eval-every {every} ({fewer} evaluations) would give "
            f"σ≈{plan.sigma * math.sqrt(fewer / plan.evaluations):.0f}")


# ------------------------------------------------------------------ the site's side
def classification_counts(confusion: np.ndarray) -> list[int]:
    """The slots of a confusion matrix (confusion[true, predicted]): TP_c, FP_c, FN_c per label, correct, examples."""
    true_pos = np.diag(confusion)
    false_pos, false_neg = confusion.sum(axis=0) - true_pos, confusion.sum(axis=1) - true_pos
    return [int(c) for c in (*true_pos, *false_pos, *false_neg, true_pos.sum(), confusion.sum())]


def stochastic_round(value: float) -> int:
    """1 with probability ``value`` (clipped to [0, 1]), else 0, from OS entropy: unbiased, moves a count by ≤ 1."""
    return int(secrets.randbelow(1 << 32) < round(min(max(value, 0.0), 1.0) * (1 << 32)))


def causal_lm_counts(losses: Sequence[float], answer_tokens: Sequence[int], exact: Sequence[bool],
                     rouge: Sequence[float], max_tokens: int) -> list[int]:
    """The slots of per-example scores (each example's mean answer-token loss, answer length, exact match, ROUGE-L),
    each example adding at most 1 to each slot. A score that is not finite (a record whose logits overflow under a
    hostile adapter) counts as the worst one, loss at the clip and ROUGE-L 0, so that one record cannot make the
    evaluation fail (and so change the kind of what the site sends)."""
    return [len(losses), sum(stochastic_round(loss / LOSS_MAX if not math.isnan(loss) else 1.0) for loss in losses),
            sum(stochastic_round(tokens / max_tokens) for tokens in answer_tokens), sum(bool(e) for e in exact),
            sum(stochastic_round(r if math.isfinite(r) else 0.0) for r in rouge)]


def release(counts: Sequence[int], plan: EvalPlan) -> list[int]:
    """What leaves the site: each count + discrete Gaussian noise + OFFSET, clamped to [0, MAX_COUNT]. A site that
    does not evaluate releases ``[0] * slots`` through here too (noise on nothing: the same shape, no record)."""
    if len(counts) != plan.layout.slots:
        raise ValueError(f"{len(counts)} counts for a layout of {plan.layout.slots} slots")
    return [min(max(int(count) + discrete_gaussian(plan.sigma_sq) + plan.offset, 0), MAX_COUNT) for count in counts]


# ------------------------------------------------------------------ the coordinator's side
def _scores(counts: np.ndarray, layout: EvalLayout, max_tokens: int) -> np.ndarray:
    """Metrics of count vectors (rows: draws), NaN where there is nothing to divide by. Classification: accuracy,
    macro-F1 over labels whose 2TP + FP + FN is at least one; causal-lm: loss, exact match, ROUGE-L, answer tokens."""
    counts = np.maximum(counts, 0.0)  # a count below zero is noise: nothing was counted
    if layout.task == "classification":
        k = layout.labels
        tp, fp, fn = counts[:, :k], counts[:, k:2 * k], counts[:, 2 * k:3 * k]
        correct, examples = counts[:, 3 * k], counts[:, 3 * k + 1]
        denominator = 2 * tp + fp + fn
        active = denominator >= 1
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=active)
        with np.errstate(invalid="ignore", divide="ignore"):
            macro = np.where(active.any(axis=1), (f1 * active).sum(axis=1) / active.sum(axis=1), np.nan)
            accuracy = np.where(examples >= 1, np.minimum(correct / examples, 1.0), np.nan)
        return np.stack([accuracy, macro], axis=1)
    examples = counts[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(examples[:, None] >= 1, np.minimum(counts[:, 1:] / examples[:, None], 1.0), np.nan)
    return np.stack([ratios[:, 0] * LOSS_MAX, ratios[:, 2], ratios[:, 3], ratios[:, 1] * max_tokens], axis=1)


SCORE_NAMES = {"classification": ("accuracy", "macro_f1"),
               "causal-lm": ("loss", "exact_match", "rouge_l", "answer_tokens")}


def decode(noisy_sum: Sequence[int], sites: int, plan: EvalPlan, *, model_round: int,
           max_tokens: int = 1) -> FederatedScores:
    """The federation's scores from the sum of ``sites`` releases: each count estimated as the sum minus
    sites·OFFSET (negative estimates count as 0), each score with a 95 % interval from a parametric bootstrap over
    the noise's known variance (sites·σ² per slot, σ² each site's: shared in distributed mode; the evaluation
    sample's own variance is not in it). Macro-F1 is
    None where the per-label counts are too small next to the noise (:data:`MACRO_F1_MIN_SIGNAL`).
    ``max_tokens``: causal-lm's answer-length scale (data.max-length // 2)."""
    layout = plan.layout
    if len(noisy_sum) != layout.slots or sites < 1:
        raise ValueError(f"a sum of {len(noisy_sum)} slots from {sites} sites, expected {layout.slots} from >= 1")
    estimate = np.asarray(noisy_sum, dtype=np.float64) - sites * plan.offset
    spread = math.sqrt(sites) * plan.sigma
    draws = estimate + np.random.default_rng(INTERVAL_SEED).normal(0.0, spread, (INTERVAL_DRAWS, layout.slots))
    point = _scores(estimate[None, :], layout, max_tokens)[0]
    boot = _scores(draws, layout, max_tokens)
    names = SCORE_NAMES[layout.task]
    scores: dict[str, float | None] = {}
    intervals: dict[str, list[float]] = {}
    unreliable = set()
    if layout.task == "classification" and 2 * estimate[-1] / layout.labels < MACRO_F1_MIN_SIGNAL * math.sqrt(
            6 * sites) * plan.sigma:
        unreliable.add("macro_f1")
    for i, name in enumerate(names):
        scores[name] = None if math.isnan(point[i]) or name in unreliable else float(point[i])
        kept = boot[:, i][~np.isnan(boot[:, i])]
        if scores[name] is not None and len(kept):
            intervals[name] = [float(np.quantile(kept, 0.025)), float(np.quantile(kept, 0.975))]
    examples_slot = -1 if layout.task == "classification" else 0
    return FederatedScores(model_round=model_round, sites=sites, examples=max(0.0, float(estimate[examples_slot])),
                           scores=scores, intervals=intervals, noise_sigma=plan.sigma, epsilon=plan.epsilon,
                           own_noise_epsilon=plan.own_epsilon if plan.honest_sites > 1 else None)
