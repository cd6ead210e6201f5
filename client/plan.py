"""The training plan a site follows each round: expected batch, steps, learning rate, clipping norm.

By default the plan is automatic and computed AT THE SITE from a size it makes public on purpose, never from
its true number of privacy units n: the size it declares in its policy, or else ñ, a DP estimate of n drawn
once and charged to its ledger (client.privacy). Under add/remove-one accounting at fixed (σ, q, steps), a
plan from n would itself leak n (and its ε would be a lookup table for n); a plan from ñ is the same for
n and n + 1, and Poisson sampling of the TRUE units at q = B/ñ is exactly what the ledger charges.
Any value set in ``train.*`` overrides the rule, within the bounds of the site's policy.
The rule (measured on BANKING77 with MiniLM + FFA-LoRA, BENCHMARKS.md ``dp-federation``): DP-SGD
learns when batches are large and the run is long, because the noise on a mean gradient falls as
σ·C/B while σ grows only slowly with the sampling rate. So:

    expected batch  B = clamp(⌈ñ/4⌉, min(ñ, 32), 2,048)        (sampling rate q = B/ñ ≤ 1)
    steps per round   = ⌈(30 / rounds) / q⌉                      (30 epochs of ñ units over the whole run)
    learning rate     = 2e-2 (AdamW on lora_B + head)
    clipping norm     = privacy.max-grad-norm (1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import AUTO_LEARNING_RATE, PrivacySettings, TrainSettings

AUTO_SAMPLE_RATE = 0.25
AUTO_MIN_BATCH = 32
AUTO_MAX_BATCH = 2048
AUTO_TOTAL_EPOCHS = 30


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int
    """Expected units per logical step, and DP-SGD's divisor (Poisson sampling: each unit joins with q = B/ñ)."""
    units: int
    """The public size ñ the plan is computed from (declared or DP-estimated), not the site's true count."""
    steps: int
    """Logical steps per round."""
    learning_rate: float
    max_grad_norm: float

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.units


def plan_training(units: int, train: TrainSettings, privacy: PrivacySettings, planned_rounds: int) -> TrainingPlan:
    """The plan for one round of ``planned_rounds`` at a site of public size ``units``; settings left at 0 follow
    the rule above."""
    if units < 1:
        raise ValueError("a training plan needs at least one unit")
    automatic = min(max(math.ceil(units * AUTO_SAMPLE_RATE), min(units, AUTO_MIN_BATCH)), AUTO_MAX_BATCH)
    batch = min(train.batch_size or automatic, units)
    if train.local_epochs:
        steps = -(-train.local_epochs * units // batch)  # ⌈E·ñ/B⌉ in integers: E epochs at q = B/ñ
    else:
        steps = max(1, math.ceil(AUTO_TOTAL_EPOCHS * units / (planned_rounds * batch)))
    return TrainingPlan(batch_size=batch, units=units, steps=steps,
                        learning_rate=train.learning_rate or AUTO_LEARNING_RATE,
                        max_grad_norm=privacy.max_grad_norm)
