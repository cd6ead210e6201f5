"""The public plan of a distributed-DP round (privacy.dp-mode = distributed), which the coordinator and every site
compute alike from the run config and two public numbers: the round's sites n and the sum N of their public sizes
(each declared, or the DP estimate ñ a site already charged: client/train.py public_size).

- q = B/N, B the automatic plan's expected batch for N pooled units (client/plan.py: what central DP-SGD on the
  pooled records would take), or train.batch-size; one DP-SGD step per round, T = federation.rounds steps;
- μ reaches ε·(1 − 1/50) over T steps (client.privacy.ESTIMATE_SHARE: room for the size estimate of a site that
  declares no size, so every site plans the same μ);
- the ring is sized for n sites that EACH add all of μ (h = 1 in the public plan): whatever honest sites each site
  assumes (its policy's min-honest-sites, h_i ≥ 1), its share μ/h_i fits, at about ½·log₂ n extra bits. The
  coordinator cannot know, and so does not say, what the sites assume: each site adds μ/h_i itself
  (:func:`common.distributed_dp.site_share`) and refuses a round of fewer than h_i sites;
- in a federated-evaluation round (common.federated_eval) each site appends its noisy evaluation counts, each in
  [0, MAX_COUNT], after the d' gradient coordinates, and the ring is widened so that n sites' counts sum exactly
  (:func:`with_count_slots`).

:func:`ring_round` is the one call both sides make: the plan and the vector each site uploads.

Every site of a round must add the SAME share μ/h: a site that assumes h_i honest sites is protected only if any h_i
honest sites' shares reach μ, and an honest site that added μ/h_j with h_j > h_i would leave them short. So the
round has one h, the fewest honest sites any of its sites assumes (:func:`round_honest_sites`: each site reports its
own with its public size); a site refuses a round whose h exceeds its own. The round's noise plan (the plan, h, the
count slots and the evaluation plan) is hashed into the secure-aggregation round id (:attr:`RingRound.digest`,
common.secure_update.secure_round_id), so honest sites that were told different public totals, h or run configs
never share a round.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from client.plan import plan_training
from client.privacy import ESTIMATE_SHARE
from common.config import RunSettings
from common.distributed_dp import DistributedDpPlan, DistributedDpSettings, plan_distributed_dp
from common.federated_eval import EvalPlan, plan_evaluation
from common.secure_update import MAX_COUNT

PUBLIC_PLAN_HONEST_SITES = 1
"""The public plan's h: the ring holds n full shares of μ, so any site's own assumption fits."""


@functools.lru_cache(maxsize=16)
def round_plan(settings: RunSettings, *, dimension: int, sites: int, public_total: int) -> DistributedDpPlan:
    """The round's public plan for ``sites`` sites of public sizes summing to ``public_total``."""
    if public_total < 1:
        raise ValueError(f"the sites' public sizes sum to {public_total}: a plan needs at least one unit")
    pooled = plan_training(public_total, settings.train, settings.privacy, settings.federation.rounds)
    privacy = settings.privacy
    return plan_distributed_dp(DistributedDpSettings(
        dimension=dimension, clip=privacy.max_grad_norm, sample_rate=pooled.sample_rate,
        steps=settings.federation.rounds, epsilon=privacy.epsilon * float(1 - ESTIMATE_SHARE), delta=privacy.delta,
        sites=sites, min_honest_sites=PUBLIC_PLAN_HONEST_SITES, expected_batch=pooled.sample_rate * public_total))


def with_count_slots(plan: DistributedDpPlan, *, sites: int, count_slots: int) -> DistributedDpPlan:
    """The round's plan when each of ``sites`` sites appends ``count_slots`` evaluation counts in [0, MAX_COUNT] to
    its ring vector: b widened to hold their sum, n·MAX_COUNT < 2^b, so the counts decode exactly. The gradient
    coordinates, their noise and their bound are unchanged: a wider ring only makes their wrap-around rarer."""
    if not count_slots:
        return plan
    return dataclasses.replace(plan, ring_bits=max(plan.ring_bits, (sites * MAX_COUNT).bit_length()))


@dataclass(frozen=True)
class RingRound:
    """A distributed-DP round's public layout, the same at the coordinator and at every site."""

    plan: DistributedDpPlan
    """The DP plan, its ring widened in an evaluation round."""
    count_slots: int
    """The evaluation counts each site appends after its d' gradient coordinates (0 outside evaluation rounds)."""
    evaluation: EvalPlan | None = None
    """In an evaluation round, the run's evaluation plan (each site adds its share of it: EvalPlan.shared)."""

    @property
    def vector_length(self) -> int:
        """What each site uploads to the ring: d' noisy gradient coordinates, then its counts."""
        return self.plan.padded_dimension + self.count_slots

    def digest(self, honest_sites: int) -> bytes:
        """SHA-256 of the round's noise plan when every site adds 1/``honest_sites`` of the noise: every number of
        the plan and of the evaluation plan (floats as json writes them, which round-trips exactly; fractions as
        p/q) and the count slots."""
        noise = {"plan": dataclasses.asdict(self.plan), "count_slots": self.count_slots, "honest_sites": honest_sites,
                 "evaluation": dataclasses.asdict(self.evaluation) if self.evaluation else None}
        return hashlib.sha256(json.dumps(noise, sort_keys=True, default=_exact).encode()).digest()


def _exact(value: object) -> str:
    """A number json would round, written exactly."""
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    raise TypeError(f"{type(value).__name__} in a noise plan")


def ring_round(settings: RunSettings, *, dimension: int, sites: int, public_total: int,
               server_round: int) -> RingRound:
    """Round ``server_round``'s layout for ``sites`` sites of public sizes summing to ``public_total``."""
    evaluation = plan_evaluation(settings)
    count_slots = evaluation.slots_in(server_round) if evaluation else 0
    plan = round_plan(settings, dimension=dimension, sites=sites, public_total=public_total)
    return RingRound(with_count_slots(plan, sites=sites, count_slots=count_slots), count_slots,
                     evaluation if count_slots else None)


def round_honest_sites(assumed: Iterable[int], threshold: int) -> int:
    """The round's h: the fewest honest sites any of its sites assumes (0: the site takes the round's secure-
    aggregation threshold, its policy's default)."""
    return min((h or threshold for h in assumed), default=threshold)
